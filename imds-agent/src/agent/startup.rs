//! Taking the node at start: the steps, in the order that keeps the node safe.
//!
//! [`take_node`] holds the order; the steps are a [`Steps`] implementation's: [`OnNode`] on
//! a real node, a recording stand-in in the tests below, which check each rule:
//! - the node's lock, or a handover, before anything is touched;
//! - the agent handing over says go before this one writes kernel state;
//! - another agent on the control socket stops this one before the kernel is touched;
//! - the listener before the kernel programs: a bad `--listen` leaves no half-installed
//!   filter (only this agent's admission to the bind guard, which it needs to bind);
//! - an agent taking over installs nothing unless it holds the port it takes over.
use std::{net::SocketAddr, path::Path};

use anyhow::{bail, Context as _};
use tokio::net::{TcpListener, UnixListener};

use super::Config;
use crate::{
    handover,
    kernel::{self, bpffs::PinDirLock, Filter, FilterOptions},
    operator::control::server::{self as control, ControlError},
    server::listener,
    succession::{self, Start},
    telemetry::SourceStatus,
};

/// One agent's steps to take its node. Each step may fail; [`take_node`] stops at the first
/// failure.
pub(crate) trait Steps {
    /// The node's lock.
    type Lock;
    /// A handover under way from the agent serving the node.
    type Handover;
    type Control;
    type Listener;
    type Filter;

    /// The node's lock, or, with a handover, shared with the agent serving it.
    async fn claim(&mut self) -> anyhow::Result<(Self::Lock, Option<Self::Handover>)>;
    /// Tells the agent handing over that this one is about to write kernel state. An error:
    /// it took its duties back.
    async fn installing(&mut self, handover: Self::Handover) -> anyhow::Result<Self::Handover>;
    /// The control socket (`None`: none, and said so); an error when another agent answers
    /// there and did not hand over to this one.
    async fn control(&mut self, handed_over: bool) -> anyhow::Result<Option<Self::Control>>;
    /// Lets this agent past the bind guard an earlier agent left (a kernel write).
    fn admit(&mut self) -> anyhow::Result<()>;
    /// The agent's listener, handed over or bound; `None`: another process holds the port.
    async fn listen(&mut self, handover: Option<&mut Self::Handover>) -> anyhow::Result<Option<Self::Listener>>;
    /// The metrics listener, handed over or bound, if the agent serves metrics.
    async fn metrics(&mut self, handover: Option<&mut Self::Handover>) -> anyhow::Result<Option<Self::Listener>>;
    /// Installs the kernel programs; `listening`: whether the agent holds its port.
    fn install(&mut self, listening: bool) -> anyhow::Result<Self::Filter>;
    /// The agent's address, for errors.
    fn address(&self) -> String;
}

/// What [`take_node`] took, held for the agent's life.
pub(crate) struct Taken<S: Steps> {
    pub lock: S::Lock,
    /// The handover from the agent this one replaces, until this one serves.
    pub handover: Option<S::Handover>,
    pub control: Option<S::Control>,
    /// `None`: another process held the port (redirects are refused until it is claimed).
    pub listener: Option<S::Listener>,
    pub metrics: Option<S::Listener>,
    pub filter: S::Filter,
}

/// Takes the node's filter: the lock, or a handover from the agent holding it; binds the
/// listener (unless handed over), then installs the kernel programs.
pub(crate) async fn take_node<S: Steps>(steps: &mut S) -> anyhow::Result<Taken<S>> {
    let (lock, handover) = steps.claim().await?;
    // From here on this agent writes the kernel's state: the one handing over must have let
    // it (it may have taken its duties back instead).
    let mut handover = match handover {
        Some(handover) => Some(steps.installing(handover).await.context("taking the node over")?),
        None => None,
    };
    let control = steps.control(handover.is_some()).await?;
    // A bind guard an earlier agent left admits only the agents it knows: become one first.
    steps.admit()?;
    let listener = steps.listen(handover.as_mut()).await?;
    if handover.is_some() && listener.is_none() {
        // Installing with redirects refused would refuse what the earlier agent served.
        bail!("{} is held by another process: cannot take the node over", steps.address());
    }
    let metrics = steps.metrics(handover.as_mut()).await?;
    let filter = steps.install(listener.is_some())?;
    Ok(Taken { lock, handover, control, listener, metrics, filter })
}

/// The steps on a real node, as `config` says.
pub(crate) struct OnNode<'a> {
    pub config: &'a Config,
    /// The policy source's state: a successor is handed over to only once it has loaded.
    pub source: &'a SourceStatus,
    /// This agent's cgroup.
    pub agent_cgroup: u64,
}

impl Steps for OnNode<'_> {
    type Lock = PinDirLock;
    type Handover = handover::Taken;
    type Control = UnixListener;
    type Listener = TcpListener;
    type Filter = Filter;

    async fn claim(&mut self) -> anyhow::Result<(PinDirLock, Option<handover::Taken>)> {
        let config = self.config;
        let claimed =
            succession::claim_node(config.pin_dir(), &config.handover_socket, &config.retired, self.source).await?;
        Ok(match claimed {
            Start::Fresh(lock) => (lock, None),
            Start::TakenOver(lock, taken) => {
                tracing::info!(predecessor = taken.from, "the agent serving this node hands it over");
                (lock, Some(taken))
            }
        })
    }

    async fn installing(&mut self, mut handover: handover::Taken) -> anyhow::Result<handover::Taken> {
        let asked = tokio::task::spawn_blocking(move || handover.installing().map(|()| handover)).await?;
        Ok(asked?)
    }

    async fn control(&mut self, handed_over: bool) -> anyhow::Result<Option<UnixListener>> {
        claim_control(&self.config.control_socket, handed_over).await
    }

    fn admit(&mut self) -> anyhow::Result<()> {
        Ok(kernel::admit_agent(self.config.pin_dir(), self.agent_cgroup)?)
    }

    async fn listen(&mut self, handover: Option<&mut handover::Taken>) -> anyhow::Result<Option<TcpListener>> {
        let listen = self.config.listen;
        let handed = handover.and_then(|h| listener::handed(h.listener.take(), SocketAddr::V4(listen)));
        let listener = match handed {
            Some(listener) => Some(listener),
            None => listener::try_bind(listen).with_context(|| format!("listening on {listen}"))?,
        };
        listener::warn_if_ephemeral(listen);
        Ok(listener)
    }

    async fn metrics(&mut self, handover: Option<&mut handover::Taken>) -> anyhow::Result<Option<TcpListener>> {
        let Some(addr) = self.config.metrics else { return Ok(None) };
        Ok(Some(match handover.and_then(|h| listener::handed(h.metrics.take(), addr)) {
            Some(metrics) => metrics,
            None => TcpListener::bind(addr).await.with_context(|| format!("serving metrics on {addr}"))?,
        }))
    }

    fn install(&mut self, listening: bool) -> anyhow::Result<Filter> {
        let filter = &self.config.filter;
        for warning in kernel::protection_warnings(&filter.protected, &filter.protected_addresses) {
            tracing::warn!("{warning}");
        }
        let agent_netns_cookie = listener::netns_cookie().context("reading the network namespace's cookie")?;
        let options =
            FilterOptions { agent_cgroup: self.agent_cgroup, listening, agent_netns_cookie, ..filter.clone() };
        Ok(Filter::install(&options)?)
    }

    fn address(&self) -> String {
        self.config.listen.to_string()
    }
}

/// The control socket, or `None` (logged) when it cannot be made: filtering does not depend
/// on it. Another agent answering there is an error, unless it `handed_over` to this one.
async fn claim_control(path: &Path, handed_over: bool) -> anyhow::Result<Option<UnixListener>> {
    match control::claim(path, handed_over).await {
        Ok(listener) => Ok(Some(listener)),
        Err(e @ ControlError::InUse(_)) => Err(e.into()),
        Err(e) => {
            let error = format!("{:#}", anyhow::Error::from(e));
            tracing::error!(%error, "no control socket: `imds-agent status` and `explain` cannot ask this agent");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node where every step is recorded, and one may be made to fail.
    #[derive(Default)]
    struct Recorder {
        steps: Vec<&'static str>,
        fail_at: Option<&'static str>,
        /// Another agent serves the node and hands it over.
        handing_over: bool,
        /// The agent handing over sends no listening socket.
        no_socket_handed: bool,
        /// Another process holds the agent's port.
        port_held: bool,
        /// What `install` was told.
        installed_listening: Option<bool>,
        /// What `control` was told: whether another agent handed over.
        control_handed_over: Option<bool>,
    }

    /// A handover's listening socket, until taken.
    struct Handover {
        listener: Option<&'static str>,
    }

    impl Recorder {
        fn step(&mut self, name: &'static str) -> anyhow::Result<()> {
            self.steps.push(name);
            if self.fail_at == Some(name) {
                bail!("{name} failed");
            }
            Ok(())
        }
    }

    impl Steps for Recorder {
        type Lock = ();
        type Handover = Handover;
        type Control = ();
        type Listener = &'static str;
        type Filter = ();

        async fn claim(&mut self) -> anyhow::Result<((), Option<Handover>)> {
            self.step("claim")?;
            let listener = (!self.no_socket_handed).then_some("handed");
            Ok(((), self.handing_over.then_some(Handover { listener })))
        }
        async fn installing(&mut self, handover: Handover) -> anyhow::Result<Handover> {
            self.step("installing").map(|()| handover)
        }
        async fn control(&mut self, handed_over: bool) -> anyhow::Result<Option<()>> {
            self.control_handed_over = Some(handed_over);
            self.step("control").map(Some)
        }
        fn admit(&mut self) -> anyhow::Result<()> {
            self.step("admit")
        }
        async fn listen(&mut self, handover: Option<&mut Handover>) -> anyhow::Result<Option<&'static str>> {
            self.step("listen")?;
            let handed = handover.and_then(|h| h.listener.take());
            Ok(handed.or((!self.port_held).then_some("bound")))
        }
        async fn metrics(&mut self, _: Option<&mut Handover>) -> anyhow::Result<Option<&'static str>> {
            self.step("metrics").map(|()| None)
        }
        fn install(&mut self, listening: bool) -> anyhow::Result<()> {
            self.installed_listening = Some(listening);
            self.step("install")
        }
        fn address(&self) -> String {
            "10.0.0.4:8182".to_owned()
        }
    }

    fn take(mut node: Recorder) -> (Recorder, anyhow::Result<Option<&'static str>>) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime for the test");
        let taken = runtime.block_on(take_node(&mut node)).map(|t| t.listener);
        (node, taken)
    }

    #[test]
    fn a_fresh_agent_claims_binds_then_installs() {
        let (node, taken) = take(Recorder::default());
        assert_eq!(taken.unwrap(), Some("bound"));
        assert_eq!(node.steps, ["claim", "control", "admit", "listen", "metrics", "install"]);
        assert_eq!(node.installed_listening, Some(true));
        assert_eq!(node.control_handed_over, Some(false), "another agent on the control socket is refused");
    }

    #[test]
    fn a_successor_is_let_in_before_it_touches_anything_and_serves_the_handed_socket() {
        let (node, taken) = take(Recorder { handing_over: true, ..Recorder::default() });
        assert_eq!(taken.unwrap(), Some("handed"));
        assert_eq!(node.steps, ["claim", "installing", "control", "admit", "listen", "metrics", "install"]);
        assert_eq!(node.control_handed_over, Some(true), "the predecessor's control socket is replaced");
    }

    #[test]
    fn each_failure_stops_before_the_filter_is_installed() {
        for (fail_at, handing_over, touched) in [
            ("claim", false, vec!["claim"]),
            // The agent handing over took its duties back.
            ("installing", true, vec!["claim", "installing"]),
            // Another agent serves on the control socket.
            ("control", false, vec!["claim", "control"]),
            // A bad --listen: admitted to the bind guard, but nothing installed.
            ("listen", false, vec!["claim", "control", "admit", "listen"]),
            ("metrics", false, vec!["claim", "control", "admit", "listen", "metrics"]),
            ("install", true, vec!["claim", "installing", "control", "admit", "listen", "metrics", "install"]),
        ] {
            let (node, taken) = take(Recorder { fail_at: Some(fail_at), handing_over, ..Recorder::default() });
            assert!(taken.is_err(), "{fail_at}");
            assert_eq!(node.steps, touched, "{fail_at}");
            if fail_at != "install" {
                assert_eq!(node.installed_listening, None, "{fail_at}: nothing may be installed");
            }
        }
    }

    #[test]
    fn a_port_held_by_another_process_installs_refusing_unless_taking_over() {
        let (node, taken) = take(Recorder { port_held: true, ..Recorder::default() });
        assert_eq!(taken.unwrap(), None);
        assert_eq!(node.installed_listening, Some(false), "installed, refusing redirects until the port is free");

        // Taking over without the earlier agent's socket while another process holds the
        // port: installing would refuse what the earlier agent served.
        let (node, taken) =
            take(Recorder { handing_over: true, no_socket_handed: true, port_held: true, ..Recorder::default() });
        let error = taken.expect_err("not taken over");
        assert!(error.to_string().starts_with("10.0.0.4:8182 is held by another process"), "{error}");
        assert_eq!(node.steps, ["claim", "installing", "control", "admit", "listen"]);
        assert_eq!(node.installed_listening, None);
    }
}
