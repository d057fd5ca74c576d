//! Restarts must never open the filter (issue #14): what the kernel holds while no agent runs
//! has to match the policy again before the next agent says it is ready.
//!
//! Real agent, real kernel programs, pods in their own namespaces; the fake IMDS and the fake
//! API server stand in for Azure's and Kubernetes' (neither can run here). Needs root; run
//! with `cargo xtask test`.
use std::{
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use imds_tests::{
    fake_imds::{http_get, token_for, FakeIdentity},
    fake_kube::FakeKube,
    fixtures::{self, Manifest},
    node::{bound_pods_manifest, curl, pod_uid, Fetched, Node, TestPod, AGENT_ADDR},
    Burst, Probe, ProbeReport, RunningProbe, Server, AGENT_READY, IMDS_IP,
};
use serde_json::{json, Value};

const NS: &str = "app";
const RESOURCE: &str = "https://vault.azure.net";
const TOKEN: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";
const METRICS: ([u8; 4], u16) = ([10, 233, 0, 1], 9402);
const API: ([u8; 4], u16) = ([10, 233, 0, 1], 6443);

fn token(node: &Node, pod: &TestPod) -> Fetched {
    curl(node, pod, SocketAddr::from((IMDS_IP, 80)), TOKEN, &["Metadata: true"])
}

/// Whether the pod's request went straight to IMDS (an exception), and what it got.
fn straight_to_imds(node: &Node, pod: &TestPod) -> (bool, u16) {
    let before = node.fake.token_requests().len();
    let fetched = token(node, pod);
    let direct = node.fake.token_requests().get(before).is_some_and(|s| Some(s.peer.ip()) == pod.ip);
    (direct, fetched.status)
}

fn readyz(node: &Node) -> (u16, String) {
    node.ns.enter(|| http_get(SocketAddr::from(METRICS), "/readyz", &[]).unwrap_or((0, String::new())))
}

fn wait_ready(node: &Node) {
    let started = Instant::now();
    while readyz(node) != (200, "ready\n".to_owned()) {
        assert!(started.elapsed() < Duration::from_secs(15), "never ready: {:?}", readyz(node));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The kernel state as `imds-agent status` reads it: PASS verdict entries, exception
/// addresses at the node backstop.
fn pass_entries(node: &Node) -> (u64, u64) {
    let pins = node.pins.path.display().to_string();
    let (_, status) = node.agent_json("status", &["--bpffs", &pins, "--agent-socket", "/nonexistent"]);
    let pass = status["verdict_entries"]["pass"].as_u64().unwrap_or(0);
    let sources = status["maps"]["PASS_SOURCES"][0].as_u64().expect("PASS_SOURCES pinned");
    (pass, sources)
}

fn agent_args() -> Vec<String> {
    vec!["--metrics".into(), SocketAddr::from(METRICS).to_string()]
}

// Item 1, manifests: an exception removed from the directory while no agent runs.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn an_exception_revoked_while_the_agent_is_down_is_gone_before_it_is_ready_manifests() {
    let mut node = Node::new("rs-rev-man", vec![FakeIdentity::named("blob")]);
    let helper = node.pod(&pod_uid());
    let pod = Manifest::new().with(&fixtures::pod(NS, "helper", &helper.uid).label("role", "helper").ip(helper.ip));
    let exception = Manifest::new().with(&fixtures::exception(NS, "helpers", &[("role", "helper")]));
    node.write_manifest("pod.yaml", pod.as_str());
    node.write_manifest("exception.yaml", exception.as_str());
    let args = agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    node.start_agent(&args);
    wait_ready(&node);
    assert_eq!(straight_to_imds(&node, &helper), (true, 200), "the exception goes straight to IMDS");
    assert_eq!(pass_entries(&node), (1, 1));

    node.agent.as_mut().expect("agent").kill();
    std::fs::remove_file(node.manifests.path().join("exception.yaml")).expect("revoke");
    assert_eq!(pass_entries(&node), (1, 1), "the pinned state still says PASS while no agent runs");
    node.start_agent(&args);
    wait_ready(&node);
    assert_eq!(pass_entries(&node), (0, 0), "reconciled before ready");
    let (direct, status) = straight_to_imds(&node, &helper);
    assert_eq!((direct, status), (false, 400), "redirected to the agent, which refuses an unbound pod");
    drop(helper);
}

// Item 1, the Kubernetes API: the exception deleted while no agent runs.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn an_exception_revoked_while_the_agent_is_down_is_gone_before_it_is_ready_kube() {
    let mut node = Node::new("rs-rev-kube", vec![FakeIdentity::named("blob")]);
    let api = FakeKube::serve(Server::bind(&node.ns, SocketAddrV4::new(API.0.into(), API.1)));
    let helper = node.pod(&pod_uid());
    let ip = helper.ip.expect("own namespace").to_string();
    let pod: Value = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "helper", "namespace": NS, "uid": helper.uid, "labels": {"role": "helper"}},
        "spec": {"nodeName": imds_tests::node::KUBE_NODE, "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
    api.apply(pod);
    api.apply(json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzurePodIdentityException",
        "metadata": {"name": "helpers", "namespace": NS}, "spec": {"podLabels": {"role": "helper"}}}));
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.kubeconfig(dir.path());
    let args = agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    node.start_agent_kube(&kubeconfig, &args);
    wait_ready(&node);
    assert_eq!(straight_to_imds(&node, &helper), (true, 200));
    assert_eq!(pass_entries(&node), (1, 1));

    node.agent.as_mut().expect("agent").kill();
    api.delete("aadpodidentity.k8s.io/v1", "AzurePodIdentityException", NS, "helpers");
    node.start_agent_kube(&kubeconfig, &args);
    wait_ready(&node);
    assert_eq!(pass_entries(&node), (0, 0), "reconciled before ready");
    assert_eq!(straight_to_imds(&node, &helper), (false, 400));
    drop(helper);
}

/// The kernel's counters, as `imds-agent status` reads them.
fn kernel_counters(node: &Node) -> Value {
    let pins = node.pins.path.display().to_string();
    let (_, status) = node.agent_json("status", &["--bpffs", &pins, "--agent-socket", "/nonexistent"]);
    status["counters"].clone()
}

/// What a process in `pod` gets when it binds `addr` (TCP, or UDP) and listens.
fn bind_from(node: &Node, pod: &TestPod, addr: SocketAddr, reuseport: bool, udp: bool) -> ProbeReport {
    Probe::new(pod.ns(node), &pod.ctr).bind(addr, reuseport, udp).wait()
}

/// Every way a process could ask for the agent's TCP port: its address or a wildcard, IPv4
/// or IPv6 (dual-stack `::` and v4-mapped), `SO_REUSEPORT` or not.
fn squatting_attempts() -> Vec<(SocketAddr, bool, bool)> {
    let port = AGENT_ADDR.port();
    let mapped = AGENT_ADDR.ip().to_ipv6_mapped();
    let mut tries = Vec::new();
    for addr in [
        SocketAddr::from(AGENT_ADDR),
        SocketAddr::from(([0, 0, 0, 0], port)),
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
        SocketAddr::from((mapped, port)),
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(), port)),
    ] {
        tries.extend([(addr, false, false), (addr, true, false)]);
    }
    tries
}

// Item 2: while no agent runs, a hostNetwork pod binds the agent's address and port to
// receive every redirected connection and answer with forged tokens. The bind guard stays
// pinned with the other programs and refuses it, in every spelling; the next agent, a new
// pod in a new cgroup, binds the port and serves.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn the_agents_port_cannot_be_taken_while_the_agent_is_down() {
    let blob = FakeIdentity::named("blob");
    let mut node = Node::new("rs-squat", vec![blob.clone()]);
    let web_uid = pod_uid();
    node.write_manifest("pods.yaml", &bound_pods_manifest(NS, std::slice::from_ref(&blob), &[(web_uid.clone(), 0)]));
    let web = node.pod(&web_uid);
    let mallory = node.host_network_pod(&pod_uid());
    let first = node.host_network_pod(&pod_uid());
    node.start_agent_as_pod(&first, &[]);
    assert_eq!(token(&node, &web).status, 200);
    let refused_before = bind_from(&node, &mallory, SocketAddr::from(AGENT_ADDR), true, false);
    assert_eq!(refused_before.errno, Some(libc::EPERM), "refused while the agent runs, too: {refused_before:?}");

    node.agent.as_mut().expect("agent").kill();
    for (addr, reuseport, udp) in squatting_attempts() {
        let report = bind_from(&node, &mallory, addr, reuseport, udp);
        assert_eq!(
            (report.outcome.as_str(), report.errno),
            ("error", Some(libc::EPERM)),
            "bind {addr} (SO_REUSEPORT {reuseport}, UDP {udp}) while the agent is down: {report:?}"
        );
    }
    // The guard is precise: another port, another address's same port, UDP, and the port in a
    // pod's own network namespace (where no redirected connection arrives) are free to bind.
    let wildcard = SocketAddr::from(([0, 0, 0, 0], AGENT_ADDR.port()));
    for (pod, addr, udp) in [
        (&mallory, SocketAddr::from((*AGENT_ADDR.ip(), 8183)), false),
        (&mallory, SocketAddr::from(([127, 0, 0, 1], AGENT_ADDR.port())), false),
        (&mallory, SocketAddr::from(AGENT_ADDR), true),
        (&web, wildcard, false),
    ] {
        let report = bind_from(&node, pod, addr, false, udp);
        assert_eq!(report.outcome, "bound", "bind {addr} (UDP {udp}) from {}: {report:?}", pod.uid);
    }

    // The next agent is a new pod: the guard must let it in.
    let second = node.host_network_pod(&pod_uid());
    node.start_agent_as_pod(&second, &[]);
    let fetched = token(&node, &web);
    assert_eq!(fetched.status, 200, "{fetched:?}");
    assert_eq!(fetched.json()["access_token"], token_for(&blob.client_id, RESOURCE));
    node.agent = None; // the agent lives in `second`'s cgroup: stop it before that goes
    drop((web, mallory, first, second));
}

// Item 2: something outside the filtered hierarchy (where the guard does not reach) holds the
// agent's port when it starts. The agent must neither exit (leaving the node without one)
// nor let the kernel send pods to the holder: it refuses redirects, says who holds the port,
// is not ready, and takes the port the moment it is free.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_held_port_at_start_is_waited_for_and_nothing_is_sent_to_its_holder() {
    let blob = FakeIdentity::named("blob");
    let mut node = Node::new("rs-held", vec![blob.clone()]);
    let web_uid = pod_uid();
    node.write_manifest("pods.yaml", &bound_pods_manifest(NS, std::slice::from_ref(&blob), &[(web_uid.clone(), 0)]));
    let web = node.pod(&web_uid);
    let squatter = Server::banner(&node.ns, AGENT_ADDR, "HTTP/1.1 200 OK\r\n\r\n{\"access_token\":\"forged\"}");

    let args = agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    node.launch_agent(&args);
    let started = Instant::now();
    while !readyz(&node).1.contains("is held by") {
        assert!(started.elapsed() < Duration::from_secs(15), "never said the port is held: {:?}", readyz(&node));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, body) = readyz(&node);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&format!("pid {}", std::process::id())), "names the holder: {body}");
    let fetched = token(&node, &web);
    assert_eq!(fetched.status, 0, "refused while the port is held: {fetched:?}");
    assert_eq!(squatter.accepted(), 0, "nothing reached the holder");
    let counters = kernel_counters(&node);
    assert!(counters["connect_deny"].as_u64() >= Some(1), "refused by the kernel, not redirected: {counters}");
    assert_eq!(counters["connect_redirect"], 0, "{counters}");
    assert!(node.agent.as_mut().expect("agent").running(), "the agent waits; it does not exit");

    drop(squatter);
    node.agent().wait_for_log(AGENT_READY, Duration::from_secs(10));
    wait_ready(&node);
    let fetched = token(&node, &web);
    assert_eq!(fetched.status, 200, "{fetched:?}");
    assert_eq!(fetched.json()["access_token"], token_for(&blob.client_id, RESOURCE));
    drop(web);
}

// Item 2: two agents for one node, the first of a version that offers no handover (or one
// whose handover socket is gone). The second must not take the filter from the first, nor
// mistake the first's listener for a squatter and refuse every redirect: it waits for the
// first to exit, then takes over.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn an_agent_that_offers_no_handover_is_waited_for() {
    let blob = FakeIdentity::named("blob");
    let mut node = Node::new("rs-two", vec![blob.clone()]);
    let web_uid = pod_uid();
    node.write_manifest("pods.yaml", &bound_pods_manifest(NS, std::slice::from_ref(&blob), &[(web_uid.clone(), 0)]));
    let web = node.pod(&web_uid);
    node.start_agent(&[]);
    std::fs::remove_file(node.run.path().join("handover").join("agent.sock")).expect("the first agent offers");
    let second = node.spawn_agent(&[]);
    second.wait_for_log(
        "another agent holds this node's filter (its pin directory is locked) and offers no handover yet; waiting \
         for it to hand over or exit",
        Duration::from_secs(15),
    );
    for _ in 0..3 {
        assert_eq!(token(&node, &web).status, 200, "the first agent still serves");
    }
    assert_eq!(kernel_counters(&node)["connect_deny"], 0);

    node.agent.as_mut().expect("agent").kill();
    second.wait_for_log(AGENT_READY, Duration::from_secs(15));
    let fetched = token(&node, &web);
    assert_eq!(fetched.status, 200, "{fetched:?}");
    assert_eq!(fetched.json()["access_token"], token_for(&blob.client_id, RESOURCE));
    drop((second, web));
}

/// How long the pods below ask, at [`ASK_RATE`] a second each: longer than five
/// replacements take.
const ASKING: Duration = Duration::from_secs(40);
const ASK_RATE: f64 = 25.0;

// Item 3: an upgrade as the chart rolls it out (maxSurge 1, maxUnavailable 0): the new agent
// pod starts while the old one serves, takes over, and only then is the old pod stopped.
// Pods ask for tokens throughout (two with a new connection each time, one over kept-alive
// connections); not one is refused, reset or answered with an error, five replacements in a
// row.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn five_upgrades_in_a_row_refuse_nothing() {
    let blob = FakeIdentity::named("blob");
    let mut node = Node::new("rs-upgrade", vec![blob.clone()]);
    let uids: Vec<String> = (0..3).map(|_| pod_uid()).collect();
    let bound: Vec<(String, usize)> = uids.iter().map(|u| (u.clone(), 0)).collect();
    node.write_manifest("pods.yaml", &bound_pods_manifest(NS, std::slice::from_ref(&blob), &bound));
    let pods: Vec<TestPod> = uids.iter().map(|u| node.pod(u)).collect();
    let metrics = SocketAddr::from(METRICS).to_string();
    let args = ["--metrics", metrics.as_str()];
    let mut agent_pod = node.host_network_pod(&pod_uid());
    node.start_agent_as_pod(&agent_pod, &args);
    let mut agent = node.agent.take().expect("agent");
    wait_ready(&node);

    let query = format!("api-version=2018-02-01&resource={}", urlencode(RESOURCE));
    // One pod keeps its connections open, as a long-lived SDK client does: the old agent
    // closes each after its next answer.
    let asking: Vec<RunningProbe> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            let burst = Burst {
                count: (ASKING.as_secs_f64() * ASK_RATE) as usize,
                concurrency: 8,
                per_second: Some(ASK_RATE),
                keep_alive: i == 0,
            };
            Probe::new(pod.ns(&node), &pod.ctr).paced_burst(
                SocketAddrV4::new(IMDS_IP, 80),
                burst,
                std::slice::from_ref(&query),
            )
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    for round in 1..=5 {
        let next_pod = node.host_network_pod(&pod_uid());
        let next = node.spawn_agent_as_pod(&next_pod, &args);
        next.wait_for_log(AGENT_READY, Duration::from_secs(30));
        next.wait_for_log("took the node over from the earlier agent, which drains", Duration::from_secs(1));
        // The kubelet's exec probes ask each pod's own agent: the old one is alive but no
        // longer ready (were it not alive, the kubelet would restart it, and it would take
        // the node back), the new one is ready.
        if round == 1 {
            let handed = health(&agent, true);
            assert!(handed.0 == 1 && handed.1.starts_with("not ready: handed over to the next agent"), "{handed:?}");
            assert_eq!(health(&agent, false), (0, "ok".to_owned()));
            assert_eq!(health(&next, true), (0, "ready".to_owned()));
        }
        // The DaemonSet controller stops the old pod once the new one is ready.
        let exited = agent.terminate(Duration::from_secs(40));
        assert!(
            exited.is_some_and(|s| s.success()),
            "round {round}: the old agent exits cleanly on SIGTERM: {exited:?}"
        );
        agent.wait_for_log("exiting; the next agent serves this node", Duration::from_secs(1));
        (agent, agent_pod) = (next, next_pod);
        std::thread::sleep(Duration::from_millis(500));
    }
    let replaced_in = started.elapsed();
    assert!(replaced_in + Duration::from_secs(3) < ASKING, "the pods asked throughout ({replaced_in:?})");

    let reports: Vec<_> = asking.into_iter().map(|p| p.wait().burst.expect("a burst report")).collect();
    let asked: usize = reports.iter().map(|r| r.requests).sum();
    let served: usize = reports.iter().map(|r| r.statuses.get(&200).copied().unwrap_or(0)).sum();
    println!(
        "five upgrades in {:.1} s: {asked} token requests from {} pods, {served} served, {} failed",
        replaced_in.as_secs_f64(),
        reports.len(),
        asked - served
    );
    for report in &reports {
        assert_eq!(report.statuses.get(&200), Some(&report.requests), "{report:?}");
        assert!(report.retried.is_empty() && report.failures.is_empty(), "not even one retry: {report:?}");
        assert_eq!(report.wrong_tokens, 0, "{report:?}");
    }
    let counters = kernel_counters(&node);
    assert_eq!(counters["connect_deny"], 0, "nothing refused in the kernel: {counters}");
    drop((agent, agent_pod, pods));
}

// Item 3: a retired agent's container restarts (a crash, an OOM kill) before its pod is
// stopped. The old version must not take the node back from its successor: the rollout would
// stall on it, and the successor would idle.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_retired_agent_restarted_in_its_pod_does_not_take_the_node_back() {
    let blob = FakeIdentity::named("blob");
    let mut node = Node::new("rs-retired", vec![blob.clone()]);
    let web_uid = pod_uid();
    node.write_manifest("pods.yaml", &bound_pods_manifest(NS, std::slice::from_ref(&blob), &[(web_uid.clone(), 0)]));
    let web = node.pod(&web_uid);
    let metrics = SocketAddr::from(METRICS).to_string();
    let old_pod = node.host_network_pod(&pod_uid());
    // As the DaemonSet passes it (downward API).
    let old_uid = ["--pod-uid", old_pod.uid.as_str()];
    node.start_agent_as_pod(&old_pod, &[&["--metrics", metrics.as_str()], &old_uid[..]].concat());
    let mut old = node.agent.take().expect("agent");
    let new_pod = node.host_network_pod(&pod_uid());
    let new = node.spawn_agent_as_pod(&new_pod, &["--metrics", &metrics]);
    new.wait_for_log(AGENT_READY, Duration::from_secs(30));
    old.wait_for_log("drained; idle until stopped", Duration::from_secs(35));

    old.kill();
    let socket = old.control_socket.display().to_string();
    let restarted = node.spawn_agent_as_pod(
        &old_pod,
        &[&["--metrics", metrics.as_str(), "--control-socket", &socket], &old_uid[..]].concat(),
    );
    restarted.wait_for_log(
        "this pod's agent handed its node over to a newer agent: it takes the node only if that agent exits",
        Duration::from_secs(15),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(!restarted.log_lines().iter().any(|l| l["message"] == AGENT_READY), "it took nothing");
    assert_eq!(health(&new, true), (0, "ready".to_owned()), "the successor still serves");
    assert_eq!(token(&node, &web).status, 200);
    drop((restarted, new, old, old_pod, new_pod, web));
}

/// `imds-agent health [--ready]` against `agent`'s control socket: exit code and sentence.
fn health(agent: &imds_tests::AgentProcess, ready: bool) -> (i32, String) {
    let socket = agent.control_socket.display().to_string();
    let mut args = vec!["health", "--agent-socket", &socket];
    if ready {
        args.push("--ready");
    }
    let out = std::process::Command::new(imds_tests::agent_binary()).args(&args).output().expect("imds-agent health");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn urlencode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}
