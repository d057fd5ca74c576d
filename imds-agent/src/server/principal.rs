//! Answering for an aad-pod-identity service principal (`AzureIdentity` types 1 and 2), as
//! NMI did: the credential comes from the Secret the identity names, the token from Entra
//! with the client-credentials grant, answered in IMDS's shape. With `auxiliaryTenantIDs`,
//! NMI answered a JSON array: the primary tenant's token first, then one per auxiliary tenant
//! — so do we.
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;

use super::{handler::answer_token, AgentState};
use crate::{
    decisions::DecisionRecord,
    imds::{ImdsError, JSON_CONTENT_TYPE},
    policy::{Identity, IdentityType, ServicePrincipal, Snapshot},
    secrets::SecretData,
    tokens::{token::unix_now, Fetch, Outcome, Redacted, Served, Source, TokenKey},
};

type Answer = Response<Full<Bytes>>;

/// The Secret key aad-pod-identity documents for a client secret; NMI took the Secret's only
/// value whatever its key, which we also accept.
const CLIENT_SECRET_KEY: &str = "clientSecret";

pub(super) async fn answer(
    identity: &Identity,
    principal: &ServicePrincipal,
    resource: &str,
    requester: &str,
    snapshot: &Snapshot,
    state: &AgentState,
    record: &mut DecisionRecord,
) -> Result<Answer, ImdsError> {
    let secret_ref = principal.secret.as_ref().ok_or_else(ImdsError::identity_not_found)?; // checked by the policy
    let secret = state.secrets.get(snapshot, secret_ref).await.map_err(|e| {
        record.reason = format!("{}; {e:#}", record.reason);
        ImdsError::bad_request(format!("The service principal's credential could not be read: {e}"))
    })?;
    let how = credential(identity.kind, &secret).map_err(|problem| {
        record.reason = format!("{}; {problem}", record.reason);
        ImdsError::bad_request(format!("The service principal's credential cannot be used: {problem}"))
    })?;
    let tenants = std::iter::once(&principal.tenant_id).chain(&principal.auxiliary_tenant_ids);
    let mut bodies = Vec::new();
    let mut served_all = Served::Cache;
    for tenant in tenants {
        let key = TokenKey {
            source: Source::ServicePrincipal {
                authority: principal.authority.clone(),
                tenant_id: tenant.clone(),
                client_id: identity.client_id.clone(),
                secret: secret_ref.clone(),
            },
            resource: resource.to_owned(),
        };
        match state.tokens.get(key, requester, how.clone()).await {
            Outcome::Token { token, served } => {
                if served != Served::Cache {
                    served_all = served;
                }
                bodies.push(token);
            }
            other => return Ok(answer_token(other, record)), // the first failure is the answer
        }
    }
    if let [only] = bodies.as_slice() {
        return Ok(answer_token(Outcome::Token { token: Arc::clone(only), served: served_all }, record));
    }
    record.token_from = Some(served_all.as_str());
    let now = unix_now();
    let array: Vec<serde_json::Value> =
        bodies.iter().map(|t| serde_json::from_slice(&t.body(now)).unwrap_or_default()).collect();
    let mut answer = Response::new(Full::new(Bytes::from(serde_json::Value::Array(array).to_string())));
    *answer.status_mut() = StatusCode::OK;
    answer.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(JSON_CONTENT_TYPE));
    Ok(answer)
}

/// The credential a Secret holds for this identity type.
fn credential(kind: IdentityType, secret: &Arc<SecretData>) -> Result<Fetch, String> {
    match kind {
        IdentityType::ServicePrincipal => {
            let value = match secret.get(CLIENT_SECRET_KEY) {
                Some(v) => v,
                None if secret.0.len() == 1 => secret.0.values().next().map(Vec::as_slice).unwrap_or_default(),
                None => {
                    return Err(format!("its Secret has {} keys and none is {CLIENT_SECRET_KEY:?}", secret.0.len()))
                }
            };
            let text = std::str::from_utf8(value).map_err(|_| "its client secret is not UTF-8".to_owned())?;
            Ok(Fetch::Secret(Redacted(text.trim_end_matches(['\r', '\n']).to_owned())))
        }
        IdentityType::ServicePrincipalCertificate => {
            if secret.get("certificate").is_none() {
                return Err("its Secret has no `certificate` key".into());
            }
            Ok(Fetch::Certificate(Arc::clone(secret)))
        }
        IdentityType::UserAssignedMsi => Err("a managed identity has no credential".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn secret(pairs: &[(&str, &str)]) -> Arc<SecretData> {
        Arc::new(SecretData(
            pairs.iter().map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec())).collect::<BTreeMap<_, _>>(),
        ))
    }

    #[test]
    fn credentials_are_read_as_nmi_read_them() {
        let s = |f: Result<Fetch, String>| match f {
            Ok(Fetch::Secret(Redacted(v))) => format!("secret {v}"),
            Ok(Fetch::Certificate(_)) => "certificate".into(),
            Ok(other) => format!("{other:?}"),
            Err(e) => format!("error: {e}"),
        };
        let sp = IdentityType::ServicePrincipal;
        assert_eq!(s(credential(sp, &secret(&[("clientSecret", "s3cret\n")]))), "secret s3cret");
        assert_eq!(s(credential(sp, &secret(&[("anything", "only-value")]))), "secret only-value");
        assert!(s(credential(sp, &secret(&[("a", "1"), ("b", "2")]))).starts_with("error: its Secret has 2 keys"));
        let cert = IdentityType::ServicePrincipalCertificate;
        assert_eq!(s(credential(cert, &secret(&[("certificate", "…"), ("password", "p")]))), "certificate");
        assert!(s(credential(cert, &secret(&[("password", "p")]))).contains("no `certificate`"));
    }
}
