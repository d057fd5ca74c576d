//! The agent's control socket: `imds-agent status` and `explain` ask the running agent here.
//!
//! A Unix socket, not a TCP port: `/explain` tells which identities a pod is bound to, and
//! any pod on the node can reach the node's addresses (the metrics port among them). The
//! socket is owner-only (0600, in a 0700 directory), so only root on the node, or in the
//! agent's own container, can ask. HTTP/1.1 on it, JSON answers:
//!
//! - `GET /status`: [`AgentStatus`];
//! - `GET /explain?pod=NS/NAME&request=PATH` (or `uid=UID`): [`crate::explain::Explanation`];
//! - `GET /healthz`, `GET /readyz`: as on the metrics port, as text (`imds-agent health`).
use std::{
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};

use crate::telemetry::Telemetry;

/// Where the agent listens and the commands ask, unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/imds-filter/agent.sock";

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another agent is serving on {0}; two agents on one node would fight over the filter")]
    InUse(PathBuf),
    #[error("{what} {}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

/// Binds the control socket, replacing one a dead agent left. Refuses when a live agent
/// answers there, unless it handed the node over to this one (`replace_live`): called
/// before the agent touches the kernel, so a second agent stops before it takes over the
/// first one's filter.
pub async fn claim(path: &Path, replace_live: bool) -> Result<UnixListener, ControlError> {
    let io = |what: &'static str| move |source| ControlError::Io { what, path: path.to_owned(), source };
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io("creating the directory of"))?;
    }
    if path.exists() {
        if !replace_live && UnixStream::connect(path).await.is_ok() {
            return Err(ControlError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io("removing the earlier control socket"))?;
    }
    let listener = UnixListener::bind(path).map_err(io("binding the control socket"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io("restricting"))?;
    Ok(listener)
}

/// Serves the control socket until the agent exits, bounded like every listener
/// (`server::admin`).
pub fn serve(listener: UnixListener, telemetry: Arc<Telemetry>) {
    crate::server::admin::serve_unix(
        listener,
        Arc::new(move |req| answer(req.uri().path(), req.uri().query(), &telemetry)),
    );
}

fn answer(path: &str, query: Option<&str>, telemetry: &Telemetry) -> Response<Full<Bytes>> {
    let json = |body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
        r
    };
    let refuse = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    match path {
        // The kubelet's exec probes ask here: on the metrics port, a replaced agent's probes
        // could be answered by its successor, which serves the same socket.
        "/healthz" | "/readyz" => crate::telemetry::answer(path, telemetry),
        "/status" => json(serde_json::to_string(&telemetry.status()).unwrap_or_default()),
        "/explain" => match telemetry.explain(query) {
            Ok(explanation) => json(serde_json::to_string(&explanation).unwrap_or_default()),
            Err(e) => refuse(StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
        _ => refuse(StatusCode::NOT_FOUND, "not found: try /status, /explain, /healthz or /readyz\n".into()),
    }
}

/// Asks the agent on `socket` for `path_and_query` and reads the JSON answer, within 2 s.
/// The error says, in words, why there is no answer.
pub async fn ask<T: serde::de::DeserializeOwned>(socket: &Path, path_and_query: &str) -> Result<T, String> {
    let (status, body) = request(socket, path_and_query).await?;
    if !status.is_success() {
        return Err(format!("the agent answered {status}: {}", String::from_utf8_lossy(&body).trim()));
    }
    serde_json::from_slice(&body).map_err(|e| format!("the agent's answer is not what was asked for: {e}"))
}

/// Asks the agent on `socket` whether it is healthy (`ready`: ready); its sentence saying so.
/// For the kubelet's exec probes (`imds-agent health`).
pub async fn health(socket: &Path, ready: bool) -> Result<(bool, String), String> {
    let (status, body) = request(socket, if ready { "/readyz" } else { "/healthz" }).await?;
    Ok((status.is_success(), String::from_utf8_lossy(&body).trim().to_owned()))
}

/// One request on the control socket, within 2 s: the status and the body.
async fn request(socket: &Path, path_and_query: &str) -> Result<(StatusCode, Bytes), String> {
    let asked = async {
        let stream = UnixStream::connect(socket).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("no agent is running (no control socket at {})", socket.display()),
            std::io::ErrorKind::ConnectionRefused => {
                format!("no agent is running (nothing listens on {})", socket.display())
            }
            _ => format!("cannot reach the agent at {}: {e}", socket.display()),
        })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("{e}"))?;
        tokio::spawn(connection);
        let request = Request::get(path_and_query)
            .header(header::HOST, "imds-agent")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("{e}"))?;
        let response = sender.send_request(request).await.map_err(|e| format!("asking the agent: {e}"))?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| format!("reading the agent's answer: {e}"))?;
        Ok((status, body.to_bytes()))
    };
    tokio::time::timeout(Duration::from_secs(2), asked)
        .await
        .unwrap_or_else(|_| Err(format!("the agent at {} did not answer within 2 s", socket.display())))
}
