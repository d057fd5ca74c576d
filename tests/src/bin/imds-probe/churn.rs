//! Pod cgroups coming and going fast, with token requests from some of them.
use std::{
    collections::VecDeque,
    fs,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use imds_tests::{probe::Via, ChurnReport};

/// Keeps at most this many mismatches in the report.
const KEEP: usize = 10;

pub(crate) struct Churn<'a> {
    pub(crate) addr: SocketAddrV4,
    pub(crate) home: &'a Path,
    pub(crate) parent: &'a Path,
    pub(crate) plan: &'a [(String, String)],
    pub(crate) live: Duration,
    pub(crate) ask_every: usize,
}

/// `UID EXPECT` lines.
pub(crate) fn read_plan(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let plan: Vec<(String, String)> = fs::read_to_string(path)?
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(u, e)| (u.to_owned(), e.to_owned())))
        .collect();
    anyhow::ensure!(!plan.is_empty(), "{}: an empty plan", path.display());
    Ok(plan)
}

impl Churn<'_> {
    pub(crate) fn run(&self, rate: f64, seconds: f64) -> ChurnReport {
        let mut report = ChurnReport::default();
        let total = (rate * seconds) as usize;
        let (started, step) = (Instant::now(), Duration::from_secs_f64(1.0 / rate));
        let mut live: VecDeque<(Instant, PathBuf)> = VecDeque::new();
        for i in 0..total {
            while live.front().is_some_and(|(born, _)| born.elapsed() >= self.live) {
                let (_, pod) = live.pop_front().expect("checked above");
                remove(&pod, &mut report);
            }
            let due = started + step * u32::try_from(i).unwrap_or(u32::MAX);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let (uid, expect) = &self.plan[i % self.plan.len()];
            let pod = self.parent.join(format!("pod{uid}"));
            let ctr = pod.join("0123456789abcdef");
            if let Err(e) = fs::create_dir(&pod).and_then(|()| fs::create_dir(&ctr)) {
                report.mkdir_errors += 1;
                keep(&mut report.errors, format!("mkdir {}: {e}", pod.display()));
                continue;
            }
            report.created += 1;
            if i % self.ask_every.max(1) == 0 && expect != "-" {
                self.ask(&ctr, uid, expect, &mut report);
            }
            live.push_back((Instant::now(), pod));
        }
        for (_, pod) in live {
            remove(&pod, &mut report);
        }
        report.seconds = started.elapsed().as_secs_f64();
        report
    }

    /// One token request from `ctr`, checked against `expect`.
    fn ask(&self, ctr: &Path, uid: &str, expect: &str, report: &mut ChurnReport) {
        const REQUEST: &[u8] = b"GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n";
        let join = |cg: &Path| fs::write(cg.join("cgroup.procs"), std::process::id().to_string());
        let answer = join(ctr).and_then(|()| {
            let exchange = crate::http::Exchange {
                addr: self.addr,
                via: Via::Connect,
                bind: None,
                v6: false,
                move_to: None,
                delay_ms: 0,
            };
            exchange.run(REQUEST)
        });
        if let Err(e) = join(self.home) {
            keep(&mut report.errors, format!("back to {}: {e}", self.home.display()));
        }
        report.asked += 1;
        let reply = match answer {
            Ok((_, reply)) => reply,
            Err(e) => {
                report.mismatches += 1;
                return keep(&mut report.errors, format!("pod {uid}: {e}"));
            }
        };
        let status = reply.split(' ').nth(1).unwrap_or("none");
        let ok = match expect.split_once(':') {
            Some((want, text)) => status == want && reply.contains(text),
            None => status == expect,
        };
        *report.answers.entry(format!("{expect} -> {status}")).or_default() += 1;
        if !ok {
            report.mismatches += 1;
            keep(&mut report.errors, format!("pod {uid} wanted {expect}, got: {}", reply.lines().next().unwrap_or("")));
        }
    }
}

fn remove(pod: &Path, report: &mut ChurnReport) {
    match fs::remove_dir(pod.join("0123456789abcdef")).and_then(|()| fs::remove_dir(pod)) {
        Ok(()) => report.removed += 1,
        Err(e) => keep(&mut report.errors, format!("rmdir {}: {e}", pod.display())),
    }
}

fn keep(errors: &mut Vec<String>, e: String) {
    if errors.len() < KEEP {
        errors.push(e);
    }
}
