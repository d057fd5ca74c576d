//! Operations on one socket (or one raw frame): connect, bind, single datagrams and SYNs,
//! and the bulk senders the benchmarks time.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::Duration,
};

use imds_tests::{probe::Then, ProbeReport};

use crate::set_error;

/// TCP connect, then read one line, close, or abort, as `then` says.
pub(crate) fn connect(report: &mut ProbeReport, addr: Ipv4Addr, port: u16, v6: bool, then: Then) -> anyhow::Result<()> {
    let dst = if v6 {
        SocketAddr::V6(SocketAddrV6::new(addr.to_ipv6_mapped(), port, 0, 0))
    } else {
        SocketAddr::V4(SocketAddrV4::new(addr, port))
    };
    match TcpStream::connect_timeout(&dst, Duration::from_secs(3)) {
        Ok(mut s) => {
            report.outcome = "connected".into();
            report.local = s.local_addr().ok().map(|a| a.to_string());
            report.peer = s.peer_addr().ok().map(|a| a.to_string());
            match then {
                Then::Read => {}
                Then::Close => return Ok(()),
                Then::Reset => {
                    abort_on_close(&s)?;
                    return Ok(());
                }
            }
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut buf = Vec::new();
            let mut byte = [0u8; 1];
            while buf.len() < 512 && matches!(s.read(&mut byte), Ok(1)) && byte[0] != b'\n' {
                buf.push(byte[0]);
            }
            report.reply = Some(String::from_utf8_lossy(&buf).into_owned());
        }
        Err(e) => set_error(report, &e),
    }
    Ok(())
}

/// `bind()` (and, for TCP, `listen()`) a new socket on `addr`.
pub(crate) fn bind(report: &mut ProbeReport, addr: SocketAddr, reuseport: bool, udp: bool) -> anyhow::Result<()> {
    use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let kind = if udp { SockType::Datagram } else { SockType::Stream };
    let fd = socket::socket(family, kind, SockFlag::SOCK_CLOEXEC, None)?;
    if reuseport {
        socket::setsockopt(&fd, sockopt::ReusePort, &true)?;
    }
    let bound = socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).and_then(|()| {
        if udp {
            Ok(())
        } else {
            socket::listen(&fd, Backlog::new(8)?)
        }
    });
    match bound {
        Ok(()) => report.outcome = "bound".into(),
        Err(errno) => set_error(report, &std::io::Error::from(errno)),
    }
    Ok(())
}

/// Sends a bare SYN with `sendto` on an `IPPROTO_TCP` raw socket (the kernel adds the IP
/// header): no `connect()`, so no connect hook ever sees it.
pub(crate) fn raw_syn(report: &mut ProbeReport, dst: Ipv4Addr, dport: u16, sport: u16) -> anyhow::Result<()> {
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
    if fd < 0 {
        set_error(report, &std::io::Error::last_os_error());
        return Ok(());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1d5e_ed00u32.to_be_bytes()); // sequence number
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes()); // window
    let sum = checksum(dst, dst, &tcp); // source is the same local address (routed via lo)
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(dst).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: buffer and address are valid for the call; lengths match.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            tcp.as_ptr().cast(),
            tcp.len(),
            0,
            std::ptr::from_ref(&sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        set_error(report, &std::io::Error::last_os_error());
    } else {
        report.outcome = "sent".into();
    }
    std::io::stdout().flush()?;
    Ok(())
}

/// TCP checksum over the IPv4 pseudo-header and segment.
fn checksum(src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for chunk in bytes.chunks(2) {
            let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&[0, 6]);
    add(&(segment.len() as u16).to_be_bytes());
    add(segment);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends a hand-made frame and waits up to `wait` for a SYN-ACK to it.
pub(crate) fn send_frame(report: &mut ProbeReport, frame: &imds_tests::frame::Frame, wait: Duration) {
    match frame.send(wait) {
        Ok(answered) => {
            report.outcome = "sent".into();
            report.answered = Some(answered);
        }
        Err(e) => set_error(report, &e),
    }
}

/// Writes to `to` as fast as it can for `millis`.
pub(crate) fn stream(report: &mut ProbeReport, to: SocketAddrV4, millis: u64) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(to)?;
    let chunk = vec![0x5a_u8; 64 * 1024];
    let (started, until) = (std::time::Instant::now(), Duration::from_millis(millis));
    let mut chunks = 0u32;
    while started.elapsed() < until {
        stream.write_all(&chunk)?;
        chunks += 1;
    }
    let bytes = f64::from(chunks) * 64.0 * 1024.0;
    report.rate = Some(bytes / started.elapsed().as_secs_f64());
    report.outcome = "streamed".into();
    Ok(())
}

/// Sends `size`-byte datagrams to `to` as fast as it can for `millis`.
pub(crate) fn udp_flood(report: &mut ProbeReport, to: SocketAddrV4, millis: u64, size: usize) -> anyhow::Result<()> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.connect(to)?;
    let payload = vec![0x5a_u8; size];
    let (started, until) = (std::time::Instant::now(), Duration::from_millis(millis));
    let mut sent = 0u64;
    while started.elapsed() < until {
        // A full socket buffer (ENOBUFS) is the network saying "slower": try again.
        for _ in 0..64 {
            if sock.send(&payload).is_ok() {
                sent += 1;
            }
        }
    }
    report.sent = Some(sent);
    report.outcome = "flooded".into();
    Ok(())
}

/// `SO_LINGER` with a zero timeout: `close()` sends RST and the socket goes to `TCP_CLOSE`.
pub(crate) fn abort_on_close(s: &TcpStream) -> std::io::Result<()> {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid socket fd and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
