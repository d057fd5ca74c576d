//! Operator tools (issue #8): `imds-agent status` against a running agent, against pinned
//! state with the agent killed, and with nothing attached; `imds-agent explain` against the
//! agent's real decisions; `imds-agent doctor` passing here and naming what is wrong. Real agent, real kernel programs, the fake IMDS (the real one
//! cannot run here). Needs root; run with `cargo xtask test`.
use std::net::{SocketAddr, SocketAddrV4};

use imds_agent::kernel::Filter;
use imds_tests::{
    agent_binary,
    fake_imds::FakeIdentity,
    filter_options,
    node::{bound_pods_manifest, curl, pod_uid, Node, AGENT_ADDR},
    run_in, PinDir, IMDS_IP,
};

/// `imds-agent status` of this node, asking the agent on `socket`.
fn status(node: &Node, socket: &str) -> (Option<i32>, serde_json::Value) {
    node.agent_json("status", &["--bpffs", &node.pins.path.display().to_string(), "--agent-socket", socket])
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn status_tells_protected_from_fail_closed_from_unprotected() {
    let blob = FakeIdentity::named("blob");
    let mut node = Node::new("op-status", vec![blob.clone()]);
    let web_uid = pod_uid();
    node.write_manifest("policy.yaml", &bound_pods_manifest("app", &[blob], &[(web_uid.clone(), 0)]));
    let web = node.pod(&web_uid);
    node.start_agent(&[]);
    let socket = node.agent().control_socket.display().to_string();

    // Running: protected, every hook holds exactly the pinned program, the agent answers.
    let (code, s) = status(&node, &socket);
    assert_eq!((code, s["protection"].as_str()), (Some(0), Some("protected")), "{s:#}");
    assert_eq!(s["attach_cgroup_id"], node.kubepods.id(), "{s:#}");
    let hooks = s["hooks"].as_array().expect("hooks");
    assert_eq!(hooks.len(), 8, "{s:#}");
    assert!(hooks.iter().all(|h| h["ok"] == true && h["attached"].as_array().map(Vec::len) == Some(1)), "{s:#}");
    assert_eq!(s["protected_endpoints"][0], "169.254.169.254:80", "{s:#}");
    assert_eq!(s["default_verdict"], "redirect", "{s:#}");
    assert_eq!((s["agent"]["ready"].as_bool(), s["agent"]["mode"].as_str()), (Some(true), Some("enforce")), "{s:#}");
    assert_eq!(s["agent"]["policy"]["pods"], 1, "{s:#}");
    assert!(s["problems"].as_array().is_some_and(Vec::is_empty), "{s:#}");
    // The same for people.
    let agent = agent_binary();
    let pins = node.pins.path.display().to_string();
    let text_status = [agent.to_str().unwrap(), "status", "--bpffs", &pins, "--agent-socket", &socket];
    let (_, out) = run_in(&node.ns, &node.root, &text_status);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(text.starts_with("protected: the filter is attached and the agent is serving\n"), "{text}");
    assert!(text.contains(&format!("(cgroup id {})", node.kubepods.id())), "{text}");

    // Killed: the pinned programs still hold the node, fail-closed, and status says so.
    node.agent.as_mut().expect("running").kill();
    let (code, s) = status(&node, &socket);
    assert_eq!((code, s["protection"].as_str()), (Some(1), Some("fail-closed")), "{s:#}");
    assert!(s["hooks"].as_array().expect("hooks").iter().all(|h| h["ok"] == true), "{s:#}");
    assert!(
        s["agent"].is_null() && s["agent_error"].as_str().is_some_and(|e| e.contains("no agent is running")),
        "{s:#}"
    );

    let (_, out) = run_in(&node.ns, &node.root, &text_status);
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));

    // Uninstalled: nothing attached, not protected.
    let (_, out) = run_in(&node.ns, &node.root, &[agent.to_str().unwrap(), "uninstall", "--bpffs", &pins]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, s) = status(&node, &socket);
    assert_eq!((code, s["protection"].as_str()), (Some(2), Some("unprotected")), "{s:#}");
    assert!(s["summary"].as_str().is_some_and(|t| t.contains("nothing is installed")), "{s:#}");
    drop(web);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn explain_says_what_the_agent_decides_in_the_same_words() {
    let (blob, vault) = (FakeIdentity::named("blob"), FakeIdentity::named("vault"));
    let mut node = Node::new("op-explain", vec![blob.clone(), vault.clone()]);
    let (web_uid, other_uid) = (pod_uid(), pod_uid());
    // pod0 (web) bound to blob, pod1 (other) bound to vault.
    let manifest =
        bound_pods_manifest("app", &[blob.clone(), vault.clone()], &[(web_uid.clone(), 0), (other_uid.clone(), 1)]);
    node.write_manifest("policy.yaml", &manifest);
    let web = node.pod(&web_uid);
    node.start_agent(&[]);
    let manifests = node.manifests.path().display().to_string();
    let socket = node.agent().control_socket.display().to_string();

    // (selector flag and value, expected verdict, expected exit status)
    let cases: [(&[&str], &str, i32); 4] = [
        (&[], "allow", 0),
        (&["--client-id", &blob.client_id], "allow", 0),
        (&["--client-id", &vault.client_id], "deny", 1),
        (&["--mi-res-id", &vault.resource_id], "deny", 1),
    ];
    for (i, (selector, verdict, code)) in cases.into_iter().enumerate() {
        // What the agent really does with that request from web…
        let query = match selector {
            [] => String::new(),
            [flag, value] => {
                format!("&{}={}", flag.trim_start_matches("--").replace('-', "_"), value.replace('/', "%2F"))
            }
            _ => unreachable!(),
        };
        let base = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";
        let path = format!("{base}{query}");
        let fetched = curl(&node, &web, SocketAddr::from((IMDS_IP, 80)), &path, &["Metadata: true"]);
        let decisions = node.agent().decisions();
        assert_eq!(decisions.len(), i + 1, "{decisions:?}");
        let actual = &decisions[i];
        assert_eq!(actual["verdict"], verdict, "{actual}");
        assert_eq!(fetched.status, if verdict == "allow" { 200 } else { 400 }, "{fetched:?}");
        // …and what explain says, over the live policy and over the manifests.
        // The same request, its selector given by flag.
        let request = ["--path", base];
        for source in [["--agent-socket", socket.as_str()], ["--manifests", manifests.as_str()]] {
            let args = [&["--pod", "app/pod0"][..], selector, &request, &source].concat();
            let (exit, said) = node.agent_json("explain", &args);
            assert_eq!(exit, Some(code), "{args:?}: {said:#}");
            assert_eq!(said["verdict"], actual["verdict"], "{args:?}: {said:#}");
            assert_eq!(said["reason"], actual["reason"], "{args:?}: {said:#}");
            assert_eq!(said["identity"], actual["identity"], "{args:?}: {said:#}");
            assert_eq!(said["pod_uid"], web_uid.as_str(), "{args:?}: {said:#}");
        }
    }
    // "What is this process?" by cgroup, path or id: the pod, then the same answer.
    for cgroup in [web.ctr.path.display().to_string(), web.ctr.id().to_string()] {
        let (exit, said) = node.agent_json("explain", &["--cgroup", &cgroup, "--agent-socket", &socket]);
        assert_eq!((exit, said["verdict"].as_str()), (Some(0), Some("allow")), "{said:#}");
        assert!(said["steps"][0]["finding"].as_str().is_some_and(|f| f.contains(&web_uid)), "{said:#}");
    }
    // An unknown pod, and a cgroup that is not a pod's.
    let (exit, said) = node.agent_json("explain", &["--pod", "app/ghost", "--agent-socket", &socket]);
    assert_eq!((exit, said["verdict"].as_str()), (Some(1), Some("unknown-pod")), "{said:#}");
    let agent = agent_binary();
    let root = node.root.path.display().to_string();
    let (_, out) = run_in(
        &node.ns,
        &node.root,
        &[agent.to_str().unwrap(), "explain", "--cgroup", &root, "--agent-socket", &socket],
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a pod's"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(web);
}

/// The check named `name` in a doctor report.
fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {name}: {report:#}"))
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn doctor_passes_here_and_names_what_is_wrong() {
    let mut node = Node::new("op-doctor", vec![]);
    node.start_agent(&[]);
    let (pins, kubepods, listen) =
        (node.pins.path.display().to_string(), node.kubepods.path.display().to_string(), AGENT_ADDR.to_string());
    // The metadata address of this test's namespace, where the fake IMDS listens.
    let upstream = SocketAddrV4::new(IMDS_IP, 80).to_string();
    let args = |bpffs: &str| -> Vec<String> {
        ["--bpffs", bpffs, "--attach-cgroup", &kubepods, "--listen", &listen, "--upstream", &upstream]
            .map(str::to_owned)
            .to_vec()
    };
    let with = |a: &[String]| node.agent_json("doctor", &a.iter().map(String::as_str).collect::<Vec<_>>());

    // This machine, with the agent running: nothing fails.
    let (code, report) = with(&args(&pins));
    assert_eq!(code, Some(0), "{report:#}");
    for name in [
        "kernel",
        "btf",
        "cgroup v2",
        "pod cgroups",
        "bpffs",
        "capabilities",
        "conflicts",
        "node backstop",
        "iptables",
        "listen",
        "upstream",
    ] {
        assert_eq!(check(&report, name)["outcome"], "pass", "{name}: {report:#}");
    }
    let seen_before = node.fake.seen().len();
    let agent = agent_binary();
    let here = args(&pins);
    let text: Vec<&str> =
        [agent.to_str().unwrap(), "doctor"].into_iter().chain(here.iter().map(String::as_str)).collect();
    let (_, out) = run_in(&node.ns, &node.root, &text);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(text.ends_with("the filter can run on this node\n"), "{text}");

    // No bpffs where the pins would go.
    let not_bpffs = tempfile::tempdir().expect("tempdir");
    let (code, report) = with(&args(&not_bpffs.path().join("pins").display().to_string()));
    assert_eq!((code, check(&report, "bpffs")["outcome"].as_str()), (Some(1), Some("fail")), "{report:#}");
    assert!(check(&report, "bpffs")["fix"].as_str().is_some_and(|f| f.contains("mount -t bpf")), "{report:#}");

    // Someone else's programs on the same hooks (here: a second copy of ours, pinned elsewhere).
    let other_pins = PinDir::new("op-doctor-other");
    let other = Filter::install(&filter_options(&node.kubepods, &other_pins, AGENT_ADDR)).expect("a second filter");
    let (code, report) = with(&args(&pins));
    let conflicts = check(&report, "conflicts");
    assert_eq!((code, conflicts["outcome"].as_str()), (Some(1), Some("fail")), "{report:#}");
    assert!(conflicts["detail"].as_str().is_some_and(|d| d.contains("Connect4 program")), "{report:#}");
    drop((other, other_pins));

    // NMI's chain left behind.
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", node.ns.path().display()))
        .args(["iptables", "-w", "-t", "nat", "-N", "aad-metadata"])
        .output()
        .expect("iptables (cargo xtask setup installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, report) = with(&args(&pins));
    assert_eq!((code, check(&report, "iptables")["outcome"].as_str()), (Some(1), Some("fail")), "{report:#}");

    // A listen address that is not this node's.
    let mut wrong = args(&pins);
    wrong[5] = "10.233.9.9:8182".into();
    let (_, report) = with(&wrong);
    assert_eq!(check(&report, "listen")["outcome"], "fail", "{report:#}");
    // The upstream check connected, and asked nothing.
    assert_eq!(node.fake.seen().len(), seen_before, "doctor sent the metadata service a request");
}

// Another component's connect programs above ours, as a socket-level load balancer attaches
// them (Cilium's on the cgroup root; here on the test's own cgroup, an ancestor of kubepods):
// one translating a Service address to a backend works as before; one translating a Service
// address to the metadata address opens no path — ours ran before it and saw the Service, but
// the packet backstop drops what reaches the metadata address unredirected. `doctor` fails an
// unknown connect program and passes Cilium's.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_socket_load_balancer_above_the_filter_opens_no_path_and_doctor_tells_ciliums_apart() {
    use imds_tests::{fake_imds::FakeImds, foreign::ForeignConnect4, Server};
    use std::net::Ipv4Addr;

    let blob = FakeIdentity::named("blob");
    let mut node = Node::new("op-lb", vec![blob.clone()]);
    let web_uid = pod_uid();
    node.write_manifest("policy.yaml", &bound_pods_manifest("app", &[blob], &[(web_uid.clone(), 0)]));
    let web = node.pod(&web_uid);
    node.start_agent(&[]);
    // A backend on the node, and two "Service" addresses nothing listens on.
    let backend = Ipv4Addr::new(10, 233, 0, 7);
    node.ns.ip(&["addr", "add", &format!("{backend}/32"), "dev", "lo"]);
    let gateway = web.gateway.expect("a pod with its own namespace").to_string();
    web.ns(&node).ip(&["route", "add", &format!("{backend}/32"), "via", &gateway]);
    let other = FakeImds::serve(Server::bind(&node.ns, SocketAddrV4::new(backend, 80)), vec![]);
    let (to_backend, to_metadata) = (Ipv4Addr::new(10, 96, 0, 10), Ipv4Addr::new(10, 96, 0, 11));
    let balancer = [
        ForeignConnect4::attach(&node.root, "lb_connect4", Some((to_backend, backend))).expect("a connect program"),
        ForeignConnect4::attach(&node.root, "lb_connect4", Some((to_metadata, IMDS_IP))).expect("a connect program"),
    ];
    let instance = "/metadata/instance?api-version=2021-02-01";
    let via = |service: Ipv4Addr| {
        imds_tests::node::curl_within(&node, &web, SocketAddr::from((service, 80)), instance, &["Metadata: true"], 3)
    };
    // The positive control: the balancer rewrites.
    assert_eq!(via(to_backend).status, 200, "the balancer sends the Service to its backend");
    assert_eq!(other.seen().len(), 1);
    // To the metadata address: nothing arrives, the connection never completes.
    let seen = node.fake.seen().len();
    let refused = via(to_metadata);
    assert_eq!(refused.status, 0, "{refused:?}");
    assert_eq!(node.fake.seen().len(), seen, "the metadata service saw the pod's connection");
    // The pod's own requests to the metadata address still reach the agent (which refuses
    // instance data here).
    assert_eq!(curl(&node, &web, SocketAddr::from((IMDS_IP, 80)), instance, &["Metadata: true"]).status, 403);

    let (pins, kubepods, listen) =
        (node.pins.path.display().to_string(), node.kubepods.path.display().to_string(), AGENT_ADDR.to_string());
    let upstream = SocketAddrV4::new(IMDS_IP, 80).to_string();
    let args = ["--bpffs", &pins, "--attach-cgroup", &kubepods, "--listen", &listen, "--upstream", &upstream];
    let (code, report) = node.agent_json("doctor", &args);
    let conflicts = check(&report, "conflicts");
    assert_eq!((code, conflicts["outcome"].as_str()), (Some(1), Some("fail")), "{report:#}");
    assert!(conflicts["detail"].as_str().is_some_and(|d| d.contains("lb_connect4")), "{report:#}");
    drop(balancer);
    // Cilium's socket LB, by name: compatible.
    let cilium = ForeignConnect4::attach(&node.root, "cil_sock4_connect", None).expect("a connect program");
    let (code, report) = node.agent_json("doctor", &args);
    let conflicts = check(&report, "conflicts");
    assert_eq!((code, conflicts["outcome"].as_str()), (Some(0), Some("pass")), "{report:#}");
    assert!(conflicts["detail"].as_str().is_some_and(|d| d.contains("Cilium's socket load balancer")), "{report:#}");
    drop((cilium, web));
}
