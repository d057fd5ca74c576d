//! The kernel path, end to end, in the real kernel: programs loaded from the real object,
//! attached to a cgroup this test made, clients as separate processes in their own cgroups,
//! everything inside network namespaces this test made (with the metadata address on their
//! loopback before anything connects). Needs root; run with `cargo xtask test`.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use imds_agent::kernel::{attached_programs, Attachment, Filter, FilterOptions, Hook, OriginLookup, IMDS_ENDPOINT};
use imds_common::{maps, Counter, ProtectedSummary, Verdict};
use imds_tests::{
    describe, filter_options, udp_received, udp_sink, v4_addr, veth, AgentListener, AgentProcess, Cgroup, NetNs,
    PinDir, Probe, Sandbox, Server, TcpTap, IMDS_IP,
};

/// The origin the agent must report for a probe in `cgroup` with the given identity.
fn expected_reply(pid: u32, cgroup: &Cgroup, uid: u32, gid: u32, v6: bool) -> String {
    describe(&imds_agent::kernel::CallerOrigin {
        cgroup_id: cgroup.id(),
        pid,
        tid: pid,
        uid,
        gid,
        original_dst: IMDS_ENDPOINT,
        ipv6_socket: v6,
        age: Duration::ZERO,
    })
}

// 1.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn redirect_cgroup_lands_on_the_agent_with_its_origin() {
    let sb = Sandbox::new("redir");
    let probe = Probe::new(&sb.ns, &sb.redirect).as_user(4242, 4343).connect(IMDS_IP, 80, false);
    let pid = probe.pid();
    let report = probe.wait();
    assert_eq!(report.outcome, "connected", "{report:?}");
    assert_eq!(report.reply.as_deref(), Some(expected_reply(pid, &sb.redirect, 4242, 4343, false).as_str()));
    // getpeername() tells the caller what it asked for, not where it was sent.
    assert_eq!(report.peer.as_deref(), Some("169.254.169.254:80"), "{report:?}");
    match sb.agent.origin_for(report.local.as_deref().unwrap()) {
        Some(OriginLookup::Found(o)) => {
            assert_eq!((o.pid, o.tid, o.uid, o.gid, o.cgroup_id), (pid, pid, 4242, 4343, sb.redirect.id()));
            assert_eq!(o.original_dst, IMDS_ENDPOINT);
            assert!(o.age < Duration::from_secs(5));
        }
        other => panic!("agent found {other:?}"),
    }
    assert_eq!(sb.standin.accepted(), 0);
    assert_eq!(sb.counter(Counter::ConnectRedirect), 1);
    assert_eq!(sb.counter(Counter::OriginRecorded), 1);
    // A connection made to the agent directly is not dressed up as the metadata address.
    let agent = sb.agent.server.addr;
    let report = Probe::new(&sb.ns, &sb.redirect).connect(*agent.ip(), agent.port(), false).wait();
    assert_eq!(report.peer, Some(agent.to_string()), "{report:?}");
    // Nor is one made directly by a socket that was redirected before and then disconnected
    // (connect() to AF_UNSPEC): the socket's records went with its first connection.
    let python = imds_tests::node::sdk_python();
    let (_, out) = Probe::new(&sb.ns, &sb.redirect).exec(&[
        &python,
        "-c",
        REUSED_SOCKET,
        &agent.ip().to_string(),
        &agent.port().to_string(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("169.254.169.254 80, then {} {}", agent.ip(), agent.port())
    );
}

/// Connects to the metadata address, disconnects, connects the same socket to the agent
/// (`argv[1]`, `argv[2]`) directly, and prints the peer each time.
const REUSED_SOCKET: &str = "
import ctypes, socket, sys
s = socket.create_connection(('169.254.169.254', 80), timeout=5)
first = '%s %d' % s.getpeername()
unspec = (ctypes.c_ubyte * 16)()
libc = ctypes.CDLL(None, use_errno=True)
if libc.connect(s.fileno(), unspec, 16) != 0:
    sys.exit('disconnect: errno %d' % ctypes.get_errno())
s.connect((sys.argv[1], int(sys.argv[2])))
print('%s, then %s %d' % ((first,) + s.getpeername()[:2]))
";

// 2.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn pass_cgroup_and_its_children_reach_the_real_endpoint() {
    let sb = Sandbox::new("pass");
    for cg in [&sb.pass, &sb.pass_ctr] {
        let report = Probe::new(&sb.ns, cg).connect(IMDS_IP, 80, false).wait();
        assert_eq!(report.outcome, "connected", "{report:?}");
        assert_eq!(report.reply.as_deref(), Some("standin"));
    }
    assert_eq!(sb.standin.accepted(), 2);
    assert_eq!(sb.agent.server.accepted(), 0);
    assert_eq!(sb.counter(Counter::ConnectPass), 2);
}

// 3.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn deny_cgroup_gets_eperm_and_other_ports_of_a_protected_address_are_refused() {
    let sb = Sandbox::new("deny");
    let report = Probe::new(&sb.ns, &sb.deny).connect(IMDS_IP, 80, false).wait();
    assert_eq!((report.outcome.as_str(), report.errno), ("error", Some(libc::EPERM)), "{report:?}");
    // Nothing but the redirectable port may be reached on a protected address.
    let report = Probe::new(&sb.ns, &sb.redirect).connect(IMDS_IP, 81, false).wait();
    assert_eq!((report.outcome.as_str(), report.errno), ("error", Some(libc::EPERM)), "{report:?}");
    assert_eq!(sb.standin.accepted() + sb.agent.server.accepted(), 0);
    assert_eq!(sb.counter(Counter::ConnectDeny), 2);
}

// 4.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn v4_mapped_ipv6_connects_get_the_same_three_outcomes() {
    let sb = Sandbox::new("v6");
    let probe = Probe::new(&sb.ns, &sb.redirect).connect(IMDS_IP, 80, true);
    let pid = probe.pid();
    let report = probe.wait();
    assert_eq!(report.reply.as_deref(), Some(expected_reply(pid, &sb.redirect, 0, 0, true).as_str()), "{report:?}");
    assert_eq!(report.peer.as_deref(), Some("[::ffff:169.254.169.254]:80"), "{report:?}");

    let report = Probe::new(&sb.ns, &sb.pass).connect(IMDS_IP, 80, true).wait();
    assert_eq!(report.reply.as_deref(), Some("standin"), "{report:?}");

    let report = Probe::new(&sb.ns, &sb.deny).connect(IMDS_IP, 80, true).wait();
    assert_eq!((report.outcome.as_str(), report.errno), ("error", Some(libc::EPERM)), "{report:?}");
    assert_eq!(sb.standin.accepted(), 1);
    assert_eq!(sb.agent.server.accepted(), 1);

    // The NAT64 spelling is redirected too, and getpeername() gives it back with its prefix.
    let python = imds_tests::node::sdk_python();
    let asks = "import socket; s = socket.create_connection(('64:ff9b::a9fe:a9fe', 80), timeout=5); \
                print('%s %d' % s.getpeername()[:2])";
    let (_, out) = Probe::new(&sb.ns, &sb.redirect).exec(&[&python, "-c", asks]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "64:ff9b::a9fe:a9fe 80");
    assert_eq!(sb.agent.server.accepted(), 2, "the NAT64 connection went to the agent");
}

// 5.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn raw_sockets_and_unconnected_udp_never_reach_the_endpoint() {
    let sb = Sandbox::new("raw");
    let tap = TcpTap::open(&sb.ns);
    let sink = udp_sink(&sb.ns, IMDS_ENDPOINT);
    for (i, cg) in [&sb.redirect, &sb.deny].into_iter().enumerate() {
        let sport = 40_000 + i as u16;
        let report = Probe::new(&sb.ns, cg).raw_syn(IMDS_IP, 80, sport).wait();
        assert_ne!(report.outcome, "setup-failed");
        assert!(
            !tap.saw_syn(IMDS_IP, 80, sport, Duration::from_millis(500)),
            "raw SYN from {} got through",
            cg.path.display()
        );
        let report = Probe::new(&sb.ns, cg).udp(IMDS_IP, 80).wait();
        assert_ne!(report.outcome, "setup-failed");
        assert!(!udp_received(&sink), "UDP from {} got through", cg.path.display());
    }
    assert!(sb.counter(Counter::EgressDrop) >= 4);
    // Control: the same sends from a PASS cgroup do arrive, so the checks above can fail.
    let report = Probe::new(&sb.ns, &sb.pass).raw_syn(IMDS_IP, 80, 40_100).wait();
    assert_eq!(report.outcome, "sent", "{report:?}");
    assert!(tap.saw_syn(IMDS_IP, 80, 40_100, Duration::from_secs(2)));
    let report = Probe::new(&sb.ns, &sb.pass).udp(IMDS_IP, 80).wait();
    assert_eq!(report.outcome, "sent", "{report:?}");
    assert!(udp_received(&sink));
}

// 6.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn pod_namespace_is_redirected_across_a_veth_to_the_node_agent() {
    let node = NetNs::new("node");
    node.host_metadata_address();
    let pod = NetNs::new("pod");
    let n = imds_tests::next_index() % 250;
    let (node_ip, pod_ip) = (Ipv4Addr::new(10, 231, n as u8, 1), Ipv4Addr::new(10, 231, n as u8, 2));
    veth(&node, node_ip, &pod, pod_ip);
    // A failed redirect would follow this route to the node namespace, and stay there.
    pod.ip(&["route", "add", &format!("{IMDS_IP}/32"), "via", &node_ip.to_string()]);

    let root = Cgroup::new_top("podns");
    let (pass, redirect) = (root.child("pass"), root.child("redirect"));
    let pins = PinDir::new("podns");
    let listener = Server::bind(&node, SocketAddrV4::new(node_ip, 0));
    let agent_addr = v4_addr(&listener);
    let mut filter = Filter::install(&filter_options(&root, &pins, agent_addr)).unwrap();
    filter.set_verdict(pass.id(), Verdict::Pass).unwrap();
    let agent = AgentListener::serve(listener, filter.origins());
    let standin = Server::banner(&node, IMDS_ENDPOINT, "standin");

    let probe = Probe::new(&pod, &redirect).connect(IMDS_IP, 80, false);
    let pid = probe.pid();
    let report = probe.wait();
    assert_eq!(report.reply.as_deref(), Some(expected_reply(pid, &redirect, 0, 0, false).as_str()), "{report:?}");
    let local: std::net::SocketAddr = report.local.as_deref().unwrap().parse().unwrap();
    assert_eq!(local.ip(), std::net::IpAddr::V4(pod_ip), "the agent saw the pod's own address");
    assert_eq!(report.peer.as_deref(), Some("169.254.169.254:80"), "{report:?}");
    // Control: the route to the stand-in works from the pod namespace.
    let report = Probe::new(&pod, &pass).connect(IMDS_IP, 80, false).wait();
    assert_eq!(report.reply.as_deref(), Some("standin"), "{report:?}");
    assert_eq!(standin.accepted(), 1);
    drop((agent, standin, filter, pins, pass, redirect, root));
}

// 7.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn other_destinations_and_processes_outside_the_hierarchy_are_untouched() {
    let sb = Sandbox::new("other");
    let other = Server::banner(&sb.ns, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), "other");
    for cg in [&sb.redirect, &sb.deny, &sb.pass] {
        for v6 in [false, true] {
            let report = Probe::new(&sb.ns, cg).connect(*other.addr.ip(), other.addr.port(), v6).wait();
            assert_eq!(report.reply.as_deref(), Some("other"), "{} v6={v6}: {report:?}", cg.path.display());
        }
    }
    // A node process (outside the attached cgroup) keeps its access to the endpoint.
    let reply = sb.ns.enter(|| {
        let mut s = std::net::TcpStream::connect(IMDS_ENDPOINT).expect("node process connects");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut s), &mut line).unwrap();
        line
    });
    assert_eq!(reply.trim(), "standin");
    assert_eq!(sb.agent.server.accepted(), 0);
    for c in [Counter::ConnectRedirect, Counter::ConnectDeny, Counter::ConnectPass, Counter::OriginRecorded] {
        assert_eq!(sb.counter(c), 0, "{c:?}");
    }
}

// 7b. The agent's port belongs to the agent: every cgroup in the hierarchy, exceptions too,
// is refused a bind of it (its address or the wildcards, `SO_REUSEPORT` or not), and only of it.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn only_the_agent_may_bind_its_port() {
    let sb = Sandbox::new("bind");
    let agent = sb.agent.server.addr;
    let port = agent.port();
    let refused: [std::net::SocketAddr; 4] = [
        agent.into(),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into(),
        (std::net::Ipv6Addr::UNSPECIFIED, port).into(),
        (agent.ip().to_ipv6_mapped(), port).into(),
    ];
    let mut tries = 0;
    for cg in [&sb.redirect, &sb.deny, &sb.pass_ctr] {
        for addr in refused {
            for reuseport in [false, true] {
                let report = Probe::new(&sb.ns, cg).bind(addr, reuseport, false).wait();
                assert_eq!(report.errno, Some(libc::EPERM), "{} bind {addr}: {report:?}", cg.path.display());
                tries += 1;
            }
        }
    }
    assert_eq!(sb.counter(Counter::BindRefused), tries);
    let udp = Probe::new(&sb.ns, &sb.redirect).bind(agent.into(), false, true).wait();
    assert_eq!(udp.outcome, "bound", "only TCP is redirected, so only TCP is guarded: {udp:?}");
    // Other ports, and the same port on another address, are nobody's business.
    let free: [std::net::SocketAddr; 3] = [
        SocketAddrV4::new(*agent.ip(), 0).into(),
        SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), port).into(),
        (std::net::Ipv6Addr::LOCALHOST, port).into(),
    ];
    for addr in free {
        let report = Probe::new(&sb.ns, &sb.redirect).bind(addr, false, false).wait();
        assert_eq!(report.outcome, "bound", "bind {addr}: {report:?}");
    }
    assert_eq!(sb.counter(Counter::BindRefused), tries);
}

/// Exactly one program attached at each hook of `cgroup`, named as ours; their ids.
fn assert_attached_once(cgroup: &Cgroup) -> Vec<u32> {
    attached_programs(&cgroup.path)
        .unwrap()
        .into_iter()
        .map(|(hook, progs)| {
            assert_eq!(progs.len(), 1, "{hook:?}: {progs:?}");
            assert_eq!(progs[0].name, hook.program(), "{hook:?}");
            progs[0].id
        })
        .collect()
}

/// For tests that run the `imds-agent` binary: a namespace holding the metadata address and
/// its stand-in, a cgroup tree (`root`, and `redirect` below it with no entry) and a pin
/// directory. Fields drop in order: stand-in, pins, cgroups (child first), namespace.
struct AgentSandbox {
    standin: Server,
    manifests: tempfile::TempDir,
    pins: PinDir,
    redirect: Cgroup,
    root: Cgroup,
    ns: NetNs,
}

impl AgentSandbox {
    fn new(tag: &str) -> AgentSandbox {
        let ns = NetNs::new(tag);
        ns.host_metadata_address();
        let root = Cgroup::new_top(tag);
        let redirect = root.child("redirect");
        let pins = PinDir::new(tag);
        let standin = Server::banner(&ns, IMDS_ENDPOINT, "standin");
        let manifests = tempfile::tempdir().unwrap();
        AgentSandbox { standin, manifests, pins, redirect, root, ns }
    }

    /// `imds-agent run` arguments for this sandbox, plus `extra`.
    fn agent_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--attach-cgroup".into(),
            self.root.path.display().to_string(),
            "--bpffs".into(),
            self.pins.path.display().to_string(),
            "--listen".into(),
            "127.0.0.1:8182".into(),
            "--manifests".into(),
            self.manifests.path().display().to_string(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    }
}

/// A token request from a real client (curl) in `cgroup`; the agent's answer and the pid.
fn token_request_from(sb: &AgentSandbox, cgroup: &Cgroup) -> (u32, String) {
    let url = "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=r";
    let (pid, out) = imds_tests::run_in(&sb.ns, cgroup, &["curl", "-sS", "-m", "10", "-H", "Metadata: true", url]);
    (pid, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Pids of the callers in the agent's decision log.
fn decision_pids(agent: &AgentProcess) -> Vec<u64> {
    agent.decisions().iter().filter_map(|d| d["pid"].as_u64()).collect()
}

// 8.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn restart_reuses_pinned_state_with_no_gap_and_no_second_attachment() {
    let sb = AgentSandbox::new("restart");
    let args = sb.agent_args(&[]);

    let mut agent = AgentProcess::start(&sb.ns, &args);
    let first_ids = assert_attached_once(&sb.root);
    // Not a pod's cgroup: the agent answers IMDS's "Identity not found", and logs the caller.
    let (pid, answer) = token_request_from(&sb, &sb.redirect);
    assert!(answer.contains("Identity not found"), "{answer}");
    assert_eq!(decision_pids(&agent), vec![u64::from(pid)]);

    agent.kill();
    // Down: the programs stay attached, so the redirect target refuses; the endpoint is
    // never reached.
    assert_eq!(assert_attached_once(&sb.root), first_ids);
    let report = Probe::new(&sb.ns, &sb.redirect).connect(IMDS_IP, 80, false).wait();
    assert_eq!((report.outcome.as_str(), report.errno), ("error", Some(libc::ECONNREFUSED)), "{report:?}");
    let report = Probe::new(&sb.ns, &sb.redirect).connect(IMDS_IP, 80, true).wait();
    assert_eq!(report.errno, Some(libc::ECONNREFUSED), "{report:?}");
    assert_eq!(sb.standin.accepted(), 0);

    let agent = AgentProcess::start(&sb.ns, &args);
    let hows: Vec<String> = agent.log_lines().iter().filter_map(|l| l["how"].as_str().map(str::to_owned)).collect();
    assert_eq!(hows, vec![format!("{:?}", Attachment::Replaced); Hook::ALL.len()]);
    let second_ids = assert_attached_once(&sb.root);
    for (a, b) in first_ids.iter().zip(&second_ids) {
        assert_ne!(a, b, "the restarted agent's programs run");
    }
    let (pid, answer) = token_request_from(&sb, &sb.redirect);
    assert!(answer.contains("Identity not found"), "{answer}");
    assert_eq!(decision_pids(&agent), vec![u64::from(pid)]);
    assert_eq!(sb.standin.accepted(), 0);
}

// 9.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn uninstall_detaches_everything_and_removes_the_pins() {
    let sb = AgentSandbox::new("uninst");
    let agent = AgentProcess::start(&sb.ns, &sb.agent_args(&["--log", "debug"]));
    assert_attached_once(&sb.root);
    // Kernel-side log records reach the agent's log.
    let report = Probe::new(&sb.ns, &sb.redirect).connect(IMDS_IP, 81, false).wait();
    assert_eq!(report.errno, Some(libc::EPERM), "{report:?}");
    agent.wait_for_log("connect4 to protected 169.254.169.254 refused", Duration::from_secs(5));

    // While the agent still runs: uninstall must not depend on it exiting.
    let out = std::process::Command::new(imds_tests::agent_binary())
        .args(["uninstall", "--bpffs"])
        .arg(&sb.pins.path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (hook, progs) in attached_programs(&sb.root.path).unwrap() {
        assert!(progs.is_empty(), "{hook:?} still has {progs:?}");
    }
    assert!(!sb.pins.path.exists());
    // With the filter gone, the endpoint (our stand-in) is reachable again.
    let report = Probe::new(&sb.ns, &sb.redirect).connect(IMDS_IP, 80, false).wait();
    assert_eq!(report.reply.as_deref(), Some("standin"), "{report:?}");
    assert_eq!(sb.standin.accepted(), 1);
}

// 10.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn forty_parallel_clients_from_several_cgroups_are_each_attributed_correctly() {
    let mut sb = Sandbox::new("par");
    let cgroups: Vec<Cgroup> = (0..4).map(|i| sb.redirect.child(&format!("c{i}"))).collect();
    // Two with an explicit REDIRECT entry, two falling back to the default.
    sb.filter.set_verdict(cgroups[0].id(), Verdict::Redirect).unwrap();
    sb.filter.set_verdict(cgroups[1].id(), Verdict::Redirect).unwrap();
    let probes: Vec<_> = (0..40)
        .map(|i| {
            let cg = &cgroups[i % 4];
            let v6 = i % 2 == 1;
            let p = Probe::new(&sb.ns, cg).as_user(1000 + i as u32, 2000 + i as u32).connect(IMDS_IP, 80, v6);
            (p, cg, v6, i as u32)
        })
        .collect();
    for (probe, cg, v6, i) in probes {
        let pid = probe.pid();
        let report = probe.wait();
        assert_eq!(
            report.reply.as_deref(),
            Some(expected_reply(pid, cg, 1000 + i, 2000 + i, v6).as_str()),
            "client {i}: {report:?}"
        );
    }
    assert_eq!(sb.agent.server.accepted(), 40);
    assert_eq!(sb.standin.accepted(), 0);
    drop(cgroups); // before their parent
}

// Origin records must never outlive their connection, or a later caller could inherit them.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn origin_records_never_outlive_their_connection() {
    let ns = NetNs::new("stale");
    ns.host_metadata_address();
    // A socket closed with FIN stays in FIN_WAIT2 (its record with it) only while
    // `tcp_fin_timeout` exceeds the TIME_WAIT length (60 s); otherwise the kernel may move it
    // to TIME_WAIT at once when the peer's ACK arrives after close() returned, which closes it
    // (and drops the record) before the test can look.
    ns.sysctl("net.ipv4.tcp_fin_timeout", "120");
    let root = Cgroup::new_top("stale");
    let redirect = root.child("redirect");
    let pins = PinDir::new("stale");
    // Bound but never accepted: connections wait in the backlog, records in the kernel map.
    let listener = Server::bind(&ns, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
    let agent = v4_addr(&listener);
    let filter = Filter::install(&filter_options(&root, &pins, agent)).unwrap();
    let origins = filter.origins();
    let client = |report: &imds_tests::ProbeReport| -> std::net::SocketAddr {
        assert_eq!(report.outcome, "connected", "{report:?}");
        report.local.as_deref().unwrap().parse().unwrap()
    };

    // Closed normally (FIN_WAIT until the agent answers): the record waits for the agent.
    let probe = Probe::new(&ns, &redirect).connect_then_close(IMDS_IP, 80, false);
    let pid = probe.pid();
    let closed = client(&probe.wait());
    match origins.take(closed, agent.into()).unwrap() {
        OriginLookup::Found(o) => assert_eq!((o.pid, o.cgroup_id), (pid, redirect.id())),
        other => panic!("record of a live connection: {other:?}"),
    }
    // Taking it consumed it, in one system call on this kernel.
    assert_eq!(origins.take(closed, agent.into()).unwrap(), OriginLookup::Missing);
    if kernel_at_least(5, 14) {
        assert!(origins.takes_in_one_step(), "a kernel ≥ 5.14 takes a hash map element in one step");
    }
    // The same in two steps, as kernels before 5.14 take records.
    let probe = Probe::new(&ns, &redirect).connect_then_close(IMDS_IP, 80, false);
    let pid = probe.pid();
    let closed = client(&probe.wait());
    origins.take_in_two_steps();
    match origins.take(closed, agent.into()).unwrap() {
        OriginLookup::Found(o) => assert_eq!((o.pid, o.cgroup_id), (pid, redirect.id())),
        other => panic!("record of a live connection, taken in two steps: {other:?}"),
    }
    assert_eq!(origins.take(closed, agent.into()).unwrap(), OriginLookup::Missing);

    // Aborted (straight to TCP_CLOSE): the kernel deleted the record when the socket closed.
    let aborted = client(&Probe::new(&ns, &redirect).connect_then_close(IMDS_IP, 80, true).wait());
    assert_eq!(origins.take(aborted, agent.into()).unwrap(), OriginLookup::Missing);

    // A direct connection to the agent, from inside the hierarchy, has no record at all.
    let direct = client(&Probe::new(&ns, &redirect).connect_then_close(*agent.ip(), agent.port(), false).wait());
    assert_eq!(origins.take(direct, agent.into()).unwrap(), OriginLookup::Missing);

    // Past the TTL a record is refused. Installing again on the same pins (as a restart
    // does) gives a table with a zero TTL.
    let mut options = filter_options(&root, &pins, agent);
    options.origin_ttl = Duration::ZERO;
    let strict = Filter::install(&options).unwrap();
    let late = client(&Probe::new(&ns, &redirect).connect_then_close(IMDS_IP, 80, false).wait());
    assert!(
        matches!(strict.origins().take(late, agent.into()).unwrap(), OriginLookup::Expired { .. }),
        "an expired record must not be served"
    );
    assert_eq!(strict.counters().unwrap().iter().find(|(c, _)| *c == Counter::OriginRecorded).unwrap().1, 4);
    drop((strict, filter, listener, pins, redirect, root));
}

/// Whether the running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("the kernel's release");
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

// The agent's own upstream connections must reach the endpoint although the default is
// REDIRECT: its cgroup is exempt (by cgroup, not by a socket mark a pod could forge).
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn the_agents_own_cgroup_is_never_redirected() {
    let ns = NetNs::new("exempt");
    ns.host_metadata_address();
    let root = Cgroup::new_top("exempt");
    let (agent_cg, sibling) = (root.child("agent"), root.child("sibling"));
    let pins = PinDir::new("exempt");
    let listener = Server::bind(&ns, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
    let mut options = filter_options(&root, &pins, v4_addr(&listener));
    options.agent_cgroup = agent_cg.id();
    let filter = Filter::install(&options).unwrap();
    let agent = AgentListener::serve(listener, filter.origins());
    let standin = Server::banner(&ns, IMDS_ENDPOINT, "standin");
    let tap = TcpTap::open(&ns);

    for v6 in [false, true] {
        let report = Probe::new(&ns, &agent_cg).connect(IMDS_IP, 80, v6).wait();
        assert_eq!(report.reply.as_deref(), Some("standin"), "v6={v6}: {report:?}");
    }
    let report = Probe::new(&ns, &agent_cg).raw_syn(IMDS_IP, 80, 40_200).wait();
    assert_eq!(report.outcome, "sent", "{report:?}");
    assert!(tap.saw_syn(IMDS_IP, 80, 40_200, Duration::from_secs(2)), "the backstop exempts the agent too");
    // The exemption is that cgroup only, not its siblings.
    let report = Probe::new(&ns, &sibling).connect(IMDS_IP, 80, false).wait();
    assert!(report.reply.as_deref().is_some_and(|r| r.starts_with("agent pid=")), "{report:?}");
    assert_eq!((standin.accepted(), agent.server.accepted()), (2, 1));
    drop((agent, standin, filter, pins, agent_cg, sibling, root));
}

// The programs test a one-word summary of the protected set before they look an address up
// (`SUMMARY`). A restart that protects another address must enforce it at every layer the
// moment its programs run, and one that stops protecting it must let it go: the summary
// follows the set, and never rules out an address the map holds.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_restart_with_another_protected_set_enforces_exactly_that_set() {
    let ns = NetNs::new("reprotect");
    ns.host_metadata_address();
    let other = Ipv4Addr::new(10, 237, 0, 1);
    ns.ip(&["addr", "add", &format!("{other}/32"), "dev", "lo"]);
    let other_tcp = Server::banner(&ns, SocketAddrV4::new(other, 80), "other");
    let other_udp = udp_sink(&ns, SocketAddrV4::new(other, 80));
    let root = Cgroup::new_top("reprotect");
    let pod = root.child("pod");
    let pins = PinDir::new("reprotect");
    let listener = Server::bind(&ns, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
    let plain = filter_options(&root, &pins, v4_addr(&listener));
    let widened = FilterOptions { protected_addresses: vec![IMDS_IP, other], ..plain.clone() };
    let be = |ip: Ipv4Addr| u32::from_ne_bytes(ip.octets());
    let summary = || {
        let map = aya::maps::MapData::from_pin(pins.path.join(maps::SUMMARY)).expect("summary pinned");
        let array: aya::maps::Array<_, ProtectedSummary> =
            aya::maps::Array::try_from(aya::maps::Map::Array(map)).unwrap();
        array.get(&0, 0).unwrap()
    };
    // Whether a pod reaches `other` by TCP and by unconnected UDP.
    let reaches = || {
        let report = Probe::new(&ns, &pod).connect(other, 80, false).wait();
        let tcp = report.reply.as_deref() == Some("other");
        assert!(tcp || report.errno == Some(libc::EPERM), "{report:?}");
        // A datagram the egress backstop drops fails the send (EPERM); either way, the sink tells.
        let report = Probe::new(&ns, &pod).udp(other, 80).wait();
        assert_ne!(report.outcome, "setup-failed", "{report:?}");
        (tcp, udp_received(&other_udp))
    };

    let filter = Filter::install(&plain).expect("install");
    assert_eq!(summary(), ProtectedSummary::of([be(IMDS_IP)]));
    assert_eq!(reaches(), (true, true), "not protected yet");
    drop(filter);

    let filter = Filter::install(&widened).expect("restart protecting another address");
    assert_eq!(summary(), ProtectedSummary::of([be(IMDS_IP), be(other)]));
    // Whole, with no port to redirect: refused at connect, dropped at egress.
    assert_eq!(reaches(), (false, false), "protected by the restart");
    drop(filter);

    let filter = Filter::install(&plain).expect("restart protecting it no more");
    assert_eq!(summary(), ProtectedSummary::of([be(IMDS_IP)]));
    assert_eq!(reaches(), (true, true), "let go by the restart");
    // The metadata address stayed protected throughout: redirected to the agent's listener
    // on loopback (which accepts nothing here).
    let report = Probe::new(&ns, &pod).connect(IMDS_IP, 80, false).wait();
    assert!(report.local.as_deref().is_some_and(|l| l.starts_with("127.0.0.1:")), "{report:?}");
    drop((filter, listener, other_tcp, pins, pod, root));
}
