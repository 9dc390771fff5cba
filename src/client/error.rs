//! What a client call can fail with, and how to tell the failures apart
//! ([`ClientError::is_retryable`] and the other predicates).

use std::time::Duration;

use http::StatusCode;
use serde_json::Value;

/// The underlying failure a [`ClientError`] keeps as its source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    #[error(
        "request sent, but its response was lost{}",
        if *timed_out { " (no answer within the request timeout)" } else { "" }
    )]
    ResponseLost {
        /// True when the request timeout fired (rather than the connection closing).
        timed_out: bool,
        /// What closed the connection (none when the timeout fired).
        #[source]
        source: Option<BoxError>,
    },
    /// The connection failed (refused, reset, TLS), or the request could not be
    /// formed.
    #[error("connection failed")]
    Connect(#[source] BoxError),
    /// The response body was not what the contract says (or did not arrive).
    #[error("cannot decode the response: {reason}")]
    Decode {
        /// What was wrong.
        reason: Box<str>,
        /// The parse or transport error, when there was one.
        #[source]
        source: Option<BoxError>,
    },
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
    /// A body that is not the JSON the contract gives (or could not be encoded).
    #[cold]
    pub(crate) fn json(e: serde_json::Error) -> Self {
        ClientError::Decode {
            reason: "not the JSON the contract gives".into(),
            source: Some(Box::new(e)),
        }
    }

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

pub(super) fn api_error(status: StatusCode, body: &[u8]) -> ApiError {
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
