//! The command line: `imds-agent run` and the operator commands, as clap types. The
//! binary parses them; the DaemonSet's arguments are checked against them (see the tests).
#![allow(clippy::doc_markdown, reason = "doc comments on the CLI types are --help text, where backticks show")]
use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use imds_common::Verdict;

use crate::{
    handover,
    kernel::{bpffs::DEFAULT_PIN_DIR, origin::DEFAULT_ORIGIN_TTL, NodeBackstop, IMDS_ENDPOINT},
    operator::control,
    policy::{DefaultScope, WorkloadMode},
    server::Mode,
    taint,
    tokens::{cache::CacheConfig, entra},
};

#[derive(Parser)]
#[command(
    name = "imds-agent",
    version,
    about = "Filters connections to the cloud metadata service (IMDS) in the kernel, per cgroup"
)]
pub struct Cli {
    /// Log filter (tracing's `EnvFilter` syntax, e.g. `info` or `imds_agent=debug`).
    #[arg(long, global = true, env = "IMDS_LOG", default_value = "info")]
    pub log: String,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("who").required(true).args(["pod", "cgroup"]))]
#[command(group = clap::ArgGroup::new("selector").args(["client_id", "object_id", "mi_res_id"]))]
pub struct ExplainArgs {
    /// The pod, as NAMESPACE/NAME.
    #[arg(long, value_name = "NS/NAME")]
    pub pod: Option<String>,
    /// The pod a cgroup belongs to: its path (under the cgroup2 mount, or absolute) or id.
    #[arg(long, value_name = "PATH|ID")]
    pub cgroup: Option<String>,
    /// The request names this identity by client id.
    #[arg(long)]
    pub client_id: Option<String>,
    /// …by object (principal) id.
    #[arg(long)]
    pub object_id: Option<String>,
    /// …by ARM resource id.
    #[arg(long)]
    pub mi_res_id: Option<String>,
    /// The request's path and query [default: a token request for https://management.azure.com/].
    #[arg(long)]
    pub path: Option<String>,
    /// Decide over this manifests directory instead of the running agent's policy.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// Decide over the Kubernetes API's objects, listed once, instead of the running agent's
    /// policy (--pod only).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["manifests", "cgroup"])]
    pub kubeconfig: Option<PathBuf>,
    /// With --manifests or --kubeconfig: decide as an agent run with --deny-unbound.
    #[arg(long)]
    pub deny_unbound: bool,
    /// With --manifests or --kubeconfig: decide as an agent run with this
    /// --identity-scope-default would.
    #[arg(long, value_enum, default_value_t = DefaultScope::Open)]
    pub identity_scope_default: DefaultScope,
    /// The running agent's control socket.
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET, conflicts_with = "manifests")]
    pub agent_socket: PathBuf,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON document, for scripts.
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Install the kernel filter (or take over the pinned one) and serve redirected connections.
    Run(Box<RunArgs>),
    /// Is this node protected right now?
    ///
    /// Reads the pinned kernel state (whether or not an agent runs) and asks the running
    /// agent, if any, on its control socket. Exit status: 0 protected and served, 1
    /// fail-closed (filter attached, no agent serving), 2 not protected, 3 state unreadable.
    Status {
        /// bpffs directory holding the pins.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        bpffs: PathBuf,
        /// The running agent's control socket.
        #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
        agent_socket: PathBuf,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// What would the agent answer this pod, and why?
    ///
    /// Runs the agent's own steps (kernel verdict, path, policy) over the running agent's
    /// policy, a manifests directory or the Kubernetes API, and says what each found. Exit
    /// status: 0 served, 1 refused, 3 could not ask.
    Explain(ExplainArgs),
    /// Can this node run the filter, and is anything in its way?
    ///
    /// Checks the kernel, cgroup v2 and the pod hierarchy, bpffs, capabilities, other
    /// programs on our hooks, leftover NMI/kube2iam iptables rules, the listen address and the
    /// upstream (connects, sends nothing). Exit status: 0 nothing failed, 1 something failed.
    Doctor {
        /// bpffs directory for the pins.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        bpffs: PathBuf,
        /// cgroup the filter attaches to [default: kubepods.slice or kubepods].
        #[arg(long)]
        attach_cgroup: Option<PathBuf>,
        /// The agent's listen address [default: $HOST_IP:8182].
        #[arg(long, env = "IMDS_AGENT_LISTEN")]
        listen: Option<SocketAddrV4>,
        /// The metadata service [default: 169.254.169.254:80].
        #[arg(long, default_value_t = IMDS_ENDPOINT)]
        upstream: SocketAddrV4,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Is the agent on this node healthy (or, with --ready, ready)? For the kubelet's exec
    /// probes: asks the agent's own control socket, so that a replaced agent's probe is never
    /// answered by its successor. Prints the agent's sentence; exit status 0 yes, 1 no.
    Health {
        /// Ask whether it is ready (serving, policy loaded, verdicts reconciled) rather than
        /// alive.
        #[arg(long)]
        ready: bool,
        /// The running agent's control socket.
        #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
        agent_socket: PathBuf,
    },
    /// Writes the man pages (`man/`) and shell completions (`completions/`) into a directory,
    /// for packaging. `cargo xtask man` runs it; the image installs what it writes.
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Detach the kernel filter and remove its pinned state.
    Uninstall(UninstallArgs),
    /// Install the kernel filter failing closed (every redirect refused) and exit: for a
    /// node's boot, before the kubelet starts pods and before the agent runs (a systemd unit
    /// ordered before kubelet.service; docs/deploy.md). Creates the attach cgroup if the
    /// kubelet has not yet. The agent takes the same links over when it starts. Does nothing
    /// while an agent holds the node.
    Guard(GuardArgs),
    /// Install the early guard on this node: this binary at /opt/imds-filter/bin, the systemd
    /// unit imds-filter-guard.service (enabled, wanted by kubelet.service) and its settings
    /// at /etc/imds-filter/guard.env, all below --root (the DaemonSet's init container sees
    /// the node's / there). Arguments after `--` are the guard's.
    InstallGuard(InstallGuardArgs),
}

#[derive(clap::Args)]
pub struct UninstallArgs {
    /// bpffs directory holding the pins.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub bpffs: PathBuf,
    /// Then stay idle until terminated (to run as a DaemonSet that uninstalls every node).
    #[arg(long)]
    pub wait: bool,
    /// Put this startup taint (`KEY:NoSchedule`) back on the node once the filter is gone, so
    /// that new pods wait for the next agent (needs --node-name; the Kubernetes API as for
    /// `run --kube`).
    #[arg(long, value_name = "KEY", requires = "node_name")]
    pub restore_taint: Option<String>,
    /// This node's name, for --restore-taint.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// kubeconfig file for --restore-taint [default: in-cluster service account, else
    /// $KUBECONFIG or ~/.kube/config].
    #[arg(long, value_name = "PATH", requires = "restore_taint")]
    pub kubeconfig: Option<PathBuf>,
    /// Also remove the early guard `install-guard` put below ROOT (the node's / as this
    /// process sees it): without it, the next boot attaches a filter no agent takes over.
    #[arg(long, value_name = "ROOT")]
    pub remove_guard: Option<PathBuf>,
}

/// Where the kernel filter goes and what it protects: `run` and `guard` alike.
#[derive(clap::Args, Clone, Debug)]
pub struct FilterArgs {
    /// cgroup whose processes are filtered [default: kubepods.slice or kubepods under the
    /// cgroup2 mount]. Never the root cgroup.
    #[arg(long)]
    pub attach_cgroup: Option<PathBuf>,
    /// bpffs directory for pinned links and maps (mounted at /sys/fs/bpf if needed).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub bpffs: PathBuf,
    /// A protected endpoint: TCP to it from pods is judged by their policy and redirected to
    /// the agent (repeatable; at most 4 ports per address).
    #[arg(long = "protect", value_name = "ADDR:PORT", default_values_t = [IMDS_ENDPOINT])]
    pub protected: Vec<SocketAddrV4>,
    /// An address to protect whole: from pods that are not exceptions, every port and
    /// protocol to it but the --protect endpoints (which are redirected) is refused. Without
    /// it, only TCP to the --protect ports of an address is judged, and its other ports and
    /// UDP (the wire server's DNS, say) are left alone. Repeat for more addresses.
    #[arg(long = "protect-address", value_name = "ADDR", default_values_t = [*IMDS_ENDPOINT.ip()])]
    pub protected_addresses: Vec<std::net::Ipv4Addr>,
    /// Where the node backstop runs: it drops packets to protected addresses that enter the
    /// node's network namespace from a pod's (made below the socket layer, e.g. with
    /// AF_PACKET or the pod's own nftables). `auto`: netfilter on Linux ≥ 6.4, else tc.
    #[arg(long, value_enum, default_value_t = NodeBackstop::Auto)]
    pub node_backstop: NodeBackstop,
    /// A NAT64 prefix (a /96, e.g. `2001:db8:64::/96`) whose addresses embedding a protected
    /// IPv4 address are judged like it (repeatable, at most 3). The well-known `64:ff9b::/96`
    /// always is.
    #[arg(long = "nat64-prefix", value_name = "PREFIX/96", value_parser = crate::kernel::parse_nat64_prefix)]
    pub nat64_prefixes: Vec<std::net::Ipv6Addr>,
}

/// `imds-agent guard`: the filter, failing closed, before the kubelet starts pods.
#[derive(clap::Args)]
pub struct GuardArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// The agent's address, whose port the filter keeps for the agent [default: $HOST_IP:8182].
    #[arg(long, env = "IMDS_AGENT_LISTEN")]
    pub listen: Option<SocketAddrV4>,
}

#[derive(clap::Args)]
pub struct InstallGuardArgs {
    /// The node's root directory, as this process sees it.
    #[arg(long, value_name = "DIR", default_value = "/host")]
    pub root: PathBuf,
    /// The node's address (the agent's listen address's), for the guard's settings.
    #[arg(long, env = "HOST_IP")]
    pub host_ip: std::net::Ipv4Addr,
    /// The guard's own arguments (`imds-agent guard --help`).
    #[arg(last = true, value_name = "GUARD ARGS")]
    pub guard_args: Vec<String>,
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Address the agent listens on; redirected connections are rewritten to it, so it must
    /// be reachable from the pods' network namespaces [default: $HOST_IP:8182, the node's
    /// address from the downward API].
    #[arg(long, env = "IMDS_AGENT_LISTEN")]
    pub listen: Option<SocketAddrV4>,
    /// Directory of Kubernetes manifests (Pods, AzureIdentity, AzureIdentityBinding,
    /// AzurePodIdentityException); watched for changes.
    #[arg(long, required_unless_present = "kube", conflicts_with = "kube")]
    pub manifests: Option<PathBuf>,
    /// Take the policy from the Kubernetes API (in-cluster config, or KUBECONFIG): this
    /// node's pods and the aad-pod-identity objects of every namespace.
    #[arg(long)]
    pub kube: bool,
    /// kubeconfig file for --kube [default: in-cluster service account, else $KUBECONFIG or
    /// ~/.kube/config].
    #[arg(long, requires = "kube", value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, for --kube (the DaemonSet sets NODE_NAME from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// With --kube, once ready (programs attached, policy synced, serving), remove this
    /// taint from the node, which is registered with it so that pods wait for the filter
    /// (docs/deploy.md). Empty: leave the node's taints alone.
    #[arg(long, value_name = "KEY", default_value = taint::DEFAULT_KEY)]
    pub startup_taint: String,
    /// The real metadata service, called only after a request is authorised.
    #[arg(long, default_value_t = IMDS_ENDPOINT)]
    pub upstream: SocketAddrV4,
    /// Most token calls to the metadata service started per second (IMDS allows 20 identity
    /// requests per second per VM, and answers 429 beyond); other paths have
    /// --upstream-path-rate.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub upstream_rate: u32,
    /// Most token calls to the metadata service in flight at once (IMDS allows 5).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub upstream_concurrency: u32,
    /// Serve NMI's `/host/token` on this loopback address (the Secrets Store CSI driver's Azure
    /// provider asks `localhost:2579` in pod-identity mode), to the callers named by
    /// --host-token-caller only. Off unless given.
    #[arg(long, value_name = "ADDR:PORT", requires = "host_token_callers", value_parser = parse_host_token_listen)]
    pub host_token_listen: Option<SocketAddrV4>,
    /// A ServiceAccount (`NAMESPACE/SERVICEACCOUNT`) whose pods may ask `/host/token` for a
    /// pod on this node (repeatable): the CSI provider's.
    #[arg(long = "host-token-caller", value_name = "NAMESPACE/SERVICEACCOUNT", requires = "host_token_listen")]
    pub host_token_callers: Vec<crate::policy::TrustedCaller>,
    /// Most calls for metadata paths other than the token endpoint started per second (IMDS
    /// allows 5 per VM, apart from identity requests); they have a budget of their own.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub upstream_path_rate: u32,
    /// Most tokens (identity × resource) held in the node-wide cache.
    #[arg(long, default_value_t = CacheConfig::default().max_entries)]
    pub token_cache_entries: usize,
    /// Which pods the workload-identity bridge serves: those labelled
    /// azure.workload.identity/use=true (`label`), also every pod whose ServiceAccount names a
    /// client id (`annotated`), or none (`off`).
    #[arg(long, value_enum, default_value_t = WorkloadMode::Label)]
    pub workload_identity: WorkloadMode,
    /// Tenant for workload-identity ServiceAccounts without a tenant-id annotation.
    #[arg(long, env = "AZURE_TENANT_ID")]
    pub tenant_id: Option<String>,
    /// The identities a namespace without an imds-filter.io/identity-scope annotation may use:
    /// every one (`open`, for migrating clusters) or none (`closed`).
    #[arg(long, value_enum, default_value_t = DefaultScope::Open)]
    pub identity_scope_default: DefaultScope,
    /// Entra authority that workload-identity tokens are exchanged at.
    #[arg(long, env = "AZURE_AUTHORITY_HOST", default_value = entra::PUBLIC_CLOUD)]
    pub authority_host: String,
    /// The kubelet's directory; pods' projected service-account tokens are read from its
    /// `pods/` (mount it read-only into the agent).
    #[arg(long, default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,
    /// `audit` logs token requests that would be refused and forwards them anyway; other
    /// metadata paths follow their rules in every mode.
    #[arg(long, value_enum, default_value_t = Mode::Enforce)]
    pub mode: Mode,
    /// Pods without a binding get DENY in the kernel: connect() fails at once instead of a 400
    /// (except pods using workload identity, and pods of namespaces that are audited or
    /// granted metadata paths).
    #[arg(long)]
    pub deny_unbound: bool,
    /// How long a request from a pod the policy does not know yet waits before a retryable 404.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub pod_grace: Duration,
    /// With `--kube`: a request from a pod the watch has not brought yet makes the agent list
    /// the node's pods from the API server's cache, one list at a time and at most one per
    /// this interval. `0s` turns lookups off (such requests wait for the watch).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "500ms")]
    pub pod_lookup_interval: Duration,
    /// Forward GET requests for metadata paths under this prefix (repeatable). By default no
    /// path but the token endpoint is served.
    #[arg(long = "allow-path", value_name = "PREFIX")]
    pub allow_paths: Vec<String>,
    /// Forward every metadata path, as NMI did (paths under /metadata/identity other than the
    /// exact token endpoint are still refused).
    #[arg(long, conflicts_with = "allow_paths")]
    pub forward_all_paths: bool,
    /// Serve /healthz, /readyz and /metrics (Prometheus) on this address [default: off].
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Answer `imds-agent status`, `explain` and `health` on this Unix socket (owner-only).
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub control_socket: PathBuf,
    /// Where the agent serving the node hands it over to the next one (owner-only). An
    /// upgrade refuses nothing when both agents reach this path: on Kubernetes, a directory
    /// of the node mounted into every agent pod.
    #[arg(long, value_name = "PATH", default_value = handover::DEFAULT_SOCKET)]
    pub handover_socket: PathBuf,
    /// The agent's own pod (the DaemonSet sets POD_UID from the downward API): once its agent
    /// has handed the node over, a restart of its container does not take the node back.
    #[arg(long, env = "POD_UID", value_name = "UID")]
    pub pod_uid: Option<String>,
    /// Verdict for cgroups the agent has no entry for.
    #[arg(long, value_enum, default_value_t = DefaultVerdict::Redirect)]
    pub default_verdict: DefaultVerdict,
    /// Seconds an origin record stays valid after `connect()`.
    #[arg(long, default_value_t = DEFAULT_ORIGIN_TTL.as_secs())]
    pub origin_ttl: u64,
    /// Most redirected connections served at once; more are closed at once.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Most redirected connections served at once from one pod, its containers together (a
    /// process outside pods: from its cgroup); more are told to retry at once, so that one
    /// pod cannot crowd out the others.
    #[arg(long, alias = "max-connections-per-cgroup", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_pod: u32,
}

/// Port of the default listen address.
pub const DEFAULT_LISTEN_PORT: u16 = 8182;

/// Fail-open (`pass`) is deliberately not offered as a default.
#[derive(Clone, Copy, ValueEnum)]
pub enum DefaultVerdict {
    Redirect,
    Deny,
}

impl From<DefaultVerdict> for Verdict {
    fn from(v: DefaultVerdict) -> Self {
        match v {
            DefaultVerdict::Redirect => Verdict::Redirect,
            DefaultVerdict::Deny => Verdict::Deny,
        }
    }
}

/// `--host-token-listen`: a loopback address.
fn parse_host_token_listen(text: &str) -> Result<SocketAddrV4, String> {
    let listen: SocketAddrV4 = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    crate::server::host_token::check_listen(listen)
}

/// `--listen`, else the node's address from the downward API.
pub fn listen_address(given: Option<SocketAddrV4>) -> anyhow::Result<SocketAddrV4> {
    let listen = if let Some(listen) = given {
        listen
    } else {
        let host_ip = std::env::var("HOST_IP").map_err(|_| {
            anyhow::anyhow!("pass --listen ADDR:PORT (an address pods can reach, e.g. the node's) or set HOST_IP")
        })?;
        let ip = host_ip.parse().with_context(|| format!("HOST_IP={host_ip:?} is not an IPv4 address"))?;
        SocketAddrV4::new(ip, DEFAULT_LISTEN_PORT)
    };
    if listen.ip().is_unspecified() {
        bail!("--listen must be a concrete address: the kernel rewrites connections to it");
    }
    Ok(listen)
}

#[cfg(test)]
mod tests {
    //! The Helm chart's DaemonSet and this parser agree. Checked on the committed renderings,
    //! which the test command keeps equal to the chart's output (`cargo xtask render`).
    use std::collections::BTreeMap;

    use clap::CommandFactory as _;
    use serde_json::Value;

    use super::*;

    /// The agent container of the rendering's DaemonSet.
    fn agent_container(rendering: &str) -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rendering);
        let text = std::fs::read_to_string(&path).unwrap();
        let documents: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
        let daemonset = documents.into_iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
        daemonset["spec"]["template"]["spec"]["containers"][0].clone()
    }

    /// The container's arguments as the kubelet passes them: `$(VAR)` expanded from its env.
    fn kubelet_args(container: &Value) -> Vec<String> {
        let downward = BTreeMap::from([("HOST_IP", "10.0.0.4"), ("NODE_NAME", "node-1")]);
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                downward
                    .iter()
                    .fold(a.as_str().unwrap().to_owned(), |arg, (var, value)| arg.replace(&format!("$({var})"), value))
            })
            .collect()
    }

    fn run_args(rendering: &str) -> (RunArgs, Value) {
        let container = agent_container(rendering);
        let args = kubelet_args(&container);
        let cli = Cli::try_parse_from(std::iter::once("imds-agent".to_owned()).chain(args.iter().cloned()))
            .unwrap_or_else(|e| panic!("{rendering}: {args:?} do not parse: {e}"));
        let Command::Run(run) = cli.command else { panic!("{rendering}: not `run`: {args:?}") };
        (*run, container)
    }

    #[test]
    fn host_token_needs_a_loopback_address_and_a_caller() {
        let parse = |extra: &[&str]| {
            let base = ["imds-agent", "run", "--manifests", "/m", "--listen", "10.0.0.4:8182"];
            Cli::try_parse_from(base.iter().chain(extra)).map(|_| ()).map_err(|e| e.to_string())
        };
        assert!(parse(&["--host-token-listen", "127.0.0.1:2579", "--host-token-caller", "csi/provider"]).is_ok());
        let public = parse(&["--host-token-listen", "10.0.0.4:2579", "--host-token-caller", "csi/provider"]);
        assert!(public.unwrap_err().contains("must be a loopback address"));
        assert!(parse(&["--host-token-listen", "127.0.0.1:2579"]).is_err(), "no caller: nobody could ask");
        assert!(parse(&["--host-token-caller", "csi/provider"]).is_err(), "a caller of nothing");
        let bad = parse(&["--host-token-listen", "127.0.0.1:2579", "--host-token-caller", "provider"]);
        assert!(bad.unwrap_err().contains("NAMESPACE/SERVICEACCOUNT"));
    }

    #[test]
    fn the_charts_daemonset_passes_arguments_the_agent_accepts() {
        let (defaults, _) = run_args("deploy/kubernetes/imds-filter.yaml");
        assert!(defaults.kube && matches!(defaults.mode, Mode::Enforce));
        assert_eq!(defaults.listen, Some("10.0.0.4:8182".parse().unwrap()));
        assert!(matches!(defaults.workload_identity, WorkloadMode::Label));

        let (every, container) = run_args("tests/fixtures/helm/every-option.yaml");
        assert!(matches!(every.mode, Mode::Audit) && every.deny_unbound);
        assert!(matches!(every.workload_identity, WorkloadMode::Annotated));
        assert_eq!(
            (every.listen, every.metrics),
            (Some("10.0.0.4:18182".parse().unwrap()), Some("10.0.0.4:19402".parse().unwrap()))
        );
        assert_eq!(every.pod_grace, Duration::from_millis(500));
        assert_eq!(every.pod_lookup_interval, Duration::ZERO);
        assert_eq!(every.identity_scope_default, DefaultScope::Closed);
        assert_eq!(every.allow_paths.len(), 2);
        assert_eq!(every.host_token_listen, Some("127.0.0.1:12579".parse().unwrap()));
        assert_eq!(every.host_token_callers, ["kube-system/csi-secrets-store-provider-azure".parse().unwrap()]);
        assert_eq!((every.max_connections, every.filter.protected.len()), (8192, 1));

        // Every variable the container sets is one the agent reads.
        let run = Cli::command().find_subcommand("run").unwrap().clone();
        let read: Vec<String> = run
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .chain(["HOST_IP".to_owned()])
            .collect();
        let set: Vec<&str> = container["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert!(set.contains(&"AZURE_TENANT_ID") && set.contains(&"AZURE_AUTHORITY_HOST"), "{set:?}");
        for name in set {
            assert!(read.iter().any(|r| r == name), "the DaemonSet sets {name}, which the agent never reads");
        }
    }

    #[test]
    fn the_early_guards_installer_passes_arguments_the_guard_accepts() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/helm/every-option.yaml");
        let documents: Vec<Value> = serde_saphyr::from_multiple(&std::fs::read_to_string(path).unwrap()).unwrap();
        let daemonset = documents.into_iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
        let installer = &daemonset["spec"]["template"]["spec"]["initContainers"][0];
        let mut args = kubelet_args(installer);
        // HOST_IP comes from the downward API, as the container's env says.
        assert_eq!(installer["env"][0]["name"], "HOST_IP");
        args.insert(1, "--host-ip=10.0.0.4".to_owned());
        let cli = Cli::try_parse_from(std::iter::once("imds-agent".to_owned()).chain(args.iter().cloned()))
            .unwrap_or_else(|e| panic!("{args:?} do not parse: {e}"));
        let Command::InstallGuard(install) = cli.command else { panic!("not `install-guard`: {args:?}") };
        assert_eq!(install.root, PathBuf::from("/host"));
        let guard = ["imds-agent", "guard"].into_iter().map(str::to_owned).chain(install.guard_args.iter().cloned());
        let Command::Guard(guard) = Cli::try_parse_from(guard).expect("the guard's arguments parse").command else {
            panic!("not `guard`")
        };
        assert_eq!(guard.listen, Some("10.0.0.4:18182".parse().unwrap()));
        assert!(matches!(guard.filter.node_backstop, NodeBackstop::Tc));
        assert_eq!(guard.filter.nat64_prefixes.len(), 1);
    }
}
