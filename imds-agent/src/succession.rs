//! How an agent becomes the node's agent, and how it stops being it.
//!
//! One agent at a time owns a node's filter: it holds the lock on the pin directory. An
//! agent that starts while another holds it takes over through [`crate::handover`] once its
//! own policy has synced, so that the node is served throughout; when no agent offers a
//! handover (one of a version without it, or one that is stuck), it waits for the lock.
//!
//! A pod whose agent handed its node over leaves a mark in its own directory: if its
//! container restarts before the pod is stopped, it must not take the node back from its
//! successor (the rollout would stall on the old version). The mark names the pod (the
//! DaemonSet passes its UID), so it never holds back another pod's agent, nor one outside
//! Kubernetes; it is removed when its pod's agent next takes the node with no agent running.
use parking_lot::Mutex;
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;

use crate::{
    handover::{self, Duties, Taken},
    kernel::{self, bpffs, Duty},
    telemetry::{SourceStatus, Telemetry},
};

/// How this agent came to own the node's filter.
pub(crate) enum Start {
    /// No agent held it.
    Fresh(bpffs::PinDirLock),
    /// The agent that held it handed it over; it serves until [`Taken::serving`].
    TakenOver(bpffs::PinDirLock, Taken),
}

/// How often a held lock, and a handover, are tried again.
const RETRY: Duration = Duration::from_secs(1);
/// How often the wait is logged (in tries).
const LOG_EVERY: u64 = 30;

/// The mark a pod's agent leaves when it hands the node over.
#[derive(Clone, Debug)]
pub struct RetiredMark {
    pub path: PathBuf,
    /// This agent's pod (`None` outside Kubernetes: no mark is written or heeded).
    pub pod_uid: Option<String>,
}

impl RetiredMark {
    /// Whether this agent's pod handed its node over already.
    fn set(&self) -> bool {
        self.pod_uid.as_ref().is_some_and(|uid| std::fs::read_to_string(&self.path).is_ok_and(|m| m.trim() == uid))
    }

    fn write(&self) {
        let Some(uid) = &self.pod_uid else { return };
        if let Err(e) = std::fs::write(&self.path, format!("{uid}\n")) {
            tracing::warn!(mark = %self.path.display(), error = %e, "could not mark this pod as retired");
        }
    }

    fn clear(&self) {
        if self.pod_uid.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Takes the node's filter: the pin directory's lock when it is free, else a handover from
/// the agent holding it once `source` has loaded the policy (unless this pod handed the node
/// over already, see [`RetiredMark`]), else it waits (saying so every 30 s).
pub(crate) async fn claim_node(
    pin_dir: &Path,
    handover_socket: &Path,
    retired: &RetiredMark,
    source: &SourceStatus,
) -> anyhow::Result<Start> {
    let may_take = !retired.set();
    if !may_take {
        tracing::warn!(
            mark = %retired.path.display(),
            "this pod's agent handed its node over to a newer agent: it takes the node only if that agent exits"
        );
    }
    for tries in 0u64.. {
        if let Some(lock) = bpffs::try_lock_pin_dir(pin_dir)? {
            retired.clear();
            return Ok(Start::Fresh(lock));
        }
        let asked = if may_take && source.is_synced() {
            let (socket, pins) = (handover_socket.to_owned(), pin_dir.to_owned());
            tokio::task::spawn_blocking(move || handover::take(&socket, &pins)).await?
        } else {
            Ok(None)
        };
        match asked {
            Ok(Some(taken)) => {
                let lock = bpffs::PinDirLock::handed_over(taken.lock.try_clone()?, pin_dir)?;
                return Ok(Start::TakenOver(lock, taken));
            }
            Ok(None) if tries % LOG_EVERY == 0 => tracing::warn!(
                pin_dir = %pin_dir.display(),
                handover_socket = %handover_socket.display(),
                policy_loaded = source.is_synced(),
                "another agent holds this node's filter (its pin directory is locked) and offers no handover \
                 yet; waiting for it to hand over or exit"
            ),
            Err(e) if tries % LOG_EVERY == 0 => {
                let error = format!("{:#}", anyhow::Error::from(e));
                tracing::warn!(%error, "the agent holding this node's filter did not hand over; trying again");
            }
            Ok(None) | Err(_) => {}
        }
        tokio::time::sleep(RETRY).await;
    }
    unreachable!("a u64 of tries does not run out")
}

/// Where the serving agent is in handing the node over. Stopping (`SIGTERM`) and the
/// handover agree through it, so that a stopping agent neither hands over half-way nor
/// touches kernel state its successor owns.
#[derive(Debug, Default)]
pub(crate) struct Handing(Mutex<Phase>);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Serving,
    /// Duties paused for a successor that has not touched the kernel yet.
    Paused,
    /// The successor writes the kernel's state.
    Committed,
    Stopping,
}

impl Handing {
    fn phase(&self) -> parking_lot::MutexGuard<'_, Phase> {
        self.0.lock()
    }

    /// The agent stops: runs `refuse` (making the kernel refuse redirects) only if the node
    /// is still this agent's alone. With a successor under way, that successor holds the
    /// listening socket and the kernel's state, or is about to: it goes on alone.
    pub(crate) fn stop<T>(&self, refuse: impl FnOnce() -> T) -> Option<T> {
        let mut phase = self.phase();
        let was = std::mem::replace(&mut *phase, Phase::Stopping);
        (was == Phase::Serving).then(refuse)
    }
}

/// What the serving agent pauses, resumes and gives up while it hands over.
pub(crate) struct AgentDuties {
    pub handing: Arc<Handing>,
    /// Writing the verdict map and the node backstop's exceptions.
    pub verdicts: Duty,
    /// Attaching the tc node backstop to new interfaces.
    pub backstop: Duty,
    /// Set on retiring: accepting stops and connections close after their next answer.
    pub draining: Arc<watch::Sender<bool>>,
    pub telemetry: Arc<Telemetry>,
    /// This agent's hold on the pin directory's lock (shared with the agent's main task),
    /// let go on retiring.
    pub lock: Arc<Mutex<Option<bpffs::PinDirLock>>>,
    pub pin_dir: PathBuf,
    /// This agent's cgroup, made the current agent's again if a handover fails.
    pub agent_cgroup: u64,
    pub retired: RetiredMark,
}

impl Duties for AgentDuties {
    fn pause(&self) -> bool {
        let mut phase = self.handing.phase();
        if *phase == Phase::Stopping {
            return false;
        }
        *phase = Phase::Paused;
        self.verdicts.pause();
        self.backstop.pause();
        true
    }

    fn resume(&self) {
        let mut phase = self.handing.phase();
        if *phase != Phase::Paused {
            return; // stopping: nothing to take back
        }
        *phase = Phase::Serving;
        // The next agent stopped before it wrote the kernel's state (it was not let): all
        // this one wrote is as it left it, and it is the filter's agent.
        if let Err(e) = kernel::admit_agent(&self.pin_dir, self.agent_cgroup) {
            let error = format!("{:#}", anyhow::Error::from(e));
            tracing::error!(%error, "making this agent the filter's agent again");
        }
        self.verdicts.resume();
        self.backstop.resume();
        tracing::info!("the next agent went away before it took over; this agent keeps the node");
    }

    fn commit(&self) -> bool {
        let mut phase = self.handing.phase();
        if *phase == Phase::Stopping {
            return false;
        }
        *phase = Phase::Committed;
        // From here this pod must not take the node back, even if this container restarts.
        self.retired.write();
        true
    }

    fn retire(&self) {
        self.draining.send_replace(true);
        self.telemetry.handed_over();
        drop(self.lock.lock().take());
    }

    fn abandon(&self, why: &str) -> ! {
        tracing::error!("{why}");
        std::process::exit(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopping_agent_refuses_only_while_the_node_is_its_own() {
        let serving = Handing::default();
        assert_eq!(serving.stop(|| "refused"), Some("refused"));
        assert_eq!(serving.stop(|| "refused"), None, "once");
        for during in [Phase::Paused, Phase::Committed] {
            let handing = Handing(Mutex::new(during));
            assert_eq!(handing.stop(|| "refused"), None, "{during:?}: the successor goes on alone");
            assert_eq!(*handing.phase(), Phase::Stopping);
        }
    }

    #[test]
    fn a_retired_mark_holds_back_only_its_own_pod() {
        let dir = tempfile::tempdir().unwrap();
        let mark =
            |uid: Option<&str>| RetiredMark { path: dir.path().join("agent.retired"), pod_uid: uid.map(str::to_owned) };
        assert!(!mark(Some("a")).set());
        mark(Some("a")).write();
        assert!(mark(Some("a")).set());
        assert!(!mark(Some("b")).set(), "another pod's agent");
        assert!(!mark(None).set(), "an agent outside Kubernetes");
        mark(None).clear();
        assert!(mark(Some("a")).set(), "only its pod's agent clears it");
        mark(Some("a")).clear();
        assert!(!mark(Some("a")).set());
    }
}
