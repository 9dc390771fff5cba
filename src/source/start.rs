//! [`StartFrom`]: where a partition the group has no committed offset for
//! starts, and the lookup that turns a time into each such partition's first
//! offset at or after it (librdkafka's `offsets_for_times`) before the
//! partition is assigned.
//!
//! A committed offset always wins: `start_from` never moves a group that has
//! committed (`xzepr-consumer offsets reset` does that, with the group
//! stopped).

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::SourceError;

/// Longest wait for the committed offsets, then for the offsets of a time,
/// while partitions are assigned (the poll thread waits; heartbeats go on in
/// librdkafka's threads). Past it the partitions stay paused and the source
/// stops with [`SourceError::StartFrom`]: starting them anywhere else could
/// skip events or commit past the time asked for.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a partition with no committed offset starts. In configuration:
/// `"committed"`, `"earliest"`, `"latest"`, or a time in RFC 3339
/// (`"2026-12-05T14:00:00Z"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartFrom {
    /// As the consumer configuration's `auto_offset_reset` says (default:
    /// earliest).
    #[default]
    Committed,
    /// The partition's first offset still kept (`auto.offset.reset=earliest`).
    Earliest,
    /// Only what arrives from now on (`auto.offset.reset=latest`).
    Latest,
    /// The first offset whose timestamp is at or after this time; a partition
    /// with none starts at its end.
    Timestamp(DateTime<Utc>),
}

impl StartFrom {
    /// Reads `committed`, `earliest`, `latest`, or a time ([`parse_time`]).
    ///
    /// # Errors
    /// A text naming the input and what is expected.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "committed" => Ok(Self::Committed),
            "earliest" => Ok(Self::Earliest),
            "latest" => Ok(Self::Latest),
            _ => parse_time(s).map(Self::Timestamp).map_err(|_| {
                format!(
                    "{:?}: expected committed, earliest, latest, or a time in RFC 3339 \
                     (2026-12-05T14:00:00Z) or milliseconds since the epoch",
                    s.trim()
                )
            }),
        }
    }

    /// The `auto.offset.reset` this sets, if any.
    pub(crate) fn auto_offset_reset(self) -> Option<&'static str> {
        match self {
            Self::Earliest => Some("earliest"),
            Self::Latest => Some("latest"),
            Self::Committed | Self::Timestamp(_) => None,
        }
    }
}

impl fmt::Display for StartFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Committed => f.write_str("committed"),
            Self::Earliest => f.write_str("earliest"),
            Self::Latest => f.write_str("latest"),
            Self::Timestamp(t) => f.write_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        }
    }
}

impl serde::Serialize for StartFrom {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for StartFrom {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        StartFrom::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A time as an operator writes it: RFC 3339 (`2026-12-05T14:00:00Z`,
/// `2026-12-05T16:00:00+02:00`) or milliseconds since the epoch (as Kafka
/// timestamps are).
///
/// # Errors
/// A text naming the input.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return DateTime::from_timestamp_millis(ms).ok_or_else(|| format!("{s:?}: out of range"));
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{s:?}: not an RFC 3339 time ({e})"))
}

/// Each partition's offset at a time, as [`offsets_at`] answers.
pub(crate) type OffsetsAt = Vec<((String, i32), Offset)>;

/// `partitions` looked up as of `at` in one
/// `offsets_for_times` call: each partition's first offset at or after `at`,
/// or its end offset when it has none (librdkafka answers `End`).
///
/// # Errors
/// The lookup's, or the first partition's own error.
pub(crate) fn offsets_at<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: &[(String, i32)],
    at: DateTime<Utc>,
    timeout: Duration,
) -> Result<OffsetsAt, rdkafka::error::KafkaError> {
    let mut ask = TopicPartitionList::with_capacity(partitions.len());
    for (topic, partition) in partitions {
        ask.add_partition_offset(topic, *partition, Offset::Offset(at.timestamp_millis()))?;
    }
    let got = consumer.offsets_for_times(ask, timeout)?;
    let mut out = Vec::with_capacity(partitions.len());
    for e in got.elements() {
        e.error()?;
        out.push(((e.topic().to_owned(), e.partition()), e.offset()));
    }
    drop(got);
    Ok(out)
}

/// The [`StartFrom::Timestamp`] lookup around an assignment.
pub(super) struct StartPositions {
    at: Option<DateTime<Utc>>,
    /// Partitions whose start could not be looked up: paused once assigned.
    unresolved: Mutex<Vec<(String, i32)>>,
}

impl StartPositions {
    pub(super) fn new(start_from: StartFrom) -> Self {
        StartPositions {
            at: match start_from {
                StartFrom::Timestamp(t) => Some(t),
                _ => None,
            },
            unresolved: Mutex::new(Vec::new()),
        }
    }

    /// Before `tpl` is assigned: gives each of its partitions without a
    /// committed offset the first offset at or after the time, so librdkafka
    /// starts there. On a failed lookup the partitions are remembered (to be
    /// paused by [`StartPositions::after_assign`]) and the error returned.
    pub(super) fn before_assign<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        tpl: &TopicPartitionList,
    ) -> Result<(), SourceError> {
        let Some(at) = self.at else { return Ok(()) };
        if tpl.count() == 0 {
            return Ok(());
        }
        let all: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        match self.resolve(consumer, tpl, &all, at) {
            Ok(()) => Ok(()),
            Err(source) => {
                if let Ok(mut u) = self.unresolved.lock() {
                    u.extend(all);
                }
                Err(SourceError::StartFrom {
                    at: at.to_rfc3339_opts(SecondsFormat::Millis, true),
                    source,
                })
            }
        }
    }

    fn resolve<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        tpl: &TopicPartitionList,
        all: &[(String, i32)],
        at: DateTime<Utc>,
    ) -> Result<(), rdkafka::error::KafkaError> {
        let mut ask = TopicPartitionList::with_capacity(all.len());
        for (topic, partition) in all {
            ask.add_partition(topic, *partition);
        }
        let committed = consumer.committed_offsets(ask, LOOKUP_TIMEOUT)?;
        let fresh: Vec<(String, i32)> = committed
            .elements()
            .iter()
            .filter(|e| !matches!(e.offset(), Offset::Offset(_)))
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        // Lists go before the consumer can: a live list makes its destroy hang.
        drop(committed);
        if fresh.is_empty() {
            return Ok(());
        }
        for ((topic, partition), offset) in offsets_at(consumer, &fresh, at, LOOKUP_TIMEOUT)? {
            let start = match offset {
                Offset::Offset(o) => Offset::Offset(o),
                // No message at or after the time: only new ones are read.
                _ => Offset::End,
            };
            if let Some(mut e) = tpl.find_partition(&topic, partition) {
                e.set_offset(start)?;
            }
            tracing::info!(topic, partition, ?start, at = %at, "Starting from a time: no committed offset.");
        }
        Ok(())
    }

    /// After the assignment: pauses the partitions whose start could not be
    /// looked up, so nothing of theirs runs or is committed before the source
    /// stops on the error.
    pub(super) fn after_assign<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) {
        let Ok(mut u) = self.unresolved.lock() else {
            return;
        };
        if u.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::with_capacity(u.len());
        for (topic, partition) in u.drain(..) {
            tpl.add_partition(&topic, partition);
        }
        if let Err(error) = consumer.pause(&tpl) {
            tracing::error!(%error, "Partitions without a start could not be paused.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_times_parse_and_print_back() {
        assert_eq!(StartFrom::parse(" Earliest "), Ok(StartFrom::Earliest));
        assert_eq!(StartFrom::parse("latest"), Ok(StartFrom::Latest));
        assert_eq!(StartFrom::parse("committed"), Ok(StartFrom::Committed));
        let t = StartFrom::parse("2026-12-05T16:00:00+02:00").unwrap();
        assert_eq!(t.to_string(), "2026-12-05T14:00:00Z");
        assert_eq!(StartFrom::parse(&t.to_string()), Ok(t));
        assert_eq!(
            StartFrom::parse("1764943200000"),
            StartFrom::parse("2025-12-05T14:00:00Z")
        );
        let e = StartFrom::parse("yesterday").unwrap_err();
        assert!(e.contains("yesterday") && e.contains("RFC 3339"), "{e}");
        assert_eq!(StartFrom::Earliest.auto_offset_reset(), Some("earliest"));
        assert_eq!(t.auto_offset_reset(), None);
    }

    #[test]
    fn serde_reads_what_it_writes() {
        let t = StartFrom::parse("2026-12-05T14:00:00.250Z").unwrap();
        let text = serde_json::to_string(&t).unwrap();
        assert_eq!(text, "\"2026-12-05T14:00:00.250Z\"");
        assert_eq!(serde_json::from_str::<StartFrom>(&text).unwrap(), t);
        let e = serde_json::from_str::<StartFrom>("\"soon\"").unwrap_err();
        assert!(e.to_string().contains("soon"), "{e}");
    }
}
