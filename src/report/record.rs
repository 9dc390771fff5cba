//! What the reporter is given: a [`Record`] (the work, its status, details)
//! and its [`Ack`], called exactly once; and the work's identity,
//! [`OwnedWork`] (borrowed: [`WorkRef`]), of which [`WorkTemplate`] is the
//! service's part.

use serde_json::Value;

use super::{ReportError, Status};
use crate::client::WorkRef;
use crate::config::ConfigError;

/// What to post and whom to tell.
pub struct Record {
    /// The work's identity.
    pub work: OwnedWork,
    /// Which lifecycle event.
    pub status: Status,
    /// `details` of the payload.
    pub details: Value,
    /// For `failed`: message and code.
    pub error: Option<(String, String)>,
    /// The W3C context the post continues (the event's span): sent as the
    /// request's `traceparent` / `tracestate`, and with feature `otel` the
    /// parent of the post's own span, whose context is sent instead.
    /// Boxed: most records carry none, and a record's size is paid in every queue slot.
    pub trace: Option<Box<crate::trace::TraceContext>>,
    /// Called once: `Ok(event id)` after a 2xx, or the final error.
    pub ack: Ack,
}

/// The acknowledgement of one [`Record`]: called exactly once. A record dropped
/// unsent (its reporter's runtime shut down, a task cancelled) acknowledges
/// [`ReportError::Closed`], so no caller waits for ever.
pub struct Ack(Option<AckFn>);

type AckFn = Box<dyn FnOnce(Result<String, ReportError>) + Send>;

impl Ack {
    /// Wraps the callback.
    pub fn new(f: impl FnOnce(Result<String, ReportError>) + Send + 'static) -> Self {
        Ack(Some(Box::new(f)))
    }

    /// Calls the callback with `result`.
    pub fn send(mut self, result: Result<String, ReportError>) {
        if let Some(f) = self.0.take() {
            f(result);
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Err(ReportError::Closed));
        }
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ack")
    }
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("work", &self.work)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// The owned form of [`WorkRef`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OwnedWork {
    /// Receiver id.
    pub receiver_id: String,
    /// Work id.
    pub work_id: String,
    /// Work name.
    pub work_name: String,
    /// Work version.
    pub work_version: String,
    /// Platform id.
    pub platform_id: String,
    /// Package (service name).
    pub package: String,
}

/// The service's part of a work's identity, the same for every event: where
/// the work is reported and as what. [`OwnedWork::of`] adds the event's part.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkTemplate {
    /// The service's receiver id (see
    /// [`XzeprClient::discover_or_create_event_receiver`](crate::client::XzeprClient::discover_or_create_event_receiver)).
    pub receiver_id: String,
    /// Work name: events are posted as `{work_name}.started` and so on.
    pub work_name: String,
    /// Work version (also the release).
    pub work_version: String,
    /// The service's name (the posts' `package`).
    pub package: String,
}

impl WorkTemplate {
    /// Builds it.
    pub fn new(
        receiver_id: impl Into<String>,
        work_name: impl Into<String>,
        work_version: impl Into<String>,
        package: impl Into<String>,
    ) -> Self {
        WorkTemplate {
            receiver_id: receiver_id.into(),
            work_name: work_name.into(),
            work_version: work_version.into(),
            package: package.into(),
        }
    }
}

impl OwnedWork {
    /// The identity of the work `work_id` of an event from `platform_id`,
    /// done by the service `template` describes.
    pub fn of(
        template: &WorkTemplate,
        work_id: impl Into<String>,
        platform_id: impl Into<String>,
    ) -> Self {
        OwnedWork {
            receiver_id: template.receiver_id.clone(),
            work_id: work_id.into(),
            work_name: template.work_name.clone(),
            work_version: template.work_version.clone(),
            platform_id: platform_id.into(),
            package: template.package.clone(),
        }
    }

    /// Builds it.
    pub fn new(
        receiver_id: impl Into<String>,
        work_id: impl Into<String>,
        work_name: impl Into<String>,
        work_version: impl Into<String>,
        platform_id: impl Into<String>,
        package: impl Into<String>,
    ) -> Self {
        OwnedWork {
            receiver_id: receiver_id.into(),
            work_id: work_id.into(),
            work_name: work_name.into(),
            work_version: work_version.into(),
            platform_id: platform_id.into(),
            package: package.into(),
        }
    }

    pub(super) fn as_ref(&self) -> WorkRef<'_> {
        WorkRef::new(
            &self.receiver_id,
            &self.work_id,
            &self.work_name,
            &self.work_version,
            &self.platform_id,
            &self.package,
        )
    }
}

/// Checks the work fields a lifecycle configuration gives every post: XZepr
/// requires each to be non-empty, and an empty work name would be recorded as
/// `.started`. Call it when the configuration is built.
///
/// # Errors
/// [`ConfigError::Empty`] naming the first empty (or blank) field: `work_name`,
/// `work_version`, `release` or `package`.
pub fn validate_work_fields(
    work_name: &str,
    work_version: &str,
    release: &str,
    package: &str,
) -> Result<(), ConfigError> {
    for (name, value) in [
        ("work_name", work_name),
        ("work_version", work_version),
        ("release", release),
        ("package", package),
    ] {
        if value.trim().is_empty() {
            return Err(ConfigError::Empty { name });
        }
    }
    Ok(())
}
