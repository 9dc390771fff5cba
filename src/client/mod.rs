//! The XZepr REST client: receivers, events and the work-lifecycle posts, over a
//! pooled keep-alive connection (hyper + rustls).
//!
//! Request and response bodies follow the XZepr contract as the real server
//! implements it: the receiver list ignores its filters and paging, so discovery
//! matches name and type on this side and walks every page.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{
    AtomicBool,
    Ordering::{Acquire, Release},
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
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
    /// 401/403: the token was refused, or none was sent to a server that wants
    /// one. Never retried.
    #[error("unauthorized ({status}): check XZEPR_API_TOKEN (set it when XZepr requires a token)")]
    Unauthorized {
        /// 401 or 403.
        status: u16,
    },
    /// No response within the request timeout, before the request was handed in
    /// full to the connection: the server cannot have acted on it.
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    /// The request was handed in full to the connection, then no answer came (the
    /// timeout fired, or the connection closed): the server may have acted on it,
    /// so a retry may record a duplicate. Retryable; see
    /// [`ClientError::is_response_lost`].
    #[error("request sent, but its response was lost: {reason}")]
    ResponseLost {
        /// True when the request timeout fired (rather than the connection closing).
        timed_out: bool,
        /// What happened.
        reason: Box<str>,
    },
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
            ClientError::Timeout(_)
            | ClientError::Connect(_)
            | ClientError::ResponseLost { .. } => true,
            ClientError::Api(e) => e.status >= 500 || e.status == 429,
            _ => false,
        }
    }

    /// True when the request timeout fired: [`ClientError::Timeout`], or a
    /// [`ClientError::ResponseLost`] that timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            ClientError::Timeout(_)
                | ClientError::ResponseLost {
                    timed_out: true,
                    ..
                }
        )
    }

    /// True for [`ClientError::ResponseLost`]: the request went out in full and no
    /// answer came, so the server may have acted on it (XZepr may have recorded
    /// the event). A retry is still right for at-least-once, but may duplicate.
    pub fn is_response_lost(&self) -> bool {
        matches!(self, ClientError::ResponseLost { .. })
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

/// Default [`XzeprClientConfig::request_timeout`]: 30 s. XZepr answers in ~5 ms,
/// but while its own Kafka is unreachable `POST /api/v1/events` takes 10–14 s and
/// *still records the event*: a shorter timeout followed by a retry records it
/// twice. 30 s covers that slow-but-working server with room to spare.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Default [`XzeprClientConfig::connect_timeout`]: 5 s. Connecting is cheap and
/// unrelated to XZepr's slowness; a server that does not accept a connection this
/// fast is down, and failing the attempt early (nothing was sent, so nothing can
/// be duplicated) lets the retry and the breaker take over.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of an [`XzeprClient`].
#[derive(Clone)]
#[non_exhaustive]
pub struct XzeprClientConfig {
    /// Server base URL, e.g. `http://localhost:8042` (the contract's default).
    pub base_url: String,
    /// Bearer token (never printed). Empty: no `Authorization` header is sent
    /// (a server without authentication in front); a 401/403 then comes back as
    /// [`ClientError::Unauthorized`], which names `XZEPR_API_TOKEN`.
    pub token: String,
    /// Time from sending a request to its whole response. Default
    /// [`DEFAULT_REQUEST_TIMEOUT`] (30 s, see there why). When it fires after the
    /// request went out, the error is [`ClientError::ResponseLost`].
    pub request_timeout: Duration,
    /// Time to establish a connection (TCP and TLS). Default
    /// [`DEFAULT_CONNECT_TIMEOUT`] (5 s); it fails as [`ClientError::Connect`].
    pub connect_timeout: Duration,
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
        let token = if self.token.trim().is_empty() {
            "<none>"
        } else {
            "<redacted>"
        };
        f.debug_struct("XzeprClientConfig")
            .field("base_url", &self.base_url)
            .field("token", &token)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_max_idle_per_host", &self.pool_max_idle_per_host)
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl XzeprClientConfig {
    /// Settings for `base_url` with `token` (empty: no `Authorization` header),
    /// other values at their defaults.
    pub fn new(base_url: impl Into<String>, token: impl Into<String>) -> Self {
        XzeprClientConfig {
            base_url: base_url.into(),
            token: token.into(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            pool_max_idle_per_host: 128,
            pool_idle_timeout: Duration::from_secs(90),
            ca_file: None,
        }
    }

    /// Sets [`XzeprClientConfig::request_timeout`].
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`XzeprClientConfig::connect_timeout`].
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`XzeprClientConfig::pool_max_idle_per_host`].
    #[must_use]
    pub fn with_pool_max_idle_per_host(mut self, idle: usize) -> Self {
        self.pool_max_idle_per_host = idle;
        self
    }

    /// Sets [`XzeprClientConfig::pool_idle_timeout`].
    #[must_use]
    pub fn with_pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool_idle_timeout = timeout;
        self
    }

    /// Sets [`XzeprClientConfig::ca_file`].
    #[must_use]
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// From `XZEPR_API_URL` (default `http://localhost:8042`) and
    /// `XZEPR_API_TOKEN` (absent or empty: no `Authorization` header is sent).
    ///
    /// # Errors
    /// None today; kept fallible for settings still to come.
    pub fn from_env() -> Result<Self, ClientError> {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    /// As [`XzeprClientConfig::from_env`], reading through `lookup`.
    ///
    /// # Errors
    /// As [`XzeprClientConfig::from_env`].
    pub fn from_env_with(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ClientError> {
        let url = lookup("XZEPR_API_URL")
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| "http://localhost:8042".to_owned());
        let token = lookup("XZEPR_API_TOKEN")
            .map(|t| t.trim().to_owned())
            .unwrap_or_default();
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

impl ReceiverQuery {
    /// No filters, the server's paging.
    pub fn new() -> Self {
        Self::default()
    }

    /// Filters by name.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Filters by type.
    #[must_use]
    pub fn with_type(mut self, receiver_type: impl Into<String>) -> Self {
        self.receiver_type = Some(receiver_type.into());
        self
    }

    /// Filters by version.
    #[must_use]
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Page size (the server accepts 1..=1000).
    #[must_use]
    pub fn with_limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Page offset.
    #[must_use]
    pub fn with_offset(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }
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

impl CreateEvent {
    /// An event named `name` under the receiver `event_receiver_id`: successful,
    /// payload `{}`, every other field empty. XZepr requires `version`,
    /// `release`, `platform_id` and `package` to be non-empty: set them with the
    /// `with_*` methods.
    ///
    /// ```
    /// # use xzepr_consumer::client::CreateEvent;
    /// let event = CreateEvent::new("deploy.finished", "01M82X4ET7AYGAEYSHF5AKVAVW")
    ///     .with_version("1.2.0")
    ///     .with_release("1.2.0")
    ///     .with_platform_id("linux")
    ///     .with_package("deployer")
    ///     .with_payload(serde_json::json!({"region": "eu"}));
    /// assert!(event.success);
    /// ```
    pub fn new(name: impl Into<String>, event_receiver_id: impl Into<String>) -> Self {
        CreateEvent {
            name: name.into(),
            version: String::new(),
            release: String::new(),
            platform_id: String::new(),
            package: String::new(),
            description: String::new(),
            payload: Value::Object(serde_json::Map::new()),
            success: true,
            event_receiver_id: event_receiver_id.into(),
        }
    }

    /// Sets the version.
    #[must_use]
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets the release.
    #[must_use]
    pub fn with_release(mut self, release: impl Into<String>) -> Self {
        self.release = release.into();
        self
    }

    /// Sets the platform id.
    #[must_use]
    pub fn with_platform_id(mut self, platform_id: impl Into<String>) -> Self {
        self.platform_id = platform_id.into();
        self
    }

    /// Sets the package.
    #[must_use]
    pub fn with_package(mut self, package: impl Into<String>) -> Self {
        self.package = package.into();
        self
    }

    /// Sets the description.
    #[must_use]
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Sets the payload (XZepr wants a JSON object).
    #[must_use]
    pub fn with_payload(mut self, payload: Value) -> Self {
        self.payload = payload;
        self
    }

    /// Sets the success flag.
    #[must_use]
    pub fn with_success(mut self, success: bool) -> Self {
        self.success = success;
        self
    }
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
        let w = &body.work;
        CreateEvent {
            name: body.name().to_string(),
            version: w.work_version.to_owned(),
            release: w.work_version.to_owned(),
            platform_id: w.platform_id.to_owned(),
            package: w.package.to_owned(),
            description: body.description().to_string(),
            payload: serde_json::to_value(&body.payload).unwrap_or(Value::Null),
            success: phase.success(),
            event_receiver_id: w.receiver_id.to_owned(),
        }
    }

    /// The reference with every field XZepr requires non-empty filled from its
    /// documented fallback (see [`FALLBACK_VALUE`]), so that a source event's
    /// missing attribute never makes an unpostable (400) record:
    ///
    /// - `platform_id` empty → the `package` (the service's name), or
    ///   [`FALLBACK_VALUE`] when that is empty too;
    /// - `package`, `work_name` or `work_version` empty → [`FALLBACK_VALUE`].
    ///
    /// Blank (whitespace-only) counts as empty. The receiver id has no fallback.
    pub fn with_fallbacks(self) -> Self {
        let blank = |s: &str| s.trim().is_empty();
        let package = if blank(self.package) {
            FALLBACK_VALUE
        } else {
            self.package
        };
        WorkRef {
            work_name: if blank(self.work_name) {
                FALLBACK_VALUE
            } else {
                self.work_name
            },
            work_version: if blank(self.work_version) {
                FALLBACK_VALUE
            } else {
                self.work_version
            },
            platform_id: if blank(self.platform_id) {
                package
            } else {
                self.platform_id
            },
            package,
            ..self
        }
    }
}

/// What a required lifecycle field falls back to when nothing better is known
/// (see [`WorkRef::with_fallbacks`]).
pub const FALLBACK_VALUE: &str = "unknown";

/// The `details.post_key` of a lifecycle post: `{work_id}:{status}` (`status` is
/// `started`, `completed` or `failed`). Stable for a (work id, status), across
/// retries and restarts, so a downstream reader can recognise a duplicate.
pub fn post_key(work_id: &str, status: &str) -> String {
    format!("{work_id}:{status}")
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
        let work = work.with_fallbacks();
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
        let details = Details {
            details: self.details,
            key: PostKey(self.work_id, self.phase),
            error: match self.phase {
                Phase::Failed { error, error_code } => Some((error, error_code)),
                Phase::Started | Phase::Completed => None,
            },
        };
        match self.phase {
            Phase::Started => m.serialize_entry("started_at", &self.at)?,
            Phase::Completed | Phase::Failed { .. } => {
                m.serialize_entry("completed_at", &self.at)?;
                m.serialize_entry("success", &self.phase.success())?;
            }
        }
        m.serialize_entry("details", &details)?;
        m.end()
    }
}

/// `{work_id}:{status}`, written straight into the output.
struct PostKey<'a>(&'a str, Phase<'a>);

impl fmt::Display for PostKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0, self.1.word())
    }
}

impl Serialize for PostKey<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `details` as the contract has it, always an object: the caller's object
/// (`null` is `{}`, a non-object goes under `context`), then `post_key`, and for
/// a failure `error` and `error_code`; these replace any of the caller's own.
struct Details<'a> {
    details: &'a Value,
    key: PostKey<'a>,
    error: Option<(&'a str, &'a str)>,
}

impl Serialize for Details<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let ours = |k: &str| {
            k == "post_key" || (self.error.is_some() && (k == "error" || k == "error_code"))
        };
        let mut m = s.serialize_map(None)?;
        match self.details {
            Value::Object(obj) => {
                for (k, v) in obj {
                    if !ours(k) {
                        m.serialize_entry(k, v)?;
                    }
                }
            }
            Value::Null => {}
            other => m.serialize_entry("context", other)?,
        }
        m.serialize_entry("post_key", &self.key)?;
        if let Some((error, error_code)) = self.error {
            m.serialize_entry("error", error)?;
            m.serialize_entry("error_code", error_code)?;
        }
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

/// One (name, type)'s discovery. Slots are never removed from the map (there is
/// one per (name, type) this process ever discovered: a handful), so every
/// caller for a (name, type) always meets the same `lock`: one discovery in
/// flight per (name, type), whatever `forget_receiver` does meanwhile.
#[derive(Default)]
struct DiscoverySlot {
    /// Held for the whole of a discovery.
    lock: tokio::sync::Mutex<()>,
    /// The id found, if still trusted. A std mutex, never held across an await:
    /// `forget_receiver` (sync) clears it without waiting for a discovery.
    cached: Mutex<Option<String>>,
}

type Singleflight = Mutex<HashMap<(String, String), Arc<DiscoverySlot>>>;

/// A request body that records when it was handed in full to the connection:
/// after that, a lost answer may mean the server acted on the request
/// ([`ClientError::ResponseLost`]); before it, the server cannot have.
struct SentBody {
    data: Option<Bytes>,
    sent: Arc<AtomicBool>,
}

impl hyper::body::Body for SentBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let frame = self.data.take().map(|d| Ok(hyper::body::Frame::data(d)));
        // One frame is the whole body: taking it (or the end) is handing it all over.
        self.sent.store(true, Release);
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// What a receiver was discovered with, to discover it again after a 404.
#[derive(Debug, Clone)]
struct ReceiverSpec {
    name: String,
    receiver_type: String,
    version: String,
    description: String,
    schema: Value,
}

/// Least wait after creating a receiver before the list that names the winner
/// (see `discover_or_create_event_receiver`).
const DISCOVERY_SETTLE_MIN: std::time::Duration = std::time::Duration::from_millis(20);
/// Most wait after creating a receiver: a start-up cost paid once per
/// (name, type) and process.
const DISCOVERY_SETTLE_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// The XZepr API client. Cheap to clone: clones share the connection pool.
#[derive(Clone)]
pub struct XzeprClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: Client<Https, SentBody>,
    base: String,
    /// `POST /api/v1/events`, parsed once: the reporter's hot path.
    events_uri: http::Uri,
    /// `None` when no token is configured: no `Authorization` header then.
    auth: Option<http::HeaderValue>,
    timeout: Duration,
    /// One discovery at a time per (name, type): concurrent callers create at most one.
    discovering: Singleflight,
    /// Every receiver id discovered, with what it was discovered with.
    discovered: Mutex<HashMap<String, Arc<ReceiverSpec>>>,
    /// Losing duplicate receivers already logged, so each is logged once.
    warned_losers: Mutex<std::collections::HashSet<String>>,
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
    /// [`ClientError::Config`] for a base URL that is not http(s), a token that
    /// is not a valid header value, or an unreadable CA file.
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
        let token = config.token.trim();
        let auth = if token.is_empty() {
            None
        } else {
            let mut auth =
                http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                    ClientError::Config {
                        name: "token (XZEPR_API_TOKEN)",
                        reason: "not a valid header value".into(),
                    }
                })?;
            auth.set_sensitive(true);
            Some(auth)
        };
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
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(config.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(tcp);
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
                warned_losers: Mutex::new(std::collections::HashSet::new()),
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
            .header(http::header::ACCEPT, "application/json");
        if let Some(auth) = &self.inner.auth {
            req = req.header(http::header::AUTHORIZATION, auth.clone());
        }
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        // Only a body can be "sent in full"; a bodiless request (a GET) changes
        // nothing on the server, so a lost answer to it is a plain timeout.
        let sent = Arc::new(AtomicBool::new(false));
        let has_body = body.as_ref().is_some_and(|b| !b.is_empty());
        let req = req
            .body(SentBody {
                data: body.filter(|b| !b.is_empty()),
                sent: Arc::clone(&sent),
            })
            .map_err(|e| ClientError::Connect(e.to_string().into()))?;
        let timeout = self.inner.timeout;
        let started = tokio::time::Instant::now();
        let lost = |timed_out: bool, reason: String| {
            if has_body && sent.load(Acquire) {
                ClientError::ResponseLost {
                    timed_out,
                    reason: reason.into(),
                }
            } else if timed_out {
                ClientError::Timeout(timeout)
            } else {
                ClientError::Connect(reason.into())
            }
        };
        let resp = match tokio::time::timeout(timeout, self.inner.http.request(req)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => return Err(lost(false, error_chain(&e))),
            Err(_) => return Err(lost(true, format!("no answer within {timeout:?}"))),
        };
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
    /// (the server's filters cannot be trusted), or creates it, and returns its
    /// id. Concurrent callers in this process share one discovery per (name,
    /// type), always.
    ///
    /// XZepr's create is check-then-insert, so instances starting at once can
    /// each create one. After creating (or being told it exists), the client
    /// waits twice the create's latency (20 ms to 2 s) for concurrent creators'
    /// inserts to land, then lists again. Every instance converges on the same receiver all the
    /// same: after creating, it lists again, and whenever several exact matches
    /// exist it takes the **earliest `created_at`, then the smallest id**. The
    /// losers are left alone (the API cannot tell which one another instance is
    /// using) and logged once each at `warn` with their ids. A 400 "already
    /// exists" on create means another instance won the race: list again and
    /// take the winner.
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
        let spec = ReceiverSpec {
            name: name.to_owned(),
            receiver_type: receiver_type.to_owned(),
            version: version.to_owned(),
            description: description.to_owned(),
            schema,
        };
        self.discover(spec, None, &|_| {}).await
    }

    /// The one discovery of `spec`'s (name, type) at a time. With `stale`, a
    /// cached id equal to it is not trusted (it came back 404). `on_created`
    /// gets the id of a receiver this call created, as soon as the create
    /// answers (before the wait and list that name the winner).
    async fn discover(
        &self,
        spec: ReceiverSpec,
        stale: Option<&str>,
        on_created: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<String, ClientError> {
        let slot = self.discovery_slot(&spec.name, &spec.receiver_type);
        let _discovering = slot.lock.lock().await;
        {
            let cached = slot.cached.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(id) = cached.as_deref().filter(|id| Some(*id) != stale) {
                return Ok(id.to_owned());
            }
        }
        let (name, ty) = (spec.name.as_str(), spec.receiver_type.as_str());
        let id = match self.find_receiver(name, ty).await? {
            Some(id) => id,
            None => {
                let sent = std::time::Instant::now();
                let created = self
                    .create_event_receiver(
                        name,
                        ty,
                        &spec.version,
                        &spec.description,
                        spec.schema.clone(),
                    )
                    .await;
                // XZepr's create is check-then-insert: another instance that
                // passed its check before our insert may not have inserted yet
                // (and may carry the earlier `created_at`). Its insert comes at
                // most about one create's latency after ours, so wait that out
                // (twice, bounded) and let the list, not our create, name the
                // winner: every instance then reads the same list.
                let settle = (sent.elapsed() * 2).clamp(DISCOVERY_SETTLE_MIN, DISCOVERY_SETTLE_MAX);
                match created {
                    Ok(ours) => {
                        on_created(&ours);
                        tokio::time::sleep(settle).await;
                        self.find_receiver(name, ty).await?.unwrap_or(ours)
                    }
                    Err(ClientError::Api(e))
                        if e.status == 400 && e.body.contains("already exists") =>
                    {
                        tokio::time::sleep(settle).await;
                        self.find_receiver(name, ty)
                            .await?
                            .ok_or(ClientError::Api(e))?
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        *slot.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.clone());
        self.inner
            .discovered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), Arc::new(spec));
        Ok(id)
    }

    fn discovery_slot(&self, name: &str, receiver_type: &str) -> Arc<DiscoverySlot> {
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
    /// Concurrent callers share the one discovery of its (name, type): the first
    /// asks the server, the others get its answer. `Ok(None)` when `stale_id` was
    /// not discovered by this client.
    ///
    /// # Errors
    /// As [`XzeprClient::discover_or_create_event_receiver`].
    pub async fn rediscover_receiver(&self, stale_id: &str) -> Result<Option<String>, ClientError> {
        self.rediscover_receiver_with(stale_id, &|_| {}).await
    }

    /// [`XzeprClient::rediscover_receiver`], calling `on_created` with the id of
    /// a receiver it creates the moment the create answers: XZepr publishes
    /// that receiver's `receiver.created` before it answers, so whoever must
    /// recognise its own receivers learns the id before that event can arrive.
    pub(crate) async fn rediscover_receiver_with(
        &self,
        stale_id: &str,
        on_created: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Option<String>, ClientError> {
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
        self.discover(spec.as_ref().clone(), Some(stale_id), on_created)
            .await
            .map(Some)
    }

    /// Forgets a discovered receiver id (e.g. after it came back 404 because the
    /// server restarted), so the next discovery asks the server again. A
    /// discovery already in flight for this (name, type) is not disturbed, and
    /// later callers still wait for it: never two at once.
    pub fn forget_receiver(&self, name: &str, receiver_type: &str) {
        let slot = self
            .inner
            .discovering
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(name.to_owned(), receiver_type.to_owned()))
            .cloned();
        if let Some(slot) = slot {
            *slot.cached.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// The id of the receiver named `name` of type `receiver_type`, across every
    /// page: among several exact matches, the deterministic winner (earliest
    /// `created_at`, then smallest id); the others are logged once each.
    async fn find_receiver(
        &self,
        name: &str,
        receiver_type: &str,
    ) -> Result<Option<String>, ClientError> {
        const PAGE: u32 = 1000;
        let mut seen = std::collections::HashSet::new();
        let mut matches = Vec::new();
        let mut offset = 0u64;
        loop {
            let page = self
                .list_event_receivers(
                    &ReceiverQuery::new()
                        .with_name(name)
                        .with_type(receiver_type)
                        .with_limit(PAGE)
                        .with_offset(offset),
                )
                .await?;
            let mut new = 0;
            for r in page.data.iter() {
                if seen.insert(r.id.clone()) {
                    new += 1;
                    if r.name == name && r.receiver_type == receiver_type {
                        matches.push(r.clone());
                    }
                }
            }
            let more = page.pagination.is_some_and(|p| p.has_more);
            // A server that ignores `offset` returns the same page again: stop.
            if !more || new == 0 {
                break;
            }
            offset += page.data.len() as u64;
        }
        let Some(winner) = pick_winner(&matches) else {
            return Ok(None);
        };
        let winner = winner.id.clone();
        if matches.len() > 1 {
            let mut warned = self
                .inner
                .warned_losers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let losers: Vec<&str> = matches
                .iter()
                .map(|r| r.id.as_str())
                .filter(|id| *id != winner && warned.insert((*id).to_owned()))
                .collect();
            if !losers.is_empty() {
                tracing::warn!(
                    name, receiver_type, receiver = %winner, losers = ?losers,
                    "Several receivers with this name and type (created concurrently): \
                     using the earliest; the others are left alone."
                );
            }
        }
        Ok(Some(winner))
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

/// The receiver every instance agrees on among exact matches: the earliest
/// `created_at`, then the smallest id. A `created_at` that does not parse sorts
/// after every one that does (then by id), so the rule stays total.
fn pick_winner(matches: &[EventReceiver]) -> Option<&EventReceiver> {
    matches.iter().min_by(|a, b| {
        let at = |r: &EventReceiver| chrono::DateTime::parse_from_rfc3339(&r.created_at).ok();
        match (at(a), at(b)) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        }
        .then_with(|| a.id.cmp(&b.id))
    })
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
            json!({"step": 3, "post_key": "w-1:failed", "error": "boom", "error_code": "E1"})
        );
        assert_eq!(
            s.payload["details"],
            json!({"k": 1, "post_key": "w-1:started"})
        );
        assert_eq!(c.payload["details"]["post_key"], "w-1:completed");
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
            json!({"context": [1], "post_key": "w-\"1:failed", "error": "boom", "error_code": "E1"})
        );
        // `details` is always an object, with the post key (the caller's replaced).
        assert_eq!(
            w.started(Value::Null).payload["details"],
            json!({"post_key": "w-\"1:started"})
        );
        assert_eq!(
            w.started(json!({"post_key": "theirs"})).payload["details"],
            json!({"post_key": "w-\"1:started"})
        );
        assert_eq!(
            w.completed(true, json!("x")).payload["details"],
            json!({"context": "x", "post_key": "w-\"1:completed"})
        );
        assert_eq!(post_key("w-\"1", "completed"), "w-\"1:completed");
        // The plan's `completed(false)` is the contract's `failed`.
        let u = w.completed(false, json!({"error": "no quorum", "step": 2}));
        assert_eq!(u.name, "deploy.failed");
        assert!(!u.success);
        assert_eq!(
            u.payload["details"],
            json!({"step": 2, "post_key": "w-\"1:failed", "error": "no quorum", "error_code": "unsuccessful"})
        );
    }

    #[test]
    fn empty_required_fields_fall_back() {
        let w = WorkRef::new("R1", "w-1", "", " ", "", "deployer");
        let e = w.started(Value::Null);
        assert_eq!(e.name, "unknown.started");
        assert_eq!(
            (e.version.as_str(), e.release.as_str()),
            ("unknown", "unknown")
        );
        assert_eq!(e.platform_id, "deployer", "the service's name");
        let w = WorkRef::new("R1", "w-1", "deploy", "1", "", "");
        let e = w.completed(true, Value::Null);
        assert_eq!(
            (e.platform_id.as_str(), e.package.as_str()),
            ("unknown", "unknown")
        );
        // The encoded body (the reporter's path) falls back the same way.
        let body =
            serde_json::to_value(LifecycleBody::new(w, Phase::Started, &Value::Null)).unwrap();
        assert_eq!(
            (body["platform_id"].as_str(), body["package"].as_str()),
            (Some("unknown"), Some("unknown"))
        );
    }

    #[test]
    fn the_winner_is_the_earliest_then_the_smallest_id() {
        let r = |id: &str, at: &str| EventReceiver {
            id: id.into(),
            name: "n".into(),
            receiver_type: "t".into(),
            version: "1".into(),
            description: String::new(),
            schema: Value::Null,
            fingerprint: String::new(),
            created_at: at.into(),
        };
        let all = [
            r("B", "2026-01-01T00:00:01Z"),
            r("C", "2026-01-01T00:00:00.5+00:00"),
            r("A", "2026-01-01T00:00:01Z"),
            r("0", "not a time"),
        ];
        assert_eq!(pick_winner(&all).unwrap().id, "C");
        assert_eq!(pick_winner(&all[..1]).unwrap().id, "B");
        assert_eq!(
            pick_winner(&[all[0].clone(), all[2].clone()]).unwrap().id,
            "A"
        );
        assert_eq!(
            pick_winner(&[all[3].clone(), all[0].clone()]).unwrap().id,
            "B"
        );
        assert!(pick_winner(&[]).is_none());
    }

    #[test]
    fn defaults_and_a_missing_token() {
        let c = XzeprClientConfig::new("http://x", "");
        assert!(
            c.request_timeout >= Duration::from_secs(30),
            "covers XZepr's 10-14 s"
        );
        assert!(c.connect_timeout < c.request_timeout);
        let c = XzeprClientConfig::from_env_with(|_| None).unwrap();
        assert_eq!(c.token, "");
        assert!(format!("{c:?}").contains("<none>"));
        let lost = ClientError::ResponseLost {
            timed_out: true,
            reason: "x".into(),
        };
        assert!(lost.is_retryable() && lost.is_timeout() && lost.is_response_lost());
        assert!(!ClientError::Timeout(Duration::from_secs(1)).is_response_lost());
        assert!(ClientError::Unauthorized { status: 401 }
            .to_string()
            .contains("XZEPR_API_TOKEN"));
    }

    #[test]
    fn config_from_env_and_token_never_printed() {
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
