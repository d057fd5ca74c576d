//! Serving redirected connections: who is calling (kernel origin → cgroup → pod), then HTTP.
//!
//! A connection without a kernel origin record was not redirected by the filter — a direct
//! connection to the agent's port, or one from outside the filtered hierarchy — and is
//! closed without a byte of HTTP. (The `/host/token` listener, [`host_token`], is the
//! exception: its callers connect to it directly, and the kernel's socket table says who
//! they are.) Everything else is served as HTTP/1.1 with keep-alive, a
//! header-read timeout, and limits on header size and count; request bodies are never read.
pub mod admin;
mod handler;
pub mod host_token;
pub mod limits;
pub mod listener;
pub(crate) mod prefetch;
mod principal;
mod workload;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

pub use self::handler::{Caller, Mode};
use crate::{
    caller::CgroupResolver,
    imds::PathRules,
    kernel::{OriginLookup, OriginTable},
    policy::Snapshot,
    tokens::TokenService,
    upstream::Upstream,
};

/// A client has this long to send its request headers; hyper also closes a kept-alive
/// connection that stays silent this long after an answer.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A client that does not read its answers (its receive window stays shut) has this long
/// before a blocked write ends its connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a draining agent waits for its connections to finish: the longest request
/// (the upstream budget's wait, then the metadata service's answer) and an idle timeout.
pub const DRAIN_WITHIN: Duration = Duration::from_secs(30);

/// Waits until the connections `state` holds have finished, at most [`DRAIN_WITHIN`];
/// returns how many were still open.
pub async fn drained(state: &AgentState) -> usize {
    let deadline = tokio::time::Instant::now() + DRAIN_WITHIN;
    while state.limits.held() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    state.limits.held()
}

/// Most bytes of request head buffered (hyper's floor is 8 KiB).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most request headers.
const MAX_HEADERS: usize = 32;

/// What every request handler shares.
pub struct AgentState {
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Calls for forwarded requests (other paths, audit, exceptions).
    pub upstream: Upstream,
    /// Tokens for allowed requests; its budget also paces forwarded token requests.
    pub tokens: Arc<TokenService>,
    /// The budget of calls for metadata paths other than the token endpoint (IMDS limits
    /// them apart from identity calls).
    pub path_budget: Arc<crate::tokens::budget::Budget>,
    /// The kubelet's directory (`/var/lib/kubelet`): pods' projected tokens, for workload
    /// identity.
    pub kubelet_dir: std::path::PathBuf,
    /// Service principals' Secrets.
    pub secrets: crate::secrets::SecretReader,
    pub rules: PathRules,
    pub mode: Mode,
    /// How long to wait for a pod the sources do not know yet.
    pub pod_grace: Duration,
    /// Where to ask for such a pod (the API source, unless `--pod-lookup-interval 0s`).
    pub lookup: Option<crate::sources::kube::PodLookup>,
    /// What each workload's pods were granted, to warm its next pod's tokens.
    pub(crate) workloads: prefetch::Workloads,
    pub origins: Arc<OriginTable>,
    pub resolver: Arc<CgroupResolver>,
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// Kubernetes Events for refusals (with the API source).
    pub events: Option<crate::events::DenialEvents>,
    /// Connections held at once, in all and per pod.
    pub limits: Arc<limits::ConnectionLimits>,
    /// Set once the next agent serves ([`crate::handover`]): accepting stops, and every
    /// answer from then on closes its connection.
    pub draining: watch::Receiver<bool>,
}

/// One warning a second at most for connections closed unserved: callers can make them at will.
pub(super) static REFUSAL_LOG: crate::telemetry::Throttle = crate::telemetry::Throttle::new(Duration::from_secs(1));

/// The next connection on `listener`, or `None` once the agent drains (the next one serves).
/// Accept errors (out of file descriptors under a flood, a connection aborted before it was
/// accepted) are logged and survived: the agent must not stop answering because of them.
pub(super) async fn next_connection(
    listener: &TcpListener,
    draining: &mut watch::Receiver<bool>,
    which: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Ok(_) = draining.wait_for(|d| *d) => return None,
        };
        match accepted {
            Ok(accepted) => return Some(accepted),
            Err(e) => {
                tracing::warn!(error = %e, listener = which, "accept failed; retrying");
                // Give descriptors a moment to be released instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Accepts and serves connections until the agent drains: then it returns, and the
/// connections it accepted finish on their own.
pub async fn serve(listener: TcpListener, state: Arc<AgentState>) {
    let mut draining = state.draining.clone();
    while let Some((stream, peer)) = next_connection(&listener, &mut draining, "metadata").await {
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let Some(caller) = identify(&stream, &state).await else {
                return; // refused and logged
            };
            let pod = caller.cgroup.as_ref().and_then(|c| c.pod_uid.as_deref());
            let _admitted = match state.limits.admit(limits::Share::of(pod)) {
                Ok(admitted) => admitted,
                Err(shed) => {
                    state.telemetry.count_refused(shed.as_str());
                    if let Some(held_back) = REFUSAL_LOG.allow() {
                        tracing::warn!(
                            event = "shed",
                            %peer,
                            cgroup_id = caller.origin.cgroup_id,
                            limit = shed.as_str(),
                            similar_not_logged = held_back,
                            "turned away a connection over the connection limit"
                        );
                    }
                    turn_away(stream).await;
                    return;
                }
            };
            let caller = Arc::new(caller);
            let service = service_fn(move |req| {
                let (state, caller) = (Arc::clone(&state), Arc::clone(&caller));
                async move {
                    let mut answer = handler::handle(req, &caller, &state).await;
                    if *state.draining.borrow() {
                        answer.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                    }
                    Ok::<_, std::convert::Infallible>(answer)
                }
            });
            let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
            stream.set_write_timeout(Some(WRITE_TIMEOUT));
            let io = TokioIo::new(Box::pin(stream));
            let result = http1_limits().keep_alive(true).serve_connection(io, service).await;
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// HTTP/1.1 with the limits every connection gets: header-read timeout, head size, header count.
pub(super) fn http1_limits() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    builder
}

/// The caller of a connection, or `None` (logged) when it must not be served.
async fn identify(stream: &TcpStream, state: &AgentState) -> Option<Caller> {
    let (peer, local) = (stream.peer_addr().ok()?, stream.local_addr().ok()?);
    match caller_of(peer, local, state).await {
        Ok(caller) => Some(caller),
        Err(reason) => {
            state.telemetry.count_refused("no_origin");
            if let Some(held_back) = REFUSAL_LOG.allow() {
                tracing::warn!(
                    event = "refused",
                    %peer,
                    reason,
                    similar_not_logged = held_back,
                    "refused a connection that has no kernel origin record"
                );
            }
            None
        }
    }
}

/// The caller of the connection `peer` → `local` from its kernel origin record, or why not.
/// The record is one short map system call, and a pod's cgroup is nearly always cached:
/// both on the async worker, which saves each connection a hand-off to the blocking pool and
/// back. Only a cgroup not seen yet is looked up in the filesystem, off the workers.
async fn caller_of(peer: SocketAddr, local: SocketAddr, state: &AgentState) -> Result<Caller, String> {
    let origin = match state.origins.take(peer, local) {
        Ok(OriginLookup::Found(origin)) => origin,
        Ok(other) => return Err(format!("{other:?}")),
        Err(e) => return Err(format!("{:#}", anyhow::Error::from(e))),
    };
    if let Some(info) = state.resolver.cached_info(origin.cgroup_id) {
        return Ok(Caller { origin, cgroup: Some(info) });
    }
    let (resolver, id) = (Arc::clone(&state.resolver), origin.cgroup_id);
    let looked_up = tokio::task::spawn_blocking(move || resolver.resolve(id))
        .await
        .map_err(|e| format!("cgroup lookup task failed: {e}"))?;
    let cgroup = looked_up.map_err(|e| format!("resolving cgroup: {e}"))?;
    Ok(Caller { origin, cgroup })
}

/// Most over-limit connections being told to retry at once; past that they are just closed.
static TURNING_AWAY: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1024);

/// Answers an over-limit connection's request with IMDS's own throttling answer — a 429
/// `too_many_requests` with `Retry-After` — so that SDKs back off and retry instead of failing
/// on a dropped connection, then closes it. The request is read first (HTTP clients fail on an
/// answer that comes before their request), within the usual header-read timeout.
async fn turn_away(stream: TcpStream) {
    let Ok(_turning_away) = TURNING_AWAY.try_acquire() else {
        return; // dropped: closed
    };
    let throttled = crate::tokens::retryable(
        &crate::imds::ImdsError::too_many_requests("Too many connections from this pod; retry"),
        Duration::from_secs(1),
        "over the connection limit".into(),
    );
    let service = service_fn(move |_req| {
        let answer = handler::retryable_response(&throttled);
        async move { Ok::<_, std::convert::Infallible>(answer) }
    });
    let serving = http1_limits().keep_alive(false).serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(HEADER_READ_TIMEOUT + Duration::from_secs(1), serving).await;
}
