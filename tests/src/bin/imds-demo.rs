//! `cargo xtask demo`: the kernel path in a sandbox, in under a minute.
//!
//! Sets up a throwaway network namespace (the metadata address lives on its loopback, with a
//! stand-in listener behind it) and a cgroup tree with one cgroup per verdict, installs the
//! real programs, sends a few clients at the metadata address, prints what each got, and
//! cleans everything up — also on a panic, through the same guards the tests use.
use std::{net::SocketAddr, time::Duration};

use imds_common::Counter;
use imds_tests::{describe, Probe, ProbeReport, Sandbox, TcpTap, IMDS_IP};

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the demo loads eBPF programs and creates namespaces and cgroups: run it as root");
        std::process::exit(1);
    }
    let sb = Sandbox::new("demo");
    println!("imds-filter demo: the kernel path\n");
    println!(
        "  network namespace  {}  (169.254.169.254 on its loopback, a stand-in metadata listener behind it)",
        sb.ns.name
    );
    println!("  filtered cgroup    {}", sb.redirect.path.parent().unwrap_or(&sb.redirect.path).display());
    println!("    app/             no entry: default verdict REDIRECT");
    println!("    trusted/         PASS    (trusted/ctr/ inherits it)");
    println!("    blocked/         DENY");
    println!("  agent listener     {}\n", sb.agent.server.addr);

    let tap = TcpTap::open(&sb.ns);
    println!("  {:<13} {:<28} result", "client", "connects to");
    let row = |who: &str, to: &str, what: String| println!("  {who:<13} {to:<28} {what}");

    let probe = Probe::new(&sb.ns, &sb.redirect).as_user(1000, 1000).connect(IMDS_IP, 80, false);
    let report = probe.wait();
    row("app", "169.254.169.254:80", outcome(&sb, &report));
    let report = Probe::new(&sb.ns, &sb.redirect).connect(IMDS_IP, 80, true).wait();
    row("app", "[::ffff:169.254.169.254]:80", outcome(&sb, &report));
    let report = Probe::new(&sb.ns, &sb.pass_ctr).connect(IMDS_IP, 80, false).wait();
    row("trusted/ctr", "169.254.169.254:80", outcome(&sb, &report));
    let report = Probe::new(&sb.ns, &sb.deny).connect(IMDS_IP, 80, false).wait();
    row("blocked", "169.254.169.254:80", outcome(&sb, &report));
    let _sent = Probe::new(&sb.ns, &sb.redirect).raw_syn(IMDS_IP, 80, 41_000).wait();
    let raw = if tap.saw_syn(IMDS_IP, 80, 41_000, Duration::from_millis(500)) {
        "ARRIVED (the backstop failed!)".to_owned()
    } else {
        "dropped in the kernel, never arrived".to_owned()
    };
    row("app", "raw SYN to 169.254.169.254", raw);

    let counters: Vec<String> = Counter::ALL.iter().map(|c| format!("{}={}", c.name(), sb.counter(*c))).collect();
    println!("\n  kernel counters: {}", counters.join(" "));
    drop(sb);
    println!("  cleaned up: namespace, cgroups and pinned programs removed");
}

fn outcome(sb: &Sandbox, report: &ProbeReport) -> String {
    match (report.outcome.as_str(), report.reply.as_deref()) {
        ("connected", Some("standin")) => "reached the metadata service (stand-in)".into(),
        ("connected", Some(reply)) if reply.starts_with("agent pid=") => {
            let local: Option<SocketAddr> = report.local.as_deref().and_then(|l| l.parse().ok());
            let known = local.and_then(|l| sb.agent.origin_for(&l.to_string()));
            match known {
                Some(imds_agent::kernel::OriginLookup::Found(o)) => {
                    let d = describe(&o);
                    format!("redirected to the agent; kernel says: {}", d.trim_start_matches("agent "))
                }
                _ => format!("redirected to the agent ({reply})"),
            }
        }
        ("connected", other) => format!("connected, unexpected reply {other:?}"),
        ("error", _) => format!("connect() failed: {}", report.error.as_deref().unwrap_or("?")),
        (other, _) => other.to_owned(),
    }
}
