//! The token path, after the policy has allowed a request: a node-wide cache, one upstream
//! call shared by every concurrent request for the same token, and an upstream budget.
//!
//! - **Authorisation first.** Callers decide with the policy, then ask here; a cached token
//!   is never a reason to serve a request the policy refuses.
//! - **Coalescing.** The first request for a key starts a fetch (a task of its own); requests
//!   for the same key join it. The fetch stores its token in the cache, whether or not
//!   anyone still waits.
//! - **Retries.** A fetch retries IMDS's retryable answers (404, 410, 429, 5xx) and transport
//!   failures on IMDS's documented schedule (about 2, 6, 14 and 30 s apart, or the
//!   `Retry-After` it sent, if longer) within [`FETCH_DEADLINE`]. Waiting requests do not sit
//!   through that: once an attempt has failed they get that failure at once — IMDS-style, with
//!   a `Retry-After` — and their retries join the fetch or find its token in the cache.
//! - **Failures with a token in hand.** A cached token that is due for renewal is still served
//!   when the renewal fails, until it expires.
//! - **Budget.** Every upstream call holds a slot of a [`budget::Budget`]: IMDS's, or Entra's
//!   (for workload identity), each with its own limits.
//! - **Prefetch.** A token can be warmed before anyone asks ([`TokenService::prefetch`]): one
//!   attempt, only with the budget's idle capacity, never queued behind or ahead of a pod's
//!   own call.
pub mod budget;
pub mod cache;
pub mod certificate;
pub mod entra;
pub mod projected;
pub mod token;

use parking_lot::Mutex;
use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use http::StatusCode;
use tokio::sync::watch;

use self::{
    budget::{Budget, BudgetConfig},
    cache::{Cache, CacheConfig, Lookup},
    entra::{ClientCredentials, Credential, Entra, EntraResponse},
    token::{unix_now, Token},
};
use crate::{
    imds::{ImdsError, JSON_CONTENT_TYPE},
    policy::SecretRef,
    upstream::{Upstream, UpstreamResponse, UpstreamSelector},
};

/// How long a fetch keeps retrying (IMDS: retry a 410 "within 70 s").
pub const FETCH_DEADLINE: Duration = Duration::from_secs(70);
/// IMDS's documented retry schedule, between attempts.
const RETRY_SCHEDULE: [Duration; 4] =
    [Duration::from_secs(2), Duration::from_secs(6), Duration::from_secs(14), Duration::from_secs(30)];
/// Most a request waits on a fetch that has neither finished nor failed (an upstream call
/// that is still running).
const MAX_WAIT: Duration = Duration::from_secs(11);
/// How often idle and expired cache entries are swept.
const SWEEP_EVERY: Duration = Duration::from_mins(1);

/// Where a token comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// A user-assigned managed identity, from IMDS, asked for by its client id.
    ManagedIdentity { client_id: String },
    /// A user-assigned managed identity, from IMDS, asked for by its ARM resource id (when
    /// the namespace's scope allowed it by that id only).
    ManagedIdentityByResource { resource_id: String },
    /// A ServiceAccount's federated identity, from Entra with a pod's service-account token.
    /// Pods of one ServiceAccount share its tokens; each must present its own
    /// service-account token first (see [`projected`]).
    Workload { tenant_id: String, client_id: String, namespace: String, service_account: String },
    /// An aad-pod-identity service principal (types 1 and 2), from Entra with the credential
    /// in `secret`. The Secret is part of the key: two identities naming the same client id
    /// with different credentials never share tokens.
    ServicePrincipal { authority: Option<String>, tenant_id: String, client_id: String, secret: SecretRef },
}

impl Source {
    /// A managed identity, asked for as the policy decided.
    #[must_use]
    pub fn managed(by: crate::policy::FetchBy) -> Source {
        match by {
            crate::policy::FetchBy::ClientId(client_id) => Source::ManagedIdentity { client_id },
            crate::policy::FetchBy::ResourceId(resource_id) => Source::ManagedIdentityByResource { resource_id },
        }
    }
}

/// What a fetch needs besides the key: taken from the request that starts it.
#[derive(Clone, Debug)]
pub enum Fetch {
    Imds {
        api_version: Option<String>,
    },
    /// The requesting pod's service-account token.
    Entra {
        assertion: String,
    },
    /// A service principal's client secret (type 1).
    Secret(Redacted),
    /// A service principal's certificate (type 2): the Secret's PKCS#12 `certificate` and its
    /// `password`, opened when a fetch needs them; an assertion is signed per call.
    Certificate(Arc<crate::secrets::SecretData>),
}

/// A secret that never shows in `Debug` output.
#[derive(Clone)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What is cached: a token of one identity for one resource.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub source: Source,
    pub resource: String,
}

/// Where an answered token came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    Cache,
    Upstream,
    /// From the cache, due for renewal, because the renewal failed.
    CacheAfterFailure,
}

impl Served {
    pub fn as_str(self) -> &'static str {
        match self {
            Served::Cache => "cache",
            Served::Upstream => "upstream",
            Served::CacheAfterFailure => "cache-after-failure",
        }
    }
}

/// A failure a client should retry: the status and body to answer, and when to retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retryable {
    pub status: StatusCode,
    pub content_type: Option<http::HeaderValue>,
    pub body: Bytes,
    pub retry_after: Duration,
    /// What happened, for the decision log.
    pub reason: String,
}

/// The outcome for one request.
#[derive(Clone, Debug)]
pub enum Outcome {
    Token {
        token: Arc<Token>,
        served: Served,
    },
    /// IMDS's final answer (a 400 for an identity it does not have, say), relayed as it came.
    Final(UpstreamResponse),
    Retry(Retryable),
}

/// A fetch as its waiters see it.
#[derive(Clone, Debug)]
enum Progress {
    Running { failure: Option<Retryable> },
    Done(Outcome),
}

#[derive(Clone, Copy, Debug)]
pub struct TokenConfig {
    pub cache: CacheConfig,
    /// IMDS's budget.
    pub budget: BudgetConfig,
    /// Entra's budget (far higher limits than IMDS; still bounded).
    pub entra_budget: BudgetConfig,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            cache: CacheConfig::default(),
            budget: BudgetConfig::default(),
            entra_budget: BudgetConfig { per_second: 50, in_flight: 10, ..BudgetConfig::default() },
        }
    }
}

/// Counts for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenStats {
    pub entries: usize,
    pub bytes: usize,
    pub fetches_running: usize,
    pub queued: usize,
    pub in_flight: usize,
}

pub struct TokenService {
    cache: Mutex<Cache<TokenKey>>,
    running: Mutex<HashMap<TokenKey, watch::Receiver<Progress>>>,
    budget: Arc<Budget>,
    entra_budget: Arc<Budget>,
    imds: Upstream,
    entra: Entra,
}

impl TokenService {
    /// A service calling `imds`; starts its budget and its cache sweeper.
    pub fn start(imds: Upstream, entra: Entra, config: TokenConfig) -> Arc<TokenService> {
        let service = Arc::new(TokenService {
            cache: Mutex::new(Cache::new(config.cache)),
            running: Mutex::default(),
            budget: Budget::start(config.budget),
            entra_budget: Budget::start(config.entra_budget),
            imds,
            entra,
        });
        let weak = Arc::downgrade(&service);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SWEEP_EVERY);
            loop {
                every.tick().await;
                let Some(service) = weak.upgrade() else { return };
                let swept = service.cache().sweep(unix_now());
                if swept > 0 {
                    tracing::debug!(swept, "token cache: idle and expired entries dropped");
                }
            }
        });
        service
    }

    fn cache(&self) -> parking_lot::MutexGuard<'_, Cache<TokenKey>> {
        self.cache.lock()
    }

    fn running(&self) -> parking_lot::MutexGuard<'_, HashMap<TokenKey, watch::Receiver<Progress>>> {
        self.running.lock()
    }

    /// The budget of token calls, shared with token requests forwarded as asked (audit, exceptions).
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    pub fn stats(&self) -> TokenStats {
        let (entries, bytes) = {
            let c = self.cache();
            (c.len(), c.bytes())
        };
        let (queued, in_flight) = self.budget.load();
        TokenStats { entries, bytes, fetches_running: self.running().len(), queued, in_flight }
    }

    /// A token for `key`, on behalf of `requester` (the pod, for fair queueing). The caller
    /// has authorised the request.
    pub async fn get(self: &Arc<Self>, key: TokenKey, requester: &str, how: Fetch) -> Outcome {
        let lookup = self.cache().lookup(&key, unix_now());
        match lookup {
            Lookup::Fresh(token) => Outcome::Token { token, served: Served::Cache },
            Lookup::RefreshAhead(token) => {
                drop(self.fetch(&key, requester, &how)); // in the background
                Outcome::Token { token, served: Served::Cache }
            }
            Lookup::Expiring(token) => match wait(self.fetch(&key, requester, &how)).await {
                Outcome::Retry(_) => Outcome::Token { token, served: Served::CacheAfterFailure },
                other => other,
            },
            Lookup::Miss => wait(self.fetch(&key, requester, &how)).await,
        }
    }

    /// Fetches `key` ahead of any request, on behalf of pod `requester`, if the cache has no
    /// token a request could be served and the budget is idle ([`Budget::try_acquire_idle`]):
    /// one attempt, no retries. Returns whether a fetch started. The caller has authorised it
    /// as it would the request.
    pub fn prefetch(self: &Arc<Self>, key: &TokenKey, requester: &str, how: &Fetch) -> bool {
        if matches!(self.cache().peek(key, unix_now()), Lookup::Fresh(_) | Lookup::RefreshAhead(_))
            || self.running().contains_key(key)
        {
            return false;
        }
        let budget = match key.source {
            Source::ManagedIdentity { .. } | Source::ManagedIdentityByResource { .. } => &self.budget,
            Source::Workload { .. } | Source::ServicePrincipal { .. } => &self.entra_budget,
        };
        let Some(permit) = budget.try_acquire_idle() else { return false };
        self.start_fetch(key, requester, how, Some(permit)).1
    }

    /// Keeps `key`'s cached token at least `idle` unused (a scheduled workload's interval).
    pub fn keep_idle(&self, key: &TokenKey, idle: Duration) {
        self.cache().keep_idle(key, idle);
    }

    /// Joins the running fetch for `key`, or starts one.
    fn fetch(self: &Arc<Self>, key: &TokenKey, requester: &str, how: &Fetch) -> watch::Receiver<Progress> {
        self.start_fetch(key, requester, how, None).0
    }

    /// Joins the running fetch for `key`, or starts one (then says so); with `idle`, a
    /// prefetch's slot, the fetch makes that one attempt (joining, the slot is given back).
    fn start_fetch(
        self: &Arc<Self>,
        key: &TokenKey,
        requester: &str,
        how: &Fetch,
        idle: Option<budget::Permit>,
    ) -> (watch::Receiver<Progress>, bool) {
        let mut running = self.running();
        if let Some(progress) = running.get(key) {
            return (progress.clone(), false);
        }
        let (tx, rx) = watch::channel(Progress::Running { failure: None });
        running.insert(key.clone(), rx.clone());
        drop(running);
        let (service, key, requester, how) = (Arc::clone(self), key.clone(), requester.to_owned(), how.clone());
        tokio::spawn(async move {
            let outcome = match idle {
                Some(permit) => service.attempt(&key, &how, permit).await,
                None => service.attempts(&key, &requester, &how, &tx).await,
            };
            // Cache first, then stop being "running": a request in between finds one or the other.
            if let Outcome::Token { token, .. } = &outcome {
                let jitter = fastrand::f64() * 2.0 - 1.0;
                service.cache().insert(key.clone(), Token::clone(token), unix_now(), jitter, &requester);
            }
            service.running().remove(&key);
            tx.send_replace(Progress::Done(outcome));
        });
        (rx, true)
    }

    /// Calls upstream until a token, a final answer, or the deadline.
    async fn attempts(
        &self,
        key: &TokenKey,
        requester: &str,
        how: &Fetch,
        progress: &watch::Sender<Progress>,
    ) -> Outcome {
        let deadline = tokio::time::Instant::now() + FETCH_DEADLINE;
        let mut schedule = RETRY_SCHEDULE.iter();
        let budget = match key.source {
            Source::ManagedIdentity { .. } | Source::ManagedIdentityByResource { .. } => &self.budget,
            Source::Workload { .. } | Source::ServicePrincipal { .. } => &self.entra_budget,
        };
        loop {
            let failure = match budget.acquire(requester).await {
                Err(overloaded) => return Outcome::Retry(too_many_requests(overloaded.retry_after)),
                Ok(_permit) => match self.call(key, how).await {
                    Attempt::Done(outcome) => return outcome,
                    Attempt::Failed(failure) => failure,
                },
            };
            let Some(pause) = schedule.next().map(|d| (*d).max(failure.retry_after)) else {
                return Outcome::Retry(failure);
            };
            if tokio::time::Instant::now() + pause > deadline {
                return Outcome::Retry(failure);
            }
            tracing::debug!(status = %failure.status, reason = %failure.reason, retry_in = ?pause, "token fetch failed; retrying");
            progress.send_replace(Progress::Running { failure: Some(Retryable { retry_after: pause, ..failure }) });
            tokio::time::sleep(pause).await;
        }
    }

    /// One call, in a slot already held.
    async fn attempt(&self, key: &TokenKey, how: &Fetch, permit: budget::Permit) -> Outcome {
        let attempt = self.call(key, how).await;
        drop(permit);
        match attempt {
            Attempt::Done(outcome) => outcome,
            Attempt::Failed(failure) => Outcome::Retry(failure),
        }
    }

    async fn call(&self, key: &TokenKey, how: &Fetch) -> Attempt {
        match (&key.source, how) {
            (Source::ManagedIdentity { client_id }, Fetch::Imds { api_version }) => {
                let selector = Some(UpstreamSelector::ClientId(client_id));
                let answer = self.imds.token(api_version.as_deref(), &key.resource, selector).await;
                classify(answer, unix_now())
            }
            (Source::ManagedIdentityByResource { resource_id }, Fetch::Imds { api_version }) => {
                let selector = Some(UpstreamSelector::ResourceId(resource_id));
                let answer = self.imds.token(api_version.as_deref(), &key.resource, selector).await;
                classify(answer, unix_now())
            }
            (Source::Workload { tenant_id, client_id, .. }, Fetch::Entra { assertion }) => {
                let request = ClientCredentials {
                    authority: None,
                    tenant: tenant_id,
                    client_id,
                    resource: &key.resource,
                    credential: Credential::Assertion(assertion),
                };
                classify_entra(self.entra.token(&request).await, client_id, &key.resource, unix_now())
            }
            (Source::ServicePrincipal { authority, tenant_id, client_id, .. }, Fetch::Secret(secret)) => {
                let request = ClientCredentials {
                    authority: authority.as_deref(),
                    tenant: tenant_id,
                    client_id,
                    resource: &key.resource,
                    credential: Credential::Secret(&secret.0),
                };
                classify_entra(self.entra.token(&request).await, client_id, &key.resource, unix_now())
            }
            (Source::ServicePrincipal { authority, tenant_id, client_id, .. }, Fetch::Certificate(secret)) => {
                let audience = self.entra.token_url(authority.as_deref(), tenant_id);
                let assertion = match certificate::assertion_from_secret(secret, client_id, &audience) {
                    Ok(a) => a,
                    Err(e) => return Attempt::Done(Outcome::Final(credential_refused(&e))),
                };
                let request = ClientCredentials {
                    authority: authority.as_deref(),
                    tenant: tenant_id,
                    client_id,
                    resource: &key.resource,
                    credential: Credential::Assertion(&assertion),
                };
                classify_entra(self.entra.token(&request).await, client_id, &key.resource, unix_now())
            }
            (source, how) => Attempt::Done(Outcome::Retry(unknown_failure(format!(
                "internal error: {how:?} cannot fetch a token of {source:?}"
            )))),
        }
    }
}

/// Entra's answer in IMDS's terms: a token, a final refusal (as IMDS's 400, so SDKs stop),
/// or a retryable failure.
fn classify_entra(
    answer: Result<EntraResponse, entra::EntraError>,
    client_id: &str,
    resource: &str,
    now: u64,
) -> Attempt {
    #[derive(serde::Deserialize)]
    struct Success {
        access_token: String,
        #[serde(default = "bearer")]
        token_type: String,
        expires_in: u64,
    }
    fn bearer() -> String {
        "Bearer".into()
    }
    let response = match answer {
        Ok(r) => r,
        Err(e) => return Attempt::Failed(unknown_failure(format!("{:#}", anyhow::Error::from(e)))),
    };
    let status = response.status;
    if status == StatusCode::OK {
        return match serde_json::from_slice::<Success>(&response.body) {
            Ok(t) => {
                let token = Token::from_parts(&t.access_token, &t.token_type, t.expires_in, client_id, resource, now);
                Attempt::Done(Outcome::Token { token: Arc::new(token), served: Served::Upstream })
            }
            Err(e) => Attempt::Failed(unknown_failure(format!("Entra answered 200 without a token: {e}"))),
        };
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let answer =
            ImdsError { status, error: "unknown", description: "The identity provider is unavailable; retry".into() };
        let retry_after = response.retry_after.unwrap_or(Duration::from_secs(1));
        return Attempt::Failed(retryable(&answer, retry_after, format!("Entra answered {status}")));
    }
    // A refusal (bad assertion, no federated credential, unknown client…): Entra's own words,
    // as IMDS's 400 so that SDKs do not retry it.
    let error: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_default();
    let code = error["error"].as_str().unwrap_or("invalid_request");
    let description = error["error_description"].as_str().unwrap_or("Entra refused the token request");
    let body = serde_json::json!({"error": code, "error_description": format!("Token exchange at Entra failed: {description}")});
    Attempt::Done(Outcome::Final(final_answer(StatusCode::BAD_REQUEST, body.to_string())))
}

/// A final answer the agent makes itself, in IMDS's JSON shape.
fn final_answer(status: StatusCode, body: String) -> UpstreamResponse {
    UpstreamResponse {
        status,
        content_type: Some(http::HeaderValue::from_static(JSON_CONTENT_TYPE)),
        retry_after: None,
        body: Bytes::from(body),
    }
}

/// A credential that cannot be used, as IMDS's 400 (retrying would not help).
fn credential_refused(e: &certificate::CertificateError) -> UpstreamResponse {
    let answer = ImdsError::bad_request(format!("The service principal's certificate cannot be used: {e}"));
    final_answer(answer.status, answer.body())
}

/// A retryable answer the agent makes itself.
pub(crate) fn retryable(answer: &ImdsError, retry_after: Duration, reason: String) -> Retryable {
    Retryable {
        status: answer.status,
        content_type: Some(http::HeaderValue::from_static(JSON_CONTENT_TYPE)),
        body: Bytes::from(answer.body()),
        retry_after,
        reason,
    }
}

enum Attempt {
    Done(Outcome),
    Failed(Retryable),
}

/// What one IMDS answer means for the fetch.
fn classify(answer: Result<UpstreamResponse, crate::upstream::UpstreamError>, now: u64) -> Attempt {
    let response = match answer {
        Ok(r) => r,
        Err(e) => {
            return Attempt::Failed(unknown_failure(format!("{:#}", anyhow::Error::from(e))));
        }
    };
    let status = response.status;
    if status == StatusCode::OK {
        return match Token::from_imds(&response.body, now) {
            Ok(token) => Attempt::Done(Outcome::Token { token: Arc::new(token), served: Served::Upstream }),
            Err(e) => {
                Attempt::Failed(unknown_failure(format!("the metadata service answered 200 without a token: {e}")))
            }
        };
    }
    let retryable = matches!(status.as_u16(), 404 | 410 | 429) || status.is_server_error();
    if !retryable {
        return Attempt::Done(Outcome::Final(response));
    }
    Attempt::Failed(Retryable {
        status,
        content_type: response.content_type,
        body: response.body,
        retry_after: response.retry_after.unwrap_or(Duration::from_secs(1)),
        reason: format!("the metadata service answered {status}"),
    })
}

fn unknown_failure(reason: String) -> Retryable {
    let answer = ImdsError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        error: "unknown",
        description: "The metadata service could not be reached; retry".into(),
    };
    retryable(&answer, Duration::from_secs(1), reason)
}

/// IMDS's throttling answer, given by the agent when its own queue is full.
pub fn too_many_requests(retry_after: Duration) -> Retryable {
    let answer = ImdsError::too_many_requests("Too many requests for tokens on this node; retry");
    retryable(&answer, retry_after, "the upstream budget's queue is full".into())
}

/// Waits for a fetch to finish, or for its first failure, or [`MAX_WAIT`].
async fn wait(mut progress: watch::Receiver<Progress>) -> Outcome {
    let waited = tokio::time::timeout(MAX_WAIT, async {
        loop {
            match &*progress.borrow_and_update() {
                Progress::Done(outcome) => return outcome.clone(),
                Progress::Running { failure: Some(f) } => return Outcome::Retry(f.clone()),
                Progress::Running { failure: None } => {}
            }
            if progress.changed().await.is_err() {
                // The fetch task ended without a word: it panicked.
                return Outcome::Retry(unknown_failure("the token fetch failed unexpectedly".into()));
            }
        }
    })
    .await;
    waited.unwrap_or_else(|_| {
        let mut failure = unknown_failure("the metadata service has not answered yet".into());
        failure.retry_after = Duration::from_secs(2);
        Outcome::Retry(failure)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::UpstreamError;

    fn response(status: u16, body: &str, retry_after: Option<u64>) -> Result<UpstreamResponse, UpstreamError> {
        let status = StatusCode::from_u16(status).map_err(|e| UpstreamError::Build(e.into()))?;
        Ok(UpstreamResponse {
            status,
            content_type: None,
            retry_after: retry_after.map(Duration::from_secs),
            body: Bytes::from(body.to_owned()),
        })
    }

    fn kind(a: &Attempt) -> String {
        match a {
            Attempt::Done(Outcome::Token { .. }) => "token".into(),
            Attempt::Done(Outcome::Final(r)) => format!("final {}", r.status.as_u16()),
            Attempt::Done(Outcome::Retry(r)) | Attempt::Failed(r) => {
                format!("retry {} after {}", r.status.as_u16(), r.retry_after.as_secs())
            }
        }
    }

    #[test]
    fn imds_answers_are_classified_as_imds_documents_them() {
        let ok = r#"{"access_token":"t","expires_on":"2000000000","expires_in":"3600"}"#;
        let table = [
            (response(200, ok, None), "token"),
            (response(200, "{}", None), "retry 500 after 1"), // no token: not IMDS's answer
            (response(400, r#"{"error":"invalid_request"}"#, None), "final 400"),
            (response(403, "", None), "final 403"),
            (response(404, "", None), "retry 404 after 1"), // IMDS updating
            (response(410, "", None), "retry 410 after 1"),
            (response(429, "", Some(7)), "retry 429 after 7"),
            (response(500, "", None), "retry 500 after 1"),
            (response(503, "", None), "retry 503 after 1"),
            (Err(UpstreamError::Timeout(Duration::from_secs(10))), "retry 500 after 1"),
        ];
        for (answer, want) in table {
            assert_eq!(kind(&classify(answer, 1_000)), want);
        }
    }
}
