//! Listeners a test serves inside its namespaces: TCP servers and relays, the in-process
//! stand-in for the agent's listener ([`AgentListener`]), UDP sinks and a raw TCP tap.
use std::{
    fs,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use imds_agent::kernel::{origin::OriginTable, CallerOrigin, OriginLookup};

use crate::sandbox::NetNs;

/// A TCP relay in a namespace: connections to `from` are joined to new ones to `to`, until
/// dropped. It stands in for what sits on a path (a NAT64 translator) in tests.
pub struct Relay {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    #[must_use]
    pub fn start(ns: &NetNs, from: SocketAddr, to: SocketAddr) -> Relay {
        let stop = Arc::new(AtomicBool::new(false));
        let (path, done) = (ns.path(), Arc::clone(&stop));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = thread::spawn(move || {
            let netns = fs::File::open(&path).expect("open netns");
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let listener = TcpListener::bind(from).expect("relay bind");
            listener.set_nonblocking(true).expect("nonblocking");
            ready_tx.send(()).expect("test waits");
            while !done.load(Ordering::Relaxed) {
                let Ok((inbound, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                // Threads spawned here inherit this thread's network namespace.
                thread::spawn(move || {
                    let _ = inbound.set_nonblocking(false);
                    let Ok(outbound) = TcpStream::connect(to) else { return };
                    let (mut in_r, mut out_w) =
                        (inbound.try_clone().expect("clone"), outbound.try_clone().expect("clone"));
                    let up = thread::spawn(move || {
                        let _ = std::io::copy(&mut in_r, &mut out_w);
                        let _ = out_w.shutdown(std::net::Shutdown::Write);
                    });
                    let (mut out_r, mut in_w) = (outbound, inbound);
                    let _ = std::io::copy(&mut out_r, &mut in_w);
                    let _ = in_w.shutdown(std::net::Shutdown::Write);
                    let _ = up.join();
                });
            }
        });
        ready_rx.recv().expect("relay listening");
        Relay { stop, thread: Some(thread) }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP listener in a namespace, served by a thread until dropped.
pub struct Server {
    pub addr: SocketAddrV4,
    listener: Arc<TcpListener>,
    thread: Option<JoinHandle<()>>,
    accepted: Arc<AtomicUsize>,
}

impl Server {
    /// Binds `addr` (port 0 picks one) inside `ns`.
    #[must_use]
    pub fn bind(ns: &NetNs, addr: SocketAddrV4) -> TcpListener {
        ns.enter(move || TcpListener::bind(addr).expect("bind listener"))
    }

    /// Listens on `addr` inside `ns`; `handle` runs for each connection.
    pub fn start(ns: &NetNs, addr: SocketAddrV4, handle: impl Fn(TcpStream) + Send + Sync + 'static) -> Server {
        Server::serve(Server::bind(ns, addr), handle)
    }

    /// Serves an already bound listener; `handle` runs for each connection.
    pub fn serve(listener: TcpListener, handle: impl Fn(TcpStream) + Send + Sync + 'static) -> Server {
        let listener = Arc::new(listener);
        let addr = match listener.local_addr().expect("local addr") {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound an IPv4 address"),
        };
        let accepted = Arc::new(AtomicUsize::new(0));
        let (l, n) = (Arc::clone(&listener), Arc::clone(&accepted));
        let thread = thread::spawn(move || {
            // Ends when `shutdown()` on drop makes accept() fail.
            while let Ok((stream, _)) = l.accept() {
                n.fetch_add(1, Ordering::SeqCst);
                handle(stream);
            }
        });
        Server { addr, listener, thread: Some(thread), accepted }
    }

    /// A listener that answers every connection with `banner` and a newline.
    #[must_use]
    pub fn banner(ns: &NetNs, addr: SocketAddrV4, banner: &'static str) -> Server {
        Server::start(ns, addr, move |mut s| {
            let _ = writeln!(s, "{banner}");
        })
    }

    #[must_use]
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: shutting down our own listening socket wakes the blocked accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One connection the in-test agent accepted.
#[derive(Clone, Debug)]
pub struct Accepted {
    pub peer: SocketAddr,
    pub lookup: OriginLookup,
}

/// The agent's side of the chain, in-process: accepts, takes the kernel's origin record,
/// and answers `agent pid=… cgroup=…` so the client can tell who it reached.
pub struct AgentListener {
    pub server: Server,
    pub log: Arc<Mutex<Vec<Accepted>>>,
}

impl AgentListener {
    /// Serves `listener` (bound before the filter was installed with its address).
    pub fn serve(listener: TcpListener, origins: Arc<OriginTable>) -> AgentListener {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = Arc::clone(&log);
        let server = Server::serve(listener, move |mut s| {
            let lookup = origins.take_for(&s).expect("origin lookup");
            let line = match lookup {
                OriginLookup::Found(o) => describe(&o),
                other => format!("agent none {other:?}"),
            };
            let _ = writeln!(s, "{line}");
            l.lock().unwrap().push(Accepted { peer: s.peer_addr().expect("peer"), lookup });
        });
        AgentListener { server, log }
    }

    /// The origin the agent found for the connection whose client side was `local`.
    #[must_use]
    pub fn origin_for(&self, client_local: &str) -> Option<OriginLookup> {
        let want: SocketAddr = client_local.parse().ok()?;
        self.log.lock().unwrap().iter().find(|a| canonical(a.peer) == canonical(want)).map(|a| a.lookup)
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// The agent's reply line for an origin.
#[must_use]
pub fn describe(o: &CallerOrigin) -> String {
    format!(
        "agent pid={} cgroup={} uid={} gid={} dst={} v6={}",
        o.pid, o.cgroup_id, o.uid, o.gid, o.original_dst, o.ipv6_socket
    )
}

/// A UDP socket in `ns` counting datagrams that reach `addr`.
#[must_use]
pub fn udp_sink(ns: &NetNs, addr: impl Into<SocketAddr>) -> UdpSocket {
    let addr = addr.into();
    let sock = ns.enter(move || UdpSocket::bind(addr).expect("bind udp"));
    sock.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    sock
}

/// Whether a datagram arrives on `sink` within its read timeout.
#[must_use]
pub fn udp_received(sink: &UdpSocket) -> bool {
    let mut buf = [0u8; 64];
    sink.recv_from(&mut buf).is_ok()
}

/// A raw `IPPROTO_TCP` socket in `ns` that sees every TCP segment delivered there.
pub struct TcpTap {
    fd: std::os::fd::OwnedFd,
}

impl TcpTap {
    #[must_use]
    pub fn open(ns: &NetNs) -> TcpTap {
        let fd = ns.enter(|| {
            // SAFETY: plain socket(2); ownership taken right away.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, libc::IPPROTO_TCP) };
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            // SAFETY: fresh descriptor nothing else owns.
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        });
        TcpTap { fd }
    }

    /// Whether a SYN from `sport` to `dst:dport` shows up within `wait`.
    #[must_use]
    pub fn saw_syn(&self, dst: Ipv4Addr, dport: u16, sport: u16, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline {
            // SAFETY: reading into our own buffer.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            let pkt = &buf[..n as usize];
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            if pkt.len() < ihl + 14 || pkt[16..20] != dst.octets() {
                continue;
            }
            let tcp = &pkt[ihl..];
            let (s, d) = (u16::from_be_bytes([tcp[0], tcp[1]]), u16::from_be_bytes([tcp[2], tcp[3]]));
            if s == sport && d == dport && tcp[13] & 0x02 != 0 {
                return true;
            }
        }
        false
    }
}

/// The IPv4 address a listener is bound to.
#[must_use]
pub fn v4_addr(listener: &TcpListener) -> SocketAddrV4 {
    match listener.local_addr().expect("local addr") {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("expected an IPv4 listener, got {a}"),
    }
}
