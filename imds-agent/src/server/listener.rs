//! The agent's listening socket.
//!
//! The kernel redirects pods' connections to one address and port, and whoever listens there
//! receives them. The bind guard (`imds_bind4`, `imds_bind6`) keeps every process in the
//! filtered hierarchy but the agent off that port, even while no agent runs; a process
//! outside the hierarchy, or one that bound before the guard was first attached, can still
//! hold it. The agent then does not exit: the kernel refuses what it would redirect (fail
//! closed), the agent says who holds the port, and claims it the moment it is free.
use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use tokio::net::TcpListener;

/// Pending connections the kernel queues for the agent: a node's pods can connect by the
/// thousand at once (a rollout, or a flood), and connections the queue cannot take wait for
/// SYN-ACK retransmits, seconds apart. The kernel caps it at `net.core.somaxconn`.
const ACCEPT_QUEUE: u32 = 4096;

/// How often a held port is tried again, and how often the wait is logged.
const RETRY: Duration = Duration::from_secs(1);
const LOG_EVERY: u32 = 30;

/// Binds and listens on `listen`.
pub fn bind(listen: SocketAddrV4) -> io::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::V4(listen))?;
    socket.listen(ACCEPT_QUEUE)
}

/// The first try: the listener, `None` when another socket holds the port (the caller keeps
/// redirects refused and [`claim`]s it), or the error for anything else (a bad address).
pub fn try_bind(listen: SocketAddrV4) -> io::Result<Option<TcpListener>> {
    match bind(listen) {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(io::Error::new(
            e.kind(),
            "the kernel's bind guard refused it: the filter pinned under --bpffs does not know this process \
             as its agent (was the agent moved to another cgroup without restarting it?)",
        )),
        Err(e) => Err(e),
    }
}

/// Binds `listen` as soon as the port is free, trying every second. Every 30 s (the first
/// time at once) it logs who holds the port and tells `waiting`; never once it is bound.
pub async fn claim(listen: SocketAddrV4, waiting: impl Fn(&str)) -> TcpListener {
    let mut tries = 0u32;
    loop {
        match bind(listen) {
            Ok(listener) => return listener,
            // Who holds it is looked up only when it is said: a walk of /proc.
            Err(e) if tries.is_multiple_of(LOG_EVERY) => {
                let why = if e.kind() == io::ErrorKind::AddrInUse {
                    held_by(listen)
                } else {
                    format!("cannot listen on {listen}: {e}")
                };
                tracing::error!(
                    %listen,
                    holder = %why,
                    "the agent's port is held by another process: redirected connections are refused \
                     until it is free (find it on the node with `ss -ltnp 'sport = :{}'`)",
                    listen.port()
                );
                waiting(&why);
            }
            Err(_) => {}
        }
        tries = tries.wrapping_add(1);
        tokio::time::sleep(RETRY).await;
    }
}

/// A socket the earlier agent handed over, if it listens on `addr` (the address may have
/// changed with the upgrade: then this agent binds its own).
pub fn handed(socket: Option<std::net::TcpListener>, addr: SocketAddr) -> Option<TcpListener> {
    let socket = socket?;
    let local = socket.local_addr().ok()?;
    if local != addr {
        tracing::info!(handed = %local, wanted = %addr, "the earlier agent listened elsewhere; binding anew");
        return None;
    }
    socket.set_nonblocking(true).ok()?;
    TcpListener::from_std(socket).ok()
}

/// An unbound socket can be given an ephemeral port with no `bind()` the guard sees.
pub fn warn_if_ephemeral(listen: SocketAddrV4) {
    if ephemeral(listen.port()) == Some(true) {
        tracing::warn!(
            port = listen.port(),
            "the agent's port is in net.ipv4.ip_local_port_range: while no agent runs, any process \
             could be handed it without a bind the kernel guard sees; pick a port outside the range \
             or add it to net.ipv4.ip_local_reserved_ports"
        );
    }
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux ≥ 5.14):
/// where the agent listens, so the only namespace whose binds of its port matter. `Ok(0)`
/// when the kernel cannot say: the bind guard then covers every namespace.
pub fn netns_cookie() -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given; the kernel writes
    // at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    match rc {
        0 => Ok(cookie),
        _ => match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(0),
            e => Err(e),
        },
    }
}

/// Who listens on `listen` (or on its port's wildcard), as far as this process can see:
/// listening TCP sockets of the network namespace, and the processes holding them when they
/// are in the agent's PID namespace.
#[must_use]
pub fn held_by(listen: SocketAddrV4) -> String {
    let mut sockets: Vec<(u32, u64)> = [procfs::net::tcp(), procfs::net::tcp6()]
        .into_iter()
        .flat_map(Result::unwrap_or_default)
        .filter(|e| e.state == procfs::net::TcpState::Listen && covers(e.local_address, listen))
        .map(|e| (e.uid, e.inode))
        .collect();
    sockets.sort_unstable();
    sockets.dedup();
    if sockets.is_empty() {
        return format!("{listen} is in use (no listening socket seen: perhaps one being set up)");
    }
    let holders: Vec<String> = sockets
        .iter()
        .map(|&(uid, inode)| match process_of(inode) {
            Some((pid, comm)) => format!("pid {pid} ({comm}), uid {uid}"),
            None => format!("a socket of uid {uid} (inode {inode}) in another PID namespace"),
        })
        .collect();
    format!("{listen} is held by {}", holders.join("; "))
}

/// Whether a socket bound to `local` receives connections to `listen`.
fn covers(local: SocketAddr, listen: SocketAddrV4) -> bool {
    let ip = match local.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(local.ip(), std::net::IpAddr::V4),
        ip @ std::net::IpAddr::V4(_) => ip,
    };
    local.port() == listen.port() && (ip.is_unspecified() || ip == std::net::IpAddr::V4(*listen.ip()))
}

/// The process holding the socket with this inode, if this process can see it.
fn process_of(inode: u64) -> Option<(i32, String)> {
    procfs::process::all_processes().ok()?.filter_map(Result::ok).find_map(|p| {
        let holds = p.fd().ok()?.filter_map(Result::ok).any(|fd| fd.target == procfs::process::FDTarget::Socket(inode));
        holds.then(|| (p.pid(), p.stat().map(|s| s.comm).unwrap_or_default()))
    })
}

/// Whether the kernel may hand `port` to an unbound socket (`listen()` or `bind()` to port 0
/// pick from `net.ipv4.ip_local_port_range`; no bind hook sees that choice). Read from this
/// process's network namespace; `None` when it cannot be read.
#[must_use]
pub fn ephemeral(port: u16) -> Option<bool> {
    let sysctl = |name: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).ok();
    let range = sysctl("ip_local_port_range")?;
    let mut bounds = range.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(low)), Some(Ok(high))) = (bounds.next(), bounds.next()) else { return None };
    let reserved = sysctl("ip_local_reserved_ports").unwrap_or_default();
    Some((low..=high).contains(&port) && !in_port_list(&reserved, port))
}

/// Whether `port` is in a port list as the kernel prints it (`8182,9000-9100`).
fn in_port_list(list: &str, port: u16) -> bool {
    list.trim().split(',').filter(|s| !s.is_empty()).any(|item| match item.split_once('-') {
        Some((a, b)) => matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if (a..=b).contains(&port)),
        None => item.parse() == Ok(port),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_on_the_port_and_its_wildcards_cover_the_listen_address() {
        let listen: SocketAddrV4 = "10.0.0.4:8182".parse().unwrap();
        for local in ["10.0.0.4:8182", "0.0.0.0:8182", "[::]:8182", "[::ffff:10.0.0.4]:8182"] {
            assert!(covers(local.parse().unwrap(), listen), "{local}");
        }
        for local in ["10.0.0.5:8182", "10.0.0.4:8183", "[fd00::4]:8182", "[::ffff:10.0.0.5]:8182"] {
            assert!(!covers(local.parse().unwrap(), listen), "{local}");
        }
    }

    #[test]
    fn port_lists_read_as_the_kernel_prints_them() {
        assert!(in_port_list("8182", 8182));
        assert!(in_port_list("80,8000-8200\n", 8182));
        assert!(!in_port_list("80,8000-8100", 8182));
        assert!(!in_port_list("\n", 8182));
        assert!(!in_port_list("x-y,", 8182));
    }
}
