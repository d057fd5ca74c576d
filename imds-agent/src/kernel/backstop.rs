//! The node backstop: which mechanism runs it on this kernel, putting it in place, taking it
//! away, and reading it back. The programs themselves are `imds-ebpf/src/node.rs`.
//!
//! | kernel | mechanism | covers |
//! |---|---|---|
//! | ≥ 6.4 | netfilter `PRE_ROUTING` link ([`netfilter`]) | the whole namespace, every interface, also while no agent runs |
//! | < 6.4 | tc ingress filter per interface ([`tc`]) | every interface the agent has seen; new ones while it is down only once it is back |
use std::{
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
};

use aya::{util::KernelVersion, Ebpf};

use super::{
    netfilter::{self, KernelLayout, NetfilterError},
    tc::{self, TcBackstop, TcBackstopError},
    Attachment,
};

/// Where the node backstop runs (`--node-backstop`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NodeBackstop {
    /// netfilter on Linux ≥ 6.4 (falling back to tc if the kernel refuses it), tc before.
    #[default]
    Auto,
    /// A netfilter `PRE_ROUTING` link (Linux ≥ 6.4): one hook for the whole namespace.
    Netfilter,
    /// A tc ingress filter on every interface but loopback.
    Tc,
    /// None: only the cgroup programs judge, so pods holding `NET_RAW` or `NET_ADMIN` can
    /// reach protected addresses below the socket layer.
    Off,
}

/// The mechanism that runs the backstop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Netfilter,
    Tc,
}

impl Mechanism {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Mechanism::Netfilter => "netfilter",
            Mechanism::Tc => "tc",
        }
    }
}

/// The first kernel with netfilter links (`BPF_PROG_TYPE_NETFILTER`).
const NETFILTER_LINKS: (u8, u8) = (6, 4);

#[derive(Debug, thiserror::Error)]
pub enum BackstopError {
    #[error("the node backstop (--node-backstop netfilter)")]
    Netfilter(#[source] NetfilterError),
    #[error("the node backstop (tc)")]
    Tc(#[source] TcBackstopError),
    #[error("--node-backstop netfilter needs Linux ≥ 6.4 (this is {0}); use auto or tc")]
    KernelTooOld(String),
    #[error("removing the node backstop's {mechanism} leftovers")]
    Leftovers { mechanism: &'static str, source: Box<dyn std::error::Error + Send + Sync> },
}

/// The backstop to put in place. The netfilter program needs the kernel's layout as
/// load-time globals ([`Plan::layout`]), and must be relocated while the object's maps are
/// all still in the loaded [`Ebpf`] ([`Plan::load`]).
#[derive(Debug)]
pub struct Plan {
    requested: NodeBackstop,
    /// Set when netfilter is to be tried.
    pub layout: Option<KernelLayout>,
    netfilter_program: Option<Result<OwnedFd, NetfilterError>>,
}

impl Plan {
    /// Decides from the request and the running kernel.
    pub fn new(requested: NodeBackstop) -> Result<Plan, BackstopError> {
        let kernel = KernelVersion::current().ok();
        let has_links = kernel.is_none_or(|k| k >= KernelVersion::new(NETFILTER_LINKS.0, NETFILTER_LINKS.1, 0));
        let layout = match requested {
            NodeBackstop::Off | NodeBackstop::Tc => None,
            NodeBackstop::Netfilter if !has_links => {
                return Err(BackstopError::KernelTooOld(kernel.map(|k| format!("{k:?}")).unwrap_or_default()));
            }
            NodeBackstop::Netfilter => Some(KernelLayout::of_running_kernel().map_err(BackstopError::Netfilter)?),
            NodeBackstop::Auto if !has_links => None,
            NodeBackstop::Auto => match KernelLayout::of_running_kernel() {
                Ok(layout) => Some(layout),
                Err(e) => {
                    let error = format!("{:#}", anyhow::Error::from(e));
                    tracing::warn!(%error, "node backstop: netfilter unavailable, using tc");
                    None
                }
            },
        };
        Ok(Plan { requested, layout, netfilter_program: None })
    }

    /// Loads the netfilter program (when netfilter is to be tried) from `object`, relocated
    /// against the maps of `ebpf`: call it before any map is taken out of `ebpf`.
    pub fn load(&mut self, ebpf: &Ebpf, object: &[u8]) {
        if self.layout.is_some() {
            self.netfilter_program = Some(netfilter::load(ebpf, object));
        }
    }
}

/// The backstop as installed.
pub struct Installed {
    /// `None`: `--node-backstop off`.
    pub mechanism: Option<Mechanism>,
    pub how: Option<Attachment>,
    /// Interfaces the tc mechanism could not attach to, with why.
    pub uncovered: Vec<(String, String)>,
    /// The tc mechanism's interface watcher, to start once the programs' maps are taken.
    pub watcher: Option<TcBackstop>,
}

/// Puts the backstop in place with the programs of `ebpf` (and the netfilter program
/// [`Plan::load`] loaded), then removes what another mechanism left from an earlier run.
pub fn install(plan: Plan, ebpf: &mut Ebpf, pin_dir: &Path) -> Result<Installed, BackstopError> {
    if plan.requested == NodeBackstop::Off {
        remove_netfilter(pin_dir)?;
        remove_tc()?;
        tracing::warn!(
            "node backstop off: pods holding NET_RAW or NET_ADMIN can reach protected addresses below the socket layer"
        );
        return Ok(Installed { mechanism: None, how: None, uncovered: Vec::new(), watcher: None });
    }
    if let Some(program) = plan.netfilter_program {
        match program.and_then(|prog| netfilter::attach(prog.as_fd(), pin_dir)) {
            Ok(how) => {
                remove_tc()?;
                return Ok(Installed {
                    mechanism: Some(Mechanism::Netfilter),
                    how: Some(how),
                    uncovered: Vec::new(),
                    watcher: None,
                });
            }
            Err(e) if plan.requested == NodeBackstop::Auto && e.is_unsupported() => {
                let error = format!("{:#}", anyhow::Error::from(e));
                tracing::warn!(%error, "node backstop: the kernel refused netfilter, using tc");
            }
            Err(e) => return Err(BackstopError::Netfilter(e)),
        }
    }
    let (watcher, installed) = TcBackstop::install(ebpf).map_err(BackstopError::Tc)?;
    remove_netfilter(pin_dir)?;
    for (interface, error) in &installed.failed {
        tracing::error!(%interface, %error, "node backstop NOT attached: this interface is not covered");
    }
    Ok(Installed {
        mechanism: Some(Mechanism::Tc),
        how: Some(installed.how),
        uncovered: installed.failed,
        watcher: Some(watcher),
    })
}

fn remove_netfilter(pin_dir: &Path) -> Result<(), BackstopError> {
    netfilter::uninstall(pin_dir)
        .map(drop)
        .map_err(|e| BackstopError::Leftovers { mechanism: "netfilter", source: Box::new(e) })
}

fn remove_tc() -> Result<(), BackstopError> {
    tc::uninstall().map(drop).map_err(|e| BackstopError::Leftovers { mechanism: "tc", source: Box::new(e) })
}

/// What `--node-backstop auto` would run on this kernel, and what was found on the way; `Err`
/// names what stands in the way of netfilter (tc then runs in its place).
pub fn probe() -> (Mechanism, Result<String, String>) {
    let Ok(kernel) = KernelVersion::current() else {
        return (Mechanism::Tc, Err("cannot read the kernel version".into()));
    };
    if kernel < KernelVersion::new(NETFILTER_LINKS.0, NETFILTER_LINKS.1, 0) {
        return (Mechanism::Tc, Err(format!("netfilter links need Linux ≥ 6.4 (this is {kernel:?})")));
    }
    let layout = match KernelLayout::of_running_kernel() {
        Ok(layout) => layout,
        Err(e) => return (Mechanism::Tc, Err(format!("{:#}", anyhow::Error::from(e)))),
    };
    match netfilter::probe_attach() {
        Ok(()) => (
            Mechanism::Netfilter,
            Ok(format!(
                "a test link attached at PRE_ROUTING in a scratch namespace; sk_buff layout from BTF: head {}, network_header {}, tail {}, dev {}; net_device.ifindex {}",
                layout.skb_head, layout.skb_network_header, layout.skb_tail, layout.skb_dev, layout.net_device_ifindex
            )),
        ),
        Err(e) => (Mechanism::Tc, Err(format!("{:#}", anyhow::Error::from(e)))),
    }
}

/// What `uninstall` removed of the backstop.
pub fn uninstall(pin_dir: &Path) -> Result<Vec<String>, BackstopError> {
    let mut removed = netfilter::uninstall(pin_dir)
        .map_err(|e| BackstopError::Leftovers { mechanism: "netfilter", source: Box::new(e) })?;
    let interfaces = tc::uninstall().map_err(|e| BackstopError::Leftovers { mechanism: "tc", source: Box::new(e) })?;
    removed.extend(interfaces.into_iter().map(|i| format!("tc ingress filter on {i}")));
    Ok(removed)
}

/// The backstop as the kernel holds it, whether or not an agent runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BackstopState {
    /// `netfilter`, `tc`, or none found.
    pub mechanism: Option<&'static str>,
    /// netfilter: the places with a pinned link (`ipv4/prerouting`, …).
    pub links: Vec<String>,
    /// tc: interfaces with the filter, and interfaces without it (loopback excepted).
    pub covered: Vec<String>,
    pub uncovered: Vec<String>,
}

impl BackstopState {
    /// Whether every packet entering the namespace meets the backstop.
    #[must_use]
    pub fn complete(&self) -> bool {
        match self.mechanism {
            Some("netfilter") => self.links.len() == netfilter::Place::ALL.len(),
            Some("tc") => self.uncovered.is_empty(),
            _ => false,
        }
    }
}

/// Reads the backstop of this network namespace (netfilter links pinned under `pin_dir`, or
/// tc filters on its interfaces).
pub fn inspect(pin_dir: &Path) -> Result<BackstopState, BackstopError> {
    let links = netfilter::pinned(pin_dir).map_err(BackstopError::Netfilter)?;
    if !links.is_empty() {
        return Ok(BackstopState {
            mechanism: Some(Mechanism::Netfilter.name()),
            links: links.iter().map(|l| l.place.name()).collect(),
            ..BackstopState::default()
        });
    }
    let (covered, uncovered) =
        tc::coverage().map_err(|e| BackstopError::Leftovers { mechanism: "tc", source: Box::new(e) })?;
    if covered.is_empty() {
        return Ok(BackstopState::default());
    }
    Ok(BackstopState { mechanism: Some(Mechanism::Tc.name()), covered, uncovered, ..BackstopState::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completeness_needs_every_link_or_every_interface() {
        let nf = |links: Vec<String>| BackstopState { mechanism: Some("netfilter"), links, ..BackstopState::default() };
        let all: Vec<String> = netfilter::Place::ALL.iter().map(|p| p.name()).collect();
        assert!(nf(all.clone()).complete());
        assert!(!nf(all[..5].to_vec()).complete());
        let tc = |uncovered: Vec<String>| BackstopState {
            mechanism: Some("tc"),
            covered: vec!["eth0".into()],
            uncovered,
            ..BackstopState::default()
        };
        assert!(tc(vec![]).complete());
        assert!(!tc(vec!["veth1".into()]).complete());
        assert!(!BackstopState::default().complete());
    }
}
