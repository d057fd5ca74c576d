//! The one conversion from Kubernetes objects to policy, shared by both sources.
//!
//! Each source reads an object its own way (the manifests source from YAML documents, the
//! Kubernetes source from lean watch objects) and hands the fields below to these functions,
//! so one set of rules decides what the policy accepts. The rules are strict: an object the
//! policy could misread is refused, with a sentence saying why. The manifests source then
//! refuses the whole load (the previous policy stays); the Kubernetes source leaves the object
//! out, logs it, and records a `Warning` Event on it.
use std::{collections::BTreeMap, net::IpAddr};

use crate::policy::{
    Binding, Exception, Identity, IdentityType, NamespaceAnnotations, NamespaceRules, Owner, Pod, Powers,
    ServiceAccount, ServicePrincipal, CLIENT_ID_ANNOTATION, IDENTITY_SCOPE_ANNOTATION, METADATA_PATHS_ANNOTATION,
    MODE_ANNOTATION, TENANT_ID_ANNOTATION,
};

/// `AzureIdentity` annotation carrying the identity's object (principal) id.
pub const OBJECT_ID_ANNOTATION: &str = "imds-filter.io/object-id";

/// Where an object lives.
#[derive(Clone, Copy, Debug)]
pub struct Place<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

/// An `AzureIdentity`'s spec, as both sources read it.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdentitySpec<'a> {
    /// `spec.type` (absent: 0).
    pub identity_type: i64,
    pub client_id: &'a str,
    pub resource_id: &'a str,
    pub tenant_id: &'a str,
    /// `spec.clientPassword`: the Secret's name and namespace.
    pub secret_name: Option<&'a str>,
    pub secret_namespace: Option<&'a str>,
    pub auxiliary_tenant_ids: &'a [String],
    pub ad_endpoint: &'a str,
    /// The [`OBJECT_ID_ANNOTATION`] annotation.
    pub object_id: Option<&'a str>,
}

/// An `AzureIdentity`. A client id is required: IMDS asked with an empty `client_id` may
/// answer with the VM's own identity.
pub fn identity(at: Place<'_>, spec: &IdentitySpec<'_>) -> Result<Identity, String> {
    named(at)?;
    let kind = IdentityType::from_spec_type(spec.identity_type)
        .ok_or_else(|| format!("spec.type must be 0, 1 or 2, not {}", spec.identity_type))?;
    if spec.client_id.trim().is_empty() {
        return Err("spec.clientID is required".into());
    }
    let service_principal = ServicePrincipal::from_spec(
        kind,
        at.namespace,
        spec.tenant_id,
        spec.secret_name,
        spec.secret_namespace,
        spec.auxiliary_tenant_ids,
        spec.ad_endpoint,
    );
    Ok(Identity {
        namespace: at.namespace.to_owned(),
        name: at.name.to_owned(),
        kind,
        client_id: spec.client_id.to_owned(),
        resource_id: spec.resource_id.to_owned(),
        object_id: spec.object_id.filter(|v| !v.is_empty()).map(str::to_owned),
        service_principal,
    })
}

/// An `AzureIdentityBinding`: it names an identity and a selector (an empty selector would
/// match every pod without the label, as NMI never did).
pub fn binding(at: Place<'_>, azure_identity: &str, selector: &str) -> Result<Binding, String> {
    named(at)?;
    if azure_identity.is_empty() || selector.is_empty() {
        return Err("spec.azureIdentity and spec.selector are required".into());
    }
    Ok(Binding {
        namespace: at.namespace.to_owned(),
        name: at.name.to_owned(),
        identity: azure_identity.to_owned(),
        selector: selector.to_owned(),
    })
}

/// An `AzurePodIdentityException`: it names labels (without any, it would match no pod in
/// NMI and every pod in a naive reading).
pub fn exception(at: Place<'_>, pod_labels: &BTreeMap<String, String>) -> Result<Exception, String> {
    named(at)?;
    if pod_labels.is_empty() {
        return Err("spec.podLabels must not be empty".into());
    }
    Ok(Exception { namespace: at.namespace.to_owned(), name: at.name.to_owned(), pod_labels: pod_labels.clone() })
}

/// A pod, as both sources read it.
#[derive(Clone, Debug, Default)]
pub struct PodFields<'a> {
    pub uid: &'a str,
    pub labels: Option<&'a BTreeMap<String, String>>,
    /// `spec.serviceAccountName` (absent or empty: `default`, as the API server fills it in).
    pub service_account_name: Option<&'a str>,
    /// `status.podIPs`, else `status.podIP`.
    pub ips: Vec<&'a str>,
    pub host_network: bool,
    /// `status.phase`.
    pub phase: Option<&'a str>,
    pub powers: Powers,
    /// The `kind` and `name` of its controller (the `metadata.ownerReferences` entry with
    /// `controller: true`).
    pub controller: Option<(&'a str, &'a str)>,
}

/// The label a Deployment's `ReplicaSets` put on their pods.
const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// A pod. Its uid is required (attribution is by uid); its addresses must be addresses.
pub fn pod(at: Place<'_>, fields: PodFields<'_>) -> Result<Pod, String> {
    named(at)?;
    if fields.uid.is_empty() {
        return Err("metadata.uid is required".into());
    }
    let ips = fields
        .ips
        .iter()
        .map(|ip| ip.parse::<IpAddr>().map_err(|_| format!("status.podIPs: {ip:?} is not an IP address")))
        .collect::<Result<_, _>>()?;
    Ok(Pod {
        uid: fields.uid.to_owned(),
        namespace: at.namespace.to_owned(),
        name: at.name.to_owned(),
        labels: fields.labels.cloned().unwrap_or_default(),
        service_account: fields.service_account_name.filter(|s| !s.is_empty()).unwrap_or("default").to_owned(),
        ips,
        host_network: fields.host_network,
        finished: matches!(fields.phase, Some("Succeeded" | "Failed")),
        powers: fields.powers,
        owner: fields.controller.map(|(kind, name)| {
            let hash = fields.labels.and_then(|l| l.get(TEMPLATE_HASH_LABEL)).map(String::as_str);
            Owner::of(kind, name, hash)
        }),
    })
}

/// A ServiceAccount workload identity can use: one naming a client id. Others are left out
/// (a pod using one is refused the same way as if it had none).
#[must_use]
pub fn service_account(at: Place<'_>, annotations: Option<&BTreeMap<String, String>>) -> Option<ServiceAccount> {
    let annotation = |key: &str| annotations?.get(key).filter(|v| !v.is_empty()).cloned();
    Some(ServiceAccount {
        namespace: at.namespace.to_owned(),
        name: at.name.to_owned(),
        client_id: Some(annotation(CLIENT_ID_ANNOTATION)?),
        tenant_id: annotation(TENANT_ID_ANNOTATION),
    })
}

/// A namespace's rules from its annotations: `Ok(None)` when it has none of ours, `Err` (with
/// the sentence) when one cannot be read. The API source then enforces
/// [`NamespaceRules::unreadable`] (never wider than the annotation could have meant); the
/// manifests source refuses the load.
pub fn namespace(name: &str, annotations: Option<&BTreeMap<String, String>>) -> Result<Option<NamespaceRules>, String> {
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    let set = NamespaceAnnotations {
        scope: annotation(IDENTITY_SCOPE_ANNOTATION),
        mode: annotation(MODE_ANNOTATION),
        paths: annotation(METADATA_PATHS_ANNOTATION),
    };
    if set.is_empty() {
        return Ok(None);
    }
    NamespaceRules::parse(name, set).map(Some).map_err(|e| format!("Namespace {name}: {e}"))
}

fn named(at: Place<'_>) -> Result<(), String> {
    if at.name.is_empty() {
        return Err("metadata.name is required".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: Place<'static> = Place { namespace: "app", name: "x" };

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn identities_need_a_known_type_and_a_client_id() {
        let ok = IdentitySpec { client_id: "c", resource_id: "/r", object_id: Some("o"), ..IdentitySpec::default() };
        let identity = identity(AT, &ok).unwrap();
        assert_eq!(
            (identity.kind, identity.client_id.as_str(), identity.object_id.as_deref()),
            (IdentityType::UserAssignedMsi, "c", Some("o"))
        );
        assert!(identity.service_principal.is_none());
        let table: [(IdentitySpec<'_>, &str); 4] = [
            (IdentitySpec { client_id: "", ..ok }, "spec.clientID is required"),
            (IdentitySpec { client_id: "  ", ..ok }, "spec.clientID is required"),
            (IdentitySpec { identity_type: 3, ..ok }, "spec.type must be 0, 1 or 2, not 3"),
            (IdentitySpec { identity_type: -1, ..ok }, "spec.type must be 0, 1 or 2, not -1"),
        ];
        for (spec, problem) in table {
            assert_eq!(super::identity(AT, &spec).unwrap_err(), problem, "{spec:?}");
        }
        assert_eq!(super::identity(Place { name: "", ..AT }, &ok).unwrap_err(), "metadata.name is required");
        let sp = IdentitySpec { identity_type: 1, tenant_id: "t", secret_name: Some("s"), ..ok };
        assert!(super::identity(AT, &sp).unwrap().service_principal.is_some());
    }

    #[test]
    fn bindings_need_an_identity_and_a_selector() {
        assert_eq!(binding(AT, "id", "sel").unwrap().selector, "sel");
        for (identity, selector) in [("", "sel"), ("id", ""), ("", "")] {
            assert_eq!(
                binding(AT, identity, selector).unwrap_err(),
                "spec.azureIdentity and spec.selector are required"
            );
        }
    }

    #[test]
    fn exceptions_need_labels() {
        assert_eq!(exception(AT, &labels(&[("role", "helper")])).unwrap().pod_labels["role"], "helper");
        assert_eq!(exception(AT, &BTreeMap::new()).unwrap_err(), "spec.podLabels must not be empty");
    }

    #[test]
    fn pods_default_their_service_account_as_the_api_server_does() {
        let fields =
            |sa: Option<&'static str>| PodFields { uid: "u", service_account_name: sa, ..PodFields::default() };
        for (given, meant) in [(None, "default"), (Some(""), "default"), (Some("builder"), "builder")] {
            assert_eq!(pod(AT, fields(given)).unwrap().service_account, meant, "{given:?}");
        }
        assert_eq!(pod(AT, PodFields { uid: "", ..fields(None) }).unwrap_err(), "metadata.uid is required");
        let bad_ip = PodFields { ips: vec!["10.0.0.1", "nope"], ..fields(None) };
        assert_eq!(pod(AT, bad_ip).unwrap_err(), "status.podIPs: \"nope\" is not an IP address");
        let done = PodFields { phase: Some("Succeeded"), ips: vec!["fd00::1"], ..fields(None) };
        let done = pod(AT, done).unwrap();
        assert!(done.finished);
        assert_eq!(done.ips, vec!["fd00::1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn a_pod_belongs_to_the_workload_its_controller_was_made_for() {
        let hash = labels(&[(TEMPLATE_HASH_LABEL, "7d9f8c6b5")]);
        let owner = |kind, name, labels: Option<&BTreeMap<String, String>>| {
            let fields = PodFields { uid: "u", labels, controller: Some((kind, name)), ..PodFields::default() };
            pod(AT, fields).unwrap().owner.map(|o| (o.kind, o.name, o.run))
        };
        let is = |kind: &str, name: &str, run: Option<u64>| Some((kind.to_owned(), name.to_owned(), run));
        for (kind, name, labels, expected) in [
            // A Deployment's pods, through its `ReplicaSet` of the moment.
            ("ReplicaSet", "web-7d9f8c6b5", Some(&hash), is("Deployment", "web", None)),
            ("ReplicaSet", "my-api-v2-7d9f8c6b5", Some(&hash), is("Deployment", "my-api-v2", None)),
            // A `ReplicaSet` of its own (no hash, or a name the hash does not end).
            ("ReplicaSet", "web-1", None, is("ReplicaSet", "web-1", None)),
            ("ReplicaSet", "web-1", Some(&hash), is("ReplicaSet", "web-1", None)),
            ("ReplicaSet", "-7d9f8c6b5", Some(&hash), is("ReplicaSet", "-7d9f8c6b5", None)),
            // A `CronJob`'s run, and Jobs that only look a little like one.
            ("Job", "report-29412345", None, is("CronJob", "report", Some(29_412_345))),
            ("Job", "nightly-backup-29412345", None, is("CronJob", "nightly-backup", Some(29_412_345))),
            ("Job", "migrate-42", None, is("Job", "migrate-42", None)),
            ("Job", "migrate", None, is("Job", "migrate", None)),
            ("Job", "-29412345", None, is("Job", "-29412345", None)),
            ("Job", "x-2941234a", None, is("Job", "x-2941234a", None)),
            ("Job", "x-+29412345", None, is("Job", "x-+29412345", None)),
            ("StatefulSet", "db", None, is("StatefulSet", "db", None)),
        ] {
            assert_eq!(owner(kind, name, labels), expected, "{kind} {name}");
        }
        assert_eq!(pod(AT, PodFields { uid: "u", ..PodFields::default() }).unwrap().owner, None);
    }

    #[test]
    fn only_service_accounts_naming_a_client_id_are_kept() {
        let with = labels(&[(CLIENT_ID_ANNOTATION, "c"), (TENANT_ID_ANNOTATION, "t")]);
        let kept = service_account(AT, Some(&with)).unwrap();
        assert_eq!((kept.client_id.as_deref(), kept.tenant_id.as_deref()), (Some("c"), Some("t")));
        assert!(service_account(AT, Some(&labels(&[(CLIENT_ID_ANNOTATION, "")]))).is_none());
        assert!(service_account(AT, Some(&labels(&[(TENANT_ID_ANNOTATION, "t")]))).is_none());
        assert!(service_account(AT, None).is_none());
    }
}
