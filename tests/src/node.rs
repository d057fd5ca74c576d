//! A node in miniature for the agent's end-to-end tests.
//!
//! - a "node" network namespace holding the fake IMDS on `169.254.169.254:80` and the
//!   agent's address, both on its loopback;
//! - pods in their own namespaces, each joined to the node by a veth, with routes for the
//!   metadata address and the agent's address pointing at the node — so anything a pod sends
//!   to `169.254.169.254` ends inside the node namespace (hostNetwork pods live in the node
//!   namespace itself). Two topologies: routed veths (a /30 per pod, as Azure CNI and Calico
//!   do) and a bridge (one subnet on `cbr0`, as kubenet does);
//! - pod cgroups in the kubelet's cgroupfs layout (`kubepods/pod<UID>/<container>`) below a
//!   test cgroup, the agent attached to that `kubepods`;
//! - a manifests directory the agent watches.
use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    process::Output,
};

use crate::{
    fake_imds::{FakeIdentity, FakeImds},
    fixtures::{self, Manifest},
    next_index,
    sandbox::sh,
    veth, AgentProcess, Cgroup, NetNs, PinDir, PodLink, Server, IMDS_IP,
};

/// How a pod's namespace is joined to the node's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// A veth pair per pod, the node's end an interface of its own (Azure CNI, Calico).
    Routed,
    /// A veth pair per pod, the node's end a port of one bridge (kubenet's `cbr0`).
    Bridge,
}

/// The NAT64 well-known prefix's spelling of the metadata address.
pub const IMDS_NAT64: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0xa9fe, 0xa9fe);
/// The bridge of [`Topology::Bridge`], its addresses and (fixed) hardware address.
const BRIDGE: &str = "cbr0";
const BRIDGE_MAC: &str = "02:00:0a:f0:00:01";
const BRIDGE_V4: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 1);
const BRIDGE_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x240, 0, 0, 0, 0, 0, 1);

/// The node's name, for the `--kube` source.
pub const KUBE_NODE: &str = "node-1";

/// A pod UID unique to this process and call, in Kubernetes' UUID form.
pub fn pod_uid() -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), next_index())
}

/// Where the agent listens in the node namespace.
pub const AGENT_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 233, 0, 1), 8182);

/// The node. Fields drop in order: agent, fake, pins, manifests, cgroups, namespace.
pub struct Node {
    pub agent: Option<AgentProcess>,
    pub fake: FakeImds,
    pub pins: PinDir,
    pub manifests: tempfile::TempDir,
    /// The kubelet's directory (`--kubelet-dir`): pods' projected tokens.
    pub kubelet: tempfile::TempDir,
    /// The node directory every agent's `--handover-socket` is in.
    pub run: tempfile::TempDir,
    pub kubepods: Cgroup,
    pub root: Cgroup,
    pub ns: NetNs,
}

/// A pod: its cgroups (pod and one container) and network namespace. Drop it before the node.
pub struct TestPod {
    pub uid: String,
    pub ctr: Cgroup,
    pub cgroup: Cgroup,
    /// `None` for a hostNetwork pod (it uses the node's namespace).
    own_ns: Option<NetNs>,
    /// Its address in its own namespace (`status.podIPs`); `None` for a hostNetwork pod.
    pub ip: Option<IpAddr>,
    /// Its IPv6 address, with a route for the NAT64 prefix through the node.
    pub ip6: Option<std::net::Ipv6Addr>,
    /// Its interface and the node's end of it; `None` for a hostNetwork pod.
    pub link: Option<PodLink>,
    /// The node's address on its link (its gateway).
    pub gateway: Option<Ipv4Addr>,
}

impl TestPod {
    /// The pod's network namespace.
    pub fn ns<'a>(&'a self, node: &'a Node) -> &'a NetNs {
        self.own_ns.as_ref().unwrap_or(&node.ns)
    }
}

impl Node {
    /// A node whose fake IMDS has these identities assigned.
    pub fn new(tag: &str, identities: Vec<FakeIdentity>) -> Node {
        let ns = NetNs::new(tag);
        ns.host_metadata_address();
        // The agent's address, local to the node namespace like the metadata address.
        ns.ip(&["addr", "add", &format!("{}/32", AGENT_ADDR.ip()), "dev", "lo"]);
        let fake = FakeImds::serve(Server::bind(&ns, SocketAddrV4::new(IMDS_IP, 80)), identities);
        let root = Cgroup::new_top(tag);
        let kubepods = root.child("kubepods");
        Node {
            agent: None,
            fake,
            pins: PinDir::new(tag),
            manifests: tempfile::tempdir().expect("tempdir"),
            kubelet: tempfile::tempdir().expect("tempdir"),
            run: tempfile::tempdir().expect("tempdir"),
            kubepods,
            root,
            ns,
        }
    }

    /// Starts `imds-agent run` for this node with `extra` arguments.
    pub fn start_agent(&mut self, extra: &[&str]) -> &AgentProcess {
        let args = self.agent_args(&self.manifests_source(), extra);
        self.agent.insert(AgentProcess::start(&self.ns, &args))
    }

    /// Starts `imds-agent run` like [`Node::start_agent`], without waiting for it to serve.
    pub fn launch_agent(&mut self, extra: &[&str]) -> &mut AgentProcess {
        let agent = self.spawn_agent(extra);
        self.agent.insert(agent)
    }

    /// Another `imds-agent run` for this node (its own control socket), not waited for and
    /// not kept in [`Node::agent`].
    pub fn spawn_agent(&self, extra: &[&str]) -> AgentProcess {
        AgentProcess::launch_in(&self.ns, None, &self.agent_args(&self.manifests_source(), extra))
    }

    /// Another agent, as a pod: in `pod`'s container cgroup, not waited for, not kept in
    /// [`Node::agent`].
    pub fn spawn_agent_as_pod(&self, pod: &TestPod, extra: &[&str]) -> AgentProcess {
        AgentProcess::launch_in(&self.ns, Some(&pod.ctr), &self.agent_args(&self.manifests_source(), extra))
    }

    /// Starts `imds-agent run --kube` against the API server in `kubeconfig`, as node `node-1`.
    pub fn start_agent_kube(&mut self, kubeconfig: &Path, extra: &[&str]) -> &AgentProcess {
        let source = ["--kube", "--node-name", KUBE_NODE, "--kubeconfig"].map(str::to_owned);
        let source = [source.as_slice(), &[kubeconfig.display().to_string()]].concat();
        let args = self.agent_args(&source, extra);
        self.agent.insert(AgentProcess::start(&self.ns, &args))
    }

    /// Like [`Node::start_agent_kube`], without waiting for it to serve.
    pub fn launch_agent_kube(&mut self, kubeconfig: &Path, extra: &[&str]) -> &mut AgentProcess {
        let source = ["--kube", "--node-name", KUBE_NODE, "--kubeconfig"].map(str::to_owned);
        let source = [source.as_slice(), &[kubeconfig.display().to_string()]].concat();
        let args = self.agent_args(&source, extra);
        self.agent.insert(AgentProcess::launch_in(&self.ns, None, &args))
    }

    /// Starts the agent as a pod would run: in the pod's container cgroup below `kubepods`
    /// (so the filter applies to it too) and in a private cgroup namespace.
    pub fn start_agent_as_pod(&mut self, pod: &TestPod, extra: &[&str]) -> &AgentProcess {
        let args = self.agent_args(&self.manifests_source(), extra);
        self.agent.insert(AgentProcess::start_in(&self.ns, Some(&pod.ctr), &args))
    }

    fn manifests_source(&self) -> Vec<String> {
        vec!["--manifests".into(), self.manifests.path().display().to_string()]
    }

    fn agent_args(&self, source: &[String], extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--attach-cgroup".into(),
            self.kubepods.path.display().to_string(),
            "--bpffs".into(),
            self.pins.path.display().to_string(),
            "--listen".into(),
            AGENT_ADDR.to_string(),
            "--upstream".into(),
            SocketAddrV4::new(IMDS_IP, 80).to_string(),
            "--kubelet-dir".into(),
            self.kubelet.path().display().to_string(),
            "--handover-socket".into(),
            self.run.path().join("handover").join("agent.sock").display().to_string(),
        ];
        args.extend_from_slice(source);
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    }

    /// The value of `name` (a full sample name with labels) on the agent's `/metrics` at
    /// `at` (its `--metrics`), 0 if absent.
    pub fn metric(&self, at: SocketAddrV4, name: &str) -> i64 {
        let text = self.ns.enter(move || {
            crate::fake_imds::http_get(SocketAddr::V4(at), "/metrics", &[]).map(|(_, t)| t).unwrap_or_default()
        });
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as i64)
    }

    /// `imds-agent COMMAND ARGS --output json` (an operator command) from the node namespace,
    /// outside the filtered hierarchy: its exit status and its JSON.
    pub fn agent_json(&self, command: &str, args: &[&str]) -> (Option<i32>, serde_json::Value) {
        let agent = crate::agent_binary();
        let mut full = vec![agent.to_str().expect("a UTF-8 path"), command, "--output", "json"];
        full.extend_from_slice(args);
        let (_, out) = crate::run_in(&self.ns, &self.root, &full);
        let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            panic!("{command} printed no JSON ({e}): {stdout}{stderr}")
        });
        (out.status.code(), json)
    }

    pub fn agent(&self) -> &AgentProcess {
        self.agent.as_ref().expect("agent started")
    }

    /// Writes (or replaces) a manifest file atomically, as an editor or ConfigMap would.
    pub fn write_manifest(&self, name: &str, yaml: &str) {
        write_atomically(&self.manifests.path().join(name), yaml);
    }

    /// A pod with its own network namespace, on a routed veth.
    pub fn pod(&self, uid: &str) -> TestPod {
        self.pod_on(uid, Topology::Routed)
    }

    /// A pod with its own network namespace, joined to the node as `topology` says.
    pub fn pod_on(&self, uid: &str, topology: Topology) -> TestPod {
        let ns = NetNs::new("pod");
        let n = (next_index() % 250) as u8;
        let (pod_v4, pod_v6, node_v4, node_v6, node_dev, pod_dev) = match topology {
            Topology::Routed => {
                let (node_side, pod_side) = (Ipv4Addr::new(10, 232, n, 1), Ipv4Addr::new(10, 232, n, 2));
                let (node_dev, pod_dev) = veth(&self.ns, node_side, &ns, pod_side);
                let v6 = |host: u16| std::net::Ipv6Addr::new(0xfd00, 0x232, u16::from(n), 0, 0, 0, 0, host);
                self.ns.ip(&["-6", "addr", "add", &format!("{}/64", v6(1)), "dev", &node_dev, "nodad"]);
                (pod_side, v6(2), node_side, v6(1), node_dev, pod_dev)
            }
            Topology::Bridge => {
                self.bridge();
                let pod_side = Ipv4Addr::new(10, 240, 0, n + 2);
                let name = |side: char| format!("b{side}{}x{}", std::process::id() % 10000, next_index());
                let (node_dev, pod_dev) = (name('n'), name('p'));
                sh(
                    "ip",
                    &[
                        "link",
                        "add",
                        &node_dev,
                        "netns",
                        &self.ns.name,
                        "type",
                        "veth",
                        "peer",
                        "name",
                        &pod_dev,
                        "netns",
                        &ns.name,
                    ],
                );
                self.ns.ip(&["link", "set", &node_dev, "master", BRIDGE, "up"]);
                ns.ip(&["addr", "add", &format!("{pod_side}/24"), "dev", &pod_dev]);
                ns.ip(&["link", "set", &pod_dev, "up"]);
                let pod_v6 = std::net::Ipv6Addr::new(0xfd00, 0x240, 0, 0, 0, 0, 0, u16::from(n) + 2);
                (pod_side, pod_v6, BRIDGE_V4, BRIDGE_V6, BRIDGE.to_owned(), pod_dev)
            }
        };
        ns.ip(&["-6", "addr", "add", &format!("{pod_v6}/64"), "dev", &pod_dev, "nodad"]);
        for dst in [IMDS_IP, *AGENT_ADDR.ip()] {
            ns.ip(&["route", "add", &format!("{dst}/32"), "via", &node_v4.to_string()]);
        }
        ns.ip(&["-6", "route", "add", "64:ff9b::/96", "via", &node_v6.to_string()]);
        // The node knows the pod's IPv6 neighbour entry from the start: a first answer then
        // does not wait for neighbour discovery (which took over a second here).
        let pod_mac = ns.mac(&pod_dev);
        self.ns.ip(&[
            "-6",
            "neigh",
            "replace",
            &pod_v6.to_string(),
            "lladdr",
            &pod_mac,
            "dev",
            &node_dev,
            "nud",
            "permanent",
        ]);
        let link = PodLink { iface: pod_dev, gateway_mac: self.ns.mac(&node_dev) };
        let mut pod = self.pod_cgroups(uid, Some((ns, pod_v4.into())));
        (pod.ip6, pod.link, pod.gateway) = (Some(pod_v6), Some(link), Some(node_v4));
        pod
    }

    /// The bridge of [`Topology::Bridge`], made on first use.
    fn bridge(&self) {
        if self.ns.has_link(BRIDGE) {
            return;
        }
        self.ns.ip(&["link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge"]);
        self.ns.ip(&["addr", "add", &format!("{BRIDGE_V4}/24"), "dev", BRIDGE]);
        self.ns.ip(&["-6", "addr", "add", &format!("{BRIDGE_V6}/64"), "dev", BRIDGE, "nodad"]);
        self.ns.ip(&["link", "set", BRIDGE, "up"]);
    }

    /// Puts the NAT64 spelling of the metadata address ([`IMDS_NAT64`]) on the node, the
    /// way a translator on the path would make it reach the metadata service: connections to
    /// `[64:ff9b::a9fe:a9fe]:80` are relayed to the fake IMDS. Returns the relay.
    pub fn nat64_translator(&self) -> crate::Relay {
        self.ns.ip(&["-6", "addr", "add", &format!("{IMDS_NAT64}/128"), "dev", "lo", "nodad"]);
        crate::Relay::start(&self.ns, SocketAddr::from((IMDS_NAT64, 80)), SocketAddr::from((IMDS_IP, 80)))
    }

    /// A hostNetwork pod: pod cgroups, the node's network namespace.
    pub fn host_network_pod(&self, uid: &str) -> TestPod {
        self.pod_cgroups(uid, None)
    }

    fn pod_cgroups(&self, uid: &str, own_ns: Option<(NetNs, IpAddr)>) -> TestPod {
        let cgroup = self.kubepods.child(&format!("pod{uid}"));
        let ctr = cgroup.child("0123456789abcdef");
        let (own_ns, ip) = own_ns.map_or((None, None), |(ns, ip)| (Some(ns), Some(ip)));
        TestPod { uid: uid.to_owned(), ctr, cgroup, own_ns, ip, ip6: None, link: None, gateway: None }
    }
}

impl Node {
    /// Projects a service-account token for pod `uid` (of `namespace`, ServiceAccount
    /// `service_account`) the way the kubelet does for the workload-identity webhook's
    /// volume: `pods/<uid>/volumes/kubernetes.io~projected/azure-identity-token/`, the file a
    /// link into `..data`. Returns the token (a JWT with the claims Kubernetes puts in one;
    /// its signature is a placeholder, which only the real Entra would check).
    pub fn project_token(&self, uid: &str, namespace: &str, service_account: &str) -> String {
        use base64::Engine as _;
        let claims = serde_json::json!({
            "aud": ["api://AzureADTokenExchange"],
            "exp": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600,
            "iss": "https://oidc.example.test/cluster",
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
            "kubernetes.io": {"namespace": namespace, "pod": {"name": "p", "uid": uid},
                              "serviceaccount": {"name": service_account, "uid": "sa-uid"}},
        });
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let token = format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256","kid":"test"}"#),
            b64(claims.to_string().as_bytes()),
            b64(b"sig")
        );
        let volume =
            self.kubelet.path().join("pods").join(uid).join("volumes/kubernetes.io~projected/azure-identity-token");
        let data = volume.join("..2026_11_26_00_00_00.000000001");
        fs::create_dir_all(&data).expect("projected volume");
        fs::write(data.join("azure-identity-token"), &token).expect("token file");
        std::os::unix::fs::symlink(data.file_name().unwrap(), volume.join("..data")).expect("..data link");
        std::os::unix::fs::symlink("..data/azure-identity-token", volume.join("azure-identity-token")).expect("link");
        token
    }
}

/// Manifests: identities `id0…` bound to selectors `sel0…` in `namespace`, and pods
/// `(uid, i)` labelled with selector `sel<i>`.
pub fn bound_pods_manifest(namespace: &str, ids: &[FakeIdentity], pods: &[(String, usize)]) -> String {
    let mut manifest = Manifest::new();
    for (i, id) in ids.iter().enumerate() {
        manifest.push(&fixtures::identity(namespace, &format!("id{i}"), id));
        manifest.push(&fixtures::binding(namespace, &format!("b{i}"), &format!("id{i}"), &format!("sel{i}")));
    }
    for (n, (uid, i)) in pods.iter().enumerate() {
        manifest.push(&fixtures::pod(namespace, &format!("pod{n}"), uid).bound_to(&format!("sel{i}")));
    }
    manifest.into_string()
}

/// `manifests` (YAML documents) with `status.podIPs` set on the pods whose uid is listed,
/// as JSON documents (JSON is YAML).
#[must_use]
pub fn with_pod_ips(manifests: &str, ips: &[(&str, IpAddr)]) -> String {
    let mut docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(manifests).expect("manifests parse");
    for doc in &mut docs {
        let uid = doc["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
        if let Some((_, ip)) = ips.iter().find(|(u, _)| *u == uid) {
            doc["status"] = serde_json::json!({"podIPs": [{"ip": ip.to_string()}]});
        }
    }
    docs.iter().map(serde_json::Value::to_string).collect::<Vec<_>>().join("\n---\n")
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    fs::write(&tmp, text).expect("write manifest");
    fs::rename(&tmp, path).expect("rename manifest");
}

/// Runs `command` as a process of `pod` (its container cgroup and namespace).
pub fn run_in_pod(node: &Node, pod: &TestPod, command: &[&str]) -> Output {
    crate::run_in(pod.ns(node), &pod.ctr, command).1
}

/// What curl got from a GET: status (0 when the connection failed) and body.
#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    pub body: String,
    pub curl_exit: i32,
    pub stderr: String,
}

impl Fetched {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// `curl` from inside a pod: `GET http://<addr><path_and_query>` with `headers`.
pub fn curl(node: &Node, pod: &TestPod, addr: SocketAddr, path_and_query: &str, headers: &[&str]) -> Fetched {
    curl_within(node, pod, addr, path_and_query, headers, 15)
}

/// [`curl`], giving up after `seconds` (what a request that should be dropped waits for).
pub fn curl_within(
    node: &Node,
    pod: &TestPod,
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[&str],
    seconds: u32,
) -> Fetched {
    let url = format!("http://{addr}{path_and_query}");
    let seconds = seconds.to_string();
    // -g: an IPv6 literal in brackets is an address, not a glob.
    let mut cmd: Vec<&str> =
        vec!["curl", "-sS", "-g", "-m", &seconds, "--path-as-is", "-o", "-", "-w", "\n%{http_code}"];
    for h in headers {
        cmd.extend(["-H", h]);
    }
    cmd.push(&url);
    let out = run_in_pod(node, pod, &cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    Fetched {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        curl_exit: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The Python of the test clients' venv (azure-identity, prometheus-client), which
/// `cargo xtask test` names in `IMDS_SDK_PYTHON`.
///
/// # Panics
/// When it is not named: the tests that need it cannot run without it.
#[must_use]
pub fn sdk_python() -> String {
    std::env::var("IMDS_SDK_PYTHON")
        .expect("IMDS_SDK_PYTHON names the venv with azure-identity: run through `cargo xtask test`")
}

/// Runs the Azure SDK client script in `pod`; its one-line JSON result.
pub fn sdk(node: &Node, pod: &TestPod, args: &[&str]) -> serde_json::Value {
    let python = sdk_python();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/imds_client.py");
    let mut command = vec![python.as_str(), script];
    command.extend_from_slice(args);
    let out = run_in_pod(node, pod, &command);
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("SDK output {stdout:?} ({e}); stderr: {}", String::from_utf8_lossy(&out.stderr)))
}
