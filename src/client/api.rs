//! The request and response bodies of the XZepr REST API, as the real server
//! sends and takes them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

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

/// Filters and paging for [`XzeprClient::list_event_receivers`](super::XzeprClient::list_event_receivers).
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
