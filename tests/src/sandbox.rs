//! The throwaway places a test runs in: network namespaces (and veth links between them),
//! cgroups, bpffs pin directories — each behind a guard that cleans up even when the test
//! panics — and [`Sandbox`], the standard one with the filter installed in-process.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use imds_agent::kernel::{cgroup, Filter, FilterOptions, NodeBackstop, IMDS_ENDPOINT};
use imds_common::{Counter, Verdict};

use crate::{
    listeners::{v4_addr, AgentListener, Server},
    probe::Probe,
    IMDS_IP,
};

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

/// Runs `command` as a process in `ns` and `cgroup` (exec'd by `imds-probe`, so the pid
/// the kernel records is the command's own); returns its pid and output.
pub fn run_in(ns: &NetNs, cgroup: &Cgroup, command: &[&str]) -> (u32, std::process::Output) {
    Probe::new(ns, cgroup).exec(command)
}
