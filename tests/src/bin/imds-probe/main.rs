//! Test client: joins a network namespace and a cgroup, optionally drops to a uid/gid, then
//! does exactly one network operation and prints the outcome as one JSON line.
//!
//! It is a separate process so the kernel sees a real, distinct caller (its own pid, cgroup,
//! uid and gid) — the test process itself never moves into a filtered cgroup. Its command
//! line is `imds_tests::probe::ops`, which the tests use to build it.
mod burst;
mod churn;
mod hold;
mod http;
mod sockets;

use std::{
    fs,
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use clap::Parser as _;
use imds_tests::{
    probe::{Op, ProbeArgs},
    ProbeReport,
};

use crate::{
    hold::{hold, unread},
    sockets::{abort_on_close, bind, connect, raw_syn, send_frame, stream, udp_flood},
};

fn main() {
    let args = ProbeArgs::parse();
    let report = run(&args).unwrap_or_else(|e| ProbeReport {
        pid: std::process::id(),
        outcome: "setup-failed".into(),
        error: Some(format!("{e:#}")),
        ..ProbeReport::default()
    });
    println!("{}", serde_json::to_string(&report).expect("report serialises"));
}

fn run(args: &ProbeArgs) -> anyhow::Result<ProbeReport> {
    if let Some(ns) = &args.netns {
        let f = fs::File::open(ns)?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
    }
    if let Some(cg) = &args.cgroup {
        fs::write(cg.join("cgroup.procs"), std::process::id().to_string())?;
    }
    if let Some(gid) = args.gid {
        nix::unistd::setgid(gid.into())?;
    }
    if let Some(uid) = args.uid {
        nix::unistd::setuid(uid.into())?;
    }
    let mut report = ProbeReport { pid: std::process::id(), ..ProbeReport::default() };
    match args.op {
        Op::Connect { addr, port, v6, then } => connect(&mut report, addr, port, v6, then)?,
        Op::Udp { addr, port } => {
            let sock = UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
            match sock.send_to(b"probe\n", SocketAddr::new(addr, port)) {
                Ok(_) => report.outcome = "sent".into(),
                Err(e) => set_error(&mut report, &e),
            }
        }
        Op::Bind { addr, reuseport, udp } => bind(&mut report, addr, reuseport, udp)?,
        Op::RawSyn { addr, port, sport } => raw_syn(&mut report, addr, port, sport)?,
        Op::Frame { ref iface, ref gateway_mac, src, dst, dport, sport, carrying, wait_ms, vlan_tags } => {
            let frame = imds_tests::frame::Frame {
                iface: iface.clone(),
                gateway_mac: imds_tests::frame::parse_mac(gateway_mac)
                    .ok_or_else(|| anyhow::anyhow!("{gateway_mac:?} is not a MAC address"))?,
                src,
                dst,
                sport,
                dport,
                carrying,
                vlan_tags,
            };
            send_frame(&mut report, &frame, Duration::from_millis(wait_ms));
        }
        Op::Stream { addr, port, millis } => stream(&mut report, SocketAddrV4::new(addr, port), millis)?,
        Op::UdpFlood { addr, port, millis, size } => {
            udp_flood(&mut report, SocketAddrV4::new(addr, port), millis, size)?;
        }
        Op::ConnectLoop { addr, port, count } => {
            let dst = SocketAddr::V4(SocketAddrV4::new(addr, port));
            let started = std::time::Instant::now();
            for _ in 0..count {
                let stream = TcpStream::connect(dst)?;
                // Abortive close: no TIME_WAIT, so a long loop cannot run out of local ports.
                abort_on_close(&stream)?;
                drop(stream);
            }
            report.loop_ns = Some(started.elapsed().as_secs_f64() * 1e9 / f64::from(count.max(1)));
            report.outcome = "looped".into();
        }
        Op::Burst { addr, count, concurrency, ref queries, rate, keep_alive } => {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            let shape = burst::Shape { count, concurrency, rate, keep_alive };
            report.burst = Some(runtime.block_on(burst::run(addr, shape, queries)));
            report.outcome = "burst".into();
        }
        Op::AwaitAnswer { addr, ref query, ref want, timeout_ms } => {
            await_answer(&mut report, addr, query, want, Duration::from_millis(timeout_ms))?;
        }
        Op::Http { addr, ref request_b64, via, bind, v6, ref move_to, delay_ms } => {
            use base64::Engine as _;
            let request = base64::engine::general_purpose::STANDARD.decode(request_b64)?;
            let exchange = http::Exchange { addr, via, bind, v6, move_to: move_to.clone(), delay_ms };
            match exchange.run(&request) {
                Ok((local, reply)) => {
                    report.outcome = "answered".into();
                    report.local = Some(local.to_string());
                    report.reply = Some(reply);
                }
                Err(e) => set_error(&mut report, &e),
            }
        }
        Op::Hold { addr, count, seconds, slowloris } => {
            report.hold = Some(hold(addr, count, Duration::from_secs(seconds), slowloris));
            report.outcome = "held".into();
        }
        Op::Unread { addr, seconds } => {
            report.hold = Some(unread(addr, Duration::from_secs(seconds))?);
            report.outcome = "held".into();
        }
        Op::Churn { addr, ref parent, ref plan, rate, seconds, live_ms, ask_every } => {
            let home = args.cgroup.as_deref().ok_or_else(|| anyhow::anyhow!("churn needs --cgroup to come back to"))?;
            let plan = churn::read_plan(plan)?;
            let churn =
                churn::Churn { addr, home, parent, plan: &plan, live: Duration::from_millis(live_ms), ask_every };
            report.churn = Some(churn.run(rate, seconds));
            report.outcome = "churned".into();
        }
        Op::Exec { ref command } => {
            let error =
                std::os::unix::process::CommandExt::exec(std::process::Command::new(&command[0]).args(&command[1..]));
            anyhow::bail!("exec {}: {error}", command[0]);
        }
    }
    Ok(report)
}

/// Token requests until an answer's body contains `want`; records when (Unix time, µs).
fn await_answer(
    report: &mut ProbeReport,
    addr: SocketAddrV4,
    query: &str,
    want: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let path = format!("/metadata/identity/oauth2/token?{query}");
    let deadline = std::time::Instant::now() + timeout;
    report.outcome = "timeout".into();
    while std::time::Instant::now() < deadline {
        let answer = imds_tests::fake_imds::http_get(addr.into(), &path, &[("Metadata", "true")]);
        if answer.is_ok_and(|(_, body)| body.contains(want)) {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
            report.seen_at_us = Some(now.as_micros() as u64);
            report.outcome = "seen".into();
            break;
        }
    }
    Ok(())
}

fn set_error(report: &mut ProbeReport, e: &std::io::Error) {
    report.outcome = "error".into();
    report.errno = e.raw_os_error();
    report.error = Some(e.to_string());
}
