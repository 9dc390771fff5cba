//! The handler stage: the user's work, run on each event that passes the filter.
//!
//! The ways to plug work in, all on the same pipeline:
//! - [`Handler`]: a trait with a blanket impl for sync closures
//!   `|event: &CloudEvent<'_>, work: &mut Work| -> Result<(), E>`, run on worker
//!   threads against the borrowed event (no owned decode);
//! - [`AsyncHandler`]: async closures `|message, info| async { ... }` for I/O-bound
//!   work, given the owned [`CloudEventMessage`];
//! - [`MessageHandler`]: the downstream-consumer plan's `async_trait` trait, run by
//!   [`XzeprConsumer`](crate::pipeline::XzeprConsumer);
//! - [`BatchHandler`] and [`AsyncBatchHandler`]: a lane's run of events in
//!   one call, with an outcome per event ([`BatchOutcome`]).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::decode::{CloudEvent, CloudEventMessage};
pub use crate::source::Timestamp;

mod batch;
pub(crate) use batch::results as batch_results;
pub use batch::{AsyncBatchHandler, BatchEntry, BatchHandler, BatchOutcome, BATCH_MISMATCH_CODE};

/// The Kafka record an event came in: key, headers and timestamp, borrowed
/// from the message for as long as the handler runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Record<'a> {
    key: Option<&'a [u8]>,
    headers: &'a [(String, Vec<u8>)],
    timestamp: Option<Timestamp>,
}

impl<'a> Record<'a> {
    /// A record with this key, these headers (in order) and this timestamp
    /// (the pipeline makes these; also handy for unit-testing a handler).
    pub fn new(
        key: Option<&'a [u8]>,
        headers: &'a [(String, Vec<u8>)],
        timestamp: Option<Timestamp>,
    ) -> Self {
        Record {
            key,
            headers,
            timestamp,
        }
    }
}

/// What the handler's work is called and where its event came from (topic,
/// partition, offset and the Kafka record: key, headers, timestamp); also
/// collects the `details` posted with the work's terminal lifecycle event.
///
/// The record is borrowed from the message (`'a`): a sync handler reads the
/// key and headers without a copy. An async handler gets an owned
/// [`WorkInfo`] instead.
#[derive(Debug, Clone)]
pub struct Work<'a> {
    pub(crate) id: String,
    pub(crate) details: Map<String, Value>,
    pub(crate) error_code: Option<String>,
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    record: Record<'a>,
}

/// Where an event came from (read-only, owned: what an async handler gets).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkInfo {
    /// The work id (`work-<event id>` by default).
    pub work_id: String,
    /// The Kafka topic.
    pub topic: String,
    /// The Kafka partition.
    pub partition: i32,
    /// The Kafka offset.
    pub offset: i64,
    /// The Kafka key, if the record has one.
    pub key: Option<Vec<u8>>,
    /// The Kafka headers, in order (a name may repeat; a null value is empty).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record's timestamp and its type, when the broker gave one.
    pub timestamp: Option<Timestamp>,
}

impl WorkInfo {
    /// The value of the first header named `name` (names compare exactly).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

impl Work<'static> {
    /// A work record for an event at `topic`/`partition`/`offset`, with no
    /// key, headers or timestamp (the pipeline makes these; also handy for
    /// unit-testing a handler, with [`Work::with_record`]).
    pub fn new(work_id: String, topic: Arc<str>, partition: i32, offset: i64) -> Self {
        Work {
            id: work_id,
            details: Map::new(),
            error_code: None,
            topic,
            partition,
            offset,
            record: Record::default(),
        }
    }
}

impl<'a> Work<'a> {
    /// The same work, from the Kafka record `record`.
    pub fn with_record<'b>(self, record: Record<'b>) -> Work<'b> {
        Work {
            id: self.id,
            details: self.details,
            error_code: self.error_code,
            topic: self.topic,
            partition: self.partition,
            offset: self.offset,
            record,
        }
    }

    /// The record's Kafka key.
    pub fn key(&self) -> Option<&'a [u8]> {
        self.record.key
    }

    /// The record's Kafka headers as `(name, value)` pairs, in order (a name
    /// may repeat; a null value is empty).
    pub fn headers(&self) -> impl ExactSizeIterator<Item = (&'a str, &'a [u8])> + Clone + 'a {
        let headers: &'a [(String, Vec<u8>)] = self.record.headers;
        headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// The value of the first header named `name` (names compare exactly).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// The record's timestamp and its type, when the broker gave one.
    pub fn timestamp(&self) -> Option<Timestamp> {
        self.record.timestamp
    }

    /// The work id used in the lifecycle posts.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where the event came from, owned: topic, partition, offset and a copy
    /// of the record's key and headers (built on demand: a sync handler does
    /// not pay for it).
    pub fn info(&self) -> WorkInfo {
        WorkInfo {
            work_id: self.id.clone(),
            topic: self.topic.to_string(),
            partition: self.partition,
            offset: self.offset,
            key: self.record.key.map(<[u8]>::to_vec),
            headers: self.record.headers.to_vec(),
            timestamp: self.record.timestamp,
        }
    }

    /// The event's topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The event's partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The event's offset.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// Adds a field to the `details` of the terminal lifecycle post.
    pub fn detail(&mut self, key: impl Into<String>, value: impl Into<Value>) -> &mut Self {
        self.details.insert(key.into(), value.into());
        self
    }

    /// Sets the `error_code` posted with `failed` when the handler returns an error
    /// (default `handler_error`).
    pub fn error_code(&mut self, code: impl Into<String>) -> &mut Self {
        self.error_code = Some(code.into());
        self
    }
}

/// A handler's failure: its message (and code) go into the `failed` post's details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    message: String,
    code: Option<String>,
    permanent: bool,
    /// The downstream service's `Retry-After`, with an overload.
    retry_after: Option<std::time::Duration>,
}

/// Error code of [`HandlerError::overloaded`].
pub const OVERLOADED_CODE: &str = "overloaded";

impl HandlerError {
    /// A failure with a message.
    pub fn new(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            code: None,
            permanent: false,
            retry_after: None,
        }
    }

    /// A failure with a message and an error code.
    pub fn with_code(message: impl Into<String>, code: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            code: Some(code.into()),
            permanent: false,
            retry_after: None,
        }
    }

    /// A failure because the service the handler calls is overloaded (it
    /// answered 429 or 503, or said so otherwise): code `overloaded`. Under an
    /// adaptive [`max_in_flight`](crate::source::SourceOptions::max_in_flight)
    /// it cuts the limit; the retry policy retries it like any error.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::with_code(message, OVERLOADED_CODE)
    }

    /// Adds the service's `Retry-After`: under an adaptive limit no handler
    /// call starts before it has passed (at most a minute).
    pub fn with_retry_after(mut self, after: std::time::Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Whether the error says the service is overloaded: code `overloaded`
    /// ([`HandlerError::overloaded`], or any error given that code).
    pub fn is_overloaded(&self) -> bool {
        self.code.as_deref() == Some(OVERLOADED_CODE)
    }

    /// The `Retry-After` given with [`HandlerError::with_retry_after`].
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after
    }

    /// Marks the failure permanent: the retry policy never runs it again (bad
    /// input, a rule it broke) and it goes straight to its terminal post (and
    /// the dead-letter topic, if one is set).
    pub fn permanent(mut self) -> Self {
        self.permanent = true;
        self
    }

    /// Whether it was marked [`HandlerError::permanent`].
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The code, if one was given.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.code {
            Some(code) => write!(f, "{} ({code})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for HandlerError {}

/// Work run on worker threads against the borrowed event.
///
/// A sync closure `Fn(&CloudEvent<'_>, &mut Work<'_>) -> Result<(), E>` with
/// `E: Display` is a `Handler`. Returning an error reports `failed` (when the
/// pipeline has a lifecycle) and still finishes the offset: retrying is the
/// handler's business, a poison message must not stall its partition.
pub trait Handler: Send + Sync + 'static {
    /// Handles one event.
    ///
    /// # Errors
    /// A [`HandlerError`] whose message and code are posted with `failed`.
    fn handle(&self, event: &CloudEvent<'_>, work: &mut Work<'_>) -> Result<(), HandlerError>;

    /// Called on the poll thread after partitions are assigned. Keep it short.
    fn on_assign(&self, _partitions: &[(String, i32)]) {}

    /// Called on the poll thread before partitions are revoked, after their
    /// in-flight work drained or the drain deadline passed. Keep it short.
    fn on_revoke(&self, _partitions: &[(String, i32)]) {}
}

/// A closure's error as a [`HandlerError`]: kept whole when it is one (its code
/// and [`HandlerError::permanent`] mark count), else its text with `code`.
fn to_handler_error<E: fmt::Display + 'static>(e: E, code: Option<String>) -> HandlerError {
    if let Some(h) = (&e as &dyn std::any::Any).downcast_ref::<HandlerError>() {
        return h.clone();
    }
    HandlerError {
        message: e.to_string(),
        code,
        permanent: false,
        retry_after: None,
    }
}

impl<F, E> Handler for F
where
    F: Fn(&CloudEvent<'_>, &mut Work<'_>) -> Result<(), E> + Send + Sync + 'static,
    E: fmt::Display + 'static,
{
    fn handle(&self, event: &CloudEvent<'_>, work: &mut Work<'_>) -> Result<(), HandlerError> {
        self(event, work).map_err(|e| to_handler_error(e, work.error_code.clone()))
    }
}

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Async, I/O-bound work: given the owned message, returns the `details` for the
/// terminal lifecycle post (or an error, posted with `failed`).
///
/// An async closure `Fn(CloudEventMessage, WorkInfo) -> impl Future<Output =
/// Result<Value, E>>` with `E: Display` is an `AsyncHandler`.
pub trait AsyncHandler: Send + Sync + 'static {
    /// Handles one event.
    fn handle(
        &self,
        message: CloudEventMessage,
        info: WorkInfo,
    ) -> BoxFuture<Result<Value, HandlerError>>;
}

impl<F, Fut, E> AsyncHandler for F
where
    F: Fn(CloudEventMessage, WorkInfo) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, E>> + Send + 'static,
    E: fmt::Display + 'static,
{
    fn handle(
        &self,
        message: CloudEventMessage,
        info: WorkInfo,
    ) -> BoxFuture<Result<Value, HandlerError>> {
        let fut = self(message, info);
        Box::pin(async move { fut.await.map_err(|e| to_handler_error(e, None)) })
    }
}

/// The downstream-consumer plan's handler trait, kept so code written against the
/// plan's how-to compiles unchanged (`#[async_trait::async_trait] impl MessageHandler`).
#[async_trait::async_trait]
pub trait MessageHandler: Send + Sync {
    /// Handles one message. Returning `Err` is logged and the offset still finishes
    /// (the plan's semantics: retry inside `handle` if the failure is transient).
    async fn handle(
        &self,
        message: CloudEventMessage,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Decoder, DecoderConfig};

    #[test]
    fn work_borrows_the_record_and_info_owns_a_copy() {
        let headers = vec![
            ("a".to_owned(), b"1".to_vec()),
            ("b".to_owned(), vec![0xff]),
            ("a".to_owned(), b"2".to_vec()),
        ];
        let work = Work::new("w".into(), "t".into(), 1, 2).with_record(Record::new(
            Some(b"k"),
            &headers,
            Some(Timestamp::LogAppendTime(9)),
        ));
        assert_eq!(work.key(), Some(&b"k"[..]));
        assert_eq!(
            work.header("a"),
            Some(&b"1"[..]),
            "the first of a repeated name"
        );
        assert_eq!(work.header("c"), None);
        assert_eq!(work.headers().len(), 3);
        assert_eq!(work.timestamp().map(Timestamp::kind), Some("LogAppendTime"));
        let info = work.info();
        drop(work);
        assert_eq!(info.headers, headers);
        assert_eq!(info.header("b"), Some(&[0xff][..]));
        assert_eq!(
            (info.key.as_deref(), info.timestamp),
            (Some(&b"k"[..]), Some(Timestamp::LogAppendTime(9)))
        );
        let bare = Work::new("w".into(), "t".into(), 0, 0);
        assert_eq!(
            (bare.key(), bare.headers().len(), bare.timestamp()),
            (None, 0, None)
        );
    }

    #[test]
    fn closures_are_handlers_and_errors_carry_the_code() {
        let h = |ev: &CloudEvent<'_>, work: &mut Work<'_>| -> Result<(), String> {
            work.detail("type", ev.event_type());
            if ev.event_type() == "bad" {
                work.error_code("E42");
                return Err("boom".into());
            }
            Ok(())
        };
        let dec = Decoder::new(DecoderConfig::default()).unwrap();
        let good = br#"{"id":"1","source":"s","specversion":"1.0","type":"good"}"#;
        let bad = br#"{"id":"1","source":"s","specversion":"1.0","type":"bad"}"#;
        let mut work = Work::new("w".into(), "t".into(), 0, 1);
        assert!(Handler::handle(&h, &dec.decode(good).unwrap(), &mut work).is_ok());
        assert_eq!(work.details["type"], "good");
        let err = Handler::handle(&h, &dec.decode(bad).unwrap(), &mut work).unwrap_err();
        assert_eq!(err, HandlerError::with_code("boom", "E42"));
    }
}
