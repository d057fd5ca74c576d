//! The agent's settings: `imds-agent run`'s arguments, checked and resolved once, before
//! anything on the node is touched.
use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    cli::{listen_address, RunArgs},
    imds::PathRules,
    kernel::{self, cgroup, FilterOptions},
    operator::{explain, status::AgentStatus},
    policy::PolicySettings,
    server::Mode,
    succession::RetiredMark,
    tokens::{budget::BudgetConfig, cache::CacheConfig, entra::Entra, TokenConfig},
};

/// Everything the agent's start-up needs to know, resolved: where it listens, which cgroup
/// it filters, how it decides and serves.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where redirected connections are served.
    pub listen: SocketAddrV4,
    /// The cgroup v2 mount the node's cgroups are under.
    pub cgroup_root: PathBuf,
    /// The filter as it will be installed; [`FilterOptions::agent_cgroup`],
    /// [`FilterOptions::listening`] and [`FilterOptions::agent_netns_cookie`] are the agent's
    /// own, filled in when it installs.
    pub filter: FilterOptions,
    pub control_socket: PathBuf,
    pub handover_socket: PathBuf,
    /// The mark this agent leaves when it hands its node over.
    pub retired: RetiredMark,
    /// The metrics port (`--metrics`).
    pub metrics: Option<SocketAddr>,
    /// Where the policy comes from: a manifests directory, else the API server.
    pub manifests: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub node_name: Option<String>,
    /// The taint removed from the node once the agent is ready (`--kube` only).
    pub startup_taint: Option<String>,
    /// The policy's own settings (workload identity, the default identity scope).
    pub policy: PolicySettings,
    /// The metadata service the agent asks.
    pub upstream: SocketAddrV4,
    /// Entra's authority host, for workload identity and service principals.
    pub authority_host: String,
    pub tokens: TokenConfig,
    /// The budget for metadata paths other than the token endpoint.
    pub path_budget: BudgetConfig,
    /// How `/host/token` is served, if it is.
    pub host_token: Option<crate::server::host_token::HostTokenConfig>,
    pub max_connections: u32,
    pub max_connections_per_pod: u32,
    pub kubelet_dir: PathBuf,
    pub rules: PathRules,
    pub mode: Mode,
    pub deny_unbound: bool,
    pub pod_grace: Duration,
    /// The least time between two pod lookups (`None`: no lookups).
    pub pod_lookups: Option<Duration>,
}

impl TryFrom<RunArgs> for Config {
    type Error = anyhow::Error;

    /// Resolves the listen address and the attach cgroup, and checks the latter is a child
    /// cgroup. The kernel programs' log level follows the agent's logger, so the logger is
    /// set up first.
    fn try_from(args: RunArgs) -> anyhow::Result<Config> {
        let listen = listen_address(args.listen)?;
        let cgroup_root = cgroup::cgroup2_root()?;
        let attach_cgroup = match &args.filter.attach_cgroup {
            Some(path) => path.clone(),
            None => cgroup::default_attach_cgroup(&cgroup_root)?,
        };
        let attach_cgroup = cgroup::validate_attach_cgroup(&cgroup_root, &attach_cgroup)
            .with_context(|| format!("--attach-cgroup {}", attach_cgroup.display()))?;
        // Checked now, before the node is claimed: what install and the token path would
        // refuse later.
        kernel::group_endpoints(&args.filter.protected, &args.filter.protected_addresses)?;
        kernel::nat64_table(&args.filter.nat64_prefixes)?;
        Entra::new(&args.authority_host).with_context(|| format!("--authority-host {}", args.authority_host))?;
        let pods_under = format!("/{}", attach_cgroup.strip_prefix(&cgroup_root).unwrap_or(&attach_cgroup).display());
        let filter = FilterOptions {
            attach_cgroup,
            pin_dir: args.filter.bpffs.clone(),
            agent: listen,
            protected: args.filter.protected,
            protected_addresses: args.filter.protected_addresses,
            default_verdict: args.default_verdict.into(),
            agent_cgroup: 0,
            listening: true,
            agent_netns_cookie: 0,
            kernel_log_level: log::max_level(),
            origin_ttl: Duration::from_secs(args.origin_ttl),
            node_backstop: args.filter.node_backstop,
            nat64_prefixes: args.filter.nat64_prefixes,
        };
        Ok(Config {
            listen,
            cgroup_root,
            filter,
            retired: RetiredMark { path: args.control_socket.with_extension("retired"), pod_uid: args.pod_uid },
            control_socket: args.control_socket,
            handover_socket: args.handover_socket,
            metrics: args.metrics,
            manifests: args.manifests,
            kubeconfig: args.kubeconfig,
            node_name: args.node_name,
            startup_taint: Some(args.startup_taint).filter(|key| !key.is_empty()),
            policy: PolicySettings {
                workload: args.workload_identity,
                default_tenant: args.tenant_id,
                default_scope: args.identity_scope_default,
            },
            upstream: args.upstream,
            authority_host: args.authority_host,
            tokens: TokenConfig {
                cache: CacheConfig { max_entries: args.token_cache_entries, ..CacheConfig::default() },
                budget: BudgetConfig {
                    per_second: args.upstream_rate as usize,
                    in_flight: args.upstream_concurrency as usize,
                    ..BudgetConfig::default()
                },
                ..TokenConfig::default()
            },
            path_budget: BudgetConfig { per_second: args.upstream_path_rate as usize, ..BudgetConfig::default() },
            host_token: args.host_token_listen.map(|listen| crate::server::host_token::HostTokenConfig {
                listen,
                trusted: args.host_token_callers,
                pods_under,
            }),
            max_connections: args.max_connections,
            max_connections_per_pod: args.max_connections_per_pod,
            kubelet_dir: args.kubelet_dir,
            rules: if args.forward_all_paths { PathRules::ForwardAll } else { PathRules::Allow(args.allow_paths) },
            mode: args.mode,
            deny_unbound: args.deny_unbound,
            pod_grace: args.pod_grace,
            pod_lookups: Some(args.pod_lookup_interval).filter(|i| !i.is_zero()),
        })
    }
}

impl Config {
    /// The pin directory: the node's filter, and its lock.
    #[must_use]
    pub fn pin_dir(&self) -> &std::path::Path {
        &self.filter.pin_dir
    }

    /// What `/status` says this agent is.
    #[must_use]
    pub fn facts(&self) -> AgentStatus {
        AgentStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: match self.mode {
                Mode::Enforce => "enforce",
                Mode::Audit => "audit",
            }
            .to_owned(),
            source: match &self.manifests {
                Some(dir) => format!("manifests {}", dir.display()),
                None => "kube".to_owned(),
            },
            listen: self.listen.to_string(),
            ..AgentStatus::default()
        }
    }

    /// How `explain` decides: as this agent does.
    #[must_use]
    pub fn explain_settings(&self) -> explain::Settings {
        explain::Settings { rules: self.rules.clone(), deny_unbound: self.deny_unbound }
    }
}
