//! Warm tokens for a workload's next pod.
//!
//! Short Jobs and `CronJobs` start, ask for the same tokens as their previous run, and end: a
//! cache that waits to be asked is always cold for them. So the agent remembers, per
//! workload ([`Owner`]: a Deployment, a `CronJob`, a Job…), which tokens its pods were
//! granted, and when a new pod of that workload appears in the policy (it is bound to the
//! node before its containers start) it fetches them, so the pod's first request finds them.
//!
//! - **Decided again, for the new pod.** A remembered want is only a hint: each is decided by
//!   the policy for the new pod, exactly as its request would be, so a pod never gets a token
//!   warmed that it could not get itself. A pod that names another workload as its controller
//!   (any pod may, within its namespace) can only warm what it may have anyway.
//! - **Idle budget only.** A prefetch is one attempt, made only while the upstream budget is
//!   idle ([`crate::tokens::budget::Budget::try_acquire_idle`]): one at a time, with a slot in
//!   flight and three quarters of the rate left to the pods' own calls.
//! - **Kept until the next run.** A `CronJob`'s interval is learnt from the runs this node
//!   sees (its Jobs are named after the minute they were scheduled for; a minute more than a
//!   day from now is not believed), and its tokens are kept in the cache, unused, for one and
//!   a half intervals plus five minutes, between the cache's own idle time and
//!   [`LONGEST_KEEP`]. A node that sees every other run learns twice the interval.
//! - **Bounded.** [`MOST_WANTS`] per workload (the latest), and only workloads something was
//!   granted to: [`MOST_PER_NAMESPACE`] per namespace and [`MOST_WORKLOADS`] in all, the least
//!   recently seen going first, so one namespace's churn cannot push out another's. Memory is
//!   the agent's own: it starts empty, after a restart or an upgrade too.
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;

use super::AgentState;
use crate::{
    policy::{Decision, Owner, Pod, Selector, Snapshot},
    tokens::{Fetch, Source, TokenKey},
};

/// Wants remembered per workload.
const MOST_WANTS: usize = 8;
/// Workloads remembered, in all and per namespace.
const MOST_WORKLOADS: usize = 1024;
const MOST_PER_NAMESPACE: usize = 128;
/// The most bytes of a request remembered (a token request's head may be far longer; real
/// resources and selectors take a few hundred at most).
const LONGEST_WANT: usize = 512;
/// How far from now a `CronJob` run's minute may be, and the longest interval learnt.
const PLAUSIBLE_RUN: Duration = Duration::from_hours(24);
/// The longest a scheduled workload's tokens are kept unused.
pub(super) const LONGEST_KEEP: Duration = Duration::from_hours(6);

/// A token request as a pod made it, once the policy allowed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Want {
    pub selector: Option<Selector>,
    pub resource: String,
    pub api_version: Option<String>,
}

impl Want {
    /// Its text, in bytes.
    fn size(&self) -> usize {
        let selector = self.selector.as_ref().map_or(0, |s| match s {
            Selector::ClientId(v) | Selector::ObjectId(v) | Selector::ResourceId(v) => v.len(),
        });
        selector + self.resource.len() + self.api_version.as_ref().map_or(0, String::len)
    }
}

/// (namespace, kind, name).
type WorkloadKey = (String, String, String);

#[derive(Debug)]
struct Remembered {
    /// Oldest first.
    wants: Vec<Want>,
    /// The latest run seen (a `CronJob`'s scheduled minute).
    last_run: Option<u64>,
    /// Between the two latest runs.
    interval: Option<Duration>,
    /// When it was last seen, in [`Memory::ticks`].
    seen: u64,
}

#[derive(Debug, Default)]
struct Memory {
    workloads: HashMap<WorkloadKey, Remembered>,
    /// Counts every time a workload is seen: orders them by recency.
    ticks: u64,
}

/// What each workload's pods were granted; see the module.
#[derive(Debug, Default)]
pub(crate) struct Workloads {
    memory: Mutex<Memory>,
}

fn key(pod: &Pod) -> Option<(WorkloadKey, &Owner)> {
    let owner = pod.owner.as_ref()?;
    Some(((pod.namespace.clone(), owner.kind.clone(), owner.name.clone()), owner))
}

impl Workloads {
    /// `pod` was granted `want`: its workload's next pod will be warmed with it.
    pub(super) fn granted(&self, pod: &Pod, want: Want) {
        self.granted_at(pod, want, unix_minute());
    }

    fn granted_at(&self, pod: &Pod, want: Want, now_minute: u64) {
        let Some((key, owner)) = key(pod) else { return };
        if want.size() > LONGEST_WANT {
            return;
        }
        let mut memory = self.memory.lock();
        let entry = memory.entry(key);
        entry.ran(owner.run, now_minute);
        entry.wants.retain(|w| *w != want);
        entry.wants.push(want);
        if entry.wants.len() > MOST_WANTS {
            entry.wants.remove(0);
        }
    }

    /// A new pod of a workload: what its workload's pods were granted before (and, for a
    /// `CronJob`'s run, the interval since the previous one is learnt). A workload nothing
    /// was granted to is not remembered.
    pub(super) fn started(&self, pod: &Pod) -> Vec<Want> {
        self.started_at(pod, unix_minute())
    }

    fn started_at(&self, pod: &Pod, now_minute: u64) -> Vec<Want> {
        let Some((key, owner)) = key(pod) else { return Vec::new() };
        let mut memory = self.memory.lock();
        let Some(entry) = memory.seen(&key) else { return Vec::new() };
        entry.ran(owner.run, now_minute);
        entry.wants.clone()
    }

    /// How long `pod`'s tokens are kept unused: until after its workload's next run, when it
    /// runs on a schedule (`None`: the cache's own idle time).
    pub(super) fn keep_for(&self, pod: &Pod) -> Option<Duration> {
        let (key, _) = key(pod)?;
        let interval = self.memory.lock().workloads.get(&key)?.interval?;
        Some((interval.saturating_mul(3) / 2 + Duration::from_mins(5)).min(LONGEST_KEEP))
    }
}

/// Now, in Unix minutes (a `CronJob`'s Job names count in these).
fn unix_minute() -> u64 {
    crate::tokens::token::unix_now() / 60
}

impl Remembered {
    /// A pod of run `run` (a `CronJob`'s scheduled minute) appeared at `now_minute`. A run
    /// too far from now is not one (any pod may name any Job as its controller).
    fn ran(&mut self, run: Option<u64>, now_minute: u64) {
        let Some(run) = run.filter(|run| run.abs_diff(now_minute) <= PLAUSIBLE_RUN.as_secs() / 60) else { return };
        if let Some(last) = self.last_run.filter(|last| run > *last) {
            self.interval = Some(Duration::from_mins(run - last).min(PLAUSIBLE_RUN));
        }
        self.last_run = self.last_run.max(Some(run));
    }
}

impl Memory {
    /// The workload's entry if it has one, marked seen.
    fn seen(&mut self, key: &WorkloadKey) -> Option<&mut Remembered> {
        self.ticks += 1;
        let entry = self.workloads.get_mut(key)?;
        entry.seen = self.ticks;
        Some(entry)
    }

    /// The workload's entry, made if new, marked seen. Room is made by forgetting the least
    /// recently seen workload of the same namespace when it has its share, else of all.
    fn entry(&mut self, key: WorkloadKey) -> &mut Remembered {
        let workloads = &mut self.workloads;
        if !workloads.contains_key(&key) {
            let full_namespace = workloads.keys().filter(|k| k.0 == key.0).count() >= MOST_PER_NAMESPACE;
            if full_namespace || workloads.len() >= MOST_WORKLOADS {
                let stalest = workloads
                    .iter()
                    .filter(|(k, _)| !full_namespace || k.0 == key.0)
                    .min_by_key(|(_, r)| r.seen)
                    .map(|(k, _)| k.clone());
                if let Some(stalest) = stalest {
                    workloads.remove(&stalest);
                }
            }
        }
        self.ticks += 1;
        let entry = workloads.entry(key).or_insert_with(|| Remembered {
            wants: Vec::new(),
            last_run: None,
            interval: None,
            seen: 0,
        });
        entry.seen = self.ticks;
        entry
    }
}

/// The cache key a want of `pod`'s is served from, if the policy allows it a managed
/// identity's token (the kind IMDS serves; the others are Entra's and not prefetched).
pub(super) fn managed_identity_key(snapshot: &Snapshot, pod: &Pod, want: &Want) -> Option<TokenKey> {
    match snapshot.decide(&pod.uid, want.selector.as_ref()) {
        Decision::Allow { identity, fetch, .. } if identity.service_principal.is_none() => {
            Some(TokenKey { source: Source::managed(fetch), resource: want.resource.clone() })
        }
        _ => None,
    }
}

/// Warms the tokens of every new pod's workload, for as long as the policy is published.
pub(crate) async fn run(state: Arc<AgentState>) {
    let mut updates = state.snapshot.clone();
    let mut known: HashSet<String> = updates.borrow_and_update().pods().map(|p| p.uid.clone()).collect();
    while updates.changed().await.is_ok() {
        let snapshot = Arc::clone(&updates.borrow_and_update());
        for pod in snapshot.pods().filter(|p| !known.contains(&p.uid) && !p.finished) {
            for want in state.workloads.started(pod) {
                warm(&state, &snapshot, pod, &want);
            }
        }
        known = snapshot.pods().map(|p| p.uid.clone()).collect();
    }
}

fn warm(state: &AgentState, snapshot: &Snapshot, pod: &Pod, want: &Want) {
    let Some(key) = managed_identity_key(snapshot, pod, want) else { return };
    if let Some(keep) = state.workloads.keep_for(pod) {
        state.tokens.keep_idle(&key, keep);
    }
    let how = Fetch::Imds { api_version: want.api_version.clone() };
    if state.tokens.prefetch(&key, &pod.uid, &how) {
        state.telemetry.count_prefetch();
        tracing::debug!(namespace = %pod.namespace, pod = %pod.name, resource = %want.resource,
            "token warmed for a new pod of its workload");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_of(kind: &str, name: &str, run: Option<u64>) -> Pod {
        Pod {
            uid: format!("{name}-{run:?}"),
            namespace: "shop".into(),
            owner: Some(Owner { kind: kind.into(), name: name.into(), run }),
            ..Pod::default()
        }
    }

    fn want(resource: &str) -> Want {
        Want { selector: None, resource: resource.into(), api_version: None }
    }

    #[test]
    fn what_a_workload_was_granted_is_warmed_for_its_next_pod() {
        let workloads = Workloads::default();
        let web = pod_of("Deployment", "web", None);
        workloads.granted(&web, want("vault"));
        workloads.granted(&web, want("storage"));
        workloads.granted(&web, want("vault")); // again: once, now the latest
        assert_eq!(workloads.started(&pod_of("Deployment", "web", None)), [want("storage"), want("vault")]);
        // Another workload, or another namespace: nothing.
        assert!(workloads.started(&pod_of("Deployment", "api", None)).is_empty());
        let elsewhere = Pod { namespace: "other".into(), ..pod_of("Deployment", "web", None) };
        assert!(workloads.started(&elsewhere).is_empty());
        // A request longer than any real one is not remembered.
        workloads.granted(&web, want(&"r".repeat(LONGEST_WANT + 1)));
        let long_selector = Want { selector: Some(Selector::ResourceId("/s".repeat(LONGEST_WANT))), ..want("vault") };
        workloads.granted(&web, long_selector);
        assert_eq!(workloads.started(&web).len(), 2);
        // A pod without a controller is not remembered.
        let bare = Pod { owner: None, ..web.clone() };
        workloads.granted(&bare, want("x"));
        assert!(workloads.started(&bare).is_empty());
        // The latest wants only.
        for n in 0..20 {
            workloads.granted(&web, want(&format!("r{n}")));
        }
        let wants = workloads.started(&web);
        assert_eq!(wants.len(), MOST_WANTS);
        assert_eq!(wants.last(), Some(&want("r19")));
    }

    const NOW: u64 = 29_000_000;

    #[test]
    fn a_cronjobs_tokens_are_kept_until_after_its_next_run() {
        let workloads = Workloads::default();
        let run = |minute| pod_of("CronJob", "report", Some(minute));
        assert!(workloads.started_at(&run(NOW), NOW).is_empty(), "nothing granted: not remembered");
        workloads.granted_at(&run(NOW), want("vault"), NOW);
        assert_eq!(workloads.keep_for(&run(NOW)), None, "one run: no interval yet");
        assert_eq!(workloads.started_at(&run(NOW + 120), NOW + 120), [want("vault")]); // every two hours
        assert_eq!(workloads.keep_for(&run(NOW + 120)), Some(Duration::from_mins(185)));
        workloads.started_at(&run(NOW + 60), NOW + 125); // a late pod of an older run changes nothing
        assert_eq!(workloads.keep_for(&run(NOW + 120)), Some(Duration::from_mins(185)));
        workloads.started_at(&run(NOW + 1_560), NOW + 1_560); // daily: capped
        assert_eq!(workloads.keep_for(&run(NOW + 1_560)), Some(LONGEST_KEEP));
        assert_eq!(workloads.keep_for(&pod_of("Deployment", "web", None)), None);
    }

    #[test]
    fn a_run_far_from_now_is_not_believed() {
        let workloads = Workloads::default();
        let run = |minute| pod_of("CronJob", "fake", Some(minute));
        workloads.granted_at(&run(NOW), want("vault"), NOW);
        // Any pod may name any Job: minutes that would overflow, or far in the future.
        for minute in [u64::MAX, u64::MAX / 60 + 1, NOW + 2_000_000_000, NOW + 24 * 60 + 1] {
            assert_eq!(workloads.started_at(&run(minute), NOW), [want("vault")]);
            assert_eq!(workloads.keep_for(&run(minute)), None, "{minute}");
        }
        workloads.started_at(&run(NOW + 24 * 60), NOW + 24 * 60);
        assert_eq!(workloads.keep_for(&run(NOW)), Some(LONGEST_KEEP));
    }

    #[test]
    fn the_least_recently_seen_workload_makes_room_within_its_namespace_first() {
        let workloads = Workloads::default();
        let in_ns = |ns: &str, name: &str| Pod { namespace: ns.into(), ..pod_of("Job", name, None) };
        let remembered = |ns: &str, name: &str| {
            workloads.memory.lock().workloads.contains_key(&(ns.into(), "Job".into(), name.into()))
        };
        // A quiet namespace, then one that churns through more workloads than its share.
        workloads.granted(&in_ns("quiet", "nightly"), want("vault"));
        for n in 0..MOST_PER_NAMESPACE + 10 {
            workloads.granted(&in_ns("noisy", &format!("job-{n}")), want("vault"));
        }
        assert!(remembered("quiet", "nightly"), "another namespace's churn does not push it out");
        assert!(!remembered("noisy", "job-0") && remembered("noisy", &format!("job-{}", MOST_PER_NAMESPACE + 9)));
        // Across namespaces, the least recently seen goes.
        for n in 0..MOST_WORKLOADS {
            workloads.granted(&in_ns(&format!("ns-{}", n % 64), &format!("job-{n}")), want("vault"));
        }
        assert_eq!(workloads.memory.lock().workloads.len(), MOST_WORKLOADS);
        assert!(!remembered("quiet", "nightly"));
    }
}
