//! `cargo xtask demo`: the agent on a node in miniature, in a few seconds.
//!
//! Builds a throwaway node (see `imds_tests::node`): a network namespace whose loopback
//! holds a fake IMDS on `169.254.169.254` (the real one cannot be used here), kubelet-style
//! pod cgroups, and one network namespace per pod. It loads the example manifests from
//! `deploy/examples/`, starts the real `imds-agent`, has each pod ask for a token with curl,
//! then has one pod ask for another pod's identity (refused: the demo exits 1 if it is not),
//! prints what each got and the decision log, then removes everything — also on a panic,
//! through the guards the tests use.
use std::{fs, net::SocketAddr, path::Path};

use imds_agent::sources::manifests;
use imds_tests::{
    fake_imds::FakeIdentity,
    node::{curl, with_pod_ips, Node},
    IMDS_IP,
};

const TOKEN: &str =
    "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fstorage.azure.com%2F";

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the demo loads eBPF programs and creates namespaces and cgroups: run it as root");
        std::process::exit(1);
    }
    if let Err(e) = imds_tests::check_built_binaries() {
        eprintln!("{e}");
        std::process::exit(1);
    }
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let policy = manifests::load_dir(&examples).unwrap_or_else(|e| panic!("{}: {e:#}", examples.display()));

    // The "VM" has the example identities assigned, as the operator would have done.
    let identities: Vec<FakeIdentity> = policy
        .identities()
        .map(|i| FakeIdentity {
            client_id: i.client_id.clone(),
            object_id: i.object_id.clone().unwrap_or_default(),
            resource_id: i.resource_id.clone(),
        })
        .collect();
    let mut node = Node::new("demo", identities);
    let mut pods: Vec<_> = policy.pods().cloned().collect();
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    let test_pods: Vec<_> = pods.iter().map(|p| node.pod(&p.uid)).collect();
    // The examples as they are, but each pod with the address the API server would report
    // for it (the node backstop lets the exception pod's address through).
    let ips: Vec<(&str, std::net::IpAddr)> =
        test_pods.iter().filter_map(|t| t.ip.map(|ip| (t.uid.as_str(), ip))).collect();
    for entry in fs::read_dir(&examples).expect("examples").filter_map(Result::ok) {
        let text = fs::read_to_string(entry.path()).expect("read example");
        let text = if text.contains("kind: Pod") { with_pod_ips(&text, &ips) } else { text };
        node.write_manifest(&entry.file_name().to_string_lossy(), &text);
    }
    node.start_agent(&[]);

    println!("imds-filter demo: a node in miniature\n");
    println!("  manifests       deploy/examples/ (aad-pod-identity's AzureIdentity, binding, exception; 3 pods)");
    println!("  metadata        169.254.169.254 in the node namespace: a fake IMDS with the example identity");
    println!("  agent           imds-agent run, attached to {}\n", node.kubepods.path.display());
    println!("  {:<15} {:<38} {:<7} result", "pod (shop/)", "labels", "status");
    for (pod, test_pod) in pods.iter().zip(&test_pods) {
        let before = node.fake.token_requests().len();
        let fetched = curl(&node, test_pod, SocketAddr::from((IMDS_IP, 80)), TOKEN, &["Metadata: true"]);
        let direct =
            node.fake.token_requests().get(before).is_some_and(|s| s.peer.ip().to_string().starts_with("10.232."));
        let result = match (fetched.status, direct) {
            (200, true) => "token from IMDS directly (exception: the kernel let it pass)".to_owned(),
            (200, false) => {
                let client = fetched.json()["client_id"].as_str().unwrap_or("?").to_owned();
                format!("token for identity {client}")
            }
            (_, _) => fetched.json()["error_description"].as_str().unwrap_or(&fetched.body).to_owned(),
        };
        let labels: Vec<String> = pod.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  {:<15} {:<38} {:<7} {result}", pod.name, labels.join(","), fetched.status);
    }

    // The attack the filter exists for: a pod asks for an identity bound to another pod.
    let (attacker, victim) = ("batch", "web");
    let stolen = policy.identities().next().expect("the examples declare an identity").client_id.clone();
    let attacker_pod = &test_pods[pods.iter().position(|p| p.name == attacker).expect("the examples' batch pod")];
    let before = node.fake.token_requests().len();
    let refused = curl(
        &node,
        attacker_pod,
        SocketAddr::from((IMDS_IP, 80)),
        &format!("{TOKEN}&client_id={stolen}"),
        &["Metadata: true"],
    );
    let imds_asked = node.fake.token_requests().len() > before;
    let held = refused.status == 400 && !imds_asked;
    println!("\n  an attack: {attacker} asks for {victim}'s identity by its client id ({stolen})");
    println!(
        "  {attacker:<15} {:<38} {:<7} {} — {}",
        "",
        refused.status,
        refused.json()["error_description"].as_str().unwrap_or(&refused.body),
        if held { "refused; IMDS never saw the request" } else { "NOT REFUSED: the filter let it through" }
    );

    println!("\n  decision log (the agent's stdout, one JSON object per request):");
    for d in node.agent().decisions() {
        let compact = serde_json::json!({
            "pod": format!("{}/{}", d["pod_namespace"].as_str().unwrap_or("?"), d["pod_name"].as_str().unwrap_or("?")),
            "pid": d["pid"], "verdict": d["verdict"], "identity": d["identity"], "reason": d["reason"], "status": d["status"],
        });
        println!("    {compact}");
    }
    drop(test_pods);
    drop(node);
    println!("\n  cleaned up: agent stopped, namespaces, cgroups and pinned programs removed");
    if !held {
        std::process::exit(1);
    }
}
