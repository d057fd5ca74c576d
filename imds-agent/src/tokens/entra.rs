//! Microsoft Entra ID's token endpoint, for the identities IMDS does not serve: workload
//! identity (a pod's service-account token as a client assertion) and aad-pod-identity's
//! service principals.
//!
//! `POST {authority}{tenant}/oauth2/v2.0/token`, form-encoded, client-credentials grant,
//! `scope=<resource>/.default`. Entra answers `expires_in` as a number and no `expires_on`;
//! the token path turns that into IMDS's shape.
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};

/// Entra's public cloud.
pub const PUBLIC_CLOUD: &str = "https://login.microsoftonline.com/";
/// How long one call may take.
pub const ENTRA_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BODY: usize = 1 << 20;
/// `client_assertion_type` for a JWT assertion.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

#[derive(Debug, thiserror::Error)]
pub enum EntraError {
    #[error("--authority-host {0:?} must be an http(s) URL")]
    BadAuthority(String),
    #[error("loading the system's CA certificates for Entra")]
    Roots(#[source] std::io::Error),
    #[error("Entra did not answer within {0:?}")]
    Timeout(Duration),
    #[error("calling Entra")]
    Request(#[source] hyper_util::client::legacy::Error),
    #[error("reading Entra's answer")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("building the request to Entra")]
    Build(#[source] http::Error),
}

/// How the client proves itself.
#[derive(Clone, Copy, Debug)]
pub enum Credential<'a> {
    /// A signed JWT: a pod's service-account token, or a certificate-signed assertion.
    Assertion(&'a str),
    /// A client secret.
    Secret(&'a str),
}

/// One client-credentials request.
#[derive(Clone, Copy, Debug)]
pub struct ClientCredentials<'a> {
    /// The authority, when not the agent's default (an `AzureIdentity`'s `adEndpoint`).
    pub authority: Option<&'a str>,
    pub tenant: &'a str,
    pub client_id: &'a str,
    /// An IMDS `resource`; the scope is made from it.
    pub resource: &'a str,
    pub credential: Credential<'a>,
}

/// Entra's answer, as received.
#[derive(Clone, Debug)]
pub struct EntraResponse {
    pub status: StatusCode,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// Entra's token endpoint: the agent's default authority, or one a request names.
#[derive(Clone)]
pub struct Entra {
    /// Ends with `/`.
    authority: String,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// IMDS's `resource` as an Entra v2 scope: `https://vault.azure.net` → `https://vault.azure.net/.default`
/// (a trailing slash is kept, as the v1 resource URI it was: `https://management.azure.com/` →
/// `https://management.azure.com//.default`, which Entra maps back to that resource).
pub fn scope_for(resource: &str) -> String {
    format!("{resource}/.default")
}

impl Entra {
    /// `authority` like `https://login.microsoftonline.com/` (`http://` only makes sense for a
    /// test double).
    pub fn new(authority: &str) -> Result<Entra, EntraError> {
        let uri: http::Uri = authority.parse().map_err(|_| EntraError::BadAuthority(authority.to_owned()))?;
        if !matches!(uri.scheme_str(), Some("https" | "http")) || uri.host().is_none() {
            return Err(EntraError::BadAuthority(authority.to_owned()));
        }
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(EntraError::Roots)?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Entra { authority: with_slash(authority), client })
    }

    /// The token endpoint for `tenant` at `authority` (default: the agent's).
    pub fn token_url(&self, authority: Option<&str>, tenant: &str) -> String {
        let authority = authority.map_or_else(|| self.authority.clone(), with_slash);
        let tenant: String = form_urlencoded::byte_serialize(tenant.as_bytes()).collect();
        format!("{authority}{tenant}/oauth2/v2.0/token")
    }

    /// Asks for a token.
    pub async fn token(&self, request: &ClientCredentials<'_>) -> Result<EntraResponse, EntraError> {
        let form = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials");
            form.append_pair("client_id", request.client_id);
            form.append_pair("scope", &scope_for(request.resource));
            match request.credential {
                Credential::Assertion(jwt) => {
                    form.append_pair("client_assertion_type", JWT_BEARER);
                    form.append_pair("client_assertion", jwt);
                }
                Credential::Secret(secret) => {
                    form.append_pair("client_secret", secret);
                }
            }
            form.finish()
        };
        let http = Request::post(self.token_url(request.authority, request.tenant))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form)))
            .map_err(EntraError::Build)?;
        let call = async {
            let response = self.client.request(http).await.map_err(EntraError::Request)?;
            let status = response.status();
            let retry_after = crate::upstream::retry_after(response.headers());
            let body = Limited::new(response.into_body(), MAX_BODY).collect().await.map_err(EntraError::Body)?;
            Ok(EntraResponse { status, retry_after, body: body.to_bytes() })
        };
        tokio::time::timeout(ENTRA_TIMEOUT, call).await.map_err(|_| EntraError::Timeout(ENTRA_TIMEOUT))?
    }
}

fn with_slash(authority: &str) -> String {
    if authority.ends_with('/') {
        authority.to_owned()
    } else {
        format!("{authority}/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_from_resources() {
        assert_eq!(scope_for("https://vault.azure.net"), "https://vault.azure.net/.default");
        assert_eq!(scope_for("https://management.azure.com/"), "https://management.azure.com//.default");
    }

    #[test]
    fn token_urls() {
        let entra = Entra::new("https://login.microsoftonline.com").unwrap();
        assert_eq!(entra.token_url(None, "t1"), "https://login.microsoftonline.com/t1/oauth2/v2.0/token");
        assert_eq!(
            entra.token_url(Some("https://login.microsoftonline.us"), "t2"),
            "https://login.microsoftonline.us/t2/oauth2/v2.0/token"
        );
    }

    #[test]
    fn authorities_are_checked() {
        assert!(Entra::new("https://login.microsoftonline.com/").is_ok());
        assert!(Entra::new("http://10.0.0.1:8443").is_ok());
        assert!(matches!(Entra::new("login.microsoftonline.com"), Err(EntraError::BadAuthority(_))));
        assert!(matches!(Entra::new("ftp://x/"), Err(EntraError::BadAuthority(_))));
    }
}
