//! Watched objects, deserialized lean: only what the policy reads is ever allocated.
//!
//! Lists are served from the API server's watch cache, which answers with the whole
//! collection at once whatever `limit` asks. Every object in them carries what the agent
//! never reads: `managedFields` (often larger than the object), kubectl's last-applied copy
//! in an annotation, a pod's containers and most of its status. Deserialized into the full
//! types and trimmed afterwards, a large cluster's lists outgrow the DaemonSet's memory limit
//! (docs/scale.md has the figures). Here the parser skips those fields (`IgnoredAny`
//! allocates nothing), so a list costs what is kept.
use std::{borrow::Cow, collections::BTreeMap, fmt, marker::PhantomData};

use k8s_openapi::{
    api::core::v1::{Namespace, Pod, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::Resource;
use serde::{
    de::{DeserializeOwned, IgnoredAny, MapAccess, Visitor},
    Deserialize, Deserializer,
};

use crate::{
    crds::{
        AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentitySpec, AzurePodIdentityException,
        AzurePodIdentityExceptionSpec,
    },
    policy::{
        CLIENT_ID_ANNOTATION, IDENTITY_SCOPE_ANNOTATION, METADATA_PATHS_ANNOTATION, MODE_ANNOTATION,
        TENANT_ID_ANNOTATION,
    },
    sources::convert::OBJECT_ID_ANNOTATION,
};

/// What is kept of one kind.
pub(super) trait Shape: 'static {
    /// The kind, as the API serves it.
    type Kind: Resource<DynamicType = ()>;
    /// What is kept of its `spec`.
    type Spec: DeserializeOwned + Default + Clone + fmt::Debug + Send + Sync;
    /// What is kept of its `status` ([`Unread`] for most).
    type Status: DeserializeOwned + Default + Clone + fmt::Debug + Send + Sync;
    /// Ask for metadata only (`PartialObjectMetadata`): nothing of the body is read.
    const METADATA_ONLY: bool = false;
    /// Keep `metadata.labels`.
    const LABELS: bool;
    /// The annotations kept; the others are skipped.
    const ANNOTATIONS: &'static [&'static str];
    /// Keep the controller among `metadata.ownerReferences` (its kind and name only).
    const CONTROLLER: bool = false;
}

/// An object of `S::Kind` as the agent keeps it: name, namespace, uid, resourceVersion, the
/// labels and annotations `S` names, and `S::Spec`.
#[derive(Deserialize)]
#[serde(bound = "")]
pub(super) struct Lean<S: Shape> {
    #[serde(deserialize_with = "lean_meta::<S, _>")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: S::Spec,
    #[serde(default)]
    pub status: S::Status,
    #[serde(skip)]
    shape: PhantomData<fn() -> S>,
}

impl<S: Shape> Clone for Lean<S> {
    fn clone(&self) -> Self {
        Lean {
            metadata: self.metadata.clone(),
            spec: self.spec.clone(),
            status: self.status.clone(),
            shape: PhantomData,
        }
    }
}

impl<S: Shape> fmt::Debug for Lean<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lean")
            .field("metadata", &self.metadata)
            .field("spec", &self.spec)
            .field("status", &self.status)
            .finish()
    }
}

impl<S: Shape> Resource for Lean<S> {
    type DynamicType = ();
    type Scope = <S::Kind as Resource>::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        S::Kind::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        S::Kind::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        S::Kind::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        S::Kind::plural(dt)
    }

    fn metadata_api() -> bool {
        S::METADATA_ONLY
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The metadata fields that are read at all; every other one is skipped unparsed.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", bound = "")]
struct Meta<S: Shape> {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<Annotations>,
    /// The controller, for shapes that keep it (the other references are not kept).
    #[serde(default, deserialize_with = "controller_of::<S, _>")]
    owner_references: Option<OwnerReference>,
    #[serde(skip)]
    shape: PhantomData<fn() -> S>,
}

fn lean_meta<'de, S: Shape, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    let meta = Meta::<S>::deserialize(deserializer)?;
    let annotations = meta.annotations.map(|a| a.kept(S::ANNOTATIONS)).filter(|a| !a.is_empty());
    Ok(ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        labels: meta.labels.filter(|_| S::LABELS),
        annotations,
        owner_references: meta.owner_references.map(|controller| vec![controller]),
        ..ObjectMeta::default()
    })
}

/// The controller among `metadata.ownerReferences`, for shapes that keep it; for the others
/// the value is skipped unparsed.
fn controller_of<'de, S: Shape, D: Deserializer<'de>>(value: D) -> Result<Option<OwnerReference>, D::Error> {
    if !S::CONTROLLER {
        IgnoredAny::deserialize(value)?;
        return Ok(None);
    }
    let references = crate::sources::lenient_references(value)?;
    Ok(crate::sources::controller(&references).map(controller_reference))
}

/// A controller's kind and name, where `ObjectMeta` keeps owner references (the rest of the
/// reference is not kept).
fn controller_reference((kind, name): (&str, &str)) -> OwnerReference {
    OwnerReference { kind: kind.to_owned(), name: name.to_owned(), controller: Some(true), ..OwnerReference::default() }
}

/// Annotations, their values read only where the key is one some shape keeps: kubectl's
/// last-applied copy of the object is skipped unparsed.
struct Annotations(BTreeMap<String, String>);

impl Annotations {
    fn kept(mut self, keys: &[&str]) -> BTreeMap<String, String> {
        self.0.retain(|k, _| keys.contains(&k.as_str()));
        self.0
    }
}

impl<'de> Deserialize<'de> for Annotations {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Reader;
        impl<'de> Visitor<'de> for Reader {
            type Value = Annotations;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of annotations")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Annotations, A::Error> {
                let mut kept = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if KEPT_ANNOTATIONS.contains(&key.as_str()) {
                        kept.insert(key, map.next_value::<String>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Annotations(kept))
            }
        }
        deserializer.deserialize_map(Reader)
    }
}

/// Every annotation some shape keeps (the parser reads no other value).
const KEPT_ANNOTATIONS: &[&str] = &[
    OBJECT_ID_ANNOTATION,
    CLIENT_ID_ANNOTATION,
    TENANT_ID_ANNOTATION,
    IDENTITY_SCOPE_ANNOTATION,
    MODE_ANNOTATION,
    METADATA_PATHS_ANNOTATION,
];

/// A spec nothing is read of.
#[derive(Clone, Debug, Default)]
pub(super) struct Unread;

impl<'de> Deserialize<'de> for Unread {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(deserializer).map(|_| Unread)
    }
}

/// What the policy reads of a pod's spec.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(super) struct PodSpec {
    pub service_account_name: Option<String>,
    pub host_network: Option<bool>,
    pub containers: Vec<crate::sources::Container>,
    pub init_containers: Vec<crate::sources::Container>,
    pub ephemeral_containers: Vec<crate::sources::Container>,
}

impl PodSpec {
    /// What its containers are granted.
    #[must_use]
    pub(super) fn powers(&self) -> crate::policy::Powers {
        crate::sources::powers(self.containers.iter().chain(&self.init_containers).chain(&self.ephemeral_containers))
    }
}

/// What the node backstop reads of a pod's status: its addresses.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PodStatus {
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    pub phase: Option<String>,
}

/// One entry of `status.podIPs`.
#[derive(Clone, Debug, Default, Deserialize)]
pub(super) struct PodIp {
    pub ip: String,
}

impl PodStatus {
    /// `podIPs`, else the older single `podIP`.
    #[must_use]
    pub(super) fn ips(&self) -> Vec<&str> {
        match (&self.pod_ips, &self.pod_ip) {
            (Some(ips), _) if !ips.is_empty() => ips.iter().map(|p| p.ip.as_str()).collect(),
            (_, Some(ip)) => vec![ip.as_str()],
            _ => Vec::new(),
        }
    }
}

pub(super) struct PodShape;
impl Shape for PodShape {
    type Kind = Pod;
    type Spec = PodSpec;
    type Status = PodStatus;
    const LABELS: bool = true;
    const ANNOTATIONS: &'static [&'static str] = &[];
    const CONTROLLER: bool = true;
}

pub(super) struct IdentityShape;
impl Shape for IdentityShape {
    type Status = Unread;
    type Kind = AzureIdentity;
    type Spec = AzureIdentitySpec;
    const LABELS: bool = false;
    const ANNOTATIONS: &'static [&'static str] = &[OBJECT_ID_ANNOTATION];
}

pub(super) struct BindingShape;
impl Shape for BindingShape {
    type Status = Unread;
    type Kind = AzureIdentityBinding;
    type Spec = AzureIdentityBindingSpec;
    const LABELS: bool = false;
    const ANNOTATIONS: &'static [&'static str] = &[];
}

pub(super) struct ExceptionShape;
impl Shape for ExceptionShape {
    type Status = Unread;
    type Kind = AzurePodIdentityException;
    type Spec = AzurePodIdentityExceptionSpec;
    const LABELS: bool = false;
    const ANNOTATIONS: &'static [&'static str] = &[];
}

/// ServiceAccounts, metadata only: workload identity's annotations.
pub(super) struct AccountShape;
impl Shape for AccountShape {
    type Kind = ServiceAccount;
    type Spec = Unread;
    type Status = Unread;
    const METADATA_ONLY: bool = true;
    const LABELS: bool = false;
    const ANNOTATIONS: &'static [&'static str] = &[CLIENT_ID_ANNOTATION, TENANT_ID_ANNOTATION];
}

/// Namespaces, metadata only: the rules cluster admins set in their annotations.
pub(super) struct NamespaceShape;

impl Shape for NamespaceShape {
    type Kind = Namespace;
    type Spec = Unread;
    type Status = Unread;
    const METADATA_ONLY: bool = true;
    const LABELS: bool = false;
    const ANNOTATIONS: &'static [&'static str] =
        &[IDENTITY_SCOPE_ANNOTATION, MODE_ANNOTATION, METADATA_PATHS_ANNOTATION];
}

pub(super) type LeanPod = Lean<PodShape>;
pub(super) type LeanIdentity = Lean<IdentityShape>;
pub(super) type LeanBinding = Lean<BindingShape>;
pub(super) type LeanException = Lean<ExceptionShape>;
pub(super) type LeanAccount = Lean<AccountShape>;
pub(super) type LeanNamespace = Lean<NamespaceShape>;

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn only_what_the_policy_reads_is_kept() {
        let applied = json!({"apiVersion": "v1", "kind": "ServiceAccount"}).to_string();
        let pod: LeanPod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
                         "labels": {"aadpodidbinding": "blob"},
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": applied,
                                         CLIENT_ID_ANNOTATION: "not kept on a pod"},
                         "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:metadata": {}}}],
                         "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "not-a-controller", "uid": "c"},
                                             {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "r",
                                              "controller": true, "blockOwnerDeletion": true}]},
            "spec": {"serviceAccountName": "fed", "nodeName": "node-1", "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running"}
        }))
        .unwrap();
        let expected = ObjectMeta {
            name: Some("web".into()),
            namespace: Some("shop".into()),
            uid: Some("u1".into()),
            resource_version: Some("7".into()),
            labels: Some(BTreeMap::from([("aadpodidbinding".into(), "blob".into())])),
            // Of the owner references, the controller's kind and name only.
            owner_references: Some(vec![controller_reference(("ReplicaSet", "web-1"))]),
            ..ObjectMeta::default()
        };
        assert_eq!(pod.metadata, expected);
        assert_eq!(pod.spec.service_account_name.as_deref(), Some("fed"));

        let account: LeanAccount = serde_json::from_value(json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": "fed", "namespace": "shop", "labels": {"team": "a"},
                         "annotations": {CLIENT_ID_ANNOTATION: "c1", "kubectl.kubernetes.io/last-applied-configuration": applied}}
        }))
        .unwrap();
        assert_eq!(account.metadata.labels, None);
        assert_eq!(account.metadata.annotations, Some(BTreeMap::from([(CLIENT_ID_ANNOTATION.into(), "c1".into())])));
        assert!(LeanAccount::metadata_api() && !LeanPod::metadata_api());

        let identity: LeanIdentity = serde_json::from_value(json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
            "metadata": {"name": "blob", "namespace": "shop", "annotations": {OBJECT_ID_ANNOTATION: "o1", "note": "x"}},
            "spec": {"type": 0, "clientID": "c1", "resourceID": "/subscriptions/s/…/blob"}
        }))
        .unwrap();
        assert_eq!(identity.spec.client_id, "c1");
        assert_eq!(identity.metadata.annotations, Some(BTreeMap::from([(OBJECT_ID_ANNOTATION.into(), "o1".into())])));
        assert_eq!(LeanIdentity::plural(&()), "azureidentities");
        assert_eq!(LeanIdentity::url_path(&(), None), "/apis/aadpodidentity.k8s.io/v1/azureidentities");
    }
}
