//! `imds-agent`: installs the in-kernel IMDS filter and serves the connections it redirects.
use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use imds_agent::kernel::{
    self, bpffs::DEFAULT_PIN_DIR, cgroup, origin::DEFAULT_ORIGIN_TTL, Filter, FilterOptions, OriginLookup, OriginTable,
    IMDS_ENDPOINT,
};
use imds_common::Verdict;
use tokio::{io::unix::AsyncFd, net::TcpListener, signal::unix::SignalKind};
use tracing_subscriber::EnvFilter;

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

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Install the kernel filter (or take over the pinned one) and serve redirected connections.
    Run(RunArgs),
    /// Detach the kernel filter and remove its pinned state.
    Uninstall {
        /// bpffs directory holding the pins.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        bpffs: PathBuf,
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
    /// be reachable from the filtered processes' network namespaces (e.g. the node IP).
    #[arg(long, env = "IMDS_AGENT_LISTEN")]
    listen: SocketAddrV4,
    /// Protected endpoint (repeatable).
    #[arg(long = "protect", value_name = "ADDR:PORT", default_values_t = [IMDS_ENDPOINT])]
    protected: Vec<SocketAddrV4>,
    /// Verdict for cgroups the agent has no entry for.
    #[arg(long, value_enum, default_value_t = DefaultVerdict::Redirect)]
    default_verdict: DefaultVerdict,
    /// Seconds an origin record stays valid after `connect()`.
    #[arg(long, default_value_t = DEFAULT_ORIGIN_TTL.as_secs())]
    origin_ttl: u64,
}

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
        Command::Run(args) => tokio::runtime::Runtime::new()?.block_on(run(args, &cli.log)),
        Command::Uninstall { bpffs } => {
            let done = kernel::uninstall(&bpffs)?;
            if done.links.is_empty() && done.maps.is_empty() {
                println!("nothing installed under {}", bpffs.display());
            } else {
                println!(
                    "detached {} link(s) and removed {} map pin(s) from {}",
                    done.links.len(),
                    done.maps.len(),
                    bpffs.display()
                );
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

async fn run(args: RunArgs, log_filter: &str) -> anyhow::Result<()> {
    if !kernel::programs_built() {
        return Err(kernel::FilterError::NotBuilt.into());
    }
    if args.listen.ip().is_unspecified() {
        bail!("--listen must be a concrete address: the kernel rewrites connections to it");
    }
    let root = cgroup::cgroup2_root()?;
    let attach_cgroup = match args.attach_cgroup {
        Some(path) => path,
        None => cgroup::default_attach_cgroup(&root)?,
    };
    let own = cgroup::own_cgroup(&root)?;
    let exempt_cgroup = cgroup::cgroup_id(&own)?;

    // Bind before touching the kernel: a bad --listen must not leave a half-installed filter.
    let listener = TcpListener::bind(SocketAddr::V4(args.listen))
        .await
        .with_context(|| format!("listening on {}", args.listen))?;

    let mut filter = Filter::install(&FilterOptions {
        attach_cgroup,
        pin_dir: args.bpffs,
        agent: args.listen,
        protected: args.protected,
        default_verdict: args.default_verdict.into(),
        exempt_cgroup,
        kernel_log_level: kernel_log_level(log_filter),
        origin_ttl: Duration::from_secs(args.origin_ttl),
    })?;
    if let Some(logger) = filter.take_kernel_logger() {
        tokio::spawn(drain_kernel_logs(logger));
    }
    tracing::info!(listen = %args.listen, agent_cgroup = %own.display(), "filter installed; serving redirected connections");

    let origins = filter.origins();
    let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => { tokio::spawn(serve(stream, Arc::clone(&origins))); }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("exiting; the kernel filter stays attached (`imds-agent uninstall` removes it)");
    Ok(())
}

/// Identifies the caller of one redirected connection. Serving the IMDS protocol on it is
/// the next step (issue #3); until then the connection is logged and closed.
async fn serve(stream: tokio::net::TcpStream, origins: Arc<OriginTable>) {
    let peer = stream.peer_addr().ok();
    match tokio::task::spawn_blocking(move || origins.take_for(&stream)).await {
        Ok(Ok(OriginLookup::Found(o))) => tracing::info!(
            event = "origin",
            peer = ?peer,
            cgroup_id = o.cgroup_id,
            pid = o.pid,
            tid = o.tid,
            uid = o.uid,
            gid = o.gid,
            original_dst = %o.original_dst,
            ipv6_socket = o.ipv6_socket,
            age_us = o.age.as_micros() as u64,
            "redirected connection"
        ),
        Ok(Ok(OriginLookup::Missing)) => {
            tracing::warn!(event = "refused", peer = ?peer, reason = "no kernel origin record", "refused a connection that was not redirected by the filter");
        }
        Ok(Ok(OriginLookup::Expired { age })) => {
            tracing::warn!(event = "refused", peer = ?peer, reason = "origin record expired", age_ms = age.as_millis() as u64, "refused a connection with a stale origin record");
        }
        Ok(Err(e)) => {
            // The whole chain: the map error under the lookup's own message.
            let error = format!("{:#}", anyhow::Error::from(e));
            tracing::error!(event = "refused", peer = ?peer, error, "origin lookup failed");
        }
        Err(e) => tracing::error!(error = %e, "origin lookup task failed"),
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
