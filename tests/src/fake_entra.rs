//! A fake Microsoft Entra ID token endpoint for tests: the real one cannot be reached here.
//! It follows the Microsoft identity platform's client-credentials protocol:
//!
//! - `POST /{tenant}/oauth2/v2.0/token`, form-encoded, client-credentials grant: it checks
//!   `grant_type`, `client_id`, `scope` (must end in `/.default`) and the credential —
//!   `client_assertion_type` + `client_assertion`, or `client_secret`;
//! - applications are registered with the fake, each with its tenant and one credential: a
//!   federated credential (issuer-less here: it checks the assertion's `sub` and `aud` claims,
//!   not its signature — the real Entra checks that against the cluster's OIDC issuer), a
//!   client secret, or a certificate — whose assertions it verifies as Entra does: `RS256`
//!   signature by the certificate's key, `x5t` its SHA-1 thumbprint, `aud` this token
//!   endpoint, `iss` = `sub` = the client id, within `nbf`…`exp`;
//! - success: `token_type`, `expires_in` and `ext_expires_in` as **numbers**, `access_token`,
//!   no `expires_on`; the token reads `entra-token:<client id>:<scope>` so tests can tell
//!   whose it is;
//! - errors: `error`, `error_description` (with its AADSTS code), `error_codes`, `timestamp`,
//!   `trace_id`, `correlation_id`, with Entra's statuses;
//! - it records every form it receives and can be told to fail.
use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::http_server::HttpServer;

/// `client_assertion_type` for JWT assertions.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Lifetime of the tokens the fake issues.
pub const EXPIRES_IN: u64 = 3599;

/// How an application proves itself.
#[derive(Clone, Debug)]
pub enum AppCredential {
    /// Workload identity: an assertion whose `sub` is this and whose `aud` contains
    /// `api://AzureADTokenExchange`.
    Federated {
        subject: String,
    },
    Secret(String),
    /// A certificate: its RSA public key (PKCS#1 DER) and its `x5t` (base64url SHA-1 of the
    /// certificate's DER).
    Certificate {
        public_key: Vec<u8>,
        x5t: String,
    },
}

impl AppCredential {
    /// A certificate credential from the certificate's DER and its public key's PKCS#1 DER.
    pub fn certificate(certificate_der: &[u8], public_key: Vec<u8>) -> AppCredential {
        let thumbprint = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, certificate_der);
        AppCredential::Certificate {
            public_key,
            x5t: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(thumbprint.as_ref()),
        }
    }
}

/// One registered application.
#[derive(Clone, Debug)]
pub struct App {
    pub tenant: String,
    pub client_id: String,
    pub credential: AppCredential,
}

/// One token request, as received.
#[derive(Clone, Debug)]
pub struct EntraRequest {
    pub tenant: String,
    pub form: HashMap<String, String>,
}

#[derive(Default)]
struct State {
    apps: Vec<App>,
    requests: Vec<EntraRequest>,
    fail: Option<u16>,
}

/// The fake, serving until dropped.
pub struct FakeEntra {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _server: HttpServer,
}

/// The token the fake issues to `client_id` for `scope`.
pub fn entra_token_for(client_id: &str, scope: &str) -> String {
    format!("entra-token:{client_id}:{scope}")
}

impl FakeEntra {
    pub fn serve(listener: TcpListener, apps: Vec<App>) -> FakeEntra {
        let state = Arc::new(Mutex::new(State { apps, ..State::default() }));
        let shared = Arc::clone(&state);
        let server = HttpServer::serve(listener, move |_, req| {
            let state = Arc::clone(&shared);
            async move { answer(&state, req).await }
        });
        FakeEntra { addr: server.addr, state, _server: server }
    }

    /// The authority URL to give the agent.
    pub fn authority(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Every token request received.
    pub fn requests(&self) -> Vec<EntraRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Every request gets this status (429, 500, 503…) until `None`.
    pub fn fail_with(&self, status: Option<u16>) {
        self.state.lock().unwrap().fail = status;
    }
}

fn respond(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json; charset=utf-8"));
    r
}

/// Entra's error shape.
fn error(status: StatusCode, error: &str, code: u32, text: &str) -> Response<Full<Bytes>> {
    respond(
        status,
        &json!({"error": error, "error_description": format!("AADSTS{code}: {text} Trace ID: 0 Correlation ID: 0 Timestamp: 2026-11-26 00:00:00Z"),
                "error_codes": [code], "timestamp": "2026-11-26 00:00:00Z",
                "trace_id": "00000000-0000-0000-0000-000000000000", "correlation_id": "00000000-0000-0000-0000-000000000000"}),
    )
}

/// Checks a certificate-signed client assertion as Entra does; its claims, or the AADSTS code
/// and text of the refusal.
pub fn verify_assertion(
    jwt: &str,
    public_key: &[u8],
    x5t: &str,
    client_id: &str,
    audience: &str,
) -> Result<Value, (u32, String)> {
    let malformed = || (50_027, "JWT token is invalid or malformed.".to_owned());
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, payload, signature] = parts.as_slice() else { return Err(malformed()) };
    let decode = |p: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).map_err(|_| malformed());
    let header: Value = serde_json::from_slice(&decode(header)?).map_err(|_| malformed())?;
    let claims: Value = serde_json::from_slice(&decode(payload)?).map_err(|_| malformed())?;
    if header["alg"] != "RS256" || header["x5t"] != x5t {
        return Err((
            700_027,
            "The certificate with identifier used to sign the client assertion is not registered on application."
                .into(),
        ));
    }
    let signed = format!("{}.{}", parts[0], parts[1]);
    ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, public_key)
        .verify(signed.as_bytes(), &decode(signature)?)
        .map_err(|_| (700_027, "Client assertion contains an invalid signature.".to_owned()))?;
    if claims["aud"] != audience {
        return Err((700_016, format!("The assertion's audience is not {audience}.")));
    }
    if claims["iss"] != client_id || claims["sub"] != client_id {
        return Err((700_021, "Client assertion application identifier doesn't match 'client_id' parameter.".into()));
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (nbf, exp) = (claims["nbf"].as_u64().unwrap_or(0), claims["exp"].as_u64().unwrap_or(0));
    if nbf > now + 300 || exp <= now {
        return Err((700_024, "Client assertion is not within its valid time range.".into()));
    }
    Ok(claims)
}

/// The claims of a JWT (unverified).
pub fn jwt_claims(jwt: &str) -> Option<Value> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

async fn answer(state: &Mutex<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let host = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
    let Some(tenant) = path.strip_suffix("/oauth2/v2.0/token").map(|t| t.trim_start_matches('/').to_owned()) else {
        return error(StatusCode::NOT_FOUND, "invalid_request", 90_002, "Tenant or endpoint not found.");
    };
    if req.method() != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            900_561,
            "The endpoint only accepts POST requests.",
        );
    }
    let form_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let body = req.into_body().collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let (apps, fail) = {
        let mut s = state.lock().unwrap();
        s.requests.push(EntraRequest { tenant: tenant.clone(), form: form.clone() });
        (s.apps.clone(), s.fail)
    };
    if let Some(code) = fail {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(status, "temporarily_unavailable", 50_196, "Injected failure.");
    }
    if !form_type {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900_144,
            "The request body must contain the following parameter: 'grant_type'.",
        );
    }
    let field = |name: &str| form.get(name).filter(|v| !v.is_empty());
    match field("grant_type").map(String::as_str) {
        Some("client_credentials") => {}
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70_003,
                "The app requested an unsupported grant type.",
            )
        }
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900_144,
                "The request body must contain the following parameter: 'grant_type'.",
            )
        }
    }
    let Some(client_id) = field("client_id") else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900_144,
            "The request body must contain the following parameter: 'client_id'.",
        );
    };
    let Some(scope) = field("scope").filter(|s| s.ends_with("/.default")) else {
        return error(StatusCode::BAD_REQUEST, "invalid_scope", 1_002_012, "The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier.");
    };
    let Some(app) = apps.iter().find(|a| a.client_id.eq_ignore_ascii_case(client_id) && a.tenant == tenant) else {
        return error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700_016,
            "Application was not found in the directory.",
        );
    };
    let audience = format!("http://{host}/{tenant}/oauth2/v2.0/token");
    if let Some(refusal) = refuse_credential(app, &form, &audience) {
        return refusal;
    }
    respond(
        StatusCode::OK,
        &json!({"token_type": "Bearer", "expires_in": EXPIRES_IN, "ext_expires_in": EXPIRES_IN,
                "access_token": entra_token_for(&app.client_id, scope)}),
    )
}

/// Checks the request's credential against the application's: `None` if it holds, else
/// Entra's refusal.
fn refuse_credential(app: &App, form: &HashMap<String, String>, audience: &str) -> Option<Response<Full<Bytes>>> {
    let field = |name: &str| form.get(name).filter(|v| !v.is_empty());
    let refused = |status, error_code, code, text| Some(error(status, error_code, code, text));
    match (&app.credential, field("client_assertion_type"), field("client_assertion"), field("client_secret")) {
        (AppCredential::Federated { subject }, Some(kind), Some(assertion), None) if kind == JWT_BEARER => {
            let claims = jwt_claims(assertion).unwrap_or_default();
            let audience_ok = claims["aud"] == "api://AzureADTokenExchange"
                || claims["aud"].as_array().is_some_and(|a| a.iter().any(|v| v == "api://AzureADTokenExchange"));
            if audience_ok && claims["sub"] == subject.as_str() {
                None
            } else {
                refused(
                    StatusCode::BAD_REQUEST,
                    "invalid_client",
                    70_021,
                    "No matching federated identity record found for presented assertion.",
                )
            }
        }
        (AppCredential::Secret(expected), None, None, Some(secret)) if secret == expected => None,
        (AppCredential::Certificate { public_key, x5t }, Some(kind), Some(assertion), None) if kind == JWT_BEARER => {
            verify_assertion(assertion, public_key, x5t, &app.client_id, audience)
                .err()
                .map(|(code, text)| error(StatusCode::UNAUTHORIZED, "invalid_client", code, &text))
        }
        (_, Some(kind), _, _) if kind != JWT_BEARER => {
            refused(StatusCode::BAD_REQUEST, "invalid_request", 700_024, "Client assertion type is not supported.")
        }
        _ => refused(StatusCode::UNAUTHORIZED, "invalid_client", 7_000_215, "Invalid client secret provided."),
    }
}

#[cfg(test)]
mod tests {
    //! The fake against the agent's own Entra client, and its refusals against the table.
    use imds_agent::tokens::entra::{ClientCredentials, Credential, Entra};

    use super::*;

    fn jwt(claims: &Value) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!("{}.{}.{}", b64(br#"{"alg":"RS256"}"#), b64(claims.to_string().as_bytes()), b64(b"sig"))
    }

    #[tokio::test]
    async fn answers_and_refusals_follow_entras_shapes() {
        let fake = FakeEntra::serve(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            vec![
                App {
                    tenant: "t1".into(),
                    client_id: "wi".into(),
                    credential: AppCredential::Federated { subject: "system:serviceaccount:app:fed".into() },
                },
                App { tenant: "t1".into(), client_id: "sp".into(), credential: AppCredential::Secret("s3cret".into()) },
            ],
        );
        let entra = Entra::new(&fake.authority()).unwrap();
        let good = jwt(&json!({"aud": ["api://AzureADTokenExchange"], "sub": "system:serviceaccount:app:fed"}));
        let wrong_sub = jwt(&json!({"aud": ["api://AzureADTokenExchange"], "sub": "system:serviceaccount:app:other"}));
        let ask = |tenant: &'static str, client_id: &'static str, credential| ClientCredentials {
            authority: None,
            tenant,
            client_id,
            resource: "https://vault.azure.net",
            credential,
        };
        let cases: Vec<(ClientCredentials<'_>, u16, &str)> = vec![
            (ask("t1", "wi", Credential::Assertion(&good)), 200, ""),
            (ask("t1", "sp", Credential::Secret("s3cret")), 200, ""),
            (ask("t1", "wi", Credential::Assertion(&wrong_sub)), 400, "invalid_client"),
            (ask("t1", "sp", Credential::Secret("wrong")), 401, "invalid_client"),
            (ask("t2", "wi", Credential::Assertion(&good)), 400, "unauthorized_client"),
        ];
        for (request, status, error_code) in cases {
            let answer = entra.token(&request).await.unwrap();
            let body: Value = serde_json::from_slice(&answer.body).unwrap();
            assert_eq!(answer.status.as_u16(), status, "{request:?}: {body}");
            if status == 200 {
                assert!(body["expires_in"].is_u64() && body.get("expires_on").is_none(), "{body}");
                assert_eq!(
                    body["access_token"],
                    entra_token_for(request.client_id, "https://vault.azure.net/.default")
                );
            } else {
                assert_eq!(body["error"], error_code);
                assert!(
                    body["error_codes"].is_array() && body["error_description"].as_str().unwrap().starts_with("AADSTS")
                );
            }
        }
        let seen = fake.requests();
        assert_eq!(seen[0].form["client_assertion_type"], JWT_BEARER);
        assert_eq!(seen[0].form["client_assertion"], good);
        assert_eq!(seen[0].form["scope"], "https://vault.azure.net/.default");
        assert_eq!(seen[1].form["client_secret"], "s3cret");
        fake.fail_with(Some(503));
        assert_eq!(entra.token(&ask("t1", "sp", Credential::Secret("s3cret"))).await.unwrap().status.as_u16(), 503);
    }
}
