//! The agent's start-up and life: take the node (or wait for it), bind, install the kernel
//! programs, load the policy, serve, hand over or stop. `imds-agent run` calls [`run`].
//!
//! The order matters, and each step says why: the policy loads first (a successor takes over
//! only once it can decide); the node's lock, or a handover, before anything is touched;
//! the listener before the kernel programs (a bad `--listen` must not leave a half-installed
//! filter); kernel verdicts only from a loaded policy.
use parking_lot::Mutex;
use std::{
    net::{SocketAddr, SocketAddrV4},
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context as _};
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};

use crate::{
    caller::{self, CgroupResolver},
    cli::{listen_address, RunArgs},
    control, events, explain, handover,
    imds::PathRules,
    kernel::{self, bpffs, cgroup, Duty, Filter, FilterOptions, Redirects},
    policy::{Snapshot, WorkloadSettings},
    secrets::SecretReader,
    server::{self, limits::ConnectionLimits, listener, AgentState, Mode},
    sources::PolicySource,
    status,
    succession::{self, AgentDuties, Handing, RetiredMark, Start},
    telemetry::{self, SourceStatus, Telemetry},
    tokens::{budget::BudgetConfig, cache::CacheConfig, entra::Entra, TokenConfig, TokenService},
    upstream::{Upstream, IMDS_TIMEOUT},
    verdicts::{self, VerdictSync},
};

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

pub async fn run(args: RunArgs, log_filter: &str) -> anyhow::Result<()> {
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
    let policy =
        PolicySource::check(args.manifests.as_deref(), args.node_name.clone(), args.kubeconfig.as_deref()).await?;
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
        tokio::spawn(kernel::logs::drain(logger));
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
    verdicts::start_sync(verdict_sync, duties.verdicts.clone(), updates.clone(), synced, Arc::clone(&source))?;

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
    tokio::spawn(caller::prune_every_10s(Arc::clone(&resolver), telemetry.cgroups_cached.clone()));
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
        mode: args.mode,
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
        let lock = duties.lock.lock().as_ref().map(bpffs::PinDirLock::share);
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
    let listener = match taken.as_mut().and_then(|t| listener::handed(t.listener.take(), SocketAddr::V4(listen))) {
        Some(listener) => Some(listener),
        None => listener::try_bind(listen).with_context(|| format!("listening on {listen}"))?,
    };
    if taken.is_some() && listener.is_none() {
        // Installing with redirects refused would refuse what the earlier agent served.
        bail!("{listen} is held by another process: cannot take the node over");
    }
    let metrics = match args.metrics {
        None => None,
        Some(addr) => Some(match taken.as_mut().and_then(|t| listener::handed(t.metrics.take(), addr)) {
            Some(metrics) => metrics,
            None => TcpListener::bind(addr).await.with_context(|| format!("serving metrics on {addr}"))?,
        }),
    };
    listener::warn_if_ephemeral(listen);
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
        kernel_log_level: kernel::logs::level(log_filter),
        origin_ttl: Duration::from_secs(args.origin_ttl),
        node_backstop: args.node_backstop,
        nat64_prefixes: args.nat64_prefixes.clone(),
    }
}

fn workload_settings(args: &RunArgs) -> WorkloadSettings {
    WorkloadSettings { mode: args.workload_identity, default_tenant: args.tenant_id.clone() }
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

/// What `/status` says this agent is.
fn agent_facts(args: &RunArgs, listen: SocketAddrV4) -> status::AgentStatus {
    status::AgentStatus {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        mode: match args.mode {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
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
