//! The agent's end of the control socket: claim it at start, answer [`Query`]s from the
//! agent's [`Account`] of itself.
use std::{
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;
use tokio::{
    net::{UnixListener, UnixStream},
    sync::watch,
};

use super::{Query, QueryError};
use crate::{
    operator::{
        explain::{self, Explanation, PodRef},
        status::{AgentStatus, UncontainedPod},
    },
    policy::Snapshot,
    telemetry::{self, Telemetry},
};

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
///
/// # Errors
/// A live agent answers there, or the socket cannot be made.
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

/// What the agent says about itself on the control socket.
pub struct Account {
    /// `version`, `mode`, `source` and `listen` are kept; the rest is filled in at each
    /// question.
    pub facts: AgentStatus,
    /// How `/explain` decides: as the agent does.
    pub settings: explain::Settings,
    /// The policy in force.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Health, readiness and the open connections.
    pub telemetry: Arc<Telemetry>,
}

impl Account {
    /// The agent's account of itself now.
    fn status(&self) -> AgentStatus {
        // The policy's part first, its lock released before the kernel is asked.
        let (sizes, uncontained_pods) = {
            let snapshot = self.snapshot.borrow();
            let uncontained: Vec<UncontainedPod> = snapshot
                .pods()
                .filter_map(|p| {
                    let why = p.uncontained();
                    (!why.is_empty()).then(|| UncontainedPod {
                        pod: format!("{}/{}", p.namespace, p.name),
                        why: why.into_iter().map(str::to_owned).collect(),
                    })
                })
                .collect();
            (snapshot.sizes(), uncontained)
        };
        let (pods, identities, bindings, exceptions) = sizes;
        let (ready, readiness) = self.telemetry.readiness();
        let source = &self.telemetry.source;
        AgentStatus {
            policy: [("pods", pods), ("identities", identities), ("bindings", bindings), ("exceptions", exceptions)]
                .into_iter()
                .map(|(k, n)| (k.to_owned(), n))
                .collect(),
            unhealthy: self.telemetry.unhealthy(),
            ready,
            readiness,
            source_synced: source.is_synced(),
            source_failing: source.failing(),
            last_sync_unix: source.last_sync_unix(),
            connections_open: self.telemetry.connections_open.get(),
            uncontained_pods,
            ..self.facts.clone()
        }
    }

    /// The policy simulator over the policy in force.
    fn explain(&self, pod: &PodRef, request: &str) -> Explanation {
        explain::explain(&self.snapshot.borrow(), &self.settings, pod, request)
    }

    fn answer(&self, path: &str, query: Option<&str>) -> Response<Full<Bytes>> {
        match Query::parse(path, query) {
            // The kubelet's exec probes ask here: on the metrics port, a replaced agent's
            // probes could be answered by its successor, which serves the same socket.
            Ok(Query::Health | Query::Ready) => telemetry::answer(path, &self.telemetry),
            Ok(Query::Status) => json(&self.status()),
            Ok(Query::Explain { pod, request }) => json(&self.explain(&pod, &request)),
            Err(e @ QueryError::NotFound) => text(StatusCode::NOT_FOUND, &e),
            Err(e @ QueryError::Invalid(_)) => text(StatusCode::BAD_REQUEST, &e),
        }
    }
}

fn json(answer: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(answer) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

fn text(status: StatusCode, body: &impl std::fmt::Display) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r
}

/// Serves the control socket until the agent exits, bounded like every listener
/// (`server::admin`).
pub fn serve(listener: UnixListener, account: Account) {
    let account = Arc::new(account);
    crate::server::admin::serve_unix(
        listener,
        Arc::new(move |req| account.answer(req.uri().path(), req.uri().query())),
    );
}
