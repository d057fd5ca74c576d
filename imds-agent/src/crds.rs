//! aad-pod-identity's custom resources as Rust types: group `aadpodidentity.k8s.io`,
//! version `v1`, the same kinds, plural names and camelCase fields, so a cluster moving off
//! NMI keeps the objects it has. The CRD YAML in `deploy/crds/` is generated from these types
//! (`cargo xtask crdgen`); a test fails when the two drift.
//!
//! Not here: `AzureAssignedIdentity`, which NMI's controller (MIC) wrote in "standard" mode —
//! this agent resolves binding → identity itself.
use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Reference to the Kubernetes Secret holding a service principal's credential.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct SecretReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// An identity pods may be given: a user-assigned managed identity (type 0) or a service
/// principal with a secret (1) or a certificate (2).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureIdentity",
    plural = "azureidentities",
    namespaced,
    status = "AzureIdentityStatus",
    printcolumn = r#"{"name":"Type","type":"integer","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"ClientID","type":"string","jsonPath":".spec.clientID"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct AzureIdentitySpec {
    /// 0: user-assigned managed identity; 1: service principal (secret); 2: service
    /// principal (certificate).
    #[serde(rename = "type", default)]
    pub identity_type: i64,
    /// ARM resource id of a user-assigned identity.
    #[serde(rename = "resourceID", default, skip_serializing_if = "String::is_empty")]
    pub resource_id: String,
    #[serde(rename = "clientID", default, skip_serializing_if = "String::is_empty")]
    pub client_id: String,
    /// The Secret with a service principal's secret or certificate (types 1 and 2).
    #[serde(rename = "clientPassword", default, skip_serializing_if = "Option::is_none")]
    pub client_password: Option<SecretReference>,
    #[serde(rename = "tenantID", default, skip_serializing_if = "String::is_empty")]
    pub tenant_id: String,
    #[serde(rename = "auxiliaryTenantIDs", default, skip_serializing_if = "Vec::is_empty")]
    pub auxiliary_tenant_ids: Vec<String>,
    /// Unused (kept for compatibility).
    #[serde(rename = "adResourceID", default, skip_serializing_if = "String::is_empty")]
    pub ad_resource_id: String,
    /// Entra authority for service principals (default `https://login.microsoftonline.com/`).
    #[serde(rename = "adEndpoint", default, skip_serializing_if = "String::is_empty")]
    pub ad_endpoint: String,
    /// Unused (kept for compatibility).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct AzureIdentityStatus {
    #[serde(rename = "availableReplicas", default, skip_serializing_if = "Option::is_none")]
    pub available_replicas: Option<i32>,
}

/// Binds an `AzureIdentity` (same namespace) to pods whose `aadpodidbinding` label equals
/// `selector`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureIdentityBinding",
    plural = "azureidentitybindings",
    namespaced,
    status = "AzureIdentityBindingStatus",
    printcolumn = r#"{"name":"Identity","type":"string","jsonPath":".spec.azureIdentity"}"#,
    printcolumn = r#"{"name":"Selector","type":"string","jsonPath":".spec.selector"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct AzureIdentityBindingSpec {
    #[serde(rename = "azureIdentity", default)]
    pub azure_identity: String,
    /// Must equal the pod's `aadpodidbinding` label (string equality, not a label selector).
    #[serde(default)]
    pub selector: String,
    /// Unused (kept for compatibility).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct AzureIdentityBindingStatus {
    #[serde(rename = "availableReplicas", default, skip_serializing_if = "Option::is_none")]
    pub available_replicas: Option<i32>,
}

/// Pods of the same namespace matching any one of `podLabels` reach IMDS directly.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzurePodIdentityException",
    plural = "azurepodidentityexceptions",
    namespaced,
    status = "AzurePodIdentityExceptionStatus",
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct AzurePodIdentityExceptionSpec {
    #[serde(rename = "podLabels", default)]
    pub pod_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
pub struct AzurePodIdentityExceptionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// The three CRDs, as `deploy/crds/` holds them: (file name, YAML).
///
/// # Panics
///
/// Never in practice: a `CustomResourceDefinition` built by kube always serialises.
pub fn crd_files() -> Vec<(&'static str, String)> {
    use kube::CustomResourceExt as _;
    let render = |crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        let header = "# Generated from imds-agent/src/crds.rs by `cargo xtask crdgen`; do not edit.\n";
        let yaml = serde_saphyr::to_string(&crd).expect("a CRD always serialises");
        format!("{header}{yaml}")
    };
    vec![
        ("azureidentity.yaml", render(AzureIdentity::crd())),
        ("azureidentitybinding.yaml", render(AzureIdentityBinding::crd())),
        ("azurepodidentityexception.yaml", render(AzurePodIdentityException::crd())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed YAML (and the Helm chart's copy) is what the types generate.
    #[test]
    fn committed_crds_match_the_types() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for dir in ["deploy/crds", "deploy/helm/imds-filter/crds"] {
            for (name, yaml) in crd_files() {
                let committed = std::fs::read_to_string(root.join(dir).join(name))
                    .unwrap_or_else(|e| panic!("{dir}/{name}: {e}; run `cargo xtask crdgen`"));
                assert!(committed == yaml, "{dir}/{name} differs from the types: run `cargo xtask crdgen`");
            }
        }
    }

    #[test]
    fn names_match_aad_pod_identity() {
        use kube::Resource as _;
        assert_eq!(AzureIdentity::plural(&()), "azureidentities");
        assert_eq!(AzureIdentityBinding::plural(&()), "azureidentitybindings");
        assert_eq!(AzurePodIdentityException::plural(&()), "azurepodidentityexceptions");
        assert_eq!(AzureIdentity::api_version(&()), "aadpodidentity.k8s.io/v1");
    }

    #[test]
    fn the_examples_deserialise_into_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let identity: AzureIdentity =
            serde_saphyr::from_str(&std::fs::read_to_string(dir.join("azureidentity.yaml")).unwrap()).unwrap();
        assert_eq!(
            (identity.spec.identity_type, identity.spec.client_id.as_str()),
            (0, "6a3f2c1d-8e7b-4a5c-9d0e-1f2a3b4c5d6e")
        );
        let binding: AzureIdentityBinding =
            serde_saphyr::from_str(&std::fs::read_to_string(dir.join("azureidentitybinding.yaml")).unwrap()).unwrap();
        assert_eq!(binding.spec.selector, "blob-reader");
        let exception: AzurePodIdentityException =
            serde_saphyr::from_str(&std::fs::read_to_string(dir.join("azurepodidentityexception.yaml")).unwrap())
                .unwrap();
        assert_eq!(exception.spec.pod_labels["component"], "node-helper");
    }
}
