//! The agent's start-up and life: take the node (or wait for it), bind, install the kernel
//! programs, load the policy, serve, hand over or stop. `imds-agent run` builds a [`Config`]
//! from its arguments and calls [`run`].
//!
//! The order matters, and each step says why: the policy loads first (a successor takes over
//! only once it can decide); then [`startup`] takes the node, in an order its tests check (the
//! node's lock, or a handover, before anything is touched; the listener before the kernel
//! programs); kernel verdicts only from a loaded policy ([`verdicts::start_sync`]).
use parking_lot::Mutex;
use std::{
    net::{SocketAddr, SocketAddrV4},
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    sync::Arc,
};

use anyhow::Context as _;
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};

use crate::{
    caller::{self, CgroupResolver},
    events, handover,
    kernel::{self, bpffs, cgroup, Duty, Redirects},
    operator::control,
    policy::Snapshot,
    secrets::SecretReader,
    server::{self, limits::ConnectionLimits, listener, AgentState},
    sources::{PolicySource, Started},
    succession::{AgentDuties, Handing},
    taint,
    telemetry::{self, SourceStatus, Telemetry},
    tokens::{entra::Entra, TokenService},
    upstream::{Upstream, IMDS_TIMEOUT},
    verdicts::{self, VerdictSync},
};

mod config;
mod startup;

pub use config::Config;

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

/// Most glibc malloc arenas. By default glibc gives threads up to eight arenas per core, and
/// each keeps what it freed: with the blocking threads that resolve callers' cgroups during a
/// burst of new pods, the agent's resident memory stepped up by an arena's worth at a time
/// and stayed there. Two arenas hold the agent's allocations (short requests, a policy
/// rebuilt now and then) with no contention worth measuring.
const MALLOC_ARENAS: libc::c_int = 2;

fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; it has no preconditions, and glibc
    // applies M_ARENA_MAX to arenas made from now on.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) } != 1 {
        tracing::debug!("the allocator did not take M_ARENA_MAX");
    }
}

/// Runs the agent until it is stopped (`SIGTERM`, `SIGINT`) or fails.
///
/// # Errors
/// The kernel programs are not built, the node cannot be taken, or serving fails.
pub async fn run(config: Config) -> anyhow::Result<()> {
    if !kernel::programs_built() {
        return Err(kernel::FilterError::NotBuilt.into());
    }
    raise_limits(config.max_connections);
    limit_malloc_arenas();
    let policy =
        PolicySource::check(config.manifests.as_deref(), config.node_name.clone(), config.kubeconfig.as_deref())
            .await?;
    let (events, secrets_client, node) = match &policy {
        PolicySource::Kube { client, node } => (
            Some(events::start(client.clone(), Some(node.clone()))),
            Some(client.clone()),
            Some((client.clone(), node.clone())),
        ),
        PolicySource::Manifests { .. } => (None, None, None),
    };
    // The policy loads while the agent waits for the node's filter: a successor takes over
    // only once it can decide.
    let source = Arc::new(SourceStatus::default());
    let Started { updates, synced, watcher: _watcher, lookup } =
        policy.start(config.policy.clone(), &source, events.clone(), config.pod_lookups)?;
    let (agent_cgroup, own) = cgroup::own_cgroup_id()?;
    let mut steps = startup::OnNode { config: &config, source: &source, agent_cgroup };
    let startup::Taken { lock, handover: taken, control, listener, metrics, mut filter } =
        startup::take_node(&mut steps).await?;
    let mut redirects = filter.take_redirects().context("the filter's redirect switch was taken")?;
    if let Some(logger) = filter.take_kernel_logger() {
        tokio::spawn(kernel::logs::drain(logger));
    }
    let origins = filter.origins();
    let attach_cgroup = config.filter.attach_cgroup.clone();
    let telemetry = Arc::new(
        Telemetry::new(attach_cgroup.clone(), config.pin_dir(), updates.clone(), Arc::clone(&source))
            .context("setting up metrics")?,
    );
    // Not ready until it accepts: the DaemonSet controller stops the old pod once this is.
    telemetry.taking_over(taken.is_some());
    // Kept here as well as in the duties: without a sender, the accept loops would take the
    // channel's closing for a drain.
    let drain = Arc::new(watch::Sender::new(false));
    let draining = drain.subscribe();
    let metrics = serve_operators(&config, control, metrics, &telemetry, &updates, &draining)?;
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
        pin_dir: config.pin_dir().to_owned(),
        agent_cgroup,
        retired: config.retired.clone(),
    };
    let verdict_sync = VerdictSync::new(filter, attach_cgroup, config.deny_unbound)?;
    verdicts::start_sync(verdict_sync, duties.verdicts.clone(), updates.clone(), synced, Arc::clone(&source))?;

    let parts = AgentParts { updates, lookup, secrets_client, origins, telemetry, events, draining };
    let state = agent_state(&config, parts)?;
    tokio::spawn(server::prefetch::run(Arc::clone(&state)));
    let untaint = match (node, config.startup_taint.clone()) {
        (Some((client, node)), Some(key)) => Some((client, node, key)),
        _ => None,
    };
    let listen = config.listen;
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
        // Only now that it holds its port (and serves once ready) may the node's startup
        // taint go.
        if let Some((client, node, key)) = untaint {
            let telemetry = Arc::clone(&state.telemetry);
            tokio::spawn(taint::remove_when_ready(client, node, key, move || telemetry.readiness().0));
        }
        offer_handover(&config.handover_socket, &listener, metrics, duties);
        if let Some(host_token) = config.host_token.clone() {
            tokio::spawn(server::host_token::run(host_token, Arc::clone(&state)));
        }
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

/// Answers the control socket (the agent's account of itself) and the metrics port; returns
/// a hold on the metrics socket, for the next agent.
fn serve_operators(
    config: &Config,
    control: Option<tokio::net::UnixListener>,
    metrics: Option<TcpListener>,
    telemetry: &Arc<Telemetry>,
    updates: &watch::Receiver<Arc<Snapshot>>,
    draining: &watch::Receiver<bool>,
) -> anyhow::Result<Option<OwnedFd>> {
    if let Some(control) = control {
        let account = control::server::Account {
            facts: config.facts(),
            settings: config.explain_settings(),
            snapshot: updates.clone(),
            telemetry: Arc::clone(telemetry),
        };
        control::server::serve(control, account);
    }
    let Some(metrics) = metrics else { return Ok(None) };
    let handed = metrics.as_fd().try_clone_to_owned().context("holding the metrics socket")?;
    telemetry::serve(metrics, Arc::clone(telemetry), draining.clone());
    Ok(Some(handed))
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

/// What [`agent_state`] is made of besides the config.
struct AgentParts {
    updates: watch::Receiver<Arc<Snapshot>>,
    lookup: Option<crate::sources::kube::PodLookup>,
    secrets_client: Option<kube::Client>,
    origins: Arc<kernel::OriginTable>,
    telemetry: Arc<Telemetry>,
    events: Option<events::DenialEvents>,
    draining: watch::Receiver<bool>,
}

/// What serving a connection needs: the caller resolver, the token path, the limits.
fn agent_state(config: &Config, parts: AgentParts) -> anyhow::Result<Arc<AgentState>> {
    let AgentParts { updates, lookup, secrets_client, origins, telemetry, events, draining } = parts;
    let resolver = Arc::new(CgroupResolver::new(&config.cgroup_root).context("opening the cgroup2 filesystem")?);
    tokio::spawn(caller::prune_every_10s(Arc::clone(&resolver), telemetry.cgroups_cached.clone()));
    let upstream =
        Upstream::new(SocketAddr::V4(config.upstream), IMDS_TIMEOUT).with_latency(telemetry.upstream_seconds.clone());
    let entra = Entra::new(&config.authority_host)?;
    let tokens = TokenService::start(upstream.clone(), entra, config.tokens);
    telemetry.watch_tokens(Arc::clone(&tokens));
    let limits = ConnectionLimits::new(
        config.max_connections as usize,
        config.max_connections_per_pod as usize,
        telemetry.connections_open.clone(),
    );
    Ok(Arc::new(AgentState {
        snapshot: updates,
        upstream,
        tokens,
        path_budget: crate::tokens::budget::Budget::start(config.path_budget),
        kubelet_dir: config.kubelet_dir.clone(),
        secrets: SecretReader::new(secrets_client),
        rules: config.rules.clone(),
        mode: config.mode,
        pod_grace: config.pod_grace,
        lookup,
        workloads: server::prefetch::Workloads::default(),
        origins,
        resolver,
        telemetry,
        events,
        limits,
        draining,
    }))
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
