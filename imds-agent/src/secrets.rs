//! Service principals' credentials: the Kubernetes Secrets their `AzureIdentity` names
//! (`clientPassword`), read only when a pod bound to that identity asks for a token.
//!
//! - With `--kube`, a Secret is read with a single `GET` (never listed or watched, so the
//!   agent's RBAC needs only `get`, which can be narrowed with `resourceNames`) and kept for
//!   [`API_TTL`], so a rotated secret is picked up within a minute.
//! - With `--manifests`, Secret documents in the directory are part of the snapshot.
//!
//! Secret values never reach logs: [`SecretData`]'s `Debug` shows key names only.
use parking_lot::Mutex;
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Secret;

use crate::policy::{SecretRef, Snapshot};

/// How long a Secret read from the API is reused.
pub(crate) const API_TTL: Duration = Duration::from_mins(1);

/// A Secret's data (decoded bytes by key).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretData(pub BTreeMap<String, Vec<u8>>);

impl std::fmt::Debug for SecretData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretData").field("keys", &self.0.keys().collect::<Vec<_>>()).finish_non_exhaustive()
    }
}

impl SecretData {
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0.get(key).map(Vec::as_slice)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Secret {0}/{1} not found")]
    NotFound(String, String),
    #[error("reading Secret {0}/{1} from the Kubernetes API")]
    Api(String, String, #[source] kube::Error),
}

/// Where Secrets come from.
pub struct SecretReader {
    api: Option<kube::Client>,
    cache: Mutex<HashMap<SecretRef, (Instant, Arc<SecretData>)>>,
}

impl SecretReader {
    /// Reads from the API (with `--kube`), else from the snapshot.
    pub fn new(api: Option<kube::Client>) -> SecretReader {
        SecretReader { api, cache: Mutex::default() }
    }

    pub async fn get(&self, snapshot: &Snapshot, secret: &SecretRef) -> Result<Arc<SecretData>, SecretError> {
        let not_found = || SecretError::NotFound(secret.namespace.clone(), secret.name.clone());
        let Some(client) = &self.api else {
            return snapshot.secret(secret).cloned().ok_or_else(not_found);
        };
        if let Some((at, data)) = self.cache.lock().get(secret) {
            if at.elapsed() < API_TTL {
                return Ok(Arc::clone(data));
            }
        }
        let api = kube::Api::<Secret>::namespaced(client.clone(), &secret.namespace);
        let found = api
            .get_opt(&secret.name)
            .await
            .map_err(|e| SecretError::Api(secret.namespace.clone(), secret.name.clone(), e))?
            .ok_or_else(not_found)?;
        let data = Arc::new(from_api(&found));
        let mut cache = self.cache.lock();
        cache.retain(|_, (at, _)| at.elapsed() < API_TTL);
        cache.insert(secret.clone(), (Instant::now(), Arc::clone(&data)));
        Ok(data)
    }
}

/// A Secret object's data; `stringData` (write-only in the API, but present in manifests)
/// wins over `data` for the same key, as the API server would merge them.
pub(crate) fn from_api(secret: &Secret) -> SecretData {
    let mut data: BTreeMap<String, Vec<u8>> =
        secret.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())).collect();
    for (k, v) in secret.string_data.iter().flatten() {
        data.insert(k.clone(), v.clone().into_bytes());
    }
    SecretData(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_never_show_in_debug_output() {
        let data = SecretData(BTreeMap::from([("clientSecret".to_owned(), b"hunter2".to_vec())]));
        let shown = format!("{data:?}");
        assert!(shown.contains("clientSecret") && !shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn string_data_merges_over_data() {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
            "data": {"a": "b2xk", "b": "Yg=="}, "stringData": {"a": "new"}}))
        .unwrap();
        let data = from_api(&secret);
        assert_eq!((data.get("a"), data.get("b")), (Some(&b"new"[..]), Some(&b"b"[..])));
    }
}
