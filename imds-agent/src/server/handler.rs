//! One request: validate (IMDS's rules), decide (policy), answer (upstream or refusal), and
//! log the decision. Upstream is called only once the decision allows it.
use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;

use super::AgentState;
use crate::{
    caller::CgroupInfo,
    decisions::DecisionRecord,
    imds::{self, ImdsError, Route, TokenRequest, JSON_CONTENT_TYPE as JSON},
    kernel::CallerOrigin,
    policy::{Decision, PathDecision, Selector, Snapshot},
    tokens::{token::unix_now, too_many_requests, Fetch, Outcome, Retryable, Served, Source, TokenKey},
    upstream::{UpstreamError, UpstreamResponse, UpstreamSelector},
};

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub struct Caller {
    pub origin: CallerOrigin,
    /// `None` when the cgroup vanished before it could be resolved.
    pub cgroup: Option<CgroupInfo>,
}

/// Whether refusals are enforced or only logged (`--mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Refusals are answered as refusals.
    Enforce,
    /// Requests the policy would refuse are logged (`audit-allow`) and forwarded as asked.
    Audit,
}

type Answer = Response<Full<Bytes>>;

/// Answers one request and writes its decision record. The body is never read.
pub(super) async fn handle<B>(req: Request<B>, caller: &Caller, state: &AgentState) -> Answer {
    let (req, _unread_body) = req.into_parts();
    let (cgroup_id, pid) = (caller.origin.cgroup_id, caller.origin.pid);
    let origin = Recorded { cgroup_id, pid, endpoint: Endpoint::Imds };
    recorded(&req, origin, state, async |record| answer(&req, caller, state, record).await).await
}

/// Which listener a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Endpoint {
    /// The redirected metadata address.
    Imds,
    /// `/host/token` ([`super::host_token`]).
    HostToken,
}

/// Where a request came from, for its decision record.
pub(super) struct Recorded {
    pub cgroup_id: u64,
    /// 0 when the kernel did not say.
    pub pid: u32,
    pub endpoint: Endpoint,
}

/// Runs `answer` with a decision record for `req`, then writes the record and counts the
/// request.
pub(super) async fn recorded(
    req: &http::request::Parts,
    from: Recorded,
    state: &AgentState,
    answer: impl AsyncFnOnce(&mut DecisionRecord) -> Answer,
) -> Answer {
    let started = Instant::now();
    let mut record = DecisionRecord::now();
    record.cgroup_id = from.cgroup_id;
    record.pid = from.pid;
    record.method = req.method.to_string();
    record.path = req.uri.path().to_owned();
    let answer = answer(&mut record).await;
    record.status = answer.status().as_u16();
    record.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    record.emit();
    match from.endpoint {
        Endpoint::Imds => state.telemetry.count_request(record.verdict, &record.path, answer.status()),
        Endpoint::HostToken => state.telemetry.count_host_token(record.verdict, answer.status()),
    }
    if let Some(from) = record.token_from {
        state.telemetry.count_token(from);
    }
    answer
}

async fn answer(
    req: &http::request::Parts,
    caller: &Caller,
    state: &AgentState,
    record: &mut DecisionRecord,
) -> Answer {
    let route = imds::route(&req.method, req.uri.path(), req.uri.query(), &req.headers);
    match route {
        Err(e) => {
            record.verdict = "invalid";
            record.reason.clone_from(&e.description);
            refusal(&e)
        }
        Ok(Route::Metadata { path, query }) => path_answer(&path, query.as_deref(), caller, state, record).await,
        Ok(Route::Token(token)) => token_answer(token, caller, state, record).await,
    }
}

/// A metadata path other than the token endpoint: forwarded within the path budget if the
/// node's rules, the pod's namespace's grants or an exception allow it, refused with a 403
/// otherwise (audit does not forward paths: it is for rolling out identity policy, and node
/// data such as `userData` may hold secrets).
async fn path_answer(
    path: &str,
    query: Option<&str>,
    caller: &Caller,
    state: &AgentState,
    record: &mut DecisionRecord,
) -> Answer {
    let uid = caller.cgroup.as_ref().and_then(|c| c.pod_uid.clone());
    // The pod matters only when the node's rules do not decide alone and something could
    // give it the path; otherwise an unknown pod is refused at once rather than kept waiting.
    let current = Arc::clone(&state.snapshot.borrow());
    let snapshot = match &uid {
        Some(uid) if !state.rules.allows(path) && current.may_grant_paths() => wait_for_pod(state, uid).await,
        _ => current,
    };
    if let Some(pod) = uid.as_deref().and_then(|uid| snapshot.pod(uid)) {
        record.pod_namespace = Some(pod.namespace.clone());
        record.pod_name = Some(pod.name.clone());
    }
    record.pod_uid.clone_from(&uid);
    let decision = match snapshot.decide_path(uid.as_deref(), path, &state.rules) {
        // Nothing could give an unknown pod this path: no wait, no retry.
        PathDecision::UnknownPod if !snapshot.may_grant_paths() => {
            PathDecision::Refused("the path is not allowed on this node, and no namespace is granted paths".into())
        }
        decision => decision,
    };
    record.verdict = decision.verdict();
    record.reason = decision.reason();
    match decision {
        PathDecision::Node | PathDecision::Granted { .. } | PathDecision::Exception { .. } => {}
        // No Event: SDKs and resource detectors probe instance data from every pod.
        PathDecision::Refused(_) => return refusal(&ImdsError::path_forbidden()),
        PathDecision::UnknownPod => return unknown_pod(state, record),
    }
    let _slot = match state.path_budget.acquire(uid.as_deref().unwrap_or_default()).await {
        Ok(slot) => slot,
        Err(overloaded) => return retry_answer(&too_many_requests(overloaded.retry_after), record),
    };
    let path_and_query = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    relay(state.upstream.get(&path_and_query).await, record)
}

/// The retryable 404 for a pod the policy does not know after the grace period.
fn unknown_pod(state: &AgentState, record: &mut DecisionRecord) -> Answer {
    record.verdict = "unknown-pod";
    record.reason = format!("pod not known after waiting {:?}; retry", state.pod_grace);
    refusal(&ImdsError {
        status: StatusCode::NOT_FOUND,
        error: "unknown",
        description: "The pod is not known to the node agent yet; retry".into(),
    })
}

async fn token_answer(token: TokenRequest, caller: &Caller, state: &AgentState, record: &mut DecisionRecord) -> Answer {
    record.selector = token.selector.as_ref().map(Selector::describe);
    let Some(uid) = caller.cgroup.as_ref().and_then(|c| c.pod_uid.clone()) else {
        record.reason = "the caller's cgroup is not a pod's".into();
        return refuse_or_audit(&token, state, record, false).await;
    };
    let snapshot = wait_for_pod(state, &uid).await;
    if let Some(pod) = snapshot.pod(&uid) {
        record.pod_namespace = Some(pod.namespace.clone());
        record.pod_name = Some(pod.name.clone());
    }
    record.pod_uid = Some(uid.clone());
    let decision = snapshot.decide(&uid, token.selector.as_ref());
    record.identity = decision.identity(record.pod_namespace.as_deref().unwrap_or_default());
    record.reason = decision.reason();
    match serve_allowed(decision, &token, &uid, &snapshot, state, record).await {
        Ok(answer) => answer,
        Err(NotAllowed::Deny) => {
            let audited = record.pod_namespace.as_deref().is_some_and(|ns| snapshot.audited(ns));
            refuse_or_audit(&token, state, record, audited).await
        }
        Err(NotAllowed::Exception) => {
            record.verdict = "exception";
            forward_as_asked(&token, state, record).await
        }
        Err(NotAllowed::UnknownPod) => unknown_pod(state, record),
    }
}

/// A decision that serves no token by itself (the decision record says why).
pub(super) enum NotAllowed {
    Deny,
    Exception,
    UnknownPod,
}

/// The answer for an `Allow` or `Workload` decision about the pod `uid`; for any other
/// decision, which it is, for the caller to refuse (or audit) as it must.
pub(super) async fn serve_allowed(
    decision: Decision<'_>,
    token: &TokenRequest,
    uid: &str,
    snapshot: &Snapshot,
    state: &AgentState,
    record: &mut DecisionRecord,
) -> Result<Answer, NotAllowed> {
    match decision {
        Decision::Allow { identity, fetch, .. } => {
            record.verdict = "allow";
            if let Some(principal) = &identity.service_principal {
                let answered =
                    super::principal::answer(identity, principal, &token.resource, uid, snapshot, state, record).await;
                return Ok(answered.unwrap_or_else(|refused| {
                    record.verdict = "deny";
                    report_denial(state, record);
                    refusal(&refused)
                }));
            }
            let key = TokenKey { source: Source::managed(fetch), resource: token.resource.clone() };
            let outcome =
                state.tokens.get(key.clone(), uid, Fetch::Imds { api_version: token.api_version.clone() }).await;
            if let (Outcome::Token { .. }, Some(pod)) = (&outcome, snapshot.pod(uid)) {
                remember_grant(state, pod, token, &key);
            }
            Ok(answer_token(outcome, record))
        }
        Decision::Workload { service_account, client_id, tenant_id, .. } => {
            let namespace = record.pod_namespace.clone().unwrap_or_default();
            let who = super::workload::Workload { namespace, service_account, client_id, tenant_id };
            Ok(super::workload::answer(&who, &token.resource, uid, state, record).await)
        }
        Decision::Deny(_) => Err(NotAllowed::Deny),
        Decision::Exception { .. } => Err(NotAllowed::Exception),
        Decision::UnknownPod => Err(NotAllowed::UnknownPod),
    }
}

/// A managed identity's token was answered to `pod`: its workload's next pod is warmed with
/// it, and a scheduled workload's token is kept until its next run ([`super::prefetch`]).
fn remember_grant(state: &AgentState, pod: &crate::policy::Pod, token: &TokenRequest, key: &TokenKey) {
    if pod.owner.is_none() {
        return;
    }
    let want = super::prefetch::Want {
        selector: token.selector.clone(),
        resource: token.resource.clone(),
        api_version: token.api_version.clone(),
    };
    state.workloads.granted(pod, want);
    if let Some(keep) = state.workloads.keep_for(pod) {
        state.tokens.keep_idle(key, keep);
    }
}

/// The snapshot once it knows the pod, or after the grace period, whichever comes first.
/// A miss asks the source to look the pod up ([`crate::sources::kube::PodLookup`]) rather
/// than only wait for the watch.
async fn wait_for_pod(state: &AgentState, uid: &str) -> Arc<Snapshot> {
    let ask = || {
        if let Some(lookup) = &state.lookup {
            lookup.ask(uid);
        }
    };
    snapshot_when(state, |snapshot| snapshot.knows(uid), ask).await
}

/// The first policy snapshot `settled` accepts, waiting for changes until the pod grace
/// period ends (then the last one seen); `on_first_miss` runs once, when the current one is
/// not it.
pub(super) async fn snapshot_when(
    state: &AgentState,
    settled: impl Fn(&Snapshot) -> bool,
    on_first_miss: impl FnOnce(),
) -> Arc<Snapshot> {
    let mut updates = state.snapshot.clone();
    let deadline = tokio::time::Instant::now() + state.pod_grace;
    let mut on_first_miss = Some(on_first_miss);
    loop {
        let snapshot = Arc::clone(&updates.borrow_and_update());
        if settled(&snapshot) {
            return snapshot;
        }
        if let Some(missed) = on_first_miss.take() {
            missed();
        }
        match tokio::time::timeout_at(deadline, updates.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return snapshot, // no more updates, or out of time
        }
    }
}

/// A refusal, or, in `--mode audit` or a namespace `audited` by its annotation, the request
/// forwarded as asked and logged `audit-allow`.
async fn refuse_or_audit(
    token: &TokenRequest,
    state: &AgentState,
    record: &mut DecisionRecord,
    audited: bool,
) -> Answer {
    let mode = if audited { Mode::Audit } else { state.mode };
    match mode {
        Mode::Enforce => {
            record.verdict = "deny";
            report_denial(state, record);
            refusal(&ImdsError::identity_not_found())
        }
        Mode::Audit => {
            record.verdict = "audit-allow";
            forward_as_asked(token, state, record).await
        }
    }
}

/// An Event on the pod, with the reason (with `--kube`).
pub(super) fn report_denial(state: &AgentState, record: &DecisionRecord) {
    if let (Some(events), Some(namespace), Some(pod), Some(uid)) =
        (&state.events, &record.pod_namespace, &record.pod_name, &record.pod_uid)
    {
        events.report(crate::events::Denial {
            namespace: namespace.clone(),
            pod: pod.clone(),
            uid: uid.clone(),
            reason: record.reason.clone(),
        });
    }
}

/// The token request as the client made it (its validated parts only), uncached, within
/// the upstream budget.
async fn forward_as_asked(token: &TokenRequest, state: &AgentState, record: &mut DecisionRecord) -> Answer {
    let selector = token.selector.as_ref().map(|s| match s {
        Selector::ClientId(v) => UpstreamSelector::ClientId(v),
        Selector::ObjectId(v) => UpstreamSelector::ObjectId(v),
        Selector::ResourceId(v) => UpstreamSelector::ResourceId(v),
    });
    let requester = record.pod_uid.clone().unwrap_or_default();
    let _slot = match state.tokens.budget().acquire(&requester).await {
        Ok(slot) => slot,
        Err(overloaded) => return retry_answer(&too_many_requests(overloaded.retry_after), record),
    };
    let upstream = state.upstream.token(token.api_version.as_deref(), &token.resource, selector).await;
    relay(upstream, record)
}

/// A token, IMDS's final answer, or a retryable failure, as the client gets it.
pub(super) fn answer_token(outcome: Outcome, record: &mut DecisionRecord) -> Answer {
    match outcome {
        Outcome::Token { token, served } => {
            record.token_from = Some(served.as_str());
            if served == Served::Upstream {
                record.upstream_status = Some(200);
            }
            let mut answer = Response::new(Full::new(token.body(unix_now())));
            answer.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(JSON));
            answer
        }
        Outcome::Final(response) => relay(Ok(response), record),
        Outcome::Retry(failure) => retry_answer(&failure, record),
    }
}

/// A retryable failure: its status and body, and a `Retry-After`.
fn retry_answer(failure: &Retryable, record: &mut DecisionRecord) -> Answer {
    record.verdict = "error";
    record.reason = format!("{}; {}", record.reason, failure.reason);
    retryable_response(failure)
}

/// The answer for a retryable failure: its status and body, and a `Retry-After`.
pub(super) fn retryable_response(failure: &Retryable) -> Answer {
    let mut answer = Response::new(Full::new(failure.body.clone()));
    *answer.status_mut() = failure.status;
    let headers = answer.headers_mut();
    headers
        .insert(header::CONTENT_TYPE, failure.content_type.clone().unwrap_or(header::HeaderValue::from_static(JSON)));
    headers.insert(header::RETRY_AFTER, header::HeaderValue::from(failure.retry_after.as_secs().max(1)));
    answer
}

/// Passes IMDS's answer back as it came (status, content type, body).
fn relay(upstream: Result<UpstreamResponse, UpstreamError>, record: &mut DecisionRecord) -> Answer {
    match upstream {
        Ok(r) => {
            record.upstream_status = Some(r.status.as_u16());
            let mut answer = Response::new(Full::new(r.body));
            *answer.status_mut() = r.status;
            if let Some(ct) = r.content_type {
                answer.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            answer
        }
        Err(e) => {
            record.verdict = "error";
            record.reason = format!("{}: {:#}", record.reason, anyhow::Error::from(e));
            // IMDS's backend-failure shape; SDKs retry it.
            refusal(&ImdsError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                error: "unknown",
                description: "The metadata service could not be reached".into(),
            })
        }
    }
}

pub(super) fn refusal(e: &ImdsError) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::from(e.body())));
    *answer.status_mut() = e.status;
    answer.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(JSON));
    answer
}
