//! What the flow is handed: a message with its offset's fate ([`Delivery`]),
//! implemented by the source's [`Message`] (and by test doubles).

use std::sync::Arc;

use crate::handler::Record;
use crate::source::Message;

/// A message as the execution and completion stages see it (the source's
/// [`Message`](crate::source::Message), or a test double).
pub(crate) trait Delivery: Send + Sync + 'static {
    fn topic(&self) -> &str;
    /// The topic, shared (no allocation per message).
    fn topic_arc(&self) -> Arc<str>;
    fn partition(&self) -> i32;
    fn offset(&self) -> i64;
    fn payload(&self) -> Option<&[u8]>;
    /// The Kafka key.
    fn key(&self) -> Option<&[u8]> {
        None
    }
    /// Kafka headers as `(key, value)` pairs (binary-mode CloudEvents).
    fn headers(&self) -> Vec<(&str, &[u8])>;
    /// The Kafka record (key, headers, timestamp) the handler sees.
    fn record(&self) -> Record<'_> {
        Record::default()
    }
    /// False when the partition was revoked after this was handed over: drop it
    /// unhandled.
    fn is_current(&self) -> bool {
        true
    }
    /// Marks the offset finished (handled and reported, or skipped).
    fn finish(self);
    /// Marks the offset held: never finished in this assignment, the commit
    /// point stays before it, but drains do not wait for it.
    fn hold(self);
}

impl Delivery for Message {
    fn topic(&self) -> &str {
        &self.topic
    }
    fn topic_arc(&self) -> Arc<str> {
        Arc::clone(&self.topic)
    }
    fn partition(&self) -> i32 {
        self.partition
    }
    fn offset(&self) -> i64 {
        self.offset
    }
    fn payload(&self) -> Option<&[u8]> {
        Message::payload(self)
    }
    fn key(&self) -> Option<&[u8]> {
        Message::key(self)
    }
    fn headers(&self) -> Vec<(&str, &[u8])> {
        self.header_pairs().collect()
    }
    fn record(&self) -> Record<'_> {
        Record::new(Message::key(self), &self.headers, self.timestamp)
    }
    fn is_current(&self) -> bool {
        Message::is_current(self)
    }
    fn finish(self) {
        Message::finish(self);
    }
    fn hold(self) {
        Message::hold(self);
    }
}
