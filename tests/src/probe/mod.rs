//! The `imds-probe` client from the tests' side: [`Probe`] builds one run (which namespace,
//! which cgroup, which user, which operation) and starts it; [`RunningProbe::wait`] reads the
//! [`ProbeReport`] it prints. The operations themselves are [`ops::Op`], shared with the binary.
pub mod ops;
pub mod report;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use clap::ValueEnum as _;
pub use ops::{Op, ProbeArgs, Then, Via};
pub use report::{BurstReport, ChurnReport, HoldReport, ProbeReport};

use crate::{
    agent_process::probe_binary,
    frame,
    sandbox::{Cgroup, NetNs, PodLink},
};

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
    binary: PathBuf,
    netns: PathBuf,
    cgroup: PathBuf,
    user: Option<(u32, u32)>,
}

impl Probe {
    #[must_use]
    pub fn new(ns: &NetNs, cgroup: &Cgroup) -> Probe {
        Probe { binary: probe_binary(), netns: ns.path(), cgroup: cgroup.path.clone(), user: None }
    }

    #[must_use]
    pub fn as_user(mut self, uid: u32, gid: u32) -> Probe {
        self.user = Some((uid, gid));
        self
    }

    #[must_use]
    pub fn connect(self, addr: Ipv4Addr, port: u16, v6: bool) -> RunningProbe {
        self.spawn(Op::Connect { addr, port, v6, then: Then::Read })
    }

    /// Connects, then closes at once without reading: with `reset`, by aborting (RST, the
    /// socket goes straight to `TCP_CLOSE`), else with a normal FIN.
    #[must_use]
    pub fn connect_then_close(self, addr: Ipv4Addr, port: u16, reset: bool) -> RunningProbe {
        let then = if reset { Then::Reset } else { Then::Close };
        self.spawn(Op::Connect { addr, port, v6: false, then })
    }

    /// `bind()` a TCP socket (`udp`: a UDP one) to `addr` and listen, optionally with
    /// `SO_REUSEPORT`; `outcome` is `bound` or `error` (with `errno`).
    #[must_use]
    pub fn bind(self, addr: SocketAddr, reuseport: bool, udp: bool) -> RunningProbe {
        self.spawn(Op::Bind { addr, reuseport, udp })
    }

    #[must_use]
    pub fn udp(self, addr: impl Into<IpAddr>, port: u16) -> RunningProbe {
        self.spawn(Op::Udp { addr: addr.into(), port })
    }

    /// A hand-made frame from `link` (the pod's interface and gateway) to `dst:dport`, from
    /// `src`, with `vlan_tags` priority tags.
    #[must_use]
    pub fn frame(
        self,
        link: &PodLink,
        (src, dst): (IpAddr, IpAddr),
        dport: u16,
        carrying: frame::Carrying,
        vlan_tags: u8,
    ) -> RunningProbe {
        self.spawn(Op::Frame {
            iface: link.iface.clone(),
            gateway_mac: link.gateway_mac.clone(),
            src,
            dst,
            dport,
            sport: ops::FRAME_SPORT,
            carrying,
            wait_ms: ops::FRAME_WAIT_MS,
            vlan_tags,
        })
    }

    #[must_use]
    pub fn raw_syn(self, addr: Ipv4Addr, port: u16, sport: u16) -> RunningProbe {
        self.spawn(Op::RawSyn { addr, port, sport })
    }

    /// `count` token requests, `concurrency` at a time, each on a new connection, to
    /// `addr` with the `queries` in turn; retried like the SDKs do.
    #[must_use]
    pub fn burst(self, addr: SocketAddrV4, count: usize, concurrency: usize, queries: &[String]) -> RunningProbe {
        self.paced_burst(addr, Burst { count, concurrency, per_second: None, keep_alive: false }, queries)
    }

    /// A burst whose requests start at `burst.per_second` (when set).
    #[must_use]
    pub fn paced_burst(self, addr: SocketAddrV4, burst: Burst, queries: &[String]) -> RunningProbe {
        let Burst { count, concurrency, per_second: rate, keep_alive } = burst;
        self.spawn(Op::Burst { addr, count, concurrency, queries: queries.to_vec(), rate, keep_alive })
    }

    /// Holds `count` connections to `addr` for `time`, idle or (`slowloris`) sending a
    /// request head a byte a second; the report's `hold` says what the peer did.
    #[must_use]
    pub fn hold(self, addr: SocketAddrV4, count: usize, time: Duration, slowloris: bool) -> RunningProbe {
        self.spawn(Op::Hold { addr, count, seconds: time.as_secs(), slowloris })
    }

    /// One connection that pipelines requests to `addr` and never reads an answer, for
    /// `time`; the report says whether and when the peer closed it.
    #[must_use]
    pub fn unread(self, addr: SocketAddrV4, time: Duration) -> RunningProbe {
        self.spawn(Op::Unread { addr, seconds: time.as_secs() })
    }

    /// Pod cgroups below `churn.parent` made and removed at `churn.rate` a second, with
    /// token requests from some of them checked against the plan (see `imds-probe churn`).
    /// The probe must have been given its home cgroup ([`Probe::new`]).
    #[must_use]
    pub fn churn(self, addr: SocketAddrV4, churn: &Churn) -> RunningProbe {
        self.spawn(Op::Churn {
            addr,
            parent: churn.parent.clone(),
            plan: churn.plan.clone(),
            rate: churn.rate,
            seconds: churn.seconds,
            live_ms: millis(churn.live),
            ask_every: churn.ask_every,
        })
    }

    /// Token requests with `query` until an answer's body contains `want`; the report's
    /// `seen_at_us` says when.
    #[must_use]
    pub fn await_answer(self, addr: SocketAddrV4, query: &str, want: &str) -> RunningProbe {
        self.spawn(Op::AwaitAnswer {
            addr,
            query: query.to_owned(),
            want: want.to_owned(),
            timeout_ms: ops::AWAIT_TIMEOUT_MS,
        })
    }

    /// Writes to `to` as fast as it can for `millis`; the report's `rate` is bytes a second.
    #[must_use]
    pub fn stream(self, to: SocketAddrV4, millis: u64) -> RunningProbe {
        self.spawn(Op::Stream { addr: *to.ip(), port: to.port(), millis })
    }

    #[must_use]
    pub fn udp_flood(self, to: SocketAddrV4, millis: u64) -> RunningProbe {
        self.spawn(Op::UdpFlood { addr: *to.ip(), port: to.port(), millis, size: ops::UDP_FLOOD_SIZE })
    }

    /// `count` × connect+close to `addr:port`; the report's `loop_ns` is the mean per pair.
    #[must_use]
    pub fn connect_loop(self, addr: Ipv4Addr, port: u16, count: u32) -> RunningProbe {
        self.spawn(Op::ConnectLoop { addr, port, count })
    }

    /// Sends `request` (exact bytes) to `addr` the way `how` says and reads the answer: the
    /// report's `reply` is the raw answer (see [`parse_reply`]), `local` the source address.
    #[must_use]
    pub fn http(self, addr: SocketAddrV4, request: &[u8], how: &Exchange) -> RunningProbe {
        use base64::Engine as _;
        let via = how.via.map_or(Via::Connect, |name| {
            Via::from_str(name, false).unwrap_or_else(|e| panic!("Exchange::via {name:?}: {e}"))
        });
        self.spawn(Op::Http {
            addr,
            request_b64: base64::engine::general_purpose::STANDARD.encode(request),
            via,
            bind: how.bind,
            v6: how.v6,
            move_to: how.move_to.clone(),
            delay_ms: millis(how.delay),
        })
    }

    /// Replaces the probe with `command` (curl, python…) once it has joined; returns the
    /// command's pid and output.
    pub fn exec(self, command: &[&str]) -> (u32, std::process::Output) {
        let child = self
            .command(Op::Exec { command: command.iter().map(|&word| word.to_owned()).collect() })
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

    /// `imds-probe` with this probe's place and user, and `op`.
    fn command(self, op: Op) -> Command {
        let args = ProbeArgs {
            netns: Some(self.netns),
            cgroup: Some(self.cgroup),
            uid: self.user.map(|(uid, _)| uid),
            gid: self.user.map(|(_, gid)| gid),
            op,
        };
        let mut cmd = Command::new(self.binary);
        cmd.args(args.to_args());
        cmd
    }

    fn spawn(self, op: Op) -> RunningProbe {
        let child = self.command(op).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn imds-probe");
        RunningProbe { child: Some(child) }
    }
}

/// Whole milliseconds, as the probe's options take them.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).expect("a test's duration fits u64 milliseconds")
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
