//! How an agent becomes the node's agent, and how it stops being it.
//!
//! One agent at a time owns a node's filter: it holds the lock on the pin directory. An
//! agent that starts while another holds it takes over through [`crate::handover`] once its
//! own policy has synced, so that the node is served throughout; when no agent offers a
//! handover (one of a version without it, or one that is stuck), it waits for the lock.
//!
//! An agent that handed its node over leaves a mark in its own runtime directory (on
//! Kubernetes, its pod's): if its container restarts before the pod is stopped, it must not
//! take the node back from its successor, which would stall the rollout on the old version.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::sync::watch;

use crate::{
    handover::{self, Duties, Taken},
    kernel::{self, bpffs, Duty},
    telemetry::{SourceStatus, Telemetry},
};

/// How this agent came to own the node's filter.
pub enum Start {
    /// No agent held it.
    Fresh(bpffs::PinDirLock),
    /// The agent that held it handed it over; it serves until [`Taken::serving`].
    TakenOver(bpffs::PinDirLock, Taken),
}

/// How often a held lock, and a handover, are tried again.
const RETRY: Duration = Duration::from_secs(1);
/// How often the wait is logged (in tries).
const LOG_EVERY: u64 = 30;

/// Takes the node's filter: the pin directory's lock when it is free, else a handover from
/// the agent holding it once `source` has loaded the policy (unless `retired` marks this
/// pod as one that handed its node over), else it waits (saying so every 30 s).
pub async fn claim_node(
    pin_dir: &Path,
    handover_socket: &Path,
    retired: &Path,
    source: &SourceStatus,
) -> anyhow::Result<Start> {
    let may_take = !retired.exists();
    if !may_take {
        tracing::warn!(
            mark = %retired.display(),
            "this agent's pod handed its node over to a newer agent: it takes the node only if that agent exits"
        );
    }
    for tries in 0u64.. {
        if let Some(lock) = bpffs::try_lock_pin_dir(pin_dir)? {
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

/// Waits until the kernel's verdicts match the loaded policy: a successor says it serves
/// only then, so that the earlier agent stops accepting only once this one decides alike.
pub async fn reconciled(source: &SourceStatus) {
    while !source.is_reconciled() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the serving agent pauses, resumes and gives up while it hands over.
pub struct AgentDuties {
    /// Writing the verdict map and the node backstop's exceptions.
    pub verdicts: Duty,
    /// Attaching the tc node backstop to new interfaces.
    pub backstop: Duty,
    /// Set on retiring: accepting stops and connections close after their next answer.
    pub draining: Arc<watch::Sender<bool>>,
    pub telemetry: Arc<Telemetry>,
    /// This agent's hold on the pin directory's lock, let go on retiring.
    pub lock: Arc<Mutex<Option<bpffs::PinDirLock>>>,
    pub pin_dir: PathBuf,
    /// This agent's cgroup, made the current agent's again if a handover fails.
    pub agent_cgroup: u64,
    /// The mark a retired agent leaves (see the module's documentation).
    pub retired: PathBuf,
}

impl Duties for AgentDuties {
    fn pause(&self) {
        self.verdicts.pause();
        self.backstop.pause();
    }

    fn resume(&self) {
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

    fn retire(&self) {
        if let Err(e) = std::fs::write(&self.retired, b"handed over\n") {
            tracing::warn!(mark = %self.retired.display(), error = %e, "could not mark this agent as retired");
        }
        self.draining.send_replace(true);
        self.telemetry.handed_over();
        drop(self.lock.lock().unwrap_or_else(PoisonError::into_inner).take());
    }

    fn abandon(&self, why: &str) -> ! {
        tracing::error!("{why}");
        std::process::exit(1)
    }
}
