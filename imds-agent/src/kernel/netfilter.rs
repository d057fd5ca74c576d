//! The node backstop at netfilter `PRE_ROUTING` (Linux ≥ 6.4): `imds_node_nf`, loaded and
//! linked by hand because aya 0.14 knows neither the program type nor its link.
//!
//! - **Loading.** The program sits in the object's `classifier` section (aya's parser refuses
//!   a `netfilter` one). It is relocated here from the same object bytes against the maps aya
//!   created, then loaded as `BPF_PROG_TYPE_NETFILTER`.
//! - **Layout.** It reads `struct sk_buff` and `struct net_device` fields at offsets the
//!   running kernel's BTF gives ([`KernelLayout`]), set as load-time globals.
//! - **Links.** Six in the agent's network namespace, pinned: IPv4 and IPv6, each at
//!   `PRE_ROUTING` (before conntrack, defragmentation and any NAT: nothing at that hook sees a
//!   packet before it is judged) and at `LOCAL_IN` and `FORWARD` (after the node's own DNAT,
//!   so a destination rewritten to a protected one, by a Service or by conntrack undoing a
//!   NAT, is judged too), each at the earliest priority a link may take.
//! - **Restarts.** A netfilter link cannot swap its program (`BPF_LINK_UPDATE` is not
//!   supported), so a restart makes before it breaks: the new link is attached (at the other of
//!   two adjacent priorities: one hook takes one BPF link per priority) and pinned in the old
//!   one's place, then the old one is detached. For that moment both run the same rule over
//!   the same maps.
use std::{
    collections::HashSet,
    fs, io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{maps::Map, Ebpf};
use imds_common::programs;

use super::{sys, Attachment};

/// `NFPROTO_IPV4`, `NFPROTO_IPV6` and the hooks (`enum nf_inet_hooks`).
const NFPROTO_IPV4: u32 = 2;
const NFPROTO_IPV6: u32 = 10;
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_FORWARD: u32 = 2;
/// `NF_IP_PRI_FIRST + 1` and the next: the kernel refuses `NF_IP_PRI_FIRST` itself for a
/// link, and a second BPF link at a priority already taken (`EBUSY`). A restart attaches the
/// new link at whichever of the two the old one does not hold.
pub const PRIORITIES: [i32; 2] = [i32::MIN + 1, i32::MIN + 2];

/// The running kernel's BTF.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    #[error("reading the kernel's BTF ({VMLINUX_BTF})")]
    Btf(#[source] io::Error),
    #[error("the kernel's BTF has no {0} (needed to read packets at netfilter PRE_ROUTING)")]
    NoField(&'static str),
    #[error("relocating {} in the eBPF object", programs::NODE_NETFILTER)]
    Relocate(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the eBPF object has no program {}", programs::NODE_NETFILTER)]
    NoProgram,
    #[error("the kernel refused {} (netfilter programs need Linux ≥ 6.4 with CONFIG_NETFILTER_BPF_LINK){}", programs::NODE_NETFILTER, verifier_tail(.log))]
    Load { source: io::Error, log: String },
    #[error("attaching {} at netfilter {place}", programs::NODE_NETFILTER)]
    Attach { place: String, source: io::Error },
    #[error("{what} {}", path.display())]
    Pin { what: &'static str, path: PathBuf, source: io::Error },
}

impl NetfilterError {
    /// Whether the kernel lacks what the mechanism needs (the program type, the link type),
    /// rather than failing at something it supports: only then is tc the answer.
    #[must_use]
    pub fn is_unsupported(&self) -> bool {
        /// `ENOTSUPP`, the kernel-internal "not supported" some BPF paths return.
        const ENOTSUPP: i32 = 524;
        let unsupported = [libc::EINVAL, libc::EOPNOTSUPP, ENOTSUPP, libc::EAFNOSUPPORT, libc::EPROTO];
        match self {
            NetfilterError::Btf(_) | NetfilterError::NoField(_) => true,
            NetfilterError::Load { source, .. } | NetfilterError::Attach { source, .. } => {
                source.raw_os_error().is_some_and(|e| unsupported.contains(&e))
            }
            NetfilterError::Relocate(_) | NetfilterError::NoProgram | NetfilterError::Pin { .. } => false,
        }
    }
}

/// The last lines of a verifier log, where it says what it refused.
fn verifier_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    match lines.len() {
        0 => String::new(),
        n => format!(": {}", lines[n.saturating_sub(3)..].join(" / ")),
    }
}

/// Offsets of the kernel fields the program reads, from the running kernel's BTF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    /// `struct sk_buff`: `head` (`unsigned char *`).
    pub skb_head: u32,
    /// `struct sk_buff`: `network_header` (`u16`, from `head`).
    pub skb_network_header: u32,
    /// `struct sk_buff`: `tail` (`u32` on 64-bit kernels, from `head`): where the linear
    /// data ends. Headers past it are in page fragments, which the program cannot read.
    pub skb_tail: u32,
    /// `struct sk_buff`: `dev` (`struct net_device *`, the device it arrived on).
    pub skb_dev: u32,
    /// `struct net_device`: `ifindex` (`int`).
    pub net_device_ifindex: u32,
}

impl KernelLayout {
    /// The layout of the running kernel.
    pub fn of_running_kernel() -> Result<KernelLayout, NetfilterError> {
        let btf = fs::read(VMLINUX_BTF).map_err(NetfilterError::Btf)?;
        KernelLayout::from_btf(&btf)
    }

    /// The layout `btf` (a kernel's BTF blob) describes.
    pub fn from_btf(btf: &[u8]) -> Result<KernelLayout, NetfilterError> {
        let types = super::btf::StructOffsets::parse(btf).map_err(|e| NetfilterError::Btf(io::Error::other(e)))?;
        let field = |strukt: &str, member: &str, name: &'static str| {
            types.offset_of(strukt, member).ok_or(NetfilterError::NoField(name))
        };
        Ok(KernelLayout {
            skb_head: field("sk_buff", "head", "sk_buff.head")?,
            skb_network_header: field("sk_buff", "network_header", "sk_buff.network_header")?,
            skb_tail: field("sk_buff", "tail", "sk_buff.tail")?,
            skb_dev: field("sk_buff", "dev", "sk_buff.dev")?,
            net_device_ifindex: field("net_device", "ifindex", "net_device.ifindex")?,
        })
    }

    /// The program's globals and their values, for `EbpfLoader::override_global`.
    #[must_use]
    pub fn globals(&self) -> [(&'static str, u32); 5] {
        [
            ("SKB_HEAD_OFFSET", self.skb_head),
            ("SKB_NETWORK_HEADER_OFFSET", self.skb_network_header),
            ("SKB_TAIL_OFFSET", self.skb_tail),
            ("SKB_DEV_OFFSET", self.skb_dev),
            ("NET_DEVICE_IFINDEX_OFFSET", self.net_device_ifindex),
        ]
    }
}

/// Whether this kernel lets this process attach a netfilter program at `PRE_ROUTING`: a
/// two-instruction program (`return NF_ACCEPT`) is loaded and linked in a scratch network
/// namespace, then both are let go. Nothing of the node's own namespace is touched.
pub fn probe_attach() -> Result<(), NetfilterError> {
    let accept = [insn(0xb7, 1), insn(0x95, 0)]; // r0 = NF_ACCEPT; exit
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetfilterError::Attach { place: "(making a scratch namespace)".into(), source: e.into() })?;
        let prog = sys::prog_load(sys::PROG_TYPE_NETFILTER, "imds_nf_probe", &accept, c"GPL", None)
            .map_err(|source| NetfilterError::Load { source, log: String::new() })?;
        sys::netfilter_link_create(prog.as_fd(), NFPROTO_IPV4, NF_INET_PRE_ROUTING, PRIORITIES[0])
            .map(drop)
            .map_err(|source| NetfilterError::Attach { place: "ipv4/prerouting".into(), source })
    })
    .join()
    .unwrap_or_else(|_| {
        let source = io::Error::other("the probe's thread panicked");
        Err(NetfilterError::Attach { place: "(the scratch-namespace probe)".into(), source })
    })
}

/// One instruction with no registers but r0 and an immediate.
fn insn(code: u8, imm: i32) -> aya_obj::generated::bpf_insn {
    aya_obj::generated::bpf_insn {
        code,
        _bitfield_align_1: [],
        _bitfield_1: aya_obj::generated::bpf_insn::new_bitfield_1(0, 0),
        off: 0,
        imm,
    }
}

/// A protocol family the program is linked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    const fn pf(self) -> u32 {
        match self {
            Family::Ipv4 => NFPROTO_IPV4,
            Family::Ipv6 => NFPROTO_IPV6,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

/// A netfilter hook the program is linked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NfHook {
    /// Every packet the namespace receives, before any NAT.
    PreRouting,
    /// Packets delivered locally, after the node's DNAT.
    LocalIn,
    /// Packets the node routes on, after its DNAT.
    Forward,
}

impl NfHook {
    const fn number(self) -> u32 {
        match self {
            NfHook::PreRouting => NF_INET_PRE_ROUTING,
            NfHook::LocalIn => NF_INET_LOCAL_IN,
            NfHook::Forward => NF_INET_FORWARD,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            NfHook::PreRouting => "prerouting",
            NfHook::LocalIn => "input",
            NfHook::Forward => "forward",
        }
    }
}

/// Where one link sits: a family's hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub family: Family,
    pub hook: NfHook,
}

impl Place {
    /// Every place, in attach order: the earliest hook first.
    pub const ALL: [Place; 6] = [
        Place { family: Family::Ipv4, hook: NfHook::PreRouting },
        Place { family: Family::Ipv6, hook: NfHook::PreRouting },
        Place { family: Family::Ipv4, hook: NfHook::LocalIn },
        Place { family: Family::Ipv6, hook: NfHook::LocalIn },
        Place { family: Family::Ipv4, hook: NfHook::Forward },
        Place { family: Family::Ipv6, hook: NfHook::Forward },
    ];

    /// `ipv4/prerouting` and so on.
    #[must_use]
    pub fn name(self) -> String {
        format!("{}/{}", self.family.name(), self.hook.name())
    }

    /// File name of the place's pinned link.
    #[must_use]
    pub fn link_pin(self) -> String {
        format!("link_{}_{}_{}", programs::NODE_NETFILTER, self.family.name(), self.hook.name())
    }

    /// Whether a link's target (protocol family, hook number) is this place.
    fn is(self, pf: u32, hooknum: u32) -> bool {
        self.family.pf() == pf && self.hook.number() == hooknum
    }
}

/// Relocates `imds_node_nf` from `object` against the maps of `ebpf` (loaded from the same
/// object) and loads it into the kernel.
pub fn load(ebpf: &Ebpf, object: &[u8]) -> Result<OwnedFd, NetfilterError> {
    let relocate = |e: Box<dyn std::error::Error + Send + Sync>| NetfilterError::Relocate(e);
    let mut obj = aya_obj::Object::parse(object).map_err(|e| relocate(e.into()))?;
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    // `relocate_maps` matches maps by their place in this parse, so it takes this parse's own
    // map definitions (cloned: it borrows the object mutably) with the fds aya created.
    let maps: Vec<(String, i32, aya_obj::Map)> = ebpf
        .maps()
        .filter_map(|(name, map)| Some((name.to_owned(), map_fd(map)?.as_raw_fd(), obj.maps.get(name)?.clone())))
        .collect();
    obj.relocate_maps(maps.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)), &text_sections)
        .map_err(|e| relocate(e.into()))?;
    obj.relocate_calls(&text_sections).map_err(|e| relocate(e.into()))?;
    obj.sanitize_functions(aya::features());
    let program = obj.programs.get(programs::NODE_NETFILTER).ok_or(NetfilterError::NoProgram)?;
    let function = obj.functions.get(&program.function_key()).ok_or(NetfilterError::NoProgram)?;
    let name = programs::NODE_NETFILTER;
    match sys::prog_load(sys::PROG_TYPE_NETFILTER, name, &function.instructions, &obj.license, None) {
        Ok(fd) => Ok(fd),
        Err(source) => {
            // Load again with the verifier's log, to say why.
            let mut log = vec![0u8; 256 * 1024];
            let again =
                sys::prog_load(sys::PROG_TYPE_NETFILTER, name, &function.instructions, &obj.license, Some(&mut log));
            drop(again);
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            Err(NetfilterError::Load { source, log: String::from_utf8_lossy(&log[..end]).into_owned() })
        }
    }
}

/// The file descriptor of an aya map of a type this object uses.
fn map_fd(map: &Map) -> Option<BorrowedFd<'_>> {
    match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::PerCpuHashMap(m)
        | Map::PerfEventArray(m)
        | Map::RingBuf(m) => Some(m.fd().as_fd()),
        _ => None,
    }
}

/// Makes `prog` the program at every [`Place`], pinned under `pin_dir`, replacing (make
/// before break) what an earlier run pinned there.
pub fn attach(prog: BorrowedFd<'_>, pin_dir: &Path) -> Result<Attachment, NetfilterError> {
    let mut how = Attachment::Attached;
    for place in Place::ALL {
        let pin = pin_dir.join(place.link_pin());
        let old = open_pin(&pin)?;
        let taken = match &old {
            Some(link) => sys::netfilter_link_target(link.as_fd())
                .map_err(pin_err("reading pinned link", &pin))?
                .map(|t| t.priority),
            None => None,
        };
        let priority = if taken == Some(PRIORITIES[0]) { PRIORITIES[1] } else { PRIORITIES[0] };
        let link = sys::netfilter_link_create(prog, place.family.pf(), place.hook.number(), priority)
            .map_err(|source| NetfilterError::Attach { place: place.name(), source })?;
        // Pin beside the old link, then move over it: the pin always names a live link.
        // (bpffs refuses names with a dot.)
        let fresh = pin_dir.join(format!("{}_new", place.link_pin()));
        let _stale = fs::remove_file(&fresh);
        sys::obj_pin(link.as_fd(), &fresh).map_err(pin_err("pinning link", &fresh))?;
        fs::rename(&fresh, &pin).map_err(pin_err("moving link pin to", &pin))?;
        if let Some(old) = old {
            detach(old.as_fd()).map_err(pin_err("detaching the previous link of", &pin))?;
            how = Attachment::Replaced;
        }
    }
    Ok(how)
}

/// Detaches a link now; one already detached is not an error.
fn detach(link: BorrowedFd<'_>) -> io::Result<()> {
    match sys::link_detach(link) {
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => Ok(()),
        other => other,
    }
}

/// Detaches and unpins the links under `pin_dir`; returns the pins removed.
pub fn uninstall(pin_dir: &Path) -> Result<Vec<String>, NetfilterError> {
    let mut removed = Vec::new();
    for (place, pin, link) in pinned_places(pin_dir)? {
        detach(link.as_fd()).map_err(pin_err("detaching link", &pin))?;
        fs::remove_file(&pin).map_err(pin_err("removing pin", &pin))?;
        removed.push(place.link_pin());
    }
    Ok(removed)
}

/// Each place with a pinned link under `pin_dir`: its pin, and the link opened.
fn pinned_places(pin_dir: &Path) -> Result<Vec<(Place, PathBuf, OwnedFd)>, NetfilterError> {
    let mut found = Vec::new();
    for place in Place::ALL {
        let pin = pin_dir.join(place.link_pin());
        if let Some(link) = open_pin(&pin)? {
            found.push((place, pin, link));
        }
    }
    Ok(found)
}

/// The link pinned at `pin`, if there is one.
fn open_pin(pin: &Path) -> Result<Option<OwnedFd>, NetfilterError> {
    if !pin.exists() {
        return Ok(None);
    }
    sys::obj_get(pin).map(Some).map_err(pin_err("opening pinned link", pin))
}

/// An error about the pin at `path`, from what was done to it.
fn pin_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> NetfilterError {
    let path = path.to_owned();
    move |source| NetfilterError::Pin { what, path, source }
}

/// A pinned link of the node backstop, as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedNetfilterLink {
    pub place: Place,
    pub link_id: u32,
    pub prog_id: u32,
    pub priority: i32,
}

/// The node backstop's links pinned under `pin_dir` (a place without a pin is absent).
pub fn pinned(pin_dir: &Path) -> Result<Vec<PinnedNetfilterLink>, NetfilterError> {
    let mut links = Vec::new();
    for (place, pin, link) in pinned_places(pin_dir)? {
        match sys::netfilter_link_target(link.as_fd()).map_err(pin_err("reading pinned link", &pin))? {
            Some(t) if place.is(t.pf, t.hooknum) => {
                links.push(PinnedNetfilterLink { place, link_id: t.link_id, prog_id: t.prog_id, priority: t.priority });
            }
            _ => {
                return Err(NetfilterError::Pin {
                    what: "not the netfilter link its name says:",
                    path: pin,
                    source: io::Error::from(io::ErrorKind::InvalidData),
                })
            }
        }
    }
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_tail_keeps_the_last_words() {
        assert_eq!(verifier_tail(""), "");
        assert_eq!(verifier_tail("a\nb\n\nc\nd\n"), ": b / c / d");
    }

    #[test]
    fn places_pin_apart() {
        let pins: HashSet<String> = Place::ALL.iter().map(|p| p.link_pin()).collect();
        assert_eq!(pins.len(), Place::ALL.len());
        assert!(Place::ALL[5].is(NFPROTO_IPV6, NF_INET_FORWARD) && !Place::ALL[5].is(NFPROTO_IPV4, NF_INET_FORWARD));
    }
}
