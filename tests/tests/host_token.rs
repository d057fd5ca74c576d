//! NMI's `/host/token` for the Secrets Store CSI driver's Azure provider (issue #17), end to
//! end: the real agent serves it on loopback, and a stand-in provider — curl in a hostNetwork
//! pod's cgroup, asking as the provider asks (`GET /host/token/?resource=…` with `podns` and
//! `podname` headers) — gets the named pod's token in NMI's shape. Everyone else is refused:
//! a hostNetwork pod of another ServiceAccount sending the same headers, a node process, and
//! a process in a cgroup named like the provider's pod outside the kubelet's hierarchy, and
//! the trusted caller itself for a pod the policy does not bind (audited or not). The caller
//! is who the kernel's socket table says made the connection, never what it claims. Needs
//! root; run with `cargo xtask test`.
use std::net::SocketAddr;

use imds_tests::{
    fake_imds::{http_get, token_for, FakeIdentity},
    fixtures::{self, Manifest},
    node::{curl, pod_uid, Fetched, Node, TestPod},
    run_in,
};

const RESOURCE: &str = "https://vault.azure.net";
const LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 2579);
/// As the provider spells it: the resource not encoded.
const ASK: &str = "/host/token/?resource=https://vault.azure.net";

fn ask(node: &Node, from: &TestPod, namespace: &str, name: &str) -> Fetched {
    let (podns, podname) = (format!("podns: {namespace}"), format!("podname: {name}"));
    curl(node, from, SocketAddr::from(LISTEN), ASK, &[&podns, &podname])
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn the_csi_provider_gets_a_pods_token_and_nobody_else_does() {
    let blob = FakeIdentity::named("blob");
    let mut node = Node::new("host-token", vec![blob.clone()]);
    let uids: Vec<String> = (0..5).map(|_| pod_uid()).collect();
    let [provider, imposter, web, plain, staged] = [0, 1, 2, 3, 4].map(|i| node.host_network_pod(&uids[i]));
    let policy = Manifest::new()
        .with(&fixtures::identity("app", "blob", &blob))
        .with(&fixtures::binding("app", "blob-binding", "blob", "blob"))
        .with(&fixtures::pod("csi", "provider", &uids[0]).service_account("provider").host_network())
        .with(&fixtures::pod("csi", "imposter", &uids[1]).host_network())
        .with(&fixtures::pod("app", "web", &uids[2]).bound_to("blob").host_network())
        .with(&fixtures::pod("app", "plain", &uids[3]).host_network())
        .with(&fixtures::namespace("staging", &[("imds-filter.io/mode", "audit")]))
        .with(&fixtures::pod("staging", "staged", &uids[4]).host_network());
    node.write_manifest("policy.yaml", policy.as_str());
    node.start_agent(&["--host-token-listen", "127.0.0.1:2579", "--host-token-caller", "csi/provider"]);

    // The provider, for a bound pod: NMI's answer, with the pod's identity.
    let served = ask(&node, &provider, "app", "web");
    assert_eq!(served.status, 200, "{served:?}");
    let answer = served.json();
    assert_eq!(answer["token"]["access_token"], token_for(&blob.client_id, RESOURCE), "{answer}");
    assert_eq!(answer["clientid"], blob.client_id.as_str());
    assert!(answer["token"]["expires_on"].as_str().is_some_and(|e| e.parse::<u64>().is_ok()), "{answer}");
    let decisions = node.agent().decisions();
    let allowed = decisions.last().expect("a decision");
    assert_eq!((allowed["verdict"].as_str(), allowed["pod_name"].as_str()), (Some("allow"), Some("web")));
    assert!(allowed["reason"].as_str().unwrap_or_default().starts_with("/host/token from csi/provider"), "{allowed}");
    let fetched = node.fake.token_requests().len();

    // The provider, for a pod bound to nothing, or not on this node: 404, nothing fetched.
    assert_eq!(ask(&node, &provider, "app", "plain").status, 404);
    assert_eq!(node.agent().decisions().last().expect("a decision")["verdict"], "deny");
    assert_eq!(ask(&node, &provider, "app", "elsewhere").status, 404);
    // Audit does not apply here: an audited namespace's unbound pod gets nothing either.
    assert_eq!(ask(&node, &provider, "staging", "staged").status, 404);
    // Without the headers: 400.
    assert_eq!(curl(&node, &provider, SocketAddr::from(LISTEN), ASK, &[]).status, 400);

    // Another hostNetwork pod, of the provider's namespace but another ServiceAccount, with
    // the same headers: 403.
    let refused = ask(&node, &imposter, "app", "web");
    assert_eq!(refused.status, 403, "{refused:?}");
    assert!(refused.body.contains("not a trusted /host/token caller"), "{refused:?}");
    // The pod named, asking for itself this way: 403 too (it has the metadata address).
    assert_eq!(ask(&node, &web, "app", "web").status, 403);
    // A node process, outside every pod: 403.
    let (status, body) = node
        .ns
        .enter(|| http_get(SocketAddr::from(LISTEN), ASK, &[("podns", "app"), ("podname", "web")]).unwrap_or_default());
    assert_eq!(status, 403, "{body}");
    // A process in a cgroup it named like the provider's pod, outside the kubelet's
    // hierarchy (as a delegated subtree allows): 403.
    let lookalike = node.root.child(&format!("pod{}", uids[0]));
    let url = format!("http://127.0.0.1:2579{ASK}");
    let curl =
        ["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", "-H", "podns: app", "-H", "podname: web"];
    let command: Vec<&str> = curl.iter().copied().chain([url.as_str()]).collect();
    let (_, out) = run_in(&node.ns, &lookalike, &command);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403", "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(node.fake.token_requests().len(), fetched, "no refusal fetched a token");
    drop((provider, imposter, web, plain, staged));
}

/// A pod of the fake API server's, on this node.
fn api_pod(pod: fixtures::PodBuilder) -> serde_json::Value {
    let mut object = serde_json::to_value(pod.build()).expect("a pod as JSON");
    object["spec"]["nodeName"] = serde_json::json!(imds_tests::node::KUBE_NODE);
    object
}

// The same from the API source (the fake API server; a real one cannot run here): the
// provider's pod, the pod it names and the policy come from watches; a pod the provider names
// before the watch has brought it is waited for.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn the_csi_provider_is_served_from_the_api_source() {
    let blob = FakeIdentity::named("blob");
    let mut node = Node::new("host-token-k", vec![blob.clone()]);
    let api = imds_tests::fake_kube::FakeKube::serve(imds_tests::Server::bind(
        &node.ns,
        std::net::SocketAddrV4::new([10, 233, 0, 1].into(), 6443),
    ));
    api.apply(serde_json::to_value(fixtures::identity("app", "blob", &blob)).unwrap());
    api.apply(serde_json::to_value(fixtures::binding("app", "blob-binding", "blob", "blob")).unwrap());
    let uids: Vec<String> = (0..3).map(|_| pod_uid()).collect();
    let [provider, imposter, web] = [0, 1, 2].map(|i| node.host_network_pod(&uids[i]));
    api.apply(api_pod(fixtures::pod("csi", "provider", &uids[0]).service_account("provider").host_network()));
    api.apply(api_pod(fixtures::pod("csi", "imposter", &uids[1]).host_network()));
    let dir = tempfile::tempdir().unwrap();
    let trusted = ["--host-token-listen", "127.0.0.1:2579", "--host-token-caller", "csi/provider"];
    node.start_agent_kube(&api.kubeconfig(dir.path()), &trusted);
    // The pod appears while the provider asks.
    let named = std::thread::scope(|scope| {
        let asking = scope.spawn(|| ask(&node, &provider, "app", "web"));
        std::thread::sleep(std::time::Duration::from_millis(300));
        api.apply(api_pod(fixtures::pod("app", "web", &uids[2]).bound_to("blob").host_network()));
        asking.join().expect("the provider's request")
    });
    assert_eq!(named.status, 200, "{named:?}");
    assert_eq!(named.json()["token"]["access_token"], token_for(&blob.client_id, RESOURCE));
    assert_eq!(ask(&node, &imposter, "app", "web").status, 403);
    drop((provider, imposter, web));
}
