//! Who made a redirected connection and what it asked for, as the kernel records it for the
//! agent.

/// `AF_INET6`, as [`Origin::family`] holds it.
const AF_INET6: u16 = 10;

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
    /// Address family of the calling socket: `AF_INET` (2) or `AF_INET6` (10); for an
    /// `AF_INET6` socket that asked for a NAT64 address, the high byte is its prefix's slot
    /// in `NAT64` plus one (see [`Origin::nat64_slot`]).
    pub family: u16,
}

impl Origin {
    /// `family` of an `AF_INET6` socket that connected to an address of NAT64 prefix `slot`.
    #[must_use]
    pub const fn nat64_family(slot: u32) -> u16 {
        AF_INET6 | (((slot + 1) as u16) << 8)
    }

    /// The calling socket's address family (`AF_INET` or `AF_INET6`).
    #[must_use]
    pub const fn socket_family(&self) -> u16 {
        self.family & 0xff
    }

    /// The NAT64 prefix slot the caller's address used, if it asked for a NAT64 address.
    #[must_use]
    pub const fn nat64_slot(&self) -> Option<u32> {
        match self.family >> 8 {
            0 => None,
            n => Some(n as u32 - 1),
        }
    }
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
    /// How an `AF_INET6` socket spelt the address: 0 v4-mapped, `n` the NAT64 prefix in
    /// slot `n - 1` (the high byte of [`Origin::family`]).
    pub nat64_slot_plus_one: u16,
}
