//! NMI's host endpoint, `GET /host/token/?resource=…` with `podns` and `podname` headers, for
//! the Secrets Store CSI driver's Azure provider in its pod-identity mode: it mounts Key Vault
//! objects into a pod with that pod's identity, asking from its own hostNetwork pod on
//! `localhost:2579`. The answer is NMI's: `{"token": <IMDS's token>, "clientid": …}`.
//!
//! Anyone on the node can send those headers, so the caller must be trusted
//! ([`crate::policy::TrustedCaller`]): the connection is looked up in the kernel's socket
//! table (`sock_diag`), which says which cgroup made the client's socket, and that cgroup
//! must be a pod of a ServiceAccount the operator named. The pod named in the headers must be
//! on this node, and gets what its own request would get — never more: audit does not apply
//! here, an exception has nothing to serve, and a refusal is a refusal.
use std::{net::SocketAddrV4, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use super::{
    handler::{self, Endpoint, NotAllowed, Recorded},
    AgentState,
};
use crate::{
    caller::CgroupInfo,
    decisions::DecisionRecord,
    imds::{self, ImdsError, JSON_CONTENT_TYPE},
    policy::{Decision, HostTokenRefusal, Pod, Snapshot, TrustedCaller},
};

/// The path the CSI provider asks (with or without a trailing slash).
pub const PATH: &str = "/host/token";

type Answer = Response<Full<Bytes>>;

/// Who called, as the kernel says.
struct HostCaller {
    cgroup_id: u64,
    /// The pod, if the cgroup is one of the kubelet's pods'.
    pod_uid: Option<String>,
}

/// How `/host/token` is served.
#[derive(Clone, Debug)]
pub struct HostTokenConfig {
    /// A loopback address ([`check_listen`]).
    pub listen: SocketAddrV4,
    pub trusted: Vec<TrustedCaller>,
    /// The attach cgroup, relative to the cgroup2 root (`/kubepods`): only a cgroup below it
    /// can be a pod's. Above it, or beside it, a process could name a cgroup it made like a
    /// pod's (`…/user@1000.service/pod<uid>`) and pass for that pod.
    pub pods_under: String,
}

/// Listens on the configured address once it is free (an earlier agent holds it until it
/// hands the node over), and serves `/host/token` until this agent hands over in turn.
pub async fn run(config: HostTokenConfig, state: Arc<AgentState>) {
    let listen = config.listen;
    let mut tries = 0u32;
    let listener = loop {
        match super::listener::bind(listen) {
            Ok(listener) => break listener,
            Err(e) if tries.is_multiple_of(30) => tracing::warn!(
                %listen,
                error = %e,
                holder = %super::listener::held_by(listen),
                "cannot listen for /host/token yet: CSI mounts in pod-identity mode fail until it is free"
            ),
            Err(_) => {}
        }
        tries = tries.wrapping_add(1);
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    if let Err(e) = self_test(&listener).await {
        tracing::error!(
            %listen,
            error = %e,
            "the kernel cannot say who connects to /host/token here: every caller will be refused"
        );
    }
    let trusted = config.trusted.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    tracing::info!(%listen, trusted, "serving /host/token");
    serve(listener, Arc::new(config), state).await;
}

/// Attributes a connection of the agent's own to `listener`, as every caller will be.
async fn self_test(listener: &TcpListener) -> std::io::Result<()> {
    let own = TcpStream::connect(listener.local_addr()?).await?;
    let (_accepted, peer) = listener.accept().await?;
    let local = listener.local_addr()?;
    let found = tokio::task::spawn_blocking(move || crate::kernel::sockdiag::cgroup_of(peer, local))
        .await
        .map_err(std::io::Error::other)??;
    drop(own);
    found.map(drop).ok_or_else(|| std::io::Error::other("the agent's own connection was not found"))
}

async fn serve(listener: TcpListener, config: Arc<HostTokenConfig>, state: Arc<AgentState>) {
    let mut draining = state.draining.clone();
    while let Some((stream, peer)) = super::next_connection(&listener, &mut draining, "/host/token").await {
        let (state, config) = (Arc::clone(&state), Arc::clone(&config));
        tokio::spawn(async move {
            let Some(caller) = identify(&stream, &config, &state).await else { return };
            let pod = caller.pod_uid.as_deref();
            let Ok(_admitted) = state.limits.admit(super::limits::Share::of(pod)) else {
                state.telemetry.count_refused("host_token_limit");
                return; // closed: the provider retries its mount
            };
            let caller = Arc::new(caller);
            let service = service_fn(move |req| {
                let (state, caller, config) = (Arc::clone(&state), Arc::clone(&caller), Arc::clone(&config));
                async move { Ok::<_, std::convert::Infallible>(handle(req, &caller, &config.trusted, &state).await) }
            });
            let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
            stream.set_write_timeout(Some(super::WRITE_TIMEOUT));
            let io = TokioIo::new(Box::pin(stream));
            // One request per connection: the caller was attributed for this one, and a
            // mount asks once.
            if let Err(e) = super::http1_limits().keep_alive(false).serve_connection(io, service).await {
                tracing::debug!(%peer, error = %e, "/host/token connection ended with an error");
            }
        });
    }
}

/// The cgroup that made the client's socket, from the kernel's socket table, and the pod it
/// is if it is below the attach cgroup; `None` (logged) when the kernel cannot say, so the
/// connection is closed unserved.
async fn identify(stream: &TcpStream, config: &HostTokenConfig, state: &AgentState) -> Option<HostCaller> {
    let (peer, local) = (stream.peer_addr().ok()?, stream.local_addr().ok()?);
    let resolver = Arc::clone(&state.resolver);
    let found = tokio::task::spawn_blocking(move || -> Result<(u64, Option<CgroupInfo>), String> {
        let cgroup_id = crate::kernel::sockdiag::cgroup_of(peer, local)
            .map_err(|e| format!("sock_diag: {e}"))?
            .ok_or("the kernel has no such socket (closed already)")?;
        let cgroup = resolver.resolve(cgroup_id).map_err(|e| format!("resolving cgroup: {e}"))?;
        Ok((cgroup_id, cgroup))
    })
    .await;
    match found {
        Ok(Ok((cgroup_id, cgroup))) => {
            let pod_uid = cgroup.and_then(|c| pod_below(&c.path, &config.pods_under));
            Some(HostCaller { cgroup_id, pod_uid })
        }
        Ok(Err(reason)) => {
            state.telemetry.count_refused("host_token_unattributed");
            if let Some(held_back) = super::REFUSAL_LOG.allow() {
                tracing::warn!(
                    %peer,
                    reason,
                    similar_not_logged = held_back,
                    "closed a /host/token connection the kernel could not attribute"
                );
            }
            None
        }
        Err(e) => {
            tracing::error!(%peer, error = %e, "/host/token attribution task failed");
            None
        }
    }
}

/// The pod whose cgroup `path` is, if it is below `pods_under` (the kubelet's hierarchy);
/// `None` for any other cgroup, however it is named.
fn pod_below(path: &str, pods_under: &str) -> Option<String> {
    let rest = path.strip_prefix(pods_under.trim_end_matches('/'))?.strip_prefix('/')?;
    crate::caller::podpath::pod_uid(rest)
}

async fn handle<B>(req: Request<B>, caller: &HostCaller, trusted: &[TrustedCaller], state: &AgentState) -> Answer {
    let (req, _unread_body) = req.into_parts();
    let from = Recorded { cgroup_id: caller.cgroup_id, pid: 0, endpoint: Endpoint::HostToken };
    let answer =
        handler::recorded(&req, from, state, async |record| answer(&req, caller, trusted, state, record).await);
    answer.await
}

async fn answer(
    req: &http::request::Parts,
    caller: &HostCaller,
    trusted: &[TrustedCaller],
    state: &AgentState,
    record: &mut DecisionRecord,
) -> Answer {
    let asked = match parse(req) {
        Ok(asked) => asked,
        Err(e) => {
            record.verdict = "invalid";
            record.reason.clone_from(&e.description);
            return handler::refusal(&e);
        }
    };
    let caller_uid = caller.pod_uid.as_deref();
    let (snapshot, target) = target(state, caller_uid, trusted, &asked).await;
    let caller_name = caller_uid.and_then(|uid| snapshot.pod(uid)).map(|p| format!("{}/{}", p.namespace, p.name));
    let on_behalf = format!("/host/token from {}", caller_name.as_deref().unwrap_or("a caller that is not a pod"));
    let target = match target {
        Ok(pod) => pod,
        Err(refusal) => {
            record.reason = format!("{on_behalf}: {}", refusal.describe());
            let (verdict, status, error) = match refusal {
                HostTokenRefusal::UnknownPod { .. } => ("unknown-pod", StatusCode::NOT_FOUND, "not_found"),
                HostTokenRefusal::UnknownCaller | HostTokenRefusal::Untrusted { .. } => {
                    ("deny", StatusCode::FORBIDDEN, "forbidden")
                }
            };
            record.verdict = verdict;
            return handler::refusal(&ImdsError { status, error, description: refusal.describe() });
        }
    };
    record.pod_uid = Some(target.uid.clone());
    record.pod_namespace = Some(target.namespace.clone());
    record.pod_name = Some(target.name.clone());
    record.selector = asked.token.selector.as_ref().map(crate::policy::Selector::describe);
    let decision = snapshot.decide(&target.uid, asked.token.selector.as_ref());
    record.identity = decision.identity(&target.namespace);
    record.reason = format!("{on_behalf}: {}", decision.reason());
    let client_id = match &decision {
        Decision::Allow { identity, .. } => identity.client_id.clone(),
        Decision::Workload { client_id, .. } => (*client_id).to_owned(),
        _ => String::new(),
    };
    let uid = target.uid.clone();
    match handler::serve_allowed(decision, &asked.token, &uid, &snapshot, state, record).await {
        Ok(answer) if answer.status() == StatusCode::OK => nmi_answer(answer, &client_id).await,
        Ok(answer) => answer,
        Err(not_allowed) => {
            record.verdict = match not_allowed {
                NotAllowed::UnknownPod => "unknown-pod",
                NotAllowed::Deny | NotAllowed::Exception => "deny",
            };
            if matches!(not_allowed, NotAllowed::Exception) {
                record.reason = format!("{on_behalf}: the pod is an exception, with no binding to serve");
            }
            handler::report_denial(state, record);
            handler::refusal(&ImdsError {
                status: StatusCode::NOT_FOUND,
                error: "not_found",
                description: record.reason.clone(),
            })
        }
    }
}

/// What the request asks: the token request, and the pod it is for.
struct Asked {
    token: imds::TokenRequest,
    namespace: String,
    name: String,
}

/// NMI's request: `GET /host/token[/]`, the token endpoint's query, one `podns` and one
/// `podname` header.
fn parse(req: &http::request::Parts) -> Result<Asked, ImdsError> {
    if !matches!(req.uri.path(), "/host/token" | "/host/token/") {
        return Err(ImdsError { status: StatusCode::NOT_FOUND, error: "not_found", description: "Not found".into() });
    }
    if req.method != Method::GET {
        return Err(ImdsError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            error: "invalid_request",
            description: format!("The {} method is not allowed", req.method),
        });
    }
    let token = imds::token_query(req.uri.query())?;
    let header = |name: &str| {
        let mut values = req.headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (Some(value), None) => value.to_str().ok().filter(|v| !v.is_empty()).map(str::to_owned),
            _ => None,
        }
    };
    let (Some(namespace), Some(name)) = (header("podns"), header("podname")) else {
        return Err(ImdsError::bad_request("missing 'podname' and 'podns' from request header"));
    };
    Ok(Asked { token, namespace, name })
}

/// The pod the request names, once the caller is trusted; waits up to the pod grace period
/// for a caller or a pod the sources have not brought yet (a CSI mount comes before its
/// pod's containers start). A caller that is no pod at all is refused at once.
async fn target(
    state: &AgentState,
    caller_uid: Option<&str>,
    trusted: &[TrustedCaller],
    asked: &Asked,
) -> (Arc<Snapshot>, Result<Pod, HostTokenRefusal>) {
    let find =
        |snapshot: &Snapshot| snapshot.host_token_target(caller_uid, trusted, &asked.namespace, &asked.name).cloned();
    // An unknown pod or caller may only not have reached the policy yet; a node process
    // (no pod) never will.
    let settled = |snapshot: &Snapshot| {
        caller_uid.is_none()
            || !matches!(find(snapshot), Err(HostTokenRefusal::UnknownPod { .. } | HostTokenRefusal::UnknownCaller))
    };
    let snapshot = handler::snapshot_when(state, settled, || {}).await;
    let found = find(&snapshot);
    (snapshot, found)
}

/// IMDS's token answer as NMI wraps it: `{"token": …, "clientid": …}`, the client id the
/// metadata service answered with when it says one (`identity_client_id` otherwise). A
/// service principal answered for several tenants gives the first (its own tenant's).
async fn nmi_answer(answer: Answer, identity_client_id: &str) -> Answer {
    let Ok(body) = answer.into_body().collect().await.map(http_body_util::Collected::to_bytes);
    let token = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Array(mut tokens)) if !tokens.is_empty() => tokens.swap_remove(0),
        Ok(token @ serde_json::Value::Object(_)) => token,
        _ => {
            return handler::refusal(&ImdsError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                error: "unknown",
                description: "The token could not be read".into(),
            })
        }
    };
    let client_id = token["client_id"].as_str().unwrap_or(identity_client_id).to_owned();
    let wrapped = serde_json::json!({ "token": token, "clientid": client_id }).to_string();
    let mut answer = Response::new(Full::new(Bytes::from(wrapped)));
    answer.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(JSON_CONTENT_TYPE));
    answer
}

/// The `--host-token-listen` address must be loopback: the provider asks `localhost`, and the
/// endpoint is for processes on the node.
///
/// # Errors
/// Not a loopback address, said in a sentence.
pub fn check_listen(listen: SocketAddrV4) -> Result<SocketAddrV4, String> {
    if listen.ip().is_loopback() {
        Ok(listen)
    } else {
        Err(format!("--host-token-listen {listen}: must be a loopback address (the CSI provider asks localhost:2579)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_cgroup_below_the_kubelets_hierarchy_is_a_pods() {
        let uid = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b";
        for (path, pod) in [
            (format!("/kubepods/burstable/pod{uid}/0123abcd"), Some(uid)),
            (format!("/kubepods/pod{uid}"), Some(uid)),
            // Named like a pod's, elsewhere: a delegated subtree, a sibling, a prefix.
            (format!("/user.slice/user-1000.slice/user@1000.service/pod{uid}"), None),
            (format!("/pod{uid}/kubepods/x"), None),
            (format!("/kubepods-evil/pod{uid}"), None),
            ("/kubepods".to_owned(), None),
        ] {
            assert_eq!(pod_below(&path, "/kubepods").as_deref(), pod, "{path}");
        }
        assert_eq!(pod_below(&format!("/a/kubepods/pod{uid}"), "/a/kubepods/").as_deref(), Some(uid));
    }
}
