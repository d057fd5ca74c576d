//! `cargo xtask bench`: the project's performance claims, measured side by side in one run.
//!
//! These machines are noisy, so every figure is the median over interleaved rounds (each
//! round runs the measured configuration and its baseline back to back, in alternating order),
//! with the spread (10th–90th percentile of the rounds) and the ratio to the baseline. The
//! JSON report carries the machine and kernel it ran on.
pub mod cold;
pub mod forward;
pub mod kernel;
pub mod memory;
pub mod packet;
pub mod picture;
pub mod policy;
pub mod tokens;

use std::{fmt::Write as _, time::SystemTime};

use serde::Serialize;

/// How long to measure.
#[derive(Clone, Copy, Debug)]
pub struct Effort {
    pub rounds: usize,
    /// Connects per round and configuration.
    pub connects: u32,
}

impl Effort {
    pub const QUICK: Effort = Effort { rounds: 2, connects: 300 };
    pub const FULL: Effort = Effort { rounds: 7, connects: 10_000 };
}

/// A value over rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Measured {
    pub median: f64,
    /// 10th and 90th percentile of the rounds.
    pub spread: [f64; 2],
    pub rounds: Vec<f64>,
}

impl Measured {
    /// # Panics
    /// On no rounds (a harness bug).
    pub fn of(mut rounds: Vec<f64>) -> Measured {
        assert!(!rounds.is_empty(), "a figure needs at least one round");
        let at = |p| percentile(&rounds, p);
        let (median, spread) = (at(50), [at(10), at(90)]);
        rounds.shrink_to_fit();
        Measured { median, spread, rounds }
    }
}

/// A count as a float, for rates and means.
#[expect(clippy::cast_precision_loss, reason = "benchmark counts stay far below 2^52")]
pub fn count(n: usize) -> f64 {
    n as f64
}

/// The `percent`th percentile of `values` (nearest rank, rounded).
///
/// # Panics
/// On no values.
pub fn percentile(values: &[f64], percent: usize) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() - 1) * percent + 50) / 100]
}

/// Runs each configuration once per round, alternating the order; per-configuration rounds.
pub fn interleaved<const N: usize>(rounds: usize, mut run: impl FnMut(usize) -> f64) -> [Vec<f64>; N] {
    let mut out: [Vec<f64>; N] = std::array::from_fn(|_| Vec::with_capacity(rounds));
    for round in 0..rounds {
        for step in 0..N {
            let which = if round % 2 == 0 { step } else { N - 1 - step };
            out[which].push(run(which));
        }
    }
    out
}

/// One row of the table.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub id: &'static str,
    pub what: String,
    pub unit: &'static str,
    pub value: Option<Measured>,
    pub baseline_what: Option<String>,
    pub baseline: Option<Measured>,
    /// value / baseline, medians.
    pub ratio: Option<f64>,
    pub target: &'static str,
    /// Whether the target holds (`None`: not measured, or nothing to compare).
    pub met: Option<bool>,
    /// Why a figure is missing, or what else was seen.
    pub note: Option<String>,
}

impl Figure {
    pub fn new(id: &'static str, what: impl Into<String>, unit: &'static str, target: &'static str) -> Figure {
        Figure {
            id,
            what: what.into(),
            unit,
            value: None,
            baseline_what: None,
            baseline: None,
            ratio: None,
            target,
            met: None,
            note: None,
        }
    }

    /// Sets value and baseline; the ratio follows.
    #[must_use]
    pub fn measured(mut self, value: Measured, baseline: Option<(String, Measured)>) -> Figure {
        if let Some((what, b)) = baseline {
            self.ratio = Some(value.median / b.median);
            self.baseline_what = Some(what);
            self.baseline = Some(b);
        }
        self.value = Some(value);
        self
    }

    #[must_use]
    pub fn judged(mut self, met: bool) -> Figure {
        self.met = Some(met);
        self
    }

    #[must_use]
    pub fn noted(mut self, note: impl Into<String>) -> Figure {
        self.note = Some(note.into());
        self
    }
}

/// The machine a run was on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
}

impl Machine {
    pub fn here() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_default();
        let kib: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Machine {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            memory_gib: (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        }
    }
}

/// The whole run, as written to JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub time: String,
    pub quick: bool,
    pub machine: Machine,
    pub figures: Vec<Figure>,
}

impl Report {
    pub fn new(quick: bool, figures: Vec<Figure>) -> Report {
        Report {
            time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            quick,
            machine: Machine::here(),
            figures,
        }
    }

    /// The table, as the README shows it.
    pub fn table(&self) -> String {
        let fmt = |m: &Option<Measured>, unit: &str| {
            m.as_ref().map_or_else(
                || "—".to_owned(),
                |m| format!("{} {unit} ({}–{})", short(m.median), short(m.spread[0]), short(m.spread[1])),
            )
        };
        let mut out = String::from(
            "| id | what | median (p10–p90) | baseline | baseline median (p10–p90) | ratio | target | met |\n|---|---|---|---|---|---|---|---|\n",
        );
        for f in &self.figures {
            let met = match f.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                f.id,
                f.what,
                fmt(&f.value, f.unit),
                f.baseline_what.as_deref().unwrap_or("—"),
                fmt(&f.baseline, f.unit),
                f.ratio.map_or_else(|| "—".to_owned(), |r| format!("{r:.2}×")),
                f.target,
                met,
            );
        }
        for f in self.figures.iter().filter(|f| f.note.is_some()) {
            let _ = write!(out, "\n- {}: {}", f.id, f.note.as_deref().unwrap_or_default());
        }
        let _ = writeln!(
            out,
            "\n\nMachine: {} ({} CPUs, {} GiB), Linux {}{}.",
            self.machine.cpu,
            self.machine.cpus,
            self.machine.memory_gib,
            self.machine.kernel,
            if self.quick { "; quick run (figures not meaningful)" } else { "" }
        );
        out
    }
}

/// Three significant digits.
fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_spreads_and_ratios() {
        let m = Measured::of(vec![5.0, 1.0, 3.0, 4.0, 2.0]);
        assert_eq!((m.median, m.spread), (3.0, [1.0, 5.0]));
        let f = Figure::new("P1", "x", "µs", "≤ 1.05×")
            .measured(Measured::of(vec![2.0]), Some(("b".into(), Measured::of(vec![4.0]))));
        assert_eq!(f.ratio, Some(0.5));
        let table = Report::new(true, vec![f.judged(true)]).table();
        assert!(
            table.contains("| P1 | x | 2.00 µs (2.00–2.00) | b | 4.00 µs (4.00–4.00) | 0.50× | ≤ 1.05× | yes |"),
            "{table}"
        );
    }
}
