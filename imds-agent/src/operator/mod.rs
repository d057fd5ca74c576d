//! The operator's commands: `imds-agent status` (is this node protected?), `explain` (the
//! policy simulator), `doctor` (can this node run the filter?), `health` (the kubelet's
//! probes), `uninstall`, and the [`control`] socket the running agent answers them on.
//!
//! Each command judges in a pure function ([`status::assess`], [`explain::explain`], the
//! parsers in [`doctor`]) and gathers its inputs (pins, cgroupfs, the control socket) in one
//! function at the edge ([`status::gather`], [`explain::gather`], [`doctor::run`]).
use std::path::Path;

use anyhow::Context as _;

use crate::cli::{Cli, Output};

pub mod control;
pub mod doctor;
pub mod explain;
pub mod status;
pub mod uninstall;

/// Prints `result` as `output` asks and exits: with `exit` of the answer, or 3 (and the
/// error on stderr) when there is none.
pub fn print_and_exit<T: std::fmt::Display + serde::Serialize>(
    output: Output,
    result: anyhow::Result<T>,
    exit: impl FnOnce(&T) -> i32,
) -> ! {
    let code = match result {
        Ok(answer) => {
            match output {
                Output::Text => print!("{answer}"),
                Output::Json => match serde_json::to_string_pretty(&answer) {
                    Ok(json) => println!("{json}"),
                    Err(e) => eprintln!("error: {e}"),
                },
            }
            exit(&answer)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            3
        }
    };
    std::process::exit(code)
}

/// Man pages (one per command) and bash, zsh and fish completions, from the clap definitions.
pub fn generate_docs(out: &Path) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    let (man, completions) = (out.join("man"), out.join("completions"));
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "imds-agent", &completions)
            .with_context(|| format!("writing {shell} completions to {}", completions.display()))?;
    }
    println!("man pages in {}, completions in {}", man.display(), completions.display());
    Ok(())
}
