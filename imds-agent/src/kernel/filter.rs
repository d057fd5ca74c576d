//! Installing the filter: load the programs with the maps reused from their pins, fill the
//! maps, then make each hook run the new program (replacing the pinned link's program, or
//! attaching and pinning a link), and hand the agent what it reads and steers.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    os::fd::AsFd as _,
    path::Path,
    sync::Arc,
};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, MapInfo, PerCpuArray},
    programs::{
        links::FdLink, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError, SockOps,
    },
    Ebpf, EbpfLoader,
};
use imds_common::{
    maps, Config, Counter, Nat64Prefix, Origin, OriginKey, PodAddr, ProtectedAddr, ProtectedSummary, Verdict,
};

use super::{
    backstop, bpffs, cgroup, group_endpoints, map_err, nat64_table, prog_err, programs_built, sys, Duty, FilterError,
    FilterOptions, Hook, OriginTable, EBPF_OBJECT,
};

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
        // The summary every program reads must cover what PROTECTED holds at every moment:
        // widened to both sets while PROTECTED changes, narrowed once everything is in place
        // (a start that fails before then leaves the wider one).
        let mut summary_map: Array<MapData, ProtectedSummary> = take_map(&mut ebpf, maps::SUMMARY)?;
        let summary = ProtectedSummary::of(protected.keys().copied());
        let pinned_summary = summary_map.get(&0, 0).map_err(map_err(maps::SUMMARY))?;
        summary_map.set(0, summary.union(pinned_summary), 0).map_err(map_err(maps::SUMMARY))?;
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
        // Every program is ours now: the summary says exactly what this set protects.
        summary_map.set(0, summary, 0).map_err(map_err(maps::SUMMARY))?;

        let filter = Filter {
            verdicts: take_map(&mut ebpf, maps::VERDICTS)?,
            pass_sources: take_map(&mut ebpf, maps::PASS_SOURCES)?,
            pass_sources_held: None,
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            origins: Arc::new(OriginTable::new(take_map(&mut ebpf, maps::ORIGINS)?, opts.origin_ttl).map_err(
                |source| FilterError::Io {
                    what: "duplicating the descriptor of",
                    path: opts.pin_dir.join(maps::ORIGINS),
                    source,
                },
            )?),
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

/// Loading passes through several large, short-lived buffers (the object parsed twice, the
/// kernel's 5 MB BTF). glibc keeps what they freed and raises its mmap threshold after the
/// largest, so without this the agent stays about 10 MiB heavier for good (docs/scale.md).
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// An earlier version pinned `COUNTERS` with fewer slots than there are counters now, or
/// `CONFIG`, `PROTECTED` or `ORIGINS` with another layout (the agent has the kernel copy
/// `ORIGINS` values into an `Origin`, so that size must be exact): the pin is removed so that
/// the load creates the map afresh
/// (counts start again; programs still attached keep the old map until they are replaced a
/// moment later, after the new one is filled).
fn drop_reshaped_maps(pin_dir: &Path) -> Result<(), FilterError> {
    drop_pin_unless(pin_dir, maps::COUNTERS, |info| info.max_entries() >= Counter::LEN)?;
    drop_pin_unless(pin_dir, maps::CONFIG, |info| info.value_size() as usize == size_of::<Config>())?;
    drop_pin_unless(pin_dir, maps::PROTECTED, |info| info.value_size() as usize == size_of::<ProtectedAddr>())?;
    drop_pin_unless(pin_dir, maps::ORIGINS, |info| {
        (info.key_size() as usize, info.value_size() as usize) == (size_of::<OriginKey>(), size_of::<Origin>())
    })
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
