//! The XZepr REST client: receivers, events and the work-lifecycle posts, over a
//! pooled keep-alive connection (hyper + rustls).
//!
//! Request and response bodies follow the XZepr contract as the real server
//! implements it: the receiver list ignores its filters and paging, so discovery
//! matches name and type on this side and walks every page.
//!
//! | File | Holds |
//! |---|---|
//! | `error.rs` | [`ClientError`], [`ApiError`] and their predicates |
//! | `config.rs` | [`XzeprClientConfig`] (code or environment) |
//! | `api.rs` | the API's bodies: [`EventReceiver`], [`CreateEvent`], paging |
//! | `lifecycle.rs` | [`Status`], [`WorkRef`] and the lifecycle post's JSON |
//! | `transport.rs` | [`HttpTransport`]: the pooled hyper + rustls client |
//! | `discovery.rs` | find-or-create of a receiver, converging across instances |

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering::Acquire;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

mod api;
mod config;
mod discovery;
mod error;
mod lifecycle;
mod transport;

pub use api::{CreateEvent, EventReceiver, Pagination, ReceiverPage, ReceiverQuery};
pub use config::{XzeprClientConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT};
pub use error::{ApiError, BoxError, ClientError};
pub use lifecycle::{post_key, Status, WorkRef, FALLBACK_VALUE};
pub(crate) use lifecycle::{LifecycleBody, Phase};
pub use transport::{HttpTransport, TransportConfig};

use discovery::{ReceiverSpec, Singleflight};
use error::api_error;

const EVENTS_PATH: &str = "/api/v1/events";

/// Largest response body read: a receiver list of tens of thousands of receivers
/// fits; anything larger is an error, not an allocation without bound.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// The XZepr API client. Cheap to clone: clones share the connection pool.
#[derive(Clone)]
pub struct XzeprClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: HttpTransport,
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
        let bad_url = || ClientError::Config {
            name: "base_url (XZEPR_API_URL)",
            reason: "must be an http:// or https:// URL".into(),
        };
        let base = config.base_url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://"))
            || base.parse::<http::Uri>().is_err()
        {
            return Err(bad_url());
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
        Ok(XzeprClient {
            inner: Arc::new(Inner {
                http: HttpTransport::new(&config.transport())?,
                events_uri: format!("{base}{EVENTS_PATH}")
                    .parse()
                    .map_err(|_| bad_url())?,
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
        self.send_traced(method, path_and_query, body, None).await
    }

    /// [`XzeprClient::send`] with the W3C context to continue, if any.
    async fn send_traced(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        trace: Option<&crate::trace::TraceContext>,
    ) -> Result<Bytes, ClientError> {
        let uri = if path_and_query == EVENTS_PATH {
            self.inner.events_uri.clone()
        } else {
            format!("{}{path_and_query}", self.inner.base)
                .parse()
                .map_err(|e: http::uri::InvalidUri| ClientError::Connect(Box::new(e)))?
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
        for (name, value) in trace.iter().flat_map(|t| t.headers()) {
            req = req.header(name, value);
        }
        // Only a body can be "sent in full"; a bodiless request (a GET) changes
        // nothing on the server, so a lost answer to it is a plain timeout.
        let has_body = body.as_ref().is_some_and(|b| !b.is_empty());
        let req = req
            .body(body.unwrap_or_default())
            .map_err(|e| ClientError::Connect(Box::new(e)))?;
        let (response, sent) = self.inner.http.send_tracked(req);
        let timeout = self.inner.timeout;
        let started = tokio::time::Instant::now();
        let lost = |source: Option<BoxError>| {
            let went_out = has_body && sent.load(Acquire);
            match source {
                Some(source) if went_out => ClientError::ResponseLost {
                    timed_out: false,
                    source: Some(source),
                },
                Some(source) => ClientError::Connect(source),
                None if went_out => ClientError::ResponseLost {
                    timed_out: true,
                    source: None,
                },
                None => ClientError::Timeout(timeout),
            }
        };
        let resp = match tokio::time::timeout(timeout, response).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => return Err(lost(Some(Box::new(e)))),
            Err(_) => return Err(lost(None)),
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
                return Err(ClientError::Decode {
                    reason: format!("{status} but its body was lost").into(),
                    source: Some(e),
                })
            }
            Err(_) if status.is_success() => {
                return Err(ClientError::Decode {
                    reason: format!("{status} but its body did not arrive within {timeout:?}")
                        .into(),
                    source: None,
                })
            }
            Ok(Err(e)) => return Err(ClientError::Connect(e)),
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
        serde_json::from_slice(&bytes).map_err(ClientError::json)
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
        serde_json::from_value(v).map_err(ClientError::json)
    }

    /// `POST /api/v1/events`: records an event, returns its id.
    ///
    /// # Errors
    /// [`ClientError::NotFound`] for an unknown receiver, [`ClientError::Api`]
    /// (400, with `field`) for a malformed one, any other [`ClientError`].
    pub async fn create_event(&self, event: &CreateEvent) -> Result<String, ClientError> {
        self.post_event_body(to_bytes(event)?, None).await
    }

    /// `POST /api/v1/events` with a body already encoded (the reporter's path).
    pub(crate) async fn post_event_body(
        &self,
        body: Bytes,
        trace: Option<&crate::trace::TraceContext>,
    ) -> Result<String, ClientError> {
        let bytes = self
            .send_traced(Method::POST, EVENTS_PATH, Some(body), trace)
            .await?;
        let resp: DataId = serde_json::from_slice(&bytes).map_err(ClientError::json)?;
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
        .map_err(ClientError::json)
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

#[cfg(test)]
mod tests;
