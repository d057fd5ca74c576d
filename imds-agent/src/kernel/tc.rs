//! The node backstop at tc ingress: for kernels without netfilter links (Linux < 6.4, e.g.
//! the 5.15 of Ubuntu 22.04 node images), or when an operator asks for it.
//!
//! `imds_node_tc` runs at the clsact ingress hook of every interface of the agent's network
//! namespace except loopback: veths, bridges, tunnels, the uplink. Interfaces come and go with
//! pods, so the agent subscribes to link notifications *before* it lists the interfaces, and
//! attaches to each new one as it appears.
//!
//! Filters are attached through netlink (`cls_bpf`), at a fixed priority and handle: they
//! stay after the agent exits (the kernel holds the program), a restart replaces the program
//! of each one in place, and `uninstall` finds them by the program's name. What tc cannot
//! give: an interface created while no agent runs has no filter until the agent is back (the
//! netfilter mechanism has no such window; `status` lists uncovered interfaces).
use std::{collections::HashSet, io, thread};

use aya::{
    programs::{
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
        ProgramError, SchedClassifier, TcAttachType,
    },
    Ebpf,
};
use imds_common::programs;

use super::{
    rtnl::{self, LinkEvent},
    Attachment,
};

/// The first priority; lower runs first. A CNI filter at the same priority that was attached
/// later runs before it (`cls_bpf` keeps the newest first), and tcx programs (Linux ≥ 6.6) run
/// before any of these: see docs/kernel-path.md on CNIs that forward in eBPF.
pub const PRIORITY: u16 = 1;
/// A fixed handle, so a restart finds and replaces its own filter.
pub const HANDLE: TcHandle = TcHandle::new(0, 0x1d5);
/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// How often the watcher checks that every interface still has the filter.
pub const REPAIR_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TcBackstopError {
    #[error("the eBPF object has no program {}", programs::NODE_TC)]
    NoProgram,
    #[error("program {}", programs::NODE_TC)]
    Program(#[source] ProgramError),
    #[error("listing or watching this namespace's interfaces")]
    Links(#[source] io::Error),
    #[error("attaching {} at tc ingress of {interface}", programs::NODE_TC)]
    Attach { interface: String, source: Box<ProgramError> },
}

/// The program attached to every interface there is, and kept attached to new ones by
/// [`TcBackstop::watch`].
pub struct TcBackstop {
    events: rtnl::LinkEvents,
    covered: HashSet<u32>,
}

/// How [`TcBackstop::install`] went.
#[derive(Debug)]
pub struct TcInstalled {
    pub how: Attachment,
    /// Interfaces it could not attach to, with why: the backstop does not cover them.
    pub failed: Vec<(String, String)>,
}

impl TcBackstop {
    /// Loads `imds_node_tc` from `ebpf` and attaches it to every interface but loopback.
    pub fn install(ebpf: &mut Ebpf) -> Result<(TcBackstop, TcInstalled), TcBackstopError> {
        program(ebpf)?.load().map_err(TcBackstopError::Program)?;
        // Subscribe first: an interface created while the list is read is then not missed.
        let events = rtnl::LinkEvents::subscribe().map_err(TcBackstopError::Links)?;
        let mut backstop = TcBackstop { events, covered: HashSet::new() };
        let mut installed = TcInstalled { how: Attachment::Attached, failed: Vec::new() };
        for (index, name) in rtnl::interfaces().map_err(TcBackstopError::Links)? {
            match backstop.cover(ebpf, index, &name) {
                Ok(Some(Attachment::Replaced)) => installed.how = Attachment::Replaced,
                Ok(_) => {}
                Err(e) => installed.failed.push((name, format!("{:#}", anyhow::Error::from(e)))),
            }
        }
        Ok((backstop, installed))
    }

    /// Attaches the program of `ebpf` (the one [`TcBackstop::install`] loaded) to interfaces
    /// as they appear, for as long as the agent runs (on its own thread: netlink reads block).
    /// Every [`REPAIR_EVERY`] it also checks that each interface still has the filter, and puts
    /// back what is gone (a deleted clsact qdisc, a filter removed, an attach that failed).
    /// While `duty` is paused (another agent takes over), events are read and dropped: the
    /// next agent covers those interfaces, and repairs what it missed.
    pub fn watch(mut self, mut ebpf: Ebpf, duty: super::Duty) -> io::Result<()> {
        thread::Builder::new().name("node-backstop".into()).spawn(move || loop {
            let next = self.events.next(REPAIR_EVERY);
            // A resumed duty repairs everything: interfaces came and went meanwhile.
            let handled =
                duty.perform(|resumed| Ok::<_, std::convert::Infallible>(self.handle(&mut ebpf, next, resumed)));
            if matches!(handled, Some(Ok(false))) {
                return;
            }
        })?;
        Ok(())
    }

    /// Acts on what the link notifications said; `false` when they stopped for good.
    fn handle(&mut self, ebpf: &mut Ebpf, next: io::Result<Vec<LinkEvent>>, repair_all: bool) -> bool {
        if repair_all {
            self.covered.clear(); // what it knew may be stale
        }
        match next {
            Ok(events) if events.is_empty() || repair_all => self.repair(ebpf),
            Ok(events) => {
                for event in events {
                    match event {
                        LinkEvent::New(index) => self.cover_index(ebpf, index),
                        LinkEvent::Gone(index) => {
                            self.covered.remove(&index);
                        }
                    }
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                tracing::warn!("link notifications overflowed; checking every interface again");
                self.repair(ebpf);
            }
            Err(e) => {
                tracing::error!(error = %e, "link notifications stopped: new interfaces are not covered by the node backstop");
                return false;
            }
        }
        true
    }

    /// Covers every interface that lacks the filter, whatever `covered` believes.
    fn repair(&mut self, ebpf: &mut Ebpf) {
        let interfaces = match rtnl::interfaces() {
            Ok(all) => all,
            Err(e) => return tracing::error!(error = %e, "listing interfaces"),
        };
        for (index, _) in interfaces {
            if index != LOOPBACK_IFINDEX && !rtnl::has_ingress_filter(index, programs::NODE_TC).unwrap_or(false) {
                if self.covered.remove(&index) {
                    tracing::warn!(ifindex = index, "the node backstop's filter was gone; putting it back");
                }
                self.cover_index(ebpf, index);
            }
        }
    }

    fn cover_index(&mut self, ebpf: &mut Ebpf, index: u32) {
        if self.covered.contains(&index) {
            return;
        }
        let Ok(name) = nix::net::if_::if_indextoname(index) else {
            return; // gone already
        };
        let name = name.to_string_lossy().into_owned();
        match self.cover(ebpf, index, &name) {
            Ok(Some(_)) => tracing::info!(interface = %name, "node backstop attached"),
            Ok(None) => {}
            Err(e) => {
                let error = format!("{:#}", anyhow::Error::from(e));
                tracing::error!(interface = %name, %error, "node backstop NOT attached: this interface is not covered");
            }
        }
    }

    /// Makes `imds_node_tc` the filter at `name`'s ingress; `None` for loopback, which carries
    /// only the node's own packets.
    fn cover(&mut self, ebpf: &mut Ebpf, index: u32, name: &str) -> Result<Option<Attachment>, TcBackstopError> {
        if index == LOOPBACK_IFINDEX || self.covered.contains(&index) {
            return Ok(None);
        }
        let attach_err = |e: ProgramError| TcBackstopError::Attach { interface: name.to_owned(), source: Box::new(e) };
        match tc::qdisc_add_clsact(name) {
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            other => other.map_err(|e| attach_err(e.into()))?,
        }
        let program = program(ebpf)?;
        // A filter an earlier agent left: replace its program in place.
        let replaced = SchedClassifierLink::attached(name, TcAttachType::Ingress, PRIORITY, HANDLE, None)
            .map_err(|e| attach_err(TcError::IoError(e).into()))
            .and_then(|link| program.attach_to_link(link).map_err(attach_err));
        let (id, how) = match replaced {
            Ok(id) => (id, Attachment::Replaced),
            Err(TcBackstopError::Attach { source, .. }) if is_enoent(&source) => {
                let options = NlOptions { priority: PRIORITY, handle: HANDLE, classid: None };
                let id = program
                    .attach_with_options(name, TcAttachType::Ingress, TcAttachOptions::Netlink(options))
                    .map_err(attach_err)?;
                (id, Attachment::Attached)
            }
            Err(e) => return Err(e),
        };
        // The filter must outlive this process: take the link from aya (which would detach it
        // when dropped) and let it go.
        std::mem::forget(program.take_link(id).map_err(attach_err)?);
        self.covered.insert(index);
        Ok(Some(how))
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, TcBackstopError> {
    ebpf.program_mut(programs::NODE_TC).ok_or(TcBackstopError::NoProgram)?.try_into().map_err(TcBackstopError::Program)
}

fn is_enoent(e: &ProgramError) -> bool {
    matches!(e, ProgramError::TcError(TcError::NetlinkError(n)) if n.raw_os_error() == Some(libc::ENOENT))
}

/// Detaches `imds_node_tc` from every interface of this namespace; returns where it was.
pub fn uninstall() -> io::Result<Vec<String>> {
    let mut removed = Vec::new();
    for (index, name) in rtnl::interfaces()? {
        if index == LOOPBACK_IFINDEX || !rtnl::has_ingress_filter(index, programs::NODE_TC)? {
            continue;
        }
        match tc::qdisc_detach_program(&name, TcAttachType::Ingress, programs::NODE_TC) {
            Ok(()) => removed.push(name),
            // Gone in the meantime, with its interface or by another hand.
            Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(TcError::NetlinkError(e)) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENODEV)) => {}
            Err(e) => return Err(io::Error::other(e)),
        }
    }
    Ok(removed)
}

/// Coverage of this namespace's interfaces (loopback excepted): (covered, not covered).
pub fn coverage() -> io::Result<(Vec<String>, Vec<String>)> {
    let mut covered = Vec::new();
    let mut uncovered = Vec::new();
    for (index, name) in rtnl::interfaces()? {
        if index == LOOPBACK_IFINDEX {
            continue;
        }
        if rtnl::has_ingress_filter(index, programs::NODE_TC)? {
            covered.push(name);
        } else {
            uncovered.push(name);
        }
    }
    Ok((covered, uncovered))
}
