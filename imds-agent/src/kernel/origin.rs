//! Who is on the other end of an accepted connection, as the kernel recorded it.
//!
//! The kernel keys each record by the connection's full address tuple (client address and
//! port, agent address and port) — never the port alone, which a process binding another
//! loopback address could steal. A record is taken (deleted) by the lookup, deleted by the
//! kernel when the client socket closes, and ignored when older than the TTL, so no later
//! connection can inherit an earlier caller's identity.
use parking_lot::Mutex;
use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    os::fd::{AsFd as _, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use aya::maps::{HashMap, IterableMap as _, MapData, MapError};
use imds_common::{Origin, OriginKey};

use super::sys;

/// How long a record stays valid after `connect()`: long enough for a SYN retried while the
/// agent restarts, short enough that a stale record is useless.
pub const DEFAULT_ORIGIN_TTL: Duration = Duration::from_mins(1);

/// The caller of a redirected connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallerOrigin {
    /// cgroup v2 id (inode) of the calling thread's cgroup at `connect()` time.
    pub cgroup_id: u64,
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id that called `connect()`.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The address the caller asked for before the kernel redirected it.
    pub original_dst: SocketAddrV4,
    /// Whether the caller used an `AF_INET6` socket (the `::ffff:a.b.c.d` spelling).
    pub ipv6_socket: bool,
    /// Time from `connect()` to this lookup.
    pub age: Duration,
}

impl CallerOrigin {
    fn new(raw: &Origin, age: Duration) -> Self {
        let low = |v: u64| (v & 0xffff_ffff) as u32;
        let high = |v: u64| (v >> 32) as u32;
        CallerOrigin {
            cgroup_id: raw.cgroup_id,
            pid: high(raw.pid_tgid),
            tid: low(raw.pid_tgid),
            uid: low(raw.uid_gid),
            gid: high(raw.uid_gid),
            original_dst: SocketAddrV4::new(u32::from_be(raw.orig_ip4_be).into(), u16::from_be(raw.orig_port_be)),
            ipv6_socket: raw.family == libc::AF_INET6 as u16,
            age,
        }
    }
}

/// Result of looking up an accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OriginLookup {
    Found(CallerOrigin),
    /// No record: the connection was not redirected by our programs (a direct connection to
    /// the agent's port, or one from outside the filtered hierarchy).
    Missing,
    /// A record older than the TTL; it has been deleted.
    Expired {
        age: Duration,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("reading the connection's addresses")]
    Addresses(#[from] io::Error),
    #[error("origin map")]
    Map(#[from] MapError),
    #[error("taking a record from the origin map")]
    Take(#[source] io::Error),
}

/// Anything with the two addresses of an accepted TCP connection.
pub trait ConnectionAddrs {
    fn peer_addr(&self) -> io::Result<SocketAddr>;
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

impl ConnectionAddrs for std::net::TcpStream {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.peer_addr()
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.local_addr()
    }
}

impl ConnectionAddrs for tokio::net::TcpStream {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.peer_addr()
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.local_addr()
    }
}

/// The kernel's map key for a connection the agent accepted, or `None` if it is not IPv4
/// (redirected connections always are: a v4-mapped peer is normalised).
#[must_use]
pub fn origin_key(peer: SocketAddr, local: SocketAddr) -> Option<OriginKey> {
    let v4 = |a: SocketAddr| match a {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().map(|ip| SocketAddrV4::new(ip, a.port())),
    };
    let (client, agent) = (v4(peer)?, v4(local)?);
    Some(OriginKey {
        client_ip4_be: u32::from(*client.ip()).to_be(),
        agent_ip4_be: u32::from(*agent.ip()).to_be(),
        client_port_be: client.port().to_be(),
        agent_port_be: agent.port().to_be(),
    })
}

/// The connection-keyed origin records, shared by all connection handlers.
pub struct OriginTable {
    /// The map's own descriptor, for the one-step take.
    fd: OwnedFd,
    /// Whether the kernel takes records in one step (Linux ≥ 5.14); cleared the first time it
    /// refuses, after which records are taken under `map`'s lock in two steps.
    one_step: AtomicBool,
    map: Mutex<HashMap<MapData, OriginKey, Origin>>,
    ttl: Duration,
}

impl OriginTable {
    pub(crate) fn new(map: HashMap<MapData, OriginKey, Origin>, ttl: Duration) -> io::Result<Self> {
        let fd = map.map().fd().as_fd().try_clone_to_owned()?;
        Ok(OriginTable { fd, one_step: AtomicBool::new(true), map: Mutex::new(map), ttl })
    }

    /// Takes the origin record of an accepted connection.
    pub fn take_for(&self, conn: &impl ConnectionAddrs) -> Result<OriginLookup, OriginError> {
        self.take(conn.peer_addr()?, conn.local_addr()?)
    }

    /// Takes the origin record of the connection `peer` → `local` (as the agent sees it).
    pub fn take(&self, peer: SocketAddr, local: SocketAddr) -> Result<OriginLookup, OriginError> {
        let Some(key) = origin_key(peer, local) else {
            return Ok(OriginLookup::Missing);
        };
        let Some(raw) = self.remove(&key)? else {
            return Ok(OriginLookup::Missing);
        };
        let age = Duration::from_nanos(monotonic_ns().saturating_sub(raw.recorded_ns));
        if age > self.ttl {
            return Ok(OriginLookup::Expired { age });
        }
        Ok(OriginLookup::Found(CallerOrigin::new(&raw, age)))
    }

    /// Whether records are taken in one system call (the kernel has not refused it yet).
    #[doc(hidden)]
    pub fn takes_in_one_step(&self) -> bool {
        self.one_step.load(Ordering::Relaxed)
    }

    /// Takes records in two steps from now on, as on a kernel before 5.14, so that tests on
    /// a newer one cover that path too. Only while no take runs: a take in one step beside
    /// one in two could find the same record.
    #[doc(hidden)]
    pub fn take_in_two_steps(&self) {
        self.one_step.store(false, Ordering::Relaxed);
    }

    /// Looks `key` up and deletes it, so that each record is taken once: in one system call
    /// where the kernel can, else in two under the lock.
    fn remove(&self, key: &OriginKey) -> Result<Option<Origin>, OriginError> {
        if self.one_step.load(Ordering::Relaxed) {
            match sys::map_lookup_and_delete(self.fd.as_fd(), key) {
                Ok(raw) => return Ok(raw),
                // 524: the kernel's ENOTSUPP, which libc does not name.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | 524)) => {
                    tracing::debug!("the kernel cannot take a hash map element in one step; using two");
                    self.one_step.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(OriginError::Take(e)),
            }
        }
        let mut map = self.map.lock();
        let raw = match map.get(key, 0) {
            Ok(raw) => raw,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match map.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(Some(raw)),
            Err(e) => Err(e.into()),
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns()` reads.
fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV6};

    #[test]
    fn key_is_the_full_tuple_in_network_order() {
        let key = origin_key("10.0.0.7:40000".parse().unwrap(), "10.0.0.1:8182".parse().unwrap()).unwrap();
        assert_eq!(key.client_ip4_be.to_ne_bytes(), [10, 0, 0, 7]);
        assert_eq!(key.agent_ip4_be.to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(key.client_port_be.to_ne_bytes(), 40000u16.to_be_bytes());
        assert_eq!(key.agent_port_be.to_ne_bytes(), 8182u16.to_be_bytes());
    }

    #[test]
    fn v4_mapped_peers_give_the_same_key_as_plain_v4() {
        let mapped = |ip: Ipv4Addr, port| SocketAddr::V6(SocketAddrV6::new(ip.to_ipv6_mapped(), port, 0, 0));
        let plain = origin_key("127.0.0.2:5000".parse().unwrap(), "127.0.0.1:80".parse().unwrap());
        let v6 = origin_key(mapped(Ipv4Addr::new(127, 0, 0, 2), 5000), mapped(Ipv4Addr::LOCALHOST, 80));
        assert_eq!(plain, v6);
    }

    #[test]
    fn same_port_on_another_address_is_another_key() {
        let a = origin_key("127.0.0.1:5000".parse().unwrap(), "127.0.0.1:80".parse().unwrap());
        let b = origin_key("127.0.0.2:5000".parse().unwrap(), "127.0.0.1:80".parse().unwrap());
        assert_ne!(a, b);
    }

    #[test]
    fn real_ipv6_connections_have_no_key() {
        assert_eq!(origin_key("[::1]:5000".parse().unwrap(), "[::1]:80".parse().unwrap()), None);
    }

    #[test]
    fn origin_fields_split_the_kernel_halves() {
        let raw = Origin {
            cgroup_id: 99,
            pid_tgid: (1234u64 << 32) + 1240,
            uid_gid: (4343u64 << 32) + 4242,
            recorded_ns: 0,
            orig_ip4_be: u32::from(Ipv4Addr::new(169, 254, 169, 254)).to_be(),
            orig_port_be: 80u16.to_be(),
            family: libc::AF_INET6 as u16,
        };
        let o = CallerOrigin::new(&raw, Duration::ZERO);
        assert_eq!((o.pid, o.tid, o.uid, o.gid), (1234, 1240, 4242, 4343));
        assert_eq!(o.original_dst, "169.254.169.254:80".parse().unwrap());
        assert!(o.ipv6_socket);
    }
}
