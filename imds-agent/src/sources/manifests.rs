//! Policy from a directory of Kubernetes manifests (`--manifests DIR`).
//!
//! Every `*.yaml`/`*.yml` file may hold several documents. Pods (`v1`, which must carry
//! `metadata.uid`, since there is no API server to assign one), ServiceAccounts (for workload
//! identity's annotations) and aad-pod-identity's
//! `AzureIdentity`, `AzureIdentityBinding` and `AzurePodIdentityException`
//! (`aadpodidentity.k8s.io/v1`) are read exactly as `kubectl apply` would take them; other
//! kinds are ignored. A document without a namespace is in `default`, as with kubectl.
//!
//! A file that does not parse, or a document missing what the policy needs, makes the whole
//! load fail with the file, the document and (for YAML errors) the line and column — the
//! caller then keeps the policy it had.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::Watcher as _;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use base64::Engine as _;

use super::convert::{self, Place, OBJECT_ID_ANNOTATION};
use crate::{
    policy::{Binding, Exception, Identity, Pod, PolicySettings, SecretRef, ServiceAccount, Snapshot},
    secrets::SecretData,
};

const AAD_POD_IDENTITY: &str = "aadpodidentity.k8s.io/v1";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading {}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Yaml { path: PathBuf, message: String },
    #[error("{}, document {document} ({kind} {name:?}): {problem}", path.display())]
    Invalid { path: PathBuf, document: usize, kind: String, name: String, problem: String },
}

/// The fields of any document we read. One flat `spec` covers the four kinds, so parsing
/// stays typed (and YAML errors keep their positions) without a generic value tree.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Document {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: Spec,
    status: Status,
    // Secret
    data: BTreeMap<String, String>,
    string_data: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Metadata {
    name: String,
    namespace: Option<String>,
    uid: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    #[serde(rename = "ownerReferences", deserialize_with = "super::lenient_references")]
    owner_references: Vec<super::OwnerReference>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SecretReference {
    name: Option<String>,
    namespace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Spec {
    // AzureIdentity
    #[serde(rename = "type")]
    identity_type: Option<i64>,
    #[serde(rename = "resourceID")]
    resource_id: String,
    #[serde(rename = "clientID")]
    client_id: String,
    #[serde(rename = "tenantID")]
    tenant_id: String,
    #[serde(rename = "clientPassword")]
    client_password: SecretReference,
    #[serde(rename = "auxiliaryTenantIDs")]
    auxiliary_tenant_ids: Vec<String>,
    #[serde(rename = "adEndpoint")]
    ad_endpoint: String,
    // AzureIdentityBinding
    #[serde(rename = "azureIdentity")]
    azure_identity: String,
    selector: String,
    // AzurePodIdentityException
    #[serde(rename = "podLabels")]
    pod_labels: BTreeMap<String, String>,
    // Pod
    #[serde(rename = "serviceAccountName")]
    service_account_name: String,
    #[serde(rename = "hostNetwork")]
    host_network: bool,
    containers: Vec<super::Container>,
    #[serde(rename = "initContainers")]
    init_containers: Vec<super::Container>,
    #[serde(rename = "ephemeralContainers")]
    ephemeral_containers: Vec<super::Container>,
}

/// A pod's `status`: its addresses, as the API server reports them.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Status {
    #[serde(rename = "podIPs")]
    pod_ips: Vec<PodIp>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    phase: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PodIp {
    ip: String,
}

impl Status {
    /// `podIPs`, else `podIP`.
    fn ips(&self) -> Vec<&str> {
        if self.pod_ips.is_empty() {
            self.pod_ip.iter().map(String::as_str).collect()
        } else {
            self.pod_ips.iter().map(|p| p.ip.as_str()).collect()
        }
    }
}

/// Everything the manifests in `dir` say, as one snapshot.
pub fn load_dir(dir: &Path) -> Result<Snapshot, ManifestError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ManifestError::Io { path, source }
    };
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml") && p.is_file())
        .collect();
    files.sort();
    let mut parts = Parts::default();
    for file in files {
        let text = fs::read_to_string(&file).map_err(io(&file))?;
        parts.add_file(&file, &text)?;
    }
    Ok(parts.into_snapshot())
}

/// What one manifests file says, as a snapshot (`name` is only for error messages). The
/// fuzzer's way in.
pub fn parse(name: &Path, text: &str) -> Result<Snapshot, ManifestError> {
    let mut parts = Parts::default();
    parts.add_file(name, text)?;
    Ok(parts.into_snapshot())
}

/// Changes arriving this close together are one reload (editors write in several steps).
const SETTLE: Duration = Duration::from_millis(20);

/// Watches `dir` and publishes a new snapshot on `tx` after every change that loads; a
/// change that does not load is logged (once per distinct error) and the previous policy
/// stays in force. Returns the watcher, which must be kept alive.
pub fn watch(
    dir: &Path,
    settings: PolicySettings,
    tx: watch::Sender<Arc<Snapshot>>,
    status: Arc<crate::telemetry::SourceStatus>,
) -> notify::Result<notify::RecommendedWatcher> {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let _ = events_tx.send(event);
    })?;
    // Non-recursive: a ConfigMap mount swaps its `..data` link in this very directory.
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    let dir = dir.to_owned();
    tokio::spawn(async move {
        let mut last_error = None;
        while events.recv().await.is_some() {
            tokio::time::sleep(SETTLE).await;
            while events.try_recv().is_ok() {}
            let loaded = {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || load_dir(&dir)).await
            };
            match loaded {
                Ok(Ok(snapshot)) => {
                    last_error = None;
                    let (pods, identities, bindings, exceptions) = snapshot.sizes();
                    tracing::info!(pods, identities, bindings, exceptions, "manifests reloaded");
                    tx.send_replace(Arc::new(snapshot.with_settings(settings.clone())));
                    status.loaded();
                }
                Ok(Err(e)) => {
                    let message = format!("{:#}", anyhow::Error::from(e));
                    status.failed(message.clone());
                    if last_error.as_ref() != Some(&message) {
                        tracing::error!(error = %message, "manifests do not load; the previous policy stays in force");
                        last_error = Some(message);
                    }
                }
                Err(e) => tracing::error!(error = %e, "manifest reload task failed"),
            }
        }
    });
    Ok(watcher)
}

#[derive(Default)]
struct Parts {
    pods: Vec<Pod>,
    identities: Vec<Identity>,
    bindings: Vec<Binding>,
    exceptions: Vec<Exception>,
    service_accounts: Vec<ServiceAccount>,
    secrets: Vec<(SecretRef, SecretData)>,
    namespaces: Vec<crate::policy::NamespaceRules>,
}

/// Whether the parser stopped at its document limit (its guard against separator storms).
fn too_many_documents(mut e: &serde_saphyr::Error) -> bool {
    use serde_saphyr::{budget::BudgetBreach, Error};
    while let Error::WithSnippet { error, .. } = e {
        e = error;
    }
    matches!(e, Error::Budget { breach: BudgetBreach::Documents { .. }, .. })
}

impl Parts {
    fn into_snapshot(self) -> Snapshot {
        Snapshot::new(self.pods, self.identities, self.bindings, self.exceptions)
            .with_service_accounts(self.service_accounts)
            .with_secrets(self.secrets)
            .with_namespaces(self.namespaces)
    }

    fn add_file(&mut self, path: &Path, text: &str) -> Result<(), ManifestError> {
        let documents: Vec<Document> = serde_saphyr::from_multiple(text).map_err(|e| {
            let mut message = e.to_string();
            if too_many_documents(&e) {
                message.push_str("\na manifest file holds at most 1,024 documents: split it into several files");
            }
            ManifestError::Yaml { path: path.to_owned(), message }
        })?;
        for (i, doc) in documents.into_iter().enumerate() {
            let (kind, doc_name) = (doc.kind.clone(), doc.metadata.name.clone());
            let invalid = |problem: &str| ManifestError::Invalid {
                path: path.to_owned(),
                document: i + 1,
                kind: kind.clone(),
                name: doc_name.clone(),
                problem: problem.to_owned(),
            };
            let known = matches!(
                (doc.api_version.as_str(), doc.kind.as_str()),
                ("v1", "Pod" | "ServiceAccount" | "Secret" | "Namespace")
                    | (AAD_POD_IDENTITY, "AzureIdentity" | "AzureIdentityBinding" | "AzurePodIdentityException")
            );
            if !known {
                continue;
            }
            if doc.metadata.name.is_empty() {
                return Err(invalid("metadata.name is required"));
            }
            let namespace = doc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            let name = doc.metadata.name.clone();
            self.add_document(&doc, namespace, name).map_err(|problem| invalid(&problem))?;
        }
        Ok(())
    }

    /// One known document; `Err` says what is wrong with it.
    fn add_document(&mut self, doc: &Document, namespace: String, name: String) -> Result<(), String> {
        let at = Place { namespace: &namespace, name: &name };
        let spec = &doc.spec;
        match doc.kind.as_str() {
            "Pod" => {
                let powers = super::powers(
                    spec.containers.iter().chain(&spec.init_containers).chain(&spec.ephemeral_containers),
                );
                let fields = convert::PodFields {
                    uid: &doc.metadata.uid,
                    labels: Some(&doc.metadata.labels),
                    service_account_name: Some(&spec.service_account_name),
                    ips: doc.status.ips(),
                    host_network: spec.host_network,
                    phase: Some(&doc.status.phase),
                    powers,
                    controller: super::controller(&doc.metadata.owner_references),
                };
                self.pods.push(convert::pod(at, fields).map_err(|e| uid_hint(&e))?);
            }
            "Secret" => self.secrets.push((SecretRef { namespace, name }, secret_data(doc)?)),
            // Cluster-scoped: its name is the namespace its rules are for.
            "Namespace" => self.namespaces.extend(convert::namespace(&name, Some(&doc.metadata.annotations))?),
            "ServiceAccount" => {
                self.service_accounts.extend(convert::service_account(at, Some(&doc.metadata.annotations)));
            }
            "AzureIdentity" => {
                let identity = convert::IdentitySpec {
                    identity_type: spec.identity_type.unwrap_or(0),
                    client_id: &spec.client_id,
                    resource_id: &spec.resource_id,
                    tenant_id: &spec.tenant_id,
                    secret_name: spec.client_password.name.as_deref(),
                    secret_namespace: spec.client_password.namespace.as_deref(),
                    auxiliary_tenant_ids: &spec.auxiliary_tenant_ids,
                    ad_endpoint: &spec.ad_endpoint,
                    object_id: doc.metadata.annotations.get(OBJECT_ID_ANNOTATION).map(String::as_str),
                };
                self.identities.push(convert::identity(at, &identity)?);
            }
            "AzureIdentityBinding" => {
                self.bindings.push(convert::binding(at, &spec.azure_identity, &spec.selector)?);
            }
            _ => self.exceptions.push(convert::exception(at, &spec.pod_labels)?),
        }
        Ok(())
    }
}

/// A pod here has no API server to give it a uid: say so.
fn uid_hint(problem: &str) -> String {
    if problem == "metadata.uid is required" {
        format!("{problem} (there is no API server to assign one)")
    } else {
        problem.to_owned()
    }
}

/// A Secret's `data` (base64) and `stringData`, merged as the API server would.
fn secret_data(doc: &Document) -> Result<SecretData, String> {
    let mut data = BTreeMap::new();
    for (key, value) in &doc.data {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(value.split_whitespace().collect::<String>())
            .map_err(|e| format!("data.{key} is not base64: {e}"))?;
        data.insert(key.clone(), decoded);
    }
    for (key, value) in &doc.string_data {
        data.insert(key.clone(), value.clone().into_bytes());
    }
    Ok(SecretData(data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Decision, Selector};

    /// aad-pod-identity's own examples, unchanged, plus pods.
    const EXAMPLE: &str = r#"
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentity
metadata:
  name: demo-identity
  namespace: app
  annotations:
    imds-filter.io/object-id: 00000000-0000-0000-0000-0000000000ob
spec:
  type: 0
  resourceID: /subscriptions/sub/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/demo
  clientID: 11111111-1111-1111-1111-111111111111
---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentityBinding
metadata:
  name: demo-binding
  namespace: app
spec:
  azureIdentity: demo-identity
  selector: demo
---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzurePodIdentityException
metadata:
  name: helpers
  namespace: app
spec:
  podLabels:
    role: node-helper
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: app
  uid: 8d3b1f8e-7c1a-4b5e-9f2d-0a1b2c3d4e5f
  labels:
    aadpodidbinding: demo
spec:
  containers: [{name: web, image: nginx}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
"#;

    fn load(files: &[(&str, &str)]) -> Result<Snapshot, ManifestError> {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            fs::write(dir.path().join(name), text).unwrap();
        }
        load_dir(dir.path())
    }

    #[test]
    fn aad_pod_identity_manifests_apply_unchanged() {
        let snap = load(&[("example.yaml", EXAMPLE), ("notes.txt", "not yaml: [")]).unwrap();
        assert_eq!(snap.sizes(), (1, 1, 1, 1));
        match snap.decide(
            "8d3b1f8e-7c1a-4b5e-9f2d-0a1b2c3d4e5f",
            Some(&Selector::ObjectId("00000000-0000-0000-0000-0000000000OB".into())),
        ) {
            Decision::Allow { identity, binding, .. } => {
                assert_eq!((identity.name.as_str(), binding), ("demo-identity", "demo-binding"));
                assert_eq!(identity.client_id, "11111111-1111-1111-1111-111111111111");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn namespace_defaults_to_default() {
        let snap = load(&[("p.yml", "apiVersion: v1\nkind: Pod\nmetadata: {name: p, uid: u1}\n")]).unwrap();
        assert_eq!(snap.pod("u1").unwrap().namespace, "default");
    }

    #[test]
    fn a_pods_controller_is_read_leniently() {
        let pod = |uid: &str, references: &str| {
            format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p-{uid}\n  uid: {uid}\n  ownerReferences: {references}\n---\n")
        };
        let text = [
            pod("u-job", "[{apiVersion: batch/v1, kind: Job, name: report-29000000, uid: j, controller: true}]"),
            pod("u-owned", "[{kind: ConfigMap, name: c}]"), // not a controller
            pod("u-null", "null"),
            pod("u-odd", "[{kind: Job, name: x, controller: \"yes\"}]"),
            pod("u-scalar", "everything"),
        ]
        .concat();
        let snap = load(&[("p.yaml", &text)]).expect("odd ownerReferences never refuse a pod");
        let owner = |uid: &str| snap.pod(uid).unwrap().owner.as_ref().map(|o| (o.kind.clone(), o.name.clone(), o.run));
        assert_eq!(owner("u-job"), Some(("CronJob".into(), "report".into(), Some(29_000_000))));
        for uid in ["u-owned", "u-null", "u-odd", "u-scalar"] {
            assert_eq!(owner(uid), None, "{uid}");
        }
    }

    #[test]
    fn errors_name_the_file_the_document_and_the_position() {
        let err = load(&[("a.yaml", EXAMPLE), ("b.yaml", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [oops\n")])
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("b.yaml") && msg.contains("line"), "{msg}");

        let missing_uid = "---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: nouid}\n";
        let msg = load(&[("c.yaml", missing_uid)]).unwrap_err().to_string();
        assert!(msg.contains("c.yaml, document 2 (Pod \"nouid\"): metadata.uid is required"), "{msg}");

        let bad_type = "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata: {name: i}\nspec: {type: 7, clientID: c}\n";
        let msg = load(&[("d.yaml", bad_type)]).unwrap_err().to_string();
        assert!(msg.contains("spec.type must be 0, 1 or 2"), "{msg}");

        let wrong_shape = "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzurePodIdentityException\nmetadata: {name: e}\nspec:\n  podLabels: [a, b]\n";
        let msg = load(&[("e.yaml", wrong_shape)]).unwrap_err().to_string();
        assert!(msg.contains("e.yaml") && msg.contains("line 5"), "{msg}");

        let too_many = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: s}\n---\n".repeat(1_100);
        let msg = load(&[("f.yaml", &too_many)]).unwrap_err().to_string();
        assert!(msg.contains("f.yaml") && msg.contains("split it into several files"), "{msg}");
    }
}
