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
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

/// The pod label that names a binding.
pub const BINDING_LABEL: &str = "aadpodidbinding";
/// The pod label by which a pod opts in to workload identity.
pub const WORKLOAD_LABEL: &str = "azure.workload.identity/use";
/// ServiceAccount annotations of workload identity.
pub const CLIENT_ID_ANNOTATION: &str = "azure.workload.identity/client-id";
pub const TENANT_ID_ANNOTATION: &str = "azure.workload.identity/tenant-id";

/// Which pods the workload-identity bridge serves (`--workload-identity`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkloadMode {
    /// Pods labelled `azure.workload.identity/use: "true"` (the webhook's own opt-in).
    #[default]
    Label,
    /// Also every pod whose ServiceAccount carries `azure.workload.identity/client-id`.
    Annotated,
    /// None: workload-identity pods are treated like any other.
    Off,
}

/// The agent's workload-identity settings, carried by every snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadSettings {
    pub mode: WorkloadMode,
    /// The tenant for ServiceAccounts without a tenant-id annotation.
    pub default_tenant: Option<String>,
}

/// What the policy needs of a ServiceAccount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
    pub client_id: Option<String>,
    pub tenant_id: Option<String>,
}

/// `AzureIdentity.spec.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityType {
    /// 0: a user-assigned managed identity, served by IMDS.
    UserAssignedMsi,
    /// 1: a service principal with a client secret.
    ServicePrincipal,
    /// 2: a service principal with a certificate.
    ServicePrincipalCertificate,
}

impl IdentityType {
    /// The kind `AzureIdentity.spec.type` names; `None` for a value aad-pod-identity never had.
    #[must_use]
    pub const fn from_spec_type(value: i64) -> Option<IdentityType> {
        match value {
            0 => Some(IdentityType::UserAssignedMsi),
            1 => Some(IdentityType::ServicePrincipal),
            2 => Some(IdentityType::ServicePrincipalCertificate),
            _ => None,
        }
    }
}

/// What the policy needs of an `AzureIdentity`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub name: String,
    pub kind: IdentityType,
    pub client_id: String,
    /// ARM resource id (`resourceID`), for user-assigned identities.
    pub resource_id: String,
    /// Principal (object) id. aad-pod-identity's CRD has no such field; it comes from the
    /// `imds-filter.io/object-id` annotation, and without it `object_id` requests never match.
    pub object_id: Option<String>,
    /// For service principals (types 1 and 2): where and how to get their tokens.
    pub service_principal: Option<ServicePrincipal>,
}

/// A service principal's `AzureIdentity` fields (types 1 and 2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePrincipal {
    pub tenant_id: String,
    /// `clientPassword`: the Secret with the client secret (type 1) or the PKCS#12
    /// certificate and its password (type 2). Its namespace defaults to the identity's.
    pub secret: Option<SecretRef>,
    /// `auxiliaryTenantIDs`: tokens from these tenants too, as NMI returned them.
    pub auxiliary_tenant_ids: Vec<String>,
    /// `adEndpoint`: the Entra authority, when not the agent's default.
    pub authority: Option<String>,
}

impl ServicePrincipal {
    /// From an `AzureIdentity`'s fields; `None` for type 0 (managed identities).
    pub fn from_spec(
        kind: IdentityType,
        identity_namespace: &str,
        tenant_id: &str,
        secret_name: Option<&str>,
        secret_namespace: Option<&str>,
        auxiliary_tenant_ids: &[String],
        ad_endpoint: &str,
    ) -> Option<ServicePrincipal> {
        if kind == IdentityType::UserAssignedMsi {
            return None;
        }
        let nonempty = |s: Option<&str>| s.filter(|v| !v.is_empty()).map(str::to_owned);
        Some(ServicePrincipal {
            tenant_id: tenant_id.to_owned(),
            secret: nonempty(secret_name).map(|name| SecretRef {
                namespace: nonempty(secret_namespace).unwrap_or_else(|| identity_namespace.to_owned()),
                name,
            }),
            auxiliary_tenant_ids: auxiliary_tenant_ids.iter().filter(|t| !t.is_empty()).cloned().collect(),
            authority: nonempty(Some(ad_endpoint)),
        })
    }

    /// What keeps it from being served, if anything: it must name a tenant and a Secret of
    /// its own namespace (a Secret elsewhere would let whoever writes `AzureIdentity` objects
    /// in one namespace use another namespace's credentials).
    pub fn problem(&self, identity_namespace: &str) -> Option<String> {
        match &self.secret {
            _ if self.tenant_id.is_empty() => Some("spec.tenantID is empty".into()),
            None => Some("spec.clientPassword names no Secret".into()),
            Some(s) if s.namespace != identity_namespace => Some(format!(
                "spec.clientPassword names Secret {}/{}, outside the identity's namespace {identity_namespace}",
                s.namespace, s.name
            )),
            Some(_) => None,
        }
    }
}

/// A Secret by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

/// What the policy needs of an `AzureIdentityBinding`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub namespace: String,
    pub name: String,
    /// `spec.azureIdentity`: an `AzureIdentity` name in the same namespace.
    pub identity: String,
    /// `spec.selector`: must equal the pod's `aadpodidbinding` label.
    pub selector: String,
}

/// What the policy needs of an `AzurePodIdentityException`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exception {
    pub namespace: String,
    pub name: String,
    pub pod_labels: BTreeMap<String, String>,
}

/// What the policy needs of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `spec.serviceAccountName` (Kubernetes' default: `default`).
    pub service_account: String,
    /// `status.podIPs`: the addresses its packets come from (none until the pod has one).
    pub ips: Vec<IpAddr>,
    /// `spec.hostNetwork`: it shares the node's network namespace (and the node's address).
    pub host_network: bool,
    /// `status.phase` is `Succeeded` or `Failed`: its containers are gone, and its address
    /// may already be another pod's.
    pub finished: bool,
    /// What its containers' security contexts grant.
    pub powers: Powers,
}

/// What a pod's containers (init and ephemeral ones included) are granted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Powers {
    /// Some container is `privileged`.
    pub privileged: bool,
    /// Capabilities some container adds, upper case without `CAP_` (`ALL` as written).
    pub added: std::collections::BTreeSet<String>,
    /// Some container keeps `NET_RAW` (it is in containerd's and CRI-O's default set): it does
    /// not drop `NET_RAW` or `ALL`.
    pub keeps_net_raw: bool,
}

impl Powers {
    /// A container's `securityContext`: its `privileged`, `capabilities.add` and
    /// `capabilities.drop`, merged into what is known of the pod so far.
    pub fn add_container(&mut self, privileged: bool, add: &[String], drop: &[String]) {
        let name = |c: &String| c.trim().to_ascii_uppercase().trim_start_matches("CAP_").to_owned();
        self.privileged |= privileged;
        self.added.extend(add.iter().map(name));
        let drops_net_raw = drop.iter().map(name).any(|c| c == "NET_RAW" || c == "ALL");
        self.keeps_net_raw |= !drops_net_raw || add.iter().map(name).any(|c| c == "NET_RAW" || c == "ALL");
    }
}

impl Pod {
    /// Why this pod can reach protected addresses or their answers past both of the filter's
    /// layers (SECURITY.md, "What it does not guarantee"); empty for a pod the filter contains.
    #[must_use]
    pub fn uncontained(&self) -> Vec<&'static str> {
        let p = &self.powers;
        let has = |cap: &str| p.added.contains(cap) || p.added.contains("ALL");
        let mut why = Vec::new();
        if p.privileged {
            why.push("privileged");
        }
        if has("SYS_ADMIN") {
            why.push("CAP_SYS_ADMIN");
        }
        if has("BPF") {
            why.push("CAP_BPF");
        }
        if self.host_network && has("NET_ADMIN") {
            why.push("hostNetwork with CAP_NET_ADMIN");
        }
        if self.host_network && p.keeps_net_raw {
            why.push("hostNetwork with CAP_NET_RAW");
        }
        why
    }
}

/// The identity a request names, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    ClientId(String),
    ObjectId(String),
    /// `msi_res_id` or its alias `mi_res_id`.
    ResourceId(String),
}

impl Selector {
    /// The selector as the request spelled it (`client_id=…`), for logs and explanations.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Selector::ClientId(v) => format!("client_id={v}"),
            Selector::ObjectId(v) => format!("object_id={v}"),
            Selector::ResourceId(v) => format!("msi_res_id={v}"),
        }
    }

    fn matches(&self, identity: &Identity) -> bool {
        // GUIDs and ARM ids are case-insensitive.
        match self {
            Selector::ClientId(id) => id.eq_ignore_ascii_case(&identity.client_id),
            Selector::ObjectId(id) => identity.object_id.as_deref().is_some_and(|o| o.eq_ignore_ascii_case(id)),
            Selector::ResourceId(id) => {
                !identity.resource_id.is_empty() && id.eq_ignore_ascii_case(&identity.resource_id)
            }
        }
    }
}

/// Why a request gets "Identity not found".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// The pod has no `aadpodidbinding` label.
    NoBindingLabel,
    /// No binding of the pod's namespace has that selector (or none names an existing identity).
    NoBinding { label: String },
    /// The request names an identity the pod is not bound to.
    SelectorNotBound { selector: Selector },
    /// A workload-identity pod whose ServiceAccount has no client-id annotation.
    WorkloadNoClientId { service_account: String },
    /// A workload-identity pod with no tenant (annotation or agent default).
    WorkloadNoTenant { service_account: String },
    /// The chosen service principal cannot be served (see [`ServicePrincipal::problem`]).
    ServicePrincipalUnusable { identity: String, problem: String },
}

impl DenyReason {
    /// Why, in words an application developer understands (the decision log's reason).
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            DenyReason::NoBindingLabel => "the pod has no aadpodidbinding label".into(),
            DenyReason::NoBinding { label } => {
                format!(
                    "no AzureIdentityBinding in the pod's namespace has selector {label:?} and an existing AzureIdentity"
                )
            }
            DenyReason::SelectorNotBound { selector } => {
                format!("the pod is not bound to the identity it asked for ({})", selector.describe())
            }
            DenyReason::ServicePrincipalUnusable { identity, problem } => {
                format!("the pod's service principal {identity} cannot be used: {problem}")
            }
            DenyReason::WorkloadNoClientId { service_account } => format!(
                "the pod uses workload identity, but its ServiceAccount {service_account:?} has no azure.workload.identity/client-id annotation"
            ),
            DenyReason::WorkloadNoTenant { service_account } => format!(
                "the pod uses workload identity, but its ServiceAccount {service_account:?} has no azure.workload.identity/tenant-id annotation and the agent has no --tenant-id"
            ),
        }
    }
}

/// How an allowed identity was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The request named it.
    Requested,
    /// No selector: the bound identity whose name sorts first.
    FirstByName,
}

/// The policy's answer for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    /// Serve a token for `identity`, bound through `binding`.
    Allow { identity: &'a Identity, binding: &'a str, choice: Choice },
    /// "Identity not found" (400).
    Deny(DenyReason),
    /// Serve a token of the pod's own ServiceAccount's federated identity.
    Workload { service_account: &'a str, client_id: &'a str, tenant_id: &'a str, choice: Choice },
    /// An exception pod: forward unchecked (it should not have reached us).
    Exception { exception: &'a str },
    /// Not in the snapshot (yet): wait for the sources, then a retryable 404.
    UnknownPod,
}

impl Decision<'_> {
    /// The decision log's verdict in `enforce` mode: `allow`, `deny`, `exception` or
    /// `unknown-pod`.
    #[must_use]
    pub const fn verdict(&self) -> &'static str {
        match self {
            Decision::Allow { .. } | Decision::Workload { .. } => "allow",
            Decision::Deny(_) => "deny",
            Decision::Exception { .. } => "exception",
            Decision::UnknownPod => "unknown-pod",
        }
    }

    /// The decision log's reason, in words an application developer understands.
    #[must_use]
    pub fn reason(&self) -> String {
        match self {
            Decision::Allow { binding, choice: Choice::Requested, .. } => {
                format!("bound through {binding}; the identity the request named")
            }
            Decision::Allow { binding, choice: Choice::FirstByName, .. } => {
                format!("bound through {binding}; no selector, so the first bound identity by name")
            }
            Decision::Workload { service_account, choice: Choice::Requested, .. } => {
                format!("workload identity of ServiceAccount {service_account}; the client id the request named")
            }
            Decision::Workload { service_account, choice: Choice::FirstByName, .. } => {
                format!("workload identity of ServiceAccount {service_account}")
            }
            Decision::Deny(reason) => reason.describe(),
            Decision::Exception { exception } => {
                format!("pod matches AzurePodIdentityException {exception}; forwarded unchecked")
            }
            Decision::UnknownPod => "the pod is not known to the policy".into(),
        }
    }

    /// The identity served, as the decision log names it (`namespace/name`, or
    /// `workload-identity:namespace/serviceaccount`).
    #[must_use]
    pub fn identity(&self, pod_namespace: &str) -> Option<String> {
        match self {
            Decision::Allow { identity, .. } => Some(format!("{}/{}", identity.namespace, identity.name)),
            Decision::Workload { service_account, .. } => {
                Some(format!("workload-identity:{pod_namespace}/{service_account}"))
            }
            _ => None,
        }
    }
}

/// The verdict the kernel should hold for a pod's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodVerdict {
    /// Exception: its connections go to IMDS directly.
    Pass,
    /// Unbound and the agent runs with `--deny-unbound`: `connect()` fails at once.
    Deny,
    /// Everything else: the agent decides per request.
    Redirect,
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
    workload: WorkloadSettings,
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
            workload: WorkloadSettings::default(),
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

    pub fn secret(&self, secret: &SecretRef) -> Option<&std::sync::Arc<crate::secrets::SecretData>> {
        self.secrets.get(secret)
    }

    /// Sets the agent's workload-identity settings.
    #[must_use]
    pub fn with_workload(mut self, settings: WorkloadSettings) -> Snapshot {
        self.workload = settings;
        self
    }

    pub fn service_account(&self, namespace: &str, name: &str) -> Option<&ServiceAccount> {
        self.service_accounts.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Whether the workload-identity bridge serves this pod.
    pub fn uses_workload_identity(&self, pod: &Pod) -> bool {
        match self.workload.mode {
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
        let tenant = account.and_then(|a| a.tenant_id.as_deref()).or(self.workload.default_tenant.as_deref());
        let Some(tenant_id) = tenant else {
            return Decision::Deny(DenyReason::WorkloadNoTenant { service_account: pod.service_account.clone() });
        };
        let choice = match selector {
            None => Choice::FirstByName,
            Some(Selector::ClientId(id)) if id.eq_ignore_ascii_case(client_id) => Choice::Requested,
            Some(other) => return Decision::Deny(DenyReason::SelectorNotBound { selector: other.clone() }),
        };
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

    /// The exception a pod matches, if any.
    pub fn exception_for(&self, pod: &Pod) -> Option<&Exception> {
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
        let Some(pod) = self.pods.get(pod_uid) else {
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
        let Some(&(first, first_binding)) = bound.first() else {
            return Decision::Deny(DenyReason::NoBinding { label: label.clone() });
        };
        let (identity, binding, choice) = match selector {
            None => (first, first_binding, Choice::FirstByName),
            Some(sel) => match bound.iter().find(|(i, _)| sel.matches(i)) {
                Some(&(identity, binding)) => (identity, binding, Choice::Requested),
                None => return Decision::Deny(DenyReason::SelectorNotBound { selector: sel.clone() }),
            },
        };
        if let Some(problem) = identity.service_principal.as_ref().and_then(|sp| sp.problem(&identity.namespace)) {
            let name = format!("{}/{}", identity.namespace, identity.name);
            return Decision::Deny(DenyReason::ServicePrincipalUnusable { identity: name, problem });
        }
        Decision::Allow { identity, binding, choice }
    }

    /// The kernel verdict for a pod's cgroup.
    #[must_use]
    pub fn pod_verdict(&self, pod: &Pod, deny_unbound: bool) -> PodVerdict {
        if self.exception_for(pod).is_some() {
            PodVerdict::Pass
        } else if self.uses_workload_identity(pod) {
            PodVerdict::Redirect
        } else if deny_unbound && self.bound_identities(pod).is_empty() {
            PodVerdict::Deny
        } else {
            PodVerdict::Redirect
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn pod(uid: &str, ns: &str, l: &[(&str, &str)]) -> Pod {
        Pod {
            uid: uid.into(),
            namespace: ns.into(),
            name: format!("pod-{uid}"),
            labels: labels(l),
            service_account: "default".into(),
            ..Pod::default()
        }
    }

    #[test]
    fn pods_the_filter_cannot_contain_say_why() {
        let powers = |containers: &[(bool, &[&str], &[&str])]| {
            let mut p = Powers::default();
            for (privileged, add, drop) in containers {
                let owned = |l: &[&str]| l.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>();
                p.add_container(*privileged, &owned(add), &owned(drop));
            }
            p
        };
        let with = |host_network: bool, powers: Powers| Pod { host_network, powers, ..pod("u", "ns", &[]) };
        // An ordinary pod keeps NET_RAW, and the node backstop contains it.
        assert!(with(false, powers(&[(false, &[], &[])])).uncontained().is_empty());
        // In the node's namespace, keeping NET_RAW is enough: it sees the node's traffic.
        assert_eq!(with(true, powers(&[(false, &[], &[])])).uncontained(), ["hostNetwork with CAP_NET_RAW"]);
        assert!(with(true, powers(&[(false, &[], &["ALL"])])).uncontained().is_empty());
        assert!(with(true, powers(&[(false, &[], &["cap_net_raw"])])).uncontained().is_empty());
        // One container that keeps it is enough.
        let mixed = powers(&[(false, &[], &["NET_RAW"]), (false, &[], &[])]);
        assert_eq!(with(true, mixed).uncontained(), ["hostNetwork with CAP_NET_RAW"]);
        assert_eq!(
            with(true, powers(&[(false, &["NET_ADMIN"], &["ALL"])])).uncontained(),
            ["hostNetwork with CAP_NET_ADMIN"]
        );
        assert_eq!(with(false, powers(&[(true, &[], &["ALL"])])).uncontained(), ["privileged"]);
        assert_eq!(
            with(false, powers(&[(false, &["CAP_SYS_ADMIN", "bpf"], &[])])).uncontained(),
            ["CAP_SYS_ADMIN", "CAP_BPF"]
        );
        assert_eq!(with(false, powers(&[(false, &["ALL"], &[])])).uncontained(), ["CAP_SYS_ADMIN", "CAP_BPF"]);
    }

    fn identity(ns: &str, name: &str, client: &str) -> Identity {
        Identity {
            namespace: ns.into(),
            name: name.into(),
            kind: IdentityType::UserAssignedMsi,
            client_id: client.into(),
            resource_id: format!(
                "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
            ),
            object_id: Some(format!("obj-{client}")),
            service_principal: None,
        }
    }

    fn binding(ns: &str, name: &str, identity: &str, selector: &str) -> Binding {
        Binding { namespace: ns.into(), name: name.into(), identity: identity.into(), selector: selector.into() }
    }

    /// app/web is bound to "blob" (client c-blob); app/multi to "table" and "kv" through one
    /// selector; app/plain has no label; app/exc and app/exc2 are exceptions; other/web
    /// carries app's selector in another namespace.
    fn world() -> Snapshot {
        Snapshot::new(
            [
                pod("web", "app", &[("aadpodidbinding", "blob-sel")]),
                pod("multi", "app", &[("aadpodidbinding", "multi-sel")]),
                pod("plain", "app", &[]),
                pod("exc", "app", &[("role", "Kubelet-Helper"), ("aadpodidbinding", "blob-sel")]),
                pod("exc2", "other", &[("role", "kubelet-helper")]),
                pod("foreign", "other", &[("aadpodidbinding", "blob-sel")]),
                pod("dangling", "app", &[("aadpodidbinding", "ghost-sel")]),
            ],
            [
                identity("app", "blob", "c-blob"),
                identity("app", "table", "c-table"),
                identity("app", "kv", "c-kv"),
                identity("other", "elsewhere", "c-else"),
            ],
            [
                binding("app", "blob-binding", "blob", "blob-sel"),
                binding("app", "table-binding", "table", "multi-sel"),
                binding("app", "kv-binding", "kv", "multi-sel"),
                binding("app", "ghost-binding", "no-such-identity", "ghost-sel"),
            ],
            [Exception {
                namespace: "app".into(),
                name: "helpers".into(),
                pod_labels: labels(&[("role", "kubelet-helper")]),
            }],
        )
    }

    fn allowed<'a>(d: &Decision<'a>) -> Option<(&'a str, Choice)> {
        match d {
            Decision::Allow { identity, choice, .. } => Some((identity.name.as_str(), *choice)),
            _ => None,
        }
    }

    #[test]
    fn decisions_table() {
        let w = world();
        let client = |c: &str| Some(Selector::ClientId(c.into()));
        let cases: Vec<(&str, Option<Selector>, Decision<'_>)> = vec![
            // bound pod, no selector: its only identity
            (
                "web",
                None,
                Decision::Allow {
                    identity: &w.identities[&("app".into(), "blob".into())],
                    binding: "blob-binding",
                    choice: Choice::FirstByName,
                },
            ),
            // bound pod naming its own identity, any case
            (
                "web",
                client("C-BLOB"),
                Decision::Allow {
                    identity: &w.identities[&("app".into(), "blob".into())],
                    binding: "blob-binding",
                    choice: Choice::Requested,
                },
            ),
            // another identity's client id
            (
                "web",
                client("c-table"),
                Decision::Deny(DenyReason::SelectorNotBound { selector: Selector::ClientId("c-table".into()) }),
            ),
            // no label
            ("plain", None, Decision::Deny(DenyReason::NoBindingLabel)),
            // label whose binding names a missing identity
            ("dangling", None, Decision::Deny(DenyReason::NoBinding { label: "ghost-sel".into() })),
            // same selector in another namespace binds nothing there
            ("foreign", None, Decision::Deny(DenyReason::NoBinding { label: "blob-sel".into() })),
            // exception (value case-insensitive), even with a binding label
            ("exc", None, Decision::Exception { exception: "helpers" }),
            // an exception only covers its own namespace
            ("exc2", None, Decision::Deny(DenyReason::NoBindingLabel)),
            ("nobody", None, Decision::UnknownPod),
        ];
        for (uid, sel, want) in cases {
            assert_eq!(w.decide(uid, sel.as_ref()), want, "pod {uid} selector {sel:?}");
        }
    }

    #[test]
    fn two_identities_on_one_selector() {
        let w = world();
        // No selector: the name that sorts first ("kv" < "table"), whatever the binding order.
        assert_eq!(allowed(&w.decide("multi", None)), Some(("kv", Choice::FirstByName)));
        let by = |s: Selector| allowed(&w.decide("multi", Some(&s)));
        assert_eq!(by(Selector::ClientId("c-table".into())), Some(("table", Choice::Requested)));
        assert_eq!(by(Selector::ObjectId("OBJ-c-table".into())), Some(("table", Choice::Requested)));
        let table_rid = w.identities[&("app".into(), "table".into())].resource_id.to_uppercase();
        assert_eq!(by(Selector::ResourceId(table_rid)), Some(("table", Choice::Requested)));
        assert_eq!(by(Selector::ClientId("c-blob".into())), None);
        assert_eq!(by(Selector::ObjectId("obj-c-blob".into())), None);
        assert_eq!(by(Selector::ResourceId(String::new())), None);
    }

    #[test]
    fn object_id_needs_the_annotation() {
        let mut i = identity("app", "blob", "c-blob");
        i.object_id = None;
        assert!(!Selector::ObjectId("obj-c-blob".into()).matches(&i));
        assert!(Selector::ClientId("c-blob".into()).matches(&i));
    }

    #[test]
    fn kernel_verdicts_table() {
        let w = world();
        let cases = [
            ("web", false, PodVerdict::Redirect),
            ("web", true, PodVerdict::Redirect),
            ("plain", false, PodVerdict::Redirect),
            ("plain", true, PodVerdict::Deny),
            ("dangling", true, PodVerdict::Deny),
            ("exc", false, PodVerdict::Pass),
            ("exc", true, PodVerdict::Pass),
        ];
        for (uid, deny_unbound, want) in cases {
            assert_eq!(w.pod_verdict(w.pod(uid).unwrap(), deny_unbound), want, "{uid} deny_unbound={deny_unbound}");
        }
    }

    #[test]
    fn duplicate_bindings_to_one_identity_count_once() {
        let w = Snapshot::new(
            [pod("p", "ns", &[("aadpodidbinding", "s")])],
            [identity("ns", "i", "c")],
            [binding("ns", "b1", "i", "s"), binding("ns", "b2", "i", "s")],
            [],
        );
        assert_eq!(w.bound_identities(w.pod("p").unwrap()).len(), 1);
    }

    /// (mode, default tenant, pod, selector, decision)
    type Case = (WorkloadMode, Option<&'static str>, &'static str, Option<Selector>, &'static str);

    /// Workload identity: who opts in, which ServiceAccount's identity they get, and what
    /// they may name.
    #[test]
    fn workload_identity_table() {
        let sa = |name: &str, client: Option<&str>, tenant: Option<&str>| ServiceAccount {
            namespace: "app".into(),
            name: name.into(),
            client_id: client.map(Into::into),
            tenant_id: tenant.map(Into::into),
        };
        let with_sa = |mut p: Pod, account: &str| {
            p.service_account = account.into();
            p
        };
        let wi = [(WORKLOAD_LABEL, "true")];
        let world = |mode, default_tenant: Option<&str>| {
            Snapshot::new(
                [
                    with_sa(pod("wi", "app", &wi), "fed"),
                    with_sa(pod("wi-untenanted", "app", &wi), "fed-no-tenant"),
                    with_sa(pod("wi-plain-sa", "app", &wi), "plain"),
                    with_sa(
                        pod("wi-bound", "app", &[(WORKLOAD_LABEL, "true"), ("aadpodidbinding", "blob-sel")]),
                        "fed",
                    ),
                    with_sa(pod("unlabelled", "app", &[]), "fed"),
                    with_sa(pod("wi-exc", "app", &[(WORKLOAD_LABEL, "true"), ("role", "helper")]), "fed"),
                ],
                [identity("app", "blob", "c-blob")],
                [binding("app", "blob-binding", "blob", "blob-sel")],
                [Exception {
                    namespace: "app".into(),
                    name: "helpers".into(),
                    pod_labels: labels(&[("role", "helper")]),
                }],
            )
            .with_service_accounts([
                sa("fed", Some("c-fed"), Some("t-1")),
                sa("fed-no-tenant", Some("c-fed2"), None),
                sa("plain", None, None),
            ])
            .with_workload(WorkloadSettings { mode, default_tenant: default_tenant.map(Into::into) })
        };
        let workload = |d: Decision<'_>| match d {
            Decision::Workload { client_id, tenant_id, service_account, choice } => {
                format!("wi {service_account} {client_id}@{tenant_id} {choice:?}")
            }
            Decision::Allow { identity, .. } => format!("allow {}", identity.name),
            Decision::Deny(r) => format!("deny {r:?}"),
            Decision::Exception { .. } => "exception".into(),
            Decision::UnknownPod => "unknown".into(),
        };
        let cid = |c: &str| Some(Selector::ClientId(c.into()));
        let cases: [Case; 12] = [
            (WorkloadMode::Label, None, "wi", None, "wi fed c-fed@t-1 FirstByName"),
            (WorkloadMode::Label, None, "wi", cid("C-FED"), "wi fed c-fed@t-1 Requested"),
            (
                WorkloadMode::Label,
                None,
                "wi",
                cid("c-blob"),
                "deny SelectorNotBound { selector: ClientId(\"c-blob\") }",
            ),
            (
                WorkloadMode::Label,
                None,
                "wi",
                Some(Selector::ObjectId("o".into())),
                "deny SelectorNotBound { selector: ObjectId(\"o\") }",
            ),
            (
                WorkloadMode::Label,
                None,
                "wi-untenanted",
                None,
                "deny WorkloadNoTenant { service_account: \"fed-no-tenant\" }",
            ),
            (
                WorkloadMode::Label,
                Some("t-default"),
                "wi-untenanted",
                None,
                "wi fed-no-tenant c-fed2@t-default FirstByName",
            ),
            (WorkloadMode::Label, None, "wi-plain-sa", None, "deny WorkloadNoClientId { service_account: \"plain\" }"),
            // Opted in: its bindings do not apply; its ServiceAccount's identity does.
            (
                WorkloadMode::Label,
                None,
                "wi-bound",
                cid("c-blob"),
                "deny SelectorNotBound { selector: ClientId(\"c-blob\") }",
            ),
            (WorkloadMode::Label, None, "unlabelled", None, "deny NoBindingLabel"),
            (WorkloadMode::Annotated, None, "unlabelled", None, "wi fed c-fed@t-1 FirstByName"),
            (WorkloadMode::Off, None, "wi-bound", None, "allow blob"),
            // Exceptions still come first.
            (WorkloadMode::Label, None, "wi-exc", None, "exception"),
        ];
        for (mode, tenant, uid, selector, want) in cases {
            let w = world(mode, tenant);
            assert_eq!(workload(w.decide(uid, selector.as_ref())), want, "{mode:?} {uid} {selector:?}");
        }
        // A workload-identity pod has no binding, and is still not denied in the kernel.
        let w = world(WorkloadMode::Label, None);
        assert_eq!(w.pod_verdict(w.pod("wi").unwrap(), true), PodVerdict::Redirect);
    }
}
