//! Looking a pod up when a request comes before the watch has brought it.
//!
//! A pod is bound to the node before its containers start, so the watch normally brings it
//! long before its first request. When the watch lags (an API server under load, a watch
//! being re-established), the handler would wait `--pod-grace` and answer a retryable 404,
//! which several SDKs' 1–2 s probe timeouts do not outlast. On such a miss the handler asks
//! here, and this task lists the node's pods once, from the API server's watch cache
//! (`resourceVersion=0`, indexed by node: the same list the watch started from), and hands
//! the pods asked for to the source's loop, which adds them to the snapshot until the watch
//! catches up ([`super::Mirrors`]).
//!
//! What keeps it cheap for the API server:
//! - one list at a time, and one at most every `--pod-lookup-interval`: the asks that arrive
//!   meanwhile are answered by the next list together, and a pod asking many times is asked
//!   for once;
//! - never for a pod the snapshot has come to know meanwhile, and never while the source is
//!   unsynced or failing (the list would fail too, or be no newer than what the watch has);
//! - a uid a list did not contain is not asked for again for [`FIRST_MISS`], doubling on
//!   each further miss up to [`LAST_MISS`] (a static pod's cgroup names a uid the API never
//!   shows);
//! - a list that fails or takes longer than [`LIST_TIMEOUT`] pauses lookups for
//!   [`AFTER_FAILURE`].
//!
//! A pod found here carries the same trust as one the watch brings: both come from the API
//! server's view of this node's pods.
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use kube::{api::ListParams, Api, Client};
use parking_lot::Mutex;
use tokio::{
    sync::{mpsc, watch, Notify},
    time::Instant,
};

use super::lean::LeanPod;
use crate::{policy::Snapshot, telemetry::SourceStatus};

/// How long a uid a list did not contain is not asked for, after its first miss.
const FIRST_MISS: Duration = Duration::from_secs(5);
/// … and at most, after repeated misses.
const LAST_MISS: Duration = Duration::from_mins(1);
/// The longest a list may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long lookups pause after a list failed.
const AFTER_FAILURE: Duration = Duration::from_secs(5);
/// Pods asked for at once, at most; beyond, an ask is dropped and its request waits for the
/// watch. The asks are pods with a process on this node (the kernel attests the uid), so
/// only a node with more pods than this could reach it.
const MOST_ASKED: usize = 1024;

/// The handlers' end: asks for a pod the snapshot does not know. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct PodLookup {
    asked: Arc<Mutex<HashSet<String>>>,
    wake: Arc<Notify>,
}

impl PodLookup {
    /// Asks for the pod with this uid; returns at once. The answer, if the API server
    /// knows the pod, is a snapshot that does.
    pub fn ask(&self, uid: &str) {
        {
            let mut asked = self.asked.lock();
            if asked.len() >= MOST_ASKED || !asked.insert(uid.to_owned()) {
                return;
            }
        }
        self.wake.notify_one();
    }

    /// Waits for asks, then takes them all.
    async fn next(&self) -> HashSet<String> {
        loop {
            let asked = std::mem::take(&mut *self.asked.lock());
            if !asked.is_empty() {
                return asked;
            }
            self.wake.notified().await;
        }
    }
}

/// What a list concluded, counted in `imds_filter_pod_lookups_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookupResult {
    /// The list had the pod.
    Found,
    /// The list did not have it.
    Missing,
    /// The list failed.
    Failed,
}

impl LookupResult {
    pub fn as_str(self) -> &'static str {
        match self {
            LookupResult::Found => "found",
            LookupResult::Missing => "missing",
            LookupResult::Failed => "failed",
        }
    }
}

/// The pods the asks named, as a list found them.
pub(super) type Found = Vec<LeanPod>;

/// Where a lookup task gets its asks and tells what it found.
pub(super) struct Ends {
    pub asks: PodLookup,
    pub pacing: Pacing,
    /// The snapshots published: a pod they know is not looked up.
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub found: mpsc::Sender<Found>,
    pub status: Arc<SourceStatus>,
}

/// Answers asks for as long as the source takes what is found.
pub(super) async fn run(client: Client, node: String, ends: Ends) {
    let Ends { asks, mut pacing, snapshots, found, status } = ends;
    let api = Api::<LeanPod>::all(client);
    let params = ListParams::default().fields(&format!("spec.nodeName={node}")).match_any();
    loop {
        let mut wanted = asks.next().await;
        pacing.wait_turn().await;
        // What came while waiting is answered by the same list.
        wanted.extend(std::mem::take(&mut *asks.asked.lock()));
        let now = Instant::now();
        {
            let snapshot = snapshots.borrow();
            wanted.retain(|uid| snapshot.pod(uid).is_none() && !pacing.recently_missing(uid, now));
        }
        if wanted.is_empty() || !status.is_synced() || status.failing().is_some() {
            continue;
        }
        pacing.listed(now);
        match tokio::time::timeout(LIST_TIMEOUT, api.list(&params)).await {
            Ok(Ok(list)) => {
                let pods: Found = list
                    .items
                    .into_iter()
                    .filter(|p| p.metadata.uid.as_ref().is_some_and(|uid| wanted.remove(uid)))
                    .collect();
                status.count_lookups(LookupResult::Found.as_str(), pods.len());
                status.count_lookups(LookupResult::Missing.as_str(), wanted.len());
                tracing::debug!(found = pods.len(), missing = wanted.len(), "looked up pods the watch has not brought");
                pacing.missing(wanted, now);
                if !pods.is_empty() && found.send(pods).await.is_err() {
                    return; // the source has stopped
                }
            }
            failed => {
                status.count_lookups(LookupResult::Failed.as_str(), wanted.len());
                let error = match failed {
                    Ok(Err(e)) => format!("{:#}", anyhow::Error::from(e)),
                    _ => format!("no answer in {LIST_TIMEOUT:?}"),
                };
                tracing::warn!(%error, pause = ?AFTER_FAILURE,
                    "looking up a pod the watch has not brought failed; its request waits for the watch");
                pacing.failed(now);
            }
        }
    }
}

/// A uid no list had: not asked for until `until`; the next miss waits twice `wait`.
#[derive(Clone, Copy, Debug)]
struct Miss {
    until: Instant,
    wait: Duration,
}

/// When the next list may go, and which uids not to ask for.
#[derive(Debug)]
pub(super) struct Pacing {
    /// The least time between two lists.
    interval: Duration,
    next: Option<Instant>,
    missing: HashMap<String, Miss>,
}

impl Pacing {
    pub(super) fn every(interval: Duration) -> Pacing {
        Pacing { interval, next: None, missing: HashMap::new() }
    }

    async fn wait_turn(&self) {
        if let Some(next) = self.next {
            tokio::time::sleep_until(next).await;
        }
    }

    fn listed(&mut self, now: Instant) {
        self.next = Some(now + self.interval);
    }

    fn failed(&mut self, now: Instant) {
        self.next = Some(now + AFTER_FAILURE);
    }

    fn missing(&mut self, uids: HashSet<String>, now: Instant) {
        // A miss is remembered a while past its wait, so a uid missed again waits longer.
        self.missing.retain(|_, miss| miss.until + LAST_MISS > now);
        for uid in uids {
            let wait = self.missing.get(&uid).map_or(FIRST_MISS, |miss| (miss.wait * 2).min(LAST_MISS));
            self.missing.insert(uid, Miss { until: now + wait, wait });
        }
    }

    fn recently_missing(&self, uid: &str, now: Instant) -> bool {
        self.missing.get(uid).is_some_and(|miss| now < miss.until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(500);

    #[test]
    fn a_uid_no_list_had_waits_longer_each_time_it_is_missed() {
        let mut pacing = Pacing::every(INTERVAL);
        let t0 = Instant::now();
        let static_pod = || HashSet::from(["static-pod".to_owned()]);
        pacing.missing(static_pod(), t0);
        assert!(pacing.recently_missing("static-pod", t0 + Duration::from_secs(1)));
        assert!(!pacing.recently_missing("other", t0));
        assert!(!pacing.recently_missing("static-pod", t0 + FIRST_MISS));
        // Missed again: twice as long, up to the last wait.
        let t1 = t0 + FIRST_MISS;
        pacing.missing(static_pod(), t1);
        assert!(pacing.recently_missing("static-pod", t1 + FIRST_MISS));
        assert!(!pacing.recently_missing("static-pod", t1 + FIRST_MISS * 2));
        let mut t = t1;
        for _ in 0..10 {
            t += LAST_MISS;
            pacing.missing(static_pod(), t);
        }
        assert!(!pacing.recently_missing("static-pod", t + LAST_MISS));
        // Misses long past go when new ones come: the map does not grow with churn.
        pacing.missing(HashSet::from(["next".to_owned()]), t + LAST_MISS * 3);
        assert_eq!(pacing.missing.len(), 1);
    }

    #[tokio::test]
    async fn a_pod_asking_many_times_is_asked_for_once() {
        let lookup = PodLookup::default();
        for _ in 0..100 {
            lookup.ask("busy");
        }
        lookup.ask("quiet");
        let asked = lookup.next().await;
        assert_eq!(asked, HashSet::from(["busy".to_owned(), "quiet".to_owned()]));
        assert!(lookup.asked.lock().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn lists_are_paced_and_a_failure_pauses_them() {
        let mut pacing = Pacing::every(INTERVAL);
        let start = Instant::now();
        pacing.wait_turn().await;
        assert_eq!(start.elapsed(), Duration::ZERO, "the first list goes at once");
        pacing.listed(start);
        pacing.wait_turn().await;
        assert_eq!(start.elapsed(), INTERVAL);
        pacing.failed(Instant::now());
        pacing.wait_turn().await;
        assert_eq!(start.elapsed(), INTERVAL + AFTER_FAILURE);
    }
}
