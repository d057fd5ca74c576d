//! Reading the pinned kernel state without installing or changing anything: what `status`
//! reports whether or not an agent runs, and what the tests check for leaks.
//!
//! Everything here opens pins read-only in effect (it never writes a map or touches a link),
//! so it is safe next to a running agent.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd as _,
    path::Path,
};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    Pod,
};
use imds_common::{capacity, maps, Config, Counter, Origin, OriginKey, Peer, PodAddr, ProtectedAddr, Verdict};

use super::{map_err, sys, FilterError, Hook};

/// One hook's pinned link, as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedLink {
    pub hook: Hook,
    pub link_id: u32,
    pub prog_id: u32,
    /// The cgroup it is attached to; 0 once the link was detached underneath its pin.
    pub cgroup_id: u64,
}

/// How full one map is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

/// Everything pinned under one bpffs directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedState {
    /// The links pinned, in [`Hook::ALL`] order; a hook without a pin is absent.
    pub links: Vec<PinnedLink>,
    /// The node-wide settings, if the map is pinned.
    pub config: Option<Config>,
    /// Protected endpoints, sorted.
    pub protected: Vec<SocketAddrV4>,
    /// Addresses protected whole (every port and protocol).
    pub protected_addresses: Vec<Ipv4Addr>,
    /// Each cgroup's own verdict entry (`None`: a raw value no version writes).
    pub verdicts: Vec<(u64, Option<Verdict>)>,
    /// The kernel counters, summed over CPUs (empty if the map is not pinned).
    pub counters: Vec<(Counter, u64)>,
    /// Fill level of the hash maps.
    pub maps: Vec<MapFill>,
}

impl PinnedState {
    /// Whether nothing at all is pinned.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.links.is_empty() && self.config.is_none() && self.maps.is_empty()
    }

    /// The verdict of cgroups without an entry, as the kernel reads the configuration (a
    /// zero, "not configured yet", counts as REDIRECT: fail closed).
    #[must_use]
    pub fn default_verdict(&self) -> Option<Verdict> {
        self.config.map(|c| Verdict::from_raw(c.default_verdict).unwrap_or(Verdict::Redirect))
    }

    /// The cgroup the pinned links are attached to (links detached underneath report 0).
    #[must_use]
    pub fn attach_cgroup_id(&self) -> Option<u64> {
        self.links.iter().map(|l| l.cgroup_id).find(|id| *id != 0)
    }

    /// Where redirected connections go.
    #[must_use]
    pub fn agent(&self) -> Option<SocketAddrV4> {
        self.config
            .map(|c| SocketAddrV4::new(Ipv4Addr::from(u32::from_be(c.agent_ip4_be)), u16::from_be(c.agent_port_be)))
    }
}

/// Reads what is pinned under `pin_dir`. A missing directory is an empty state, not an error.
pub fn inspect(pin_dir: &Path) -> Result<PinnedState, FilterError> {
    let mut state = PinnedState {
        links: Vec::new(),
        config: None,
        protected: Vec::new(),
        protected_addresses: Vec::new(),
        verdicts: Vec::new(),
        counters: Vec::new(),
        maps: Vec::new(),
    };
    for hook in Hook::ALL {
        let pin = pin_dir.join(hook.link_pin());
        if !pin.exists() {
            continue;
        }
        let io_err = |what: &'static str| {
            let path = pin.clone();
            move |source| FilterError::Io { what, path, source }
        };
        let link = sys::obj_get(&pin).map_err(io_err("opening pinned link"))?;
        match sys::cgroup_link_target(link.as_fd()).map_err(io_err("reading pinned link"))? {
            Some(t) if t.attach_type == hook.attach_type() => {
                state.links.push(PinnedLink { hook, link_id: t.link_id, prog_id: t.prog_id, cgroup_id: t.cgroup_id });
            }
            _ => return Err(FilterError::PinnedWrongHook { pin, hook }),
        }
    }
    if let Some(map) = open(pin_dir, maps::CONFIG)? {
        let config: Array<MapData, Config> =
            Array::try_from(Map::from_map_data(map).map_err(map_err(maps::CONFIG))?).map_err(map_err(maps::CONFIG))?;
        state.config = Some(config.get(&0, 0).map_err(map_err(maps::CONFIG))?);
    }
    if let Some(map) = open(pin_dir, maps::PROTECTED)? {
        let protected: HashMap<MapData, u32, ProtectedAddr> = typed(map, maps::PROTECTED)?;
        for entry in &protected {
            let (ip_be, ports) = entry.map_err(map_err(maps::PROTECTED))?;
            let ip = Ipv4Addr::from(u32::from_be(ip_be));
            if ports.whole_address != 0 {
                state.protected_addresses.push(ip);
            }
            let ports = ports.ports_be.iter().filter(|p| **p != 0);
            state.protected.extend(ports.map(|p| SocketAddrV4::new(ip, u16::from_be(*p))));
        }
        state.protected.sort_unstable();
        state.protected_addresses.sort_unstable();
        state.maps.push(MapFill {
            name: maps::PROTECTED,
            entries: protected.keys().count(),
            capacity: capacity::PROTECTED,
        });
    }
    if let Some(map) = open(pin_dir, maps::VERDICTS)? {
        let verdicts: HashMap<MapData, u64, u32> = typed(map, maps::VERDICTS)?;
        state.verdicts = verdicts
            .iter()
            .map(|r| r.map(|(id, raw)| (id, Verdict::from_raw(raw))))
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::VERDICTS))?;
        state.verdicts.sort_unstable_by_key(|(id, _)| *id);
        state.maps.push(MapFill { name: maps::VERDICTS, entries: state.verdicts.len(), capacity: capacity::VERDICTS });
    }
    if let Some(map) = open(pin_dir, maps::PENDING)? {
        let entries = count::<u64, Origin>(map, maps::PENDING)?;
        state.maps.push(MapFill { name: maps::PENDING, entries, capacity: capacity::PENDING });
    }
    if let Some(map) = open(pin_dir, maps::ORIGINS)? {
        let entries = count::<OriginKey, Origin>(map, maps::ORIGINS)?;
        state.maps.push(MapFill { name: maps::ORIGINS, entries, capacity: capacity::ORIGINS });
    }
    if let Some(map) = open(pin_dir, maps::PASS_SOURCES)? {
        let entries = count::<PodAddr, u32>(map, maps::PASS_SOURCES)?;
        state.maps.push(MapFill { name: maps::PASS_SOURCES, entries, capacity: capacity::PASS_SOURCES });
    }
    if let Some(map) = open(pin_dir, maps::PEERS)? {
        let entries = count::<u64, Peer>(map, maps::PEERS)?;
        state.maps.push(MapFill { name: maps::PEERS, entries, capacity: capacity::PEERS });
    }
    if let Some(map) = open(pin_dir, maps::COUNTERS)? {
        let counters: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(Map::from_map_data(map).map_err(map_err(maps::COUNTERS))?)
                .map_err(map_err(maps::COUNTERS))?;
        for c in Counter::ALL {
            let per_cpu = counters.get(&(c as u32), 0).map_err(map_err(maps::COUNTERS))?;
            state.counters.push((c, per_cpu.iter().sum()));
        }
    }
    Ok(state)
}

/// The pinned map `name`, if it is pinned.
fn open(pin_dir: &Path, name: &'static str) -> Result<Option<MapData>, FilterError> {
    let pin = pin_dir.join(name);
    if !pin.exists() {
        return Ok(None);
    }
    MapData::from_pin(&pin).map(Some).map_err(map_err(name))
}

fn typed<K: Pod, V: Pod>(map: MapData, name: &'static str) -> Result<HashMap<MapData, K, V>, FilterError> {
    HashMap::try_from(Map::from_map_data(map).map_err(map_err(name))?).map_err(map_err(name))
}

/// Entries in a hash map (walks its keys: one syscall per entry).
fn count<K: Pod, V: Pod>(map: MapData, name: &'static str) -> Result<usize, FilterError> {
    let map: HashMap<MapData, K, V> = typed(map, name)?;
    let mut n = 0;
    for key in map.keys() {
        key.map_err(map_err(name))?;
        n += 1;
    }
    Ok(n)
}
