//! P8: what the filter costs a pod's traffic that has nothing to do with the metadata service
//! — which is nearly all of it — as the pod's users feel it.
//!
//! Two identical paths, pod → node → peer, each three namespaces joined by veths, the node
//! forwarding. On one, the pod's processes sit in a cgroup with every program attached and the
//! real agent runs in the node's namespace, so the node backstop sees every forwarded packet;
//! on the other, nothing. Measured side by side in interleaved rounds:
//! - P8: bulk TCP throughput, one stream;
//! - P8b: bulk TCP throughput, eight streams at once;
//! - P8c: small-packet rate (18-byte UDP datagrams, counted where they arrive);
//! - P8d: TCP connections a second (connect and close), eight clients at once;
//!
//! and, from the kernel's per-program statistics in a pass of their own (they slow every run
//! they time, so the side with programs would pay them alone), what each program costs a run.
//! P8e and P8f ([`super::packet`]) then run the agent's per-packet programs by themselves.
use std::{
    io::Read as _,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use imds_agent::kernel::{self, Hook};

use super::{
    packet::{self, PacketProgram},
    Effort, Figure, Measured,
};
use crate::{veth, AgentProcess, Cgroup, NetNs, PinDir, Probe, Server};

const TCP_PORT: u16 = 5001;
const UDP_PORT: u16 = 5002;
/// Accepts and closes at once: for the connection rate.
const CONNECT_PORT: u16 = 5003;
/// Clients at once for P8b and P8d.
const CLIENTS: usize = 8;

/// One pod → node → peer path.
struct Path {
    _sinks: [Server; 2],
    udp: UdpCounter,
    peer_addr: Ipv4Addr,
    cgroup: Cgroup,
    _agent: Option<AgentProcess>,
    _manifests: Option<tempfile::TempDir>,
    pins: Option<PinDir>,
    pod: NetNs,
    /// Kept until the path is dropped (namespaces go when their guards drop).
    _node: NetNs,
    _peer: NetNs,
}

impl Path {
    /// `n` tells the paths' subnets apart; `filtered` puts every program on it.
    fn new(n: u8, filtered: Option<&Cgroup>, plain: &Cgroup) -> Path {
        let (pod, node, peer) = (NetNs::new("p8-pod"), NetNs::new("p8-node"), NetNs::new("p8-peer"));
        let (pod_gw, pod_ip) = (Ipv4Addr::new(10, 235, n, 1), Ipv4Addr::new(10, 235, n, 2));
        let (peer_gw, peer_ip) = (Ipv4Addr::new(10, 236, n, 1), Ipv4Addr::new(10, 236, n, 2));
        veth(&node, pod_gw, &pod, pod_ip);
        veth(&node, peer_gw, &peer, peer_ip);
        node.sysctl("net.ipv4.ip_forward", "1");
        pod.ip(&["route", "add", "default", "via", &pod_gw.to_string()]);
        peer.ip(&["route", "add", "default", "via", &peer_gw.to_string()]);
        // Each stream read on its own thread, so that streams at once are served at once.
        let sink = Server::start(&peer, SocketAddrV4::new(peer_ip, TCP_PORT), |mut s| {
            thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while s.read(&mut buf).is_ok_and(|n| n > 0) {}
            });
        });
        let closer = Server::bind(&peer, SocketAddrV4::new(peer_ip, CONNECT_PORT));
        // std listens with a backlog of 128; eight clients in a loop overflow that, and a
        // dropped SYN costs a one-second retransmit. Listening again raises it.
        // SAFETY: `listen` on the listening socket we own; no memory is involved.
        let rc = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&closer), 4096) };
        assert_eq!(rc, 0, "raising the listen backlog");
        let closer = Server::serve(closer, drop);
        let udp = UdpCounter::start(&peer, SocketAddrV4::new(peer_ip, UDP_PORT));
        let (agent, manifests, pins, cgroup) = match filtered {
            Some(top) => {
                let pins = PinDir::new("p8");
                // The agent listens on the node's side of the pod link; nothing here asks it.
                let listen = SocketAddrV4::new(pod_gw, 8182);
                let manifests = tempfile::tempdir().expect("tempdir");
                let args: Vec<String> = [
                    "--attach-cgroup",
                    &top.path.display().to_string(),
                    "--bpffs",
                    &pins.path.display().to_string(),
                    "--listen",
                    &listen.to_string(),
                    "--manifests",
                    &manifests.path().display().to_string(),
                    "--node-backstop",
                    "auto",
                ]
                .map(str::to_owned)
                .to_vec();
                let agent = AgentProcess::start(&node, &args);
                (Some(agent), Some(manifests), Some(pins), top.child("pod"))
            }
            None => (None, None, None, plain.child("pod")),
        };
        Path {
            _sinks: [sink, closer],
            udp,
            peer_addr: peer_ip,
            cgroup,
            _agent: agent,
            _manifests: manifests,
            pins,
            pod,
            _node: node,
            _peer: peer,
        }
    }

    /// Bytes a second `streams` TCP streams at once get through in `millis`, together.
    fn throughput(&self, streams: usize, millis: u64) -> f64 {
        let to = SocketAddrV4::new(self.peer_addr, TCP_PORT);
        let running: Vec<_> = (0..streams).map(|_| Probe::new(&self.pod, &self.cgroup).stream(to, millis)).collect();
        running
            .into_iter()
            .map(|r| {
                let report = r.wait();
                report.rate.unwrap_or_else(|| panic!("stream failed: {report:?}"))
            })
            .sum()
    }

    /// Connections a second (connect and close) `clients` clients at once make, together:
    /// each `count` in a loop.
    fn connection_rate(&self, clients: usize, count: u32) -> f64 {
        let running: Vec<_> = (0..clients)
            .map(|_| Probe::new(&self.pod, &self.cgroup).connect_loop(self.peer_addr, CONNECT_PORT, count))
            .collect();
        running
            .into_iter()
            .map(|r| {
                let report = r.wait();
                1e9 / report.loop_ns.unwrap_or_else(|| panic!("connect loop failed: {report:?}"))
            })
            .sum()
    }

    /// Datagrams a second that reach the peer while the pod sends as fast as it can.
    fn packet_rate(&self, millis: u64) -> f64 {
        let before = self.udp.count();
        let report =
            Probe::new(&self.pod, &self.cgroup).udp_flood(SocketAddrV4::new(self.peer_addr, UDP_PORT), millis).wait();
        assert!(report.sent.is_some_and(|n| n > 0), "flood failed: {report:?}");
        // Let the last datagrams land.
        thread::sleep(Duration::from_millis(20));
        let arrived = super::count(usize::try_from(self.udp.count() - before).unwrap_or(usize::MAX));
        arrived / Duration::from_millis(millis).as_secs_f64()
    }
}

/// Counts datagrams arriving at an address, until dropped.
struct UdpCounter {
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl UdpCounter {
    fn start(ns: &NetNs, addr: SocketAddrV4) -> UdpCounter {
        let sock = ns.enter(move || UdpSocket::bind(addr).expect("bind udp"));
        sock.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        let (count, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (c, s) = (Arc::clone(&count), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if sock.recv(&mut buf).is_ok() {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        UdpCounter { count, stop, thread: Some(thread) }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for UdpCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Run count and total run time (ns) of a loaded program.
fn stats_of(id: u32) -> (u64, u64) {
    let info = aya::programs::loaded_programs().filter_map(Result::ok).find(|p| p.id() == id).expect("loaded");
    (info.run_count(), u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX))
}

/// P8, P8b, P8c and P8d.
///
/// # Panics
/// When a path cannot be built or a measurement fails.
pub fn run(effort: Effort) -> Vec<Figure> {
    let top = Cgroup::new_top("bench-p8");
    let (filtered, plain) = (top.child("filtered"), top.child("plain"));
    let with = Path::new(1, Some(&filtered), &plain);
    let without = Path::new(2, None, &plain);
    let millis = if effort.rounds > 2 { 2_000 } else { 300 };
    let backstop = kernel::netfilter::pinned(&with.pins.as_ref().expect("pins").path)
        .ok()
        .and_then(|links| links.first().map(|l| l.prog_id));
    let attached = kernel::attached_programs(&filtered.path).unwrap_or_default();
    let on = |hook: Hook| attached.iter().find(|(h, _)| *h == hook).and_then(|(_, p)| p.first().map(|p| p.id));
    let programs: Vec<(&str, u32)> = [
        ("node backstop (netfilter; a forwarded packet meets it at PRE_ROUTING and FORWARD)", backstop),
        ("cgroup_skb egress", on(Hook::Egress)),
        ("sock_ops", on(Hook::SockOps)),
        ("connect4", on(Hook::Connect4)),
    ]
    .into_iter()
    .filter_map(|(name, id)| id.map(|id| (name, id)))
    .collect();
    // [one stream, eight streams, packets, connections] × [with, without]. Statistics stay off
    // here: they add two clock reads to every run, which only the side with programs pays.
    let mut rounds: [[Vec<f64>; 2]; 4] = Default::default();
    for round in 0..effort.rounds {
        for step in 0..2 {
            let which = if round % 2 == 0 { step } else { 1 - step };
            let path = if which == 0 { &with } else { &without };
            rounds[0][which].push(path.throughput(1, millis) * 8.0 / 1e9);
            rounds[1][which].push(path.throughput(CLIENTS, millis) * 8.0 / 1e9);
            rounds[2][which].push(path.packet_rate(millis) / 1e3);
            rounds[3][which].push(path.connection_rate(CLIENTS, effort.connects) / 1e3);
        }
    }
    // What each program costs a run, from one pass over the path with programs, not counted.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
    let before: Vec<(u64, u64)> = programs.iter().map(|(_, id)| stats_of(*id)).collect();
    if stats.is_some() {
        with.throughput(1, millis);
        with.packet_rate(millis);
        with.connection_rate(CLIENTS, effort.connects);
    }
    let after: Vec<(u64, u64)> = programs.iter().map(|(_, id)| stats_of(*id)).collect();
    drop(stats);
    let per_run: Vec<String> = programs
        .iter()
        .zip(before.iter().zip(&after))
        .map(|((name, _), ((n0, t0), (n1, t1)))| {
            let runs = (n1 - n0).max(1);
            let ns = |n: u64| super::count(usize::try_from(n).unwrap_or(usize::MAX));
            format!("{name} {:.0} ns a run over {runs} runs", ns(t1 - t0) / ns(runs))
        })
        .collect();
    let note = if per_run.is_empty() {
        "programs: no statistics (BPF_ENABLE_STATS refused)".to_owned()
    } else {
        format!("programs, in a separate pass with statistics on: {}", per_run.join(", "))
    };
    let rows: [(&'static str, &str, &'static str); 4] = [
        ("P8", "a pod's traffic through the node, every program attached: bulk TCP throughput, one stream", "Gbit/s"),
        ("P8b", "the same, eight streams at once", "Gbit/s"),
        ("P8c", "the same, small packets (18-byte UDP) arriving", "thousand/s"),
        ("P8d", "the same, TCP connections (connect and close), eight clients at once", "thousand/s"),
    ];
    let costs =
        packet::costs(&[(PacketProgram::Egress, on(Hook::Egress)), (PacketProgram::NodeNetfilter, backstop)], effort);
    drop((with, without));
    drop((filtered, plain));
    let mut figures: Vec<Figure> = rows
        .into_iter()
        .zip(rounds)
        .map(|((id, what, unit), [with_rounds, without_rounds])| {
            let baseline = ("same path, no programs".to_owned(), Measured::of(without_rounds));
            let figure = Figure::new(id, what, unit, "≥ 0.99×").measured(Measured::of(with_rounds), Some(baseline));
            let met = figure.ratio.is_some_and(|r| r >= 0.99);
            let figure = figure.judged(met);
            if id == "P8" {
                figure.noted(note.clone())
            } else {
                figure
            }
        })
        .collect();
    figures.extend(costs);
    figures
}
