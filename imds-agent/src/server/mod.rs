//! Serving redirected connections: who is calling (kernel origin → cgroup → pod), then HTTP.
//!
//! A connection without a kernel origin record was not redirected by the filter — a direct
//! connection to the agent's port, or one from outside the filtered hierarchy — and is
//! closed without a byte of HTTP. Everything else is served as HTTP/1.1 with keep-alive, a
//! header-read timeout, and limits on header size and count; request bodies are never read.
mod handler;
mod principal;
mod workload;

use std::{sync::Arc, time::Duration};

use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch};

pub use self::handler::{Caller, Mode};
use crate::{
    caller::CgroupResolver,
    imds::PathRules,
    kernel::{OriginLookup, OriginTable},
    policy::Snapshot,
    tokens::TokenService,
    upstream::Upstream,
};

/// A client has this long to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of request head buffered (hyper's floor is 8 KiB).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most request headers.
const MAX_HEADERS: usize = 32;

/// What every request handler shares.
pub struct AgentState {
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Calls for forwarded requests (other paths, audit, exceptions).
    pub upstream: Upstream,
    /// Tokens for allowed requests; its budget also paces forwarded calls.
    pub tokens: Arc<TokenService>,
    /// The kubelet's directory (`/var/lib/kubelet`): pods' projected tokens, for workload
    /// identity.
    pub kubelet_dir: std::path::PathBuf,
    /// Service principals' Secrets.
    pub secrets: crate::secrets::SecretReader,
    pub rules: PathRules,
    pub mode: Mode,
    /// How long to wait for a pod the sources do not know yet.
    pub pod_grace: Duration,
    pub origins: Arc<OriginTable>,
    pub resolver: Arc<CgroupResolver>,
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// Kubernetes Events for refusals (with the API source).
    pub events: Option<crate::events::DenialEvents>,
}

/// Accepts and serves connections for as long as the agent runs. Accept errors (out of file
/// descriptors under a flood, a connection aborted before it was accepted) are logged and
/// survived: the agent must not stop answering because of them.
pub async fn serve(listener: TcpListener, state: Arc<AgentState>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; retrying");
                // Give descriptors a moment to be released instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let Some(caller) = identify(&stream, &state).await else {
                return; // refused and logged
            };
            let caller = Arc::new(caller);
            let service = service_fn(move |req| {
                let (state, caller) = (Arc::clone(&state), Arc::clone(&caller));
                async move { Ok::<_, std::convert::Infallible>(handler::handle(req, &caller, &state).await) }
            });
            let result = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .max_headers(MAX_HEADERS)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// The caller of a connection, or `None` (logged) when it must not be served.
async fn identify(stream: &tokio::net::TcpStream, state: &AgentState) -> Option<Caller> {
    let (peer, local) = (stream.peer_addr().ok()?, stream.local_addr().ok()?);
    let (origins, resolver) = (Arc::clone(&state.origins), Arc::clone(&state.resolver));
    // Map lookups are syscalls: keep them off the async workers.
    let found = tokio::task::spawn_blocking(move || {
        let origin = match origins.take(peer, local) {
            Ok(OriginLookup::Found(o)) => o,
            Ok(other) => return Err(format!("{other:?}")),
            Err(e) => return Err(format!("{:#}", anyhow::Error::from(e))),
        };
        let cgroup = resolver.resolve(origin.cgroup_id).map_err(|e| format!("resolving cgroup: {e}"))?;
        Ok(Caller { origin, cgroup })
    })
    .await;
    match found {
        Ok(Ok(caller)) => Some(caller),
        Ok(Err(reason)) => {
            tracing::warn!(event = "refused", %peer, reason, "refused a connection that has no kernel origin record");
            None
        }
        Err(e) => {
            tracing::error!(%peer, error = %e, "origin lookup task failed");
            None
        }
    }
}
