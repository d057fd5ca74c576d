//! `cargo xtask image`: the shipped container image, built with no registry.
//!
//! The agent is linked statically (glibc, `crt-static`: the same allocator and resolver as
//! the dynamic build the benchmarks measure), so the image is `FROM scratch` and holds only
//! the binary, its man pages and completions, and a CA bundle for Entra. The build context
//! is staged under target/image/ and the `Dockerfile` at the root copies from it.
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, render::generate_docs, run, workspace_root};

/// The image `cargo xtask test` builds and the image test runs.
pub(crate) const TEST_TAG: &str = "localhost/imds-agent:test";

/// The target a static glibc binary is built for. Naming it explicitly keeps `crt-static`
/// away from build scripts and proc-macros, which must stay dynamic.
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Where the system keeps its CA bundle (Debian and its derivatives).
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Builds the static agent, stages the build context and builds the image as `tag`.
pub(crate) fn image(tag: &str) -> Result<()> {
    if env::consts::ARCH != "x86_64" {
        bail!("the image is built for x86_64; this machine is {}", env::consts::ARCH);
    }
    println!("==> a static imds-agent (release, glibc crt-static)");
    run(cargo()
        .args(["build", "--release", "--locked", "--target", TARGET, "--package", "imds-agent", "--bin", "imds-agent"])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("IMDS_REQUIRE_EBPF", "1"))?;
    let agent = workspace_root().join("target").join(TARGET).join("release/imds-agent");
    ensure_static(&agent)?;

    println!("==> the build context: target/image/");
    let context = workspace_root().join("target/image");
    if context.exists() {
        fs::remove_dir_all(&context).with_context(|| format!("clearing {}", context.display()))?;
    }
    fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    fs::copy(&agent, context.join("imds-agent")).with_context(|| format!("copying {}", agent.display()))?;
    fs::copy(CA_BUNDLE, context.join("ca-certificates.crt"))
        .with_context(|| format!("copying {CA_BUNDLE} (install the ca-certificates package)"))?;
    generate_docs(&agent, &context)?;

    println!("==> the image: {tag}");
    let engine = engine()?;
    run(Command::new(&engine)
        .args(["build", "--pull=never", "--file"])
        .arg(workspace_root().join("Dockerfile"))
        .args(["--tag", tag])
        .arg(&context))?;
    println!("    built {tag} with {}", engine.display());
    Ok(())
}

/// podman, or docker where podman is not installed.
fn engine() -> Result<PathBuf> {
    for name in ["podman", "docker"] {
        if Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return Ok(PathBuf::from(name));
        }
    }
    bail!("neither podman nor docker is installed: run `cargo xtask setup` (it installs podman)")
}

/// A `FROM scratch` image has no dynamic loader: the binary must not ask for one.
fn ensure_static(binary: &std::path::Path) -> Result<()> {
    let elf = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    if interpreter(&elf).context("reading the ELF program headers")? {
        bail!("{} is dynamically linked: the image has no loader to run it", binary.display());
    }
    Ok(())
}

/// Whether a 64-bit little-endian ELF file names a program interpreter (`PT_INTERP`).
fn interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| elf.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| elf.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()));
    let u64_at = |at: usize| elf.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let (phoff, phentsize, phnum) = (usize::try_from(u64_at(0x20)?).ok()?, usize::from(u16_at(0x36)?), u16_at(0x38)?);
    (0..usize::from(phnum))
        .map(|i| u32_at(phoff + i * phentsize))
        .collect::<Option<Vec<_>>>()
        .map(|types| types.contains(&PT_INTERP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_test_binary_is_recognised_as_dynamic_or_static() {
        // Whatever this test binary is, reading it gives an answer, and `/bin/sh` is dynamic
        // on any Debian machine.
        let this = fs::read(env::current_exe().expect("the test binary")).expect("readable");
        assert!(interpreter(&this).is_some());
        let sh = fs::read("/bin/sh").expect("a shell");
        assert_eq!(interpreter(&sh), Some(true));
        assert_eq!(interpreter(b"not an elf"), None);
    }
}
