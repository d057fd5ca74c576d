//! Pods a lookup found before the watch brought them, standing in until it does.
//!
//! The watch's word wins. A lookup's list may be older than what the watch has said (another
//! API server's cache, a list that raced a delete), so a found pod is taken only if the watch
//! does not have its uid and has not, in the last [`DEPARTED_FOR`], dropped it: deleted it,
//! left it out of a relist, or updated it into something the policy cannot use. A pod it
//! relabelled keeps the watch's labels, and one it dropped is not brought back. Once the
//! watch mentions the uid, or lists the node's pods afresh, the found entry goes; one the
//! watch never brings goes after [`STANDS_IN_FOR`].
use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use kube::runtime::watcher::Event;

use super::lean::LeanPod;
use crate::policy;

/// How long a found pod stands in for the watch at most; then it is looked up again.
const STANDS_IN_FOR: Duration = Duration::from_mins(5);
/// How long a uid the watch dropped is remembered, so a late list cannot bring it back.
const DEPARTED_FOR: Duration = Duration::from_mins(10);

#[derive(Debug, Default)]
pub(super) struct FoundPods {
    pods: BTreeMap<String, (policy::Pod, Instant)>,
    /// uids the watch dropped, and when.
    departed: HashMap<String, Instant>,
}

impl FoundPods {
    /// What the watch says about pods, before its mirror applies it.
    pub(super) fn watched(&mut self, event: &Event<LeanPod>) {
        let uid = |p: &LeanPod| p.metadata.uid.clone().unwrap_or_default();
        match event {
            Event::Apply(p) | Event::InitApply(p) => {
                self.pods.remove(&uid(p));
            }
            Event::Delete(p) => {
                self.pods.remove(&uid(p));
                self.departed([uid(p)]);
            }
            // A fresh list is the watch's whole word on the node's pods.
            Event::InitDone => self.pods.clear(),
            Event::Init => {}
        }
    }

    /// The watch dropped these uids (deleted, left out of a relist, updated into something
    /// the policy cannot use).
    pub(super) fn departed(&mut self, uids: impl IntoIterator<Item = String>) {
        let now = Instant::now();
        self.departed.retain(|_, at| now.duration_since(*at) < DEPARTED_FOR);
        for uid in uids {
            self.pods.remove(&uid);
            self.departed.insert(uid, now);
        }
    }

    /// Takes the pods a lookup found, except those `watched` says the watch has and those it
    /// dropped.
    pub(super) fn adopt(&mut self, pods: impl IntoIterator<Item = policy::Pod>, watched: impl Fn(&str) -> bool) {
        let now = Instant::now();
        self.departed.retain(|_, at| now.duration_since(*at) < DEPARTED_FOR);
        for pod in pods {
            if !watched(&pod.uid) && !self.departed.contains_key(&pod.uid) {
                tracing::info!(namespace = %pod.namespace, pod = %pod.name, uid = %pod.uid,
                    "pod looked up before the watch brought it");
                self.pods.insert(pod.uid.clone(), (pod, now));
            }
        }
    }

    /// When the next stand-in expires.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.pods.values().map(|(_, at)| *at + STANDS_IN_FOR).min()
    }

    /// The pods standing in now (those past [`STANDS_IN_FOR`] are dropped).
    pub(super) fn current(&mut self) -> impl Iterator<Item = &policy::Pod> {
        let now = Instant::now();
        self.pods.retain(|_, (_, at)| now.duration_since(*at) < STANDS_IN_FOR);
        self.pods.values().map(|(pod, _)| pod)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_pod(uid: &str, binding: &str) -> policy::Pod {
        policy::Pod {
            uid: uid.into(),
            namespace: "shop".into(),
            name: format!("pod-{uid}"),
            labels: [("aadpodidbinding".to_owned(), binding.to_owned())].into(),
            ..policy::Pod::default()
        }
    }

    fn lean(uid: &str) -> LeanPod {
        let json = serde_json::json!({"metadata": {"name": format!("pod-{uid}"), "namespace": "shop", "uid": uid}});
        serde_json::from_value(json).expect("a lean pod")
    }

    fn uids(found: &mut FoundPods) -> Vec<String> {
        found.current().map(|p| p.uid.clone()).collect()
    }

    #[test]
    fn the_watch_word_wins_over_a_lookup() {
        let mut found = FoundPods::default();
        let nobody = |_: &str| false;
        found.adopt([policy_pod("new", "blob")], nobody);
        assert_eq!(uids(&mut found), ["new"], "found before the watch: it stands in");

        // The watch brings it: the watch's copy is the one.
        found.watched(&Event::Apply(lean("new")));
        assert!(uids(&mut found).is_empty());

        // A list older than the watch's word: the watch has the uid (maybe relabelled).
        found.adopt([policy_pod("new", "other")], |uid| uid == "new");
        assert!(uids(&mut found).is_empty(), "a lookup never overrides the watch");

        // Deleted by the watch, then a stale list still has it: not brought back.
        found.watched(&Event::Delete(lean("gone")));
        found.adopt([policy_pod("gone", "blob")], nobody);
        assert!(uids(&mut found).is_empty(), "a deleted pod stays deleted");
        // The same for a pod a relist left out (deleted while the watch was away).
        found.departed(["missed".to_owned()]);
        found.adopt([policy_pod("missed", "blob")], nobody);
        assert!(uids(&mut found).is_empty(), "a pod a relist dropped stays dropped");

        // A fresh list from the watch is its whole word: what stood in goes.
        found.adopt([policy_pod("late", "blob")], nobody);
        assert_eq!(uids(&mut found), ["late"]);
        assert!(found.next_expiry().is_some_and(|at| at > Instant::now() + STANDS_IN_FOR / 2));
        found.watched(&Event::InitDone);
        assert!(uids(&mut found).is_empty());
        assert_eq!(found.next_expiry(), None);
    }
}
