//! Test client: joins a network namespace and a cgroup, optionally drops to a uid/gid, then
//! does exactly one network operation and prints the outcome as one JSON line.
//!
//! It is a separate process so the kernel sees a real, distinct caller (its own pid, cgroup,
//! uid and gid) — the test process itself never moves into a filtered cgroup.
use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::PathBuf,
    time::Duration,
};

use clap::{Parser, Subcommand};
use imds_tests::ProbeReport;

#[derive(Parser)]
struct Args {
    /// Network namespace to join (a /run/netns/NAME path).
    #[arg(long)]
    netns: Option<PathBuf>,
    /// cgroup v2 directory to move into before creating any socket.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    #[arg(long)]
    uid: Option<u32>,
    #[arg(long)]
    gid: Option<u32>,
    #[command(subcommand)]
    op: Op,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Then {
    /// Read one line (the listener says who it is), then close.
    Read,
    /// Close at once (FIN): the socket lingers in `FIN_WAIT` until the peer closes.
    Close,
    /// Abort at once (`SO_LINGER` 0: RST): the socket goes straight to `TCP_CLOSE`.
    Reset,
}

#[derive(Subcommand)]
enum Op {
    /// TCP connect, then (by default) read one line: the listener says who it is.
    Connect {
        addr: Ipv4Addr,
        port: u16,
        /// Use an `AF_INET6` socket and the v4-mapped address.
        #[arg(long)]
        v6: bool,
        /// What to do once connected.
        #[arg(long, value_enum, default_value_t = Then::Read)]
        then: Then,
    },
    /// `bind()` a socket to `addr` and, for TCP, `listen()`: `bound`, or the error.
    Bind {
        addr: SocketAddr,
        /// Set `SO_REUSEPORT` first (shares a port with a listener of the same uid that did).
        #[arg(long)]
        reuseport: bool,
        /// A UDP socket instead of TCP.
        #[arg(long)]
        udp: bool,
    },
    /// One unconnected UDP datagram (sendto, no `connect()`), over IPv4 or IPv6.
    Udp { addr: std::net::IpAddr, port: u16 },
    /// One hand-made Ethernet frame through an `AF_PACKET` socket on `iface` (no socket-layer
    /// hook sees it), from `src` to `dst` via the gateway at `gateway_mac`; for a TCP SYN,
    /// `answered` says whether a SYN-ACK came back within `wait_ms`.
    Frame {
        iface: String,
        gateway_mac: String,
        src: std::net::IpAddr,
        dst: std::net::IpAddr,
        dport: u16,
        #[arg(long, default_value_t = 41_000)]
        sport: u16,
        #[arg(long, value_enum)]
        carrying: imds_tests::frame::Carrying,
        #[arg(long, default_value_t = 1_000)]
        wait_ms: u64,
        /// Priority tags (802.1Q, VLAN 0) before the IP header.
        #[arg(long, default_value_t = 0)]
        vlan_tags: u8,
    },
    /// A hand-made TCP SYN through a raw socket, from source port `sport`.
    RawSyn { addr: Ipv4Addr, port: u16, sport: u16 },
    /// Bulk TCP: writes to `addr:port` as fast as it can for `millis`; reports bytes a
    /// second (`rate`).
    Stream { addr: Ipv4Addr, port: u16, millis: u64 },
    /// Small UDP datagrams (`size` bytes of payload) to `addr:port` as fast as it can for
    /// `millis`; reports how many it sent (`sent`).
    UdpFlood {
        addr: Ipv4Addr,
        port: u16,
        millis: u64,
        #[arg(long, default_value_t = 18)]
        size: usize,
    },
    /// `count` × (socket, `connect()`, `close()`) to `addr:port`, the close abortive
    /// (`SO_LINGER` 0: no `TIME_WAIT`, so long loops cannot exhaust local ports); reports the
    /// mean ns per pair (the benchmark's unit of work). Every connect must succeed.
    ConnectLoop { addr: Ipv4Addr, port: u16, count: u32 },
    /// Token requests (`GET /metadata/identity/oauth2/token?<query>`, `Metadata: true`),
    /// `count` in all, `concurrency` at a time, each on a new connection like curl. 429,
    /// 404, 410 and 5xx are retried after their `Retry-After` (else 1 s), up to 8 attempts,
    /// as the Azure SDKs do.
    Burst {
        addr: SocketAddrV4,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        concurrency: usize,
        /// Query strings, used in turn (repeatable).
        #[arg(long = "query", required = true)]
        queries: Vec<String>,
        /// Start requests at this many per second (default: as fast as `concurrency` allows).
        #[arg(long)]
        rate: Option<f64>,
        /// Reuse connections (a pool, as a long-lived SDK client keeps) instead of a new one
        /// per request.
        #[arg(long)]
        keep_alive: bool,
    },
    /// Token requests (`query`, `Metadata: true`) in a loop, each on a new connection, until
    /// an answer carries `want` in its body or `timeout_ms` passes; reports when it first
    /// did (Unix time, µs), so another process can time a change against it.
    AwaitAnswer {
        addr: SocketAddrV4,
        #[arg(long)]
        query: String,
        #[arg(long)]
        want: String,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// One HTTP exchange in exact bytes (`request`, base64): connect — by `connect()`,
    /// `io_uring` or TCP Fast Open, optionally from a bound source address — optionally move
    /// to another cgroup and wait, send, and read the answer until the peer closes or 3 s
    /// pass. The report's `reply` is the raw answer.
    Http {
        addr: SocketAddrV4,
        #[arg(long)]
        request_b64: String,
        #[arg(long, value_enum, default_value_t = http::Via::Connect)]
        via: http::Via,
        /// Bind to this source first (`SO_REUSEADDR`).
        #[arg(long)]
        bind: Option<SocketAddrV4>,
        /// Use an `AF_INET6` socket and the v4-mapped address (with `--via connect`).
        #[arg(long)]
        v6: bool,
        /// Once connected, move to this cgroup before sending.
        #[arg(long)]
        move_to: Option<PathBuf>,
        /// Once connected (and moved), wait this long before sending.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Opens `count` connections to `addr` and keeps them `seconds`: idle, or with
    /// `--slowloris` sending a request head one byte a second, never finishing it. Reports
    /// how many the peer closed, and how soon.
    Hold {
        addr: SocketAddrV4,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        slowloris: bool,
    },
    /// One connection to `addr` that sends requests (`Metadata: true`, a path the agent
    /// answers at once) as fast as the peer takes them and never reads an answer, for
    /// `seconds`. Reports whether, and how soon, the peer closed it.
    Unread {
        addr: SocketAddrV4,
        #[arg(long)]
        seconds: u64,
    },
    /// Pod cgroups created below `parent` at `rate` a second for `seconds`, each (with one
    /// container cgroup inside, as the kubelet makes them) removed `live_ms` after it was
    /// made. Pod UIDs come from the `plan` file in turn, one `UID EXPECT` a line; for every
    /// `ask_every`-th cgroup whose EXPECT is not `-`, the probe moves into its container
    /// cgroup, asks `addr` for a token on a new connection, moves back to `--cgroup`, and
    /// checks the answer: EXPECT is a status, or `200:TEXT` with TEXT in the body.
    Churn {
        addr: SocketAddrV4,
        #[arg(long)]
        parent: PathBuf,
        #[arg(long)]
        plan: PathBuf,
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        seconds: f64,
        #[arg(long)]
        live_ms: u64,
        #[arg(long)]
        ask_every: usize,
    },
    /// Replace this process with a command (curl, python…): same pid, cgroup and netns, so
    /// a real client is the caller the kernel sees. Prints nothing itself on success.
    Exec {
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

fn main() {
    let args = Args::parse();
    let report = run(&args).unwrap_or_else(|e| ProbeReport {
        pid: std::process::id(),
        outcome: "setup-failed".into(),
        error: Some(format!("{e:#}")),
        ..ProbeReport::default()
    });
    println!("{}", serde_json::to_string(&report).expect("report serialises"));
}

fn run(args: &Args) -> anyhow::Result<ProbeReport> {
    if let Some(ns) = &args.netns {
        let f = fs::File::open(ns)?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
    }
    if let Some(cg) = &args.cgroup {
        fs::write(cg.join("cgroup.procs"), std::process::id().to_string())?;
    }
    if let Some(gid) = args.gid {
        nix::unistd::setgid(gid.into())?;
    }
    if let Some(uid) = args.uid {
        nix::unistd::setuid(uid.into())?;
    }
    let mut report = ProbeReport { pid: std::process::id(), ..ProbeReport::default() };
    match args.op {
        Op::Connect { addr, port, v6, then } => connect(&mut report, addr, port, v6, then)?,
        Op::Udp { addr, port } => {
            let sock = UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
            match sock.send_to(b"probe\n", SocketAddr::new(addr, port)) {
                Ok(_) => report.outcome = "sent".into(),
                Err(e) => set_error(&mut report, &e),
            }
        }
        Op::Bind { addr, reuseport, udp } => bind(&mut report, addr, reuseport, udp)?,
        Op::RawSyn { addr, port, sport } => raw_syn(&mut report, addr, port, sport)?,
        Op::Frame { ref iface, ref gateway_mac, src, dst, dport, sport, carrying, wait_ms, vlan_tags } => {
            let frame = imds_tests::frame::Frame {
                iface: iface.clone(),
                gateway_mac: imds_tests::frame::parse_mac(gateway_mac)
                    .ok_or_else(|| anyhow::anyhow!("{gateway_mac:?} is not a MAC address"))?,
                src,
                dst,
                sport,
                dport,
                carrying,
                vlan_tags,
            };
            send_frame(&mut report, &frame, Duration::from_millis(wait_ms));
        }
        Op::Stream { addr, port, millis } => stream(&mut report, SocketAddrV4::new(addr, port), millis)?,
        Op::UdpFlood { addr, port, millis, size } => {
            udp_flood(&mut report, SocketAddrV4::new(addr, port), millis, size)?;
        }
        Op::ConnectLoop { addr, port, count } => {
            let dst = SocketAddr::V4(SocketAddrV4::new(addr, port));
            let started = std::time::Instant::now();
            for _ in 0..count {
                let stream = TcpStream::connect(dst)?;
                // Abortive close: no TIME_WAIT, so a long loop cannot run out of local ports.
                abort_on_close(&stream)?;
                drop(stream);
            }
            report.loop_ns = Some(started.elapsed().as_secs_f64() * 1e9 / f64::from(count.max(1)));
            report.outcome = "looped".into();
        }
        Op::Burst { addr, count, concurrency, ref queries, rate, keep_alive } => {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            let shape = burst::Shape { count, concurrency, rate, keep_alive };
            report.burst = Some(runtime.block_on(burst::run(addr, shape, queries)));
            report.outcome = "burst".into();
        }
        Op::AwaitAnswer { addr, ref query, ref want, timeout_ms } => {
            await_answer(&mut report, addr, query, want, Duration::from_millis(timeout_ms))?;
        }
        Op::Http { addr, ref request_b64, via, bind, v6, ref move_to, delay_ms } => {
            use base64::Engine as _;
            let request = base64::engine::general_purpose::STANDARD.decode(request_b64)?;
            let exchange = http::Exchange { addr, via, bind, v6, move_to: move_to.clone(), delay_ms };
            match exchange.run(&request) {
                Ok((local, reply)) => {
                    report.outcome = "answered".into();
                    report.local = Some(local.to_string());
                    report.reply = Some(reply);
                }
                Err(e) => set_error(&mut report, &e),
            }
        }
        Op::Hold { addr, count, seconds, slowloris } => {
            report.hold = Some(hold(addr, count, Duration::from_secs(seconds), slowloris));
            report.outcome = "held".into();
        }
        Op::Unread { addr, seconds } => {
            report.hold = Some(unread(addr, Duration::from_secs(seconds))?);
            report.outcome = "held".into();
        }
        Op::Churn { addr, ref parent, ref plan, rate, seconds, live_ms, ask_every } => {
            let home = args.cgroup.as_deref().ok_or_else(|| anyhow::anyhow!("churn needs --cgroup to come back to"))?;
            let plan = churn::read_plan(plan)?;
            let churn =
                churn::Churn { addr, home, parent, plan: &plan, live: Duration::from_millis(live_ms), ask_every };
            report.churn = Some(churn.run(rate, seconds));
            report.outcome = "churned".into();
        }
        Op::Exec { ref command } => {
            let error =
                std::os::unix::process::CommandExt::exec(std::process::Command::new(&command[0]).args(&command[1..]));
            anyhow::bail!("exec {}: {error}", command[0]);
        }
    }
    Ok(report)
}

/// TCP connect, then read one line, close, or abort, as `then` says.
fn connect(report: &mut ProbeReport, addr: Ipv4Addr, port: u16, v6: bool, then: Then) -> anyhow::Result<()> {
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
fn bind(report: &mut ProbeReport, addr: SocketAddr, reuseport: bool, udp: bool) -> anyhow::Result<()> {
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

/// Token requests until an answer's body contains `want`; records when (Unix time, µs).
fn await_answer(
    report: &mut ProbeReport,
    addr: SocketAddrV4,
    query: &str,
    want: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let path = format!("/metadata/identity/oauth2/token?{query}");
    let deadline = std::time::Instant::now() + timeout;
    report.outcome = "timeout".into();
    while std::time::Instant::now() < deadline {
        let answer = imds_tests::fake_imds::http_get(addr.into(), &path, &[("Metadata", "true")]);
        if answer.is_ok_and(|(_, body)| body.contains(want)) {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
            report.seen_at_us = Some(now.as_micros() as u64);
            report.outcome = "seen".into();
            break;
        }
    }
    Ok(())
}

/// Holds `count` connections for `time` (see `Op::Hold`).
fn hold(addr: SocketAddrV4, count: usize, time: Duration, slowloris: bool) -> imds_tests::HoldReport {
    const HEAD: &[u8] =
        b"GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=x HTTP/1.1\r\nMetadata: true\r\nX-Slow: ";
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // One descriptor per connection: use all the hard limit allows.
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let mut report = imds_tests::HoldReport::default();
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
fn unread(addr: SocketAddrV4, time: Duration) -> anyhow::Result<imds_tests::HoldReport> {
    const REQUEST: &[u8] = b"GET /metadata/instance HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n\r\n";
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(3))?;
    stream.set_nonblocking(true)?;
    let mut report = imds_tests::HoldReport { opened: 1, ..imds_tests::HoldReport::default() };
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

/// `SO_LINGER` with a zero timeout: `close()` sends RST and the socket goes to `TCP_CLOSE`.
fn abort_on_close(s: &TcpStream) -> std::io::Result<()> {
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

fn set_error(report: &mut ProbeReport, e: &std::io::Error) {
    report.outcome = "error".into();
    report.errno = e.raw_os_error();
    report.error = Some(e.to_string());
}

/// Sends a bare SYN with `sendto` on an `IPPROTO_TCP` raw socket (the kernel adds the IP
/// header): no `connect()`, so no connect hook ever sees it.
fn send_frame(report: &mut ProbeReport, frame: &imds_tests::frame::Frame, wait: Duration) {
    match frame.send(wait) {
        Ok(answered) => {
            report.outcome = "sent".into();
            report.answered = Some(answered);
        }
        Err(e) => set_error(report, &e),
    }
}

/// Writes to `to` as fast as it can for `millis`.
fn stream(report: &mut ProbeReport, to: SocketAddrV4, millis: u64) -> anyhow::Result<()> {
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
fn udp_flood(report: &mut ProbeReport, to: SocketAddrV4, millis: u64, size: usize) -> anyhow::Result<()> {
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

fn raw_syn(report: &mut ProbeReport, dst: Ipv4Addr, dport: u16, sport: u16) -> anyhow::Result<()> {
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

mod burst {
    //! Many token requests at once, through hyper's client, retried like an SDK.
    use std::{
        net::SocketAddrV4,
        sync::{Arc, Mutex},
        time::{Duration, Instant},
    };

    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Empty};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    use imds_tests::BurstReport;

    const ATTEMPTS: usize = 8;
    const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

    /// How many requests, how fast, and over which connections.
    pub struct Shape {
        pub count: usize,
        pub concurrency: usize,
        pub rate: Option<f64>,
        pub keep_alive: bool,
    }

    pub async fn run(addr: SocketAddrV4, shape: Shape, queries: &[String]) -> BurstReport {
        let Shape { count, concurrency, rate, keep_alive } = shape;
        // Without keep-alive, a new connection per request, as curl and a fresh SDK process
        // make; with it, a pool, as a long-lived SDK client keeps (its connections idle for
        // less than the agent's 5 s idle timeout).
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(if keep_alive { usize::MAX } else { 0 })
            .pool_idle_timeout(Duration::from_secs(4))
            .build_http();
        let report = Arc::new(Mutex::new(BurstReport { requests: count, ..BurstReport::default() }));
        let latencies = Arc::new(Mutex::new(Vec::with_capacity(count)));
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
        let mut tasks = Vec::with_capacity(count);
        let started = Instant::now();
        for i in 0..count {
            if let Some(rate) = rate {
                tokio::time::sleep_until(
                    (started + Duration::from_secs_f64(imds_tests::bench::count(i) / rate)).into(),
                )
                .await;
            }
            let (client, report, latencies, permits) =
                (client.clone(), Arc::clone(&report), Arc::clone(&latencies), Arc::clone(&permits));
            let query = queries[i % queries.len()].clone();
            tasks.push(tokio::spawn(async move {
                let _permit = permits.acquire_owned().await.expect("semaphore open");
                let started = Instant::now();
                let status = one(&client, addr, &query, &report).await;
                latencies.lock().unwrap().push(started.elapsed());
                *report.lock().unwrap().statuses.entry(status).or_default() += 1;
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
        latencies.sort();
        // Nearest-rank percentile.
        let at = |percent: usize| {
            latencies.get((latencies.len().saturating_sub(1)) * percent / 100).map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        let mut report = report.lock().unwrap().clone();
        (report.p50_ms, report.p99_ms) = (at(50), at(99));
        report.seconds = started.elapsed().as_secs_f64();
        report
    }

    /// One request with its retries; returns the final status (0: no HTTP answer).
    async fn one(
        client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
        addr: SocketAddrV4,
        query: &str,
        report: &Mutex<BurstReport>,
    ) -> u16 {
        let uri = format!("http://{addr}{TOKEN_PATH}?{query}");
        for attempt in 1..=ATTEMPTS {
            let request =
                http::Request::get(&uri).header("Metadata", "true").body(Empty::new()).expect("valid request");
            let response = match tokio::time::timeout(Duration::from_secs(30), client.request(request)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return fail(report, format!("{query}: {e}")),
                Err(_) => return fail(report, format!("{query}: no answer in 30 s")),
            };
            let status = response.status().as_u16();
            let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let body =
                response.into_body().collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
            let retryable = matches!(status, 404 | 410 | 429) || status >= 500;
            if status == 200 {
                let token: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let access = token["access_token"].as_str().unwrap_or("");
                let param = |name: &str| {
                    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
                };
                // The fake's tokens read `fake-token:<client id>:<resource>`.
                let resource_ok = param("resource").is_some_and(|r| access.ends_with(&format!(":{r}")));
                let client_ok = param("client_id").is_none_or(|c| access.contains(&format!(":{c}:")));
                if !(resource_ok && client_ok) {
                    report.lock().unwrap().wrong_tokens += 1;
                }
            }
            if !retryable || attempt == ATTEMPTS {
                return status;
            }
            {
                let mut r = report.lock().unwrap();
                *r.retried.entry(status).or_default() += 1;
                if retry_after.is_none() {
                    r.retried_without_retry_after += 1;
                }
            }
            tokio::time::sleep(Duration::from_secs(retry_after.unwrap_or(1).min(5))).await;
        }
        unreachable!("the last attempt returns")
    }

    fn fail(report: &Mutex<BurstReport>, what: String) -> u16 {
        let mut r = report.lock().unwrap();
        if r.failures.len() < 5 {
            r.failures.push(what);
        }
        0
    }
}

mod churn {
    //! Pod cgroups coming and going fast, with token requests from some of them.
    use std::{
        collections::VecDeque,
        fs,
        net::SocketAddrV4,
        path::{Path, PathBuf},
        time::{Duration, Instant},
    };

    use imds_tests::ChurnReport;

    /// Keeps at most this many mismatches in the report.
    const KEEP: usize = 10;

    pub struct Churn<'a> {
        pub addr: SocketAddrV4,
        pub home: &'a Path,
        pub parent: &'a Path,
        pub plan: &'a [(String, String)],
        pub live: Duration,
        pub ask_every: usize,
    }

    /// `UID EXPECT` lines.
    pub fn read_plan(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
        let plan: Vec<(String, String)> = fs::read_to_string(path)?
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(u, e)| (u.to_owned(), e.to_owned())))
            .collect();
        anyhow::ensure!(!plan.is_empty(), "{}: an empty plan", path.display());
        Ok(plan)
    }

    impl Churn<'_> {
        pub fn run(&self, rate: f64, seconds: f64) -> ChurnReport {
            let mut report = ChurnReport::default();
            let total = (rate * seconds) as usize;
            let (started, step) = (Instant::now(), Duration::from_secs_f64(1.0 / rate));
            let mut live: VecDeque<(Instant, PathBuf)> = VecDeque::new();
            for i in 0..total {
                while live.front().is_some_and(|(born, _)| born.elapsed() >= self.live) {
                    let (_, pod) = live.pop_front().expect("checked above");
                    remove(&pod, &mut report);
                }
                let due = started + step * u32::try_from(i).unwrap_or(u32::MAX);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let (uid, expect) = &self.plan[i % self.plan.len()];
                let pod = self.parent.join(format!("pod{uid}"));
                let ctr = pod.join("0123456789abcdef");
                if let Err(e) = fs::create_dir(&pod).and_then(|()| fs::create_dir(&ctr)) {
                    report.mkdir_errors += 1;
                    keep(&mut report.errors, format!("mkdir {}: {e}", pod.display()));
                    continue;
                }
                report.created += 1;
                if i % self.ask_every.max(1) == 0 && expect != "-" {
                    self.ask(&ctr, uid, expect, &mut report);
                }
                live.push_back((Instant::now(), pod));
            }
            for (_, pod) in live {
                remove(&pod, &mut report);
            }
            report.seconds = started.elapsed().as_secs_f64();
            report
        }

        /// One token request from `ctr`, checked against `expect`.
        fn ask(&self, ctr: &Path, uid: &str, expect: &str, report: &mut ChurnReport) {
            const REQUEST: &[u8] = b"GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n";
            let join = |cg: &Path| fs::write(cg.join("cgroup.procs"), std::process::id().to_string());
            let answer = join(ctr).and_then(|()| {
                let exchange = super::http::Exchange {
                    addr: self.addr,
                    via: super::http::Via::Connect,
                    bind: None,
                    v6: false,
                    move_to: None,
                    delay_ms: 0,
                };
                exchange.run(REQUEST)
            });
            if let Err(e) = join(self.home) {
                keep(&mut report.errors, format!("back to {}: {e}", self.home.display()));
            }
            report.asked += 1;
            let reply = match answer {
                Ok((_, reply)) => reply,
                Err(e) => {
                    report.mismatches += 1;
                    return keep(&mut report.errors, format!("pod {uid}: {e}"));
                }
            };
            let status = reply.split(' ').nth(1).unwrap_or("none");
            let ok = match expect.split_once(':') {
                Some((want, text)) => status == want && reply.contains(text),
                None => status == expect,
            };
            *report.answers.entry(format!("{expect} -> {status}")).or_default() += 1;
            if !ok {
                report.mismatches += 1;
                keep(
                    &mut report.errors,
                    format!("pod {uid} wanted {expect}, got: {}", reply.lines().next().unwrap_or("")),
                );
            }
        }
    }

    fn remove(pod: &Path, report: &mut ChurnReport) {
        match fs::remove_dir(pod.join("0123456789abcdef")).and_then(|()| fs::remove_dir(pod)) {
            Ok(()) => report.removed += 1,
            Err(e) => keep(&mut report.errors, format!("rmdir {}: {e}", pod.display())),
        }
    }

    fn keep(errors: &mut Vec<String>, e: String) {
        if errors.len() < KEEP {
            errors.push(e);
        }
    }
}

mod http {
    //! One HTTP exchange in exact bytes, over the ways a socket can reach a destination.
    use std::{
        io::{Read as _, Write as _},
        net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream},
        os::fd::{AsRawFd as _, OwnedFd},
        path::PathBuf,
        time::Duration,
    };

    use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, SockaddrIn, SockaddrIn6};

    /// How the socket reaches its destination.
    #[derive(Clone, Copy, Debug, clap::ValueEnum)]
    pub enum Via {
        /// `connect(2)`.
        Connect,
        /// `IORING_OP_CONNECT` through `io_uring`.
        IoUring,
        /// `sendto(MSG_FASTOPEN)`: connect and send the request in one call.
        FastOpen,
    }

    pub struct Exchange {
        pub addr: SocketAddrV4,
        pub via: Via,
        pub bind: Option<SocketAddrV4>,
        pub v6: bool,
        pub move_to: Option<PathBuf>,
        pub delay_ms: u64,
    }

    impl Exchange {
        /// Connects, sends `request`, and returns the local address and the raw answer.
        pub fn run(&self, request: &[u8]) -> std::io::Result<(SocketAddr, String)> {
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
}
