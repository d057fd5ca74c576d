//! The shipped image, run by a real container runtime with exactly what the DaemonSet grants.
//!
//! `cargo xtask test` builds the image (`cargo xtask image`: a static agent `FROM scratch`)
//! and this test runs it with podman and runc against a sandbox node: the DaemonSet's
//! capabilities (all dropped, six added), seccomp profile, read-only root, volumes, memory
//! limit and arguments, read from the rendered manifest. The agent runs as a pod below the
//! node's pod hierarchy, in a private cgroup namespace, in the node's network namespace (the
//! DaemonSet's `hostNetwork`). What differs from a node, and why:
//! - the policy comes from a manifests directory (one extra read-only mount) instead of the
//!   API server, and the sandbox's cgroup, pins and listen address are passed as arguments;
//! - the kubelet's pods directory and the handover directory are the sandbox node's;
//! - `CAP_SYS_RESOURCE` cannot be granted where the test's own root lacks it (some CI
//!   sandboxes); the agent needs it only before Linux 5.11, so only it may be missing, and
//!   only on such a kernel. Every other capability the DaemonSet adds must be held.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use imds_tests::{
    container::{check_image, test_image, ulimit_flags, Container, DaemonSetRun},
    fake_imds::{token_for, FakeIdentity},
    node::{bound_pods_manifest, pod_uid, sdk, Node, AGENT_ADDR},
    unique, AgentProcess, AGENT_READY,
};

/// The resource the SDK client script asks for.
const RESOURCE: &str = "https://vault.azure.net";

fn rendered_daemonset() -> DaemonSetRun {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/imds-filter.yaml");
    DaemonSetRun::from_rendering(&fs::read_to_string(path).expect("the rendered DaemonSet"))
}

/// The capabilities a process holds (`CapEff` of /proc/PID/status), by name.
fn effective_capabilities(pid: u32) -> Vec<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's status");
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:")).expect("CapEff").trim();
    let bits = u64::from_str_radix(hex, 16).expect("hex");
    (0..64).filter(|bit| bits & (1 << bit) != 0).map(capability_name).collect()
}

/// This process's bounding set: what any container it starts can be granted at most.
fn bounding_set() -> u64 {
    let status = fs::read_to_string("/proc/self/status").expect("own status");
    let hex = status.lines().find_map(|l| l.strip_prefix("CapBnd:")).expect("CapBnd").trim();
    u64::from_str_radix(hex, 16).expect("hex")
}

fn capability_name(bit: u64) -> String {
    let names = [
        (12, "CAP_NET_ADMIN"),
        (2, "CAP_DAC_READ_SEARCH"),
        (21, "CAP_SYS_ADMIN"),
        (24, "CAP_SYS_RESOURCE"),
        (38, "CAP_PERFMON"),
        (39, "CAP_BPF"),
    ];
    names.iter().find(|(b, _)| *b == bit).map_or_else(|| format!("bit {bit}"), |(_, n)| (*n).to_owned())
}

fn capability_bit(name: &str) -> u64 {
    (0..64).find(|b| capability_name(*b) == name).unwrap_or_else(|| panic!("unknown capability {name}"))
}

#[test]
#[ignore = "needs root, podman and the image: run with `cargo xtask test`"]
fn the_shipped_image_serves_a_pod_with_exactly_the_daemonsets_privileges() {
    let image = test_image();
    check_image(&image).unwrap_or_else(|e| panic!("{e}"));
    let daemonset = rendered_daemonset();
    assert!(daemonset.host_network, "the agent shares the node's network namespace");

    let blob = FakeIdentity::named("blob");
    let node = Node::new("img", vec![blob.clone()]);
    let (web_uid, agent_uid) = (pod_uid(), pod_uid());
    node.write_manifest("pods.yaml", &bound_pods_manifest("app", std::slice::from_ref(&blob), &[(web_uid.clone(), 0)]));
    let web = node.pod(&web_uid);
    let agent_pod = node.host_network_pod(&agent_uid);

    // The DaemonSet's host paths, in the sandbox node: its kubelet and handover directories
    // are the node's own; bpffs and cgroupfs are shared (the test's pins and cgroups are its own).
    let kubelet_pods = node.kubelet.path().join("pods");
    let handover = node.run.path().join("handover");
    for dir in [&kubelet_pods, &handover] {
        fs::create_dir_all(dir).expect("sandbox directory");
    }
    let host_path = |path: &Path| -> Option<PathBuf> {
        match path.to_str()? {
            "/sys/fs/bpf" | "/sys/fs/cgroup" => Some(path.to_owned()),
            "/var/lib/kubelet/pods" => Some(kubelet_pods.clone()),
            "/run/imds-filter/handover" => Some(handover.clone()),
            _ => None,
        }
    };
    let cgroup_root = imds_agent::kernel::cgroup::cgroup2_root().expect("cgroup2");
    let in_container = |host: &Path| {
        Path::new("/host/sys/fs/cgroup")
            .join(cgroup_root.strip_prefix("/sys/fs/cgroup").expect("cgroup2 under /sys/fs/cgroup"))
            .join(host.strip_prefix(&cgroup_root).expect("a cgroup"))
    };
    let parent = format!("/{}", agent_pod.cgroup.path.strip_prefix(&cgroup_root).expect("a cgroup").display());

    // The DaemonSet's arguments, with the sandbox's policy source, cgroup, pins and address.
    let host_ip = AGENT_ADDR.ip().to_string();
    let mut args: Vec<String> =
        daemonset.args.iter().filter(|a| *a != "--kube").map(|a| a.replace("$(HOST_IP)", &host_ip)).collect();
    args.extend([
        "--manifests".into(),
        "/etc/imds-filter/manifests".into(),
        "--attach-cgroup".into(),
        in_container(&node.kubepods.path).display().to_string(),
        "--bpffs".into(),
        node.pins.path.display().to_string(),
    ]);
    let name = unique("imds-agent");
    let ns = node.ns.path();
    let mut podman = Command::new("podman");
    podman
        .args(["--runtime", "runc", "run", "--rm", "--name", &name, "--pull", "never"])
        .arg(format!("--network=ns:{}", ns.display()))
        .args(["--cgroupns", "private", "--cgroups", "no-conmon", "--cgroup-parent", &parent])
        .args(ulimit_flags())
        .args(daemonset.podman_flags(host_path))
        .args(["--volume", &format!("{}:/etc/imds-filter/manifests:ro", node.manifests.path().display())])
        .args(["--env", "NODE_NAME=node-1", "--env", &format!("HOST_IP={host_ip}")])
        .args(["--env", &format!("POD_UID={agent_uid}")])
        .arg(&image)
        .args(&args)
        .stdin(Stdio::null());
    let container = Container::new(&name, Some(&parent));
    // The container's control socket is on its own tmpfs; this sandbox path is only what the
    // guard cleans up (never the host's /run/imds-filter).
    let mut agent = AgentProcess::launch_command(podman, node.run.path().join("container-agent.sock"));
    agent.wait_for_log(AGENT_READY, Duration::from_mins(1));

    // Exactly the DaemonSet's capabilities: only CAP_SYS_RESOURCE may be missing, where the
    // test's own root lacks it, and only on a kernel that no longer needs it.
    let pid = container.pid().expect("the container's process");
    let bounding = bounding_set();
    let (mut expected, ungrantable): (Vec<String>, Vec<String>) =
        daemonset.granted().into_iter().partition(|c| bounding & (1 << capability_bit(c)) != 0);
    let memcg_accounting =
        aya::util::KernelVersion::current().is_ok_and(|k| k >= aya::util::KernelVersion::new(5, 11, 0));
    assert!(
        ungrantable.iter().all(|c| c == "CAP_SYS_RESOURCE") && (ungrantable.is_empty() || memcg_accounting),
        "this machine cannot grant {ungrantable:?}: the test cannot show the DaemonSet's set is enough"
    );
    if !ungrantable.is_empty() {
        eprintln!("not granted here (the test's root lacks it; unneeded from Linux 5.11): {ungrantable:?}");
    }
    let mut held = effective_capabilities(pid);
    held.sort();
    expected.sort();
    assert_eq!(held, expected, "the agent holds what the DaemonSet grants, nothing more");

    // A pod gets its token through the agent in the image: the real SDK, the real runtime.
    let out = sdk(&node, &web, &["managed"]);
    assert_eq!(out["token"].as_str(), Some(token_for(&blob.client_id, RESOURCE).as_str()), "{out}");
    let decisions = agent.decisions();
    assert!(decisions.iter().any(|d| d["verdict"] == "allow" && d["pod_uid"] == web_uid.as_str()), "{decisions:?}");

    // The kubelet's readiness probe, as the DaemonSet runs it, in the image.
    let (code, said) = container.exec(&daemonset.readiness);
    assert_eq!(code, Some(0), "readiness probe: {said}");

    // Stopped as the kubelet stops it: SIGTERM, the agent exits at once and cleanly.
    let grace = Duration::from_secs(u64::try_from(daemonset.grace_seconds).expect("a grace period"));
    let status = agent.terminate(grace).expect("the agent stops within the grace period");
    assert!(status.success(), "the agent exited with {status}");
    drop(container);
    drop(web);
    drop(agent_pod);
}
