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
//!   meanwhile are answered by the next list together;
//! - never while the source is unsynced or failing (the list would fail too, or be no newer
//!   than what the watch has);
//! - a uid a list did not contain is not asked for again for [`NOT_FOUND_FOR`] (a static
//!   pod's cgroup names a uid the API never shows);
//! - after a failed list, no list for [`AFTER_FAILURE`].
//!
//! A pod found here carries the same trust as one the watch brings: both come from the API
//! server's view of this node's pods.
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use kube::{api::ListParams, Api, Client};
use tokio::{sync::mpsc, time::Instant};

use super::lean::LeanPod;
use crate::telemetry::SourceStatus;

/// How long a uid no list contained is not asked for again.
const NOT_FOUND_FOR: Duration = Duration::from_secs(30);
/// How long lookups pause after a list failed.
const AFTER_FAILURE: Duration = Duration::from_secs(5);
/// Asks queued at most; beyond, an ask is dropped (a list is due anyway and the request
/// still waits for the watch).
const QUEUED_ASKS: usize = 256;

/// The handlers' end: asks for a pod the snapshot does not know. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PodLookup {
    asks: mpsc::Sender<String>,
}

impl PodLookup {
    /// Asks for the pod with this uid; returns at once. The answer, if the API server
    /// knows the pod, is a snapshot that does.
    pub fn ask(&self, uid: &str) {
        // Full: a list is due and the request still waits for the watch; never block a
        // request on it.
        let _ = self.asks.try_send(uid.to_owned());
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

/// A lookup handle and the task's ends: `run` it with a client.
pub(super) fn channel() -> (PodLookup, mpsc::Receiver<String>) {
    let (asks, queue) = mpsc::channel(QUEUED_ASKS);
    (PodLookup { asks }, queue)
}

/// Answers asks until every [`PodLookup`] is dropped, sending what lists found to `found`.
pub(super) async fn run(
    client: Client,
    node: String,
    mut asks: mpsc::Receiver<String>,
    mut pacing: Pacing,
    found: mpsc::Sender<Found>,
    status: Arc<SourceStatus>,
) {
    let api = Api::<LeanPod>::all(client);
    let params = ListParams::default().fields(&format!("spec.nodeName={node}")).match_any();
    while let Some(first) = asks.recv().await {
        let mut wanted = HashSet::from([first]);
        pacing.wait_turn().await;
        // What came while waiting is answered by the same list.
        while let Ok(uid) = asks.try_recv() {
            wanted.insert(uid);
        }
        let now = Instant::now();
        wanted.retain(|uid| !pacing.recently_missing(uid, now));
        if wanted.is_empty() || !status.is_synced() || status.failing().is_some() {
            continue;
        }
        pacing.listed(now);
        match api.list(&params).await {
            Ok(list) => {
                let pods: Found = list
                    .items
                    .into_iter()
                    .filter(|p| p.metadata.uid.as_ref().is_some_and(|uid| wanted.remove(uid)))
                    .collect();
                status.count_lookups(LookupResult::Found, pods.len());
                status.count_lookups(LookupResult::Missing, wanted.len());
                tracing::debug!(found = pods.len(), missing = wanted.len(), "looked up pods the watch has not brought");
                pacing.missing(wanted, now);
                if !pods.is_empty() && found.send(pods).await.is_err() {
                    return; // the source has stopped
                }
            }
            Err(e) => {
                status.count_lookups(LookupResult::Failed, wanted.len());
                tracing::warn!(error = %format!("{:#}", anyhow::Error::from(e)), pause = ?AFTER_FAILURE,
                    "looking up a pod the watch has not brought failed; its request waits for the watch");
                pacing.failed(now);
            }
        }
    }
}

/// When the next list may go, and which uids not to ask for.
#[derive(Debug)]
pub(super) struct Pacing {
    /// The least time between two lists.
    interval: Duration,
    next: Option<Instant>,
    missing: HashMap<String, Instant>,
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
        self.missing.retain(|_, since| now.duration_since(*since) < NOT_FOUND_FOR);
        self.missing.extend(uids.into_iter().map(|uid| (uid, now)));
    }

    fn recently_missing(&self, uid: &str, now: Instant) -> bool {
        self.missing.get(uid).is_some_and(|since| now.duration_since(*since) < NOT_FOUND_FOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(500);

    #[test]
    fn a_uid_no_list_had_is_not_asked_for_again_for_a_while() {
        let mut pacing = Pacing::every(INTERVAL);
        let t0 = Instant::now();
        pacing.missing(HashSet::from(["static-pod".to_owned()]), t0);
        assert!(pacing.recently_missing("static-pod", t0 + Duration::from_secs(1)));
        assert!(!pacing.recently_missing("other", t0));
        assert!(!pacing.recently_missing("static-pod", t0 + NOT_FOUND_FOR));
        // Old entries go when new ones come: the map does not grow with churn.
        pacing.missing(HashSet::from(["next".to_owned()]), t0 + NOT_FOUND_FOR);
        assert_eq!(pacing.missing.len(), 1);
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
