//! The paths below the socket (issue #13): a pod that makes its packets without a socket the
//! cgroup programs judge — its own nftables rewriting them, or hand-made frames through an
//! `AF_PACKET` socket — and the NAT64 spelling of the metadata address. The node backstop,
//! in the node's network namespace, drops them; nothing of them reaches the metadata service.
//!
//! Every attack runs on both topologies (routed veths, a bridge) and both mechanisms
//! (netfilter `PRE_ROUTING`, tc ingress), against the real agent in the real kernel, and with
//! the backstop off, where each one reaches the fake IMDS — so a passing test is one the
//! attack could have failed. The fake stands in for IMDS (the real one cannot run here).
//! Needs root; run with `cargo xtask test`.
use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    process::{Command, Stdio},
    time::Duration,
};

use imds_tests::{
    fake_imds::{token_for, FakeIdentity},
    fixtures::{self, Manifest},
    frame::Carrying,
    node::{curl, curl_within, pod_uid, Fetched, Node, TestPod, Topology, IMDS_NAT64},
    udp_received, udp_sink, Probe, Relay, Server, TcpTap, IMDS_IP,
};

const NS: &str = "app";
const RESOURCE: &str = "https://vault.azure.net";
const TOKEN: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";
/// An ordinary address the nftables attack connects to, rewritten on the way out.
const DECOY: Ipv4Addr = Ipv4Addr::new(10, 99, 99, 99);
/// The UDP port a sink listens on at the metadata addresses.
const UDP_PORT: u16 = 5353;

/// A node whose pod `web` is bound to identity `blob`, and so is the hostNetwork pod
/// `hostnet`; `mallory` is bound to nothing; `helper` is an exception, and so was `done`, a
/// Job's pod that has finished; `peer` serves a banner that `mallory` may reach through the
/// node. Fields drop pods first.
struct Scene {
    web: TestPod,
    hostnet: TestPod,
    mallory: TestPod,
    helper: TestPod,
    done: TestPod,
    peer: TestPod,
    _peer_server: Server,
    _translator: Relay,
    blob: FakeIdentity,
    node: Node,
}

impl Scene {
    fn new(tag: &str, topology: Topology, backstop: &str) -> Scene {
        let blob = FakeIdentity::named("blob");
        let mut node = Node::new(tag, vec![blob.clone(), FakeIdentity::named("table")]);
        node.ns.sysctl("net.ipv4.ip_forward", "1");
        let [web, mallory, helper, done, peer] = [(); 5].map(|()| node.pod_on(&pod_uid(), topology));
        let hostnet = node.host_network_pod(&pod_uid());
        let pod = |name: &str, p: &TestPod| fixtures::pod(NS, name, &p.uid).ip(p.ip);
        let policy = Manifest::new()
            .with(&fixtures::identity(NS, "blob", &blob))
            .with(&fixtures::binding(NS, "blob-binding", "blob", "blob"))
            .with(&fixtures::exception(NS, "helpers", &[("role", "helper")]))
            .with(&pod("web", &web).bound_to("blob"))
            .with(&pod("mallory", &mallory))
            .with(&pod("helper", &helper).label("role", "helper"))
            .with(&pod("peer", &peer))
            .with(&pod("done", &done).label("role", "helper").phase("Succeeded"))
            .with(
                &fixtures::pod(NS, "hostnet", &hostnet.uid)
                    .bound_to("blob")
                    .host_network()
                    .container(fixtures::container_dropping_all("app", "app:1")),
            )
            // A hostNetwork pod keeping NET_RAW: no layer contains it, and status says so.
            .with(
                &fixtures::pod(NS, "node-tool", &pod_uid())
                    .host_network()
                    .container(fixtures::container("tool", "tool:1")),
            );
        node.write_manifest("policy.yaml", policy.as_str());
        // mallory reaches the decoy and the peer through the node, as any pod network would.
        let (m, p) = (addr(&mallory), addr(&peer));
        mallory.ns(&node).ip(&["route", "add", &format!("{DECOY}/32"), "via", &gateway(&mallory)]);
        if topology == Topology::Routed {
            mallory.ns(&node).ip(&["route", "add", &format!("{p}/32"), "via", &gateway(&mallory)]);
            peer.ns(&node).ip(&["route", "add", &format!("{m}/32"), "via", &gateway(&peer)]);
        }
        let peer_server = Server::banner(peer.ns(&node), SocketAddrV4::new(p, 8080), "peer");
        let translator = node.nat64_translator();
        node.start_agent(&["--node-backstop", backstop]);
        Scene {
            web,
            hostnet,
            mallory,
            helper,
            done,
            peer,
            _peer_server: peer_server,
            _translator: translator,
            blob,
            node,
        }
    }

    /// Token requests IMDS has answered so far.
    fn imds_requests(&self) -> usize {
        self.node.fake.token_requests().len()
    }

    /// mallory's own nftables rewrite a connection to [`DECOY`] into one to the metadata
    /// address (and the answers back); it asks for blob's token that way.
    fn nft_rewrite(&self) -> Fetched {
        let iface = &self.mallory.link.as_ref().expect("a pod link").iface;
        let ruleset = format!(
            "table netdev attack {{\n\
               chain out {{ type filter hook egress device \"{iface}\" priority 0; ip daddr {DECOY} ip daddr set {IMDS_IP}; }}\n\
               chain in {{ type filter hook ingress device \"{iface}\" priority 0; ip saddr {IMDS_IP} ip saddr set {DECOY}; }}\n\
             }}\n"
        );
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &self.mallory.ns(&self.node).name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft (Debian package nftables; `cargo xtask setup` installs it)");
        nft.stdin.take().expect("stdin").write_all(ruleset.as_bytes()).expect("ruleset");
        assert!(nft.wait().expect("nft runs").success(), "nft refused the ruleset");
        let query = format!("{TOKEN}&client_id={}", self.blob.client_id);
        let fetched = curl_fast(&self.node, &self.mallory, SocketAddr::from((DECOY, 80)), &query);
        let remove = ["netns", "exec", &self.mallory.ns(&self.node).name, "nft", "delete", "table", "netdev", "attack"];
        assert!(Command::new("ip").args(remove).status().expect("nft").success());
        fetched
    }

    /// A hand-made frame from `pod` (its own address) to `dst:port`; for a SYN, whether a
    /// SYN-ACK came back.
    fn frame(&self, pod: &TestPod, dst: IpAddr, port: u16, carrying: Carrying) -> bool {
        let src = if dst.is_ipv4() { IpAddr::from(addr(pod)) } else { IpAddr::from(pod.ip6.expect("IPv6")) };
        self.frame_from(pod, (src, dst), port, carrying, 0)
    }

    /// The same with any source address and `vlan_tags` priority tags.
    fn frame_from(&self, pod: &TestPod, addrs: (IpAddr, IpAddr), port: u16, carrying: Carrying, vlan_tags: u8) -> bool {
        let link = pod.link.as_ref().expect("a pod link");
        let report = Probe::new(pod.ns(&self.node), &pod.ctr).frame(link, addrs, port, carrying, vlan_tags).wait();
        assert_eq!(report.outcome, "sent", "{report:?}");
        report.answered == Some(true)
    }
}

fn addr(pod: &TestPod) -> Ipv4Addr {
    match pod.ip {
        Some(IpAddr::V4(ip)) => ip,
        other => panic!("a pod with an IPv4 address of its own, not {other:?}"),
    }
}

fn gateway(pod: &TestPod) -> String {
    pod.gateway.expect("a pod with its own namespace").to_string()
}

/// curl with a short timeout: a dropped connection is what most of these expect.
fn curl_fast(node: &Node, pod: &TestPod, to: SocketAddr, path_and_query: &str) -> Fetched {
    curl_within(node, pod, to, path_and_query, &["Metadata: true"], 3)
}

/// What each attack achieved: `true` is an attack that worked.
#[derive(Debug, Default, PartialEq, Eq)]
#[expect(clippy::struct_excessive_bools, reason = "one yes-or-no per attack, compared as a whole")]
struct Reached {
    /// mallory got a token through its own nftables.
    nft_rewrite: bool,
    /// A SYN-ACK from the metadata address came back for an `AF_PACKET` SYN (and the node
    /// delivered the SYN).
    packet_syn: bool,
    /// An `AF_PACKET` UDP datagram reached a sink on the metadata address.
    packet_udp: bool,
    /// The same, to the NAT64 spelling.
    packet_syn_nat64: bool,
    packet_udp_nat64: bool,
    /// A SYN under two priority (VLAN 0) tags, which the kernel strips after tc ran.
    double_tagged_syn: bool,
    /// An IPv6 datagram from the v4-mapped spelling of the exception pod's address.
    v4_mapped_source: bool,
    /// A SYN from the finished Job pod that was an exception while it ran.
    finished_exception: bool,
}

/// Every attack from mallory, and whether IMDS saw any of it.
fn attack(s: &Scene) -> Reached {
    let before = s.imds_requests();
    let tap = TcpTap::open(&s.node.ns);
    let sink = udp_sink(&s.node.ns, SocketAddrV4::new(IMDS_IP, UDP_PORT));
    let sink6 = udp_sink(&s.node.ns, SocketAddr::from((IMDS_NAT64, UDP_PORT)));
    let nft = s.nft_rewrite();
    let reached = Reached {
        nft_rewrite: nft.status == 200 && nft.body.contains(&token_for(&s.blob.client_id, RESOURCE)),
        packet_syn: s.frame(&s.mallory, IMDS_IP.into(), 80, Carrying::TcpSyn)
            && tap.saw_syn(IMDS_IP, 80, 41_000, Duration::from_millis(200)),
        packet_udp: {
            let _ = s.frame(&s.mallory, IMDS_IP.into(), UDP_PORT, Carrying::Udp);
            udp_received(&sink)
        },
        packet_syn_nat64: s.frame(&s.mallory, IMDS_NAT64.into(), 80, Carrying::TcpSyn),
        packet_udp_nat64: {
            let _ = s.frame(&s.mallory, IMDS_NAT64.into(), UDP_PORT, Carrying::Udp);
            udp_received(&sink6)
        },
        double_tagged_syn: {
            let addrs = (IpAddr::from(addr(&s.mallory)), IpAddr::from(IMDS_IP));
            s.frame_from(&s.mallory, addrs, 80, Carrying::TcpSyn, 2)
        },
        v4_mapped_source: {
            let helper = addr(&s.helper).to_ipv6_mapped();
            let _ = s.frame_from(&s.mallory, (helper.into(), IMDS_NAT64.into()), UDP_PORT, Carrying::Udp, 0);
            udp_received(&sink6)
        },
        finished_exception: s.frame(&s.done, IMDS_IP.into(), 80, Carrying::TcpSyn),
    };
    if reached == Reached::default() {
        assert_eq!(
            s.imds_requests(),
            before,
            "IMDS saw a request although every attack failed: {:?}",
            s.node.fake.seen()
        );
    }
    reached
}

/// What must keep working with the backstop in place.
fn positive_controls(s: &Scene) {
    // The exception pod reaches IMDS directly, through a socket and below one.
    let before = s.imds_requests();
    let fetched = curl(&s.node, &s.helper, SocketAddr::from((IMDS_IP, 80)), TOKEN, &["Metadata: true"]);
    assert_eq!(fetched.status, 200, "{fetched:?}");
    let seen = s.node.fake.token_requests();
    assert_eq!(seen.len(), before + 1);
    assert_eq!(seen[before].peer.ip(), s.helper.ip.unwrap(), "straight from the exception pod");
    assert!(s.frame(&s.helper, IMDS_IP.into(), 80, Carrying::TcpSyn), "the exception pod's own frames pass too");
    // A bound pod gets its token through the agent (whose own upstream call passes).
    let fetched = curl(&s.node, &s.web, SocketAddr::from((IMDS_IP, 80)), TOKEN, &["Metadata: true"]);
    assert_eq!(fetched.status, 200, "{fetched:?}");
    assert!(fetched.body.contains(&token_for(&s.blob.client_id, RESOURCE)), "{fetched:?}");
    // So does a hostNetwork pod bound to it (its sockets live in the node's namespace).
    let fetched = curl(&s.node, &s.hostnet, SocketAddr::from((IMDS_IP, 80)), TOKEN, &["Metadata: true"]);
    assert!(fetched.status == 200 && fetched.body.contains(&token_for(&s.blob.client_id, RESOURCE)), "{fetched:?}");
    // Other traffic the node forwards between pods is untouched.
    let peer = SocketAddrV4::new(addr(&s.peer), 8080);
    let report = Probe::new(s.mallory.ns(&s.node), &s.mallory.ctr).connect(*peer.ip(), peer.port(), false).wait();
    assert_eq!((report.outcome.as_str(), report.reply.as_deref()), ("connected", Some("peer")), "{report:?}");
}

/// The NAT64 spelling through a socket: judged as the metadata address (redirected to the
/// agent), never relayed to IMDS by the translator.
fn nat64_through_sockets(s: &Scene) {
    let before = s.imds_requests();
    let to = SocketAddr::from((IMDS_NAT64, 80));
    let stolen = curl_fast(&s.node, &s.mallory, to, &format!("{TOKEN}&client_id={}", s.blob.client_id));
    assert_eq!(stolen.status, 400, "mallory's NAT64 request is the agent's to refuse: {stolen:?}");
    assert_eq!(s.imds_requests(), before, "nothing reached IMDS: {:?}", s.node.fake.seen());
    let own = curl_fast(&s.node, &s.web, to, TOKEN);
    assert_eq!(own.status, 200, "{own:?}");
    let seen = s.node.fake.token_requests();
    assert_eq!(seen.len(), before + 1);
    assert_eq!(seen[before].param("client_id").as_deref(), Some(s.blob.client_id.as_str()), "asked by the agent");
    // An unconnected datagram to the NAT64 spelling never leaves the pod (cgroup egress).
    let sink = udp_sink(&s.node.ns, SocketAddr::from((IMDS_NAT64, UDP_PORT + 1)));
    let report = Probe::new(s.mallory.ns(&s.node), &s.mallory.ctr).udp(IMDS_NAT64, UDP_PORT + 1).wait();
    // The egress program's drop reaches the sender as EPERM.
    assert_eq!((report.outcome.as_str(), report.errno), ("error", Some(libc::EPERM)), "{report:?}");
    assert!(!udp_received(&sink), "a datagram to 64:ff9b::a9fe:a9fe got through");
}

/// The node's own NAT sends a connection to an ordinary address on to the metadata address
/// (a Service whose endpoint it is, or conntrack undoing a NAT the attacker set up): after
/// `PRE_ROUTING`. Returns whether mallory got blob's token that way.
fn node_dnat(s: &Scene) -> bool {
    let service = Ipv4Addr::new(10, 97, 0, 1);
    let ruleset = format!(
        "table ip svc {{\n  chain pre {{ type nat hook prerouting priority -100; ip daddr {service} tcp dport 80 dnat to {IMDS_IP}:80; }}\n}}\n"
    );
    let mut nft = Command::new("ip")
        .args(["netns", "exec", &s.node.ns.name, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft");
    nft.stdin.take().expect("stdin").write_all(ruleset.as_bytes()).expect("ruleset");
    assert!(nft.wait().expect("nft runs").success(), "nft refused the ruleset");
    s.mallory.ns(&s.node).ip(&["route", "add", &format!("{service}/32"), "via", &gateway(&s.mallory)]);
    let fetched = curl_fast(
        &s.node,
        &s.mallory,
        SocketAddr::from((service, 80)),
        &format!("{TOKEN}&client_id={}", s.blob.client_id),
    );
    let delete = ["netns", "exec", &s.node.ns.name, "nft", "delete", "table", "ip", "svc"];
    assert!(Command::new("ip").args(delete).status().expect("nft").success());
    fetched.status == 200 && fetched.body.contains(&token_for(&s.blob.client_id, RESOURCE))
}

fn held(tag: &str, topology: Topology, backstop: &str) {
    let s = Scene::new(tag, topology, backstop);
    assert_eq!(attack(&s), Reached::default(), "{backstop} on {topology:?}");
    if backstop == "netfilter" {
        // tc sees the destination before NAT only (docs/kernel-path.md).
        assert!(!node_dnat(&s), "the node's DNAT to the metadata address is judged after it");
    }
    nat64_through_sockets(&s);
    positive_controls(&s);
    let (pins, socket) = (s.node.pins.path.display().to_string(), s.node.agent().control_socket.display().to_string());
    let (code, status) = s.node.agent_json("status", &["--bpffs", &pins, "--agent-socket", &socket]);
    assert_eq!((code, status["protection"].as_str()), (Some(0), Some("protected")), "{status:#}");
    assert_eq!(status["node_backstop"]["mechanism"].as_str(), Some(backstop), "{status:#}");
    assert_eq!(
        status["agent"]["uncontained_pods"],
        serde_json::json!([{"pod": "app/node-tool", "why": ["hostNetwork with CAP_NET_RAW"]}]),
        "{status:#}"
    );
    let drops = status["counters"]["node_drop"].as_u64();
    assert!(drops.is_some_and(|n| n >= 4), "the node backstop counted its drops: {drops:?}");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn netfilter_backstop_on_routed_veths() {
    held("bs-nf-rt", Topology::Routed, "netfilter");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn netfilter_backstop_on_a_bridge() {
    held("bs-nf-br", Topology::Bridge, "netfilter");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn tc_backstop_on_routed_veths() {
    held("bs-tc-rt", Topology::Routed, "tc");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn tc_backstop_on_a_bridge() {
    held("bs-tc-br", Topology::Bridge, "tc");
}

// Without the node backstop every one of these attacks works: the tests above could fail.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn without_the_backstop_every_attack_reaches_imds() {
    for (tag, topology) in [("bs-off-rt", Topology::Routed), ("bs-off-br", Topology::Bridge)] {
        let s = Scene::new(tag, topology, "off");
        let everything = Reached {
            nft_rewrite: true,
            packet_syn: true,
            packet_udp: true,
            packet_syn_nat64: true,
            packet_udp_nat64: true,
            double_tagged_syn: true,
            v4_mapped_source: true,
            finished_exception: true,
        };
        assert_eq!(attack(&s), everything, "{topology:?}");
        assert!(node_dnat(&s), "{topology:?}: the node's DNAT reaches IMDS without the backstop");
    }
}

/// Case 17: the backstop stays while the agent is down and a restart replaces it in place. A
/// pod whose interface appears while no agent runs is covered at once by netfilter (one hook
/// for the namespace); by tc only once the agent is back, and `status` names the gap meanwhile.
fn survives_restarts(tag: &str, backstop: &str) {
    let mut s = Scene::new(tag, Topology::Routed, backstop);
    let syn_gets_through = |s: &Scene, pod: &TestPod| s.frame(pod, IMDS_IP.into(), 80, Carrying::TcpSyn);
    s.node.agent.as_mut().expect("agent").kill();
    assert!(!syn_gets_through(&s, &s.mallory), "{backstop}: the backstop left with the agent");
    let late = s.node.pod_on(&pod_uid(), Topology::Routed);
    let pins = s.node.pins.path.display().to_string();
    let (code, status) = s.node.agent_json("status", &["--bpffs", &pins, "--agent-socket", "/nonexistent"]);
    if backstop == "netfilter" {
        assert!(!syn_gets_through(&s, &late), "a pod made while the agent was down");
        assert_eq!((code, status["protection"].as_str()), (Some(1), Some("fail-closed")), "{status:#}");
    } else {
        let iface = late.link.as_ref().expect("link");
        assert!(syn_gets_through(&s, &late), "tc covers a new interface only once the agent is back");
        assert_eq!((code, status["protection"].as_str()), (Some(2), Some("unprotected")), "{status:#}");
        let uncovered = status["node_backstop"]["uncovered"].as_array().expect("uncovered interfaces");
        assert_eq!(uncovered.len(), 1, "the new pod's node-side interface, not {}: {status:#}", iface.iface);
    }
    s.node.start_agent(&["--node-backstop", backstop]);
    let put = s.node.agent().log_lines().into_iter().find(|l| l["message"] == "node backstop in place");
    assert_eq!(put.as_ref().and_then(|l| l["attachment"].as_str()), Some("Replaced"), "{put:?}");
    assert!(!syn_gets_through(&s, &s.mallory) && !syn_gets_through(&s, &late), "{backstop} after the restart");
    let socket = s.node.agent().control_socket.display().to_string();
    let (code, status) = s.node.agent_json("status", &["--bpffs", &pins, "--agent-socket", &socket]);
    assert_eq!((code, status["protection"].as_str()), (Some(0), Some("protected")), "{status:#}");
    positive_controls(&s);

    // `uninstall` takes the backstop away with the rest; status then says so.
    let agent = imds_tests::agent_binary();
    let uninstall = [agent.to_str().expect("UTF-8"), "uninstall", "--bpffs", &pins];
    let (_, out) = imds_tests::run_in(&s.node.ns, &s.node.root, &uninstall);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, status) = s.node.agent_json("status", &["--bpffs", &pins, "--agent-socket", &socket]);
    assert_eq!((code, status["node_backstop"]["mechanism"].as_str()), (Some(2), None), "{status:#}");
    assert!(syn_gets_through(&s, &s.mallory), "{backstop}: uninstalled, the frame goes through again");
    drop(late);
    drop(s);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn netfilter_backstop_survives_restarts() {
    survives_restarts("bs-nf-restart", "netfilter");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn tc_backstop_survives_restarts() {
    survives_restarts("bs-tc-restart", "tc");
}

/// The wire server's address, protected on its HTTP port only.
const WIRE: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 16);

/// Protection by port (issue #14, item 6): `--protect 168.63.129.16:80` protects TCP to that
/// port, at every layer; the address's DNS (UDP 53) and other TCP ports stay reachable, by
/// socket and by hand-made frame. The metadata address, protected whole by default, still
/// refuses UDP. Each service runs on the node inside the test's namespace.
fn protection_by_port(tag: &str, backstop: &str) {
    let mut node = Node::new(tag, vec![FakeIdentity::named("blob")]);
    node.ns.ip(&["addr", "add", &format!("{WIRE}/32"), "dev", "lo"]);
    let pod = node.pod_on(&pod_uid(), Topology::Routed);
    pod.ns(&node).ip(&["route", "add", &format!("{WIRE}/32"), "via", &gateway(&pod)]);
    node.write_manifest("pod.yaml", Manifest::new().with(&fixtures::pod(NS, "app", &pod.uid).ip(pod.ip)).as_str());
    let dns = udp_sink(&node.ns, SocketAddrV4::new(WIRE, 53));
    let _other_port = Server::banner(&node.ns, SocketAddrV4::new(WIRE, 8080), "wire-8080");
    let http = Server::banner(&node.ns, SocketAddrV4::new(WIRE, 80), "wire-http");
    let imds_udp = udp_sink(&node.ns, SocketAddrV4::new(IMDS_IP, UDP_PORT));
    let wire_http = format!("{WIRE}:80");
    node.start_agent(&["--node-backstop", backstop, "--protect", "169.254.169.254:80", "--protect", &wire_http]);
    let probe = || Probe::new(pod.ns(&node), &pod.ctr);

    // Through sockets (the cgroup programs).
    let report = probe().udp(WIRE, 53).wait();
    assert_eq!(report.outcome, "sent", "{report:?}");
    assert!(udp_received(&dns), "DNS to the wire server is left alone");
    let report = probe().connect(WIRE, 8080, false).wait();
    assert_eq!(report.reply.as_deref(), Some("wire-8080"), "another TCP port is left alone: {report:?}");
    let report = probe().connect_then_close(WIRE, 80, false).wait();
    assert_eq!(report.outcome, "connected", "the protected port is redirected to the agent: {report:?}");
    assert_eq!(http.accepted(), 0, "the protected port itself was never reached");
    let report = probe().udp(IMDS_IP, UDP_PORT).wait();
    assert_eq!(report.errno, Some(libc::EPERM), "the metadata address is protected whole: {report:?}");
    assert!(!udp_received(&imds_udp));

    // Below them (the node backstop): frames the pod makes itself.
    let link = pod.link.as_ref().expect("a pod link");
    let frame = |dst: Ipv4Addr, port: u16, carrying: Carrying| {
        let report = probe().frame(link, (addr(&pod).into(), dst.into()), port, carrying, 0).wait();
        assert_eq!(report.outcome, "sent", "{report:?}");
        report.answered == Some(true)
    };
    let _ = frame(WIRE, 53, Carrying::Udp);
    assert!(udp_received(&dns), "a hand-made DNS datagram to the wire server passes the node backstop");
    assert!(frame(WIRE, 8080, Carrying::TcpSyn), "a hand-made SYN to another port is answered");
    assert!(!frame(WIRE, 80, Carrying::TcpSyn), "a hand-made SYN to the protected port is dropped");
    let _ = frame(IMDS_IP, UDP_PORT, Carrying::Udp);
    assert!(!udp_received(&imds_udp), "a hand-made datagram to the metadata address is dropped");
    assert_eq!(http.accepted(), 0);

    let pins = node.pins.path.display().to_string();
    let (_, status) = node.agent_json("status", &["--bpffs", &pins, "--agent-socket", "/nonexistent"]);
    assert_eq!(status["protected_endpoints"], serde_json::json!(["168.63.129.16:80", "169.254.169.254:80"]));
    assert_eq!(status["protected_addresses"], serde_json::json!(["169.254.169.254"]));
    drop(pod);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn protection_by_port_leaves_the_rest_of_the_address_alone_netfilter() {
    protection_by_port("bs-port-nf", "netfilter");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn protection_by_port_leaves_the_rest_of_the_address_alone_tc() {
    protection_by_port("bs-port-tc", "tc");
}
