//! Restarts must never open the filter (issue #14): what the kernel holds while no agent runs
//! has to match the policy again before the next agent says it is ready.
//!
//! Real agent, real kernel programs, pods in their own namespaces; the fake IMDS and the fake
//! API server stand in for Azure's and Kubernetes' (neither can run here). Needs root; run
//! with `cargo xtask test`.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use imds_tests::{
    fake_imds::{http_get, FakeIdentity},
    fake_kube::FakeKube,
    node::{curl, pod_uid, status_yaml, Fetched, Node, TestPod},
    Server, IMDS_IP,
};
use serde_json::{json, Value};

const NS: &str = "app";
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
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: helper\n  namespace: {NS}\n  uid: {}\n  labels: {{role: helper}}\n{}",
        helper.uid,
        status_yaml(helper.ip)
    );
    let exception = format!(
        "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzurePodIdentityException\nmetadata:\n  name: helpers\n  namespace: {NS}\nspec:\n  podLabels:\n    role: helper\n"
    );
    node.write_manifest("pod.yaml", &pod);
    node.write_manifest("exception.yaml", &exception);
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
    let api = FakeKube::serve(Server::bind(&node.ns, std::net::SocketAddrV4::new(API.0.into(), API.1)));
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
