//! The embedded dev stack's XZepr stand-in: an in-memory HTTP server with the
//! receivers and events endpoints of the XZepr contract, a bearer-token check, the
//! contract's validation errors, a per-request latency on event posts (default
//! 5 ms, what the real server takes), and, like XZepr, every recorded event
//! published back as a CloudEvent through an [`EventSink`].

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
}

#[derive(Default)]
struct Store {
    receivers: Vec<Value>,
    events: HashMap<String, Value>,
}

struct Shared {
    token: String,
    latency: Duration,
    sink: Arc<dyn EventSink>,
    store: Mutex<Store>,
    seq: AtomicU64,
    stats: Arc<StandInStats>,
}

/// A running stand-in; stops when dropped.
#[derive(Debug)]
pub struct StandIn {
    addr: SocketAddr,
    stats: Arc<StandInStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandIn {
    /// Starts on 127.0.0.1 (a free port) on the current tokio runtime.
    ///
    /// # Errors
    /// The bind error.
    pub async fn start(
        token: &str,
        latency: Duration,
        sink: Arc<dyn EventSink>,
    ) -> std::io::Result<StandIn> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(StandInStats::default());
        let shared = Arc::new(Shared {
            token: format!("Bearer {token}"),
            latency,
            sink,
            store: Mutex::new(Store::default()),
            seq: AtomicU64::new(0),
            stats: Arc::clone(&stats),
        });
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, std::convert::Infallible>(route(&shared, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(StandIn { addr, stats, task })
    }

    /// The base URL (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
    let authorized = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == shared.token.as_bytes());
    if !authorized {
        return reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "unauthorized", "message": "missing or invalid bearer token"}),
        );
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::BAD_REQUEST, json!({"error": "Invalid body"})),
    };
    match (method, path.as_str()) {
        (Method::POST, "/api/v1/receivers") => create_receiver(shared, &body),
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
            if !shared.latency.is_zero() {
                tokio::time::sleep(shared.latency).await;
            }
            create_event(shared, &body)
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

fn create_receiver(shared: &Shared, body: &[u8]) -> Response<Full<Bytes>> {
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
    let id = next_id(shared);
    let created_at = now();
    {
        let mut store = shared.store.lock().unwrap_or_else(|p| p.into_inner());
        if store
            .receivers
            .iter()
            .any(|r| r["name"] == name && r["type"] == ty)
        {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "receiver_creation_failed", "message": format!("Receiver {name} of type {ty} already exists")}),
            );
        }
        store.receivers.push(json!({
            "id": id, "name": name, "type": ty, "version": version, "description": description,
            "schema": schema, "fingerprint": format!("{:016x}", crate::dispatch::fnv1a(id.as_bytes())),
            "created_at": created_at,
        }));
    }
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
