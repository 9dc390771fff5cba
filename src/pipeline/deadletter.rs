//! The dead-letter stage: an event that failed for good is produced, unchanged,
//! to a dead-letter topic with headers saying why, and its offset finishes only
//! once the broker acknowledged that record.

use std::borrow::Cow;
use std::time::Duration;

use rdkafka::message::OwnedHeaders;
use rdkafka::producer::FutureProducer;

use super::delivery::Delivery;
pub(crate) use super::produce::Placed;
use crate::config::{ConfigError, KafkaConsumerConfig};

/// The default dead-letter topic is the event's topic with this suffix.
pub const DEFAULT_DEAD_LETTER_SUFFIX: &str = ".dlq";

/// Kafka Connect's dead-letter header names (KIP-298), which Kafka tools show.
const CONNECT_TOPIC: &str = "__connect.errors.topic";
const CONNECT_PARTITION: &str = "__connect.errors.partition";
const CONNECT_OFFSET: &str = "__connect.errors.offset";
const CONNECT_CLASS: &str = "__connect.errors.exception.class.name";
const CONNECT_MESSAGE: &str = "__connect.errors.exception.message";
const CONNECT_STAGE: &str = "__connect.errors.stage";

/// Header name prefixes of a dead letter's own headers (ours and Connect's)
/// and of a delay topic's: a message that already carries them (a dead letter
/// replayed to a source topic, an event back from a delay topic) gets them
/// replaced, not doubled, when it is dead-lettered again, and a redriven
/// letter starts afresh.
pub(super) const DEAD_LETTER_PREFIXES: &[&str] = &[
    "xzepr.dlq.",
    "__connect.errors.",
    super::delay::headers::PREFIX,
];

/// Our own dead-letter headers, beside Kafka Connect's.
pub mod headers {
    /// Why: `handler_failed`, `malformed` or `report_rejected`.
    pub const REASON: &str = "xzepr.dlq.reason";
    /// The error message.
    pub const ERROR: &str = "xzepr.dlq.error";
    /// The error code (`handler_error`, the handler's own, `timeout`, ...).
    pub const ERROR_CODE: &str = "xzepr.dlq.error_code";
    /// Handler attempts made (0 for a malformed message).
    pub const ATTEMPTS: &str = "xzepr.dlq.attempts";
    /// The consumer group that gave up on it.
    pub const GROUP: &str = "xzepr.dlq.consumer_group";
    /// When, RFC 3339 UTC.
    pub const TIME: &str = "xzepr.dlq.time";
    /// The original topic, partition and offset (as Connect's headers, which
    /// are also set).
    pub const TOPIC: &str = "xzepr.dlq.topic";
    /// See [`TOPIC`].
    pub const PARTITION: &str = "xzepr.dlq.partition";
    /// See [`TOPIC`].
    pub const OFFSET: &str = "xzepr.dlq.offset";
}

/// Where and how dead letters are produced ([`PipelineBuilder::dead_letter`](super::PipelineBuilder::dead_letter)).
///
/// The producer uses the consumer's connection and security settings, with
/// idempotence on and `acks=all`, so an acknowledged dead letter is on every
/// in-sync replica and written once.
///
/// In configuration: `{"topic": "orders.dlq", "message_timeout": "30s",
/// "properties": {"compression.type": "zstd"}}`, every field optional.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[must_use]
pub struct DeadLetterConfig {
    topic: Option<String>,
    #[serde(with = "crate::config::duration")]
    message_timeout: Duration,
    #[serde(with = "pairs")]
    properties: Vec<(String, String)>,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            topic: None,
            message_timeout: Duration::from_secs(30),
            properties: Vec::new(),
        }
    }
}

/// Producer properties as a JSON object, kept in the order given (a later
/// setting of a key overrides an earlier one, as librdkafka applies them).
mod pairs {
    use std::fmt;

    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        v: &[(String, String)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(v.len()))?;
        for (k, value) in v {
            map.serialize_entry(k, value)?;
        }
        map.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(String, String)>, D::Error> {
        struct Pairs;
        impl<'de> Visitor<'de> for Pairs {
            type Value = Vec<(String, String)>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of producer properties with text values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(pair) = a.next_entry::<String, String>()? {
                    v.push(pair);
                }
                Ok(v)
            }
        }
        d.deserialize_map(Pairs)
    }
}

/// Producer properties the dead-letter stage sets itself.
const RESERVED: &[(&str, &str)] = &[
    (
        "enable.idempotence",
        "dead letters are produced idempotently, always",
    ),
    (
        "acks",
        "an offset finishes only once every in-sync replica has its dead letter",
    ),
    (
        "message.timeout.ms",
        "use DeadLetterConfig::message_timeout",
    ),
    (
        "delivery.timeout.ms",
        "use DeadLetterConfig::message_timeout",
    ),
];

/// Consumer properties a producer does not take.
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "isolation.level",
    "auto.offset.reset",
    "session.timeout.ms",
    "fetch.wait.max.ms",
    "fetch.queue.backoff.ms",
];

impl DeadLetterConfig {
    /// Dead letters to `<topic>.dlq` for events of `<topic>`, 30 s to deliver each.
    pub fn new() -> Self {
        Self::default()
    }

    /// One dead-letter topic for every source topic. It must not be one the
    /// consumer reads (by name or `^regex`): the pipeline refuses to start then,
    /// as each letter would be consumed and dead-lettered again, forever.
    pub fn topic(mut self, name: impl Into<String>) -> Self {
        self.topic = Some(name.into());
        self
    }

    /// How long the producer tries to deliver a dead letter (default 30 s).
    /// Past it the event's offset is held: never finished without its letter.
    pub fn message_timeout(mut self, timeout: Duration) -> Self {
        self.message_timeout = timeout;
        self
    }

    /// A librdkafka producer property (compression, linger, ...).
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.push((key.into(), value.into()));
        self
    }

    /// The dead-letter topic of events from `source`.
    pub fn topic_for<'a>(&'a self, source: &str) -> Cow<'a, str> {
        match &self.topic {
            Some(t) => Cow::Borrowed(t),
            None => Cow::Owned(format!("{source}{DEFAULT_DEAD_LETTER_SUFFIX}")),
        }
    }

    /// Refuses what the producer must not be given: a reserved property, an
    /// empty topic name.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if let Some((key, reason)) = self.properties.iter().find_map(|(k, _)| {
            let k = k.trim().to_ascii_lowercase();
            RESERVED
                .iter()
                .find(|(r, _)| *r == k)
                .map(|(_, reason)| (k.clone(), *reason))
        }) {
            return Err(ConfigError::Reserved {
                property: key,
                reason,
            });
        }
        if self.topic.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(ConfigError::Empty {
                name: "dead_letter.topic",
            });
        }
        Ok(())
    }

    /// Refuses a dead-letter topic the consumer also reads: each of its letters
    /// would be consumed, fail again and be dead-lettered again, forever.
    ///
    /// `subscriptions` are the consumer's topics as librdkafka takes them: a name,
    /// or a regex when it starts with `^` (matched unanchored, as librdkafka does).
    /// With one dead-letter topic, it must be neither subscribed nor matched by a
    /// regex. With the per-topic default (`<topic>.dlq`), the letters of each named
    /// topic must not be subscribed or matched either; for a regex subscription the
    /// topics it will match are unknown until the broker is asked, so only the
    /// named topics' letters are checked.
    pub(crate) fn check_not_subscribed(&self, subscriptions: &[String]) -> Result<(), ConfigError> {
        let regexes: Vec<(&str, regex::Regex)> = subscriptions
            .iter()
            .filter(|s| s.starts_with('^'))
            // A pattern this engine cannot read is left to librdkafka to refuse.
            .filter_map(|s| regex::Regex::new(s).ok().map(|r| (s.as_str(), r)))
            .collect();
        let read_by = |topic: &str| {
            subscriptions
                .iter()
                .find(|s| *s == topic)
                .map(String::as_str)
                .or_else(|| {
                    regexes
                        .iter()
                        .find(|(_, r)| r.is_match(topic))
                        .map(|(s, _)| *s)
                })
        };
        let letters: Vec<Cow<'_, str>> = match &self.topic {
            Some(t) => vec![Cow::Borrowed(t.as_str())],
            None => subscriptions
                .iter()
                .filter(|s| !s.starts_with('^'))
                .map(|s| self.topic_for(s))
                .collect(),
        };
        for letter in &letters {
            if let Some(subscription) = read_by(letter) {
                return Err(ConfigError::Invalid {
                    name: "dead_letter.topic",
                    value: if subscription == letter.as_ref() {
                        format!("{letter} (a subscribed topic)")
                    } else {
                        format!("{letter} (matched by the subscription {subscription})")
                    },
                    expected: "a topic the consumer does not read: its dead letters would \
                               be consumed and dead-lettered again, forever",
                });
            }
        }
        Ok(())
    }
}

/// An idempotent, `acks=all` producer's settings on the consumer's cluster
/// and credentials (the dead letters' and the redrive's), its client id
/// `<service>-<role>`: a record it acknowledges is on every in-sync replica,
/// written once.
pub(super) fn producer_config(
    kafka: &KafkaConsumerConfig,
    role: &str,
    message_timeout: Duration,
) -> Result<rdkafka::ClientConfig, ConfigError> {
    let mut c = kafka.to_client_config()?;
    for key in CONSUMER_ONLY {
        c.remove(key);
    }
    c.set("client.id", format!("{}-{role}", kafka.service_name))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            message_timeout.as_millis().max(1).to_string(),
        );
    Ok(c)
}

/// Why an event is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// The handler failed on its last attempt.
    HandlerFailed,
    /// The message is not a CloudEvent.
    Malformed,
    /// XZepr refused its lifecycle post for good.
    ReportRejected,
}

impl Why {
    /// Every reason, as the reason header names them.
    pub(super) const ALL: [Why; 3] = [Why::HandlerFailed, Why::Malformed, Why::ReportRejected];

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Why::HandlerFailed => "handler_failed",
            Why::Malformed => "malformed",
            Why::ReportRejected => "report_rejected",
        }
    }

    /// Kafka Connect's stage names.
    fn stage(self) -> &'static str {
        match self {
            Why::Malformed => "VALUE_CONVERTER",
            Why::HandlerFailed | Why::ReportRejected => "TASK_PUT",
        }
    }
}

/// What went wrong, for the headers.
pub(crate) struct Reason<'a> {
    pub(crate) why: Why,
    pub(crate) message: &'a str,
    pub(crate) code: &'a str,
    pub(crate) attempts: u32,
}

/// The pipeline's dead-letter producer.
pub(crate) struct DeadLetters {
    producer: FutureProducer,
    config: DeadLetterConfig,
    group: String,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// A producer on the consumer's cluster and credentials.
    pub(crate) fn new(
        kafka: &KafkaConsumerConfig,
        config: DeadLetterConfig,
    ) -> Result<Self, crate::Error> {
        config.validate()?;
        let mut c = producer_config(kafka, "dlq", config.message_timeout)?;
        for (k, v) in &config.properties {
            c.set(k, v);
        }
        let producer: FutureProducer = c.create().map_err(crate::source::SourceError::Kafka)?;
        Ok(DeadLetters {
            producer,
            config,
            group: kafka.group_id.clone(),
        })
    }

    /// The dead-letter topic for `d`: its source topic's, for an event back
    /// from a delay topic.
    pub(crate) fn topic_for<D: Delivery>(&self, d: &D) -> String {
        self.config
            .topic_for(&super::delay::Origin::of(d).topic)
            .into_owned()
    }

    /// The original headers but for dead-letter ones, then Connect's and ours.
    /// An event back from a delay topic is described as it came from its
    /// source topic.
    fn headers<D: Delivery>(&self, d: &D, r: &Reason<'_>) -> OwnedHeaders {
        let origin = super::delay::Origin::of(d);
        let (partition, offset) = (origin.partition.to_string(), origin.offset.to_string());
        let (attempts, time) = (
            r.attempts.to_string(),
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        );
        let ours: [(&str, &str); 15] = [
            (CONNECT_TOPIC, &origin.topic),
            (CONNECT_PARTITION, &partition),
            (CONNECT_OFFSET, &offset),
            (CONNECT_CLASS, r.code),
            (CONNECT_MESSAGE, r.message),
            (CONNECT_STAGE, r.why.stage()),
            (headers::REASON, r.why.as_str()),
            (headers::ERROR, r.message),
            (headers::ERROR_CODE, r.code),
            (headers::ATTEMPTS, &attempts),
            (headers::GROUP, &self.group),
            (headers::TIME, &time),
            (headers::TOPIC, &origin.topic),
            (headers::PARTITION, &partition),
            (headers::OFFSET, &offset),
        ];
        super::produce::headers(d, DEAD_LETTER_PREFIXES, &ours)
    }

    /// Produces `d` to its dead-letter topic and waits for the broker's
    /// acknowledgement (without blocking a thread).
    pub(crate) async fn send<D: Delivery>(&self, d: &D, r: &Reason<'_>) -> Result<Placed, String> {
        let topic = self.topic_for(d);
        let headers = self.headers(d, r);
        super::produce::send(&self.producer, topic, d, &headers, "dead-letter").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_topic_follows_the_source() {
        let c = DeadLetterConfig::new();
        assert_eq!(c.topic_for("xzepr.events"), "xzepr.events.dlq");
        assert_eq!(c.clone().topic("all.dlq").topic_for("x"), "all.dlq");
    }

    #[test]
    fn a_dead_letter_topic_the_consumer_reads_is_refused() {
        let subs = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let one = DeadLetterConfig::new().topic("orders.failed");
        let per_topic = DeadLetterConfig::new();
        for (config, topics) in [
            (&one, subs(&["orders", "orders.failed"])),
            (&one, subs(&["^orders"])),
            (&one, subs(&["^.*failed$"])),
            (&per_topic, subs(&["orders", "orders.dlq"])),
            (&per_topic, subs(&["orders", "^orders\\..*"])),
        ] {
            let err = config.check_not_subscribed(&topics).unwrap_err();
            assert!(err.to_string().contains("dead_letter.topic"), "{err}");
        }
        for (config, topics) in [
            (&one, subs(&["orders"])),
            (&one, subs(&["^orders$"])),
            (&per_topic, subs(&["orders", "payments"])),
            (&per_topic, subs(&["orders", "^payments\\..*"])),
            // Not a pattern this engine reads: librdkafka decides.
            (&one, subs(&["^orders(", "orders"])),
        ] {
            config.check_not_subscribed(&topics).unwrap();
        }
    }

    #[test]
    fn reserved_and_empty_settings_fail_naming_them() {
        let kafka = KafkaConsumerConfig::new("127.0.0.1:1", "t", "svc");
        let err = DeadLetters::new(&kafka, DeadLetterConfig::new().set("ACKS", "1")).unwrap_err();
        assert!(err.to_string().contains("acks"), "{err}");
        let err = DeadLetters::new(&kafka, DeadLetterConfig::new().topic(" ")).unwrap_err();
        assert!(err.to_string().contains("dead_letter.topic"), "{err}");
        DeadLetters::new(&kafka, DeadLetterConfig::new().set("linger.ms", "1")).unwrap();
    }
}
