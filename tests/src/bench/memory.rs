//! P7: the agent's resident memory on a big node — 10,000 pod cgroups in the kubelet's
//! layout and 1,000 bindings — measured on the real binary once it has synced its kernel
//! verdicts for all of them. The full run also measures the node of `docs/scale.md`'s
//! cluster (110 pods, with the whole cluster's 2,000 identities and 10,000 bindings), from a
//! manifests directory and from the Kubernetes API (the fake API server, with the cluster's
//! 20,000 ServiceAccounts and 2,000 Namespaces too).
use std::{fmt::Write as _, net::SocketAddrV4, time::Duration};

use serde_json::{json, Value};

use super::{Effort, Figure, Measured};
use crate::{
    fake_kube::FakeKube,
    node::{Node, KUBE_NODE},
    Server,
};

/// What the agent holds.
#[derive(Clone, Copy, Debug)]
struct Load {
    pods: usize,
    identities: usize,
    bindings: usize,
    service_accounts: usize,
    namespaces: usize,
}

/// Where the agent reads its policy from.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    Manifests,
    Api,
}

/// What `kubectl apply` and the API server leave on an object: its last-applied copy as an
/// annotation (as big as the object) and a `managedFields` entry. The agent must not keep
/// them.
fn as_applied(mut object: Value) -> Value {
    let (applied, api_version) = (object.to_string(), object["apiVersion"].clone());
    let meta = &mut object["metadata"];
    meta["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = json!(applied);
    meta["managedFields"] = json!([{
        "manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": api_version,
        "time": "2026-11-01T08:00:00Z", "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
                                    "f:labels": {".": {}}},
                     "f:spec": {".": {}}}
    }]);
    meta["creationTimestamp"] = json!("2026-11-01T08:00:00Z");
    object
}

/// The policy objects of `load`: bindings spread over the identities (and 50 namespaces);
/// every tenth pod unbound, the others spread over the bindings (`--deny-unbound` makes the
/// unbound ones kernel entries).
fn objects(load: Load) -> Vec<Value> {
    let Load { pods, identities, bindings, service_accounts, namespaces } = load;
    let ns = |i: usize| format!("ns{}", i % 50);
    let identities = (0..identities).map(|i| {
        json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
               "metadata": {"name": format!("id{i}"), "namespace": ns(i)},
               "spec": {"type": 0, "clientID": format!("client-{i}"),
                        "resourceID": format!("/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id{i}")}})
    });
    let bindings = (0..bindings).map(|b| {
        let i = b % load.identities; // same namespace as its identity
        json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
               "metadata": {"name": format!("b{b}"), "namespace": ns(i)},
               "spec": {"azureIdentity": format!("id{i}"), "selector": format!("sel{b}")}})
    });
    let pods = (0..pods).map(|p| {
        let b = p % load.bindings;
        let labels = if p % 10 == 0 { json!({"app": "unbound"}) } else { json!({"aadpodidbinding": format!("sel{b}")}) };
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": format!("pod{p}"), "namespace": ns(b % load.identities), "uid": pod_uid(p), "labels": labels},
               "spec": {"nodeName": KUBE_NODE, "serviceAccountName": "default",
                        "containers": [{"name": "app", "image": "registry.example.com/app:1.0",
                                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]},
               "status": {"phase": "Running", "podIP": "10.244.1.10", "hostIP": "10.0.0.4",
                          "conditions": [{"type": "Ready", "status": "True"}]}})
    });
    let accounts = (0..service_accounts).map(|s| {
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": format!("sa{s}"), "namespace": ns(s),
                            "annotations": {"azure.workload.identity/client-id": format!("wi-client-{s}")}}})
    });
    // Namespaces as tenants' are labelled and annotated; every fourth is scoped.
    let namespaces = (0..namespaces).map(|n| {
        let mut annotations = json!({"scheduler.alpha.kubernetes.io/node-selector": "pool=general",
                                     "team.example.com/cost-center": format!("cc-{n}")});
        if n % 4 == 0 {
            annotations["imds-filter.io/identity-scope"] = json!(format!("client-{n}-*, /subscriptions/s/resourceGroups/rg-{n}/**"));
        }
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": format!("tenant{n}"), "annotations": annotations,
                            "labels": {"kubernetes.io/metadata.name": format!("tenant{n}"), "team": format!("team-{n}")}},
               "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
    });
    identities.chain(bindings).chain(pods).chain(accounts).chain(namespaces).map(as_applied).collect()
}

fn pod_uid(i: usize) -> String {
    format!("{:08x}-0000-4000-8000-{i:012x}", std::process::id())
}

/// Resident and peak memory, MiB, and what the verdict sync reported.
fn measure(load: Load, source: Source) -> (f64, f64, Value) {
    let mut node = Node::new("bench-p7", vec![]);
    let objects = objects(load);
    let api = match source {
        Source::Manifests => {
            // JSON is YAML. A manifests file holds at most 1,024 documents (the YAML
            // parser's budget): split.
            for (i, chunk) in objects.chunks(1000).enumerate() {
                let text: Vec<String> = chunk.iter().map(Value::to_string).collect();
                node.write_manifest(&format!("policy-{i:03}.yaml"), &text.join("\n---\n"));
            }
            None
        }
        Source::Api => {
            let api = FakeKube::serve(Server::bind(&node.ns, SocketAddrV4::new([10, 233, 0, 1].into(), 6443)));
            for object in objects {
                api.apply(object);
            }
            Some(api)
        }
    };
    let cgroups: Vec<_> = (0..load.pods).map(|i| node.kubepods.child(&format!("pod{}", pod_uid(i)))).collect();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let agent = match &api {
        None => node.start_agent(&["--deny-unbound"]),
        Some(api) => node.start_agent_kube(&api.kubeconfig(dir.path()), &["--deny-unbound"]),
    };
    agent.wait_for_log("kernel verdicts in place", Duration::from_mins(1));
    let synced =
        agent.log_lines().iter().find(|l| l["message"] == "kernel verdicts in place").cloned().unwrap_or_default();
    // Let the verdict sync run a few more of its one-second passes.
    std::thread::sleep(Duration::from_secs(3));
    let (rss, peak) = (agent.rss(), agent.peak_rss());
    node.agent = None; // stop it before its cgroups go
    drop(cgroups);
    (mib(rss), mib(peak), synced)
}

fn mib(bytes: u64) -> f64 {
    f64::from(u32::try_from(bytes >> 10).unwrap_or(u32::MAX)) / 1024.0
}

/// P7.
///
/// # Panics
/// When the agent cannot start.
pub fn run(effort: Effort) -> Figure {
    let quick = effort.connects < 1000;
    let big = if quick {
        Load { pods: 200, identities: 20, bindings: 20, service_accounts: 0, namespaces: 0 }
    } else {
        Load { pods: 10_000, identities: 1_000, bindings: 1_000, service_accounts: 0, namespaces: 0 }
    };
    let (rss, peak, synced) = measure(big, Source::Manifests);
    let figure = Figure::new(
        "P7",
        format!("agent RSS, {} pod cgroups and {} bindings", big.pods, big.bindings),
        "MiB",
        "≤ 64 MiB",
    );
    let mut summary = format!(
        "peak {peak:.1} MiB; the verdict sync saw {} pod cgroups and set {} entries",
        synced["pod_cgroups"], synced["set"]
    );
    // The per-object costs docs/scale.md builds on (the quick run checks the API path works).
    let others: &[(Load, Source)] = if quick {
        &[(Load { pods: 20, identities: 20, bindings: 20, service_accounts: 20, namespaces: 20 }, Source::Api)]
    } else {
        let floor = Load { pods: 0, identities: 1, bindings: 1, service_accounts: 0, namespaces: 0 };
        let scale = Load { pods: 110, identities: 2_000, bindings: 10_000, service_accounts: 0, namespaces: 0 };
        &[
            (floor, Source::Manifests),
            (scale, Source::Manifests),
            (floor, Source::Api),
            (Load { service_accounts: 20_000, namespaces: 2_000, ..scale }, Source::Api),
        ]
    };
    for &(load, source) in others {
        let (rss, peak, _) = measure(load, source);
        let from = if source == Source::Api { "from the API" } else { "from manifests" };
        let _ = write!(
            summary,
            "; {from}, {} pods, {} identities, {} bindings, {} ServiceAccounts and {} Namespaces: {rss:.1} MiB (peak {peak:.1})",
            load.pods, load.identities, load.bindings, load.service_accounts, load.namespaces
        );
    }
    figure.measured(Measured::of(vec![rss]), None).judged(peak <= 64.0).noted(summary)
}
