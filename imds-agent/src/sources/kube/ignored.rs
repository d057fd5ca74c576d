//! Objects the conversion left out, told about where they matter.
//!
//! Every node's agent watches the cluster's `AzureIdentity`, `AzureIdentityBinding` and
//! `AzurePodIdentityException` objects, so each one would see every bad object. Each logs
//! it, but only the agents with a pod the object would have applied to record a `Warning`
//! Event on it: one bad object costs the API server the Events of the nodes it concerns, not
//! one per node of the cluster.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use kube::Resource;

use crate::{
    events::Ignored,
    policy::{self, BINDING_LABEL},
};

/// Which pods an ignored object would have applied to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Reach {
    /// The pod itself (pods are this node's).
    Pod,
    /// Pods bound to the identity: through a binding of its namespace that names it.
    Identity,
    /// Pods of its namespace whose binding label equals `selector` (a pod without the label
    /// counts as an empty one: a naive reading of an empty selector matches it).
    Binding { selector: String },
    /// Every pod of its namespace (a naive reading of empty labels matches them all).
    Exception,
}

/// How often the same object is told about again while it stays ignored and relevant.
const RETELL: Duration = Duration::from_mins(10);

/// One object left out: what to tell, which pods it concerns, and when it was last told.
#[derive(Debug)]
struct Entry {
    ignored: Ignored,
    reach: Reach,
    told: Option<Instant>,
}

/// The objects left out, by (kind, namespace, name).
#[derive(Debug, Default)]
pub(super) struct IgnoredObjects {
    objects: BTreeMap<(String, String, String), Entry>,
}

impl IgnoredObjects {
    /// What the conversion made of `object`: kept (and no longer ignored), or ignored, which
    /// is logged (once per change of the object: a conversion runs once per change).
    pub(super) fn note<K: Resource<DynamicType = ()>, T>(
        &mut self,
        object: &K,
        reach: impl FnOnce() -> Reach,
        converted: Result<T, String>,
    ) -> Option<T> {
        let key = key(object);
        let problem = match converted {
            Ok(item) => {
                self.objects.remove(&key);
                return Some(item);
            }
            Err(problem) => problem,
        };
        let (kind, namespace, name) = key.clone();
        tracing::warn!(%kind, %namespace, %name, %problem, "policy object ignored");
        let ignored = Ignored {
            api_version: K::api_version(&()).into_owned(),
            kind,
            namespace,
            name,
            uid: object.meta().uid.clone().unwrap_or_default(),
            problem,
        };
        self.objects.insert(key, Entry { ignored, reach: reach(), told: None });
        None
    }

    /// `object` is gone.
    pub(super) fn forget<K: Resource<DynamicType = ()>>(&mut self, object: &K) {
        self.objects.remove(&key(object));
    }

    /// Its kind is being listed afresh: what the list brings is noted again.
    pub(super) fn forget_kind<K: Resource<DynamicType = ()>>(&mut self) {
        let kind = K::kind(&());
        self.objects.retain(|(k, _, _), _| *k != kind);
    }

    /// The ignored objects to tell about now: those that would have applied to one of `pods`
    /// (this node's), given the `bindings` in force, and were not told about in the last
    /// [`RETELL`] (a change of the object tells again).
    pub(super) fn due(&mut self, pods: &[&policy::Pod], bindings: &[&policy::Binding], now: Instant) -> Vec<Ignored> {
        let mut due = Vec::new();
        for entry in self.objects.values_mut() {
            let recent = entry.told.is_some_and(|at| now.duration_since(at) < RETELL);
            if !recent && concerns(&entry.ignored, &entry.reach, pods, bindings) {
                entry.told = Some(now);
                due.push(entry.ignored.clone());
            }
        }
        due
    }
}

fn concerns(object: &Ignored, reach: &Reach, pods: &[&policy::Pod], bindings: &[&policy::Binding]) -> bool {
    let here = || pods.iter().filter(|p| p.namespace == object.namespace);
    match reach {
        Reach::Pod => true,
        Reach::Exception => here().next().is_some(),
        Reach::Binding { selector } => here().any(|p| label_of(p) == selector),
        Reach::Identity => bindings
            .iter()
            .filter(|b| b.namespace == object.namespace && b.identity == object.name)
            .any(|b| here().any(|p| label_of(p) == b.selector)),
    }
}

/// A pod's binding label; a pod without one has an empty one.
fn label_of(pod: &policy::Pod) -> &str {
    pod.labels.get(BINDING_LABEL).map_or("", String::as_str)
}

fn key<K: Resource<DynamicType = ()>>(object: &K) -> (String, String, String) {
    let meta = object.meta();
    (K::kind(&()).into_owned(), meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(namespace: &str, label: Option<&str>) -> policy::Pod {
        policy::Pod {
            uid: "u".into(),
            namespace: namespace.into(),
            name: "p".into(),
            labels: label.map(|l| BTreeMap::from([(BINDING_LABEL.to_owned(), l.to_owned())])).unwrap_or_default(),
            ..policy::Pod::default()
        }
    }

    fn ignored(namespace: &str, name: &str) -> Ignored {
        Ignored {
            api_version: "aadpodidentity.k8s.io/v1".into(),
            kind: "AzureIdentity".into(),
            namespace: namespace.into(),
            name: name.into(),
            uid: "x".into(),
            problem: "spec.clientID is required".into(),
        }
    }

    #[test]
    fn only_objects_that_would_apply_to_a_pod_here_are_told() {
        let web = pod("shop", Some("blob"));
        let plain = pod("shop", None);
        let binding = policy::Binding {
            namespace: "shop".into(),
            name: "b".into(),
            identity: "blob".into(),
            selector: "blob".into(),
        };
        let (pods, bindings) = (vec![&web, &plain], vec![&binding]);
        let cases = [
            (ignored("shop", "blob"), Reach::Identity, true),
            (ignored("shop", "unbound"), Reach::Identity, false),
            (ignored("bank", "blob"), Reach::Identity, false),
            (ignored("shop", "b2"), Reach::Binding { selector: "blob".into() }, true),
            (ignored("shop", "b3"), Reach::Binding { selector: String::new() }, true), // plain has no label
            (ignored("shop", "b4"), Reach::Binding { selector: "other".into() }, false),
            (ignored("shop", "e"), Reach::Exception, true),
            (ignored("bank", "e"), Reach::Exception, false),
            (ignored("bank", "p"), Reach::Pod, true),
        ];
        for (object, reach, told) in cases {
            assert_eq!(concerns(&object, &reach, &pods, &bindings), told, "{} {reach:?}", object.name);
        }
        assert!(!concerns(&ignored("shop", "e"), &Reach::Exception, &[], &bindings), "no pods here, nobody to tell");
    }

    #[test]
    fn an_object_is_told_about_once_then_again_after_a_while_or_a_change() {
        let web = pod("shop", Some("blob"));
        let (pods, t0) = (vec![&web], Instant::now());
        let mut objects = IgnoredObjects::default();
        let entry = |told| Entry { ignored: ignored("shop", "e"), reach: Reach::Exception, told };
        objects.objects.insert(("AzurePodIdentityException".into(), "shop".into(), "e".into()), entry(None));
        assert_eq!(objects.due(&pods, &[], t0).len(), 1);
        assert!(objects.due(&pods, &[], t0 + Duration::from_mins(1)).is_empty());
        assert_eq!(objects.due(&pods, &[], t0 + RETELL).len(), 1);
        assert!(objects.due(&[], &[], t0 + 3 * RETELL).is_empty(), "no pod here: not told");
    }
}
