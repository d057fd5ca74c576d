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
mod duty;
mod filter;
pub mod inspect;
pub mod logs;
pub mod netfilter;
pub mod origin;
mod protected;
mod rtnl;
pub mod sockdiag;
mod sys;
pub mod tc;

use std::{
    fs, io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{maps::MapError, programs::ProgramError};
use aya_obj::generated::bpf_attach_type;
use imds_common::{capacity, maps, programs, Verdict, MAX_PORTS_PER_ADDR};

pub use self::{
    backstop::{Mechanism, NodeBackstop},
    duty::Duty,
    filter::{admit_agent, Attachment, Filter, Redirects},
    origin::{CallerOrigin, OriginLookup, OriginTable},
    protected::{group_endpoints, nat64_table, parse_nat64_prefix, protection_warnings},
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
    fn link_pins_are_distinct_per_hook() {
        let pins: std::collections::HashSet<String> = Hook::ALL.iter().map(|h| h.link_pin()).collect();
        assert_eq!(pins.len(), Hook::ALL.len());
    }
}
