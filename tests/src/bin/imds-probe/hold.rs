//! Connections kept open against the agent: idle or slowloris ones (`hold`), and one that
//! never reads its answers (`unread`).
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use imds_tests::HoldReport;

/// Holds `count` connections for `time` (see `Op::Hold`).
pub(crate) fn hold(addr: SocketAddrV4, count: usize, time: Duration, slowloris: bool) -> HoldReport {
    const HEAD: &[u8] =
        b"GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=x HTTP/1.1\r\nMetadata: true\r\nX-Slow: ";
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // One descriptor per connection: use all the hard limit allows.
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let mut report = HoldReport::default();
    let started = std::time::Instant::now();
    // (stream, bytes sent, closed after)
    let mut held: Vec<(TcpStream, usize, Option<Duration>)> = Vec::with_capacity(count);
    for _ in 0..count {
        match TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(3)) {
            Ok(stream) => {
                let _ = stream.set_nonblocking(true);
                held.push((stream, 0, None));
            }
            Err(_) => report.connect_errors += 1,
        }
    }
    report.opened = held.len();
    let mut buf = [0u8; 512];
    while started.elapsed() < time {
        for (stream, sent, closed) in held.iter_mut().filter(|h| h.2.is_none()) {
            let gone = match stream.read(&mut buf) {
                Ok(0) => true,
                Ok(_) => false, // an answer: read on
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            };
            let gone = gone || (slowloris && stream.write(&HEAD[*sent % HEAD.len()..=*sent % HEAD.len()]).is_err());
            *sent += 1;
            if gone {
                *closed = Some(started.elapsed());
                // Before the peer's 5 s header timeout could have closed it (with room for a
                // busy machine's slow accepts).
                report.closed_at_once += usize::from(started.elapsed() < Duration::from_secs(4));
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let closed: Vec<Duration> = held.iter().filter_map(|h| h.2).collect();
    report.closed_by_peer = closed.len();
    report.last_closed_s = closed.iter().max().map_or(0.0, Duration::as_secs_f64);
    report
}

/// Pipelines requests on one connection without ever reading (see `Op::Unread`).
pub(crate) fn unread(addr: SocketAddrV4, time: Duration) -> anyhow::Result<HoldReport> {
    const REQUEST: &[u8] = b"GET /metadata/instance HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n\r\n";
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(3))?;
    stream.set_nonblocking(true)?;
    let mut report = HoldReport { opened: 1, ..HoldReport::default() };
    let started = std::time::Instant::now();
    let batch = REQUEST.repeat(64);
    while started.elapsed() < time {
        match stream.write(&batch) {
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => {
                // Reset or shut by the peer.
                report.closed_by_peer = 1;
                report.last_closed_s = started.elapsed().as_secs_f64();
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(report)
}
