//! Addresses as the programs read and the maps key them: the protected set, IPv4 and IPv6
//! headers, pods' addresses, NAT64 and v4-mapped forms.
use crate::{capacity, MAX_PORTS_PER_ADDR};

/// Value of the `PROTECTED` map: what of one IPv4 address is protected.
///
/// TCP (and UDP) to one of `ports_be` is judged by the caller's verdict (TCP is redirected
/// to the agent); other ports are left alone, so protecting a service's HTTP port leaves its
/// DNS alone. With `whole_address`, everything else to the address is refused from
/// cgroups that are not PASS too: there is nothing else there a pod may talk to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtectedAddr {
    /// Ports in network order; 0 marks an unused slot.
    pub ports_be: [u16; MAX_PORTS_PER_ADDR],
    /// 1: the whole address is protected, every port and protocol.
    pub whole_address: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
}

/// IP protocol numbers the rule for a protected address tells apart.
pub mod ipproto {
    pub const TCP: u32 = 6;
    pub const UDP: u32 = 17;
    pub const UDPLITE: u32 = 136;
    /// Multipath TCP, as a socket's protocol (on the wire it is TCP).
    pub const MPTCP: u32 = 262;
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

    /// Whether traffic of IP `protocol` to `port_be` (`None`: not known, as for a later
    /// fragment) is judged by the caller's verdict, rather than left alone. TCP and UDP to a
    /// port-only address's other ports are left alone; any other protocol, and TCP whose port
    /// cannot be read, is judged: the safe side when it cannot be told apart.
    #[inline(always)]
    #[expect(clippy::inline_always, reason = "called from BPF programs, where calls cost verifier complexity")]
    #[must_use]
    pub fn judges(&self, protocol: u32, port_be: Option<u16>) -> bool {
        if self.whole_address != 0 {
            return true;
        }
        match (protocol, port_be) {
            // A datagram to a listed port is judged too (QUIC on a protected :443); later
            // fragments carry no port, and without their first one they never reassemble.
            (ipproto::UDP | ipproto::UDPLITE | ipproto::TCP | ipproto::MPTCP, Some(port_be)) => self.has_port(port_be),
            (ipproto::UDP | ipproto::UDPLITE, None) => false,
            _ => true,
        }
    }
}

/// Value of the `SUMMARY` map: a one-word summary of the protected set, tested before the
/// `PROTECTED` map is looked up, so that nearly every socket and packet not headed for a
/// protected address stops at a multiply and a test instead of a hash lookup.
///
/// Each address has one bit of 64 ([`ProtectedSummary::bit`]). The summary holds the bits
/// that *no* protected address has: an address whose bit is among them is not protected.
/// Anything else proves nothing, and the map decides. Zero, which a new map holds, rules out
/// nothing, so a summary nobody has written yet costs lookups, never protection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtectedSummary {
    pub ruled_out: u64,
}

impl ProtectedSummary {
    /// The summary of exactly `addrs_be` (addresses as native-endian loads of their bytes in
    /// network order, as `PROTECTED` keys them).
    #[must_use]
    pub fn of(addrs_be: impl IntoIterator<Item = u32>) -> ProtectedSummary {
        let used = addrs_be.into_iter().fold(0, |used, addr| used | Self::bit(addr));
        ProtectedSummary { ruled_out: !used }
    }

    /// A summary that lets through every address either lets through: for the moment two
    /// protected sets are both in force (programs of both may be running).
    #[must_use]
    pub const fn union(self, other: ProtectedSummary) -> ProtectedSummary {
        ProtectedSummary { ruled_out: self.ruled_out & other.ruled_out }
    }

    /// Whether `ip4_be` may be protected: `false` only if the summary rules it out.
    #[inline(always)]
    #[expect(clippy::inline_always, reason = "called from BPF programs, where calls cost verifier complexity")]
    #[must_use]
    pub const fn may_protect(self, ip4_be: u32) -> bool {
        self.ruled_out & Self::bit(ip4_be) == 0
    }

    /// The bit that stands for `ip4_be`: the top six bits of a multiplicative hash.
    #[inline(always)]
    #[expect(clippy::inline_always, reason = "called from BPF programs, where calls cost verifier complexity")]
    #[must_use]
    pub const fn bit(ip4_be: u32) -> u64 {
        1 << (ip4_be.wrapping_mul(0x9e37_79b1) >> 26)
    }
}

/// Of an IPv4 header's first 20 bytes: its protocol, and where its transport header starts
/// (`None` for a later fragment, which carries none).
#[inline(always)]
#[expect(clippy::inline_always, reason = "called from BPF programs, where calls cost verifier complexity")]
#[must_use]
pub fn ipv4_transport(header: &[u8; 20]) -> (u32, Option<u32>) {
    let header_len = u32::from(header[0] & 0x0f) * 4;
    let fragment_offset = (u16::from(header[6] & 0x1f) << 8) | u16::from(header[7]);
    let protocol = u32::from(header[9]);
    (protocol, (fragment_offset == 0 && header_len >= 20).then_some(header_len))
}

/// Where an IPv6 packet's transport header starts when its next header is one (no extension
/// headers): the fixed header's length.
pub const IPV6_HEADER_LEN: u32 = 40;

/// Whether an IPv6 next-header value is a transport whose destination port the rule reads
/// (TCP or UDP right after the fixed header); any other value leaves the port unknown.
#[inline(always)]
#[expect(clippy::inline_always, reason = "called from BPF programs, where calls cost verifier complexity")]
#[must_use]
pub const fn has_ports(next_header: u32) -> bool {
    matches!(next_header, ipproto::TCP | ipproto::UDP | ipproto::UDPLITE)
}

/// A pod's address as the node backstop keys it: 16 bytes in network order, an IPv4 address
/// in its v4-mapped form (`::ffff:a.b.c.d`). Each word holds four address bytes exactly as
/// they lie in a packet (a native-endian load of them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodAddr {
    pub words: [u32; 4],
}

impl PodAddr {
    /// The v4-mapped form of an IPv4 address given in network order.
    #[must_use]
    pub const fn v4(ip4_be: u32) -> PodAddr {
        PodAddr { words: [0, 0, V4_MAPPED_WORD2, ip4_be] }
    }

    /// The key of an address of either family.
    #[must_use]
    pub const fn from_ip(ip: core::net::IpAddr) -> PodAddr {
        match ip {
            core::net::IpAddr::V4(v4) => PodAddr::v4(u32::from_ne_bytes(v4.octets())),
            core::net::IpAddr::V6(v6) => PodAddr::v6(v6.octets()),
        }
    }

    /// An IPv6 address from its 16 bytes in network order.
    #[must_use]
    pub const fn v6(bytes: [u8; 16]) -> PodAddr {
        PodAddr { words: [word(&bytes, 0), word(&bytes, 4), word(&bytes, 8), word(&bytes, 12)] }
    }
}

/// Bytes `at..at + 4` as they lie in memory.
const fn word(bytes: &[u8; 16], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// One slot of the `NAT64` map: the first 96 bits of a prefix (words as in [`PodAddr`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Nat64Prefix {
    pub words: [u32; 3],
    /// 1 when the slot holds a prefix, 0 when it is empty.
    pub in_use: u32,
}

impl Nat64Prefix {
    /// The well-known prefix `64:ff9b::/96` (RFC 6052).
    pub const WELL_KNOWN: Nat64Prefix =
        Nat64Prefix { words: [u32::from_ne_bytes([0x00, 0x64, 0xff, 0x9b]), 0, 0], in_use: 1 };

    /// The prefix from the first 12 bytes of an IPv6 address, network order.
    #[must_use]
    pub const fn from_bytes(bytes: [u8; 16]) -> Nat64Prefix {
        let a = PodAddr::v6(bytes);
        Nat64Prefix { words: [a.words[0], a.words[1], a.words[2]], in_use: 1 }
    }
}

/// Word 2 of a v4-mapped IPv6 address (`::ffff:0:0`), as it lies in memory.
pub const V4_MAPPED_WORD2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The IPv4 address an IPv6 destination stands for, and how it was spelt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Embedded {
    /// `::ffff:a.b.c.d`, which an `AF_INET6` socket sends as IPv4.
    V4Mapped(u32),
    /// A NAT64 address (RFC 6052, /96) of the prefix in this slot, which a translator
    /// somewhere on the path turns into IPv4.
    Nat64 { ip4_be: u32, slot: u32 },
}

impl Embedded {
    /// The IPv4 address, network order.
    #[must_use]
    pub const fn ip4_be(self) -> u32 {
        match self {
            Embedded::V4Mapped(ip) | Embedded::Nat64 { ip4_be: ip, .. } => ip,
        }
    }
}

/// The IPv4 address that the IPv6 address `words` reaches, if any: its v4-mapped form, or
/// its NAT64 form under one of `prefixes` (`prefix(slot)` reads slot `slot`, `None` past the
/// end). Any other IPv6 address reaches no IPv4 endpoint.
#[inline(always)]
#[expect(clippy::inline_always, reason = "called from BPF programs, where calls cost verifier complexity")]
pub fn embedded_v4(words: [u32; 4], prefix: impl Fn(u32) -> Option<Nat64Prefix>) -> Option<Embedded> {
    if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD2 {
        return Some(Embedded::V4Mapped(words[3]));
    }
    let mut slot = 0;
    while slot < capacity::NAT64 {
        if let Some(p) = prefix(slot) {
            if p.in_use != 0 && p.words[0] == words[0] && p.words[1] == words[1] && p.words[2] == words[2] {
                return Some(Embedded::Nat64 { ip4_be: words[3], slot });
            }
        }
        slot += 1;
    }
    None
}

/// The IPv4 address a `bind()` of the IPv6 address `words` takes connections for: `0` for the
/// wildcards (`::`, which takes IPv4 connections too unless `IPV6_V6ONLY`, and
/// `::ffff:0.0.0.0`), the embedded address of a v4-mapped one, `None` for any other IPv6
/// address (which never receives a connection to an IPv4 address).
#[inline(always)]
#[expect(clippy::inline_always, reason = "called from BPF programs, where calls cost verifier complexity")]
#[must_use]
pub fn bind_target_v4(words: [u32; 4]) -> Option<u32> {
    match words {
        [0, 0, 0, 0] => Some(0),
        [0, 0, V4_MAPPED_WORD2, ip4_be] => Some(ip4_be),
        _ => None,
    }
}
