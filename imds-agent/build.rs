//! Builds the kernel programs (`imds-ebpf`) for the BPF target and hands the object to the
//! agent through `OUT_DIR/imds-ebpf`.
//!
//! Without the BPF toolchain (nightly with rust-src, and bpf-linker) an empty stub object is
//! written instead, so `cargo check`, clippy and unit tests work anywhere; the agent then
//! refuses to load with a message pointing at `cargo xtask setup`. Set `IMDS_REQUIRE_EBPF=1`
//! to make a missing toolchain a build error (the test and release paths do).
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{bail, Context as _};

const PACKAGE: &str = "imds-ebpf";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=IMDS_REQUIRE_EBPF");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?);
    let ebpf_dir = manifest_dir.join("..").join(PACKAGE);
    let require = env::var("IMDS_REQUIRE_EBPF").is_ok_and(|v| v == "1" || v == "true");

    match missing_toolchain() {
        None => {
            let root_dir = ebpf_dir.to_str().context("non-UTF-8 path to imds-ebpf")?;
            if let Ok(linker) = which::which("bpf-linker") {
                println!("cargo:rerun-if-changed={}", linker.display());
            }
            // aya-build forwards every stderr line of the nested cargo as a cargo warning;
            // keep that to real diagnostics. (Build scripts are single-threaded here.)
            // SAFETY: no other thread reads or writes the environment at this point.
            unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
            aya_build::build_ebpf(
                [aya_build::Package { name: PACKAGE, root_dir, ..Default::default() }],
                aya_build::Toolchain::Nightly,
            )
        }
        Some(why) if require => {
            bail!("cannot build the eBPF object: {why}; run `cargo xtask setup`")
        }
        Some(why) => {
            println!(
                "cargo:warning=building imds-agent WITHOUT its eBPF object ({why}); \
                 it will refuse to run. Run `cargo xtask setup` to install the BPF toolchain."
            );
            fs::write(out_dir.join(PACKAGE), []).context("writing stub eBPF object")?;
            Ok(())
        }
    }
}

/// Why the BPF object cannot be built here, if it cannot.
fn missing_toolchain() -> Option<String> {
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        return Some("AYA_BUILD_SKIP is set".into());
    }
    if which::which("bpf-linker").is_err() {
        return Some("bpf-linker is not on PATH".into());
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let Some(sysroot) = sysroot else {
        return Some("no nightly toolchain (rustup run nightly rustc failed)".into());
    };
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Some("rust-src is not installed for nightly".into());
    }
    None
}
