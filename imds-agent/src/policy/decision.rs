//! What a request asks ([`Selector`]) and what the policy answers ([`Decision`],
//! [`PodVerdict`]).
use super::{FetchBy, Identity};

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

    pub(super) fn matches(&self, identity: &Identity) -> bool {
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
    /// The namespace's identity scope does not allow the identity (`scope` says which scope).
    OutOfScope { identity: String, scope: String },
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
            DenyReason::OutOfScope { identity, scope } => {
                format!("{identity} is outside the namespace's identity scope: {scope}")
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
    /// Serve a token for `identity`, bound through `binding`, asking the metadata service for
    /// it by `fetch` (the field the namespace's scope allowed).
    Allow { identity: &'a Identity, binding: &'a str, choice: Choice, fetch: FetchBy },
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
