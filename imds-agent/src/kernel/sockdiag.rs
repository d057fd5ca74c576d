//! Which cgroup a TCP socket of this network namespace belongs to, as the kernel records it:
//! `NETLINK_SOCK_DIAG`'s `INET_DIAG_CGROUP_ID` (Linux ≥ 5.10), the cgroup v2 of the process
//! that created the socket.
//!
//! For connections that are not redirected to the agent (so have no origin record): a local
//! client connecting to the agent over loopback is looked up by its side of the connection.
//! One exact lookup (`inet_diag` without `NLM_F_DUMP`), no `/proc` walk.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla as _, NLM_F_REQUEST};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use nix::sys::socket::{
    connect, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

/// `INET_DIAG_CGROUP_ID` (`include/uapi/linux/inet_diag.h`).
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `TCP_TIME_WAIT` (`include/net/tcp_states.h`).
const TCP_TIME_WAIT: u8 = 6;
/// `INET_DIAG_NOCOOKIE`: match the socket by its addresses alone.
const NO_COOKIE: [u8; 8] = [0xff; 8];

/// The cgroup id of the TCP socket whose local side is `client` and remote side `server`, in
/// this process's network namespace; `None` when there is no such socket (it closed).
///
/// # Errors
/// The netlink socket could not be used, the answer could not be read, or the kernel does
/// not report sockets' cgroups.
pub fn cgroup_of(client: SocketAddr, server: SocketAddr) -> io::Result<Option<u64>> {
    let family = if client.is_ipv4() { AF_INET } else { AF_INET6 };
    let request = InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: SocketId {
            source_port: client.port(),
            destination_port: server.port(),
            source_address: client.ip(),
            destination_address: server.ip(),
            interface_id: 0,
            cookie: NO_COOKIE,
        },
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST; // exact: one socket, or an error
    let mut message = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
    message.finalize();
    let mut out = vec![0; message.buffer_len()];
    message.serialize(&mut out);

    let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkSockDiag)?;
    connect(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    send(fd.as_raw_fd(), &out, MsgFlags::empty())?;
    let mut buf = vec![0u8; 8192];
    let len = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    let answer = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[..len])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag answer: {e}")))?;
    match answer.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
            // A dual-stack client's socket answers with its v4-mapped addresses.
            let same = |a: IpAddr, b: IpAddr| a.to_canonical() == b.to_canonical();
            let id = &response.header.socket_id;
            // The kernel answers for exactly the socket asked for; check rather than trust.
            if !(same(id.source_address, client.ip())
                && id.source_port == client.port()
                && same(id.destination_address, server.ip())
                && id.destination_port == server.port())
            {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "sock_diag answered for another socket"));
            }
            if response.header.state == TCP_TIME_WAIT {
                return Ok(None); // closed already: a time-wait entry has no cgroup
            }
            let found = response.nlas.iter().find_map(cgroup_id);
            found.map(Some).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the kernel does not report sockets' cgroups (INET_DIAG_CGROUP_ID)",
                )
            })
        }
        NetlinkPayload::Error(e) if e.code.map(i32::from) == Some(-libc::ENOENT) => Ok(None),
        NetlinkPayload::Error(e) => Err(io::Error::from_raw_os_error(e.code.map_or(libc::EIO, |c| -i32::from(c)))),
        other => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected sock_diag answer {other:?}"))),
    }
}

fn cgroup_id(nla: &Nla) -> Option<u64> {
    let Nla::Other(other) = nla else { return None };
    if other.kind() != INET_DIAG_CGROUP_ID || other.value_len() != 8 {
        return None;
    }
    let mut value = [0u8; 8];
    other.emit_value(&mut value);
    Some(u64::from_ne_bytes(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Unprivileged: a loopback connection of this process, looked up from its client side.
    #[test]
    fn a_loopback_clients_cgroup_is_the_callers() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let mine = std::fs::metadata(own_cgroup_dir()).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok();
        let found = cgroup_of(peer, server).unwrap();
        assert!(found.is_some(), "the kernel reports the socket's cgroup");
        if let Some(mine) = mine {
            assert_eq!(found, Some(mine), "the cgroup of the process that made the socket");
        }
        drop(client);
        // A socket that is not there: none (a port just given up, so nothing holds it).
        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert_eq!(cgroup_of(gone, server).unwrap(), None);
    }

    /// This process's cgroup v2 directory, if cgroup2 is mounted where it usually is.
    fn own_cgroup_dir() -> std::path::PathBuf {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let path = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/").to_owned();
        let mount = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .find(|m| std::path::Path::new(m).join("cgroup.controllers").exists())
            .unwrap_or("/sys/fs/cgroup");
        std::path::Path::new(mount).join(path.trim_start_matches('/'))
    }
}
