//! Operator tools (issue #8): `imds-agent status` against a running agent, against pinned
//! state with the agent killed, and with nothing attached. Real agent, real kernel programs,
//! the fake IMDS (the real one cannot run here). Needs root; run with `cargo xtask test`.
use std::net::{Ipv4Addr, SocketAddrV4};

use imds_tests::{
    agent_binary,
    fake_imds::FakeIdentity,
    node::{bound_pods_manifest, pod_uid, Node},
    run_in,
};

const METRICS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 233, 0, 1), 9405);

/// `imds-agent status --output json` from the node namespace, outside the filtered hierarchy:
/// its exit status and its JSON.
fn status(node: &Node) -> (Option<i32>, serde_json::Value) {
    let agent = agent_binary();
    let pins = node.pins.path.display().to_string();
    let command =
        [agent.to_str().unwrap(), "status", "--bpffs", &pins, "--agent", &METRICS.to_string(), "--output", "json"];
    let (_, out) = run_in(&node.ns, &node.root, &command);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), json)
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn status_tells_protected_from_fail_closed_from_unprotected() {
    let blob = FakeIdentity::named("blob");
    let mut node = Node::new("op-status", vec![blob.clone()]);
    let web_uid = pod_uid();
    node.write_manifest("policy.yaml", &bound_pods_manifest("app", &[blob], &[(web_uid.clone(), 0)]));
    let web = node.pod(&web_uid);
    node.start_agent(&["--metrics", &METRICS.to_string()]);

    // Running: protected, every hook holds exactly the pinned program, the agent answers.
    let (code, s) = status(&node);
    assert_eq!((code, s["protection"].as_str()), (Some(0), Some("protected")), "{s:#}");
    assert_eq!(s["attach_cgroup_id"], node.kubepods.id(), "{s:#}");
    let hooks = s["hooks"].as_array().expect("hooks");
    assert_eq!(hooks.len(), 6, "{s:#}");
    assert!(hooks.iter().all(|h| h["ok"] == true && h["attached"].as_array().map(Vec::len) == Some(1)), "{s:#}");
    assert_eq!(s["protected_endpoints"][0], "169.254.169.254:80", "{s:#}");
    assert_eq!(s["default_verdict"], "redirect", "{s:#}");
    assert_eq!((s["agent"]["ready"].as_bool(), s["agent"]["mode"].as_str()), (Some(true), Some("enforce")), "{s:#}");
    assert_eq!(s["agent"]["policy"]["pods"], 1, "{s:#}");
    assert!(s["problems"].as_array().is_some_and(Vec::is_empty), "{s:#}");
    // The same for people.
    let agent = agent_binary();
    let pins = node.pins.path.display().to_string();
    let text_status = [agent.to_str().unwrap(), "status", "--bpffs", &pins, "--agent", &METRICS.to_string()];
    let (_, out) = run_in(&node.ns, &node.root, &text_status);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(text.starts_with("protected: the filter is attached and the agent is serving\n"), "{text}");
    assert!(text.contains(&format!("(cgroup id {})", node.kubepods.id())), "{text}");

    // Killed: the pinned programs still hold the node, fail-closed, and status says so.
    node.agent.as_mut().expect("running").kill();
    let (code, s) = status(&node);
    assert_eq!((code, s["protection"].as_str()), (Some(1), Some("fail-closed")), "{s:#}");
    assert!(s["hooks"].as_array().expect("hooks").iter().all(|h| h["ok"] == true), "{s:#}");
    assert!(
        s["agent"].is_null() && s["agent_error"].as_str().is_some_and(|e| e.contains("no agent answered")),
        "{s:#}"
    );

    let (_, out) = run_in(&node.ns, &node.root, &text_status);
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));

    // Uninstalled: nothing attached, not protected.
    let (_, out) = run_in(&node.ns, &node.root, &[agent.to_str().unwrap(), "uninstall", "--bpffs", &pins]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, s) = status(&node);
    assert_eq!((code, s["protection"].as_str()), (Some(2), Some("unprotected")), "{s:#}");
    assert!(s["summary"].as_str().is_some_and(|t| t.contains("nothing is installed")), "{s:#}");
    drop(web);
}
