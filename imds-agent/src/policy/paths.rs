//! Metadata paths other than the token endpoint: which a pod may read.
//!
//! The node-wide rules (`--allow-path`, `--forward-all-paths`) apply to every caller. On top
//! of them, cluster admins grant a namespace path prefixes on its `Namespace` object
//! ([`METADATA_PATHS_ANNOTATION`]), so a node-termination handler can read scheduled events
//! without every pod on the node reading them too, or the handler getting an exception (and
//! with it every identity of the node). A grant never covers `/metadata/identity`: the
//! request parser refuses every path there but the exact token endpoint before any rule is
//! asked, and a grant naming one is refused as unreadable.
use super::Snapshot;
use crate::imds::{path, PathRules};

pub const METADATA_PATHS_ANNOTATION: &str = "imds-filter.io/metadata-paths";

/// The path prefixes a namespace's annotation grants, canonical, matched on whole segments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathGrants {
    prefixes: Vec<String>,
}

impl PathGrants {
    /// Parses an annotation's value: absolute path prefixes separated by commas or white
    /// space, each in the canonical form the agent forwards (`/metadata/scheduledevents`;
    /// a trailing slash is dropped).
    ///
    /// # Errors
    /// A prefix that is not one, or that names the identity endpoint, said in a sentence.
    pub fn parse(text: &str) -> Result<PathGrants, String> {
        let mut prefixes = Vec::new();
        for written in text.split(|c: char| c == ',' || c.is_whitespace()).filter(|p| !p.is_empty()) {
            let refuse = |why: &str| format!("{METADATA_PATHS_ANNOTATION}: {written:?} {why}");
            let trimmed = if written.len() > 1 { written.trim_end_matches('/') } else { written };
            if !trimmed.starts_with('/') {
                return Err(refuse("is not an absolute path"));
            }
            // What a request must spell exactly to be forwarded: nothing to decode, no dot
            // segments, lower case. Anything else would never match, or match by surprise.
            if path::canonicalize(trimmed).as_deref() != Some(trimmed) || trimmed.contains(['?', '#']) {
                return Err(refuse("is not a plain lower-case path (no %, \\, ?, #, dot or empty segments)"));
            }
            // Prefixes are literal: a pattern would silently grant nothing (or not what was meant).
            if trimmed.contains(['*', '[', ']', '{', '}']) {
                return Err(refuse("is a pattern; grants are literal path prefixes, matched on whole segments"));
            }
            if path::under_identity(trimmed) {
                return Err(refuse("is under /metadata/identity, which is never granted"));
            }
            prefixes.push(trimmed.to_owned());
        }
        Ok(PathGrants { prefixes })
    }

    /// The prefix that covers the canonical path `canonical`, if one does.
    #[must_use]
    pub fn covering(&self, canonical: &str) -> Option<&str> {
        self.prefixes.iter().map(String::as_str).find(|p| path::under_prefix(canonical, p))
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// The prefixes, as the annotation lists them.
    #[must_use]
    pub fn describe(&self) -> String {
        if self.prefixes.is_empty() {
            "none".to_owned()
        } else {
            self.prefixes.join(", ")
        }
    }
}

/// The policy's answer for a request to a metadata path other than the token endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathDecision<'a> {
    /// Allowed for every caller (`--allow-path`, `--forward-all-paths`).
    Node,
    /// Allowed by the pod's namespace's grant of `prefix`.
    Granted { namespace: &'a str, prefix: &'a str },
    /// An exception pod: forwarded unchecked (it should not have reached us).
    Exception { exception: &'a str },
    /// 403: this says why.
    Refused(String),
    /// Not in the snapshot (yet): wait for the sources, then a retryable 404.
    UnknownPod,
}

impl PathDecision<'_> {
    /// The decision log's verdict in `enforce` mode.
    #[must_use]
    pub const fn verdict(&self) -> &'static str {
        match self {
            PathDecision::Node | PathDecision::Granted { .. } => "forward",
            PathDecision::Exception { .. } => "exception",
            PathDecision::Refused(_) => "deny",
            PathDecision::UnknownPod => "unknown-pod",
        }
    }

    /// The decision log's reason.
    #[must_use]
    pub fn reason(&self) -> String {
        match self {
            PathDecision::Node => "path allowed by the node's path rules".into(),
            PathDecision::Granted { namespace, prefix } => {
                format!("path granted to namespace {namespace} by its {METADATA_PATHS_ANNOTATION} ({prefix})")
            }
            PathDecision::Exception { exception } => {
                format!("pod matches AzurePodIdentityException {exception}; forwarded unchecked")
            }
            PathDecision::Refused(why) => why.clone(),
            PathDecision::UnknownPod => "the pod is not known to the policy".into(),
        }
    }
}

impl Snapshot {
    /// The decision for a request to the canonical path `canonical` (not the token endpoint)
    /// from the pod `pod_uid` (`None`: the caller is not a pod), under the node-wide `rules`.
    pub fn decide_path(&self, pod_uid: Option<&str>, canonical: &str, rules: &PathRules) -> PathDecision<'_> {
        if rules.allows(canonical) {
            return PathDecision::Node;
        }
        let Some(uid) = pod_uid else {
            return PathDecision::Refused("the path is not allowed on this node, and the caller is not a pod".into());
        };
        let Some(pod) = self.pods.get(uid).filter(|p| self.knows_namespace(&p.namespace)) else {
            return PathDecision::UnknownPod;
        };
        if let Some(e) = self.exception_for(pod) {
            return PathDecision::Exception { exception: &e.name };
        }
        let namespace = pod.namespace.as_str();
        let rules = self.namespaces.get(namespace);
        if let Some(problem) = rules.and_then(|n| n.problem.as_deref()) {
            return PathDecision::Refused(format!(
                "the path is not allowed on this node, and namespace {namespace}'s imds-filter annotations cannot be read ({problem})"
            ));
        }
        let grants = rules.map(|n| &n.paths);
        match grants.and_then(|g| g.covering(canonical)) {
            Some(prefix) => PathDecision::Granted { namespace, prefix },
            None => PathDecision::Refused(format!(
                "the path is not allowed on this node, and {}",
                self.describe_grants(namespace)
            )),
        }
    }

    /// What `namespace` is granted, in a sentence (refusals and `explain`).
    pub fn describe_grants(&self, namespace: &str) -> String {
        match self.namespaces.get(namespace) {
            Some(n) if n.problem.is_some() => {
                format!("namespace {namespace}'s imds-filter annotations cannot be read, so it is granted no path")
            }
            Some(n) if !n.paths.is_empty() => {
                format!("namespace {namespace}'s {METADATA_PATHS_ANNOTATION} grants {}", n.paths.describe())
            }
            _ => format!("namespace {namespace} has no {METADATA_PATHS_ANNOTATION}"),
        }
    }

    /// Whether some pod could be given a path beyond the node's rules: a namespace is granted
    /// one, or there are exceptions. If not, a request for a path the node's rules refuse
    /// needs no pod to be refused.
    pub fn may_grant_paths(&self) -> bool {
        !self.exceptions.is_empty() || self.namespaces.values().any(|n| n.problem.is_none() && !n.paths.is_empty())
    }

    /// Whether `namespace` is granted some path (its unbound pods then still reach the agent
    /// under `--deny-unbound`).
    pub fn grants_paths(&self, namespace: &str) -> bool {
        self.namespaces.get(namespace).is_some_and(|n| n.problem.is_none() && !n.paths.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Exception, NamespaceRules, Pod, PodVerdict, Scope};

    fn pod(uid: &str, namespace: &str, labels: &[(&str, &str)]) -> Pod {
        let labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Pod { uid: uid.into(), namespace: namespace.into(), name: uid.into(), labels, ..Pod::default() }
    }

    #[test]
    fn a_path_is_read_by_the_node_rules_or_the_pods_namespace_grants() {
        let grants = |namespace: &str, paths: &str| NamespaceRules {
            name: namespace.into(),
            paths: PathGrants::parse(paths).unwrap(),
            ..NamespaceRules::default()
        };
        let snapshot = Snapshot::new(
            [
                pod("handler", "ops", &[]),
                pod("web", "shop", &[]),
                pod("helper", "ops", &[("role", "helper")]),
                pod("tight", "scoped", &[("role", "helper")]),
                pod("broken", "broken", &[]),
            ],
            [],
            [],
            [
                Exception {
                    namespace: "ops".into(),
                    name: "helpers".into(),
                    pod_labels: [("role".into(), "helper".into())].into(),
                },
                Exception {
                    namespace: "scoped".into(),
                    name: "helpers".into(),
                    pod_labels: [("role".into(), "helper".into())].into(),
                },
            ],
        )
        .with_namespaces([
            grants("ops", "/metadata/scheduledevents"),
            NamespaceRules { scope: Some(Scope::parse("c-1").unwrap()), ..grants("scoped", "") },
            NamespaceRules::unreadable("broken", "imds-filter.io/metadata-paths: \"x\" is not an absolute path".into()),
        ]);
        let node = PathRules::Allow(vec!["/metadata/instance/compute".into()]);
        let events = "/metadata/scheduledevents";
        let attested = "/metadata/attested/document";
        let cases: [(Option<&str>, &str, &str, &str); 10] = [
            (None, "/metadata/instance/compute/location", "forward", "node's path rules"),
            (Some("web"), "/metadata/instance/compute", "forward", "node's path rules"),
            (None, events, "deny", "the caller is not a pod"),
            (
                Some("handler"),
                events,
                "forward",
                "granted to namespace ops by its imds-filter.io/metadata-paths (/metadata/scheduledevents)",
            ),
            (
                Some("handler"),
                attested,
                "deny",
                "namespace ops's imds-filter.io/metadata-paths grants /metadata/scheduledevents",
            ),
            (Some("web"), events, "deny", "namespace shop has no imds-filter.io/metadata-paths"),
            (Some("helper"), attested, "exception", "AzurePodIdentityException helpers"),
            // An exception not honoured (a narrower scope) reads no more than its namespace may.
            (Some("tight"), events, "deny", "namespace scoped has no imds-filter.io/metadata-paths"),
            (Some("broken"), events, "deny", "cannot be read (imds-filter.io/metadata-paths"),
            (Some("ghost"), events, "unknown-pod", "not known"),
        ];
        for (uid, path, verdict, reason) in cases {
            let decision = snapshot.decide_path(uid, path, &node);
            assert_eq!(decision.verdict(), verdict, "{uid:?} {path}: {decision:?}");
            assert!(decision.reason().contains(reason), "{uid:?} {path}: {}", decision.reason());
        }
        // Under --deny-unbound a pod bound to no identity is refused in the kernel, unless its
        // namespace is granted a path.
        let verdict = |uid: &str| snapshot.pod_verdict(snapshot.pod(uid).unwrap(), true);
        assert_eq!(
            (verdict("handler"), verdict("web"), verdict("broken")),
            (PodVerdict::Redirect, PodVerdict::Deny, PodVerdict::Deny)
        );
    }

    #[test]
    fn grants_are_plain_prefixes_never_under_identity() {
        let grants = PathGrants::parse("/metadata/scheduledevents, /metadata/instance/compute/\n").unwrap();
        assert_eq!(grants.describe(), "/metadata/scheduledevents, /metadata/instance/compute");
        for (path, covered) in [
            ("/metadata/scheduledevents", Some("/metadata/scheduledevents")),
            ("/metadata/instance/compute", Some("/metadata/instance/compute")),
            ("/metadata/instance/compute/location", Some("/metadata/instance/compute")),
            ("/metadata/scheduledeventsx", None), // whole segments only
            ("/metadata/instance", None),
            ("/metadata/instance/network", None),
            ("/metadata", None),
        ] {
            assert_eq!(grants.covering(path), covered, "{path}");
        }
        for (text, why) in [
            ("metadata/instance", "not an absolute path"),
            ("/metadata/identity", "never granted"),
            ("/metadata/identity/oauth2/token", "never granted"),
            ("/metadata/identity;x/oauth2", "never granted"),
            ("/metadata/identity./oauth2", "never granted"),
            ("/Metadata/Instance", "not a plain lower-case path"),
            ("/metadata/%69nstance", "not a plain lower-case path"),
            ("/metadata/x/../identity", "not a plain lower-case path"),
            ("/metadata//instance", "not a plain lower-case path"),
            ("/metadata\\instance", "not a plain lower-case path"),
            ("/metadata/instance?api-version=1", "not a plain lower-case path"),
            ("/metadata/x/..;/identity/oauth2/token", "not a plain lower-case path"),
            ("/metadata/instance/...", "not a plain lower-case path"),
            ("/metadata/instance/*", "is a pattern"),
            ("/metadata/{instance,scheduledevents}", "is a pattern"),
        ] {
            let err = PathGrants::parse(text).unwrap_err();
            assert!(err.contains(why) && err.contains(METADATA_PATHS_ANNOTATION), "{text}: {err}");
        }
        // Broad prefixes are the admin's choice; the identity endpoint stays out of reach
        // because the request parser refuses it before any rule is asked.
        assert_eq!(PathGrants::parse("/").unwrap().covering("/metadata/attested/document"), Some("/"));
        assert!(PathGrants::parse(" , ").unwrap().is_empty());
    }
}
