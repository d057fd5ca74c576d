//! The HTTP server under every test double (fake IMDS, fake Entra, fake API server): HTTP/1.1
//! on a listener the test bound (wherever it needs it, e.g. inside a namespace), on a thread
//! with its own runtime, until dropped.
use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, thread::JoinHandle};

use bytes::Bytes;
use http::{Request, Response};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;

/// A running server; stops (and joins its thread) on drop.
pub struct HttpServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serves `answer(peer, request)` for every request on `listener`, on one thread.
    pub fn serve<F, Fut, B>(listener: std::net::TcpListener, answer: F) -> HttpServer
    where
        F: Fn(SocketAddr, Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        Self::serve_on(tokio::runtime::Builder::new_current_thread(), listener, answer)
    }

    /// As [`HttpServer::serve`], on a runtime built by `runtime` (e.g. multi-threaded, as
    /// the agent's is, for a benchmark's baseline).
    pub fn serve_on<F, Fut, B>(
        mut runtime: tokio::runtime::Builder,
        listener: std::net::TcpListener,
        answer: F,
    ) -> HttpServer
    where
        F: Fn(SocketAddr, Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let answer = Arc::new(answer);
        let runtime = runtime.enable_all().build().expect("runtime");
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                listener.set_nonblocking(true).expect("nonblocking");
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let accept = async {
                    loop {
                        let Ok((stream, peer)) = listener.accept().await else { continue };
                        let answer = Arc::clone(&answer);
                        tokio::spawn(async move {
                            let service = service_fn(move |req| {
                                let answer = Arc::clone(&answer);
                                async move { Ok::<_, Infallible>(answer(peer, req).await) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stopped => {}
                }
            });
        });
        HttpServer { addr, stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
