//! The work-lifecycle posts (`{work}.started`, `.completed`, `.failed`): the
//! one status vocabulary of the crate and the JSON the contract gives them,
//! serialized straight from borrowed parts.

use std::fmt;

use serde::Serialize;
use serde_json::Value;

use super::CreateEvent;

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
        self.event(Phase::new(Status::Started, ("", "")), &details)
    }

    /// The `completed` event of the contract; with `success` false, the `failed`
    /// event (as the plan's `post_work_completed` does), its `error` and
    /// `error_code` taken from `details` when it has them.
    pub fn completed(&self, success: bool, details: Value) -> CreateEvent {
        if success {
            return self.event(Phase::new(Status::Completed, ("", "")), &details);
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
        self.event(Phase::new(Status::Failed, (error, error_code)), &details)
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

/// Lifecycle status of a work: the one status vocabulary of the crate (the
/// pipeline's outcomes, the reporter's records and the posts all use it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// `{work}.started`
    Started,
    /// `{work}.completed`
    Completed,
    /// `{work}.failed`
    Failed,
}

impl Status {
    /// `started`, `completed` or `failed`: the event name's suffix and the
    /// payload's `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Started => "started",
            Status::Completed => "completed",
            Status::Failed => "failed",
        }
    }

    /// The post's `success`: false only for `failed`.
    pub fn is_success(self) -> bool {
        !matches!(self, Status::Failed)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A lifecycle post's status with what only a failure carries: its error
/// message and code.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Phase<'a> {
    status: Status,
    error: Option<(&'a str, &'a str)>,
}

impl<'a> Phase<'a> {
    /// `status`; for [`Status::Failed`], `error` (message, code) goes with it
    /// (ignored for the others).
    pub(crate) fn new(status: Status, error: (&'a str, &'a str)) -> Self {
        Phase {
            status,
            error: (status == Status::Failed).then_some(error),
        }
    }

    fn word(self) -> &'static str {
        self.status.as_str()
    }

    fn success(self) -> bool {
        self.status.is_success()
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
            error: self.phase.error,
        };
        match self.phase.status {
            Status::Started => m.serialize_entry("started_at", &self.at)?,
            Status::Completed | Status::Failed => {
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
