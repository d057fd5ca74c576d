//! The IMDS filter agent as a library: the binary (`main.rs`) and the privileged tests use it.
//!
//! [`cli`] is the command line; [`agent`] the agent's start-up and life, over the modules
//! below ([`succession`] and [`handover`]: how an agent takes a node and gives it up;
//! [`taint`]: the node's startup taint, removed once the agent is ready; [`guard`]: the
//! filter, failing closed, before the kubelet starts pods on a booting node).
//!
//! Data flows top to bottom:
//! - [`kernel`]: load, attach and keep the eBPF programs; steer them through their maps;
//!   find out who made an accepted connection (cgroup, pid, uid, original destination).
//! - [`caller`]: from that cgroup to the pod (kubelet cgroup naming).
//! - [`imds`]: the IMDS protocol: paths, request validation, error shapes.
//! - [`policy`]: aad-pod-identity's rules as a pure function of a snapshot and a request;
//!   [`secrets`] the Secrets service principals name, read only when needed.
//! - [`sources`]: where snapshots come from (a manifests directory); [`crds`] the
//!   aad-pod-identity custom resources as Rust types.
//! - [`server`]: HTTP on each redirected connection; [`tokens`] the token path after the
//!   policy said yes (cache, coalescing, upstream budget); [`upstream`] the real metadata service;
//!   [`decisions`] the decision log; [`events`] Kubernetes Events for refusals;
//!   [`telemetry`] health, readiness and metrics.
//! - [`operator`]: the operator's commands: `status` (from the pinned kernel state and the
//!   agent's own account on its control socket), `explain` (the policy simulator, the same
//!   steps as a request without the request), `doctor` (whether the node can run the filter
//!   at all), `health` (the kubelet's probes).
//! - [`verdicts`]: the policy's per-pod kernel verdicts (PASS for exceptions, DENY for unbound
//!   pods with `--deny-unbound`), kept in sync with the pod cgroups.
pub mod agent;
pub mod caller;
pub mod cli;
pub mod crds;
pub(crate) mod decisions;
pub(crate) mod events;
pub mod guard;
pub(crate) mod handover;
pub mod imds;
pub mod kernel;
pub mod operator;
pub mod policy;
pub(crate) mod secrets;
pub mod server;
pub mod sources;
pub(crate) mod succession;
pub(crate) mod taint;
pub(crate) mod telemetry;
pub mod tokens;
pub(crate) mod upstream;
pub(crate) mod verdicts;
