//! A real HTTP server on 127.0.0.1:0 standing in for XZepr's events endpoint:
//! counts connections, records bodies, and can misbehave on purpose.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// How the server misbehaves, per request, drawn at random.
#[derive(Clone, Copy, Default)]
pub struct Chaos {
    /// Share of requests answered 500 (0.0..=1.0).
    pub fail: f64,
    /// Share of requests delayed by `delay`.
    pub slow: f64,
    /// The delay for slow requests (and every request when `slow` is 1.0).
    pub delay: Duration,
    /// Share of requests whose connection is dropped without an answer.
    pub drop: f64,
    /// Answer 500 to every post whose `name` ends in `.started`.
    pub fail_started: bool,
}

#[derive(Default)]
pub struct Seen {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    /// Bodies of the requests answered 200, in order of answer.
    pub accepted: Mutex<Vec<serde_json::Value>>,
    /// The `Authorization` header of every request (`None`: not sent).
    pub authorization: Mutex<Vec<Option<String>>>,
    /// While set, every request is answered 503 (an outage).
    pub outage: std::sync::atomic::AtomicBool,
    /// Requests answered 503 by the outage.
    pub refused: AtomicU64,
    /// Posts whose body contains this text are answered 400 (a post XZepr
    /// will never accept).
    pub reject_containing: Mutex<Option<String>>,
}

pub struct Server {
    pub url: String,
    pub seen: Arc<Seen>,
}

pub async fn start(chaos: Chaos) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Seen::default());
    let s = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            s.connections.fetch_add(1, Relaxed);
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let s = Arc::clone(&s);
                    async move { handle(req, &s, chaos).await }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Server { url, seen }
}

async fn handle(
    req: Request<Incoming>,
    s: &Seen,
    chaos: Chaos,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let n = s.requests.fetch_add(1, Relaxed);
    s.authorization.lock().unwrap().push(
        req.headers()
            .get(hyper::header::AUTHORIZATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
    );
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let roll: f64 = rand::random();
    if roll < chaos.drop {
        // An error from the service makes hyper close the connection unanswered.
        return Err(std::io::Error::other("dropped on purpose"));
    }
    if chaos.slow > 0.0 && rand::random::<f64>() < chaos.slow {
        tokio::time::sleep(chaos.delay).await;
    }
    if s.outage.load(Relaxed) {
        s.refused.fetch_add(1, Relaxed);
        return Ok(Response::builder()
            .status(503)
            .body(Full::new(Bytes::from_static(
                b"{\"error\":\"unavailable\"}",
            )))
            .unwrap());
    }
    let rejected = s
        .reject_containing
        .lock()
        .unwrap()
        .as_deref()
        .is_some_and(|needle| String::from_utf8_lossy(&body).contains(needle));
    if rejected {
        return Ok(Response::builder()
            .status(400)
            .body(Full::new(Bytes::from_static(
                b"{\"error\":\"validation\",\"message\":\"never\"}",
            )))
            .unwrap());
    }
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let started = value["name"]
        .as_str()
        .is_some_and(|n| n.ends_with(".started"));
    if roll < chaos.drop + chaos.fail || (chaos.fail_started && started) {
        return Ok(Response::builder()
            .status(500)
            .body(Full::new(Bytes::from_static(b"{\"error\":\"internal\"}")))
            .unwrap());
    }
    s.accepted.lock().unwrap().push(value);
    Ok(Response::new(Full::new(Bytes::from(format!(
        "{{\"data\":\"E{n}\"}}"
    )))))
}
