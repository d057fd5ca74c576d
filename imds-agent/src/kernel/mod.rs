//! Loading the kernel programs, attaching them to one cgroup and to the node's network
//! namespace, and keeping them there.
//!
//! State that must outlive the agent process — the eight cgroup links, the node backstop and
//! the maps — is pinned under one bpffs directory (tc filters are held by the kernel). Every
//! start loads the programs afresh with the maps reused from their pins, then for each hook
//! either replaces the program behind the pinned link atomically (restart, upgrade: no
//! instant without a filter, never two attachments) or attaches and pins a new link (first
//! start). `uninstall` is the only way the filter goes away.
pub mod backstop;
pub mod bpffs;
mod btf;
pub mod cgroup;
pub mod inspect;
pub mod logs;
pub mod netfilter;
pub mod origin;
mod rtnl;
mod sys;
pub mod tc;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, MapInfo, PerCpuArray},
    programs::{
        links::FdLink, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError, SockOps,
    },
    Ebpf, EbpfLoader,
};
use aya_obj::generated::bpf_attach_type;
use imds_common::{
    capacity, maps, programs, Config, Counter, Nat64Prefix, PodAddr, ProtectedAddr, Verdict, MAX_PORTS_PER_ADDR,
};

pub use self::{
    backstop::{Mechanism, NodeBackstop},
    origin::{CallerOrigin, OriginLookup, OriginTable},
};

/// The compiled kernel programs (empty when built without the BPF toolchain).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/imds-ebpf"));

/// Whether this binary carries the kernel programs (false when it was built without the BPF
/// toolchain; [`Filter::install`] then fails with [`FilterError::NotBuilt`]).
#[must_use]
pub fn programs_built() -> bool {
    !EBPF_OBJECT.is_empty()
}

/// The metadata endpoint every cloud agrees on.
pub const IMDS_ENDPOINT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80);

/// One of the eight places the programs hook into the attach cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    SockOps,
    Connect4,
    Connect6,
    Egress,
    GetPeerName4,
    GetPeerName6,
    Bind4,
    Bind6,
}

impl Hook {
    /// Attach order: origin tracking before anything is redirected.
    pub const ALL: [Hook; 8] = [
        Hook::SockOps,
        Hook::Connect4,
        Hook::Connect6,
        Hook::Egress,
        Hook::GetPeerName4,
        Hook::GetPeerName6,
        Hook::Bind4,
        Hook::Bind6,
    ];

    /// Name of the program in the object (and, truncated to 15 bytes, in the kernel).
    #[must_use]
    pub const fn program(self) -> &'static str {
        match self {
            Hook::SockOps => programs::SOCK_OPS,
            Hook::Connect4 => programs::CONNECT4,
            Hook::Connect6 => programs::CONNECT6,
            Hook::Egress => programs::EGRESS,
            Hook::GetPeerName4 => programs::PEER4,
            Hook::GetPeerName6 => programs::PEER6,
            Hook::Bind4 => programs::BIND4,
            Hook::Bind6 => programs::BIND6,
        }
    }

    /// The kernel's attach type for this hook.
    #[must_use]
    pub const fn attach_type(self) -> bpf_attach_type {
        match self {
            Hook::SockOps => bpf_attach_type::BPF_CGROUP_SOCK_OPS,
            Hook::Connect4 => bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
            Hook::Connect6 => bpf_attach_type::BPF_CGROUP_INET6_CONNECT,
            Hook::Egress => bpf_attach_type::BPF_CGROUP_INET_EGRESS,
            Hook::GetPeerName4 => bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME,
            Hook::GetPeerName6 => bpf_attach_type::BPF_CGROUP_INET6_GETPEERNAME,
            Hook::Bind4 => bpf_attach_type::BPF_CGROUP_INET4_BIND,
            Hook::Bind6 => bpf_attach_type::BPF_CGROUP_INET6_BIND,
        }
    }

    /// File name of the pinned link in the pin directory.
    #[must_use]
    pub fn link_pin(self) -> String {
        format!("link_{}", self.program())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error(
        "this imds-agent was built without its eBPF object (the BPF toolchain was missing at \
         build time); run `cargo xtask setup`, then rebuild"
    )]
    NotBuilt,
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Bpffs(#[from] bpffs::BpffsError),
    #[error(
        "loading the eBPF object (if {} holds maps pinned by another version, run \
         `imds-agent uninstall --bpffs {}` first)", pin_dir.display(), pin_dir.display()
    )]
    Load { pin_dir: PathBuf, source: Box<aya::EbpfError> },
    #[error("program {name}")]
    Program { name: &'static str, source: ProgramError },
    #[error("map {name}")]
    Map { name: &'static str, source: MapError },
    #[error(
        "{} is attached to another cgroup (id {found}) than {} (id {expected}); \
         run `imds-agent uninstall --bpffs {}` first", pin.display(), cgroup.display(),
         pin.parent().unwrap_or(pin).display()
    )]
    PinnedElsewhere { pin: PathBuf, cgroup: PathBuf, found: u64, expected: u64 },
    #[error("{} is not a link of the {hook:?} hook; remove it or use another --bpffs", pin.display())]
    PinnedWrongHook { pin: PathBuf, hook: Hook },
    #[error("{what} {}", path.display())]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("{addr} has more than {MAX_PORTS_PER_ADDR} protected ports")]
    TooManyPorts { addr: Ipv4Addr },
    #[error("no protected endpoints given")]
    NoProtectedEndpoints,
    #[error("at most {} NAT64 prefixes besides 64:ff9b::/96", capacity::NAT64 - 1)]
    TooManyNat64Prefixes,
    #[error(transparent)]
    Backstop(#[from] backstop::BackstopError),
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> FilterError {
    move |source| FilterError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> FilterError {
    move |source| FilterError::Program { name, source }
}

/// What to install and how.
#[derive(Clone, Debug)]
pub struct FilterOptions {
    /// The cgroup whose processes (and all descendants') are filtered.
    pub attach_cgroup: PathBuf,
    /// bpffs directory holding the pins.
    pub pin_dir: PathBuf,
    /// Where redirected connections go: the agent's listen address.
    pub agent: SocketAddrV4,
    /// Protected endpoints (at most [`MAX_PORTS_PER_ADDR`] ports per address): TCP to them is
    /// judged and redirected; UDP and other ports of their addresses are left alone.
    pub protected: Vec<SocketAddrV4>,
    /// Addresses protected whole: every port and protocol but the redirected endpoints is
    /// refused from cgroups that are not PASS.
    pub protected_addresses: Vec<Ipv4Addr>,
    /// Verdict of cgroups without an entry.
    pub default_verdict: Verdict,
    /// cgroup id of the agent itself: its upstream connections pass, and it alone may bind
    /// the agent's port (with the agent it replaces, see [`Config::with_agent`]); 0 for none.
    pub agent_cgroup: u64,
    /// Whether the agent holds its port. `false` (something else listens there) makes the
    /// kernel refuse what it would redirect, until [`Redirects::resume`].
    pub listening: bool,
    /// The agent's network namespace ([`crate::server::listener::netns_cookie`]): the bind
    /// guard protects its port there; 0 protects it in every namespace.
    pub agent_netns_cookie: u64,
    /// Most verbose kernel log level compiled into the programs' checks.
    pub kernel_log_level: log::LevelFilter,
    /// Origin records older than this are ignored.
    pub origin_ttl: Duration,
    /// Where the node backstop runs.
    pub node_backstop: NodeBackstop,
    /// /96 NAT64 prefixes judged like `64:ff9b::/96`, which always is.
    pub nat64_prefixes: Vec<Ipv6Addr>,
}

/// Writing shared kernel state that outlives the agent (verdicts, the node backstop's
/// attachments) is the duty of the node's current agent alone. While another agent takes
/// over ([`crate::handover`]) the duty is paused; it resumes if that agent goes away first.
#[derive(Clone, Debug, Default)]
pub struct Duty(Arc<parking_lot::Mutex<DutyState>>);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum DutyState {
    #[default]
    Active,
    Paused,
    /// Active again after a pause: another agent may have changed the state meanwhile.
    Resumed,
}

impl Duty {
    /// Runs `work` unless paused, holding the duty meanwhile. `work` is told whether another
    /// agent may have written the state since this duty's last work (then re-read it); it is
    /// told so again until it succeeds.
    pub fn perform<T, E>(&self, work: impl FnOnce(bool) -> Result<T, E>) -> Option<Result<T, E>> {
        let mut state = self.0.lock();
        match *state {
            DutyState::Paused => None,
            DutyState::Active => Some(work(false)),
            DutyState::Resumed => {
                let done = work(true);
                if done.is_ok() {
                    *state = DutyState::Active;
                }
                Some(done)
            }
        }
    }

    /// Pauses the duty; returns once no work is under way.
    pub fn pause(&self) {
        *self.0.lock() = DutyState::Paused;
    }

    /// Resumes a paused duty.
    pub fn resume(&self) {
        let mut state = self.0.lock();
        if *state == DutyState::Paused {
            *state = DutyState::Resumed;
        }
    }
}

/// How a hook came to run our program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// No pinned link existed: attached and pinned now.
    Attached,
    /// A pinned link existed: its program was replaced atomically.
    Replaced,
}

/// The installed filter: its maps, for the agent to read and steer.
pub struct Filter {
    verdicts: HashMap<MapData, u64, u32>,
    pass_sources: HashMap<MapData, PodAddr, u32>,
    /// What `pass_sources` holds: read from the pinned map once (it may hold an earlier
    /// agent's entries), kept in step by [`Filter::set_pass_sources`] after that.
    pass_sources_held: Option<BTreeSet<PodAddr>>,
    counters: PerCpuArray<MapData, u64>,
    origins: Arc<OriginTable>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// The tc backstop's interface watcher's duty.
    backstop_duty: Duty,
    redirects: Option<Redirects>,
}

/// The switch between redirecting to the agent and refusing (`CONFIG.refuse_redirects`), on
/// the map the installed programs read.
pub struct Redirects {
    config: Array<MapData, Config>,
    agent_cgroup: u64,
}

impl Redirects {
    /// The agent holds its port: redirect to it.
    pub fn resume(&mut self) -> Result<(), FilterError> {
        self.set(0)
    }

    /// The agent is stopping: refuse what would be redirected until the next one listens (a
    /// socket that bound the port before the guard existed could listen meanwhile). Not when
    /// another agent has taken over since: the switch is its. Returns whether it refused.
    pub fn refuse_on_exit(&mut self) -> Result<bool, FilterError> {
        let current = self.config.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        if current.agent_cgroups[0] != self.agent_cgroup {
            return Ok(false);
        }
        self.set(1).map(|()| true)
    }

    fn set(&mut self, refuse: u16) -> Result<(), FilterError> {
        let current = self.config.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        self.config.set(0, Config { refuse_redirects: refuse, ..current }, 0).map_err(map_err(maps::CONFIG))
    }
}

impl Filter {
    /// Loads the programs and makes them the ones running on `opts.attach_cgroup`, reusing
    /// pinned state from an earlier run.
    pub fn install(opts: &FilterOptions) -> Result<Filter, FilterError> {
        if !programs_built() {
            return Err(FilterError::NotBuilt);
        }
        let protected = group_endpoints(&opts.protected, &opts.protected_addresses)?;
        let nat64 = nat64_table(&opts.nat64_prefixes)?;
        let root = cgroup::cgroup2_root()?;
        let cgroup_path = cgroup::validate_attach_cgroup(&root, &opts.attach_cgroup)?;
        let cgroup_id = cgroup::cgroup_id(&cgroup_path)?;
        let cgroup_dir = fs::File::open(&cgroup_path).map_err(|source| FilterError::Io {
            what: "opening cgroup",
            path: cgroup_path.clone(),
            source,
        })?;
        bpffs::ensure_pin_dir(&opts.pin_dir)?;
        let mut plan = backstop::Plan::new(opts.node_backstop)?;
        drop_reshaped_maps(&opts.pin_dir)?;

        // log's LevelFilter and aya-log number levels alike: 0 off, 1 error … 5 trace.
        let log_level = opts.kernel_log_level as u8;
        let layout = plan.layout.map(|l| l.globals());
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&opts.pin_dir).override_global("AYA_LOG_LEVEL", &log_level, true);
        for (name, value) in layout.iter().flatten() {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| FilterError::Load { pin_dir: opts.pin_dir.clone(), source: Box::new(source) })?;
        plan.load(&ebpf, EBPF_OBJECT);

        // Configure before anything is attached, so the first program run already sees it.
        let mut config: Array<MapData, Config> = take_map(&mut ebpf, maps::CONFIG)?;
        // The agent cgroups carry over (see `Config::with_agent`); everything else is ours.
        let pinned = config.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        let wanted = Config {
            agent_cgroups: pinned.with_agent(opts.agent_cgroup).agent_cgroups,
            agent_ip4_be: u32::from(*opts.agent.ip()).to_be(),
            default_verdict: opts.default_verdict as u32,
            agent_port_be: opts.agent.port().to_be(),
            refuse_redirects: u16::from(!opts.listening),
            pad: [0; 4],
            agent_netns_cookie: opts.agent_netns_cookie,
        };
        config.set(0, wanted, 0).map_err(map_err(maps::CONFIG))?;
        let mut protected_map: HashMap<MapData, u32, ProtectedAddr> = take_map(&mut ebpf, maps::PROTECTED)?;
        sync_protected(&mut protected_map, &protected)?;
        let mut nat64_map: Array<MapData, Nat64Prefix> = take_map(&mut ebpf, maps::NAT64)?;
        for (slot, prefix) in (0u32..).zip(nat64) {
            nat64_map.set(slot, prefix, 0).map_err(map_err(maps::NAT64))?;
        }

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::warn!(error = %e, "kernel-side logs unavailable");
                None
            }
        };

        for hook in Hook::ALL {
            let pin = opts.pin_dir.join(hook.link_pin());
            let how = attach_or_replace(&mut ebpf, hook, &cgroup_dir, &cgroup_path, cgroup_id, &pin)?;
            tracing::info!(hook = ?hook, how = ?how, cgroup = %cgroup_path.display(), "program in place");
        }
        let node = backstop::install(plan, &mut ebpf, &opts.pin_dir)?;
        if let (Some(mechanism), Some(attachment)) = (node.mechanism, node.how) {
            let uncovered = node.uncovered.len();
            tracing::info!(mechanism = mechanism.name(), ?attachment, uncovered, "node backstop in place");
        }

        let filter = Filter {
            verdicts: take_map(&mut ebpf, maps::VERDICTS)?,
            pass_sources: take_map(&mut ebpf, maps::PASS_SOURCES)?,
            pass_sources_held: None,
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            origins: Arc::new(OriginTable::new(take_map(&mut ebpf, maps::ORIGINS)?, opts.origin_ttl)),
            logger,
            backstop_duty: Duty::default(),
            redirects: Some(Redirects { config, agent_cgroup: opts.agent_cgroup }),
        };
        if let Some(watcher) = node.watcher {
            watcher.watch(ebpf, filter.backstop_duty.clone()).map_err(|source| FilterError::Io {
                what: "starting the node backstop's interface watcher for",
                path: opts.pin_dir.clone(),
                source,
            })?;
        }
        return_freed_memory();
        Ok(filter)
    }

    /// The duty of the node backstop's interface watcher (tc): attaching to interfaces as
    /// they appear, and repairing what was removed.
    #[must_use]
    pub fn backstop_duty(&self) -> Duty {
        self.backstop_duty.clone()
    }

    /// Makes the node backstop let packets from exactly `wanted` (PASS pods' addresses) reach
    /// protected addresses. Returns how many entries it added and removed.
    pub fn set_pass_sources(&mut self, wanted: &BTreeSet<PodAddr>) -> Result<(usize, usize), FilterError> {
        let present = match self.pass_sources_held.take() {
            Some(held) => held,
            None => self.pass_sources.keys().collect::<Result<_, _>>().map_err(map_err(maps::PASS_SOURCES))?,
        };
        // Removals first: a full map must not keep a stale address because a new one failed.
        // Until every change is through, the map is read again next time.
        for addr in present.difference(wanted) {
            self.pass_sources.remove(addr).map_err(map_err(maps::PASS_SOURCES))?;
        }
        for addr in wanted.difference(&present) {
            self.pass_sources.insert(addr, 1, 0).map_err(map_err(maps::PASS_SOURCES))?;
        }
        let changed = (wanted.difference(&present).count(), present.difference(wanted).count());
        self.pass_sources_held = Some(wanted.clone());
        Ok(changed)
    }

    /// Forgets what this agent believes `PASS_SOURCES` holds: the next
    /// [`Filter::set_pass_sources`] reads the map again (another agent may have written it).
    pub fn forget_pass_sources(&mut self) {
        self.pass_sources_held = None;
    }

    /// Sets the verdict of a cgroup and, unless a descendant has its own, of everything below.
    pub fn set_verdict(&mut self, cgroup_id: u64, verdict: Verdict) -> Result<(), FilterError> {
        self.verdicts.insert(cgroup_id, verdict as u32, 0).map_err(map_err(maps::VERDICTS))
    }

    /// Removes a cgroup's own verdict; it falls back to its ancestors' or the default.
    pub fn clear_verdict(&mut self, cgroup_id: u64) -> Result<(), FilterError> {
        match self.verdicts.remove(&cgroup_id) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(maps::VERDICTS)(e)),
        }
    }

    /// Every cgroup's own verdict entry.
    pub fn verdicts(&self) -> Result<Vec<(u64, Option<Verdict>)>, FilterError> {
        self.verdicts
            .iter()
            .map(|r| r.map(|(id, raw)| (id, Verdict::from_raw(raw))))
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::VERDICTS))
    }

    /// The kernel counters, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, FilterError> {
        Counter::ALL
            .iter()
            .map(|c| {
                let per_cpu = self.counters.get(&(*c as u32), 0).map_err(map_err(maps::COUNTERS))?;
                Ok((*c, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// The origin records, shareable with connection handlers.
    #[must_use]
    pub fn origins(&self) -> Arc<OriginTable> {
        Arc::clone(&self.origins)
    }

    /// The switch between redirecting and refusing (once; the agent keeps it).
    pub fn take_redirects(&mut self) -> Option<Redirects> {
        self.redirects.take()
    }

    /// The reader of kernel-side log records (once; the caller drains it).
    pub fn take_kernel_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, FilterError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map =
        ebpf.take_map(name).ok_or(FilterError::Map { name, source: MapError::InvalidName { name: name.into() } })?;
    T::try_from(map).map_err(map_err(name))
}

/// Groups endpoints by address, as the `PROTECTED` map stores them; `whole` addresses are
/// protected on every port and protocol besides.
pub fn group_endpoints(
    endpoints: &[SocketAddrV4],
    whole: &[Ipv4Addr],
) -> Result<BTreeMap<u32, ProtectedAddr>, FilterError> {
    if endpoints.is_empty() && whole.is_empty() {
        return Err(FilterError::NoProtectedEndpoints);
    }
    let mut grouped: BTreeMap<u32, ProtectedAddr> = BTreeMap::new();
    for addr in whole {
        grouped.entry(u32::from(*addr).to_be()).or_default().whole_address = 1;
    }
    for ep in endpoints {
        let entry = grouped.entry(u32::from(*ep.ip()).to_be()).or_default();
        let port_be = ep.port().to_be();
        if entry.has_port(port_be) {
            continue;
        }
        let slot = entry.ports_be.iter_mut().find(|p| **p == 0).ok_or(FilterError::TooManyPorts { addr: *ep.ip() })?;
        *slot = port_be;
    }
    Ok(grouped)
}

/// What an operator may not have meant by these endpoints and whole addresses: the metadata
/// address protected by port only (its other ports and UDP then reach pods' way), or an
/// address protected whole with no port to redirect (only exception pods reach it at all).
#[must_use]
pub fn protection_warnings(endpoints: &[SocketAddrV4], whole: &[Ipv4Addr]) -> Vec<String> {
    let imds = *IMDS_ENDPOINT.ip();
    let mut warnings = Vec::new();
    if endpoints.iter().any(|e| *e.ip() == imds) && !whole.contains(&imds) {
        warnings.push(format!(
            "{imds} is protected on its --protect ports only: other ports and UDP to it are open to pods \
             (naming --protect-address replaced the default; add --protect-address {imds} unless that is meant)"
        ));
    }
    for addr in whole.iter().filter(|a| !endpoints.iter().any(|e| e.ip() == *a)) {
        warnings.push(format!(
            "{addr} is protected whole with no --protect port: only exception pods reach it, nothing is \
             redirected to the agent (naming --protect replaced the default; add --protect {addr}:80 if that is meant)"
        ));
    }
    warnings
}

/// A `--nat64-prefix`: an IPv6 /96 prefix (`ADDR/96`, or `ADDR` with its last 32 bits zero).
pub fn parse_nat64_prefix(text: &str) -> Result<Ipv6Addr, String> {
    let (addr, len) = text.split_once('/').unwrap_or((text, "96"));
    if len != "96" {
        return Err(format!("{text}: only /96 NAT64 prefixes are supported (RFC 6052's common form)"));
    }
    let addr: Ipv6Addr = addr.parse().map_err(|e| format!("{text}: {e}"))?;
    if addr.segments()[6..] != [0, 0] {
        return Err(format!("{text}: a /96 prefix has its last 32 bits zero"));
    }
    Ok(addr)
}

/// Loading passes through several large, short-lived buffers (the object parsed twice, the
/// kernel's 5 MB BTF). glibc keeps what they freed and raises its mmap threshold after the
/// largest, so without this the agent starts ~10 MiB heavier for good (measured: 40 → 31 MiB
/// RSS right after start with the netfilter backstop).
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The `NAT64` map's slots: the well-known prefix, then the operator's (duplicates dropped).
pub fn nat64_table(extra: &[Ipv6Addr]) -> Result<Vec<Nat64Prefix>, FilterError> {
    let mut table = vec![Nat64Prefix::WELL_KNOWN];
    for prefix in extra.iter().map(|p| Nat64Prefix::from_bytes(p.octets())) {
        if !table.contains(&prefix) {
            table.push(prefix);
        }
    }
    if table.len() > capacity::NAT64 as usize {
        return Err(FilterError::TooManyNat64Prefixes);
    }
    table.resize(capacity::NAT64 as usize, Nat64Prefix::default());
    Ok(table)
}

/// An earlier version pinned `COUNTERS` with fewer slots than there are counters now, or
/// `CONFIG` or `PROTECTED` with another layout: the pin is removed so that the load creates the map afresh
/// (counts start again; programs still attached keep the old map until they are replaced a
/// moment later, after the new one is filled).
fn drop_reshaped_maps(pin_dir: &Path) -> Result<(), FilterError> {
    drop_pin_unless(pin_dir, maps::COUNTERS, |info| info.max_entries() >= Counter::LEN)?;
    drop_pin_unless(pin_dir, maps::CONFIG, |info| info.value_size() as usize == size_of::<Config>())?;
    drop_pin_unless(pin_dir, maps::PROTECTED, |info| info.value_size() as usize == size_of::<ProtectedAddr>())
}

fn drop_pin_unless(pin_dir: &Path, name: &'static str, fits: impl Fn(&MapInfo) -> bool) -> Result<(), FilterError> {
    let pin = pin_dir.join(name);
    if !pin.exists() {
        return Ok(());
    }
    let info = MapData::from_pin(&pin).and_then(|m| m.info()).map_err(map_err(name))?;
    if !fits(&info) {
        tracing::info!(map = name, "pinned map has an earlier version's shape; starting it afresh");
        fs::remove_file(&pin).map_err(|source| FilterError::Io { what: "removing pin", path: pin, source })?;
    }
    Ok(())
}

/// The pinned `CONFIG` map, if an earlier agent left one of this version's shape.
fn pinned_config(pin_dir: &Path) -> Result<Option<Array<MapData, Config>>, FilterError> {
    let pin = pin_dir.join(maps::CONFIG);
    if !pin.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&pin).map_err(map_err(maps::CONFIG))?;
    let info = data.info().map_err(map_err(maps::CONFIG))?;
    if info.value_size() as usize != size_of::<Config>() {
        return Ok(None); // an earlier version's: it had no bind guard either
    }
    Array::try_from(Map::Array(data)).map(Some).map_err(map_err(maps::CONFIG))
}

/// Makes `own` the agent's cgroup in the pinned configuration, if there is one, so that the
/// bind guard an earlier agent left lets this agent bind its port. Called before binding;
/// [`Filter::install`] writes the rest later.
pub fn admit_agent(pin_dir: &Path, own: u64) -> Result<(), FilterError> {
    let Some(mut config) = pinned_config(pin_dir)? else { return Ok(()) };
    let current = config.get(&0, 0).map_err(map_err(maps::CONFIG))?;
    config.set(0, current.with_agent(own), 0).map_err(map_err(maps::CONFIG))
}

/// Makes the `PROTECTED` map hold exactly `wanted`.
fn sync_protected(
    map: &mut HashMap<MapData, u32, ProtectedAddr>,
    wanted: &BTreeMap<u32, ProtectedAddr>,
) -> Result<(), FilterError> {
    let present: Vec<u32> = map.keys().collect::<Result<_, _>>().map_err(map_err(maps::PROTECTED))?;
    for (addr, ports) in wanted {
        map.insert(addr, ports, 0).map_err(map_err(maps::PROTECTED))?;
    }
    for addr in present.iter().filter(|a| !wanted.contains_key(a)) {
        map.remove(addr).map_err(map_err(maps::PROTECTED))?;
    }
    Ok(())
}

fn attach_or_replace(
    ebpf: &mut Ebpf,
    hook: Hook,
    cgroup_dir: &fs::File,
    cgroup_path: &Path,
    cgroup_id: u64,
    pin: &Path,
) -> Result<Attachment, FilterError> {
    let name = hook.program();
    let program =
        ebpf.program_mut(name).ok_or(FilterError::Program { name, source: ProgramError::UnexpectedProgramType })?;
    let io_err = |what: &'static str| move |source| FilterError::Io { what, path: pin.to_owned(), source };

    if pin.exists() {
        let link = sys::obj_get(pin).map_err(io_err("opening pinned link"))?;
        match sys::cgroup_link_target(link.as_fd()).map_err(io_err("reading pinned link"))? {
            Some(t) if t.attach_type == hook.attach_type() && t.cgroup_id == cgroup_id => {}
            Some(t) if t.attach_type == hook.attach_type() => {
                return Err(FilterError::PinnedElsewhere {
                    pin: pin.to_owned(),
                    cgroup: cgroup_path.to_owned(),
                    found: t.cgroup_id,
                    expected: cgroup_id,
                });
            }
            _ => return Err(FilterError::PinnedWrongHook { pin: pin.to_owned(), hook }),
        }
        load(program, hook)?;
        let prog_fd = program.fd().map_err(prog_err(name))?;
        sys::link_update(link.as_fd(), prog_fd.as_fd()).map_err(io_err("replacing the program of"))?;
        return Ok(Attachment::Replaced);
    }

    load(program, hook)?;
    // Links are always multi-attach in the kernel; "single" (flags 0) is what it accepts.
    let mode = CgroupAttachMode::Single;
    let link: FdLink = match hook {
        Hook::SockOps => {
            let p: &mut SockOps = program.try_into().map_err(prog_err(name))?;
            let id = p.attach(cgroup_dir, mode).map_err(prog_err(name))?;
            p.take_link(id).map_err(prog_err(name))?.try_into()
        }
        Hook::Connect4 | Hook::Connect6 | Hook::GetPeerName4 | Hook::GetPeerName6 | Hook::Bind4 | Hook::Bind6 => {
            let p: &mut CgroupSockAddr = program.try_into().map_err(prog_err(name))?;
            let id = p.attach(cgroup_dir, mode).map_err(prog_err(name))?;
            p.take_link(id).map_err(prog_err(name))?.try_into()
        }
        Hook::Egress => {
            let p: &mut CgroupSkb = program.try_into().map_err(prog_err(name))?;
            let id = p.attach(cgroup_dir, CgroupSkbAttachType::Egress, mode).map_err(prog_err(name))?;
            p.take_link(id).map_err(prog_err(name))?.try_into()
        }
    }
    .map_err(|e| io_err("taking link for")(io::Error::other(e)))?;
    link.pin(pin).map_err(|e| io_err("pinning link")(io::Error::other(e)))?;
    Ok(Attachment::Attached)
}

/// Loads (verifies) one program into the kernel.
///
/// The verifier gives up with `EAGAIN` when the loading thread has a signal pending; like
/// libbpf, try again a few times before calling it a failure.
fn load(program: &mut aya::programs::Program, hook: Hook) -> Result<(), FilterError> {
    const ATTEMPTS: usize = 5;
    let name = hook.program();
    let mut attempt = 1;
    loop {
        let result = match hook {
            Hook::SockOps => <&mut SockOps>::try_from(&mut *program).map_err(prog_err(name))?.load(),
            Hook::Connect4 | Hook::Connect6 | Hook::GetPeerName4 | Hook::GetPeerName6 | Hook::Bind4 | Hook::Bind6 => {
                <&mut CgroupSockAddr>::try_from(&mut *program).map_err(prog_err(name))?.load()
            }
            Hook::Egress => <&mut CgroupSkb>::try_from(&mut *program).map_err(prog_err(name))?.load(),
        };
        match result {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                tracing::debug!(program = name, attempt, "verifier interrupted; loading again");
                attempt += 1;
            }
            other => return other.map_err(prog_err(name)),
        }
    }
}

/// What `uninstall` removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Uninstalled {
    pub links: Vec<String>,
    /// The node backstop's links and filters.
    pub backstop: Vec<String>,
    pub maps: Vec<String>,
}

/// Detaches every pinned link (even if a running agent still holds it) and removes all pins
/// and the pin directory. Nothing installed is not an error.
pub fn uninstall(pin_dir: &Path) -> Result<Uninstalled, FilterError> {
    let mut done = Uninstalled::default();
    // tc filters live outside the pin directory: look for them whether or not it exists.
    if !pin_dir.exists() {
        done.backstop = backstop::uninstall(pin_dir)?;
        return Ok(done);
    }
    let io_err = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| FilterError::Io { what, path, source }
    };
    for hook in Hook::ALL {
        let pin = pin_dir.join(hook.link_pin());
        if !pin.exists() {
            continue;
        }
        let link = sys::obj_get(&pin).map_err(io_err("opening pinned link", &pin))?;
        match sys::link_detach(link.as_fd()) {
            // EINVAL: a kernel without BPF_LINK_DETACH (< 5.9): removing the pin detaches the
            // link once no process holds it. ENOLINK: already detached.
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOLINK)) => {}
            Err(source) => return Err(FilterError::Io { what: "detaching link", path: pin, source }),
        }
        fs::remove_file(&pin).map_err(io_err("removing pin", &pin))?;
        done.links.push(hook.link_pin());
    }
    done.backstop = backstop::uninstall(pin_dir)?;
    for name in maps::PINNED {
        let pin = pin_dir.join(name);
        if pin.exists() {
            fs::remove_file(&pin).map_err(io_err("removing pin", &pin))?;
            done.maps.push(name.to_owned());
        }
    }
    fs::remove_dir(pin_dir).map_err(io_err("removing pin directory", pin_dir))?;
    Ok(done)
}

/// A program attached to a cgroup hook, as the kernel lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedProgram {
    pub id: u32,
    pub name: String,
}

/// The programs attached directly to `cgroup` at each of our hooks (the kernel's own list).
pub fn attached_programs(cgroup: &Path) -> Result<Vec<(Hook, Vec<AttachedProgram>)>, FilterError> {
    let dir = fs::File::open(cgroup).map_err(|source| FilterError::Io {
        what: "opening cgroup",
        path: cgroup.to_owned(),
        source,
    })?;
    let names: std::collections::HashMap<u32, String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_owned()))
        .collect();
    Hook::ALL
        .iter()
        .map(|hook| {
            let ids = sys::attached_prog_ids(dir.as_fd(), hook.attach_type()).map_err(|source| FilterError::Io {
                what: "querying cgroup",
                path: cgroup.to_owned(),
                source,
            })?;
            let progs = ids
                .into_iter()
                .map(|id| AttachedProgram { id, name: names.get(&id).cloned().unwrap_or_default() })
                .collect();
            Ok((*hook, progs))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paused_duty_does_nothing_and_says_so_when_resumed() {
        let duty = Duty::default();
        let fresh = |fresh: bool| Ok::<_, ()>(fresh);
        assert_eq!(duty.perform(fresh), Some(Ok(false)));
        duty.pause();
        assert_eq!(duty.perform(fresh), None);
        duty.resume();
        assert_eq!(duty.perform(|_| Err::<bool, _>(())), Some(Err(())), "a failed re-read…");
        assert_eq!(duty.perform(fresh), Some(Ok(true)), "…is asked for again");
        assert_eq!(duty.perform(fresh), Some(Ok(false)));
        duty.resume();
        assert_eq!(duty.perform(fresh), Some(Ok(false)), "resuming an active duty changes nothing");
    }

    #[test]
    fn endpoints_group_by_address_and_dedupe_ports() {
        let eps: Vec<SocketAddrV4> =
            ["169.254.169.254:80", "168.63.129.16:80", "168.63.129.16:32526", "169.254.169.254:80"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect();
        let g = group_endpoints(&eps, &["169.254.169.254".parse().unwrap()]).unwrap();
        assert_eq!(g.len(), 2);
        let wire = g[&u32::from(Ipv4Addr::new(168, 63, 129, 16)).to_be()];
        assert_eq!((wire.ports_be, wire.whole_address), ([80u16.to_be(), 32526u16.to_be(), 0, 0], 0));
        let imds = g[&u32::from(Ipv4Addr::new(169, 254, 169, 254)).to_be()];
        assert_eq!((imds.ports_be, imds.whole_address), ([80u16.to_be(), 0, 0, 0], 1));
        let only_whole = group_endpoints(&[], &["10.0.0.1".parse().unwrap()]).unwrap();
        assert_eq!(only_whole.values().next().map(|p| (p.ports_be, p.whole_address)), Some(([0; 4], 1)));
    }

    #[test]
    fn surprising_protection_is_warned_about() {
        let ep = |s: &str| s.parse::<SocketAddrV4>().unwrap();
        let imds = *IMDS_ENDPOINT.ip();
        assert!(protection_warnings(&[IMDS_ENDPOINT], &[imds]).is_empty(), "the defaults");
        let wire = [IMDS_ENDPOINT, ep("168.63.129.16:80")];
        assert!(protection_warnings(&wire, &[imds]).is_empty(), "the wire server by port");
        let port_only = protection_warnings(&[IMDS_ENDPOINT], &["10.0.0.1".parse().unwrap()]);
        assert_eq!(port_only.len(), 2, "{port_only:?}");
        assert!(port_only[0].starts_with("169.254.169.254 is protected on its --protect ports only"));
        assert!(port_only[1].starts_with("10.0.0.1 is protected whole with no --protect port"));
        let no_port = protection_warnings(&[ep("168.63.129.16:80")], &[imds]);
        assert_eq!(no_port.len(), 1, "{no_port:?}");
        assert!(no_port[0].starts_with("169.254.169.254 is protected whole with no --protect port"));
    }

    #[test]
    fn too_many_ports_on_one_address_is_an_error() {
        let eps: Vec<SocketAddrV4> = (1..=5).map(|p| SocketAddrV4::new([10, 0, 0, 1].into(), p)).collect();
        assert!(matches!(group_endpoints(&eps, &[]), Err(FilterError::TooManyPorts { .. })));
        assert!(matches!(group_endpoints(&[], &[]), Err(FilterError::NoProtectedEndpoints)));
    }

    #[test]
    fn nat64_prefixes_are_96_bits_and_at_most_three_more() {
        assert_eq!(parse_nat64_prefix("2001:db8:64::/96"), Ok("2001:db8:64::".parse().unwrap()));
        assert_eq!(parse_nat64_prefix("2001:db8:64::"), Ok("2001:db8:64::".parse().unwrap()));
        assert!(parse_nat64_prefix("2001:db8:64::/64").is_err());
        assert!(parse_nat64_prefix("2001:db8:64::1/96").is_err());
        assert!(parse_nat64_prefix("nope/96").is_err());
        let p = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let table = nat64_table(&[p("64:ff9b::"), p("2001:db8:64::")]).unwrap();
        assert_eq!(table[..2], [Nat64Prefix::WELL_KNOWN, Nat64Prefix::from_bytes(p("2001:db8:64::").octets())]);
        assert_eq!(table[2..], [Nat64Prefix::default(); 2]);
        let four = [p("2001:db8:1::"), p("2001:db8:2::"), p("2001:db8:3::"), p("2001:db8:4::")];
        assert!(matches!(nat64_table(&four), Err(FilterError::TooManyNat64Prefixes)));
    }

    #[test]
    fn link_pins_are_distinct_per_hook() {
        let pins: std::collections::HashSet<String> = Hook::ALL.iter().map(|h| h.link_pin()).collect();
        assert_eq!(pins.len(), Hook::ALL.len());
    }
}
