//! `imds-agent`: installs the in-kernel IMDS filter and serves the connections it redirects.
#![allow(clippy::doc_markdown, reason = "doc comments on the CLI types are --help text, where backticks show")]
use std::{
    net::{SocketAddr, SocketAddrV4},
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use imds_agent::{
    caller::CgroupResolver,
    control, doctor, events, explain, handover,
    imds::PathRules,
    kernel::{
        self,
        bpffs::{self, DEFAULT_PIN_DIR},
        cgroup,
        origin::DEFAULT_ORIGIN_TTL,
        Duty, Filter, FilterOptions, NodeBackstop, Redirects, IMDS_ENDPOINT,
    },
    policy::{Snapshot, WorkloadMode, WorkloadSettings},
    secrets::SecretReader,
    server::{self, limits::ConnectionLimits, listener, AgentState, Mode},
    sources::{kube as kube_source, manifests},
    status,
    succession::{self, AgentDuties, Handing, RetiredMark, Start},
    telemetry::{self, SourceStatus, Telemetry},
    tokens::{
        budget::BudgetConfig,
        cache::CacheConfig,
        entra::{self, Entra},
        TokenConfig, TokenService,
    },
    upstream::{Upstream, IMDS_TIMEOUT},
    verdicts::VerdictSync,
};
use imds_common::Verdict;
use tokio::{io::unix::AsyncFd, net::TcpListener, signal::unix::SignalKind, sync::watch};
use tracing_subscriber::EnvFilter;

mod operator;

#[derive(Parser)]
#[command(
    name = "imds-agent",
    version,
    about = "Filters connections to the cloud metadata service (IMDS) in the kernel, per cgroup"
)]
struct Cli {
    /// Log filter (tracing's `EnvFilter` syntax, e.g. `info` or `imds_agent=debug`).
    #[arg(long, global = true, env = "IMDS_LOG", default_value = "info")]
    log: String,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("who").required(true).args(["pod", "cgroup"]))]
#[command(group = clap::ArgGroup::new("selector").args(["client_id", "object_id", "mi_res_id"]))]
struct ExplainArgs {
    /// The pod, as NAMESPACE/NAME.
    #[arg(long, value_name = "NS/NAME")]
    pod: Option<String>,
    /// The pod a cgroup belongs to: its path (under the cgroup2 mount, or absolute) or id.
    #[arg(long, value_name = "PATH|ID")]
    cgroup: Option<String>,
    /// The request names this identity by client id.
    #[arg(long)]
    client_id: Option<String>,
    /// …by object (principal) id.
    #[arg(long)]
    object_id: Option<String>,
    /// …by ARM resource id.
    #[arg(long)]
    mi_res_id: Option<String>,
    /// The request's path and query [default: a token request for https://management.azure.com/].
    #[arg(long)]
    path: Option<String>,
    /// Decide over this manifests directory instead of the running agent's policy.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// Decide over the Kubernetes API's objects, listed once, instead of the running agent's
    /// policy (--pod only).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["manifests", "cgroup"])]
    kubeconfig: Option<PathBuf>,
    /// With --manifests or --kubeconfig: decide as an agent run with --deny-unbound.
    #[arg(long)]
    deny_unbound: bool,
    /// The running agent's control socket.
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET, conflicts_with = "manifests")]
    agent_socket: PathBuf,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    /// For people.
    Text,
    /// One JSON document, for scripts.
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
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
    Uninstall {
        /// bpffs directory holding the pins.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        bpffs: PathBuf,
        /// Then stay idle until terminated (to run as a DaemonSet that uninstalls every node).
        #[arg(long)]
        wait: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// cgroup whose processes are filtered [default: kubepods.slice or kubepods under the
    /// cgroup2 mount]. Never the root cgroup.
    #[arg(long)]
    attach_cgroup: Option<PathBuf>,
    /// bpffs directory for pinned links and maps (mounted at /sys/fs/bpf if needed).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    bpffs: PathBuf,
    /// Address the agent listens on; redirected connections are rewritten to it, so it must
    /// be reachable from the pods' network namespaces [default: $HOST_IP:8182, the node's
    /// address from the downward API].
    #[arg(long, env = "IMDS_AGENT_LISTEN")]
    listen: Option<SocketAddrV4>,
    /// Directory of Kubernetes manifests (Pods, AzureIdentity, AzureIdentityBinding,
    /// AzurePodIdentityException); watched for changes.
    #[arg(long, required_unless_present = "kube", conflicts_with = "kube")]
    manifests: Option<PathBuf>,
    /// Take the policy from the Kubernetes API (in-cluster config, or KUBECONFIG): this
    /// node's pods and the aad-pod-identity objects of every namespace.
    #[arg(long)]
    kube: bool,
    /// kubeconfig file for --kube [default: in-cluster service account, else $KUBECONFIG or
    /// ~/.kube/config].
    #[arg(long, requires = "kube", value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// This node's name, for --kube (the DaemonSet sets NODE_NAME from the downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The real metadata service, called only after a request is authorised.
    #[arg(long, default_value_t = IMDS_ENDPOINT)]
    upstream: SocketAddrV4,
    /// Most calls to the metadata service started per second (IMDS allows 20 identity
    /// requests per second per VM, and answers 429 beyond).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    upstream_rate: u32,
    /// Most calls to the metadata service in flight at once (IMDS allows 5).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    upstream_concurrency: u32,
    /// Most tokens (identity × resource) held in the node-wide cache.
    #[arg(long, default_value_t = CacheConfig::default().max_entries)]
    token_cache_entries: usize,
    /// Which pods the workload-identity bridge serves: those labelled
    /// azure.workload.identity/use=true (`label`), also every pod whose ServiceAccount names a
    /// client id (`annotated`), or none (`off`).
    #[arg(long, value_enum, default_value_t = WorkloadArg::Label)]
    workload_identity: WorkloadArg,
    /// Tenant for workload-identity ServiceAccounts without a tenant-id annotation.
    #[arg(long, env = "AZURE_TENANT_ID")]
    tenant_id: Option<String>,
    /// Entra authority that workload-identity tokens are exchanged at.
    #[arg(long, env = "AZURE_AUTHORITY_HOST", default_value = entra::PUBLIC_CLOUD)]
    authority_host: String,
    /// The kubelet's directory; pods' projected service-account tokens are read from its
    /// `pods/` (mount it read-only into the agent).
    #[arg(long, default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    /// `audit` logs what would be refused and forwards it anyway.
    #[arg(long, value_enum, default_value_t = ModeArg::Enforce)]
    mode: ModeArg,
    /// Pods without a binding get DENY in the kernel: connect() fails at once instead of a 400.
    #[arg(long)]
    deny_unbound: bool,
    /// How long a request from a pod the policy does not know yet waits before a retryable 404.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pod_grace: Duration,
    /// Forward GET requests for metadata paths under this prefix (repeatable). By default no
    /// path but the token endpoint is served.
    #[arg(long = "allow-path", value_name = "PREFIX")]
    allow_paths: Vec<String>,
    /// Forward every metadata path, as NMI did (paths under /metadata/identity other than the
    /// exact token endpoint are still refused).
    #[arg(long, conflicts_with = "allow_paths")]
    forward_all_paths: bool,
    /// Serve /healthz, /readyz and /metrics (Prometheus) on this address [default: off].
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// Answer `imds-agent status`, `explain` and `health` on this Unix socket (owner-only).
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    control_socket: PathBuf,
    /// Where the agent serving the node hands it over to the next one (owner-only). An
    /// upgrade refuses nothing when both agents reach this path: on Kubernetes, a directory
    /// of the node mounted into every agent pod.
    #[arg(long, value_name = "PATH", default_value = handover::DEFAULT_SOCKET)]
    handover_socket: PathBuf,
    /// The agent's own pod (the DaemonSet sets POD_UID from the downward API): once its agent
    /// has handed the node over, a restart of its container does not take the node back.
    #[arg(long, env = "POD_UID", value_name = "UID")]
    pod_uid: Option<String>,
    /// A protected endpoint: TCP to it from pods is judged by their policy and redirected to
    /// the agent (repeatable; at most 4 ports per address).
    #[arg(long = "protect", value_name = "ADDR:PORT", default_values_t = [IMDS_ENDPOINT])]
    protected: Vec<SocketAddrV4>,
    /// An address to protect whole: from pods that are not exceptions, every port and
    /// protocol to it but the --protect endpoints (which are redirected) is refused. Without
    /// it, only TCP to the --protect ports of an address is judged, and its other ports and
    /// UDP (the wire server's DNS, say) are left alone. Repeat for more addresses.
    #[arg(long = "protect-address", value_name = "ADDR", default_values_t = [*IMDS_ENDPOINT.ip()])]
    protected_addresses: Vec<std::net::Ipv4Addr>,
    /// Where the node backstop runs: it drops packets to protected addresses that enter the
    /// node's network namespace from a pod's (made below the socket layer, e.g. with
    /// AF_PACKET or the pod's own nftables). `auto`: netfilter on Linux ≥ 6.4, else tc.
    #[arg(long, value_enum, default_value_t = NodeBackstop::Auto)]
    node_backstop: NodeBackstop,
    /// A NAT64 prefix (a /96, e.g. `2001:db8:64::/96`) whose addresses embedding a protected
    /// IPv4 address are judged like it (repeatable, at most 3). The well-known `64:ff9b::/96`
    /// always is.
    #[arg(long = "nat64-prefix", value_name = "PREFIX/96", value_parser = kernel::parse_nat64_prefix)]
    nat64_prefixes: Vec<std::net::Ipv6Addr>,
    /// Verdict for cgroups the agent has no entry for.
    #[arg(long, value_enum, default_value_t = DefaultVerdict::Redirect)]
    default_verdict: DefaultVerdict,
    /// Seconds an origin record stays valid after `connect()`.
    #[arg(long, default_value_t = DEFAULT_ORIGIN_TTL.as_secs())]
    origin_ttl: u64,
    /// Most redirected connections served at once; more are closed at once.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Most redirected connections served at once from one pod, its containers together (a
    /// process outside pods: from its cgroup); more are told to retry at once, so that one
    /// pod cannot crowd out the others.
    #[arg(long, alias = "max-connections-per-cgroup", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_pod: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum WorkloadArg {
    Label,
    Annotated,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Enforce,
    Audit,
}

/// Port of the default listen address.
const DEFAULT_LISTEN_PORT: u16 = 8182;

/// Fail-open (`pass`) is deliberately not offered as a default.
#[derive(Clone, Copy, ValueEnum)]
enum DefaultVerdict {
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli)?;
    match cli.command {
        Command::Run(args) => tokio::runtime::Runtime::new()?.block_on(run(*args, &cli.log)),
        Command::Status { bpffs, agent_socket, output } => {
            let status = tokio::runtime::Runtime::new()?.block_on(operator::node_status(&bpffs, &agent_socket));
            operator::answer(output, status, |s| s.protection.exit_code())
        }
        Command::Explain(args) => {
            let explanation = tokio::runtime::Runtime::new()?.block_on(operator::explain(&args));
            operator::answer(args.output, explanation, explain::Explanation::exit_code)
        }
        Command::Doctor { bpffs, attach_cgroup, listen, upstream, output } => {
            let listen = listen.or_else(|| listen_address(None).ok());
            let report = doctor::run(&doctor::Setup { pin_dir: bpffs, attach_cgroup, listen, upstream });
            operator::answer(output, Ok(report), doctor::Report::exit_code)
        }
        Command::Health { ready, agent_socket } => {
            // A probe runs every few seconds: one thread is plenty.
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let answer = runtime.block_on(control::health(&agent_socket, ready));
            match answer {
                Ok((healthy, sentence)) => {
                    println!("{sentence}");
                    std::process::exit(i32::from(!healthy));
                }
                Err(why) => {
                    println!("{why}");
                    std::process::exit(1);
                }
            }
        }
        Command::GenerateDocs { out } => operator::generate_docs(&out),
        Command::Uninstall { bpffs, wait } => {
            let done = kernel::uninstall(&bpffs)?;
            if done.links.is_empty() && done.maps.is_empty() && done.backstop.is_empty() {
                println!("nothing installed under {}", bpffs.display());
            } else {
                println!(
                    "detached {} link(s) and removed {} map pin(s) from {}; node backstop removed: {}",
                    done.links.len(),
                    done.maps.len(),
                    bpffs.display(),
                    if done.backstop.is_empty() { "none found".to_owned() } else { done.backstop.join(", ") }
                );
            }
            if wait {
                println!("uninstalled; idle until terminated");
                loop {
                    std::thread::park();
                }
            }
            Ok(())
        }
    }
}

fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&cli.log).with_context(|| format!("invalid --log filter {:?}", cli.log))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
    .map_err(|e| anyhow::anyhow!("installing the logger: {e}"))
}

/// Kernels before 5.11 charge BPF maps against `RLIMIT_MEMLOCK` (later ones ignore it).
/// Every held connection is a descriptor: lift the soft limit to the hard one, and say so if
/// even that cannot hold `max_connections` and the agent's own files.
fn raise_limits(max_connections: u32) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!(error = %e, "could not lift RLIMIT_MEMLOCK (only matters before Linux 5.11)");
    }
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::debug!(error = %e, "could not raise RLIMIT_NOFILE");
        }
    }
    let wanted = u64::from(max_connections) + 256;
    if hard < wanted {
        tracing::warn!(
            open_files = hard,
            max_connections,
            "the open-files limit is below --max-connections: connections beyond it will fail to be accepted"
        );
    }
}

async fn run(args: RunArgs, log_filter: &str) -> anyhow::Result<()> {
    if !kernel::programs_built() {
        return Err(kernel::FilterError::NotBuilt.into());
    }
    let listen = listen_address(args.listen)?;
    raise_limits(args.max_connections);
    let root = cgroup::cgroup2_root()?;
    let attach_cgroup = match args.attach_cgroup.clone() {
        Some(path) => path,
        None => cgroup::default_attach_cgroup(&root)?,
    };
    let policy = PolicySource::check(&args).await?;
    let (events, secrets_client) = match &policy {
        PolicySource::Kube { client, node } => {
            (Some(events::start(client.clone(), Some(node.clone()))), Some(client.clone()))
        }
        PolicySource::Manifests { .. } => (None, None),
    };
    // The policy loads while the agent waits for the node's filter: a successor takes over
    // only once it can decide.
    let source = Arc::new(SourceStatus::default());
    let (updates, synced, _watcher) = policy.start(workload_settings(&args), &source, events.clone())?;
    let Installed { lock, control, listener, metrics, mut filter, mut redirects, own, taken } =
        install(&args, listen, &attach_cgroup, log_filter, &source).await?;
    if let Some(logger) = filter.take_kernel_logger() {
        tokio::spawn(drain_kernel_logs(logger));
    }
    let origins = filter.origins();
    let attach_root = cgroup::validate_attach_cgroup(&root, &attach_cgroup)?;
    let telemetry = Arc::new(
        Telemetry::new(attach_root.clone(), &args.bpffs, updates.clone(), Arc::clone(&source))
            .context("setting up metrics")?,
    );
    let decides = explain::Settings { rules: path_rules(&args), deny_unbound: args.deny_unbound };
    telemetry.describe_agent(agent_facts(&args, listen), decides);
    // Not ready until it accepts: the DaemonSet controller stops the old pod once this is.
    telemetry.taking_over(taken.is_some());
    if let Some(control) = control {
        control::serve(control, Arc::clone(&telemetry));
    }
    // Kept here as well as in the duties: without a sender, the accept loops would take the
    // channel's closing for a drain.
    let drain = Arc::new(watch::Sender::new(false));
    let draining = drain.subscribe();
    let metrics = match metrics {
        Some(metrics) => {
            let handed = metrics.as_fd().try_clone_to_owned().context("holding the metrics socket")?;
            telemetry::serve(metrics, Arc::clone(&telemetry), draining.clone());
            Some(handed)
        }
        None => None,
    };
    // Held here, shared with the handover's duties, which let it go on retiring.
    let lock = Arc::new(Mutex::new(Some(lock)));
    let handing = Arc::new(Handing::default());
    let duties = AgentDuties {
        handing: Arc::clone(&handing),
        verdicts: Duty::default(),
        backstop: filter.backstop_duty(),
        draining: Arc::clone(&drain),
        telemetry: Arc::clone(&telemetry),
        lock: Arc::clone(&lock),
        pin_dir: args.bpffs.clone(),
        agent_cgroup: cgroup::own_cgroup_id()?.0,
        retired: retired_mark(&args),
    };
    let verdict_sync = VerdictSync::new(filter, attach_root, args.deny_unbound)?;
    start_verdict_sync(verdict_sync, duties.verdicts.clone(), updates.clone(), synced, Arc::clone(&source))?;

    let state =
        agent_state(&args, AgentParts { root: &root, updates, secrets_client, origins, telemetry, events, draining })?;
    let serving = async {
        let listener = match listener {
            Some(listener) => listener,
            None => claim_port(listen, &mut redirects, &state.telemetry).await?,
        };
        if let Some(taken) = taken {
            // Its programs are in and its policy loaded: it decides as it will from now on
            // (the verdicts it reconciles meanwhile; it is ready once they are).
            let from = taken.from;
            tokio::task::spawn_blocking(move || taken.serving()).await?;
            state.telemetry.taking_over(false);
            tracing::info!(predecessor = from, "took the node over from the earlier agent, which drains");
        }
        offer_handover(&args.handover_socket, &listener, metrics, duties);
        tracing::info!(listen = %listen, agent_cgroup = %own, "filter installed; serving redirected connections");
        server::serve(listener, Arc::clone(&state)).await;
        // Handed over: the successor serves. Idle until stopped (a container that exits is
        // restarted, for nothing).
        let open = server::drained(&state).await;
        tracing::info!(still_open = open, "drained; idle until stopped");
        std::future::pending::<()>().await;
        anyhow::Ok(())
    };

    let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())?;
    tokio::select! {
        served = serving => served?,
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    stop(&state, &handing, &mut redirects).await;
    drop(lock);
    Ok(())
}

/// On `SIGTERM`: a handed-over agent finishes draining and leaves the filter to its
/// successor; the node's agent leaves it refusing what it would redirect.
async fn stop(state: &AgentState, handing: &Handing, redirects: &mut Redirects) {
    let Some(refused) = handing.stop(|| redirects.refuse_on_exit()) else {
        let open = server::drained(state).await;
        return tracing::info!(still_open = open, "exiting; the next agent serves this node");
    };
    match refused {
        Ok(true) => tracing::info!(
            "exiting; the kernel filter stays attached and refuses what it would redirect until the next agent \
             listens (`imds-agent uninstall` removes it)"
        ),
        Ok(false) => tracing::info!("exiting; another agent has taken over the kernel filter"),
        Err(e) => {
            tracing::warn!(error = %anyhow::Error::from(e), "exiting; could not set the filter to refuse redirects");
        }
    }
}

/// What [`agent_state`] is made of besides the arguments.
struct AgentParts<'a> {
    root: &'a Path,
    updates: watch::Receiver<Arc<Snapshot>>,
    secrets_client: Option<kube::Client>,
    origins: Arc<kernel::OriginTable>,
    telemetry: Arc<Telemetry>,
    events: Option<events::DenialEvents>,
    draining: watch::Receiver<bool>,
}

/// What serving a connection needs: the caller resolver, the token path, the limits.
fn agent_state(args: &RunArgs, parts: AgentParts<'_>) -> anyhow::Result<Arc<AgentState>> {
    let AgentParts { root, updates, secrets_client, origins, telemetry, events, draining } = parts;
    let resolver = Arc::new(CgroupResolver::new(root).context("opening the cgroup2 filesystem")?);
    tokio::spawn(prune_resolver(Arc::clone(&resolver), telemetry.cgroups_cached.clone()));
    let upstream =
        Upstream::new(SocketAddr::V4(args.upstream), IMDS_TIMEOUT).with_latency(telemetry.upstream_seconds.clone());
    let tokens = token_service(args, upstream.clone())?;
    telemetry.watch_tokens(Arc::clone(&tokens));
    let limits = ConnectionLimits::new(
        args.max_connections as usize,
        args.max_connections_per_pod as usize,
        telemetry.connections_open.clone(),
    );
    Ok(Arc::new(AgentState {
        snapshot: updates,
        upstream,
        tokens,
        kubelet_dir: args.kubelet_dir.clone(),
        secrets: SecretReader::new(secrets_client),
        rules: path_rules(args),
        mode: match args.mode {
            ModeArg::Enforce => Mode::Enforce,
            ModeArg::Audit => Mode::Audit,
        },
        pod_grace: args.pod_grace,
        origins,
        resolver,
        telemetry,
        events,
        limits,
        draining,
    }))
}

fn path_rules(args: &RunArgs) -> PathRules {
    if args.forward_all_paths {
        PathRules::ForwardAll
    } else {
        PathRules::Allow(args.allow_paths.clone())
    }
}

/// Lets the next agent take over from this one ([`handover`]). Without it, the next agent
/// waits for this one to exit (a rolling update with `maxUnavailable: 0` waits with it):
/// said, not fatal.
fn offer_handover(socket: &Path, listener: &TcpListener, metrics: Option<OwnedFd>, duties: AgentDuties) {
    let offered = (|| {
        let lock = duties.lock.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(bpffs::PinDirLock::share);
        let lock = lock.context("the pin directory's lock is held")?.context("sharing the pin directory's lock")?;
        let listener = listener.as_fd().try_clone_to_owned().context("sharing the listening socket")?;
        handover::offer(socket, handover::Offer { lock, listener, metrics }, duties).map_err(anyhow::Error::from)
    })();
    if let Err(e) = offered {
        tracing::error!(
            error = %format!("{e:#}"),
            "no handover: the next agent will wait for this one to exit, and connections are refused between the two"
        );
    }
}

/// The mark an agent that handed its node over leaves next to its control socket (in its
/// pod's own directory on Kubernetes).
fn retired_mark(args: &RunArgs) -> RetiredMark {
    RetiredMark { path: args.control_socket.with_extension("retired"), pod_uid: args.pod_uid.clone() }
}

/// What [`install`] holds for the agent's life.
struct Installed {
    /// One agent at a time owns the node's filter.
    lock: bpffs::PinDirLock,
    control: Option<tokio::net::UnixListener>,
    /// `None`: another process held the port (redirects are refused until it is claimed).
    listener: Option<TcpListener>,
    /// The metrics port (`--metrics`).
    metrics: Option<TcpListener>,
    filter: Filter,
    redirects: Redirects,
    /// The agent's cgroup, as its log names it.
    own: String,
    /// The handover from the agent this one replaces, until this one serves.
    taken: Option<handover::Taken>,
}

/// Takes the node's filter: the lock, or a handover from the agent holding it; binds the
/// listener (unless handed over), then installs the kernel programs.
async fn install(
    args: &RunArgs,
    listen: SocketAddrV4,
    attach_cgroup: &Path,
    log_filter: &str,
    source: &SourceStatus,
) -> anyhow::Result<Installed> {
    let (agent_cgroup, own) = cgroup::own_cgroup_id()?;
    let retired = retired_mark(args);
    let (lock, mut taken) = match succession::claim_node(&args.bpffs, &args.handover_socket, &retired, source).await? {
        Start::Fresh(lock) => (lock, None),
        Start::TakenOver(lock, taken) => {
            tracing::info!(predecessor = taken.from, "the agent serving this node hands it over");
            (lock, Some(taken))
        }
    };
    // From here on this agent writes the kernel's state: the one handing over must have
    // let it (it may have taken its duties back instead).
    if let Some(mut handing) = taken.take() {
        let asked = tokio::task::spawn_blocking(move || handing.installing().map(|()| handing)).await?;
        taken = Some(asked.context("taking the node over")?);
    }
    // Another agent answering here is an error, unless it handed over (on a node where both
    // use one path; pods have their own).
    let control = claim_control(&args.control_socket, taken.is_some()).await?;
    // Bind before attaching anything: a bad --listen must not leave a half-installed filter.
    // A bind guard an earlier agent left admits only the agents it knows: become one first.
    kernel::admit_agent(&args.bpffs, agent_cgroup)?;
    let listener = match taken.as_mut().and_then(|t| handed(t.listener.take(), SocketAddr::V4(listen))) {
        Some(listener) => Some(listener),
        None => listener::try_bind(listen).with_context(|| format!("listening on {listen}"))?,
    };
    if taken.is_some() && listener.is_none() {
        // Installing with redirects refused would refuse what the earlier agent served.
        bail!("{listen} is held by another process: cannot take the node over");
    }
    let metrics = match args.metrics {
        None => None,
        Some(addr) => Some(match taken.as_mut().and_then(|t| handed(t.metrics.take(), addr)) {
            Some(metrics) => metrics,
            None => TcpListener::bind(addr).await.with_context(|| format!("serving metrics on {addr}"))?,
        }),
    };
    warn_if_ephemeral(listen);
    for warning in kernel::protection_warnings(&args.protected, &args.protected_addresses) {
        tracing::warn!("{warning}");
    }
    let agent_netns_cookie = listener::netns_cookie().context("reading the network namespace's cookie")?;
    let options = FilterOptions {
        agent_cgroup,
        listening: listener.is_some(),
        agent_netns_cookie,
        ..filter_options(args, attach_cgroup, listen, log_filter)
    };
    let mut filter = Filter::install(&options)?;
    let redirects = filter.take_redirects().context("the filter's redirect switch was taken")?;
    Ok(Installed { lock, control, listener, metrics, filter, redirects, own, taken })
}

/// A socket the earlier agent handed over, if it listens on `addr` (the address may have
/// changed with the upgrade: then this agent binds its own).
fn handed(socket: Option<std::net::TcpListener>, addr: SocketAddr) -> Option<TcpListener> {
    let socket = socket?;
    let local = socket.local_addr().ok()?;
    if local != addr {
        tracing::info!(handed = %local, wanted = %addr, "the earlier agent listened elsewhere; binding anew");
        return None;
    }
    socket.set_nonblocking(true).ok()?;
    TcpListener::from_std(socket).ok()
}

/// The port someone else held at start, once the agent holds it: redirects resume.
async fn claim_port(
    listen: SocketAddrV4,
    redirects: &mut Redirects,
    telemetry: &Telemetry,
) -> anyhow::Result<TcpListener> {
    let listener = listener::claim(listen, |why| telemetry.port_held(Some(why.to_owned()))).await;
    redirects.resume().context("letting the kernel redirect to the agent again")?;
    telemetry.port_held(None);
    tracing::info!(%listen, "the agent's port is free again and now the agent's; redirecting resumes");
    Ok(listener)
}

/// An unbound socket can be given an ephemeral port with no `bind()` the guard sees.
fn warn_if_ephemeral(listen: SocketAddrV4) {
    if listener::ephemeral(listen.port()) == Some(true) {
        tracing::warn!(
            port = listen.port(),
            "the agent's port is in net.ipv4.ip_local_port_range: while no agent runs, any process \
             could be handed it without a bind the kernel guard sees; pick a port outside the range \
             or add it to net.ipv4.ip_local_reserved_ports"
        );
    }
}

/// The filter as the arguments describe it, for an agent outside the hierarchy that holds
/// its port in every namespace (`install` fills in the agent's own).
fn filter_options(args: &RunArgs, attach_cgroup: &Path, listen: SocketAddrV4, log_filter: &str) -> FilterOptions {
    FilterOptions {
        attach_cgroup: attach_cgroup.to_owned(),
        pin_dir: args.bpffs.clone(),
        agent: listen,
        protected: args.protected.clone(),
        protected_addresses: args.protected_addresses.clone(),
        default_verdict: args.default_verdict.into(),
        agent_cgroup: 0,
        listening: true,
        agent_netns_cookie: 0,
        kernel_log_level: kernel_log_level(log_filter),
        origin_ttl: Duration::from_secs(args.origin_ttl),
        node_backstop: args.node_backstop,
        nat64_prefixes: args.nat64_prefixes.clone(),
    }
}

fn workload_settings(args: &RunArgs) -> WorkloadSettings {
    WorkloadSettings {
        mode: match args.workload_identity {
            WorkloadArg::Label => WorkloadMode::Label,
            WorkloadArg::Annotated => WorkloadMode::Annotated,
            WorkloadArg::Off => WorkloadMode::Off,
        },
        default_tenant: args.tenant_id.clone(),
    }
}

/// The token path: cache, budgets, IMDS and Entra.
fn token_service(args: &RunArgs, imds: Upstream) -> anyhow::Result<Arc<TokenService>> {
    let entra = Entra::new(&args.authority_host)?;
    Ok(TokenService::start(
        imds,
        entra,
        TokenConfig {
            cache: CacheConfig { max_entries: args.token_cache_entries, ..CacheConfig::default() },
            budget: BudgetConfig {
                per_second: args.upstream_rate as usize,
                in_flight: args.upstream_concurrency as usize,
                ..BudgetConfig::default()
            },
            ..TokenConfig::default()
        },
    ))
}

/// Where the policy comes from, checked before anything changes.
enum PolicySource {
    /// Loaded already: a broken file is an error now, and later only keeps the previous policy.
    Manifests {
        dir: PathBuf,
        initial: Snapshot,
    },
    Kube {
        client: kube::Client,
        node: String,
    },
}

impl PolicySource {
    async fn check(args: &RunArgs) -> anyhow::Result<PolicySource> {
        if let Some(dir) = &args.manifests {
            return Ok(PolicySource::Manifests { dir: dir.clone(), initial: manifests::load_dir(dir)? });
        }
        let node =
            args.node_name.clone().context("--kube needs this node's name: set NODE_NAME or pass --node-name")?;
        let client = kube_client(args.kubeconfig.as_deref()).await?;
        Ok(PolicySource::Kube { client, node })
    }

    /// Starts watching; returns the snapshots, whether the first is synced already, and the
    /// file watcher to keep alive (manifests only).
    fn start(
        self,
        workload: WorkloadSettings,
        status: &Arc<SourceStatus>,
        events: Option<events::DenialEvents>,
    ) -> anyhow::Result<(watch::Receiver<Arc<Snapshot>>, bool, Option<notify::RecommendedWatcher>)> {
        match self {
            PolicySource::Manifests { dir, initial } => {
                let (snapshots, updates) = watch::channel(Arc::new(initial.with_workload(workload.clone())));
                status.loaded();
                let watcher = manifests::watch(&dir, workload, snapshots, Arc::clone(status))
                    .context("watching the manifests directory")?;
                Ok((updates, true, Some(watcher)))
            }
            PolicySource::Kube { client, node } => {
                let (snapshots, updates) = watch::channel(Arc::new(Snapshot::default()));
                let status = Arc::clone(status);
                tokio::spawn(async move {
                    kube_source::run(client, &node, workload, snapshots, status, events).await;
                });
                Ok((updates, false, None))
            }
        }
    }
}

/// A client from `--kubeconfig`, else kube's defaults (in-cluster, then KUBECONFIG).
async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let mut config = match kubeconfig {
        None => kube::Config::infer()
            .await
            .context("finding the Kubernetes API (in-cluster service account, or KUBECONFIG)")?,
        Some(path) => {
            let file =
                kube::config::Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using {}", path.display()))?
        }
    };
    // kube retries 429/503 inside a request for minutes; the watchers back off on their own,
    // and an API server in trouble must show in readiness (fail-static) at once.
    config.default_retry = false;
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

/// Kernel verdicts come only from a synced snapshot: the API source publishes its first one
/// after the initial lists, and until then every pod keeps the default (REDIRECT).
fn start_verdict_sync(
    sync: VerdictSync,
    duty: Duty,
    updates: watch::Receiver<Arc<Snapshot>>,
    synced: bool,
    source: Arc<SourceStatus>,
) -> anyhow::Result<()> {
    if synced {
        return spawn_verdict_sync(sync, duty, updates, source);
    }
    let mut first = updates;
    tokio::spawn(async move {
        if first.changed().await.is_ok() {
            if let Err(e) = spawn_verdict_sync(sync, duty, first, source) {
                tracing::error!(error = %format!("{e:#}"), "starting the kernel verdict sync");
            }
        }
    });
    Ok(())
}

/// What `/status` says this agent is.
fn agent_facts(args: &RunArgs, listen: SocketAddrV4) -> status::AgentStatus {
    status::AgentStatus {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        mode: match args.mode {
            ModeArg::Enforce => "enforce",
            ModeArg::Audit => "audit",
        }
        .to_owned(),
        source: match &args.manifests {
            Some(dir) => format!("manifests {}", dir.display()),
            None => "kube".to_owned(),
        },
        listen: listen.to_string(),
        ..status::AgentStatus::default()
    }
}

/// The control socket, or `None` (logged) when it cannot be made: filtering does not depend
/// on it. Another agent answering there is an error, unless it `handed_over` to this one.
async fn claim_control(path: &Path, handed_over: bool) -> anyhow::Result<Option<tokio::net::UnixListener>> {
    match control::claim(path, handed_over).await {
        Ok(listener) => Ok(Some(listener)),
        Err(e @ control::ControlError::InUse(_)) => Err(e.into()),
        Err(e) => {
            let error = format!("{:#}", anyhow::Error::from(e));
            tracing::error!(%error, "no control socket: `imds-agent status` and `explain` cannot ask this agent");
            Ok(None)
        }
    }
}

/// `--listen`, else the node's address from the downward API.
fn listen_address(given: Option<SocketAddrV4>) -> anyhow::Result<SocketAddrV4> {
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

/// Syncs the kernel verdicts now, then on every policy change and every second (new pod
/// cgroups appear without a policy change). Runs on its own thread: it walks cgroupfs.
/// The first sync also removes what the pinned map held that the policy no longer wants; the
/// agent reports ready only after it ([`SourceStatus::reconciled`]).
fn spawn_verdict_sync(
    mut sync: VerdictSync,
    duty: Duty,
    mut updates: watch::Receiver<Arc<Snapshot>>,
    source: Arc<SourceStatus>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new().name("verdict-sync".into()).spawn(move || {
        let (mut last_error, mut in_place) = (None, false);
        loop {
            if in_place || last_error.is_some() {
                // The timer must be created inside the runtime, hence the async block.
                let changed =
                    runtime.block_on(async { tokio::time::timeout(Duration::from_secs(1), updates.changed()).await });
                if matches!(changed, Ok(Err(_))) {
                    return; // the policy source is gone: the agent is shutting down
                }
            }
            let snapshot = Arc::clone(&updates.borrow_and_update());
            // Paused while another agent takes over (the first sync too); after a pause, what
            // the maps hold may be that agent's writing: read again.
            let Some(synced) = duty.perform(|reread| {
                if reread {
                    sync.reread()?;
                }
                sync.sync(&snapshot)
            }) else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            match synced {
                Ok(r) => {
                    last_error = None;
                    source.reconciled();
                    if !in_place || r.set + r.cleared + r.sources_added + r.sources_removed > 0 {
                        tracing::info!(
                            pod_cgroups = r.pod_cgroups,
                            set = r.set,
                            cleared = r.cleared,
                            pass_sources_added = r.sources_added,
                            pass_sources_removed = r.sources_removed,
                            "{}",
                            if in_place { "kernel verdicts updated" } else { "kernel verdicts in place" }
                        );
                    }
                    in_place = true;
                }
                Err(e) => {
                    // Retried every second; said once until it changes or recovers.
                    let message = format!("{:#}", anyhow::Error::from(e));
                    if last_error.as_ref() != Some(&message) {
                        tracing::error!(error = %message, "updating kernel verdicts");
                        last_error = Some(message);
                    }
                }
            }
        }
    })?;
    Ok(())
}

/// Forgets cgroups that went away, so the cache stays the size of the node's pods (a stat
/// per cached cgroup every 10 s), and reports what it holds.
async fn prune_resolver(resolver: Arc<CgroupResolver>, cached: prometheus_client::metrics::gauge::Gauge) {
    let mut every = tokio::time::interval(Duration::from_secs(10));
    loop {
        every.tick().await;
        let resolver = Arc::clone(&resolver);
        if let Ok(held) = tokio::task::spawn_blocking(move || {
            resolver.prune();
            resolver.cached()
        })
        .await
        {
            cached.set(i64::try_from(held).unwrap_or(i64::MAX));
        }
    }
}

async fn drain_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and unchanged for as long
    // as the logger lives, i.e. as long as this AsyncFd owns it.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => return tracing::warn!(error = %e, "cannot watch kernel log buffer"),
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => return tracing::warn!(error = %e, "kernel log buffer closed"),
        }
    }
}

/// Kernel programs log at most as verbosely as the agent's own filter asks for.
fn kernel_log_level(filter: &str) -> log::LevelFilter {
    let f = filter.to_ascii_lowercase();
    if f.contains("trace") {
        log::LevelFilter::Trace
    } else if f.contains("debug") {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    }
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
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rendering);
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
    fn the_charts_daemonset_passes_arguments_the_agent_accepts() {
        let (defaults, _) = run_args("deploy/kubernetes/imds-filter.yaml");
        assert!(defaults.kube && matches!(defaults.mode, ModeArg::Enforce));
        assert_eq!(defaults.listen, Some("10.0.0.4:8182".parse().unwrap()));
        assert!(matches!(defaults.workload_identity, WorkloadArg::Label));

        let (every, container) = run_args("tests/fixtures/helm/every-option.yaml");
        assert!(matches!(every.mode, ModeArg::Audit) && every.deny_unbound);
        assert!(matches!(every.workload_identity, WorkloadArg::Annotated));
        assert_eq!(
            (every.listen, every.metrics),
            (Some("10.0.0.4:18182".parse().unwrap()), Some("10.0.0.4:19402".parse().unwrap()))
        );
        assert_eq!(every.pod_grace, Duration::from_millis(500));
        assert_eq!(every.allow_paths.len(), 2);
        assert_eq!((every.max_connections, every.protected.len()), (8192, 1));

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
}
