//! The XZepr REST client: receivers, events and the work-lifecycle posts, over a
//! pooled keep-alive connection (hyper + rustls).
//!
//! Request and response bodies follow the XZepr contract as the real server
//! implements it: the receiver list ignores its filters and paging, so discovery
//! matches name and type on this side and walks every page.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Client errors. [`ClientError::is_retryable`] says which are worth retrying.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server answered with an error status and (usually) a JSON error body.
    #[error("XZepr API error {}: {}", .0.status, .0.summary())]
    Api(Box<ApiError>),
    /// 404: the receiver or event does not exist.
    #[error("not found: {path}")]
    NotFound {
        /// The request path.
        path: Box<str>,
    },
    /// 401/403: the token was refused. Never retried.
    #[error("unauthorized ({status}): check XZEPR_API_TOKEN")]
    Unauthorized {
        /// 401 or 403.
        status: u16,
    },
    /// No response within the request timeout.
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    /// The connection failed (refused, reset, TLS).
    #[error("connection failed: {0}")]
    Connect(Box<str>),
    /// The response body was not what the contract says.
    #[error("cannot decode the response: {0}")]
    Decode(Box<str>),
    /// A setting is missing or invalid.
    #[error("invalid client setting `{name}`: {reason}")]
    Config {
        /// The field or environment variable.
        name: &'static str,
        /// What is wrong.
        reason: Box<str>,
    },
}

/// An error response from the server, parsed leniently (some 400s carry only
/// `error`, a bad query string gets plain text): the raw body is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// The server's `error` code, when the body is JSON.
    pub error: Option<String>,
    /// The server's `message`.
    pub message: Option<String>,
    /// The server's `field`, for validation errors.
    pub field: Option<String>,
    /// The raw body.
    pub body: String,
    /// The server's `Retry-After` (seconds form), on 429 and 503.
    pub retry_after: Option<Duration>,
}

impl ApiError {
    fn summary(&self) -> String {
        let mut s = self
            .error
            .clone()
            .unwrap_or_else(|| self.body.chars().take(200).collect());
        if let Some(m) = &self.message {
            s.push_str(": ");
            s.push_str(m);
        }
        if let Some(f) = &self.field {
            s.push_str(&format!(" (field `{f}`)"));
        }
        s
    }
}

impl ClientError {
    /// True for failures a retry may cure: timeouts, connection errors, 5xx and 429.
    /// A 4xx other than 429 (and 401/403) is final.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Timeout(_) | ClientError::Connect(_) => true,
            ClientError::Api(e) => e.status >= 500 || e.status == 429,
            _ => false,
        }
    }

    /// True for [`ClientError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout(_))
    }

    /// True for [`ClientError::Unauthorized`].
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, ClientError::Unauthorized { .. })
    }

    /// True for [`ClientError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::NotFound { .. })
    }

    /// How long the server asked us to wait (`Retry-After`), if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Api(e) => e.retry_after,
            _ => None,
        }
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api(e) => Some(e.status),
            ClientError::NotFound { .. } => Some(404),
            ClientError::Unauthorized { status } => Some(*status),
            _ => None,
        }
    }
}

/// Settings of an [`XzeprClient`].
#[derive(Clone)]
#[non_exhaustive]
pub struct XzeprClientConfig {
    /// Server base URL, e.g. `http://localhost:8042` (the contract's default).
    pub base_url: String,
    /// Bearer token (never printed).
    pub token: String,
    /// Per-request timeout. Default 10 s: XZepr answers in ~5 ms; anything near
    /// this is a stuck server, and the reporter retries it.
    pub request_timeout: Duration,
    /// Idle keep-alive connections kept per host. Default 128: the reporter's
    /// default in-flight limit, so every post in flight can find a warm connection.
    pub pool_max_idle_per_host: usize,
    /// How long an idle pooled connection is kept. Default 90 s.
    pub pool_idle_timeout: Duration,
    /// Extra CA certificate (PEM) trusted besides the web PKI roots.
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for XzeprClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XzeprClientConfig")
            .field("base_url", &self.base_url)
            .field("token", &"<redacted>")
            .field("request_timeout", &self.request_timeout)
            .field("pool_max_idle_per_host", &self.pool_max_idle_per_host)
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl XzeprClientConfig {
    /// Settings for `base_url` with `token`, other values at their defaults.
    pub fn new(base_url: impl Into<String>, token: impl Into<String>) -> Self {
        XzeprClientConfig {
            base_url: base_url.into(),
            token: token.into(),
            request_timeout: Duration::from_secs(10),
            pool_max_idle_per_host: 128,
            pool_idle_timeout: Duration::from_secs(90),
            ca_file: None,
        }
    }

    /// From `XZEPR_API_URL` (default `http://localhost:8042`) and `XZEPR_API_TOKEN`.
    ///
    /// # Errors
    /// [`ClientError::Config`] naming `XZEPR_API_TOKEN` when it is missing.
    pub fn from_env() -> Result<Self, ClientError> {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    /// As [`XzeprClientConfig::from_env`], reading through `lookup`.
    ///
    /// # Errors
    /// [`ClientError::Config`] naming `XZEPR_API_TOKEN` when it is missing.
    pub fn from_env_with(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ClientError> {
        let url = lookup("XZEPR_API_URL")
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| "http://localhost:8042".to_owned());
        let token = lookup("XZEPR_API_TOKEN")
            .filter(|t| !t.trim().is_empty())
            .ok_or(ClientError::Config {
                name: "XZEPR_API_TOKEN",
                reason: "required to report to XZepr".into(),
            })?;
        Ok(Self::new(url, token))
    }
}

/// An event receiver as the server returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EventReceiver {
    /// Id (ULID).
    pub id: String,
    /// Name.
    pub name: String,
    /// Type (`type` on the wire; `receiver_type` accepted).
    #[serde(rename = "type", alias = "receiver_type")]
    pub receiver_type: String,
    /// Version.
    pub version: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// JSON schema.
    #[serde(default)]
    pub schema: Value,
    /// Fingerprint.
    #[serde(default)]
    pub fingerprint: String,
    /// Creation time (RFC 3339).
    #[serde(default)]
    pub created_at: String,
}

/// One page of `GET /api/v1/receivers`.
#[derive(Debug, Clone, Deserialize)]
#[non_exhaustive]
pub struct ReceiverPage {
    /// The receivers.
    pub data: Vec<EventReceiver>,
    /// Paging as the server reports it (it may ignore the request's).
    #[serde(default)]
    pub pagination: Option<Pagination>,
}

/// Paging info of a list response.
#[derive(Debug, Clone, Copy, Deserialize)]
#[non_exhaustive]
pub struct Pagination {
    /// Page size.
    #[serde(default)]
    pub limit: u64,
    /// Offset of this page.
    #[serde(default)]
    pub offset: u64,
    /// Total count.
    #[serde(default)]
    pub total: u64,
    /// Whether more pages follow.
    #[serde(default)]
    pub has_more: bool,
}

/// Filters and paging for [`XzeprClient::list_event_receivers`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ReceiverQuery {
    /// Name filter.
    pub name: Option<String>,
    /// Type filter.
    pub receiver_type: Option<String>,
    /// Version filter.
    pub version: Option<String>,
    /// Page size (1..=1000).
    pub limit: Option<u32>,
    /// Page offset.
    pub offset: Option<u64>,
}

/// The body of `POST /api/v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CreateEvent {
    /// Event name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Release.
    pub release: String,
    /// Platform id.
    pub platform_id: String,
    /// Package.
    pub package: String,
    /// Description (may be empty).
    pub description: String,
    /// Payload (a JSON object).
    pub payload: Value,
    /// Success flag.
    pub success: bool,
    /// Receiver to record it under.
    pub event_receiver_id: String,
}

/// The fields of a lifecycle post shared by its three statuses.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct WorkRef<'a> {
    /// Receiver the work is reported under.
    pub receiver_id: &'a str,
    /// Work id.
    pub work_id: &'a str,
    /// Work name (`{name}.started` ...).
    pub work_name: &'a str,
    /// Work version (also the release).
    pub work_version: &'a str,
    /// Platform id of the source event.
    pub platform_id: &'a str,
    /// The service's name (the event's package).
    pub package: &'a str,
}

impl<'a> WorkRef<'a> {
    /// Builds the reference.
    pub fn new(
        receiver_id: &'a str,
        work_id: &'a str,
        work_name: &'a str,
        work_version: &'a str,
        platform_id: &'a str,
        package: &'a str,
    ) -> Self {
        WorkRef {
            receiver_id,
            work_id,
            work_name,
            work_version,
            platform_id,
            package,
        }
    }

    /// The `started` event of the contract.
    pub fn started(&self, details: Value) -> CreateEvent {
        self.event(Phase::Started, &details)
    }

    /// The `completed` event of the contract; with `success` false, the `failed`
    /// event (as the plan's `post_work_completed` does), its `error` and
    /// `error_code` taken from `details` when it has them.
    pub fn completed(&self, success: bool, details: Value) -> CreateEvent {
        if success {
            return self.event(Phase::Completed, &details);
        }
        let text = |k: &str, default: &'static str| {
            details
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_owned()
        };
        let (error, error_code) = (
            text("error", "work reported unsuccessful"),
            text("error_code", "unsuccessful"),
        );
        self.failed(&error, &error_code, details)
    }

    /// The `failed` event of the contract, `error` and `error_code` in `details`.
    pub fn failed(&self, error: &str, error_code: &str, details: Value) -> CreateEvent {
        self.event(Phase::Failed { error, error_code }, &details)
    }

    fn event(&self, phase: Phase<'_>, details: &Value) -> CreateEvent {
        let body = LifecycleBody::new(*self, phase, details);
        CreateEvent {
            name: body.name().to_string(),
            version: self.work_version.to_owned(),
            release: self.work_version.to_owned(),
            platform_id: self.platform_id.to_owned(),
            package: self.package.to_owned(),
            description: body.description().to_string(),
            payload: serde_json::to_value(&body.payload).unwrap_or(Value::Null),
            success: phase.success(),
            event_receiver_id: self.receiver_id.to_owned(),
        }
    }
}

/// Which lifecycle event, with what only that event carries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Phase<'a> {
    Started,
    Completed,
    Failed { error: &'a str, error_code: &'a str },
}

impl Phase<'_> {
    fn word(self) -> &'static str {
        match self {
            Phase::Started => "started",
            Phase::Completed => "completed",
            Phase::Failed { .. } => "failed",
        }
    }

    fn success(self) -> bool {
        match self {
            Phase::Started | Phase::Completed => true,
            Phase::Failed { .. } => false,
        }
    }
}

/// The body of a lifecycle `POST /api/v1/events`, serialized straight from
/// borrowed parts: the reporter writes it into a reused buffer without building a
/// `Value` tree or owning a string per field. [`CreateEvent`] is built from the
/// same parts, so both paths send the same JSON.
pub(crate) struct LifecycleBody<'a> {
    work: WorkRef<'a>,
    phase: Phase<'a>,
    payload: LifecyclePayload<'a>,
}

/// `payload` of a lifecycle event, as the contract gives it.
struct LifecyclePayload<'a> {
    work_id: &'a str,
    phase: Phase<'a>,
    at: String,
    details: &'a Value,
}

impl<'a> LifecycleBody<'a> {
    pub(crate) fn new(work: WorkRef<'a>, phase: Phase<'a>, details: &'a Value) -> Self {
        LifecycleBody {
            work,
            phase,
            payload: LifecyclePayload {
                work_id: work.work_id,
                phase,
                at: now(),
                details,
            },
        }
    }

    /// `{work}.{status}`.
    fn name(&self) -> Name<'_> {
        Name(self)
    }

    /// `Work {status}: {work} ({work id})`.
    fn description(&self) -> Description<'_> {
        Description(self)
    }
}

struct Name<'a>(&'a LifecycleBody<'a>);

impl fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0.work.work_name, self.0.phase.word())
    }
}

struct Description<'a>(&'a LifecycleBody<'a>);

/// Formatted straight into the output (serde_json escapes as it writes).
macro_rules! serialize_as_display {
    ($($t:ident),*) => {$(
        impl Serialize for $t<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    )*};
}
serialize_as_display!(Name, Description);

impl fmt::Display for Description<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "Work {}: {} ({})",
            b.phase.word(),
            b.work.work_name,
            b.work.work_id
        )
    }
}

impl Serialize for LifecycleBody<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let w = &self.work;
        let mut m = s.serialize_map(Some(9))?;
        m.serialize_entry("name", &self.name())?;
        m.serialize_entry("version", w.work_version)?;
        m.serialize_entry("release", w.work_version)?;
        m.serialize_entry("platform_id", w.platform_id)?;
        m.serialize_entry("package", w.package)?;
        m.serialize_entry("description", &self.description())?;
        m.serialize_entry("payload", &self.payload)?;
        m.serialize_entry("success", &self.phase.success())?;
        m.serialize_entry("event_receiver_id", w.receiver_id)?;
        m.end()
    }
}

impl Serialize for LifecyclePayload<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("work_id", self.work_id)?;
        m.serialize_entry("status", self.phase.word())?;
        match self.phase {
            Phase::Started => {
                m.serialize_entry("started_at", &self.at)?;
                m.serialize_entry("details", &DetailsObject(self.details))?;
            }
            Phase::Completed => {
                m.serialize_entry("completed_at", &self.at)?;
                m.serialize_entry("success", &true)?;
                m.serialize_entry("details", &DetailsObject(self.details))?;
            }
            Phase::Failed { error, error_code } => {
                m.serialize_entry("completed_at", &self.at)?;
                m.serialize_entry("success", &false)?;
                m.serialize_entry(
                    "details",
                    &FailedDetails {
                        details: self.details,
                        error,
                        error_code,
                    },
                )?;
            }
        }
        m.end()
    }
}

/// `details` as the contract has it, always an object: `null` is `{}`, and a
/// non-object goes under `context`.
struct DetailsObject<'a>(&'a Value);

impl Serialize for DetailsObject<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self.0 {
            Value::Object(obj) => obj.serialize(s),
            Value::Null => s.serialize_map(Some(0))?.end(),
            other => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("context", other)?;
                m.end()
            }
        }
    }
}

/// A failure's `details`: the caller's object (a non-object goes under `context`)
/// with `error` and `error_code` set, replacing any of the caller's own.
struct FailedDetails<'a> {
    details: &'a Value,
    error: &'a str,
    error_code: &'a str,
}

impl Serialize for FailedDetails<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        match self.details {
            Value::Object(obj) => {
                for (k, v) in obj {
                    if k != "error" && k != "error_code" {
                        m.serialize_entry(k, v)?;
                    }
                }
            }
            Value::Null => {}
            other => m.serialize_entry("context", other)?,
        }
        m.serialize_entry("error", self.error)?;
        m.serialize_entry("error_code", self.error_code)?;
        m.end()
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

const EVENTS_PATH: &str = "/api/v1/events";

/// Largest response body read: a receiver list of tens of thousands of receivers
/// fits; anything larger is an error, not an allocation without bound.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;
/// One (name, type)'s discovered id; its lock makes concurrent discoveries one.
type DiscoverySlot = Arc<tokio::sync::Mutex<Option<String>>>;
type Singleflight = Mutex<HashMap<(String, String), DiscoverySlot>>;

/// What a receiver was discovered with, to discover it again after a 404.
#[derive(Debug)]
struct ReceiverSpec {
    name: String,
    receiver_type: String,
    version: String,
    description: String,
    schema: Value,
}

/// The XZepr API client. Cheap to clone: clones share the connection pool.
#[derive(Clone)]
pub struct XzeprClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: Client<Https, Full<Bytes>>,
    base: String,
    /// `POST /api/v1/events`, parsed once: the reporter's hot path.
    events_uri: http::Uri,
    auth: http::HeaderValue,
    timeout: Duration,
    /// One discovery at a time per (name, type): concurrent callers create at most one.
    discovering: Singleflight,
    /// Every receiver id discovered, with what it was discovered with.
    discovered: Mutex<HashMap<String, Arc<ReceiverSpec>>>,
}

impl fmt::Debug for XzeprClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XzeprClient")
            .field("base_url", &self.inner.base)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl XzeprClient {
    /// Builds a client.
    ///
    /// # Errors
    /// [`ClientError::Config`] for an empty token, a base URL that is not
    /// http(s), or an unreadable CA file.
    pub fn new(config: XzeprClientConfig) -> Result<Self, ClientError> {
        let base = config.base_url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://"))
            || base.parse::<http::Uri>().is_err()
        {
            return Err(ClientError::Config {
                name: "base_url (XZEPR_API_URL)",
                reason: "must be an http:// or https:// URL".into(),
            });
        }
        if config.token.trim().is_empty() {
            return Err(ClientError::Config {
                name: "token (XZEPR_API_TOKEN)",
                reason: "must not be empty".into(),
            });
        }
        let auth =
            http::HeaderValue::from_str(&format!("Bearer {}", config.token)).map_err(|_| {
                ClientError::Config {
                    name: "token (XZEPR_API_TOKEN)",
                    reason: "not a valid header value".into(),
                }
            })?;
        let mut auth = auth;
        auth.set_sensitive(true);
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &config.ca_file {
            let bad = |reason: String| ClientError::Config {
                name: "ca_file",
                reason: reason.into(),
            };
            let pem = std::fs::read(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| bad(e.to_string()))?;
                roots.add(cert).map_err(|e| bad(e.to_string()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Config {
            name: "tls",
            reason: e.to_string().into(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        let http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .pool_idle_timeout(config.pool_idle_timeout)
            .build(https);
        Ok(XzeprClient {
            inner: Arc::new(Inner {
                http,
                events_uri: format!("{base}{EVENTS_PATH}").parse().map_err(|_| {
                    ClientError::Config {
                        name: "base_url (XZEPR_API_URL)",
                        reason: "must be an http:// or https:// URL".into(),
                    }
                })?,
                base,
                auth,
                timeout: config.request_timeout,
                discovering: Mutex::new(HashMap::new()),
                discovered: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// [`XzeprClientConfig::from_env`], then [`XzeprClient::new`].
    ///
    /// # Errors
    /// As both.
    pub fn from_env() -> Result<Self, ClientError> {
        Self::new(XzeprClientConfig::from_env()?)
    }

    /// Sends one request; maps statuses to errors. Returns the body of a 2xx.
    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
    ) -> Result<Bytes, ClientError> {
        let uri = if path_and_query == EVENTS_PATH {
            self.inner.events_uri.clone()
        } else {
            format!("{}{path_and_query}", self.inner.base)
                .parse()
                .map_err(|e: http::uri::InvalidUri| ClientError::Connect(e.to_string().into()))?
        };
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::AUTHORIZATION, self.inner.auth.clone())
            .header(http::header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| ClientError::Connect(e.to_string().into()))?;
        let timeout = self.inner.timeout;
        let started = tokio::time::Instant::now();
        let resp = tokio::time::timeout(timeout, self.inner.http.request(req))
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
            .map_err(|e| ClientError::Connect(error_chain(&e).into()))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let collected = tokio::time::timeout_at(
            started + timeout,
            http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE_BYTES).collect(),
        )
        .await;
        let body = match collected {
            Ok(Ok(body)) => body.to_bytes(),
            // A 2xx means the server acted (an event is recorded): retrying would
            // record it twice, so a lost body is final, not a connection error.
            Ok(Err(e)) if status.is_success() => {
                return Err(ClientError::Decode(
                    format!("{status} but its body was lost: {e}").into(),
                ))
            }
            Err(_) if status.is_success() => {
                return Err(ClientError::Decode(
                    format!("{status} but its body did not arrive within {timeout:?}").into(),
                ))
            }
            Ok(Err(e)) => return Err(ClientError::Connect(e.to_string().into())),
            Err(_) => return Err(ClientError::Timeout(timeout)),
        };
        if status.is_success() {
            return Ok(body);
        }
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ClientError::Unauthorized {
                status: status.as_u16(),
            },
            StatusCode::NOT_FOUND => ClientError::NotFound {
                path: path_and_query.into(),
            },
            _ => {
                let mut e = api_error(status, &body);
                e.retry_after = retry_after;
                ClientError::Api(Box::new(e))
            }
        })
    }

    async fn send_json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<T, ClientError> {
        let bytes = self.send(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string().into()))
    }

    /// `POST /api/v1/receivers`: creates a receiver, returns its id.
    ///
    /// # Errors
    /// [`ClientError::Api`] with status 400 when one with the same name and type
    /// exists (`receiver_creation_failed`), or for validation errors.
    pub async fn create_event_receiver(
        &self,
        name: &str,
        receiver_type: &str,
        version: &str,
        description: &str,
        schema: Value,
    ) -> Result<String, ClientError> {
        let body = json!({
            "name": name, "type": receiver_type, "version": version,
            "description": description, "schema": schema,
        });
        let resp: DataId = self
            .send_json(Method::POST, "/api/v1/receivers", Some(to_bytes(&body)?))
            .await?;
        Ok(resp.data)
    }

    /// `GET /api/v1/receivers` with filters and paging (which the current server
    /// ignores: it returns every receiver).
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn list_event_receivers(
        &self,
        query: &ReceiverQuery,
    ) -> Result<ReceiverPage, ClientError> {
        let mut q = Vec::new();
        if let Some(v) = &query.name {
            q.push(format!("name={}", encode(v)));
        }
        if let Some(v) = &query.receiver_type {
            q.push(format!("type={}", encode(v)));
        }
        if let Some(v) = &query.version {
            q.push(format!("version={}", encode(v)));
        }
        if let Some(v) = query.limit {
            q.push(format!("limit={v}"));
        }
        if let Some(v) = query.offset {
            q.push(format!("offset={v}"));
        }
        let path = if q.is_empty() {
            "/api/v1/receivers".to_owned()
        } else {
            format!("/api/v1/receivers?{}", q.join("&"))
        };
        self.send_json(Method::GET, &path, None).await
    }

    /// `GET /api/v1/receivers/{id}`.
    ///
    /// # Errors
    /// [`ClientError::NotFound`] for an unknown id.
    pub async fn get_event_receiver(&self, id: &str) -> Result<EventReceiver, ClientError> {
        let resp: Value = self
            .send_json(
                Method::GET,
                &format!("/api/v1/receivers/{}", encode(id)),
                None,
            )
            .await?;
        // Accept the receiver bare or wrapped in `data`.
        let v = match resp {
            Value::Object(mut m) if m.contains_key("data") && !m.contains_key("id") => {
                m.remove("data").unwrap_or_default()
            }
            other => other,
        };
        serde_json::from_value(v).map_err(|e| ClientError::Decode(e.to_string().into()))
    }

    /// Finds the receiver with exactly this name **and** type across every page
    /// (the server's filters cannot be trusted), or creates it. A 400 "already
    /// exists" on create means another process won the race: list again and take
    /// it. Concurrent callers in this process share one discovery.
    ///
    /// # Errors
    /// Any [`ClientError`] of the list or create calls.
    pub async fn discover_or_create_event_receiver(
        &self,
        name: &str,
        receiver_type: &str,
        version: &str,
        description: &str,
        schema: Value,
    ) -> Result<String, ClientError> {
        let slot = self.discovery_slot(name, receiver_type);
        let mut cached = slot.lock().await;
        if let Some(id) = cached.as_ref() {
            return Ok(id.clone());
        }
        let id = match self.find_receiver(name, receiver_type).await? {
            Some(id) => id,
            None => match self
                .create_event_receiver(name, receiver_type, version, description, schema.clone())
                .await
            {
                Ok(id) => id,
                Err(ClientError::Api(e))
                    if e.status == 400 && e.body.contains("already exists") =>
                {
                    self.find_receiver(name, receiver_type)
                        .await?
                        .ok_or(ClientError::Api(e))?
                }
                Err(e) => return Err(e),
            },
        };
        *cached = Some(id.clone());
        self.inner
            .discovered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id.clone(),
                Arc::new(ReceiverSpec {
                    name: name.to_owned(),
                    receiver_type: receiver_type.to_owned(),
                    version: version.to_owned(),
                    description: description.to_owned(),
                    schema,
                }),
            );
        Ok(id)
    }

    fn discovery_slot(&self, name: &str, receiver_type: &str) -> DiscoverySlot {
        let mut map = self
            .inner
            .discovering
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Arc::clone(
            map.entry((name.to_owned(), receiver_type.to_owned()))
                .or_default(),
        )
    }

    /// After `stale_id` came back 404 (XZepr keeps receivers in memory, so a
    /// restart loses them): discovers or creates the receiver again, with the
    /// name, type and the rest it was first discovered with, and returns its id.
    /// Concurrent callers with the same stale id share one discovery. `Ok(None)`
    /// when `stale_id` was not discovered by this client.
    ///
    /// # Errors
    /// As [`XzeprClient::discover_or_create_event_receiver`].
    pub async fn rediscover_receiver(&self, stale_id: &str) -> Result<Option<String>, ClientError> {
        let spec = self
            .inner
            .discovered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(stale_id)
            .cloned();
        let Some(spec) = spec else {
            return Ok(None);
        };
        {
            let slot = self.discovery_slot(&spec.name, &spec.receiver_type);
            let mut cached = slot.lock().await;
            // Only the first caller forgets it; the others find the new id cached.
            if cached.as_deref() == Some(stale_id) {
                *cached = None;
            }
        }
        self.discover_or_create_event_receiver(
            &spec.name,
            &spec.receiver_type,
            &spec.version,
            &spec.description,
            spec.schema.clone(),
        )
        .await
        .map(Some)
    }

    /// Forgets a discovered receiver id (e.g. after it came back 404 because the
    /// server restarted), so the next discovery asks the server again.
    pub fn forget_receiver(&self, name: &str, receiver_type: &str) {
        let mut map = self
            .inner
            .discovering
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.remove(&(name.to_owned(), receiver_type.to_owned()));
    }

    async fn find_receiver(
        &self,
        name: &str,
        receiver_type: &str,
    ) -> Result<Option<String>, ClientError> {
        const PAGE: u32 = 1000;
        let mut seen = std::collections::HashSet::new();
        let mut offset = 0u64;
        loop {
            let page = self
                .list_event_receivers(&ReceiverQuery {
                    name: Some(name.to_owned()),
                    receiver_type: Some(receiver_type.to_owned()),
                    limit: Some(PAGE),
                    offset: Some(offset),
                    ..ReceiverQuery::default()
                })
                .await?;
            let mut new = 0;
            for r in &page.data {
                if seen.insert(r.id.clone()) {
                    new += 1;
                    if r.name == name && r.receiver_type == receiver_type {
                        return Ok(Some(r.id.clone()));
                    }
                }
            }
            let more = page.pagination.is_some_and(|p| p.has_more);
            // A server that ignores `offset` returns the same page again: stop.
            if !more || new == 0 {
                return Ok(None);
            }
            offset += page.data.len() as u64;
        }
    }

    /// `POST /api/v1/events`: records an event, returns its id.
    ///
    /// # Errors
    /// [`ClientError::NotFound`] for an unknown receiver, [`ClientError::Api`]
    /// (400, with `field`) for a malformed one, any other [`ClientError`].
    pub async fn create_event(&self, event: &CreateEvent) -> Result<String, ClientError> {
        self.post_event_body(to_bytes(event)?).await
    }

    /// `POST /api/v1/events` with a body already encoded (the reporter's path).
    pub(crate) async fn post_event_body(&self, body: Bytes) -> Result<String, ClientError> {
        let resp: DataId = self
            .send_json(Method::POST, EVENTS_PATH, Some(body))
            .await?;
        Ok(resp.data)
    }

    /// Posts `{work_name}.started` (the plan's signature).
    ///
    /// # Errors
    /// As [`XzeprClient::create_event`].
    #[allow(clippy::too_many_arguments)]
    pub async fn post_work_started(
        &self,
        receiver_id: &str,
        work_id: &str,
        work_name: &str,
        work_version: &str,
        platform_id: &str,
        package: &str,
        details: Value,
    ) -> Result<String, ClientError> {
        let w = WorkRef::new(
            receiver_id,
            work_id,
            work_name,
            work_version,
            platform_id,
            package,
        );
        self.create_event(&w.started(details)).await
    }

    /// Posts `{work_name}.completed` with `success` (the plan's signature).
    ///
    /// # Errors
    /// As [`XzeprClient::create_event`].
    #[allow(clippy::too_many_arguments)]
    pub async fn post_work_completed(
        &self,
        receiver_id: &str,
        work_id: &str,
        work_name: &str,
        work_version: &str,
        platform_id: &str,
        package: &str,
        success: bool,
        details: Value,
    ) -> Result<String, ClientError> {
        let w = WorkRef::new(
            receiver_id,
            work_id,
            work_name,
            work_version,
            platform_id,
            package,
        );
        self.create_event(&w.completed(success, details)).await
    }

    /// Posts `{work_name}.failed` with the error and its code in `details`.
    ///
    /// # Errors
    /// As [`XzeprClient::create_event`].
    #[allow(clippy::too_many_arguments)]
    pub async fn post_work_failed(
        &self,
        receiver_id: &str,
        work_id: &str,
        work_name: &str,
        work_version: &str,
        platform_id: &str,
        package: &str,
        error: &str,
        error_code: &str,
        details: Value,
    ) -> Result<String, ClientError> {
        let w = WorkRef::new(
            receiver_id,
            work_id,
            work_name,
            work_version,
            platform_id,
            package,
        );
        self.create_event(&w.failed(error, error_code, details))
            .await
    }
}

#[derive(Deserialize)]
struct DataId {
    data: String,
}

fn to_bytes<T: Serialize>(v: &T) -> Result<Bytes, ClientError> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(|e| ClientError::Decode(e.to_string().into()))
}

fn api_error(status: StatusCode, body: &[u8]) -> ApiError {
    let text = String::from_utf8_lossy(body).into_owned();
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let field = |k: &str| {
        json.as_ref()
            .and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    ApiError {
        status: status.as_u16(),
        error: field("error"),
        message: field("message"),
        field: field("field"),
        body: text,
        retry_after: None,
    }
}

/// Percent-encodes a query or path component (unreserved characters kept).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_stay_small_and_classify() {
        assert!(
            std::mem::size_of::<ClientError>() <= 40,
            "{}",
            std::mem::size_of::<ClientError>()
        );
        assert!(ClientError::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(!ClientError::Unauthorized { status: 401 }.is_retryable());
        let e = |status| {
            ClientError::Api(Box::new(api_error(
                StatusCode::from_u16(status).unwrap(),
                b"x",
            )))
        };
        assert!(e(500).is_retryable());
        assert!(e(429).is_retryable());
        assert!(!e(400).is_retryable());
    }

    #[test]
    fn lifecycle_bodies_follow_the_contract() {
        let w = WorkRef::new("R1", "w-1", "deploy", "2.0.0", "linux", "deployer");
        let s = w.started(json!({"k": 1}));
        assert_eq!(s.name, "deploy.started");
        assert_eq!((s.version.as_str(), s.release.as_str()), ("2.0.0", "2.0.0"));
        assert_eq!(s.description, "Work started: deploy (w-1)");
        assert!(s.success);
        assert_eq!(s.payload["status"], "started");
        assert_eq!(s.payload["work_id"], "w-1");
        assert!(s.payload["started_at"].as_str().unwrap().ends_with('Z'));
        let c = w.completed(true, json!({}));
        assert_eq!(
            (c.name.as_str(), c.payload["success"].as_bool()),
            ("deploy.completed", Some(true))
        );
        let f = w.failed("boom", "E1", json!({"step": 3}));
        assert_eq!(f.name, "deploy.failed");
        assert!(!f.success);
        assert_eq!(
            f.payload["details"],
            json!({"step": 3, "error": "boom", "error_code": "E1"})
        );
        assert_eq!(f.event_receiver_id, "R1");
        assert_eq!(f.package, "deployer");
    }

    #[test]
    fn encoded_lifecycle_bodies_equal_the_create_event_ones() {
        let w = WorkRef::new("R1", "w-\"1", "deploy", "2.0.0", "linux", "deployer");
        let without_time = |mut v: Value| {
            let p = v["payload"].as_object_mut().unwrap();
            assert!(p
                .remove("started_at")
                .or(p.remove("completed_at"))
                .is_some());
            v
        };
        let details = [
            json!({"step": 3, "error": "theirs"}),
            Value::Null,
            json!([1, 2]),
        ];
        for d in &details {
            let cases = [
                (Phase::Started, w.started(d.clone())),
                (Phase::Completed, w.completed(true, d.clone())),
                (
                    Phase::Failed {
                        error: "bo\nom",
                        error_code: "E1",
                    },
                    w.failed("bo\nom", "E1", d.clone()),
                ),
            ];
            for (phase, event) in cases {
                let encoded = serde_json::to_vec(&LifecycleBody::new(w, phase, d)).unwrap();
                let encoded: Value = serde_json::from_slice(&encoded).unwrap();
                assert_eq!(
                    without_time(encoded),
                    without_time(serde_json::to_value(&event).unwrap()),
                    "{phase:?} {d}"
                );
            }
        }
        let f = w.failed("boom", "E1", json!([1]));
        assert_eq!(
            f.payload["details"],
            json!({"context": [1], "error": "boom", "error_code": "E1"})
        );
        // `details` is always an object.
        assert_eq!(w.started(Value::Null).payload["details"], json!({}));
        assert_eq!(
            w.completed(true, json!("x")).payload["details"],
            json!({"context": "x"})
        );
        // The plan's `completed(false)` is the contract's `failed`.
        let u = w.completed(false, json!({"error": "no quorum", "step": 2}));
        assert_eq!(u.name, "deploy.failed");
        assert!(!u.success);
        assert_eq!(
            u.payload["details"],
            json!({"step": 2, "error": "no quorum", "error_code": "unsuccessful"})
        );
    }

    #[test]
    fn config_from_env_and_token_never_printed() {
        let err = XzeprClientConfig::from_env_with(|_| None).unwrap_err();
        assert!(err.to_string().contains("XZEPR_API_TOKEN"), "{err}");
        let c = XzeprClientConfig::from_env_with(|k| {
            (k == "XZEPR_API_TOKEN").then(|| "s3cr3t-token".to_owned())
        })
        .unwrap();
        assert_eq!(c.base_url, "http://localhost:8042");
        assert!(!format!("{c:?}").contains("s3cr3t"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(async { XzeprClient::new(c) }).unwrap();
        assert!(!format!("{client:?}").contains("s3cr3t"));
        assert!(XzeprClient::new(XzeprClientConfig::new("ftp://x", "t")).is_err());
    }
}
