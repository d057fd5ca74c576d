//! One kind, mirrored from its watch as the policy's own objects.
//!
//! Each object is converted on arrival and only the conversion is kept, keyed by
//! namespace/name: nothing of the API's object (not even its metadata) stays, and objects the
//! policy cannot use (a ServiceAccount naming no client id) take no room at all. A list, at
//! start or again after `410 Gone`, fills a fresh map that replaces the old one whole once
//! the list is complete, so a half-listed kind never shows, and until then the previous
//! objects stay in force.
use std::collections::BTreeMap;

use kube::{runtime::watcher::Event, Resource, ResourceExt as _};

pub(super) struct Mirror<T> {
    items: BTreeMap<(String, String), T>,
    /// While a list arrives: what it brought so far.
    listing: Option<BTreeMap<(String, String), T>>,
    listed: bool,
}

impl<T> Default for Mirror<T> {
    fn default() -> Self {
        Mirror { items: BTreeMap::new(), listing: None, listed: false }
    }
}

impl<T> Mirror<T> {
    /// Applies one watch event, converting its object with `convert` (`None`: not kept).
    pub(super) fn apply<K: Resource>(&mut self, event: Event<K>, mut convert: impl FnMut(&K) -> Option<T>) {
        let key = |object: &K| (object.namespace().unwrap_or_default(), object.name_any());
        match event {
            Event::Init => self.listing = Some(BTreeMap::new()),
            Event::InitApply(object) => {
                if let (Some(listing), Some(item)) = (&mut self.listing, convert(&object)) {
                    listing.insert(key(&object), item);
                }
            }
            Event::InitDone => {
                if let Some(listed) = self.listing.take() {
                    self.items = listed;
                }
                self.listed = true;
            }
            Event::Apply(object) => match convert(&object) {
                Some(item) => {
                    self.items.insert(key(&object), item);
                }
                None => {
                    self.items.remove(&key(&object));
                }
            },
            Event::Delete(object) => {
                self.items.remove(&key(&object));
            }
        }
    }

    /// Whether a complete list has arrived at least once.
    pub(super) fn listed(&self) -> bool {
        self.listed
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &T> {
        self.items.values()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::ObjectMeta};

    use super::*;

    fn object(name: &str, keep: bool) -> ConfigMap {
        let labels = keep.then(|| BTreeMap::from([("keep".to_owned(), "yes".to_owned())]));
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels,
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        }
    }

    /// Keeps the names of labelled objects.
    fn kept(c: &ConfigMap) -> Option<String> {
        c.labels().contains_key("keep").then(|| c.name_any())
    }

    fn names(mirror: &Mirror<String>) -> Vec<&str> {
        mirror.values().map(String::as_str).collect()
    }

    #[test]
    fn lists_replace_whole_and_changes_apply_in_between() {
        let mut mirror = Mirror::default();
        mirror.apply(Event::Init, kept);
        mirror.apply(Event::InitApply(object("a", true)), kept);
        mirror.apply(Event::InitApply(object("skipped", false)), kept);
        assert!(!mirror.listed() && names(&mirror).is_empty(), "nothing shows before the list is complete");
        mirror.apply(Event::InitDone, kept);
        assert!(mirror.listed());
        assert_eq!(names(&mirror), ["a"]);

        mirror.apply(Event::Apply(object("b", true)), kept);
        mirror.apply(Event::Apply(object("a", false)), kept); // no longer usable: dropped
        assert_eq!(names(&mirror), ["b"]);
        mirror.apply(Event::Delete(object("b", true)), kept);
        assert!(names(&mirror).is_empty());

        // A relist (after 410 Gone): the old objects stay in force until it completes.
        mirror.apply(Event::Apply(object("old", true)), kept);
        mirror.apply(Event::Init, kept);
        mirror.apply(Event::InitApply(object("new", true)), kept);
        assert_eq!(names(&mirror), ["old"]);
        mirror.apply(Event::InitDone, kept);
        assert_eq!(names(&mirror), ["new"]);
    }
}
