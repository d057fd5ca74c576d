//! Support for the privileged end-to-end tests: throwaway network namespaces, cgroups and
//! bpffs pin directories behind guards that clean up even when a test panics, listeners
//! bound inside a namespace, and the `imds-probe` client.
//!
//! Safety rules these helpers enforce: the metadata address is always put on an interface
//! inside a namespace the test created *before* anything connects to it, so a failed
//! redirect stays inside; programs attach only to a child cgroup the test created.
#![expect(clippy::missing_panics_doc, reason = "test support: a panic is how a helper reports a broken setup")]

pub mod bench;
pub mod fake_entra;
pub mod fake_imds;
pub mod fake_kube;
pub mod frame;
pub mod http_server;
pub mod node;
use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use imds_agent::kernel::{
    cgroup, origin::OriginTable, CallerOrigin, Filter, FilterOptions, NodeBackstop, OriginLookup, IMDS_ENDPOINT,
};
use imds_common::{Counter, Verdict};

/// The metadata address, as tests use it (only ever inside their own namespaces).
pub const IMDS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// What `imds-probe` prints.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ProbeReport {
    pub pid: u32,
    /// `connected`, `sent`, `error` or `setup-failed`.
    pub outcome: String,
    pub errno: Option<i32>,
    pub error: Option<String>,
    /// Local address of a connected TCP socket.
    pub local: Option<String>,
    /// Its peer, as `getpeername()` reports it.
    pub peer: Option<String>,
    /// First line the listener sent.
    pub reply: Option<String>,
    /// What a `burst` saw.
    pub burst: Option<BurstReport>,
    /// Mean ns per connect+close of a `connect-loop`.
    pub loop_ns: Option<f64>,
    /// When an `await-answer` first saw the answer it waited for (Unix time, µs).
    pub seen_at_us: Option<u64>,
    /// What a `hold` saw.
    pub hold: Option<HoldReport>,
    /// What a `churn` did and saw.
    pub churn: Option<ChurnReport>,
    /// Whether a hand-made SYN (`frame`) was answered with a SYN-ACK.
    pub answered: Option<bool>,
    /// Bytes a second a `stream` wrote.
    pub rate: Option<f64>,
    /// Datagrams a `udp-flood` sent.
    pub sent: Option<u64>,
}

/// What `imds-probe churn` did and saw.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ChurnReport {
    /// Pod cgroups created, and removed again.
    pub created: usize,
    pub removed: usize,
    pub mkdir_errors: usize,
    /// Token requests made, and how many got another answer than planned.
    pub asked: usize,
    pub mismatches: usize,
    /// `EXPECT -> STATUS`, counted.
    pub answers: std::collections::BTreeMap<String, usize>,
    /// The first few errors and mismatches.
    pub errors: Vec<String>,
    pub seconds: f64,
}

/// What `imds-probe hold` saw of the connections it held.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct HoldReport {
    pub opened: usize,
    pub connect_errors: usize,
    /// Closed (or reset) by the peer while held.
    pub closed_by_peer: usize,
    /// Seconds from the start until the last of those was seen closed.
    pub last_closed_s: f64,
    /// Of those, how many were closed within 4 s of the start: turned away at once, not
    /// timed out (a 5 s header timeout).
    pub closed_at_once: usize,
}

/// What `imds-probe burst` saw: many token requests, retried the way the Azure SDKs retry.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct BurstReport {
    pub requests: usize,
    /// Final status of each request (after retries), by status code.
    pub statuses: std::collections::BTreeMap<u16, usize>,
    /// Answers that were retried (429, 404, 410, 5xx), by status code; each carried a
    /// `Retry-After` unless listed in `retried_without_retry_after`.
    pub retried: std::collections::BTreeMap<u16, usize>,
    pub retried_without_retry_after: usize,
    /// 200s whose token was not for the identity and resource asked for.
    pub wrong_tokens: usize,
    /// Transport failures and the like, a few of them.
    pub failures: Vec<String>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// From the first request started to the last answered.
    pub seconds: f64,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

static MEASURING: Mutex<()> = Mutex::new(());

/// Held by a test that measures latency, and by tests that would load the machine while it
/// does: the test harness runs a binary's tests side by side, on a machine of two cores.
pub fn measuring_alone() -> std::sync::MutexGuard<'static, ()> {
    MEASURING.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A short name unique to this process and call, e.g. `it1234-3-redir`.
pub fn unique(tag: &str) -> String {
    format!("it{}-{}-{tag}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

/// A small number unique per call in this process, for per-test subnets.
pub fn next_index() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

pub(crate) fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

// ---- network namespaces --------------------------------------------------------------------

/// A network namespace (`ip netns`), deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// A new namespace with loopback up.
    #[must_use]
    pub fn new(tag: &str) -> NetNs {
        let ns = NetNs { name: unique(tag) };
        sh("ip", &["netns", "add", &ns.name]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME …`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all);
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Whether interface `dev` exists in this namespace.
    #[must_use]
    pub fn has_link(&self, dev: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", "dev", dev])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// The hardware address of interface `dev` in this namespace.
    #[must_use]
    pub fn mac(&self, dev: &str) -> String {
        let out =
            Command::new("ip").args(["-n", &self.name, "-j", "link", "show", "dev", dev]).output().expect("run ip");
        let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j prints JSON");
        links[0]["address"].as_str().unwrap_or_else(|| panic!("no address for {dev}: {links}")).to_owned()
    }

    /// Puts the metadata address on this namespace's loopback, so anything sent to it here
    /// stays here.
    pub fn host_metadata_address(&self) {
        self.ip(&["addr", "add", &format!("{IMDS_IP}/32"), "dev", "lo"]);
    }

    /// Sets a network sysctl (`net.ipv4.…`, a path below `/proc/sys`) for this namespace only.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let value = value.to_owned();
        // /proc/sys/net belongs to the namespace of whoever opens it.
        self.enter(move || fs::write(&path, value).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    }

    /// Runs `f` on a thread that has joined this namespace; sockets it creates live here.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        thread::spawn(move || {
            let ns = fs::File::open(&path).expect("open netns");
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread in netns panicked")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A pod's side of its link to the node: its interface, and the MAC address of the node's end
/// it sends through (a veth peer, or the bridge).
#[derive(Clone, Debug)]
pub struct PodLink {
    pub iface: String,
    pub gateway_mac: String,
}

/// Joins two namespaces with a veth pair: `a_ip`/`b_ip` are /30 host addresses. Returns the
/// interface names in `a` and in `b`.
pub fn veth(a: &NetNs, a_ip: Ipv4Addr, b: &NetNs, b_ip: Ipv4Addr) -> (String, String) {
    // Interface names are at most 15 bytes; they only need to be unique while both exist.
    let name = |side: char| format!("v{side}{}x{}", std::process::id() % 10000, next_index());
    let (dev_in_a, dev_in_b) = (name('a'), name('b'));
    sh(
        "ip",
        &["link", "add", &dev_in_a, "netns", &a.name, "type", "veth", "peer", "name", &dev_in_b, "netns", &b.name],
    );
    a.ip(&["addr", "add", &format!("{a_ip}/30"), "dev", &dev_in_a]);
    b.ip(&["addr", "add", &format!("{b_ip}/30"), "dev", &dev_in_b]);
    a.ip(&["link", "set", &dev_in_a, "up"]);
    b.ip(&["link", "set", &dev_in_b, "up"]);
    (dev_in_a, dev_in_b)
}

// ---- cgroups -------------------------------------------------------------------------------

/// A cgroup v2 directory this test created; on drop its processes (ours) are killed and it
/// is removed. Create children through [`Cgroup::child`]; drop them before the parent.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    /// A new cgroup directly below the cgroup2 root (never the root itself).
    #[must_use]
    pub fn new_top(tag: &str) -> Cgroup {
        let root = cgroup::cgroup2_root().expect("cgroup v2 mounted");
        Cgroup::create(root.join(unique(tag)))
    }

    #[must_use]
    pub fn child(&self, name: &str) -> Cgroup {
        Cgroup::create(self.path.join(name))
    }

    fn create(path: PathBuf) -> Cgroup {
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Cgroup { path }
    }

    /// The id the kernel programs see for processes in here.
    #[must_use]
    pub fn id(&self) -> u64 {
        cgroup::cgroup_id(&self.path).expect("cgroup id")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let procs = || fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
        if !procs().trim().is_empty() {
            // Only processes this test started can be in here.
            let _ = fs::write(self.path.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(3);
            while !procs().trim().is_empty() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
        }
        // A task that exited but was not reaped yet keeps the cgroup busy: retry briefly, and
        // say so if it stays, rather than leak quietly.
        let deadline = Instant::now() + Duration::from_secs(3);
        while let Err(e) = fs::remove_dir(&self.path) {
            if Instant::now() >= deadline || e.kind() == std::io::ErrorKind::NotFound {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("leaving cgroup {} behind: {e}", self.path.display());
                }
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---- bpffs pins ----------------------------------------------------------------------------

/// A pin directory under /sys/fs/bpf; on drop everything pinned there is detached and removed.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    #[must_use]
    pub fn new(tag: &str) -> PinDir {
        PinDir { path: PathBuf::from("/sys/fs/bpf").join(unique(tag)) }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = imds_agent::kernel::uninstall(&self.path) {
            eprintln!("cleaning up {}: {e}", self.path.display());
        }
    }
}

// ---- listeners -----------------------------------------------------------------------------

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

// ---- probe ---------------------------------------------------------------------------------

/// The shape of a `burst`.
#[derive(Clone, Copy, Debug)]
pub struct Burst {
    pub count: usize,
    pub concurrency: usize,
    /// Start requests at this rate; `None`: as fast as `concurrency` allows.
    pub per_second: Option<f64>,
    /// Keep connections open between requests, as a long-lived SDK client does; `false`:
    /// a new connection per request, as curl or a new SDK process makes.
    pub keep_alive: bool,
}

/// Pod cgroups coming and going (`imds-probe churn`).
#[derive(Clone, Debug)]
pub struct Churn {
    /// Where the pod cgroups are made (the kubelet's `kubepods`).
    pub parent: PathBuf,
    /// One `UID EXPECT` a line: `-` (ask nothing), a status, or `200:TEXT`.
    pub plan: PathBuf,
    pub rate: f64,
    pub seconds: f64,
    /// How long each pod cgroup lives.
    pub live: Duration,
    /// Ask from every this-many-th cgroup.
    pub ask_every: usize,
}

/// How an `http` probe reaches its destination (`imds-probe http`).
#[derive(Clone, Debug, Default)]
pub struct Exchange {
    /// `connect`, `io-uring` or `fast-open`; `None`: `connect`.
    pub via: Option<&'static str>,
    /// Bind to this source first.
    pub bind: Option<SocketAddrV4>,
    /// An `AF_INET6` socket and the v4-mapped address.
    pub v6: bool,
    /// Move to this cgroup once connected, before sending.
    pub move_to: Option<PathBuf>,
    /// Wait this long once connected, before sending.
    pub delay: Duration,
}

/// Status and body of a raw HTTP answer (status 0: no HTTP answer at all).
pub fn parse_reply(reply: &str) -> (u16, String) {
    let status = reply.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// Builder for one `imds-probe` run.
pub struct Probe {
    cmd: Command,
}

impl Probe {
    #[must_use]
    pub fn new(ns: &NetNs, cgroup: &Cgroup) -> Probe {
        let mut cmd = Command::new(probe_binary());
        cmd.arg("--netns").arg(ns.path()).arg("--cgroup").arg(&cgroup.path);
        Probe { cmd }
    }

    #[must_use]
    pub fn as_user(mut self, uid: u32, gid: u32) -> Probe {
        self.cmd.args(["--uid", &uid.to_string(), "--gid", &gid.to_string()]);
        self
    }

    #[must_use]
    pub fn connect(mut self, addr: Ipv4Addr, port: u16, v6: bool) -> RunningProbe {
        self.cmd.args(["connect", &addr.to_string(), &port.to_string()]);
        if v6 {
            self.cmd.arg("--v6");
        }
        self.spawn()
    }

    /// Connects, then closes at once without reading: with `reset`, by aborting (RST, the
    /// socket goes straight to `TCP_CLOSE`), else with a normal FIN.
    #[must_use]
    pub fn connect_then_close(mut self, addr: Ipv4Addr, port: u16, reset: bool) -> RunningProbe {
        let then = if reset { "reset" } else { "close" };
        self.cmd.args(["connect", &addr.to_string(), &port.to_string(), "--then", then]);
        self.spawn()
    }

    /// `bind()` a TCP socket (`udp`: a UDP one) to `addr` and listen, optionally with
    /// `SO_REUSEPORT`; `outcome` is `bound` or `error` (with `errno`).
    #[must_use]
    pub fn bind(mut self, addr: SocketAddr, reuseport: bool, udp: bool) -> RunningProbe {
        self.cmd.args(["bind", &addr.to_string()]);
        if reuseport {
            self.cmd.arg("--reuseport");
        }
        if udp {
            self.cmd.arg("--udp");
        }
        self.spawn()
    }

    #[must_use]
    pub fn udp(mut self, addr: impl Into<std::net::IpAddr>, port: u16) -> RunningProbe {
        self.cmd.args(["udp", &addr.into().to_string(), &port.to_string()]);
        self.spawn()
    }

    /// A hand-made frame from `link` (the pod's interface and gateway) to `dst:dport`, from
    /// `src`, with `vlan_tags` priority tags.
    #[must_use]
    pub fn frame(
        mut self,
        link: &PodLink,
        (src, dst): (std::net::IpAddr, std::net::IpAddr),
        dport: u16,
        carrying: frame::Carrying,
        vlan_tags: u8,
    ) -> RunningProbe {
        let carrying = match carrying {
            frame::Carrying::TcpSyn => "tcp-syn",
            frame::Carrying::Udp => "udp",
        };
        self.cmd.args([
            "frame",
            &link.iface,
            &link.gateway_mac,
            &src.to_string(),
            &dst.to_string(),
            &dport.to_string(),
        ]);
        self.cmd.args(["--carrying", carrying, "--vlan-tags", &vlan_tags.to_string()]);
        self.spawn()
    }

    #[must_use]
    pub fn raw_syn(mut self, addr: Ipv4Addr, port: u16, sport: u16) -> RunningProbe {
        self.cmd.args(["raw-syn", &addr.to_string(), &port.to_string(), &sport.to_string()]);
        self.spawn()
    }

    /// `count` token requests, `concurrency` at a time, each on a new connection, to
    /// `addr` with the `queries` in turn; retried like the SDKs do.
    #[must_use]
    pub fn burst(self, addr: SocketAddrV4, count: usize, concurrency: usize, queries: &[String]) -> RunningProbe {
        self.paced_burst(addr, Burst { count, concurrency, per_second: None, keep_alive: false }, queries)
    }

    /// A burst whose requests start at `burst.per_second` (when set).
    #[must_use]
    pub fn paced_burst(mut self, addr: SocketAddrV4, burst: Burst, queries: &[String]) -> RunningProbe {
        self.cmd.args(["burst", &addr.to_string(), "--count", &burst.count.to_string()]);
        self.cmd.args(["--concurrency", &burst.concurrency.to_string()]);
        if let Some(rate) = burst.per_second {
            self.cmd.args(["--rate", &rate.to_string()]);
        }
        if burst.keep_alive {
            self.cmd.arg("--keep-alive");
        }
        for q in queries {
            self.cmd.args(["--query", q]);
        }
        self.spawn()
    }

    /// Holds `count` connections to `addr` for `time`, idle or (`slowloris`) sending a
    /// request head a byte a second; the report's `hold` says what the peer did.
    #[must_use]
    pub fn hold(mut self, addr: SocketAddrV4, count: usize, time: Duration, slowloris: bool) -> RunningProbe {
        self.cmd.args(["hold", &addr.to_string(), "--count", &count.to_string()]);
        self.cmd.args(["--seconds", &time.as_secs().to_string()]);
        if slowloris {
            self.cmd.arg("--slowloris");
        }
        self.spawn()
    }

    /// One connection that pipelines requests to `addr` and never reads an answer, for
    /// `time`; the report says whether and when the peer closed it.
    #[must_use]
    pub fn unread(mut self, addr: SocketAddrV4, time: Duration) -> RunningProbe {
        self.cmd.args(["unread", &addr.to_string(), "--seconds", &time.as_secs().to_string()]);
        self.spawn()
    }

    /// Pod cgroups below `churn.parent` made and removed at `churn.rate` a second, with
    /// token requests from some of them checked against the plan (see `imds-probe churn`).
    /// The probe must have been given its home cgroup ([`Probe::new`]).
    #[must_use]
    pub fn churn(mut self, addr: SocketAddrV4, churn: &Churn) -> RunningProbe {
        self.cmd.args(["churn", &addr.to_string(), "--parent", &churn.parent.display().to_string()]);
        self.cmd.args(["--plan", &churn.plan.display().to_string(), "--rate", &churn.rate.to_string()]);
        self.cmd.args(["--seconds", &churn.seconds.to_string(), "--live-ms", &churn.live.as_millis().to_string()]);
        self.cmd.args(["--ask-every", &churn.ask_every.to_string()]);
        self.spawn()
    }

    /// Token requests with `query` until an answer's body contains `want`; the report's
    /// `seen_at_us` says when.
    #[must_use]
    pub fn await_answer(mut self, addr: SocketAddrV4, query: &str, want: &str) -> RunningProbe {
        self.cmd.args(["await-answer", &addr.to_string(), "--query", query, "--want", want]);
        self.spawn()
    }

    /// `count` × connect+close to `addr:port`; the report's `loop_ns` is the mean per pair.
    #[must_use]
    pub fn stream(mut self, to: SocketAddrV4, millis: u64) -> RunningProbe {
        self.cmd.args(["stream", &to.ip().to_string(), &to.port().to_string(), &millis.to_string()]);
        self.spawn()
    }

    #[must_use]
    pub fn udp_flood(mut self, to: SocketAddrV4, millis: u64) -> RunningProbe {
        self.cmd.args(["udp-flood", &to.ip().to_string(), &to.port().to_string(), &millis.to_string()]);
        self.spawn()
    }

    #[must_use]
    pub fn connect_loop(mut self, addr: Ipv4Addr, port: u16, count: u32) -> RunningProbe {
        self.cmd.args(["connect-loop", &addr.to_string(), &port.to_string(), &count.to_string()]);
        self.spawn()
    }

    /// Sends `request` (exact bytes) to `addr` the way `how` says and reads the answer: the
    /// report's `reply` is the raw answer (see [`parse_reply`]), `local` the source address.
    #[must_use]
    pub fn http(mut self, addr: SocketAddrV4, request: &[u8], how: &Exchange) -> RunningProbe {
        use base64::Engine as _;
        let encoded = base64::engine::general_purpose::STANDARD.encode(request);
        self.cmd.args(["http", &addr.to_string(), "--request-b64", &encoded]);
        self.cmd.args(["--via", how.via.unwrap_or("connect")]);
        if let Some(bind) = how.bind {
            self.cmd.args(["--bind", &bind.to_string()]);
        }
        if how.v6 {
            self.cmd.arg("--v6");
        }
        if let Some(cgroup) = &how.move_to {
            self.cmd.arg("--move-to").arg(cgroup);
        }
        self.cmd.args(["--delay-ms", &how.delay.as_millis().to_string()]);
        self.spawn()
    }

    /// Replaces the probe with `command` (curl, python…) once it has joined; returns the
    /// command's pid and output.
    pub fn exec(mut self, command: &[&str]) -> (u32, std::process::Output) {
        let child = self
            .cmd
            .arg("exec")
            .args(command)
            // Clients must go straight to the address they are given, as in a pod.
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env_remove("IDENTITY_ENDPOINT")
            .env_remove("MSI_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn imds-probe exec");
        let pid = child.id();
        (pid, child.wait_with_output().expect("wait for command"))
    }

    fn spawn(mut self) -> RunningProbe {
        let child = self.cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn imds-probe");
        RunningProbe { child: Some(child) }
    }
}

/// A probe process; killed (by pid, it is ours) if dropped before it finished.
pub struct RunningProbe {
    child: Option<Child>,
}

impl RunningProbe {
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    #[must_use]
    pub fn wait(mut self) -> ProbeReport {
        let out = self.child.take().expect("running").wait_with_output().expect("wait for probe");
        let line = String::from_utf8_lossy(&out.stdout);
        let report: ProbeReport = serde_json::from_str(line.trim()).unwrap_or_else(|e| {
            panic!("probe output {line:?} ({e}); stderr: {}", String::from_utf8_lossy(&out.stderr))
        });
        assert_ne!(report.outcome, "setup-failed", "probe could not set up: {:?}", report.error);
        report
    }
}

impl Drop for RunningProbe {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---- the standard sandbox -----------------------------------------------------------------

/// One namespace holding the metadata address (with a stand-in listener on it), the agent
/// listener on loopback, and a cgroup tree with one child per verdict, filtered in-process.
/// Fields drop in order: listeners, filter, pins (detached), cgroups (children first), netns.
pub struct Sandbox {
    pub agent: AgentListener,
    pub standin: Server,
    pub filter: Filter,
    _pins: PinDir,
    pub pass_ctr: Cgroup,
    pub pass: Cgroup,
    pub deny: Cgroup,
    pub redirect: Cgroup,
    _root: Cgroup,
    pub ns: NetNs,
}

impl Sandbox {
    /// Builds the sandbox and installs the filter on its cgroup tree.
    #[must_use]
    pub fn new(tag: &str) -> Sandbox {
        let ns = NetNs::new(tag);
        ns.host_metadata_address();
        let root = Cgroup::new_top(tag);
        let (pass, deny, redirect) = (root.child("pass"), root.child("deny"), root.child("redirect"));
        // A "container" below the "pod" cgroup: it has no entry of its own.
        let pass_ctr = pass.child("ctr");
        let pins = PinDir::new(tag);
        let listener = Server::bind(&ns, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        let agent_addr = v4_addr(&listener);
        let options = FilterOptions {
            // The bind guard covers the namespace the agent listens in.
            agent_netns_cookie: ns.enter(|| imds_agent::server::listener::netns_cookie().expect("netns cookie")),
            ..filter_options(&root, &pins, agent_addr)
        };
        let mut filter = Filter::install(&options).expect("install filter");
        filter.set_verdict(pass.id(), Verdict::Pass).unwrap();
        filter.set_verdict(deny.id(), Verdict::Deny).unwrap();
        // `redirect` has no entry: it gets the default, REDIRECT.
        let agent = AgentListener::serve(listener, filter.origins());
        let standin = Server::banner(&ns, IMDS_ENDPOINT, "standin");
        Sandbox { agent, standin, filter, _pins: pins, pass_ctr, pass, deny, redirect, _root: root, ns }
    }

    /// One kernel counter, summed over CPUs.
    #[must_use]
    pub fn counter(&self, which: Counter) -> u64 {
        self.filter.counters().unwrap().into_iter().find(|(c, _)| *c == which).unwrap().1
    }
}

/// Options for a test filter on `root`: protects the metadata endpoint, default REDIRECT.
/// No node backstop: it would attach to the network namespace of the installing thread,
/// which for an in-process filter is the machine's own. The backstop's tests run the real
/// agent inside a test namespace instead.
#[must_use]
pub fn filter_options(root: &Cgroup, pins: &PinDir, agent: SocketAddrV4) -> FilterOptions {
    FilterOptions {
        attach_cgroup: root.path.clone(),
        pin_dir: pins.path.clone(),
        agent,
        protected: vec![IMDS_ENDPOINT],
        protected_addresses: vec![IMDS_IP],
        default_verdict: Verdict::Redirect,
        agent_cgroup: 0,
        listening: true,
        agent_netns_cookie: 0,
        kernel_log_level: log::LevelFilter::Info,
        origin_ttl: Duration::from_mins(1),
        node_backstop: NodeBackstop::Off,
        nat64_prefixes: Vec::new(),
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

// ---- the agent binary ----------------------------------------------------------------------

/// Runs `command` as a process in `ns` and `cgroup` (exec'd by `imds-probe`, so the pid
/// the kernel records is the command's own); returns its pid and output.
pub fn run_in(ns: &NetNs, cgroup: &Cgroup, command: &[&str]) -> (u32, std::process::Output) {
    Probe::new(ns, cgroup).exec(command)
}

/// Path of the `imds-probe` binary.
pub fn probe_binary() -> PathBuf {
    built_binary("imds-probe", "IMDS_PROBE_BIN")
}

/// Path of the `imds-agent` binary built next to this test (`cargo xtask test` builds it).
#[must_use]
pub fn agent_binary() -> PathBuf {
    built_binary("imds-agent", "IMDS_AGENT_BIN")
}

/// A workspace binary: `$env_override`, else the one in this test's target directory.
fn built_binary(name: &str, env_override: &str) -> PathBuf {
    find_built_binary(name, env_override).unwrap_or_else(|e| panic!("{e}"))
}

/// The binaries a sandbox node starts ([`agent_binary`], [`probe_binary`]), or a one-line
/// error naming the first one missing and how to build it.
pub fn check_built_binaries() -> Result<(), String> {
    find_built_binary("imds-agent", "IMDS_AGENT_BIN")?;
    find_built_binary("imds-probe", "IMDS_PROBE_BIN")?;
    Ok(())
}

fn find_built_binary(name: &str, env_override: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(env_override) {
        return Ok(PathBuf::from(p));
    }
    // Binaries live in target/<profile>; test executables one level down, in deps/.
    let exe = std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
    let dir = exe.parent().unwrap_or(&exe);
    [dir, dir.parent().unwrap_or(dir)].iter().map(|d| d.join(name)).find(|p| p.exists()).ok_or_else(|| {
        format!(
            "{name} not found near {}: build it first (`cargo xtask demo` and `cargo xtask test` do)",
            dir.display()
        )
    })
}

/// What `imds-agent run` logs once it serves (see `imds-agent/src/agent.rs`).
pub const AGENT_READY: &str = "filter installed; serving redirected connections";

/// An `imds-agent run` process (ours), `SIGKILLed` on drop if still running; its JSON log goes
/// to a file the test can read.
pub struct AgentProcess {
    child: Option<Child>,
    pub log_path: PathBuf,
    /// The decision log (the agent's stdout).
    pub decisions_path: PathBuf,
    /// Where it answers `imds-agent status` and `explain` (`--control-socket`).
    pub control_socket: PathBuf,
}

impl AgentProcess {
    /// Starts `imds-agent --log-format json run ARGS…` inside `ns` and waits until it serves.
    pub fn start(ns: &NetNs, args: &[String]) -> AgentProcess {
        AgentProcess::start_in(ns, None, args)
    }

    /// Like [`AgentProcess::start`], with the agent moved into `cgroup` and given a private
    /// cgroup namespace first — as a container runtime runs it when it is a pod.
    pub fn start_in(ns: &NetNs, cgroup: Option<&Cgroup>, args: &[String]) -> AgentProcess {
        let agent = AgentProcess::launch_in(ns, cgroup, args);
        agent.wait_for_log(AGENT_READY, Duration::from_secs(30));
        agent
    }

    /// Like [`AgentProcess::start_in`], without waiting for it to serve.
    pub fn launch_in(ns: &NetNs, cgroup: Option<&Cgroup>, args: &[String]) -> AgentProcess {
        use std::os::unix::ffi::OsStrExt as _;
        let log_path = std::env::temp_dir().join(format!("{}.log", unique("agent")));
        let decisions_path = log_path.with_extension("decisions");
        // Each agent its own control socket (unless the test names one): agents of tests
        // running side by side must not meet on the default path.
        let mut args = args.to_vec();
        let control_socket = if let Some(i) = args.iter().position(|a| a == "--control-socket") {
            PathBuf::from(&args[i + 1])
        } else {
            let socket = log_path.with_extension("sock");
            args.extend(["--control-socket".to_owned(), socket.display().to_string()]);
            socket
        };
        let log = fs::File::create(&log_path).expect("agent log file");
        let decisions = fs::File::create(&decisions_path).expect("agent decision log file");
        let ns_file = fs::File::open(ns.path()).expect("open netns");
        let procs = cgroup.map(|c| {
            std::ffi::CString::new(c.path.join("cgroup.procs").as_os_str().as_bytes()).expect("no NUL in paths")
        });
        let mut cmd = Command::new(agent_binary());
        cmd.args(["--log-format", "json", "run"]).args(&args).stdout(decisions).stderr(log);
        // SAFETY: between fork and exec only async-signal-safe calls run (setns, open, write,
        // close, unshare), on buffers prepared before the fork: no allocation.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                if let Some(procs) = &procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // "0" moves the writing process.
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if written != 1 || libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn imds-agent");
        AgentProcess { child: Some(child), log_path, decisions_path, control_socket }
    }

    /// Whether the process still runs (it has not exited, or been killed).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The agent's JSON log lines so far.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        json_lines(&self.log_path)
    }

    /// The decision log so far; every line must be JSON.
    pub fn decisions(&self) -> Vec<serde_json::Value> {
        let text = fs::read_to_string(&self.decisions_path).expect("decision log");
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("decision line {l:?}: {e}"))).collect()
    }

    /// Waits for a log line whose message is exactly `message`.
    pub fn wait_for_log(&self, message: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_lines().iter().any(|l| l["message"] == message) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent never logged {message:?}; log:\n{}",
                fs::read_to_string(&self.log_path).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's peak resident memory so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.status_bytes("VmHWM:")
    }

    /// The agent's resident memory now (`VmRSS`), in bytes.
    pub fn rss(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    fn status_bytes(&self, field: &str) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"));
        kib * 1024
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as the kubelet stops a pod, and waits for the exit (`SIGKILL` after
    /// `grace`, as the kubelet does too); returns the exit status, `None` if it had to kill.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_file(&self.log_path);
        let _ = fs::remove_file(&self.decisions_path);
        let _ = fs::remove_file(&self.control_socket);
        let _ = fs::remove_file(self.control_socket.with_extension("retired"));
    }
}

fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    let f = fs::File::open(path).expect("log file");
    BufReader::new(f).lines().map_while(Result::ok).filter_map(|l| serde_json::from_str(&l).ok()).collect()
}
