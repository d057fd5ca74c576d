//! Types and constants shared by the kernel programs (`imds-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]`, `Copy`, free of `bool`/`Option`, and laid out with no
//! implicit padding, so both sides agree on every byte of a map key or value. Addresses and
//! ports are kept exactly as they travel on the wire (network byte order); field names ending
//! in `_be` say so. The `user` feature adds `aya::Pod` for the agent side.
#![no_std]

/// What the kernel does with a cgroup's connections to protected endpoints.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Left alone: the connection reaches the real endpoint.
    Pass = 1,
    /// `connect()` fails with `EPERM`; other packets to a protected address are dropped.
    Deny = 2,
    /// Rewritten to the agent, which decides per request.
    Redirect = 3,
}

/// Raw values of [`Verdict`] as stored in the `VERDICTS` map.
pub const VERDICT_PASS: u32 = Verdict::Pass as u32;
pub const VERDICT_DENY: u32 = Verdict::Deny as u32;
pub const VERDICT_REDIRECT: u32 = Verdict::Redirect as u32;

impl Verdict {
    /// The verdict a raw map value stands for; `None` for values no version ever wrote.
    #[must_use]
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            VERDICT_PASS => Some(Verdict::Pass),
            VERDICT_DENY => Some(Verdict::Deny),
            VERDICT_REDIRECT => Some(Verdict::Redirect),
            _ => None,
        }
    }

    /// Lower-case name, as the CLI and logs spell it.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Deny => "deny",
            Verdict::Redirect => "redirect",
        }
    }
}

/// Most ports one protected address can redirect (e.g. 80 and 32526 on the wire server).
pub const MAX_PORTS_PER_ADDR: usize = 4;

/// How many cgroup levels the programs walk looking for a verdict (root is level 0).
/// Kubelet pods sit at depth 3–4; nested setups (kind, systemd slices) add a few more.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// Names of the maps in the BPF object (also the file names of their pins).
pub mod maps {
    /// `HashMap<u64 cgroup id, u32 verdict>`.
    pub const VERDICTS: &str = "VERDICTS";
    /// `HashMap<u32 IPv4 (network order), ProtectedAddr>`.
    pub const PROTECTED: &str = "PROTECTED";
    /// `Array<Config>` with one entry.
    pub const CONFIG: &str = "CONFIG";
    /// `PerCpuArray<u64>` indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// `LruHashMap<u64 socket cookie, Origin>`: between `connect()` and the SYN.
    pub const PENDING: &str = "PENDING";
    /// `LruHashMap<OriginKey, Origin>`: from the SYN until the agent takes it or the socket closes.
    pub const ORIGINS: &str = "ORIGINS";
    /// `LruHashMap<u64 socket cookie, Peer>`: what a redirected socket asked for, from the SYN
    /// until it closes, so `getpeername()` reports it.
    pub const PEERS: &str = "PEERS";
    /// Every map the agent pins, in the order it reports them.
    pub const PINNED: [&str; 7] = [VERDICTS, PROTECTED, CONFIG, COUNTERS, PENDING, ORIGINS, PEERS];
}

/// Names of the programs in the BPF object.
pub mod programs {
    pub const CONNECT4: &str = "imds_connect4";
    pub const CONNECT6: &str = "imds_connect6";
    pub const SOCK_OPS: &str = "imds_sock_ops";
    pub const EGRESS: &str = "imds_egress";
    pub const PEER4: &str = "imds_peer4";
    pub const PEER6: &str = "imds_peer6";
}

/// Capacity of the maps. The verdict map holds one entry per pod (or container) cgroup the
/// agent has an opinion about; the origin maps hold connections in flight.
pub mod capacity {
    pub const VERDICTS: u32 = 65_536;
    pub const PROTECTED: u32 = 64;
    pub const PENDING: u32 = 16_384;
    pub const ORIGINS: u32 = 65_536;
    /// Redirected connections open at once (the agent serves at most 4,096 by default).
    pub const PEERS: u32 = 16_384;
}

/// Indexes of the per-CPU counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// `connect()` to a protected address let through (PASS verdict or the agent itself).
    ConnectPass = 0,
    /// `connect()` to a protected address refused with `EPERM`.
    ConnectDeny = 1,
    /// `connect()` to a protected endpoint rewritten to the agent.
    ConnectRedirect = 2,
    /// Packets to a protected address dropped at egress (raw sockets, unconnected UDP, …).
    EgressDrop = 3,
    /// Origin records moved to the connection-keyed map (one per redirected TCP connection).
    OriginRecorded = 4,
    /// Origin records that could not be stored (map update failed); the agent will refuse.
    OriginLost = 5,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 6] = [
        Counter::ConnectPass,
        Counter::ConnectDeny,
        Counter::ConnectRedirect,
        Counter::EgressDrop,
        Counter::OriginRecorded,
        Counter::OriginLost,
    ];
    /// Number of slots in the counter map.
    pub const LEN: u32 = Self::ALL.len() as u32;

    /// A stable, metric-friendly name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectPass => "connect_pass",
            Counter::ConnectDeny => "connect_deny",
            Counter::ConnectRedirect => "connect_redirect",
            Counter::EgressDrop => "egress_drop",
            Counter::OriginRecorded => "origin_recorded",
            Counter::OriginLost => "origin_lost",
        }
    }
}

/// Node-wide settings, the only entry of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// cgroup id of the agent itself; its own upstream connections are never redirected.
    /// 0 = none.
    pub exempt_cgroup: u64,
    /// Where redirected connections go (the agent's listen address), network order.
    pub agent_ip4_be: u32,
    /// Verdict for cgroups with no entry in `VERDICTS` (and no ancestor with one).
    /// 0 means "not configured yet" and is treated as REDIRECT: fail closed.
    pub default_verdict: u32,
    /// The agent's listen port, network order.
    pub agent_port_be: u16,
    /// Explicit padding, always zero.
    pub pad: [u8; 6],
}

/// Value of the `PROTECTED` map: the redirectable ports of one protected IPv4 address.
///
/// A connection from a non-PASS cgroup to a protected address on any other port, or with
/// any protocol but TCP, is refused: there is nothing else there a pod may talk to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtectedAddr {
    /// Ports in network order; 0 marks an unused slot.
    pub ports_be: [u16; MAX_PORTS_PER_ADDR],
}

impl ProtectedAddr {
    /// Whether `port_be` (network order) is one of the redirectable ports.
    #[inline(always)]
    #[expect(clippy::inline_always, reason = "called from BPF programs, where calls cost verifier complexity")]
    #[must_use]
    pub fn has_port(&self, port_be: u16) -> bool {
        let mut i = 0;
        while i < MAX_PORTS_PER_ADDR {
            if port_be != 0 && self.ports_be[i] == port_be {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Who made a redirected connection, recorded by the kernel at `connect()` time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// cgroup v2 id of the calling task (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// `bpf_get_current_pid_tgid()`: thread id in the low half, process id in the high half.
    pub pid_tgid: u64,
    /// `bpf_get_current_uid_gid()`: uid in the low half, gid in the high half.
    pub uid_gid: u64,
    /// `bpf_ktime_get_ns()` (`CLOCK_MONOTONIC`) when the record was made.
    pub recorded_ns: u64,
    /// Destination the caller asked for, network order.
    pub orig_ip4_be: u32,
    pub orig_port_be: u16,
    /// Address family of the calling socket: `AF_INET` (2) or `AF_INET6` (10, v4-mapped).
    pub family: u16,
}

/// Key of the `ORIGINS` map: the connection as the kernel sees it on the client side, which
/// is the accepted socket's (peer, local) pair on the agent side. Never the port alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OriginKey {
    pub client_ip4_be: u32,
    pub agent_ip4_be: u32,
    pub client_port_be: u16,
    pub agent_port_be: u16,
}

/// Value of the `PEERS` map: the destination a redirected socket asked for, network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    pub ip4_be: u32,
    pub port_be: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all five): `#[repr(C)]`, `Copy`, only integer fields, no implicit padding (the
    // layout test below checks the sizes), so every bit pattern is a valid value.
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::ProtectedAddr {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Origin {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::OriginKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Peer {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Config>(), 8 + 4 + 4 + 2 + 6);
        assert_eq!(size_of::<ProtectedAddr>(), 2 * MAX_PORTS_PER_ADDR);
        assert_eq!(size_of::<Origin>(), 8 * 4 + 4 + 2 + 2);
        assert_eq!(size_of::<OriginKey>(), 4 + 4 + 2 + 2);
        assert_eq!(size_of::<Peer>(), 4 + 2 + 2);
    }

    #[test]
    fn verdicts_round_trip_and_zero_is_unknown() {
        for v in [Verdict::Pass, Verdict::Deny, Verdict::Redirect] {
            assert_eq!(Verdict::from_raw(v as u32), Some(v));
        }
        assert_eq!(Verdict::from_raw(0), None);
        assert_eq!(Verdict::from_raw(4), None);
    }

    #[test]
    fn counter_indexes_are_dense() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }

    #[test]
    fn has_port_ignores_empty_slots() {
        let p = ProtectedAddr { ports_be: [80u16.to_be(), 0, 0, 0] };
        assert!(p.has_port(80u16.to_be()));
        assert!(!p.has_port(443u16.to_be()));
        assert!(!p.has_port(0));
    }
}
