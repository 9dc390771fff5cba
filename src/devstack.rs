//! The embedded dev stack's XZepr stand-in: an in-memory HTTP server with the
//! receivers and events endpoints of the XZepr contract, a bearer-token check, the
//! contract's validation errors, a per-request latency on event posts (default
//! 5 ms, what the real server takes), and, like XZepr, every recorded event
//! published back as a CloudEvent through an [`EventSink`].
//!
//! Two switches reproduce the real server's awkward moments
//! ([`StandInBuilder`]; the `dev` command takes them from the environment, see
//! [`StandIn::start`]):
//!
//! - **a race window on receiver create**: a delay between the "already
//!   exists?" check and the insert, so concurrent creates of one name and type
//!   can all succeed, as on the real server (check-then-insert);
//! - **a response delay on event posts**: the event is recorded (and published)
//!   at once, and the answer comes this much later, like XZepr whose own Kafka
//!   is unreachable (10–14 s, then 200). Longer than a client's timeout, it makes
//!   a "lost response" whose event was recorded all the same.
//!
//! [`StandIn::restart`] forgets every receiver and event, as an XZepr restart does.
//!
//! [`KneeServer`] is a service with a capacity (flat latency up to a knee of
//! concurrent requests, then rising, 503 past twice the knee), for the
//! flow-control tests and `bench`.
//!
//! [`postgres::LocalPostgres`] (with feature `postgres`) is a throwaway
//! PostgreSQL server, for the idempotency tests and `bench --postgres local`.

// The request helpers return the HTTP error response itself as their `Err`: a
// dev-only server where that reads best, and size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::generate::ulid_like;

mod knee;
#[cfg(feature = "postgres")]
pub mod postgres;
pub use knee::{KneeServer, KneeStats, Latencies, LatencySnapshot};

/// Where the stand-in publishes the CloudEvents of what it records.
pub trait EventSink: Send + Sync + 'static {
    /// Publishes one message (`key` = the event id, as XZepr keys them).
    fn publish(&self, key: &str, payload: Vec<u8>);
}

/// Publishes nowhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSink;

impl EventSink for NoSink {
    fn publish(&self, _key: &str, _payload: Vec<u8>) {}
}

/// Publishes to a Kafka topic through a threaded producer (non-blocking).
pub struct KafkaSink {
    producer: rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    topic: String,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// A producer to `brokers`, writing to `topic`.
    ///
    /// # Errors
    /// librdkafka's, when it refuses the configuration.
    pub fn new(brokers: &str, topic: &str) -> Result<Self, rdkafka::error::KafkaError> {
        let producer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "2")
            .create()?;
        Ok(KafkaSink {
            producer,
            topic: topic.to_owned(),
        })
    }
}

impl EventSink for KafkaSink {
    fn publish(&self, key: &str, payload: Vec<u8>) {
        let mut record = rdkafka::producer::BaseRecord::to(&self.topic)
            .key(key)
            .payload(&payload);
        // A full producer queue is waited out: XZepr never drops what it recorded.
        for _ in 0..10_000 {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((_, r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        tracing::error!(key, "Stand-in could not publish an event.");
    }
}

/// Counters of the stand-in.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct StandInStats {
    /// Receivers created.
    pub receivers: AtomicU64,
    /// Events created.
    pub events: AtomicU64,
    /// Events whose name ends in `.started`.
    pub started: AtomicU64,
    /// Events whose name ends in `.completed`.
    pub completed: AtomicU64,
    /// Events whose name ends in `.failed`.
    pub failed: AtomicU64,
    /// `POST /api/v1/receivers` requests received (whatever their outcome).
    pub receiver_requests: AtomicU64,
    /// Event posts answered late by the response delay.
    pub delayed_responses: AtomicU64,
}

#[derive(Default)]
struct Store {
    receivers: Vec<Value>,
    events: HashMap<String, Value>,
    /// The `traceparent` header of each event post that had one.
    traceparents: Vec<String>,
}

struct Shared {
    /// `Bearer {token}`, or `None`: no authentication (any request accepted).
    token: Option<String>,
    latency: Duration,
    create_delay: Duration,
    /// Response delay of event posts, in microseconds.
    response_delay_us: AtomicU64,
    /// Event posts still to delay (`u64::MAX`: all of them).
    delays_left: AtomicU64,
    sink: Arc<dyn EventSink>,
    store: Mutex<Store>,
    seq: AtomicU64,
    stats: Arc<StandInStats>,
}

/// Environment variable: [`StandInBuilder::receiver_create_delay`] in ms, read by
/// [`StandIn::start`] (so by `xzepr-consumer dev`).
pub const ENV_RECEIVER_CREATE_DELAY_MS: &str = "XZEPR_STANDIN_RECEIVER_CREATE_DELAY_MS";
/// Environment variable: [`StandInBuilder::response_delay`] in ms, read by
/// [`StandIn::start`] (so by `xzepr-consumer dev`).
pub const ENV_RESPONSE_DELAY_MS: &str = "XZEPR_STANDIN_RESPONSE_DELAY_MS";

/// Settings of a [`StandIn`]; [`StandInBuilder::start`] runs it.
#[must_use]
pub struct StandInBuilder {
    token: String,
    latency: Duration,
    create_delay: Duration,
    response_delay: Duration,
    sink: Arc<dyn EventSink>,
}

impl std::fmt::Debug for StandInBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandInBuilder")
            .field("latency", &self.latency)
            .field("create_delay", &self.create_delay)
            .field("response_delay", &self.response_delay)
            .finish_non_exhaustive()
    }
}

impl StandInBuilder {
    /// Latency before an event post is handled. Default 5 ms (the real server's).
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Where recorded events are published. Default: nowhere ([`NoSink`]).
    pub fn sink(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sink = sink;
        self
    }

    /// The race window of receiver create: this long between the "already
    /// exists?" check and the insert. Default zero (check and insert atomic).
    pub fn receiver_create_delay(mut self, delay: Duration) -> Self {
        self.create_delay = delay;
        self
    }

    /// Every event post is recorded at once and answered this much later.
    /// Default zero. See also [`StandIn::delay_responses`].
    pub fn response_delay(mut self, delay: Duration) -> Self {
        self.response_delay = delay;
        self
    }

    /// Reads [`ENV_RECEIVER_CREATE_DELAY_MS`] and [`ENV_RESPONSE_DELAY_MS`]
    /// (whole milliseconds) when they are set and valid.
    pub fn env_overrides(mut self) -> Self {
        let ms = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_millis)
        };
        if let Some(d) = ms(ENV_RECEIVER_CREATE_DELAY_MS) {
            self.create_delay = d;
        }
        if let Some(d) = ms(ENV_RESPONSE_DELAY_MS) {
            self.response_delay = d;
        }
        self
    }

    /// Starts on 127.0.0.1 (a free port) on the current tokio runtime.
    ///
    /// # Errors
    /// The bind error.
    pub async fn start(self) -> std::io::Result<StandIn> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(StandInStats::default());
        let shared = Arc::new(Shared {
            token: (!self.token.is_empty()).then(|| format!("Bearer {}", self.token)),
            latency: self.latency,
            create_delay: self.create_delay,
            response_delay_us: AtomicU64::new(micros(self.response_delay)),
            delays_left: AtomicU64::new(u64::MAX),
            sink: self.sink,
            store: Mutex::new(Store::default()),
            seq: AtomicU64::new(0),
            stats: Arc::clone(&stats),
        });
        let task = serve(listener, Arc::clone(&shared), |s, req| async move {
            route(&s, req).await
        });
        Ok(StandIn {
            addr,
            stats,
            shared,
            task,
        })
    }
}

/// Serves every connection `listener` accepts (HTTP/1.1 and HTTP/2), each
/// request answered by `answer`, until the task is aborted.
fn serve<S, F, Fut>(listener: TcpListener, shared: Arc<S>, answer: F) -> tokio::task::JoinHandle<()>
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let answered = answer(Arc::clone(&shared), req);
                    async move { Ok::<_, std::convert::Infallible>(answered.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A running stand-in; stops when dropped.
pub struct StandIn {
    addr: SocketAddr,
    stats: Arc<StandInStats>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for StandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandIn")
            .field("addr", &self.addr)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandIn {
    /// Settings for a stand-in requiring `Bearer {token}` (an empty `token`: no
    /// authentication, any request accepted).
    pub fn builder(token: &str) -> StandInBuilder {
        StandInBuilder {
            token: token.to_owned(),
            latency: Duration::from_millis(5),
            create_delay: Duration::ZERO,
            response_delay: Duration::ZERO,
            sink: Arc::new(NoSink),
        }
    }

    /// Starts on 127.0.0.1 (a free port) on the current tokio runtime, with the
    /// switches from the environment ([`StandInBuilder::env_overrides`]: that is
    /// how `xzepr-consumer dev` takes them).
    ///
    /// # Errors
    /// The bind error.
    pub async fn start(
        token: &str,
        latency: Duration,
        sink: Arc<dyn EventSink>,
    ) -> std::io::Result<StandIn> {
        Self::builder(token)
            .latency(latency)
            .sink(sink)
            .env_overrides()
            .start()
            .await
    }

    /// The base URL (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every event recorded, in no particular order.
    pub fn recorded_events(&self) -> Vec<Value> {
        let store = self.shared.store.lock().unwrap_or_else(|p| p.into_inner());
        store.events.values().cloned().collect()
    }

    /// The `traceparent` header of every event post that carried one, in
    /// arrival order.
    pub fn recorded_traceparents(&self) -> Vec<String> {
        let store = self.shared.store.lock().unwrap_or_else(|p| p.into_inner());
        store.traceparents.clone()
    }

    /// Every receiver, in the order they were inserted.
    pub fn receivers(&self) -> Vec<Value> {
        let store = self.shared.store.lock().unwrap_or_else(|p| p.into_inner());
        store.receivers.clone()
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next `posts` event posts are recorded at once and answered `delay`
    /// later (`u64::MAX`: every post from now on; a zero `delay`: none).
    pub fn delay_responses(&self, delay: Duration, posts: u64) {
        self.shared.delays_left.store(posts, Relaxed);
        self.shared.response_delay_us.store(micros(delay), Relaxed);
    }

    /// As an XZepr restart: every receiver and event is forgotten (XZepr keeps
    /// them in memory), so known ids come back 404; the address stays, and new
    /// ids never repeat old ones.
    pub fn restart(&self) {
        let mut store = self.shared.store.lock().unwrap_or_else(|p| p.into_inner());
        *store = Store::default();
    }

    /// Adds a receiver with a chosen id (26 alphanumeric characters, like a
    /// ULID), as if created earlier: for clients configured with a fixed id.
    pub fn insert_receiver(&self, id: &str, name: &str, receiver_type: &str) {
        let receiver = json!({
            "id": id, "name": name, "type": receiver_type, "version": "1.0.0", "description": "",
            "schema": {}, "fingerprint": format!("{:016x}", crate::dispatch::fnv1a(id.as_bytes())),
            "created_at": now(),
        });
        let mut store = self.shared.store.lock().unwrap_or_else(|p| p.into_inner());
        store.receivers.push(receiver);
    }

    /// The stand-in's counters.
    pub fn stats(&self) -> &StandInStats {
        &self.stats
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn invalid(field: &str, message: &str) -> Response<Full<Bytes>> {
    reply(
        StatusCode::BAD_REQUEST,
        json!({"error": "validation_error", "message": message, "field": field}),
    )
}

async fn route(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    if method == Method::GET && path == "/health" {
        return reply(StatusCode::OK, json!({"status": "ok"}));
    }
    let authorized = shared.token.as_ref().is_none_or(|token| {
        req.headers()
            .get(http::header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == token.as_bytes())
    });
    if !authorized {
        return reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "unauthorized", "message": "missing or invalid bearer token"}),
        );
    }
    let traceparent = req
        .headers()
        .get(crate::trace::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::BAD_REQUEST, json!({"error": "Invalid body"})),
    };
    match (method, path.as_str()) {
        (Method::POST, "/api/v1/receivers") => {
            shared.stats.receiver_requests.fetch_add(1, Relaxed);
            create_receiver(shared, &body).await
        }
        (Method::GET, "/api/v1/receivers") => {
            // Like the real server: filters and paging ignored, everything returned.
            let store = shared.store.lock().unwrap_or_else(|p| p.into_inner());
            let n = store.receivers.len();
            reply(
                StatusCode::OK,
                json!({"data": store.receivers, "pagination": {"limit": 50, "offset": 0, "total": n, "has_more": false}}),
            )
        }
        (Method::GET, p) if p.starts_with("/api/v1/receivers/") => {
            let id = &p["/api/v1/receivers/".len()..];
            let store = shared.store.lock().unwrap_or_else(|p| p.into_inner());
            match store.receivers.iter().find(|r| r["id"] == id) {
                Some(r) => reply(StatusCode::OK, r.clone()),
                None => reply(
                    StatusCode::NOT_FOUND,
                    json!({"error": "not_found", "message": "receiver not found"}),
                ),
            }
        }
        (Method::POST, "/api/v1/events") => {
            if let Some(tp) = traceparent {
                let mut store = shared.store.lock().unwrap_or_else(|p| p.into_inner());
                store.traceparents.push(tp);
            }
            if !shared.latency.is_zero() {
                tokio::time::sleep(shared.latency).await;
            }
            let response = create_event(shared, &body);
            // Recorded already: a client that gives up meanwhile leaves it recorded.
            let delay = Duration::from_micros(shared.response_delay_us.load(Relaxed));
            if !delay.is_zero() && take_delay(&shared.delays_left) {
                shared.stats.delayed_responses.fetch_add(1, Relaxed);
                tokio::time::sleep(delay).await;
            }
            response
        }
        (Method::GET, p) if p.starts_with("/api/v1/events/") => {
            let id = &p["/api/v1/events/".len()..];
            let store = shared.store.lock().unwrap_or_else(|p| p.into_inner());
            match store.events.get(id) {
                Some(e) => reply(StatusCode::OK, e.clone()),
                None => reply(
                    StatusCode::NOT_FOUND,
                    json!({"error": "not_found", "message": "event not found"}),
                ),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({"error": "not_found", "message": "no such route"}),
        ),
    }
}

fn parse(body: &[u8]) -> Result<serde_json::Map<String, Value>, Response<Full<Bytes>>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "Invalid JSON: expected an object"}),
        )),
        Err(e) => Err(reply(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("Invalid JSON: {e}")}),
        )),
    }
}

fn string_field<'a>(
    m: &'a serde_json::Map<String, Value>,
    field: &str,
    may_be_empty: bool,
) -> Result<&'a str, Response<Full<Bytes>>> {
    match m.get(field).and_then(Value::as_str) {
        Some(s) if may_be_empty || !s.is_empty() => Ok(s),
        _ => Err(invalid(
            field,
            &format!("`{field}` is required and must be a non-empty string"),
        )),
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn next_id(shared: &Shared) -> String {
    let millis = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or_default();
    ulid_like(millis, shared.seq.fetch_add(1, Relaxed))
}

/// Takes one delay from `left` (`u64::MAX` never runs out); false when none is left.
fn take_delay(left: &AtomicU64) -> bool {
    left.fetch_update(Relaxed, Relaxed, |n| match n {
        0 => None,
        u64::MAX => Some(n),
        n => Some(n - 1),
    })
    .is_ok()
}

async fn create_receiver(shared: &Shared, body: &[u8]) -> Response<Full<Bytes>> {
    let m = match parse(body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let fields = (|| {
        Ok::<_, Response<Full<Bytes>>>((
            string_field(&m, "name", false)?,
            string_field(&m, "type", false)?,
            string_field(&m, "version", false)?,
            string_field(&m, "description", true)?,
        ))
    })();
    let (name, ty, version, description) = match fields {
        Ok(f) => f,
        Err(r) => return r,
    };
    let Some(schema @ Value::Object(_)) = m.get("schema") else {
        return invalid("schema", "`schema` is required and must be an object");
    };
    let receiver = |id: &str, created_at: &str| {
        json!({
            "id": id, "name": name, "type": ty, "version": version, "description": description,
            "schema": schema, "fingerprint": format!("{:016x}", crate::dispatch::fnv1a(id.as_bytes())),
            "created_at": created_at,
        })
    };
    let exists = |store: &Store| {
        store
            .receivers
            .iter()
            .any(|r| r["name"] == name && r["type"] == ty)
    };
    let already = || {
        reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "receiver_creation_failed", "message": format!("Receiver {name} of type {ty} already exists")}),
        )
    };
    // Id and creation time are taken at the check, as the real server builds
    // the entity before inserting it.
    let (id, created_at) = if shared.create_delay.is_zero() {
        let mut store = shared.store.lock().unwrap_or_else(|p| p.into_inner());
        if exists(&store) {
            return already();
        }
        let (id, created_at) = (next_id(shared), now());
        store.receivers.push(receiver(&id, &created_at));
        (id, created_at)
    } else {
        let (id, created_at) = {
            let store = shared.store.lock().unwrap_or_else(|p| p.into_inner());
            if exists(&store) {
                return already();
            }
            (next_id(shared), now())
        };
        // The race window: a concurrent create of the same name and type
        // passes the check too, and both are inserted.
        tokio::time::sleep(shared.create_delay).await;
        shared
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .receivers
            .push(receiver(&id, &created_at));
        (id, created_at)
    };
    shared.stats.receivers.fetch_add(1, Relaxed);
    // The system event XZepr publishes for a new receiver.
    let event_id = next_id(shared);
    let receiver = json!({
        "id": id, "name": name, "receiver_type": ty, "version": version, "description": description,
        "schema": schema, "fingerprint": format!("{:016x}", crate::dispatch::fnv1a(id.as_bytes())),
        "owner_id": "01JXZEPRDEV000000000000000", "resource_version": 1, "created_at": created_at,
    });
    let event = json!({
        "id": event_id, "name": "xzepr.event.receiver.created", "version": "1.0.0", "release": "system",
        "platform_id": "xzepr", "package": "xzepr.system",
        "description": format!("Event receiver '{name}' created"),
        "payload": {"name": name, "type": ty, "version": version, "receiver_id": id, "description": description},
        "success": true, "event_receiver_id": id, "owner_id": "01JXZEPRDEV000000000000000",
        "resource_version": 1, "created_at": created_at,
    });
    publish(shared, &event, &id, vec![receiver]);
    reply(StatusCode::OK, json!({"data": id}))
}

fn create_event(shared: &Shared, body: &[u8]) -> Response<Full<Bytes>> {
    let m = match parse(body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let fields = (|| {
        Ok::<_, Response<Full<Bytes>>>((
            string_field(&m, "name", false)?,
            string_field(&m, "version", false)?,
            string_field(&m, "release", false)?,
            string_field(&m, "platform_id", false)?,
            string_field(&m, "package", false)?,
            string_field(&m, "description", true)?,
            string_field(&m, "event_receiver_id", false)?,
        ))
    })();
    let (name, version, release, platform_id, package, description, receiver_id) = match fields {
        Ok(f) => f,
        Err(r) => return r,
    };
    let Some(payload @ Value::Object(_)) = m.get("payload") else {
        return invalid("payload", "`payload` is required and must be an object");
    };
    let Some(success) = m.get("success").and_then(Value::as_bool) else {
        return invalid("success", "`success` is required and must be a boolean");
    };
    if receiver_id.len() != 26 || !receiver_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return invalid("event_receiver_id", "not a valid receiver id");
    }
    let known = {
        let store = shared.store.lock().unwrap_or_else(|p| p.into_inner());
        store.receivers.iter().any(|r| r["id"] == receiver_id)
    };
    if !known {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": "not_found", "message": "event receiver not found"}),
        );
    }
    let id = next_id(shared);
    let event = json!({
        "id": id, "name": name, "version": version, "release": release, "platform_id": platform_id,
        "package": package, "description": description, "payload": payload, "success": success,
        "event_receiver_id": receiver_id, "owner_id": "01JXZEPRDEV000000000000000",
        "resource_version": 1, "created_at": now(),
    });
    shared
        .store
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .events
        .insert(id.clone(), event.clone());
    let s = &shared.stats;
    s.events.fetch_add(1, Relaxed);
    if name.ends_with(".started") {
        s.started.fetch_add(1, Relaxed);
    } else if name.ends_with(".completed") {
        s.completed.fetch_add(1, Relaxed);
    } else if name.ends_with(".failed") {
        s.failed.fetch_add(1, Relaxed);
    }
    publish(shared, &event, receiver_id, Vec::new());
    reply(StatusCode::OK, json!({"data": id}))
}

/// Publishes `event` the way XZepr does: a structured CloudEvent keyed by its id.
fn publish(shared: &Shared, event: &Value, receiver_id: &str, receivers: Vec<Value>) {
    let id = event["id"].as_str().unwrap_or_default();
    let cloud_event = json!({
        "success": event["success"], "id": id, "specversion": "1.0.1", "type": event["name"],
        "source": format!("xzepr.event.receiver.{receiver_id}"), "api_version": "v1",
        "name": event["name"], "version": event["version"], "release": event["release"],
        "platform_id": event["platform_id"], "package": event["package"],
        "data": {"events": [event], "event_receivers": receivers, "event_receiver_groups": []},
    });
    shared
        .sink
        .publish(id, cloud_event.to_string().into_bytes());
}
