//! The operator commands' end of the control socket: one [`Query`] per call, within 2 s.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::Query;
use crate::operator::{
    explain::{Explanation, PodRef},
    status::AgentStatus,
};

/// Asks the agent whose control socket is at `socket`. Every error says, in words, why
/// there is no answer.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    #[must_use]
    pub fn new(socket: &Path) -> Client {
        Client { socket: socket.to_owned() }
    }

    /// The agent's account of itself.
    ///
    /// # Errors
    /// No agent answers, or not with a status.
    pub async fn status(&self) -> Result<AgentStatus, String> {
        self.json(&Query::Status).await
    }

    /// The agent's policy simulator, for `pod` asking `request`.
    ///
    /// # Errors
    /// No agent answers, or not with an explanation.
    pub async fn explain(&self, pod: PodRef, request: String) -> Result<Explanation, String> {
        self.json(&Query::Explain { pod, request }).await
    }

    /// Whether the agent is healthy (`ready`: ready), and its sentence saying so. For the
    /// kubelet's exec probes (`imds-agent health`).
    ///
    /// # Errors
    /// No agent answers.
    pub async fn health(&self, ready: bool) -> Result<(bool, String), String> {
        let (status, body) = self.ask(&if ready { Query::Ready } else { Query::Health }).await?;
        Ok((status.is_success(), String::from_utf8_lossy(&body).trim().to_owned()))
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, query: &Query) -> Result<T, String> {
        let (status, body) = self.ask(query).await?;
        if !status.is_success() {
            return Err(format!("the agent answered {status}: {}", String::from_utf8_lossy(&body).trim()));
        }
        serde_json::from_slice(&body).map_err(|e| format!("the agent's answer is not what was asked for: {e}"))
    }

    /// One request on the control socket, within 2 s: the status and the body.
    async fn ask(&self, query: &Query) -> Result<(StatusCode, Bytes), String> {
        let socket = &self.socket;
        let asked = async {
            let stream = UnixStream::connect(socket).await.map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    format!("no agent is running (no control socket at {})", socket.display())
                }
                std::io::ErrorKind::ConnectionRefused => {
                    format!("no agent is running (nothing listens on {})", socket.display())
                }
                _ => format!("cannot reach the agent at {}: {e}", socket.display()),
            })?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("{e}"))?;
            tokio::spawn(connection);
            let request = Request::get(query.uri())
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
}
