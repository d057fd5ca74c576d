//! The agent end to end: real kernel programs, the real `imds-agent` binary, real clients
//! (curl, the Python Azure SDK) inside pod namespaces and kubelet-style pod cgroups, and a
//! fake IMDS (the real one cannot run here; see `fake_imds`). Needs root; run with
//! `cargo xtask test`.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use imds_tests::{
    fake_imds::{token_for, FakeIdentity},
    fixtures::{self, Manifest},
    node::{curl, pod_uid, sdk, Fetched, Node, TestPod},
    Probe, IMDS_IP,
};

const NS: &str = "app";
const RESOURCE: &str = "https://vault.azure.net";
const TOKEN: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";
const MD: &str = "Metadata: true";

fn imds() -> SocketAddr {
    SocketAddr::from((IMDS_IP, 80))
}

fn identity_yaml(name: &str, id: &FakeIdentity) -> String {
    Manifest::new().with(&fixtures::identity_with_object_id(NS, name, id)).into_string()
}

fn binding_yaml(name: &str, identity: &str, selector: &str) -> String {
    Manifest::new().with(&fixtures::binding(NS, name, identity, selector)).into_string()
}

fn pod_yaml(name: &str, uid: &str, labels: &[(&str, &str)]) -> String {
    pod_yaml_at(name, uid, labels, None)
}

/// A pod manifest with the pod's address in `status.podIPs`.
fn pod_yaml_at(name: &str, uid: &str, labels: &[(&str, &str)], ip: Option<std::net::IpAddr>) -> String {
    let pod = labels.iter().fold(fixtures::pod(NS, name, uid), |pod, &(key, value)| pod.label(key, value));
    Manifest::new().with(&pod.ip(ip)).into_string()
}

fn exception_yaml(name: &str, key: &str, value: &str) -> String {
    Manifest::new().with(&fixtures::exception(NS, name, &[(key, value)])).into_string()
}

/// A node with identities "blob", "table" and "kv" assigned; "blob" bound to selector
/// `blob`, "table" and "kv" both to `multi`.
fn node(tag: &str) -> (Node, [FakeIdentity; 3]) {
    let ids = [FakeIdentity::named("blob"), FakeIdentity::named("table"), FakeIdentity::named("kv")];
    let node = Node::new(tag, ids.to_vec());
    let mut policy = String::new();
    for (name, id) in ["blob", "table", "kv"].iter().zip(&ids) {
        policy.push_str(&identity_yaml(name, id));
    }
    policy.push_str(&binding_yaml("blob-binding", "blob", "blob"));
    policy.push_str(&binding_yaml("table-binding", "table", "multi"));
    policy.push_str(&binding_yaml("kv-binding", "kv", "multi"));
    node.write_manifest("identities.yaml", &policy);
    (node, ids)
}

fn token(node: &Node, pod: &TestPod, selector: &str) -> Fetched {
    curl(node, pod, imds(), &format!("{TOKEN}{selector}"), &[MD])
}

fn assert_token_of(fetched: &Fetched, id: &FakeIdentity) {
    assert_eq!(fetched.status, 200, "{fetched:?}");
    assert_eq!(fetched.json()["access_token"], token_for(&id.client_id, RESOURCE), "{fetched:?}");
}

fn assert_identity_not_found(fetched: &Fetched) {
    assert_eq!(fetched.status, 400, "{fetched:?}");
    assert_eq!(
        fetched.json(),
        serde_json::json!({"error": "invalid_request", "error_description": "Identity not found"})
    );
}

// 1, 2, 5
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn bound_pods_get_their_identities_and_nothing_else() {
    let (mut node, [blob, table, kv]) = node("bound");
    let (web_uid, multi_uid) = (pod_uid(), pod_uid());
    node.write_manifest(
        "pods.yaml",
        &(pod_yaml("web", &web_uid, &[("aadpodidbinding", "blob")])
            + &pod_yaml("multi", &multi_uid, &[("aadpodidbinding", "multi")])),
    );
    let (web, multi) = (node.pod(&web_uid), node.pod(&multi_uid));
    node.start_agent(&[]);

    // 1. The bound pod gets its identity's token; upstream saw exactly that identity, once
    // (the second answer comes from the node-wide cache).
    assert_token_of(&token(&node, &web, ""), &blob);
    assert_token_of(&token(&node, &web, &format!("&client_id={}", blob.client_id)), &blob);
    let upstream = node.fake.token_requests();
    assert_eq!(upstream.len(), 1);
    assert_eq!(upstream[0].param("client_id").as_deref(), Some(blob.client_id.as_str()));
    assert!(!upstream[0].peer.ip().to_string().starts_with("10.232."), "via the agent: {:?}", upstream[0].peer);

    // 2. Another identity, by any selector: IMDS's own refusal, and nothing goes upstream.
    for selector in [
        format!("&client_id={}", table.client_id),
        format!("&object_id={}", table.object_id),
        format!("&mi_res_id={}", form_urlencoded::byte_serialize(table.resource_id.as_bytes()).collect::<String>()),
        format!("&msi_res_id={}", form_urlencoded::byte_serialize(kv.resource_id.as_bytes()).collect::<String>()),
    ] {
        assert_identity_not_found(&token(&node, &web, &selector));
    }
    assert_eq!(node.fake.token_requests().len(), 1);

    // 5. Two identities on one selector: the selector picks; none given -> the first by name ("kv").
    assert_token_of(&token(&node, &multi, &format!("&client_id={}", table.client_id)), &table);
    assert_token_of(&token(&node, &multi, &format!("&object_id={}", kv.object_id)), &kv);
    assert_token_of(&token(&node, &multi, ""), &kv);
    assert_identity_not_found(&token(&node, &multi, &format!("&client_id={}", blob.client_id)));

    // Every answer is in the decision log, as JSON, naming pod, caller and identity.
    let decisions = node.agent().decisions();
    assert_eq!(decisions.len(), 10);
    let first = &decisions[0];
    assert_eq!((first["pod_namespace"].as_str(), first["pod_name"].as_str()), (Some(NS), Some("web")));
    assert_eq!((first["verdict"].as_str(), first["identity"].as_str()), (Some("allow"), Some("app/blob")));
    assert_eq!((first["upstream_status"].as_u64(), first["token_from"].as_str()), (Some(200), Some("upstream")));
    assert_eq!(decisions[1]["token_from"], "cache");
    assert!(first["pid"].as_u64().is_some_and(|p| p > 0) && first["cgroup_id"].as_u64() == Some(web.ctr.id()));
    assert!(!decisions.iter().any(|d| d.to_string().contains("fake-token")), "no tokens in the decision log");
    drop((web, multi));
}

// 3
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn unbound_pods_are_refused_and_with_deny_unbound_cannot_connect() {
    let (mut node, _) = node("unbound");
    let (plain_uid, stranger_uid) = (pod_uid(), pod_uid());
    node.write_manifest(
        "pods.yaml",
        &(pod_yaml("plain", &plain_uid, &[]) + &pod_yaml("stranger", &stranger_uid, &[("aadpodidbinding", "nobody")])),
    );
    let (plain, stranger) = (node.pod(&plain_uid), node.pod(&stranger_uid));
    node.start_agent(&[]);
    assert_identity_not_found(&token(&node, &plain, ""));
    assert_identity_not_found(&token(&node, &stranger, ""));
    assert!(node.fake.token_requests().is_empty());
    let reasons: Vec<String> =
        node.agent().decisions().iter().map(|d| d["reason"].as_str().unwrap_or("").to_owned()).collect();
    assert!(reasons[0].contains("no aadpodidbinding label"), "{reasons:?}");
    assert!(reasons[1].contains("no AzureIdentityBinding"), "{reasons:?}");

    // Restart with --deny-unbound: the kernel refuses them outright.
    node.agent = None;
    node.start_agent(&["--deny-unbound"]);
    for pod in [&plain, &stranger] {
        let report = Probe::new(pod.ns(&node), &pod.ctr).connect(IMDS_IP, 80, false).wait();
        assert_eq!(report.errno, Some(libc::EPERM), "{report:?}");
    }
    assert!(node.fake.seen().is_empty());
    drop((plain, stranger));
}

// 4, 6
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn exception_pods_go_straight_to_imds_and_host_network_pods_are_filtered() {
    let (mut node, [blob, ..]) = node("exception");
    let (helper_uid, hostnet_uid) = (pod_uid(), pod_uid());
    let helper = node.pod(&helper_uid);
    let hostnet = node.host_network_pod(&hostnet_uid);
    node.write_manifest(
        "pods.yaml",
        &(exception_yaml("helpers", "role", "node-helper")
            + &pod_yaml_at("helper", &helper_uid, &[("role", "Node-Helper")], helper.ip)
            + &pod_yaml("hostnet", &hostnet_uid, &[("aadpodidbinding", "blob")])),
    );
    node.start_agent(&[]);

    // 4. The exception's connection never reaches the agent: it arrives from the pod itself.
    let fetched = token(&node, &helper, "");
    assert_eq!(fetched.status, 200, "{fetched:?}");
    let seen = node.fake.token_requests();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].peer.ip().to_string().starts_with("10.232."), "came from the pod: {:?}", seen[0].peer);
    assert!(node.agent().decisions().is_empty(), "the agent never saw it");

    // 6. A hostNetwork pod (pod cgroup, node namespace) is filtered like any other pod.
    assert_token_of(&token(&node, &hostnet, ""), &blob);
    let decisions = node.agent().decisions();
    assert_eq!((decisions.len(), decisions[0]["pod_name"].as_str()), (1, Some("hostnet")));
    assert_eq!(node.fake.token_requests()[1].param("client_id").as_deref(), Some(blob.client_id.as_str()));
    drop((helper, hostnet));
}

// 8 (direct connections to the agent) and 11 (token-path variants): tests/tests/bypass.rs,
// cases 3 and 7.

// 9
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn audit_mode_logs_and_allows() {
    let (mut node, [blob, table, _]) = node("audit");
    let web_uid = pod_uid();
    node.write_manifest("pods.yaml", &pod_yaml("web", &web_uid, &[("aadpodidbinding", "blob")]));
    let web = node.pod(&web_uid);
    node.start_agent(&["--mode", "audit"]);
    // Asking for another identity would be refused; audit forwards the request as asked.
    assert_token_of(&token(&node, &web, &format!("&client_id={}", table.client_id)), &table);
    assert_token_of(&token(&node, &web, ""), &blob);
    let verdicts: Vec<String> =
        node.agent().decisions().iter().map(|d| d["verdict"].as_str().unwrap().to_owned()).collect();
    assert_eq!(verdicts, ["audit-allow", "allow"]);
    drop(web);
}

// 10
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn removing_the_label_revokes_access() {
    let (mut node, [blob, ..]) = node("revoke");
    let web_uid = pod_uid();
    node.write_manifest("pods.yaml", &pod_yaml("web", &web_uid, &[("aadpodidbinding", "blob")]));
    let web = node.pod(&web_uid);
    node.start_agent(&[]);
    assert_token_of(&token(&node, &web, ""), &blob);

    let edited = Instant::now();
    node.write_manifest("pods.yaml", &pod_yaml("web", &web_uid, &[]));
    let revoked = loop {
        let fetched = token(&node, &web, "");
        if fetched.status == 400 {
            break edited.elapsed();
        }
        assert_token_of(&fetched, &blob);
        assert!(edited.elapsed() < Duration::from_secs(5), "still allowed 5 s after the edit");
    };
    eprintln!("access revoked {revoked:?} after the manifest edit (includes curl start-up)");
    // A broken edit keeps the policy in force (revoked stays revoked) and is logged.
    node.write_manifest("pods.yaml", "apiVersion: v1\nkind: Pod\nmetadata: [broken\n");
    std::thread::sleep(Duration::from_millis(300));
    assert_identity_not_found(&token(&node, &web, ""));
    assert!(node
        .agent()
        .log_lines()
        .iter()
        .any(|l| l["message"].as_str().is_some_and(|m| m.contains("previous policy stays"))));
    drop(web);
}

// 7
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn the_python_azure_sdk_works_unmodified() {
    let (mut node, [blob, table, _]) = node("sdk");
    let (web_uid, plain_uid) = (pod_uid(), pod_uid());
    node.write_manifest(
        "pods.yaml",
        &(pod_yaml("web", &web_uid, &[("aadpodidbinding", "blob")]) + &pod_yaml("plain", &plain_uid, &[])),
    );
    let (web, plain) = (node.pod(&web_uid), node.pod(&plain_uid));
    node.start_agent(&[]);
    let expected = token_for(&blob.client_id, RESOURCE);

    // ManagedIdentityCredential, with and without the client id.
    for args in [&["managed"][..], &["managed", blob.client_id.as_str()][..]] {
        let out = sdk(&node, &web, args);
        assert_eq!(
            (out["result"].as_str(), out["token"].as_str()),
            (Some("token"), Some(expected.as_str())),
            "{args:?}: {out}"
        );
    }
    // DefaultAzureCredential: its IMDS probe (no Metadata header) gets an answer, then the token.
    let out = sdk(&node, &web, &["default"]);
    assert_eq!(out["token"].as_str(), Some(expected.as_str()), "{out}");
    let probes =
        node.agent().decisions().iter().filter(|d| d["reason"] == "Required metadata header not specified").count();
    assert!(probes >= 1, "the SDK's probe reached the agent");

    // Another identity, or an unbound pod: the SDK gives up at once (a 400 is final), no retry storm.
    let before = node.agent().decisions().len();
    let out = sdk(&node, &web, &["managed", table.client_id.as_str()]);
    assert_eq!(out["result"], "CredentialUnavailableError", "{out}");
    let out = sdk(&node, &plain, &["managed"]);
    assert_eq!(out["result"], "CredentialUnavailableError", "{out}");
    assert!(out["seconds"].as_f64().is_some_and(|s| s < 5.0), "{out}");
    assert_eq!(node.agent().decisions().len() - before, 2, "one request each, no retries");
    drop((web, plain));
}

// Pods the sources do not know yet: wait a short grace, then a retryable 404 (never NMI's
// 80 s); a pod that appears during the wait is served.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn unknown_pods_wait_briefly_then_get_a_retryable_404() {
    let (mut node, [blob, ..]) = node("unknown");
    let (late_uid, ghost_uid) = (pod_uid(), pod_uid());
    let (late, ghost) = (node.pod(&late_uid), node.pod(&ghost_uid));
    node.start_agent(&["--pod-grace", "1500ms"]);

    let started = Instant::now();
    let fetched = token(&node, &ghost, "");
    let waited = started.elapsed();
    assert_eq!(fetched.status, 404, "{fetched:?}");
    assert_eq!(fetched.json()["error"], "unknown");
    assert!(waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10), "{waited:?}");

    // The manifest arrives while the request waits: served, no 404.
    let writer = {
        let path = node.manifests.path().join("late.yaml");
        let yaml = pod_yaml("late", &late_uid, &[("aadpodidbinding", "blob")]);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let tmp = path.with_extension("tmp~");
            std::fs::write(&tmp, yaml).unwrap();
            std::fs::rename(tmp, path).unwrap();
        })
    };
    assert_token_of(&token(&node, &late, ""), &blob);
    writer.join().unwrap();
    let verdicts: Vec<String> =
        node.agent().decisions().iter().map(|d| d["verdict"].as_str().unwrap().to_owned()).collect();
    assert_eq!(verdicts, ["unknown-pod", "allow"]);
    drop((late, ghost));
}

// Other metadata paths: refused by default, forwarded when allowed (or all, NMI-style).
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn other_metadata_paths_follow_the_configured_rules() {
    let (mut node, _) = node("rules");
    let web_uid = pod_uid();
    node.write_manifest("pods.yaml", &pod_yaml("web", &web_uid, &[("aadpodidbinding", "blob")]));
    let web = node.pod(&web_uid);
    let compute = "/metadata/instance/compute?api-version=2021-02-01";
    for (args, want) in
        [(&[][..], 403), (&["--allow-path", "/metadata/instance"][..], 200), (&["--forward-all-paths"][..], 200)]
    {
        node.agent = None;
        node.start_agent(args);
        let fetched = curl(&node, &web, imds(), compute, &[MD]);
        assert_eq!(fetched.status, want, "{args:?}: {fetched:?}");
        // Token-path spellings stay refused whatever the rules.
        let variant = curl(&node, &web, imds(), &format!("/metadata/identity%2Foauth2/token{}", &TOKEN[31..]), &[MD]);
        assert_eq!(variant.status, 400, "{args:?}: {variant:?}");
    }
    let forwarded: Vec<String> = node.fake.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(forwarded, ["/metadata/instance/compute", "/metadata/instance/compute"]);
    drop(web);
}

/// Parses `OpenMetrics` text with Python's `prometheus_client` (a real parser) into
/// `name{label=value,…}` → value rounded to an integer (every sample compared here counts
/// something), labels sorted.
fn parse_metrics(text: &str) -> std::collections::BTreeMap<String, i64> {
    use std::io::Write as _;
    let python = imds_tests::node::sdk_python();
    let script = "import sys, json\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse\n\
        out = {}\n\
        for family in parse(sys.stdin.read()):\n\
        \x20   for s in family.samples:\n\
        \x20       labels = ','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))\n\
        \x20       out[f'{s.name}{{{labels}}}'] = s.value\n\
        print(json.dumps(out))\n";
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the parser rejected the metrics:\n{text}");
    let values: std::collections::BTreeMap<String, f64> = serde_json::from_slice(&out.stdout).unwrap();
    values.into_iter().map(|(k, v)| (k, v.round() as i64)).collect()
}

// Health, readiness and metrics (issue #4): they reflect the real state, never a constant.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn health_readiness_and_metrics_reflect_the_real_state() {
    let (mut node, [blob, ..]) = node("metrics");
    let web_uid = pod_uid();
    node.write_manifest("pods.yaml", &pod_yaml("web", &web_uid, &[("aadpodidbinding", "blob")]));
    let web = node.pod(&web_uid);
    node.start_agent(&["--metrics", "10.233.0.1:9402"]);
    let addr = SocketAddr::from(([10, 233, 0, 1], 9402));
    let get = |path: &'static str| node.ns.enter(move || imds_tests::fake_imds::http_get(addr, path, &[]).unwrap());

    assert_token_of(&token(&node, &web, ""), &blob);
    assert_identity_not_found(&token(&node, &web, "&client_id=nobody"));
    assert_eq!(get("/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get("/readyz"), (200, "ready\n".to_owned()));
    let (status, text) = get("/metrics");
    assert_eq!(status, 200);
    let m = parse_metrics(&text);
    let at = |key: &str| *m.get(key).unwrap_or_else(|| panic!("{key} missing from:\n{text}"));
    assert_eq!(at("imds_filter_requests_total{path_class=token,status=200,verdict=allow}"), 1);
    assert_eq!(at("imds_filter_requests_total{path_class=token,status=400,verdict=deny}"), 1);
    assert_eq!(at("imds_filter_kernel_events_total{event=connect_redirect}"), 2);
    assert_eq!(at("imds_filter_kernel_events_total{event=origin_recorded}"), 2);
    assert_eq!(at("imds_filter_upstream_request_duration_seconds_count{}"), 1);
    assert_eq!(at("imds_filter_policy_objects{kind=pods}"), 1);
    assert_eq!(at("imds_filter_policy_objects{kind=bindings}"), 3);
    assert_eq!((at("imds_filter_source_synced{}"), at("imds_filter_source_failing{}")), (1, 0));

    // A broken edit: still ready (enforcing the last good policy), and it says so.
    node.write_manifest("pods.yaml", "apiVersion: v1\nkind: Pod\nmetadata: [broken\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !get("/readyz").1.contains("fail-static") {
        assert!(Instant::now() < deadline, "readiness never reported fail-static");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(parse_metrics(&get("/metrics").1)["imds_filter_source_failing{}"], 1);

    // Programs detached underneath the agent: health says so.
    imds_agent::kernel::uninstall(&node.pins.path).unwrap();
    let (status, body) = get("/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no SockOps program attached"), "{body}");
    assert_eq!(get("/readyz").0, 503);
    drop(web);
}

// The agent is a pod itself on a real node: its cgroup is below kubepods and it has a
// private cgroup namespace (its /proc/self/cgroup reads "0::/"). It must still recognise its
// own cgroup, or its upstream calls would be redirected back to itself.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn the_agent_running_as_a_pod_is_exempt_from_its_own_filter() {
    let (mut node, [blob, ..]) = node("aspod");
    let (web_uid, agent_uid) = (pod_uid(), pod_uid());
    node.write_manifest("pods.yaml", &pod_yaml("web", &web_uid, &[("aadpodidbinding", "blob")]));
    let web = node.pod(&web_uid);
    let agent_pod = node.host_network_pod(&agent_uid);
    node.start_agent_as_pod(&agent_pod, &[]);
    assert_token_of(&token(&node, &web, ""), &blob);
    let upstream = node.fake.token_requests();
    assert_eq!(upstream.len(), 1, "the agent's own call reached IMDS directly");
    let ready = node.agent().log_lines().into_iter().find(|l| l["agent_cgroup"].is_string()).expect("startup line");
    assert!(ready["agent_cgroup"].as_str().unwrap().contains("private cgroup namespace"), "{ready}");
    // The agent lives in agent_pod's cgroup: stop (and reap) it before that cgroup goes.
    node.agent = None;
    drop((web, agent_pod));
}
