//! Support for the privileged end-to-end tests: throwaway network namespaces, cgroups and
//! bpffs pin directories behind guards that clean up even when a test panics, listeners
//! bound inside a namespace, and the `imds-probe` client.
//!
//! Safety rules these helpers enforce: the metadata address is always put on an interface
//! inside a namespace the test created *before* anything connects to it, so a failed
//! redirect stays inside; programs attach only to a child cgroup the test created.
//!
//! Where things are:
//! - [`sandbox`]: namespaces, veth links, cgroups, pin directories, and the standard
//!   [`Sandbox`] with the filter installed in-process;
//! - [`listeners`]: servers, relays, the in-process agent listener, UDP sinks, a TCP tap;
//! - [`probe`]: the `imds-probe` client ([`Probe`]), its operations ([`probe::ops`], shared
//!   with the binary) and what it reports ([`ProbeReport`]);
//! - [`agent_process`]: the real `imds-agent` binary as a process, and where binaries are;
//! - [`container`]: the shipped image, run by podman as the DaemonSet runs it;
//! - [`node`]: a whole node (agent, pods, fake IMDS) for the tests of the real agent;
//! - [`fixtures`]: Kubernetes objects for the manifests and the fake API server;
//! - [`fake_imds`], [`fake_entra`], [`fake_kube`]: stand-ins for the services the agent calls;
//! - [`frame`]: hand-made link-layer frames; [`bpf`]: raw `bpf(2)` for hand-made programs
//!   and test runs; [`foreign`]: another component's connect program; [`bench`]: the
//!   benchmarks.
#![expect(clippy::missing_panics_doc, reason = "test support: a panic is how a helper reports a broken setup")]

pub mod agent_process;
pub mod bench;
pub mod bpf;
pub mod container;
pub mod fake_entra;
pub mod fake_imds;
pub mod fake_kube;
pub mod fixtures;
pub mod foreign;
pub mod frame;
pub mod http_server;
pub mod listeners;
pub mod node;
pub mod probe;
pub mod sandbox;

use std::net::Ipv4Addr;

pub use agent_process::{agent_binary, check_built_binaries, probe_binary, AgentProcess, AGENT_READY};
pub use listeners::{describe, udp_received, udp_sink, v4_addr, Accepted, AgentListener, Relay, Server, TcpTap};
pub use probe::{
    parse_reply, Burst, BurstReport, Churn, ChurnReport, Exchange, HoldReport, Probe, ProbeReport, RunningProbe,
};
pub use sandbox::{
    filter_options, measuring_alone, next_index, run_in, unique, veth, Cgroup, NetNs, PinDir, PodLink, Sandbox,
};

/// The metadata address, as tests use it (only ever inside their own namespaces).
pub const IMDS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
