//! `imds-probe`'s command line, defined once: the binary parses it ([`ProbeArgs`], with
//! clap), and the tests' [`Probe`](super::Probe) builds an [`Op`] and renders it back to
//! arguments with [`ProbeArgs::to_args`]. A test below renders every operation and parses
//! it again.
use std::{
    ffi::{OsStr, OsString},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
};

use clap::{Parser, Subcommand, ValueEnum};

use crate::frame::Carrying;

/// `frame`'s source port unless told (`--sport`).
pub const FRAME_SPORT: u16 = 41_000;
/// How long `frame` waits for a SYN-ACK unless told (`--wait-ms`).
pub const FRAME_WAIT_MS: u64 = 1_000;
/// `udp-flood`'s payload size unless told (`--size`).
pub const UDP_FLOOD_SIZE: usize = 18;
/// How long `await-answer` asks unless told (`--timeout-ms`).
pub const AWAIT_TIMEOUT_MS: u64 = 10_000;

#[derive(Clone, Debug, PartialEq, Parser)]
pub struct ProbeArgs {
    /// Network namespace to join (a /run/netns/NAME path).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// cgroup v2 directory to move into before creating any socket.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    #[arg(long)]
    pub uid: Option<u32>,
    #[arg(long)]
    pub gid: Option<u32>,
    #[command(subcommand)]
    pub op: Op,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Then {
    /// Read one line (the listener says who it is), then close.
    Read,
    /// Close at once (FIN): the socket lingers in `FIN_WAIT` until the peer closes.
    Close,
    /// Abort at once (`SO_LINGER` 0: RST): the socket goes straight to `TCP_CLOSE`.
    Reset,
}

#[derive(Clone, Debug, PartialEq, Subcommand)]
pub enum Op {
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
    Udp { addr: IpAddr, port: u16 },
    /// One hand-made Ethernet frame through an `AF_PACKET` socket on `iface` (no socket-layer
    /// hook sees it), from `src` to `dst` via the gateway at `gateway_mac`; for a TCP SYN,
    /// `answered` says whether a SYN-ACK came back within `wait_ms`.
    Frame {
        iface: String,
        gateway_mac: String,
        src: IpAddr,
        dst: IpAddr,
        dport: u16,
        #[arg(long, default_value_t = FRAME_SPORT)]
        sport: u16,
        #[arg(long, value_enum)]
        carrying: Carrying,
        #[arg(long, default_value_t = FRAME_WAIT_MS)]
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
        #[arg(long, default_value_t = UDP_FLOOD_SIZE)]
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
        #[arg(long, default_value_t = AWAIT_TIMEOUT_MS)]
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
        #[arg(long, value_enum, default_value_t = Via::Connect)]
        via: Via,
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

/// How the socket reaches its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// `connect(2)`.
    Connect,
    /// `IORING_OP_CONNECT` through `io_uring`.
    IoUring,
    /// `sendto(MSG_FASTOPEN)`: connect and send the request in one call.
    FastOpen,
}

impl ProbeArgs {
    /// The command line that parses back to `self` (without the program name).
    #[must_use]
    pub fn to_args(&self) -> Vec<OsString> {
        let mut line = Line::default();
        line.path("netns", self.netns.as_deref());
        line.path("cgroup", self.cgroup.as_deref());
        line.some("uid", self.uid);
        line.some("gid", self.gid);
        line.0.extend(self.op.to_args());
        line.0
    }
}

impl Op {
    /// The subcommand and its arguments, every one spelt out (defaults too).
    #[must_use]
    pub fn to_args(&self) -> Vec<OsString> {
        let mut line = Line::default();
        match self {
            Op::Connect { addr, port, v6, then } => {
                line.words(["connect", &addr.to_string(), &port.to_string()]);
                line.flag("v6", *v6);
                line.choice("then", then);
            }
            Op::Bind { addr, reuseport, udp } => {
                line.words(["bind", &addr.to_string()]);
                line.flag("reuseport", *reuseport);
                line.flag("udp", *udp);
            }
            Op::Udp { addr, port } => line.words(["udp", &addr.to_string(), &port.to_string()]),
            Op::Frame { iface, gateway_mac, src, dst, dport, sport, carrying, wait_ms, vlan_tags } => {
                line.words(["frame", iface, gateway_mac, &src.to_string(), &dst.to_string(), &dport.to_string()]);
                line.opt("sport", sport);
                line.choice("carrying", carrying);
                line.opt("wait-ms", wait_ms);
                line.opt("vlan-tags", vlan_tags);
            }
            Op::RawSyn { addr, port, sport } => {
                line.words(["raw-syn", &addr.to_string(), &port.to_string(), &sport.to_string()]);
            }
            Op::Stream { addr, port, millis } => {
                line.words(["stream", &addr.to_string(), &port.to_string(), &millis.to_string()]);
            }
            Op::UdpFlood { addr, port, millis, size } => {
                line.words(["udp-flood", &addr.to_string(), &port.to_string(), &millis.to_string()]);
                line.opt("size", size);
            }
            Op::ConnectLoop { addr, port, count } => {
                line.words(["connect-loop", &addr.to_string(), &port.to_string(), &count.to_string()]);
            }
            Op::Burst { addr, count, concurrency, queries, rate, keep_alive } => {
                line.words(["burst", &addr.to_string()]);
                line.opt("count", count);
                line.opt("concurrency", concurrency);
                for query in queries {
                    line.opt("query", query);
                }
                line.some("rate", *rate);
                line.flag("keep-alive", *keep_alive);
            }
            Op::AwaitAnswer { addr, query, want, timeout_ms } => {
                line.words(["await-answer", &addr.to_string()]);
                line.opt("query", query);
                line.opt("want", want);
                line.opt("timeout-ms", timeout_ms);
            }
            Op::Http { addr, request_b64, via, bind, v6, move_to, delay_ms } => {
                line.words(["http", &addr.to_string()]);
                line.opt("request-b64", request_b64);
                line.choice("via", via);
                line.some("bind", *bind);
                line.flag("v6", *v6);
                line.path("move-to", move_to.as_deref());
                line.opt("delay-ms", delay_ms);
            }
            Op::Hold { addr, count, seconds, slowloris } => {
                line.words(["hold", &addr.to_string()]);
                line.opt("count", count);
                line.opt("seconds", seconds);
                line.flag("slowloris", *slowloris);
            }
            Op::Unread { addr, seconds } => {
                line.words(["unread", &addr.to_string()]);
                line.opt("seconds", seconds);
            }
            Op::Churn { addr, parent, plan, rate, seconds, live_ms, ask_every } => {
                line.words(["churn", &addr.to_string()]);
                line.path("parent", Some(parent));
                line.path("plan", Some(plan));
                line.opt("rate", rate);
                line.opt("seconds", seconds);
                line.opt("live-ms", live_ms);
                line.opt("ask-every", ask_every);
            }
            Op::Exec { command } => {
                // After `--` every word is the command's, even one that looks like an option.
                line.words(["exec", "--"]);
                line.words(command.iter().map(String::as_str));
            }
        }
        line.0
    }
}

/// A command line being written. Options are written `--name=VALUE`, so a value that
/// starts with `-` is still taken as the value.
#[derive(Default)]
struct Line(Vec<OsString>);

impl Line {
    fn words<'a>(&mut self, words: impl IntoIterator<Item = &'a str>) {
        self.0.extend(words.into_iter().map(OsString::from));
    }

    fn opt(&mut self, name: &str, value: impl std::fmt::Display) {
        self.0.push(format!("--{name}={value}").into());
    }

    fn some(&mut self, name: &str, value: Option<impl std::fmt::Display>) {
        if let Some(value) = value {
            self.opt(name, value);
        }
    }

    fn flag(&mut self, name: &str, on: bool) {
        if on {
            self.0.push(format!("--{name}").into());
        }
    }

    /// A path as it is, not only a UTF-8 one.
    fn path(&mut self, name: &str, path: Option<&std::path::Path>) {
        if let Some(path) = path {
            let mut arg = OsString::from(format!("--{name}="));
            arg.push(OsStr::new(path));
            self.0.push(arg);
        }
    }

    fn choice(&mut self, name: &str, value: &impl ValueEnum) {
        let value = value.to_possible_value().expect("no variant is skipped");
        self.opt(name, value.get_name());
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    /// One of each operation, with every option away from its default.
    fn every_op() -> Vec<Op> {
        let v4 = Ipv4Addr::new(169, 254, 169, 254);
        let addr = SocketAddrV4::new(v4, 80);
        vec![
            Op::Connect { addr: v4, port: 80, v6: true, then: Then::Reset },
            Op::Connect { addr: v4, port: 8080, v6: false, then: Then::Read },
            Op::Bind { addr: "[::1]:5353".parse().unwrap(), reuseport: true, udp: true },
            Op::Bind { addr: "127.0.0.1:0".parse().unwrap(), reuseport: false, udp: false },
            Op::Udp { addr: IpAddr::V6(Ipv6Addr::LOCALHOST), port: 53 },
            Op::Frame {
                iface: "eth0".into(),
                gateway_mac: "02:00:00:00:00:01".into(),
                src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
                dst: IpAddr::V6("64:ff9b::a9fe:a9fe".parse().unwrap()),
                dport: 80,
                sport: 40_000,
                carrying: Carrying::Udp,
                wait_ms: 250,
                vlan_tags: 2,
            },
            Op::RawSyn { addr: v4, port: 80, sport: 40_001 },
            Op::Stream { addr: v4, port: 9000, millis: 500 },
            Op::UdpFlood { addr: v4, port: 9001, millis: 500, size: 64 },
            Op::ConnectLoop { addr: v4, port: 80, count: 1000 },
            Op::Burst {
                addr,
                count: 100,
                concurrency: 8,
                queries: vec!["api-version=2018-02-01&resource=x".into(), "-starts-with-a-dash".into()],
                rate: Some(0.5),
                keep_alive: true,
            },
            Op::Burst { addr, count: 1, concurrency: 1, queries: vec!["q".into()], rate: None, keep_alive: false },
            Op::AwaitAnswer { addr, query: "resource=x".into(), want: "client-blob".into(), timeout_ms: 5 },
            Op::Http {
                addr,
                request_b64: "R0VUIC8gSFRUUC8xLjENCg0K".into(),
                via: Via::FastOpen,
                bind: Some(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 40_321)),
                v6: true,
                move_to: Some("/sys/fs/cgroup/a b/ctr".into()),
                delay_ms: 1500,
            },
            Op::Http {
                addr,
                request_b64: "eA==".into(),
                via: Via::IoUring,
                bind: None,
                v6: false,
                move_to: None,
                delay_ms: 0,
            },
            Op::Hold { addr, count: 200, seconds: 12, slowloris: true },
            Op::Unread { addr, seconds: 7 },
            Op::Churn {
                addr,
                parent: "/sys/fs/cgroup/kubepods".into(),
                plan: "/tmp/plan".into(),
                rate: 250.0,
                seconds: 2.5,
                live_ms: 40,
                ask_every: 10,
            },
            Op::Exec { command: vec!["curl".into(), "-s".into(), "--max-time".into(), "3".into()] },
        ]
    }

    #[test]
    fn every_operation_parses_back_to_itself() {
        // Each variant of `Op` must appear above: this match fails to compile when one is added.
        for op in every_op() {
            match op {
                Op::Connect { .. }
                | Op::Bind { .. }
                | Op::Udp { .. }
                | Op::Frame { .. }
                | Op::RawSyn { .. }
                | Op::Stream { .. }
                | Op::UdpFlood { .. }
                | Op::ConnectLoop { .. }
                | Op::Burst { .. }
                | Op::AwaitAnswer { .. }
                | Op::Http { .. }
                | Op::Hold { .. }
                | Op::Unread { .. }
                | Op::Churn { .. }
                | Op::Exec { .. } => {}
            }
        }
        let globals = [
            (None, None, None, None),
            (Some("/run/netns/it1-2-x".into()), Some("/sys/fs/cgroup/it1-3-x/pass".into()), Some(1000), Some(1001)),
        ];
        for op in every_op() {
            for (netns, cgroup, uid, gid) in globals.clone() {
                let args = ProbeArgs { netns, cgroup, uid, gid, op: op.clone() };
                let line = args.to_args();
                let parsed =
                    ProbeArgs::try_parse_from(std::iter::once(OsString::from("imds-probe")).chain(line.clone()))
                        .unwrap_or_else(|e| panic!("{line:?}: {e}"));
                assert_eq!(parsed, args, "{line:?}");
            }
        }
    }

    /// What the tests used to write by hand still parses to the same operation.
    #[test]
    fn the_short_forms_take_their_defaults() {
        let parse = |line: &[&str]| {
            ProbeArgs::try_parse_from(std::iter::once("imds-probe").chain(line.iter().copied())).unwrap().op
        };
        assert_eq!(
            parse(&["connect", "169.254.169.254", "80"]),
            Op::Connect { addr: Ipv4Addr::new(169, 254, 169, 254), port: 80, v6: false, then: Then::Read }
        );
        assert_eq!(
            parse(&["udp-flood", "10.0.0.1", "9", "100"]),
            Op::UdpFlood { addr: Ipv4Addr::new(10, 0, 0, 1), port: 9, millis: 100, size: UDP_FLOOD_SIZE }
        );
        assert_eq!(
            parse(&["exec", "curl", "-s", "http://x"]),
            Op::Exec { command: vec!["curl".into(), "-s".into(), "http://x".into()] }
        );
    }
}
