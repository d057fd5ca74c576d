//! `imds-bench`: the benchmarks behind `cargo xtask bench` (root; it builds its own namespaces
//! and cgroups, cleans up, and never touches the real metadata address). Prints the table and
//! writes the JSON report.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use imds_tests::bench::{self, Effort, Figure, Report};

/// One benchmark: its figure at an effort.
type Benchmark = fn(Effort) -> Figure;

#[derive(Parser)]
struct Args {
    /// Every benchmark, briefly: checks the harness works (CI), not the targets.
    #[arg(long)]
    quick: bool,
    /// Only these benchmarks (e.g. `--only P4,P5`); P1–P3 run together, and P8–P8f.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where the JSON report goes; the picture of the run goes beside it (`.svg`).
    #[arg(long, default_value = "target/bench/latest.json")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let effort = if args.quick { Effort::QUICK } else { Effort::FULL };
    let wanted = |ids: &[&str]| {
        args.only.is_empty() || ids.iter().any(|id| args.only.iter().any(|o| o.eq_ignore_ascii_case(id)))
    };
    let mut figures = Vec::new();
    if wanted(&["P1", "P2", "P2b", "P3"]) {
        figures.extend(bench::kernel::run(effort));
    }
    if wanted(&["P8", "P8b", "P8c", "P8d", "P8e", "P8f"]) {
        figures.extend(bench::forward::run(effort));
    }
    let single: [(&str, Benchmark); 5] = [
        ("P4", bench::tokens::p4),
        ("P5", bench::tokens::p5),
        ("P6", bench::policy::run),
        ("P7", bench::memory::run),
        ("P9", bench::cold::run),
    ];
    for (id, run) in single {
        if wanted(&[id]) {
            figures.push(run(effort));
        }
    }
    figures.sort_by_key(|f| f.id);
    let report = Report::new(args.quick, figures);
    println!("{}", report.table());
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("report: {}", args.out.display());
    let picture = args.out.with_extension("svg");
    match bench::picture::draw(&report, &picture) {
        Ok(()) => println!("picture: {}", picture.display()),
        Err(e) => println!("no picture: {e}"),
    }
    let missing: Vec<&str> = report.figures.iter().filter(|f| f.value.is_none()).map(|f| f.id).collect();
    if !missing.is_empty() {
        println!("not measured yet: {}", missing.join(", "));
    }
    Ok(())
}
