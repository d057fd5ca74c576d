//! The real metadata service, as the agent calls it — only after a request is authorised.
//!
//! The agent's own connections are exempt from the kernel filter (its cgroup passes), so
//! this is a plain HTTP client. Token requests are rebuilt from what the agent validated:
//! `api-version`, `resource` and the one identity selector the decision chose. Nothing else
//! from the client's query goes upstream, so no unknown parameter can act as a selector.
use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};

/// IMDS's own answer-time commitment.
pub(crate) const IMDS_TIMEOUT: Duration = Duration::from_secs(10);
/// IMDS answers are small JSON documents; anything larger is not IMDS.
const MAX_BODY: usize = 1 << 20;
/// Used when a client gives none (IMDS requires one).
pub(crate) const DEFAULT_API_VERSION: &str = "2018-02-01";

/// An answer from the metadata service.
#[derive(Clone, Debug)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub content_type: Option<header::HeaderValue>,
    /// `Retry-After` in seconds, when IMDS sent one (with a 429, say).
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the metadata service did not answer within {0:?}")]
    Timeout(Duration),
    #[error("calling the metadata service")]
    Request(#[source] hyper_util::client::legacy::Error),
    #[error("reading the metadata service's answer")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("building the upstream request")]
    Build(#[source] http::Error),
}

/// The metadata service at one address.
#[derive(Clone)]
pub struct Upstream {
    addr: SocketAddr,
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
    latency: Option<prometheus_client::metrics::histogram::Histogram>,
}

/// A `Retry-After` in seconds (the form IMDS and Entra send), if there is one.
pub(crate) fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    headers.get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()?.trim().parse().ok()).map(Duration::from_secs)
}

/// The selector sent upstream for the chosen identity.
#[derive(Clone, Copy, Debug)]
#[expect(clippy::enum_variant_names, reason = "named as IMDS names them: client_id, object_id, msi_res_id")]
pub enum UpstreamSelector<'a> {
    ClientId(&'a str),
    ObjectId(&'a str),
    ResourceId(&'a str),
}

impl Upstream {
    #[must_use]
    pub fn new(addr: SocketAddr, timeout: Duration) -> Upstream {
        let client = Client::builder(TokioExecutor::new()).build_http();
        Upstream { addr, client, timeout, latency: None }
    }

    /// Records every call's duration (answered or not) in `histogram`, in seconds.
    #[must_use]
    pub fn with_latency(mut self, histogram: prometheus_client::metrics::histogram::Histogram) -> Upstream {
        self.latency = Some(histogram);
        self
    }

    /// `GET /metadata/identity/oauth2/token` for exactly this resource and identity.
    pub async fn token(
        &self,
        api_version: Option<&str>,
        resource: &str,
        selector: Option<UpstreamSelector<'_>>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        // Built before any await: the serializer is not `Send`.
        let query = {
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.append_pair("api-version", api_version.unwrap_or(DEFAULT_API_VERSION));
            query.append_pair("resource", resource);
            match selector {
                Some(UpstreamSelector::ClientId(id)) => query.append_pair("client_id", id),
                Some(UpstreamSelector::ObjectId(id)) => query.append_pair("object_id", id),
                Some(UpstreamSelector::ResourceId(id)) => query.append_pair("msi_res_id", id),
                None => &mut query,
            };
            query.finish()
        };
        self.get(&format!("{}?{query}", crate::imds::TOKEN_PATH)).await
    }

    /// `GET path?query` with `Metadata: true`; `path_and_query` must already be validated.
    pub async fn get(&self, path_and_query: &str) -> Result<UpstreamResponse, UpstreamError> {
        let request = Request::get(format!("http://{}{path_and_query}", self.addr))
            .header("Metadata", "true")
            .body(Empty::new())
            .map_err(UpstreamError::Build)?;
        let call = async {
            let response = self.client.request(request).await.map_err(UpstreamError::Request)?;
            let status = response.status();
            let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
            let retry_after = retry_after(response.headers());
            let body = Limited::new(response.into_body(), MAX_BODY).collect().await.map_err(UpstreamError::Body)?;
            Ok(UpstreamResponse { status, content_type, retry_after, body: body.to_bytes() })
        };
        let started = std::time::Instant::now();
        let result =
            tokio::time::timeout(self.timeout, call).await.map_err(|_| UpstreamError::Timeout(self.timeout))?;
        if let Some(h) = &self.latency {
            h.observe(started.elapsed().as_secs_f64());
        }
        result
    }
}
