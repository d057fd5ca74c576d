//! One HTTP exchange in exact bytes, over the ways a socket can reach a destination.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream},
    os::fd::{AsRawFd as _, OwnedFd},
    path::PathBuf,
    time::Duration,
};

use imds_tests::probe::Via;
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, SockaddrIn, SockaddrIn6};

pub(crate) struct Exchange {
    pub(crate) addr: SocketAddrV4,
    pub(crate) via: Via,
    pub(crate) bind: Option<SocketAddrV4>,
    pub(crate) v6: bool,
    pub(crate) move_to: Option<PathBuf>,
    pub(crate) delay_ms: u64,
}

impl Exchange {
    /// Connects, sends `request`, and returns the local address and the raw answer.
    pub(crate) fn run(&self, request: &[u8]) -> std::io::Result<(SocketAddr, String)> {
        let family = if self.v6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
        let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        if let Some(source) = self.bind {
            socket::setsockopt(&fd, socket::sockopt::ReuseAddr, &true)?;
            socket::bind(fd.as_raw_fd(), &SockaddrIn::from(source))?;
        }
        let sent = match self.via {
            Via::Connect if self.v6 => {
                let mapped = SocketAddrV6::new(self.addr.ip().to_ipv6_mapped(), self.addr.port(), 0, 0);
                socket::connect(fd.as_raw_fd(), &SockaddrIn6::from(mapped))?;
                false
            }
            Via::Connect => {
                socket::connect(fd.as_raw_fd(), &SockaddrIn::from(self.addr))?;
                false
            }
            Via::IoUring => {
                io_uring_connect(&fd, self.addr)?;
                false
            }
            Via::FastOpen => {
                socket::sendto(
                    fd.as_raw_fd(),
                    request,
                    &SockaddrIn::from(self.addr),
                    MsgFlags::from_bits_retain(libc::MSG_FASTOPEN),
                )?;
                true
            }
        };
        let mut stream = TcpStream::from(fd);
        let local = stream.local_addr()?;
        if let Some(cgroup) = &self.move_to {
            std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())?;
        }
        std::thread::sleep(Duration::from_millis(self.delay_ms));
        if !sent {
            stream.write_all(request)?;
        }
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        // Until the peer closes, resets, or goes quiet.
        while let Ok(n @ 1..) = stream.read(&mut buf) {
            reply.extend_from_slice(&buf[..n]);
        }
        Ok((local, String::from_utf8_lossy(&reply).into_owned()))
    }
}

fn io_uring_connect(fd: &OwnedFd, addr: SocketAddrV4) -> std::io::Result<()> {
    let mut ring = io_uring::IoUring::new(2)?;
    let sockaddr = SockaddrIn::from(addr);
    let entry = io_uring::opcode::Connect::new(
        io_uring::types::Fd(fd.as_raw_fd()),
        socket::SockaddrLike::as_ptr(&sockaddr).cast(),
        socket::SockaddrLike::len(&sockaddr),
    )
    .build();
    // SAFETY: the address outlives the submission: we wait for its completion below.
    unsafe { ring.submission().push(&entry) }.map_err(std::io::Error::other)?;
    ring.submit_and_wait(1)?;
    let result = ring.completion().next().map_or(-libc::EIO, |c| c.result());
    if result < 0 {
        return Err(std::io::Error::from_raw_os_error(-result));
    }
    Ok(())
}
