//! What the policy is made of: pods, identities, bindings, exceptions, ServiceAccounts, as
//! the sources turn Kubernetes objects into them.
use std::{collections::BTreeMap, net::IpAddr};

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

/// The agent's own policy settings, carried by every snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySettings {
    /// Which pods the workload-identity bridge serves.
    pub workload: WorkloadMode,
    /// The tenant for ServiceAccounts without a tenant-id annotation.
    pub default_tenant: Option<String>,
    /// The identity scope of namespaces without one of their own.
    pub default_scope: super::DefaultScope,
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
    /// The workload it was made for, as its controller names it.
    pub owner: Option<Owner>,
}

/// The workload a pod was made for, so that what one of its pods asked for can be warmed for
/// the next one. A `ReplicaSet`'s pods belong to its `Deployment` (they outlive a rollout), a
/// `CronJob`'s Jobs' pods to the `CronJob`; any other controller is taken as it is named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// `Deployment`, `CronJob`, `ReplicaSet`, `Job`, `StatefulSet`…
    pub kind: String,
    pub name: String,
    /// For a `CronJob`'s pod: the minute its Job was scheduled for (Unix time in minutes, as
    /// the `CronJob` controller names its Jobs).
    pub run: Option<u64>,
}

impl Owner {
    /// The workload of a pod whose controller is `kind` `name`; `template_hash` is the pod's
    /// `pod-template-hash` label.
    pub fn of(kind: &str, name: &str, template_hash: Option<&str>) -> Owner {
        let named = |kind: &str, name: &str, run| Owner { kind: kind.to_owned(), name: name.to_owned(), run };
        match kind {
            "ReplicaSet" => match template_hash.and_then(|h| name.strip_suffix(h)?.strip_suffix('-')) {
                Some(deployment) if !deployment.is_empty() => named("Deployment", deployment, None),
                _ => named(kind, name, None),
            },
            "Job" => match name.rsplit_once('-') {
                // The `CronJob` controller names a Job `<cronjob>-<scheduled minute>`; minutes
                // since 1970 have had eight digits since 1989.
                Some((cronjob, minute)) if !cronjob.is_empty() && minute.len() >= 8 => match minute.parse() {
                    Ok(run) if minute.bytes().all(|b| b.is_ascii_digit()) => named("CronJob", cronjob, Some(run)),
                    _ => named(kind, name, None),
                },
                _ => named(kind, name, None),
            },
            _ => named(kind, name, None),
        }
    }
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
