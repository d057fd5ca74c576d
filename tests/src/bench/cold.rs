//! P9: a new pod's first token while the API server's watches lag, with the real agent
//! (`--kube`) against the fake API server (a real one cannot run here; see `fake_kube`),
//! through the real Azure SDK for Python.
//!
//! Two nodes side by side, each with its own agent and API server, whose watches deliver every
//! change [`WATCH_LAG`] late while lists answer at once (an API server whose fan-out to its
//! watchers lags its cache). On one node the agent looks up pods the watch has not brought
//! (`--pod-lookup-interval 500ms`, the default); on the other it only waits for the watch
//! (`0s`). In each round a new bound pod appears on each node, in alternating order, and asks
//! for its first token at once with `ManagedIdentityCredential.get_token`; the figure is the
//! SDK's own measure of that call (the interpreter's start is not counted).
use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::{percentile, Effort, Figure, Measured};
use crate::{
    fake_imds::FakeIdentity,
    fake_kube::FakeKube,
    fixtures,
    node::{pod_uid, sdk, Node, KUBE_NODE},
    Server,
};

const NS: &str = "bench";
/// How late watches are. The API server's watch latency under load is of this order; it is
/// longer than the SDKs' 1–2 s IMDS probe timeouts, which is what makes it matter.
const WATCH_LAG: Duration = Duration::from_secs(2);
/// Where each node's fake API server listens, in the node's namespace.
const API: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 233, 0, 1), 6443);

/// One node: its agent, its API server, and the kubeconfig the agent uses.
struct ColdNode {
    node: Node,
    api: FakeKube,
    _dir: tempfile::TempDir,
}

impl ColdNode {
    fn start(tag: &str, id: &FakeIdentity, lookup_interval: &str) -> ColdNode {
        let mut node = Node::new(tag, vec![id.clone()]);
        let api = FakeKube::serve(Server::bind(&node.ns, API));
        api.apply(as_json(&fixtures::identity(NS, "bench", id)));
        api.apply(as_json(&fixtures::binding(NS, "bench-binding", "bench", "bench")));
        let dir = tempfile::tempdir().expect("tempdir");
        node.start_agent_kube(&api.kubeconfig(dir.path()), &["--pod-lookup-interval", lookup_interval]);
        wait_for_sync(&node, &api);
        api.set_watch_delay(WATCH_LAG);
        ColdNode { node, api, _dir: dir }
    }

    /// A new bound pod's first token: the SDK's seconds.
    fn first_token(&self, n: usize) -> f64 {
        let uid = pod_uid();
        let pod = self.node.pod(&uid);
        let name = format!("job-{n}");
        self.api.apply(bound_pod(&name, &uid));
        let out = sdk(&self.node, &pod, &["managed"]);
        assert_eq!(out["result"], "token", "the SDK's first get_token: {out}");
        self.api.delete("v1", "Pod", NS, &name);
        out["seconds"].as_f64().expect("the SDK's timing")
    }
}

/// Until the agent's policy has the identity: a pod that is already known gets its token.
fn wait_for_sync(node: &Node, api: &FakeKube) {
    let uid = pod_uid();
    let pod = node.pod(&uid);
    api.apply(bound_pod("warm", &uid));
    let started = Instant::now();
    while sdk(node, &pod, &["managed"])["result"] != "token" {
        assert!(started.elapsed() < Duration::from_secs(30), "the agent never synced");
    }
    api.delete("v1", "Pod", NS, "warm");
}

/// A pod on this node, bound to the bench identity, as the API server holds it.
fn bound_pod(name: &str, uid: &str) -> Value {
    let mut pod = as_json(&fixtures::pod(NS, name, uid).bound_to("bench"));
    pod["spec"]["nodeName"] = json!(KUBE_NODE);
    pod
}

fn as_json(object: &impl serde::Serialize) -> Value {
    serde_json::to_value(object).expect("an object as JSON")
}

/// P9.
///
/// # Panics
/// When an agent cannot start or a pod gets no token.
pub fn run(effort: Effort) -> Figure {
    let pods = if effort.connects < 1000 { 2 } else { 40 };
    let figure = Figure::new(
        "P9",
        format!("a new pod's first token (Python SDK), watch {} s late, with pod lookups", WATCH_LAG.as_secs()),
        "s",
        "p99 < 1 s",
    );
    let id = FakeIdentity::named("bench");
    let looking = ColdNode::start("bench-p9a", &id, "500ms");
    let waiting = ColdNode::start("bench-p9b", &id, "0s");
    let (mut with, mut without) = (Vec::with_capacity(pods), Vec::with_capacity(pods));
    for n in 0..pods {
        if n % 2 == 0 {
            with.push(looking.first_token(n));
            without.push(waiting.first_token(n));
        } else {
            without.push(waiting.first_token(n));
            with.push(looking.first_token(n));
        }
    }
    let (p99_with, p99_without) = (percentile(&with, 99), percentile(&without, 99));
    figure
        .measured(Measured::of(with), Some(("waiting for the watch (lookups off)".into(), Measured::of(without))))
        .judged(p99_with < 1.0)
        .noted(format!(
            "{pods} pods per node; p99 {p99_with:.3} s with lookups, {p99_without:.3} s waiting for the watch"
        ))
}
