//! Delay topics: an event whose attempts in its lane are spent is produced to
//! `<topic>.retry.<delay>` with a not-before time, and its offset finishes once
//! the broker acknowledged that; the source pauses a delay topic's partition
//! until its next event is due ([`crate::source`]), and the flow runs it again
//! with its attempts carried ([`Visit`]).

use std::time::Duration;

use rdkafka::message::OwnedHeaders;
use rdkafka::producer::FutureProducer;

use super::deadletter::{producer_config, DEAD_LETTER_PREFIXES};
use super::delivery::Delivery;
use super::produce::Placed;
use super::retry::RetryPolicy;
use crate::config::KafkaConsumerConfig;

/// The headers of an event in a delay topic.
pub mod headers {
    /// Every delay-topic header starts with this.
    pub const PREFIX: &str = "xzepr.retry.";
    /// When the event is due, in milliseconds since the Unix epoch: its delay
    /// topic's partition is paused until then.
    pub const NOT_BEFORE: &str = crate::source::NOT_BEFORE_HEADER;
    /// Delay topics visited so far (1 in the first).
    pub const STAGE: &str = "xzepr.retry.stage";
    /// Handler attempts made so far, in every visit.
    pub const ATTEMPTS: &str = "xzepr.retry.attempts";
    /// The last attempt's error message.
    pub const ERROR: &str = "xzepr.retry.error";
    /// The last attempt's error code.
    pub const ERROR_CODE: &str = "xzepr.retry.error_code";
    /// The source topic, partition and offset the event was first read from.
    pub const TOPIC: &str = "xzepr.retry.topic";
    /// See [`TOPIC`].
    pub const PARTITION: &str = "xzepr.retry.partition";
    /// See [`TOPIC`].
    pub const OFFSET: &str = "xzepr.retry.offset";
}

/// Where an event was first read from: its delay-topic headers' source, or
/// the delivery itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

impl Origin {
    pub(crate) fn of<D: Delivery>(d: &D) -> Origin {
        let hs = d.headers();
        let text = |name: &str| {
            hs.iter()
                .find(|(k, _)| *k == name)
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
        };
        match (
            text(headers::TOPIC),
            text(headers::PARTITION).and_then(|p| p.parse().ok()),
            text(headers::OFFSET).and_then(|o| o.parse().ok()),
        ) {
            (Some(topic), Some(partition), Some(offset)) => Origin {
                topic: topic.to_owned(),
                partition,
                offset,
            },
            _ => Origin {
                topic: d.topic().to_owned(),
                partition: d.partition(),
                offset: d.offset(),
            },
        }
    }
}

/// Which visit of an event this is: 0 delay topics and 0 attempts before, for
/// an event read from its source topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Visit {
    pub(crate) stage: usize,
    pub(crate) attempts: u32,
}

impl Visit {
    /// Read from the headers of an event in a delay topic.
    pub(crate) fn of(hs: &[(&str, &[u8])]) -> Visit {
        let number = |name: &str| {
            hs.iter()
                .find(|(k, _)| *k == name)
                .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
        };
        Visit {
            stage: number(headers::STAGE).map_or(0, |s| s.min(usize::MAX as u64) as usize),
            attempts: number(headers::ATTEMPTS).map_or(0, |a| a.min(u64::from(u32::MAX)) as u32),
        }
    }

    /// Whether `started` was posted on an earlier visit.
    pub(crate) fn resumed(self) -> bool {
        self.stage > 0
    }
}

/// How long the delay-topic producer tries to deliver a record: past it the
/// event's offset is held (it is read again, never lost).
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The pipeline's delay-topic producer.
pub(crate) struct DelayTopics {
    producer: FutureProducer,
    policy: RetryPolicy,
}

impl std::fmt::Debug for DelayTopics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelayTopics")
            .field("delays", &self.policy.delays())
            .finish_non_exhaustive()
    }
}

/// The failure that sends an event on, for its headers.
pub(crate) struct Failure<'a> {
    pub(crate) message: &'a str,
    pub(crate) code: &'a str,
}

impl DelayTopics {
    /// A producer on the consumer's cluster and credentials; `None` when the
    /// policy has no delay topics.
    pub(crate) fn new(
        kafka: &KafkaConsumerConfig,
        policy: &RetryPolicy,
    ) -> Result<Option<Self>, crate::Error> {
        if policy.delays().is_empty() {
            return Ok(None);
        }
        let producer: FutureProducer = producer_config(kafka, "retry", MESSAGE_TIMEOUT)?
            .create()
            .map_err(crate::source::SourceError::Kafka)?;
        Ok(Some(DelayTopics {
            producer,
            policy: policy.clone(),
        }))
    }

    /// The visit after `visit`, if a delay topic is left for it.
    pub(crate) fn next(&self, visit: Visit) -> Option<usize> {
        (visit.stage < self.policy.delays().len()).then_some(visit.stage + 1)
    }

    /// Produces `d` to the delay topic of its `next` visit (its stage, the
    /// attempts made so far), due after that stage's delay, and waits for the
    /// broker.
    pub(crate) async fn send<D: Delivery>(
        &self,
        d: &D,
        next: Visit,
        failure: &Failure<'_>,
    ) -> Result<Placed, String> {
        let Visit { stage, attempts } = next;
        let origin = Origin::of(d);
        let delay = self.policy.delays()[stage - 1];
        let topic = self
            .policy
            .delay_topic(&origin.topic, stage)
            .ok_or_else(|| format!("no delay topic for stage {stage}"))?;
        let due = chrono::Utc::now().timestamp_millis()
            + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
        let headers = self.headers(d, &origin, stage, attempts, due, failure);
        super::produce::send(&self.producer, topic, d, &headers, "delay-topic").await
    }

    fn headers<D: Delivery>(
        &self,
        d: &D,
        origin: &Origin,
        stage: usize,
        attempts: u32,
        due: i64,
        failure: &Failure<'_>,
    ) -> OwnedHeaders {
        let (partition, offset) = (origin.partition.to_string(), origin.offset.to_string());
        let (stage, attempts, due) = (stage.to_string(), attempts.to_string(), due.to_string());
        let ours: [(&str, &str); 8] = [
            (headers::TOPIC, &origin.topic),
            (headers::PARTITION, &partition),
            (headers::OFFSET, &offset),
            (headers::STAGE, &stage),
            (headers::ATTEMPTS, &attempts),
            (headers::NOT_BEFORE, &due),
            (headers::ERROR, failure.message),
            (headers::ERROR_CODE, failure.code),
        ];
        super::produce::headers(d, DEAD_LETTER_PREFIXES, &ours)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_visit_reads_its_stage_and_attempts_and_defaults_to_the_first() {
        assert_eq!(Visit::of(&[]), Visit::default());
        assert!(!Visit::default().resumed());
        let hs: [(&str, &[u8]); 3] = [
            ("other", b"x"),
            (headers::STAGE, b"2"),
            (headers::ATTEMPTS, b"6"),
        ];
        let v = Visit::of(&hs);
        assert_eq!((v.stage, v.attempts), (2, 6));
        assert!(v.resumed());
        // Unreadable headers count as a first visit, never a panic.
        let bad: [(&str, &[u8]); 2] = [(headers::STAGE, b"-1"), (headers::ATTEMPTS, b"\xff")];
        assert_eq!(Visit::of(&bad), Visit::default());
    }
}
