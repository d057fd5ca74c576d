//! Keeping the kernel's per-cgroup verdicts in line with the policy.
//!
//! Pod cgroups are found under the attach cgroup by the kubelet's naming; each pod-level
//! cgroup gets the verdict the policy gives its pod (the kernel applies it to every
//! container below). Only PASS (exceptions) and DENY (unbound pods with `--deny-unbound`)
//! are written: REDIRECT is the default, so pods the policy does not single out — and pods
//! it does not know yet — need no entry. Entries that no longer apply are removed, whoever
//! wrote them: the first sync starts from what the pinned map holds, so an exception revoked
//! while no agent ran loses its PASS entry before the agent reports ready.
//!
//! The node backstop's exceptions follow the same verdicts: the addresses of PASS pods that
//! have their own network namespace may send to protected addresses from there.
use std::{
    collections::{BTreeSet, HashMap},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use imds_common::{PodAddr, Verdict};

use tokio::sync::watch;

use crate::{
    caller::podpath,
    kernel::{Duty, Filter, FilterError},
    policy::{PodVerdict, Snapshot},
    telemetry::SourceStatus,
};

/// How deep below the attach cgroup pod cgroups are looked for (kubepods/qos/pod = 2).
const MAX_DEPTH: usize = 4;

/// Owns the filter's verdict map and what it holds.
pub(crate) struct VerdictSync {
    filter: Filter,
    attach_root: PathBuf,
    deny_unbound: bool,
    /// Every entry the map holds (`None`: a raw value no version writes).
    written: HashMap<u64, Option<Verdict>>,
}

/// What one sync changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SyncReport {
    pub pod_cgroups: usize,
    pub set: usize,
    pub cleared: usize,
    /// PASS pods' addresses added to and removed from the node backstop's exceptions.
    pub sources_added: usize,
    pub sources_removed: usize,
}

impl VerdictSync {
    /// Takes over `filter`, whose verdict map may hold entries an earlier agent wrote: the
    /// first [`VerdictSync::sync`] removes those the policy no longer wants.
    pub(crate) fn new(filter: Filter, attach_root: PathBuf, deny_unbound: bool) -> Result<VerdictSync, FilterError> {
        let written = filter.verdicts()?.into_iter().collect();
        Ok(VerdictSync { filter, attach_root, deny_unbound, written })
    }

    /// Reads the maps again before the next sync: another agent may have written them while
    /// this one's duty was paused ([`crate::kernel::Duty`]).
    pub(crate) fn reread(&mut self) -> Result<(), FilterError> {
        self.written = self.filter.verdicts()?.into_iter().collect();
        self.filter.forget_pass_sources();
        Ok(())
    }

    /// Brings the kernel verdicts in line with `snapshot` and the pod cgroups that exist now.
    pub(crate) fn sync(&mut self, snapshot: &Snapshot) -> Result<SyncReport, FilterError> {
        let pods = pod_cgroups(&self.attach_root);
        let want: HashMap<u64, Verdict> = pods
            .iter()
            .filter_map(|(id, uid)| {
                let pod = snapshot.pod(uid)?;
                match snapshot.pod_verdict(pod, self.deny_unbound) {
                    PodVerdict::Pass => Some((*id, Verdict::Pass)),
                    PodVerdict::Deny => Some((*id, Verdict::Deny)),
                    PodVerdict::Redirect => None,
                }
            })
            .collect();
        let mut report = SyncReport { pod_cgroups: pods.len(), ..SyncReport::default() };
        for (id, verdict) in &want {
            if self.written.get(id) != Some(&Some(*verdict)) {
                self.filter.set_verdict(*id, *verdict)?;
                report.set += 1;
            }
        }
        for id in self.written.keys().filter(|id| !want.contains_key(id)) {
            self.filter.clear_verdict(*id)?;
            report.cleared += 1;
        }
        self.written = want.into_iter().map(|(id, v)| (id, Some(v))).collect();
        (report.sources_added, report.sources_removed) =
            self.filter.set_pass_sources(&pass_sources(snapshot, self.deny_unbound))?;
        Ok(report)
    }
}

/// The addresses the node backstop lets reach protected addresses: those of running PASS pods
/// with their own network namespace. A hostNetwork pod has the node's address, which no
/// packet entering the node from a pod may claim (its sockets are judged by the cgroup
/// programs); a finished pod's address is free for the next pod the node starts.
#[must_use]
pub(crate) fn pass_sources(snapshot: &Snapshot, deny_unbound: bool) -> BTreeSet<PodAddr> {
    snapshot
        .pods()
        .filter(|pod| !pod.host_network && !pod.finished)
        .filter(|pod| snapshot.pod_verdict(pod, deny_unbound) == PodVerdict::Pass)
        .flat_map(|pod| pod.ips.iter().map(|ip| PodAddr::from_ip(*ip)))
        .collect()
}

/// Pod-level cgroups below `root`: (cgroup id, pod UID).
#[must_use]
pub(crate) fn pod_cgroups(root: &Path) -> Vec<(u64, String)> {
    let mut found = Vec::new();
    let mut level = vec![root.to_owned()];
    for _ in 0..MAX_DEPTH {
        let mut next = Vec::new();
        for dir in level {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.filter_map(Result::ok) {
                let Ok(meta) = entry.metadata() else { continue };
                if !meta.is_dir() {
                    continue;
                }
                match podpath::pod_uid(&entry.file_name().to_string_lossy()) {
                    Some(uid) => found.push((meta.ino(), uid)), // containers below inherit it
                    None => next.push(entry.path()),
                }
            }
        }
        level = next;
    }
    found
}

/// Kernel verdicts come only from a synced snapshot: the API source publishes its first one
/// after the initial lists, and until then every pod keeps the default (REDIRECT).
pub(crate) fn start_sync(
    sync: VerdictSync,
    duty: Duty,
    updates: watch::Receiver<Arc<Snapshot>>,
    synced: bool,
    source: Arc<SourceStatus>,
) -> anyhow::Result<()> {
    if synced {
        return spawn_sync(sync, duty, updates, source);
    }
    let mut first = updates;
    tokio::spawn(async move {
        if first.changed().await.is_ok() {
            if let Err(e) = spawn_sync(sync, duty, first, source) {
                tracing::error!(error = %format!("{e:#}"), "starting the kernel verdict sync");
            }
        }
    });
    Ok(())
}

/// Syncs the kernel verdicts now, then on every policy change and every second (new pod
/// cgroups appear without a policy change). Runs on its own thread: it walks cgroupfs.
/// The first sync also removes what the pinned map held that the policy no longer wants; the
/// agent reports ready only after it ([`SourceStatus::reconciled`]).
fn spawn_sync(
    mut sync: VerdictSync,
    duty: Duty,
    mut updates: watch::Receiver<Arc<Snapshot>>,
    source: Arc<SourceStatus>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new().name("verdict-sync".into()).spawn(move || {
        let (mut last_error, mut in_place) = (None, false);
        loop {
            if in_place || last_error.is_some() {
                // The timer must be created inside the runtime, hence the async block.
                let changed =
                    runtime.block_on(async { tokio::time::timeout(Duration::from_secs(1), updates.changed()).await });
                if matches!(changed, Ok(Err(_))) {
                    return; // the policy source is gone: the agent is shutting down
                }
            }
            let snapshot = Arc::clone(&updates.borrow_and_update());
            // Paused while another agent takes over (the first sync too); after a pause, what
            // the maps hold may be that agent's writing: read again.
            let Some(synced) = duty.perform(|reread| {
                if reread {
                    sync.reread()?;
                }
                sync.sync(&snapshot)
            }) else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            match synced {
                Ok(r) => {
                    last_error = None;
                    source.reconciled();
                    if !in_place || r.set + r.cleared + r.sources_added + r.sources_removed > 0 {
                        tracing::info!(
                            pod_cgroups = r.pod_cgroups,
                            set = r.set,
                            cleared = r.cleared,
                            pass_sources_added = r.sources_added,
                            pass_sources_removed = r.sources_removed,
                            "{}",
                            if in_place { "kernel verdicts updated" } else { "kernel verdicts in place" }
                        );
                    }
                    in_place = true;
                }
                Err(e) => {
                    // Retried every second; said once until it changes or recovers.
                    let message = format!("{:#}", anyhow::Error::from(e));
                    if last_error.as_ref() != Some(&message) {
                        tracing::error!(error = %message, "updating kernel verdicts");
                        last_error = Some(message);
                    }
                }
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::IpAddr};

    use super::*;
    use crate::policy::{Exception, Pod};

    #[test]
    fn only_running_exception_pods_with_their_own_namespace_pass() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let pod = |name: &str, role: &str, ips: &[&str]| Pod {
            uid: name.into(),
            namespace: "app".into(),
            name: name.into(),
            labels: BTreeMap::from([("role".to_owned(), role.to_owned())]),
            ips: ips.iter().map(|i| ip(i)).collect(),
            ..Pod::default()
        };
        let snapshot = Snapshot::new(
            [
                pod("helper", "helper", &["10.0.0.5", "fd00::5"]),
                Pod { host_network: true, ..pod("node-helper", "helper", &["10.0.0.1"]) },
                Pod { finished: true, ..pod("job", "helper", &["10.0.0.6"]) },
                pod("web", "web", &["10.0.0.7"]),
            ],
            [],
            [],
            [Exception {
                namespace: "app".into(),
                name: "helpers".into(),
                pod_labels: BTreeMap::from([("role".to_owned(), "helper".to_owned())]),
            }],
        );
        let want: BTreeSet<PodAddr> = [ip("10.0.0.5"), ip("fd00::5")].into_iter().map(PodAddr::from_ip).collect();
        assert_eq!(pass_sources(&snapshot, false), want);
    }
}
