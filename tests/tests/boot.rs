//! A node booting: `imds-agent guard` runs before the kubelet (a systemd unit ordered before
//! `kubelet.service`), so that pods the kubelet starts before the agent is up reach the
//! metadata service with no identity at all, and the agent then takes the guard's links
//! over with no moment in between. Needs root; run with `cargo xtask test`.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use imds_tests::{
    fake_imds::{token_for, FakeIdentity},
    node::{bound_pods_manifest, curl_within, pod_uid, Node, AGENT_ADDR},
    run_in, Probe, AGENT_READY, IMDS_IP,
};

const TOKEN: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";
const RESOURCE: &str = "https://vault.azure.net";

/// `imds-agent guard` for `node`, run as systemd would: in the node's namespace, outside the
/// pod hierarchy. Its exit status and what it printed.
fn guard(node: &Node) -> (bool, String) {
    let (agent, pins, kubepods) =
        (imds_tests::agent_binary(), node.pins.path.display().to_string(), node.kubepods.path.display().to_string());
    let listen = AGENT_ADDR.to_string();
    let command =
        [agent.to_str().expect("UTF-8"), "guard", "--attach-cgroup", &kubepods, "--bpffs", &pins, "--listen", &listen];
    let (_, out) = run_in(&node.ns, &node.root, &command);
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

// Issue #16: guard first (the kubelet's pod cgroup does not exist yet), then pod cgroups,
// then an IMDS attempt (refused), then the agent (served); a pod asking all along never
// reaches the metadata service on its own, and never fails open.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_booting_node_is_guarded_before_the_kubelet_and_the_agent_takes_over_with_no_gap() {
    let blob = FakeIdentity::named("blob");
    let node = Node::new("boot", vec![blob.clone()]);
    let web_uid = pod_uid();
    node.write_manifest("pods.yaml", &bound_pods_manifest("app", std::slice::from_ref(&blob), &[(web_uid.clone(), 0)]));
    // The kubelet has not started: no pod hierarchy yet.
    std::fs::remove_dir(&node.kubepods.path).expect("an empty kubepods to take away");

    let (ok, said) = guard(&node);
    assert!(ok, "{said}");
    assert!(said.contains("(created it)"), "the guard made the pod hierarchy: {said}");
    assert!(node.kubepods.path.is_dir());

    // The kubelet starts a pod before the agent runs: its metadata connection is refused.
    let web = node.pod(&web_uid);
    let refused = Probe::new(web.ns(&node), &web.ctr).connect(IMDS_IP, 80, false).wait();
    assert_eq!(refused.errno, Some(libc::EPERM), "refused in the kernel: {refused:?}");

    // The pod keeps asking while the agent starts: each answer is a refusal or its own token.
    let asking = Arc::new(AtomicBool::new(true));
    let outcomes = std::thread::scope(|scope| {
        let ask = scope.spawn(|| {
            let mut outcomes = Vec::new();
            while asking.load(Ordering::Relaxed) {
                let fetched = curl_within(&node, &web, SocketAddr::from((IMDS_IP, 80)), TOKEN, &["Metadata: true"], 2);
                outcomes.push((fetched.status, fetched.curl_exit, fetched.body.clone()));
                std::thread::sleep(Duration::from_millis(20));
            }
            outcomes
        });
        std::thread::sleep(Duration::from_millis(300));
        let agent = node.spawn_agent(&[]);
        agent.wait_for_log(AGENT_READY, Duration::from_secs(30));
        // A few more answers from the agent serving.
        std::thread::sleep(Duration::from_millis(500));
        asking.store(false, Ordering::Relaxed);
        (ask.join().expect("the asking thread"), agent)
    });
    let (outcomes, _agent) = outcomes;
    let token = token_for(&blob.client_id, RESOURCE);
    // curl's exit 7: the connection was refused (the kernel's EPERM).
    let (refused, served): (Vec<_>, Vec<_>) = outcomes.iter().partition(|(status, _, _)| *status == 0);
    assert!(!refused.is_empty() && !served.is_empty(), "refused, then served: {outcomes:?}");
    assert!(refused.iter().all(|(_, exit, _)| *exit == 7), "refused at connect, nothing else: {outcomes:?}");
    assert!(served.iter().all(|(status, _, body)| *status == 200 && body.contains(&token)), "{outcomes:?}");
    let first_served = outcomes.iter().position(|(status, _, _)| *status == 200).expect("served");
    assert!(
        outcomes[first_served..].iter().all(|(status, _, _)| *status == 200),
        "no refusal once served: {outcomes:?}"
    );
    // Nothing reached the metadata service from the pod itself: every call came from the agent.
    let web_ip = web.ip.expect("a routed pod");
    assert!(node.fake.seen().iter().all(|s| s.peer.ip() != web_ip), "the pod reached IMDS on its own");

    // A guard run again (a systemd restart) leaves the serving agent alone.
    let (ok, said) = guard(&node);
    assert!(ok && said.contains("nothing to guard"), "{said}");
    let fetched = curl_within(&node, &web, SocketAddr::from((IMDS_IP, 80)), TOKEN, &["Metadata: true"], 5);
    assert_eq!(fetched.status, 200, "{fetched:?}");
    drop(web);
}
