//! Faults (issue #7): the agent keeps its promises when it is killed under load, when IMDS
//! hangs, when pod cgroups come and go by the thousand, and when its bpffs is not there. Real agent, real kernel programs, the fake IMDS
//! (the real one cannot run here). IMDS failing with 429/500/503 is in `tokens.rs`; a
//! corrupted manifest keeping the previous policy is in `agent.rs`. Needs root; run with
//! `cargo xtask test`.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    process::Command,
    time::{Duration, Instant},
};

use imds_agent::kernel::{attached_programs, inspect::inspect};
use imds_tests::{
    agent_binary,
    fake_imds::{Behaviour, FakeIdentity},
    fixtures::{self, Manifest},
    node::{bound_pods_manifest, curl, pod_uid, Fetched, Node, TestPod, AGENT_ADDR},
    Churn, Probe, IMDS_IP,
};

const QUERY: &str = "api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";

/// A node with `web` bound to `blob` and `mallory` bound to nothing, the agent running.
fn scene(tag: &str) -> (Node, TestPod, TestPod) {
    let blob = FakeIdentity::named("blob");
    let mut node = Node::new(tag, vec![blob.clone()]);
    let (web_uid, mallory_uid) = (pod_uid(), pod_uid());
    let policy = bound_pods_manifest("app", &[blob], &[(web_uid.clone(), 0)])
        + Manifest::new().with(&fixtures::pod("app", "mallory", &mallory_uid)).as_str();
    node.write_manifest("policy.yaml", &policy);
    let (web, mallory) = (node.pod(&web_uid), node.pod(&mallory_uid));
    node.start_agent(&[]);
    (node, web, mallory)
}

/// A token request from `pod`, by curl.
fn ask(node: &Node, pod: &TestPod) -> Fetched {
    let path = format!("/metadata/identity/oauth2/token?{QUERY}");
    curl(node, pod, SocketAddr::from((IMDS_IP, 80)), &path, &["Metadata: true"])
}

fn each_hook_has_one_program(node: &Node) {
    for (hook, programs) in attached_programs(&node.kubepods.path).expect("ask the kernel") {
        assert_eq!(programs.len(), 1, "{hook:?}: {programs:?}");
    }
}

// 1. SIGKILL under load: nothing protected reaches IMDS while the agent is down, and the
//    restarted agent takes over the same attachments.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn killed_under_load_the_filter_never_fails_open() {
    let (mut node, web, mallory) = scene("flt-kill");
    each_hook_has_one_program(&node);
    // Mallory keeps asking, four at a time, throughout.
    let load =
        Probe::new(mallory.ns(&node), &mallory.ctr).burst(SocketAddrV4::new(IMDS_IP, 80), 400, 4, &[QUERY.to_owned()]);
    std::thread::sleep(Duration::from_millis(500));
    node.agent.as_mut().expect("running").kill();
    each_hook_has_one_program(&node);
    let down = ask(&node, &web);
    assert_eq!(down.status, 0, "nothing answers while the agent is down: {down:?}");
    std::thread::sleep(Duration::from_secs(1));
    node.start_agent(&[]);
    each_hook_has_one_program(&node);
    let report = load.wait().burst.expect("a burst report");
    assert_eq!(report.statuses.get(&200), None, "mallory never got a token: {report:?}");
    let up = ask(&node, &web);
    assert_eq!(up.status, 200, "served again after the restart: {up:?}");
    let seen = node.fake.seen();
    assert!(seen.iter().all(|s| s.param("client_id").as_deref() == Some("client-blob")), "{seen:?}");
    assert_eq!(seen.len(), 1, "only web's one token was ever fetched: {seen:?}");
    drop((web, mallory));
}

// 2. IMDS hangs (answers after 15 s): clients get a prompt, retryable IMDS answer; the agent
//    does not pile calls onto the hung service.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_hung_imds_gets_clients_a_prompt_retryable_answer() {
    let (node, web, _mallory) = scene("flt-slow");
    node.fake.set_behaviour(Behaviour::Slow(Duration::from_secs(15)));
    let url = format!("http://{IMDS_IP}/metadata/identity/oauth2/token?{QUERY}");
    for _ in 0..3 {
        let started = Instant::now();
        let out = imds_tests::node::run_in_pod(&node, &web, &["curl", "-si", "-m", "20", "-H", "Metadata: true", &url]);
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        let status: u16 = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        assert!(status == 429 || status >= 500, "a retryable answer: {text}");
        assert!(text.contains("retry-after:"), "{text}");
        assert!(took < Duration::from_secs(13), "answered in {took:?}, not left hanging");
    }
    let calls = node.fake.token_requests().len();
    assert!(calls <= 2, "{calls} calls piled onto a hung IMDS");
    drop(web);
}

// 4. cgroup churn: 1,000 pod cgroups made and removed a second for a minute. Some are
//    exceptions (the kernel gets a PASS entry for each while it lives), some ask for tokens
//    (bound: a token; known but unbound: IMDS's 400 for no identity). Every answer is the right one, and when it
//    is over nothing is left: no verdict entry, no origin record, no cached cgroup.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn churning_pod_cgroups_leave_nothing_behind_and_every_answer_is_right() {
    const RATE: f64 = 1_000.0;
    const SECONDS: f64 = 60.0;
    /// Pod UIDs in the policy, used in turn: with 2 s lives at 1,000 a second no two live
    /// cgroups share one.
    const UIDS: usize = 3_000;
    let metrics = SocketAddrV4::new(Ipv4Addr::new(10, 233, 0, 1), 9404);
    let blob = FakeIdentity::named("blob");
    let mut node = Node::new("flt-churn", vec![blob.clone()]);
    let home_uid = pod_uid();
    let uids: Vec<String> = (0..UIDS).map(|_| pod_uid()).collect();
    // Kinds in turn: bound to blob, known but unbound, an exception.
    let bound: Vec<(String, usize)> = uids.iter().step_by(3).map(|u| (u.clone(), 0)).collect();
    let mut policy = bound_pods_manifest("app", &[blob], &[bound.as_slice(), &[(home_uid.clone(), 0)]].concat());
    policy.push_str(Manifest::new().with(&fixtures::exception("app", "helpers", &[("component", "helper")])).as_str());
    node.write_manifest("policy.yaml", &policy);
    // The other pods in files of 500 documents (a manifest file holds at most 1,024).
    let (mut plan, mut pods) = (String::new(), Manifest::new());
    for (i, uid) in uids.iter().enumerate() {
        let pod = fixtures::pod("app", &format!("churn{i}"), uid);
        let (pod, expect) = match i % 3 {
            // Bound: in the policy above.
            0 => (None, "200:client-blob"),
            1 => (Some(pod), "400"),
            _ => (Some(pod.label("component", "helper")), "-"),
        };
        if let Some(pod) = pod {
            pods.push(&pod);
        }
        if i % 750 == 749 {
            node.write_manifest(&format!("pods-{i}.yaml"), std::mem::take(&mut pods).as_str());
        }
        writeln!(plan, "{uid} {expect}").expect("to a String");
    }
    let plan_file = node.manifests.path().join("churn.plan");
    std::fs::write(&plan_file, plan).expect("plan");
    let home = node.pod(&home_uid);
    node.start_agent(&["--metrics", &metrics.to_string()]);
    let rss_before = node.agent().rss() >> 20;

    let churn = Churn {
        parent: node.kubepods.path.clone(),
        plan: plan_file,
        rate: RATE,
        seconds: SECONDS,
        live: Duration::from_secs(2),
        ask_every: 10,
    };
    let running = Probe::new(home.ns(&node), &home.ctr).churn(SocketAddrV4::new(IMDS_IP, 80), &churn);
    // The agent's memory through the minute, every 5 s.
    let started = Instant::now();
    let mut rss = vec![];
    while started.elapsed() < Duration::from_secs_f64(SECONDS - 2.0) {
        std::thread::sleep(Duration::from_secs(5));
        rss.push(node.agent().rss() >> 20);
    }
    let report = running.wait();
    eprintln!("churn: agent RSS every 5 s: {rss:?}");
    let churned = report.churn.clone().unwrap_or_else(|| panic!("a churn report: {report:?}"));
    eprintln!("churn: {churned:?}");
    let planned = 60_000; // RATE × SECONDS
    assert_eq!((churned.created, churned.removed, churned.mkdir_errors), (planned, planned, 0), "{churned:?}");
    assert!(churned.seconds < SECONDS * 1.25, "the churn ran at {:.0} a second", RATE * SECONDS / churned.seconds);
    assert_eq!(churned.mismatches, 0, "{churned:?}");
    let answered = |key: &str| churned.answers.get(key).copied().unwrap_or(0);
    assert!(answered("200:client-blob -> 200") > 1_000 && answered("400 -> 400") > 1_000, "{churned:?}");

    // Nothing left behind: kernel maps, the agent's caches, its connections.
    let settled = Instant::now();
    loop {
        let state = inspect(&node.pins.path).expect("the pinned state");
        let fill = |name: &str| state.maps.iter().find(|m| m.name == name).map_or(usize::MAX, |m| m.entries);
        let left = (state.verdicts.len(), fill("PENDING"), fill("ORIGINS"), fill("PEERS"));
        let cached = node.metric(metrics, "imds_filter_cgroups_cached");
        let open = node.metric(metrics, "imds_filter_connections_open");
        if left == (0, 0, 0, 0) && cached <= 1 && open == 0 {
            break;
        }
        assert!(
            settled.elapsed() < Duration::from_secs(25),
            "left behind: (verdicts, pending, origins, peers) {left:?}, {cached} cgroups cached, {open} connections open"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The kernel saw them: exception cgroups got PASS entries, and lost them again.
    let (set, cleared) = node
        .agent()
        .log_lines()
        .iter()
        .filter(|l| l["message"] == "kernel verdicts updated")
        .fold((0, 0), |(s, c), l| (s + l["set"].as_u64().unwrap_or(0), c + l["cleared"].as_u64().unwrap_or(0)));
    assert!(set > 5_000, "PASS entries written for live exception cgroups: {set}");
    assert_eq!(cleared, set, "every PASS entry written was cleared");
    let rss_after = node.agent().rss() >> 20;
    eprintln!(
        "churn: {set} PASS entries set and cleared; settled in {:?}; RSS {rss_before} → {rss_after} MiB",
        settled.elapsed()
    );
    // Memory finds its level with the churn's working set (allocator arenas, blocking
    // threads; here it steps up once, by ~7 MiB, somewhere in the first half) and stays
    // under the ceiling. Leaks per cgroup are checked directly above (caches and maps back
    // to empty); this only catches gross growth the counts cannot see.
    let (half, last) = (rss[rss.len() / 2], *rss.last().expect("samples"));
    assert!(last <= half + 16, "agent RSS kept growing: {rss:?} MiB");
    assert!(rss_after < 64, "agent RSS {rss_after} MiB after the churn");
    let seen = node.fake.seen();
    assert!(seen.iter().all(|s| s.param("client_id").as_deref().is_none_or(|c| c == "client-blob")), "{seen:?}");
    drop(home);
}

// 5. No bpffs where the pins go: the agent says so and exits; nothing is attached half-way.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn without_bpffs_the_agent_refuses_to_start_and_attaches_nothing() {
    let node = Node::new("flt-bpffs", vec![]);
    let not_bpffs = tempfile::tempdir().expect("tempdir"); // an ordinary directory
    let manifests = node.manifests.path().display().to_string();
    let output = node.ns.enter({
        let (kubepods, pins) = (node.kubepods.path.clone(), not_bpffs.path().to_owned());
        move || {
            Command::new(agent_binary())
                .args(["run", "--attach-cgroup"])
                .arg(&kubepods)
                .arg("--bpffs")
                .arg(&pins)
                .args(["--listen", &AGENT_ADDR.to_string(), "--manifests", &manifests])
                .output()
                .expect("run the agent")
        }
    });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "it must not run without its pins: {stderr}");
    assert!(stderr.to_ascii_lowercase().contains("bpf"), "the error names the problem: {stderr}");
    let attached: usize =
        attached_programs(&node.kubepods.path).expect("ask the kernel").iter().map(|(_, p)| p.len()).sum();
    assert_eq!(attached, 0, "nothing attached");
}
