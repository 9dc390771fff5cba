//! The pipeline's own HTTP endpoint: `GET /metrics`, `GET /health`, `GET /ready`.
//!
//! It runs on its own thread with a one-thread tokio runtime, so health checks
//! are answered even while the handlers' runtime is saturated, and a pipeline
//! with sync handlers needs no runtime. Bounded: at most
//! [`MAX_CONNECTIONS`] connections are served at once (more wait in the
//! listen backlog), and a connection that sends no complete request head
//! within [`HEADER_TIMEOUT`] is closed.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{oneshot, Semaphore};

use super::{MetricsFormat, Observed, PipelineCollector};

/// Connections served at once. Scrapers and probes are a handful per
/// instance; 16 leaves room for all with keep-alive, and bounds what a
/// misbehaving client can hold.
pub(crate) const MAX_CONNECTIONS: usize = 16;

/// How long a connection may take to send a request head. Probes and
/// scrapers send theirs at once; 10 s is well under their own timeouts.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The running endpoint; stopped (and its thread joined) by [`Server::stop`]
/// or when dropped.
#[derive(Debug)]
pub(crate) struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` (port 0: any free port), before anything else starts, so a
    /// taken port fails the pipeline's start.
    pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    /// Serves `observed` on `listener` from a thread of its own.
    pub(crate) fn start(listener: TcpListener, observed: Observed) -> std::io::Result<Server> {
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("xzepr-metrics".into())
            .spawn(move || {
                // Dropping the runtime at the end closes the open connections.
                runtime.block_on(serve(listener, observed, stopped));
            })?;
        Ok(Server {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes the connections, joins the thread.
    pub(crate) fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(listener: TcpListener, observed: Observed, mut stopped: oneshot::Receiver<()>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "Metrics endpoint cannot listen.");
            return;
        }
    };
    let collector = Arc::new(PipelineCollector { observed });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Waiting for a free slot must not keep a stop waiting.
        let slot = tokio::select! {
            _ = &mut stopped => return,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "Metrics endpoint accept failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let collector = Arc::clone(&collector);
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = respond(&req, &collector);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

fn respond(req: &Request<Incoming>, collector: &PipelineCollector) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/health" | "/ready") {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /health or /ready\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match path {
        "/metrics" => {
            let format = if accepts_openmetrics(req) {
                MetricsFormat::OpenMetrics
            } else {
                MetricsFormat::PrometheusText
            };
            with_type(
                StatusCode::OK,
                format.content_type(),
                collector.encode(format),
            )
        }
        _ => {
            let health = collector.observed.health();
            let ok = if path == "/health" {
                health.alive
            } else {
                health.ready
            };
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::to_string(&health).unwrap_or_default();
            with_type(status, "application/json", body)
        }
    }
}

/// Prometheus asks for OpenMetrics first when it can read it.
fn accepts_openmetrics(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    with_type(status, "text/plain; charset=utf-8", body.to_owned())
}

fn with_type(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    response
}
