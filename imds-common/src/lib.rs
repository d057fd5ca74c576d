//! Types and constants shared by the kernel programs (`imds-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]`, `Copy`, free of `bool`/`Option`, and laid out with no
//! implicit padding, so both sides agree on every byte of a map key or value. Addresses and
//! ports are kept exactly as they travel on the wire (network byte order); field names ending
//! in `_be` say so. The `user` feature adds `aya::Pod` for the agent side.
#![no_std]

mod addr;
pub mod decide;
mod origin;

pub use addr::{
    bind_target_v4, embedded_v4, has_ports, ipproto, ipv4_transport, Embedded, Nat64Prefix, PodAddr, ProtectedAddr,
    ProtectedSummary, IPV6_HEADER_LEN, V4_MAPPED_WORD2,
};
pub use origin::{Origin, OriginKey, Peer};

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
    /// `HashMap<PodAddr, u32>`: addresses of pods whose verdict is PASS (exception pods with
    /// their own network namespace). The node backstop lets their packets to protected
    /// addresses through; every other packet entering the node's namespace for one is dropped.
    pub const PASS_SOURCES: &str = "PASS_SOURCES";
    /// `Array<Nat64Prefix>`: /96 prefixes whose addresses embed an IPv4 one (RFC 6052), so
    /// `64:ff9b::a9fe:a9fe` is judged as `169.254.169.254`.
    pub const NAT64: &str = "NAT64";
    /// `Array<ProtectedSummary>` with one entry: what `PROTECTED` holds, in one word.
    pub const SUMMARY: &str = "SUMMARY";
    /// Every map the agent pins, in the order it reports them.
    pub const PINNED: [&str; 10] =
        [VERDICTS, PROTECTED, CONFIG, COUNTERS, PENDING, ORIGINS, PEERS, PASS_SOURCES, NAT64, SUMMARY];
}

/// Names of the programs in the BPF object.
pub mod programs {
    pub const CONNECT4: &str = "imds_connect4";
    pub const CONNECT6: &str = "imds_connect6";
    pub const SOCK_OPS: &str = "imds_sock_ops";
    pub const EGRESS: &str = "imds_egress";
    pub const PEER4: &str = "imds_peer4";
    pub const PEER6: &str = "imds_peer6";
    pub const BIND4: &str = "imds_bind4";
    pub const BIND6: &str = "imds_bind6";
    /// The node backstop at the node namespace's netfilter `PRE_ROUTING` hook (Linux ≥ 6.4).
    pub const NODE_NETFILTER: &str = "imds_node_nf";
    /// The node backstop at tc ingress of each interface of the node namespace.
    pub const NODE_TC: &str = "imds_node_tc";
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
    /// Addresses of exception pods on one node (two per dual-stack pod).
    pub const PASS_SOURCES: u32 = 1_024;
    /// NAT64 prefixes: the well-known `64:ff9b::/96` and up to three the operator names.
    pub const NAT64: u32 = 4;
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
    /// Packets to a protected address dropped as they entered the node's namespace from
    /// another one (a pod's rewritten, hand-made or forwarded packets).
    NodeDrop = 6,
    /// `bind()`s of the agent's port by anyone but the agent, refused.
    BindRefused = 7,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 8] = [
        Counter::ConnectPass,
        Counter::ConnectDeny,
        Counter::ConnectRedirect,
        Counter::EgressDrop,
        Counter::OriginRecorded,
        Counter::OriginLost,
        Counter::NodeDrop,
        Counter::BindRefused,
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
            Counter::NodeDrop => "node_drop",
            Counter::BindRefused => "bind_refused",
        }
    }
}

/// Node-wide settings, the only entry of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// cgroup ids of the agent: the one running now, and the one it took over from (which may
    /// still be finishing its requests during an upgrade). Their own connections are never
    /// redirected, and only they may bind the agent's port. 0 = none.
    pub agent_cgroups: [u64; 2],
    /// Where redirected connections go (the agent's listen address), network order.
    pub agent_ip4_be: u32,
    /// Verdict for cgroups with no entry in `VERDICTS` (and no ancestor with one).
    /// 0 means "not configured yet" and is treated as REDIRECT: fail closed.
    pub default_verdict: u32,
    /// The agent's listen port, network order.
    pub agent_port_be: u16,
    /// Nonzero while the agent does not hold its port (something else held it at start, or the
    /// agent stopped): a connection that would be redirected is refused instead, so nothing
    /// but the agent ever receives one.
    pub refuse_redirects: u16,
    /// Explicit padding, always zero.
    pub pad: [u8; 4],
    /// Network-namespace cookie of the agent's namespace (the node's), the only one where a
    /// listener can receive redirected connections; 0 guards the port in every namespace.
    pub agent_netns_cookie: u64,
}

impl Config {
    /// The settings with `own` as the running agent: the agent it replaces (if another) stays
    /// exempt as the predecessor until the next one takes over. Idempotent. `own == 0` (an
    /// agent outside the filtered hierarchy) exempts nobody.
    #[must_use]
    pub const fn with_agent(self, own: u64) -> Config {
        let agent_cgroups = match (own, self.agent_cgroups[0]) {
            (0, _) => [0, 0],
            (own, current) if own == current => self.agent_cgroups,
            (own, current) => [own, current],
        };
        Config { agent_cgroups, ..self }
    }

    /// Whether `cgroup` is one of the agent's.
    #[inline(always)]
    #[expect(clippy::inline_always, reason = "called from BPF programs, where calls cost verifier complexity")]
    #[must_use]
    pub fn is_agent(&self, cgroup: u64) -> bool {
        cgroup != 0 && (cgroup == self.agent_cgroups[0] || cgroup == self.agent_cgroups[1])
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all of them): `#[repr(C)]`, `Copy`, only integer fields, no implicit padding (the
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
    // SAFETY: see above.
    unsafe impl aya::Pod for super::PodAddr {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Nat64Prefix {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::ProtectedSummary {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Config>(), 2 * 8 + 4 + 4 + 2 + 2 + 4 + 8);
        assert_eq!(size_of::<ProtectedAddr>(), 2 * MAX_PORTS_PER_ADDR + 2 + 2);
        assert_eq!(size_of::<Origin>(), 8 * 4 + 4 + 2 + 2);
        assert_eq!(size_of::<OriginKey>(), 4 + 4 + 2 + 2);
        assert_eq!(size_of::<Peer>(), 4 + 2 + 2);
        assert_eq!(size_of::<PodAddr>(), 16);
        assert_eq!(size_of::<Nat64Prefix>(), 16);
        assert_eq!(size_of::<ProtectedSummary>(), 8);
    }

    fn v6(s: &str) -> [u32; 4] {
        extern crate std;
        PodAddr::v6(s.parse::<std::net::Ipv6Addr>().unwrap().octets()).words
    }

    const IMDS_BE: u32 = u32::from_ne_bytes([169, 254, 169, 254]);

    #[test]
    fn v4_mapped_and_nat64_spellings_reach_the_ipv4_address() {
        let operator = Nat64Prefix::from_bytes(v6_bytes("2001:db8:64::"));
        let table = [Nat64Prefix::WELL_KNOWN, operator, Nat64Prefix::default(), Nat64Prefix::default()];
        let lookup = |slot: u32| table.get(slot as usize).copied();
        assert_eq!(embedded_v4(v6("::ffff:169.254.169.254"), lookup), Some(Embedded::V4Mapped(IMDS_BE)));
        assert_eq!(embedded_v4(v6("64:ff9b::a9fe:a9fe"), lookup), Some(Embedded::Nat64 { ip4_be: IMDS_BE, slot: 0 }));
        assert_eq!(
            embedded_v4(v6("64:ff9b::169.254.169.254"), lookup),
            Some(Embedded::Nat64 { ip4_be: IMDS_BE, slot: 0 })
        );
        assert_eq!(
            embedded_v4(v6("2001:db8:64::a9fe:a9fe"), lookup),
            Some(Embedded::Nat64 { ip4_be: IMDS_BE, slot: 1 })
        );
        // Other addresses embed nothing: the local-use NAT64 prefix nobody configured, a
        // v4-compatible (deprecated) form, plain IPv6.
        assert_eq!(embedded_v4(v6("64:ff9b:1::a9fe:a9fe"), lookup), None);
        assert_eq!(embedded_v4(v6("::169.254.169.254"), lookup), None);
        assert_eq!(embedded_v4(v6("2001:db8::1"), lookup), None);
        // An empty slot matches nothing, not even the all-zero prefix.
        assert_eq!(embedded_v4(v6("::a9fe:a9fe"), lookup), None);
        assert_eq!(embedded_v4(v6("64:ff9b::a9fe:a9fe"), |_| None), None);
    }

    fn v6_bytes(s: &str) -> [u8; 16] {
        extern crate std;
        s.parse::<std::net::Ipv6Addr>().unwrap().octets()
    }

    #[test]
    fn pod_addresses_key_ipv4_in_its_v4_mapped_form() {
        extern crate std;
        assert_eq!(PodAddr::v4(IMDS_BE).words, v6("::ffff:169.254.169.254"));
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(PodAddr::from_ip(ip("169.254.169.254")), PodAddr::v4(IMDS_BE));
        assert_eq!(PodAddr::from_ip(ip("fd00::1")).words, v6("fd00::1"));
        assert_eq!(Nat64Prefix::WELL_KNOWN, Nat64Prefix::from_bytes(v6_bytes("64:ff9b::")));
    }

    #[test]
    fn the_summary_keeps_every_protected_address_and_few_others() {
        extern crate std;
        let wireserver = u32::from_ne_bytes([168, 63, 129, 16]);
        let summary = ProtectedSummary::of([IMDS_BE, wireserver]);
        assert!(summary.may_protect(IMDS_BE) && summary.may_protect(wireserver));
        assert!(ProtectedSummary::default().may_protect(IMDS_BE), "a summary nobody wrote rules nothing out");
        assert!(!ProtectedSummary::of([]).may_protect(IMDS_BE), "the empty set's rules everything out");
        // While two sets are in force, an address of either gets through.
        let other = ProtectedSummary::of([u32::from_ne_bytes([10, 0, 0, 1])]);
        let both = summary.union(other);
        assert!(
            both.may_protect(IMDS_BE)
                && both.may_protect(wireserver)
                && both.may_protect(u32::from_ne_bytes([10, 0, 0, 1]))
        );
        // A pod network's addresses and the metadata address's neighbours mostly stop at
        // the summary: two bits of 64 in use, so about 3 % go on to the map.
        let pods = (0..=u16::MAX).map(|i| u32::from_ne_bytes([10, 244, (i >> 8) as u8, i as u8]));
        let near = (0..=u16::MAX).map(|i| u32::from_ne_bytes([169, 254, (i >> 8) as u8, i as u8]));
        for (what, addrs) in [("10.244.0.0/16", pods.collect::<std::vec::Vec<_>>()), ("169.254.0.0/16", near.collect())]
        {
            let hits = addrs.iter().filter(|a| summary.may_protect(**a)).count();
            assert!(hits * 100 <= addrs.len() * 5, "{what}: {hits} of {} reach the map", addrs.len());
        }
    }

    #[test]
    fn origin_family_carries_the_nat64_slot() {
        let plain = Origin { family: 10, ..Origin::default() };
        assert_eq!((plain.socket_family(), plain.nat64_slot()), (10, None));
        let nat64 = Origin { family: Origin::nat64_family(2), ..Origin::default() };
        assert_eq!((nat64.socket_family(), nat64.nat64_slot()), (10, Some(2)));
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
    fn a_new_agent_keeps_its_predecessor_exempt_until_the_next_one() {
        let fresh = Config::default().with_agent(7);
        assert_eq!(fresh.agent_cgroups, [7, 0]);
        assert_eq!(fresh.with_agent(7), fresh, "a restart in the same cgroup changes nothing");
        let upgraded = fresh.with_agent(9);
        assert_eq!(upgraded.agent_cgroups, [9, 7]);
        assert!(upgraded.is_agent(9) && upgraded.is_agent(7));
        assert_eq!(upgraded.with_agent(11).agent_cgroups, [11, 9], "two upgrades on, the first is gone");
        assert!(!upgraded.with_agent(11).is_agent(7));
        assert!(!Config::default().is_agent(0), "0 is nobody, not the empty slot");
        assert_eq!(upgraded.with_agent(0).agent_cgroups, [0, 0], "an agent outside the hierarchy exempts nobody");
    }

    #[test]
    fn ipv6_binds_take_ipv4_connections_only_as_wildcards_or_v4_mapped() {
        assert_eq!(bind_target_v4(v6("::")), Some(0));
        assert_eq!(bind_target_v4(v6("::ffff:0.0.0.0")), Some(0));
        assert_eq!(bind_target_v4(v6("::ffff:10.0.0.4")), Some(u32::from_ne_bytes([10, 0, 0, 4])));
        for other in ["::1", "fd00::4", "::10.0.0.4", "64:ff9b::a00:4"] {
            assert_eq!(bind_target_v4(v6(other)), None, "{other}");
        }
    }

    #[test]
    fn a_port_protected_address_leaves_udp_and_other_tcp_ports_alone() {
        let http = ProtectedAddr { ports_be: [80u16.to_be(), 0, 0, 0], ..ProtectedAddr::default() };
        let whole = ProtectedAddr { whole_address: 1, ..http };
        let p = |n: u16| Some(n.to_be());
        // (protocol, port, judged on a port-only address)
        let table = [
            (ipproto::TCP, p(80), true),
            (ipproto::MPTCP, p(80), true),
            (ipproto::TCP, p(53), false),
            (ipproto::MPTCP, p(443), false),
            (ipproto::UDP, p(53), false),
            (ipproto::UDP, p(80), true),
            (ipproto::UDPLITE, p(80), true),
            (ipproto::UDPLITE, p(53), false),
            (ipproto::TCP, None, true),
            (ipproto::UDP, None, false),
            (1, None, true),    // ICMP
            (132, p(80), true), // SCTP
            (44, None, true),   // an IPv6 fragment header: the transport is not known
        ];
        for (protocol, port, judged) in table {
            assert_eq!(http.judges(protocol, port), judged, "port-only: {protocol} {port:?}");
            assert!(whole.judges(protocol, port), "whole address: {protocol} {port:?}");
        }
    }

    #[test]
    fn ipv4_headers_give_their_protocol_and_transport_offset() {
        let mut h = [0u8; 20];
        h[0] = 0x45;
        h[9] = 17;
        assert_eq!(ipv4_transport(&h), (17, Some(20)));
        h[0] = 0x46; // 4 bytes of options
        assert_eq!(ipv4_transport(&h), (17, Some(24)));
        h[6] = 0x20; // more fragments, offset 0: the first fragment
        assert_eq!(ipv4_transport(&h), (17, Some(24)));
        h[7] = 1; // offset 8 bytes: a later fragment
        assert_eq!(ipv4_transport(&h), (17, None));
        h[6] = 0x40; // don't fragment, offset 1 (impossible, but no port there either)
        assert_eq!(ipv4_transport(&h), (17, None));
        let mut short = [0u8; 20];
        short[0] = 0x44; // a header length below 20 is not a header
        assert_eq!(ipv4_transport(&short).1, None);
        assert!(has_ports(6) && has_ports(17) && !has_ports(44) && !has_ports(0));
    }

    #[test]
    fn has_port_ignores_empty_slots() {
        let p = ProtectedAddr { ports_be: [80u16.to_be(), 0, 0, 0], ..ProtectedAddr::default() };
        assert!(p.has_port(80u16.to_be()));
        assert!(!p.has_port(443u16.to_be()));
        assert!(!p.has_port(0));
    }
}
