//! Kubernetes objects for the tests' manifests, built from the types the project reads them
//! into — aad-pod-identity's custom resources ([`imds_agent::crds`]) and `k8s-openapi`'s
//! `Pod` and `ServiceAccount` — and written out as YAML by [`Manifest`].
//!
//! ```text
//! let text = Manifest::new()
//!     .with(&fixtures::identity("app", "blob", &blob))
//!     .with(&fixtures::binding("app", "blob-binding", "blob", "blob"))
//!     .with(&fixtures::pod("app", "web", &web.uid).bound_to("blob").ip(web.ip));
//! node.write_manifest("policy.yaml", text.as_str());
//! ```
use std::{collections::BTreeMap, net::IpAddr};

use imds_agent::{
    crds::{
        AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentitySpec, AzurePodIdentityException,
        AzurePodIdentityExceptionSpec, SecretReference,
    },
    sources::convert::OBJECT_ID_ANNOTATION,
};
use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, Namespace, Pod, PodIP, PodSpec, PodStatus, Secret, SecurityContext, ServiceAccount,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ByteString,
};

use crate::fake_imds::FakeIdentity;

/// The label aad-pod-identity matches against a binding's `selector`.
pub const BINDING_LABEL: &str = "aadpodidbinding";

/// Manifest text: YAML documents, each ended by `---`, as a manifests directory holds them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest(String);

impl Manifest {
    #[must_use]
    pub fn new() -> Manifest {
        Manifest::default()
    }

    /// Adds `object` as one more document.
    #[must_use]
    pub fn with(mut self, object: &impl serde::Serialize) -> Manifest {
        self.push(object);
        self
    }

    /// Adds `object` as one more document.
    pub fn push(&mut self, object: &impl serde::Serialize) {
        let yaml = serde_saphyr::to_string(object).expect("a Kubernetes object serialises");
        self.0.push_str(&yaml);
        if !yaml.ends_with('\n') {
            self.0.push('\n');
        }
        self.0.push_str("---\n");
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    #[must_use]
    pub fn into_string(self) -> String {
        self.0
    }
}

impl From<Manifest> for String {
    fn from(manifest: Manifest) -> String {
        manifest.0
    }
}

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta { name: Some(name.to_owned()), namespace: Some(namespace.to_owned()), ..ObjectMeta::default() }
}

fn string_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|&(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// The `Namespace` `name`, with these annotations (the rules cluster admins set:
/// `imds-filter.io/identity-scope`, `imds-filter.io/mode`).
#[must_use]
pub fn namespace(name: &str, annotations: &[(&str, &str)]) -> Namespace {
    let annotations = Some(string_map(annotations)).filter(|a| !a.is_empty());
    Namespace {
        metadata: ObjectMeta { name: Some(name.to_owned()), annotations, ..ObjectMeta::default() },
        ..Namespace::default()
    }
}

/// `AzureIdentity` `name`: the user-assigned managed identity `id` (type 0, its resource and
/// client ids).
#[must_use]
pub fn identity(namespace: &str, name: &str, id: &FakeIdentity) -> AzureIdentity {
    let spec = AzureIdentitySpec {
        identity_type: 0,
        resource_id: id.resource_id.clone(),
        client_id: id.client_id.clone(),
        ..AzureIdentitySpec::default()
    };
    AzureIdentity { metadata: meta(namespace, name), spec, status: None }
}

/// Like [`identity`], with its principal id known: the `imds-filter.io/object-id`
/// annotation (aad-pod-identity's CRD has no field for it), so `object_id` requests match.
#[must_use]
pub fn identity_with_object_id(namespace: &str, name: &str, id: &FakeIdentity) -> AzureIdentity {
    let mut identity = identity(namespace, name, id);
    identity.metadata.annotations = Some(string_map(&[(OBJECT_ID_ANNOTATION, &id.object_id)]));
    identity
}

/// `AzureIdentity` `name`: a service principal (`kind` 1, a client secret, or 2, a
/// certificate) of `tenant_id` (and `auxiliary` tenants), its credential in the Secret
/// `secret` = (namespace, name).
#[must_use]
pub fn service_principal(
    namespace: &str,
    name: &str,
    kind: i64,
    (client_id, tenant_id): (&str, &str),
    (secret_namespace, secret_name): (&str, &str),
    auxiliary: &[&str],
) -> AzureIdentity {
    let spec = AzureIdentitySpec {
        identity_type: kind,
        client_id: client_id.to_owned(),
        tenant_id: tenant_id.to_owned(),
        client_password: Some(SecretReference {
            name: Some(secret_name.to_owned()),
            namespace: Some(secret_namespace.to_owned()),
        }),
        auxiliary_tenant_ids: auxiliary.iter().map(|t| (*t).to_owned()).collect(),
        ..AzureIdentitySpec::default()
    };
    AzureIdentity { metadata: meta(namespace, name), spec, status: None }
}

/// An `Opaque` Secret holding `data`.
#[must_use]
pub fn secret(namespace: &str, name: &str, data: &[(&str, &[u8])]) -> Secret {
    let data = data.iter().map(|(k, v)| ((*k).to_owned(), ByteString(v.to_vec()))).collect();
    Secret { metadata: meta(namespace, name), type_: Some("Opaque".to_owned()), data: Some(data), ..Secret::default() }
}

/// `AzureIdentityBinding` `name`: identity `identity` for pods labelled `aadpodidbinding:
/// selector`.
#[must_use]
pub fn binding(namespace: &str, name: &str, identity: &str, selector: &str) -> AzureIdentityBinding {
    let spec = AzureIdentityBindingSpec {
        azure_identity: identity.to_owned(),
        selector: selector.to_owned(),
        ..AzureIdentityBindingSpec::default()
    };
    AzureIdentityBinding { metadata: meta(namespace, name), spec, status: None }
}

/// `AzurePodIdentityException` `name`: pods with any one of `pod_labels` go straight to IMDS.
#[must_use]
pub fn exception(namespace: &str, name: &str, pod_labels: &[(&str, &str)]) -> AzurePodIdentityException {
    let spec = AzurePodIdentityExceptionSpec { pod_labels: string_map(pod_labels) };
    AzurePodIdentityException { metadata: meta(namespace, name), spec, status: None }
}

/// A `ServiceAccount` annotated for workload identity: its pods get tokens for `client_id`
/// in `tenant_id`.
#[must_use]
pub fn workload_service_account(namespace: &str, name: &str, client_id: &str, tenant_id: &str) -> ServiceAccount {
    let annotations = string_map(&[
        ("azure.workload.identity/client-id", client_id),
        ("azure.workload.identity/tenant-id", tenant_id),
    ]);
    ServiceAccount {
        metadata: ObjectMeta { annotations: Some(annotations), ..meta(namespace, name) },
        ..ServiceAccount::default()
    }
}

/// A `Pod` `name` with `uid` (a manifests directory has no API server to assign one), and no
/// labels, spec or status yet.
#[must_use]
pub fn pod(namespace: &str, name: &str, uid: &str) -> PodBuilder {
    PodBuilder(Pod { metadata: ObjectMeta { uid: Some(uid.to_owned()), ..meta(namespace, name) }, ..Pod::default() })
}

/// A container `name` running `image`, with no security context of its own.
#[must_use]
pub fn container(name: &str, image: &str) -> Container {
    Container { name: name.to_owned(), image: Some(image.to_owned()), ..Container::default() }
}

/// A container that drops every capability (`securityContext.capabilities.drop: [ALL]`).
#[must_use]
pub fn container_dropping_all(name: &str, image: &str) -> Container {
    let capabilities = Capabilities { drop: Some(vec!["ALL".to_owned()]), add: None };
    let security_context = SecurityContext { capabilities: Some(capabilities), ..SecurityContext::default() };
    Container { security_context: Some(security_context), ..container(name, image) }
}

/// A [`Pod`] being described; see [`pod`]. Serialises as the pod.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(transparent)]
pub struct PodBuilder(Pod);

impl PodBuilder {
    /// Adds the label `key: value`.
    #[must_use]
    pub fn label(mut self, key: &str, value: &str) -> PodBuilder {
        self.0.metadata.labels.get_or_insert_with(BTreeMap::new).insert(key.to_owned(), value.to_owned());
        self
    }

    /// Labelled for the bindings whose selector is `selector` (`aadpodidbinding`).
    #[must_use]
    pub fn bound_to(self, selector: &str) -> PodBuilder {
        self.label(BINDING_LABEL, selector)
    }

    /// Runs as `service_account` (`spec.serviceAccountName`).
    #[must_use]
    pub fn service_account(mut self, service_account: &str) -> PodBuilder {
        self.spec().service_account_name = Some(service_account.to_owned());
        self
    }

    /// Shares the node's network namespace (`spec.hostNetwork`).
    #[must_use]
    pub fn host_network(mut self) -> PodBuilder {
        self.spec().host_network = Some(true);
        self
    }

    /// Adds a container (see [`container`]).
    #[must_use]
    pub fn container(mut self, container: Container) -> PodBuilder {
        self.spec().containers.push(container);
        self
    }

    /// Its address, as the API server reports a running pod's (`status.podIPs`); `None`, a
    /// pod without an address of its own, leaves the status alone.
    #[must_use]
    pub fn ip(mut self, ip: Option<IpAddr>) -> PodBuilder {
        if let Some(ip) = ip {
            self.status().pod_ips.get_or_insert_with(Vec::new).push(PodIP { ip: ip.to_string() });
        }
        self
    }

    /// `status.phase` (`Succeeded`: a finished Job's pod).
    #[must_use]
    pub fn phase(mut self, phase: &str) -> PodBuilder {
        self.status().phase = Some(phase.to_owned());
        self
    }

    #[must_use]
    pub fn build(self) -> Pod {
        self.0
    }

    fn spec(&mut self) -> &mut PodSpec {
        self.0.spec.get_or_insert_with(PodSpec::default)
    }

    fn status(&mut self) -> &mut PodStatus {
        self.0.status.get_or_insert_with(PodStatus::default)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn documents(manifest: &Manifest) -> Vec<serde_json::Value> {
        serde_saphyr::from_multiple(manifest.as_str()).expect("the manifest parses")
    }

    /// The YAML reads back as the objects it was written from.
    #[test]
    fn documents_read_back_as_the_objects() {
        let blob = FakeIdentity::named("blob");
        let web = pod("app", "web", "0123")
            .label("azure.workload.identity/use", "true")
            .bound_to("blob")
            .service_account("fed")
            .host_network()
            .container(container_dropping_all("app", "app:1"))
            .ip(Some("fd00::1".parse().unwrap()))
            .phase("Succeeded");
        let manifest = Manifest::new()
            .with(&identity("app", "blob", &blob))
            .with(&binding("app", "blob-binding", "blob", "blob"))
            .with(&exception("app", "helpers", &[("role", "helper")]))
            .with(&workload_service_account("app", "fed", "5f2c6b1e", "72f988bf"))
            .with(&web);
        let text = manifest.as_str();
        assert!(text.starts_with("apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\n"), "{text}");
        let docs = documents(&manifest);
        // Four `---`-ended documents and what follows the last separator.
        assert!(docs.len() == 5 || docs.len() == 6, "{docs:?}");
        // The custom resources compare by their metadata and spec (they have no `PartialEq`).
        macro_rules! read_back {
            ($i:expr, $kind:ty, $want:expr) => {{
                let read: $kind = serde_json::from_value(docs[$i].clone()).expect(stringify!($kind));
                let want = $want;
                assert_eq!((read.metadata, read.spec), (want.metadata, want.spec));
            }};
        }
        read_back!(0, AzureIdentity, identity("app", "blob", &blob));
        read_back!(1, AzureIdentityBinding, binding("app", "blob-binding", "blob", "blob"));
        read_back!(2, AzurePodIdentityException, exception("app", "helpers", &[("role", "helper")]));
        assert_eq!(
            serde_json::from_value::<ServiceAccount>(docs[3].clone()).unwrap(),
            workload_service_account("app", "fed", "5f2c6b1e", "72f988bf")
        );
        assert_eq!(serde_json::from_value::<Pod>(docs[4].clone()).unwrap(), web.build());
        assert_eq!(docs[4]["metadata"]["labels"]["azure.workload.identity/use"], "true", "a string, not a bool");
        assert_eq!(docs[0]["spec"]["type"], 0);
    }

    /// The agent's manifests source reads what the builders say.
    #[test]
    fn the_agent_reads_the_builders() {
        let blob = FakeIdentity::named("blob");
        let manifest = Manifest::new()
            .with(&identity_with_object_id("app", "blob", &blob))
            .with(&identity("app", "table", &FakeIdentity::named("table")))
            .with(&binding("app", "blob-binding", "blob", "sel"))
            .with(&exception("app", "helpers", &[("role", "helper")]))
            .with(&pod("app", "web", "uid-web").bound_to("sel").ip(Some("10.0.0.2".parse().unwrap())))
            .with(&pod("app", "helper", "uid-helper").label("role", "helper").phase("Succeeded"))
            .with(&pod("app", "tool", "uid-tool").host_network().container(container("tool", "tool:1")));
        let snapshot = imds_agent::sources::manifests::parse(Path::new("fixtures.yaml"), manifest.as_str())
            .unwrap_or_else(|e| panic!("{e:#}\n{}", manifest.as_str()));
        assert_eq!(snapshot.sizes(), (3, 2, 1, 1));
        let web = snapshot.pod("uid-web").expect("web");
        assert_eq!((web.namespace.as_str(), web.name.as_str()), ("app", "web"));
        assert_eq!(web.ips, ["10.0.0.2".parse::<IpAddr>().unwrap()]);
        let bound = snapshot.bound_identities(web);
        assert_eq!(bound.len(), 1, "{bound:?}");
        assert_eq!((bound[0].0.client_id.as_str(), bound[0].1), (blob.client_id.as_str(), "blob-binding"));
        assert_eq!(bound[0].0.object_id.as_deref(), Some(blob.object_id.as_str()));
        let table = snapshot.identities().find(|i| i.name == "table").expect("table");
        assert_eq!(
            (table.resource_id.as_str(), table.object_id.as_deref()),
            (FakeIdentity::named("table").resource_id.as_str(), None)
        );
        let helper = snapshot.pod("uid-helper").expect("helper");
        assert!(helper.finished && snapshot.exception_for(helper).is_some(), "{helper:?}");
        let tool = snapshot.pod("uid-tool").expect("tool");
        assert!(tool.host_network && !web.host_network);
    }
}
