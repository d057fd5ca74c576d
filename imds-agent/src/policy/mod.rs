//! Who may get which token: aad-pod-identity's rules as a pure function.
//!
//! Sources (a manifests directory, the Kubernetes API) turn what they read into a
//! [`Snapshot`]; the HTTP side asks [`Snapshot::decide`] about one pod and one request.
//! Nothing here does I/O, so every rule is tested with plain tables below.
//!
//! The rules, in order:
//! 1. A pod matching an `AzurePodIdentityException` of its own namespace (any one label pair,
//!    values compared case-insensitively, as NMI does) is an exception. Exceptions get a PASS
//!    verdict in the kernel, so their connections never reach the agent; if one does (a race
//!    with a policy change), it is forwarded unchecked, as NMI did.
//! 2. Otherwise the pod's `aadpodidbinding` label selects the `AzureIdentityBinding`s **of its
//!    own namespace** whose `selector` equals it exactly (NMI's forceNamespaced mode), and
//!    through them the `AzureIdentity`s (same namespace) they name.
//! 3. A selector in the request (`client_id`, `object_id`, `msi_res_id`/`mi_res_id`) must match
//!    one of those identities. With none, the identity whose `AzureIdentity` name sorts first
//!    is used — a documented, deterministic choice (NMI picked one at random).
//! 4. No binding, or a selector matching no bound identity: "Identity not found", IMDS's own
//!    400, so SDKs give up instead of retrying.
//!
//! Workload identity comes between 1 and 2: a pod that opts in (label
//! `azure.workload.identity/use: "true"`, or — with [`WorkloadMode::Annotated`] — any pod whose
//! ServiceAccount names a client id) is served tokens of **its own ServiceAccount's** federated
//! identity (`azure.workload.identity/client-id`, tenant from `…/tenant-id` or the agent's
//! default), exchanged at Entra with the pod's own service-account token. A selector must name
//! that client id; bindings do not apply to such a pod.
use std::collections::HashMap;

mod decision;
mod host_token;
mod objects;
mod paths;
mod scopes;
#[cfg(test)]
mod tests;

pub use decision::{Choice, Decision, DenyReason, PodVerdict, Selector};
pub use host_token::{HostTokenRefusal, TrustedCaller};
pub use objects::*;
pub use paths::{PathDecision, PathGrants, METADATA_PATHS_ANNOTATION};
pub use scopes::{
    DefaultScope, FetchBy, NamespaceAnnotations, NamespaceRules, Scope, ScopeRule, IDENTITY_SCOPE_ANNOTATION,
    MODE_ANNOTATION,
};

/// The refusal of `identity`, which `scope` does not allow.
fn out_of_scope(identity: &Identity, scope: &ScopeRule<'_>, namespace: &str) -> DenyReason {
    DenyReason::OutOfScope {
        identity: if identity.resource_id.is_empty() {
            format!("{}/{} (client id {})", identity.namespace, identity.name, identity.client_id)
        } else {
            format!(
                "{}/{} (client id {}, resource id {})",
                identity.namespace, identity.name, identity.client_id, identity.resource_id
            )
        },
        scope: scope.describe(namespace),
    }
}

/// Everything the policy knows at one moment. Built by a source, replaced as a whole.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pods: HashMap<String, Pod>,
    /// (namespace, name) → identity.
    identities: HashMap<(String, String), Identity>,
    bindings: Vec<Binding>,
    exceptions: Vec<Exception>,
    /// (namespace, name) → ServiceAccount; only those workload identity needs.
    service_accounts: HashMap<(String, String), ServiceAccount>,
    /// Secrets from a manifests directory (the API source reads them on demand instead).
    secrets: HashMap<SecretRef, std::sync::Arc<crate::secrets::SecretData>>,
    /// What each namespace's annotations allow (only namespaces with some).
    namespaces: HashMap<String, NamespaceRules>,
    /// Every namespace the source knows, when it can know them all (the API source): a pod
    /// of a namespace not among them is not decided for until it is, so that a namespace
    /// the watch has not brought never gets the default scope by mistake.
    known_namespaces: Option<std::collections::HashSet<String>>,
    settings: PolicySettings,
}

impl Snapshot {
    /// Builds a snapshot. Duplicate pod uids or identity names: the last one wins.
    pub fn new(
        pods: impl IntoIterator<Item = Pod>,
        identities: impl IntoIterator<Item = Identity>,
        bindings: impl IntoIterator<Item = Binding>,
        exceptions: impl IntoIterator<Item = Exception>,
    ) -> Snapshot {
        Snapshot {
            pods: pods.into_iter().map(|p| (p.uid.clone(), p)).collect(),
            identities: identities.into_iter().map(|i| ((i.namespace.clone(), i.name.clone()), i)).collect(),
            bindings: bindings.into_iter().collect(),
            exceptions: exceptions.into_iter().collect(),
            service_accounts: HashMap::new(),
            secrets: HashMap::new(),
            namespaces: HashMap::new(),
            known_namespaces: None,
            settings: PolicySettings::default(),
        }
    }

    /// Adds the ServiceAccounts workload identity reads (others may be left out).
    #[must_use]
    pub fn with_service_accounts(mut self, accounts: impl IntoIterator<Item = ServiceAccount>) -> Snapshot {
        self.service_accounts = accounts.into_iter().map(|a| ((a.namespace.clone(), a.name.clone()), a)).collect();
        self
    }

    /// Adds Secrets (the manifests source; the API source reads them on demand).
    #[must_use]
    pub fn with_secrets(
        mut self,
        secrets: impl IntoIterator<Item = (SecretRef, crate::secrets::SecretData)>,
    ) -> Snapshot {
        self.secrets = secrets.into_iter().map(|(k, v)| (k, std::sync::Arc::new(v))).collect();
        self
    }

    /// Adds the namespaces' rules (namespaces without annotations may be left out).
    #[must_use]
    pub fn with_namespaces(mut self, namespaces: impl IntoIterator<Item = NamespaceRules>) -> Snapshot {
        self.namespaces = namespaces.into_iter().map(|n| (n.name.clone(), n)).collect();
        self
    }

    /// Says which namespaces exist (all of them): pods of others are not decided for.
    #[must_use]
    pub fn with_known_namespaces(mut self, names: impl IntoIterator<Item = String>) -> Snapshot {
        self.known_namespaces = Some(names.into_iter().collect());
        self
    }

    /// Whether the policy can decide for the pod `uid`: it knows the pod, and its namespace
    /// when namespaces are known.
    pub fn knows(&self, uid: &str) -> bool {
        self.pods.get(uid).is_some_and(|p| self.knows_namespace(&p.namespace))
    }

    fn knows_namespace(&self, namespace: &str) -> bool {
        self.known_namespaces.as_ref().is_none_or(|known| known.contains(namespace))
    }

    /// The identity scope that decides for `namespace`.
    pub fn scope_rule(&self, namespace: &str) -> ScopeRule<'_> {
        let rules = self.namespaces.get(namespace);
        if let Some(problem) = rules.and_then(|n| n.problem.as_deref()) {
            return ScopeRule::Unreadable(problem);
        }
        match (rules.and_then(|n| n.scope.as_ref()), self.settings.default_scope) {
            (Some(scope), _) => ScopeRule::Annotated(scope),
            (None, DefaultScope::Open) => ScopeRule::Open,
            (None, DefaultScope::Closed) => ScopeRule::Closed,
        }
    }

    /// Whether `namespace` is audited (its [`MODE_ANNOTATION`] is `audit`).
    pub fn audited(&self, namespace: &str) -> bool {
        self.namespaces.get(namespace).is_some_and(|n| n.audit)
    }

    pub fn secret(&self, secret: &SecretRef) -> Option<&std::sync::Arc<crate::secrets::SecretData>> {
        self.secrets.get(secret)
    }

    /// Sets the agent's workload-identity settings.
    #[must_use]
    pub fn with_settings(mut self, settings: PolicySettings) -> Snapshot {
        self.settings = settings;
        self
    }

    pub fn service_account(&self, namespace: &str, name: &str) -> Option<&ServiceAccount> {
        self.service_accounts.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Whether the workload-identity bridge serves this pod.
    pub fn uses_workload_identity(&self, pod: &Pod) -> bool {
        match self.settings.workload {
            WorkloadMode::Off => false,
            WorkloadMode::Label => pod.labels.get(WORKLOAD_LABEL).is_some_and(|v| v == "true"),
            WorkloadMode::Annotated => {
                pod.labels.get(WORKLOAD_LABEL).is_some_and(|v| v == "true")
                    || self.service_account(&pod.namespace, &pod.service_account).is_some_and(|a| a.client_id.is_some())
            }
        }
    }

    fn decide_workload<'a>(&'a self, pod: &'a Pod, selector: Option<&Selector>) -> Decision<'a> {
        let account = self.service_account(&pod.namespace, &pod.service_account);
        let Some(client_id) = account.and_then(|a| a.client_id.as_deref()) else {
            return Decision::Deny(DenyReason::WorkloadNoClientId { service_account: pod.service_account.clone() });
        };
        let tenant = account.and_then(|a| a.tenant_id.as_deref()).or(self.settings.default_tenant.as_deref());
        let Some(tenant_id) = tenant else {
            return Decision::Deny(DenyReason::WorkloadNoTenant { service_account: pod.service_account.clone() });
        };
        let choice = match selector {
            None => Choice::FirstByName,
            Some(Selector::ClientId(id)) if id.eq_ignore_ascii_case(client_id) => Choice::Requested,
            Some(other) => return Decision::Deny(DenyReason::SelectorNotBound { selector: other.clone() }),
        };
        let scope = self.scope_rule(&pod.namespace);
        if !scope.permits_client(client_id) {
            let identity = format!("workload identity {client_id}");
            return Decision::Deny(DenyReason::OutOfScope { identity, scope: scope.describe(&pod.namespace) });
        }
        Decision::Workload { service_account: &pod.service_account, client_id, tenant_id, choice }
    }

    pub fn pod(&self, uid: &str) -> Option<&Pod> {
        self.pods.get(uid)
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values()
    }

    pub fn identities(&self) -> impl Iterator<Item = &Identity> {
        self.identities.values()
    }

    /// Sizes, for logs and metrics: (pods, identities, bindings, exceptions).
    #[must_use]
    pub fn sizes(&self) -> (usize, usize, usize, usize) {
        (self.pods.len(), self.identities.len(), self.bindings.len(), self.exceptions.len())
    }

    /// The exception a pod matches, if any, and if its namespace is known and its scope allows
    /// every identity (an exception's pods reach the metadata service directly, with every
    /// identity of the node, so a narrower scope, or one not known yet, leaves exceptions
    /// unhonoured).
    pub fn exception_for(&self, pod: &Pod) -> Option<&Exception> {
        self.matching_exception(pod)
            .filter(|_| self.knows_namespace(&pod.namespace) && self.scope_rule(&pod.namespace).is_everything())
    }

    /// The exception a pod's labels match, honoured or not.
    pub fn matching_exception(&self, pod: &Pod) -> Option<&Exception> {
        self.exceptions
            .iter()
            .filter(|e| e.namespace == pod.namespace)
            .find(|e| e.pod_labels.iter().any(|(k, v)| pod.labels.get(k).is_some_and(|pv| pv.eq_ignore_ascii_case(v))))
    }

    /// The identities a pod is bound to, sorted by identity name, each with its binding.
    pub fn bound_identities(&self, pod: &Pod) -> Vec<(&Identity, &str)> {
        let Some(label) = pod.labels.get(BINDING_LABEL) else {
            return Vec::new();
        };
        let mut bound: Vec<(&Identity, &str)> = self
            .bindings
            .iter()
            .filter(|b| b.namespace == pod.namespace && &b.selector == label)
            .filter_map(|b| {
                self.identities.get(&(b.namespace.clone(), b.identity.clone())).map(|i| (i, b.name.as_str()))
            })
            .collect();
        bound.sort_by(|a, b| a.0.name.cmp(&b.0.name).then(a.1.cmp(b.1)));
        bound.dedup_by(|a, b| a.0.name == b.0.name);
        bound
    }

    /// The decision for a token request from the pod `pod_uid`.
    pub fn decide(&self, pod_uid: &str, selector: Option<&Selector>) -> Decision<'_> {
        let Some(pod) = self.pods.get(pod_uid).filter(|p| self.knows_namespace(&p.namespace)) else {
            return Decision::UnknownPod;
        };
        if let Some(e) = self.exception_for(pod) {
            return Decision::Exception { exception: &e.name };
        }
        if self.uses_workload_identity(pod) {
            return self.decide_workload(pod, selector);
        }
        let Some(label) = pod.labels.get(BINDING_LABEL) else {
            return Decision::Deny(DenyReason::NoBindingLabel);
        };
        let bound = self.bound_identities(pod);
        let Some(&(first, _)) = bound.first() else {
            return Decision::Deny(DenyReason::NoBinding { label: label.clone() });
        };
        let scope = self.scope_rule(&pod.namespace);
        let (identity, binding, choice, fetch) = match selector {
            // The first bound identity the scope allows (bound ones it refuses are not served).
            None => match bound.iter().find_map(|&(i, b)| scope.fetch_by(i).map(|f| (i, b, f))) {
                Some((identity, binding, fetch)) => (identity, binding, Choice::FirstByName, fetch),
                None => return Decision::Deny(out_of_scope(first, &scope, &pod.namespace)),
            },
            Some(sel) => match bound.iter().find(|(i, _)| sel.matches(i)) {
                Some(&(identity, binding)) => match scope.fetch_by(identity) {
                    Some(fetch) => (identity, binding, Choice::Requested, fetch),
                    None => return Decision::Deny(out_of_scope(identity, &scope, &pod.namespace)),
                },
                None => return Decision::Deny(DenyReason::SelectorNotBound { selector: sel.clone() }),
            },
        };
        if let Some(problem) = identity.service_principal.as_ref().and_then(|sp| sp.problem(&identity.namespace)) {
            let name = format!("{}/{}", identity.namespace, identity.name);
            return Decision::Deny(DenyReason::ServicePrincipalUnusable { identity: name, problem });
        }
        Decision::Allow { identity, binding, choice, fetch }
    }

    /// The kernel verdict for a pod's cgroup.
    #[must_use]
    pub fn pod_verdict(&self, pod: &Pod, deny_unbound: bool) -> PodVerdict {
        if self.exception_for(pod).is_some() {
            PodVerdict::Pass
        } else if self.uses_workload_identity(pod) {
            PodVerdict::Redirect
        } else if deny_unbound
            && !self.audited(&pod.namespace)
            && !self.grants_paths(&pod.namespace)
            && self.bound_identities(pod).is_empty()
        {
            PodVerdict::Deny
        } else {
            PodVerdict::Redirect
        }
    }
}
