//! A minimal events endpoint with a per-request latency, for `bench`: it answers
//! `POST /api/v1/events` like XZepr (`{"data": "<id>"}`) after the latency.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Starts the endpoint on 127.0.0.1; returns its address and a request counter.
pub async fn start(latency: Duration) -> std::io::Result<(SocketAddr, Arc<AtomicU64>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let count = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let c = Arc::clone(&c);
                    async move {
                        let _ = req.into_body().collect().await;
                        // The real server's ~5 ms is waiting, not CPU: sleep, so
                        // concurrent requests overlap as they do there.
                        if !latency.is_zero() {
                            tokio::time::sleep(latency).await;
                        }
                        let n = c.fetch_add(1, Relaxed);
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            format!("{{\"data\":\"E{n}\"}}"),
                        ))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, count))
}
