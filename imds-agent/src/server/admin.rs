//! The agent's two administrative HTTP listeners, the metrics port and the control socket,
//! bounded like the agent port: the header-read timeout (which also ends a connection that
//! never sends a byte), a write timeout, one request per connection, and a cap on the
//! connections held at once (per peer address and in all). The metrics port sits on the
//! node's address, which every pod can reach: without these, a pod could hold connections
//! there until the agent ran out of memory or descriptors.
//!
//! The node's own addresses are not capped: the kubelet's probes come from there, and pods
//! elsewhere must not be able to crowd them out. (hostNetwork pods share those addresses;
//! such pods are not contained by the filter either, see SECURITY.md.)
use std::{convert::Infallible, net::IpAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
};
use tokio_io_timeout::TimeoutStream;

use super::{http1_limits, limits::ConnectionLimits, WRITE_TIMEOUT};

/// Answers one request.
pub type Answer = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// Connections the metrics port holds at once from other addresses than the node's, in
/// all; scrapes take one each, for milliseconds.
const METRICS_TOTAL: usize = 256;
/// The same, from one address.
const METRICS_PER_PEER: usize = 16;
/// One warning a second at most for connections turned away: callers can make them at will.
static SHED_LOG: crate::telemetry::Throttle = crate::telemetry::Throttle::new(Duration::from_secs(1));
/// Connections the control socket holds at once (only root on the node reaches it).
const CONTROL_TOTAL: usize = 16;

/// Serves the metrics port until the agent exits, or stops accepting there once `stop` is
/// set (the next agent serves the same socket, see [`crate::handover`]).
pub fn serve_tcp(listener: TcpListener, answer: Answer, mut stop: tokio::sync::watch::Receiver<bool>) {
    let cap: Arc<ConnectionLimits<IpAddr>> = ConnectionLimits::new(METRICS_TOTAL, METRICS_PER_PEER, Gauge::default());
    let own = listener.local_addr().map(|a| a.ip()).ok();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                Ok(_) = stop.wait_for(|s| *s) => return,
            };
            let Ok((stream, peer)) = accept(accepted).await else { continue };
            let node = peer.ip().is_loopback() || Some(peer.ip()) == own;
            let admitted = if node {
                None
            } else if let Ok(admitted) = cap.admit(peer.ip()) {
                Some(admitted)
            } else {
                if let Some(held_back) = SHED_LOG.allow() {
                    tracing::warn!(%peer, similar_not_logged = held_back, "metrics port: turned away a connection over the cap");
                }
                continue; // dropped: the connection is closed
            };
            let answer = Arc::clone(&answer);
            tokio::spawn(async move {
                serve_one(stream, answer).await;
                drop(admitted);
            });
        }
    });
}

/// An accepted connection, or `Err` after a pause when the process is out of descriptors or
/// memory (errors of one connection need none).
async fn accept<T>(accepted: std::io::Result<T>) -> Result<T, ()> {
    match accepted {
        Ok(accepted) => Ok(accepted),
        Err(e) => {
            if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) {
                if let Some(held_back) = SHED_LOG.allow() {
                    tracing::warn!(error = %e, similar_not_logged = held_back, "accept failed; pausing");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(())
        }
    }
}

/// Serves the control socket until the agent exits.
pub fn serve_unix(listener: UnixListener, answer: Answer) {
    let cap: Arc<ConnectionLimits<()>> = ConnectionLimits::new(CONTROL_TOTAL, CONTROL_TOTAL, Gauge::default());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = accept(listener.accept().await).await else { continue };
            let Ok(admitted) = cap.admit(()) else { continue };
            let answer = Arc::clone(&answer);
            tokio::spawn(async move {
                serve_one(stream, answer).await;
                drop(admitted);
            });
        }
    });
}

/// One request on `stream`, within the header-read and write timeouts.
async fn serve_one<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S, answer: Answer) {
    let mut stream = TimeoutStream::new(stream);
    stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let service = service_fn(move |req: Request<Incoming>| {
        let response = answer(&req);
        async move { Ok::<_, Infallible>(response) }
    });
    // The header-read timeout also ends a connection that never sends a byte.
    if let Err(e) = http1_limits().keep_alive(false).serve_connection(TokioIo::new(Box::pin(stream)), service).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
