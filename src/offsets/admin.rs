//! A consumer group's offsets from outside the group: what each partition
//! committed, the completion map in the commit's metadata, and the lag
//! ([`GroupOffsets::show`]); and moving them ([`GroupOffsets::reset`]) to a
//! time, the earliest or latest offset, or by a number of offsets, while the
//! group has no active member.
//!
//! A reset commits as a client outside the group (no member id, no
//! generation), which a broker takes only while the group is empty: it is
//! refused twice over, first by the group's member list when the broker
//! lists groups, then by the broker itself on the commit. Each moved
//! partition is committed with empty metadata, so its completion map (written
//! for the old commit point) is gone with it.
//!
//! ```no_run
//! use xzepr_consumer::config::KafkaConsumerConfig;
//! use xzepr_consumer::offsets::admin::{GroupOffsets, ResetTo};
//!
//! let kafka = KafkaConsumerConfig::from_env("deployer")?;
//! let group = GroupOffsets::connect(&kafka, "xzepr-consumer-deployer")?;
//! let at = xzepr_consumer::source::parse_time("2026-12-05T14:00:00Z").unwrap();
//! let plan = group.reset("xzepr.dev.events", ResetTo::Timestamp(at), true)?;
//! for p in &plan.partitions {
//!     println!("{}: {:?} -> {}", p.partition, p.old, p.new);
//! }
//! # Ok::<(), xzepr_consumer::offsets::admin::AdminError>(())
//! ```

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use super::progress;
use crate::config::{ConfigError, KafkaConsumerConfig};

/// Longest wait for each broker request (metadata, watermarks, committed
/// offsets, group list, commit). The coordinator answers in milliseconds; an
/// unreachable cluster fails the command instead of hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Group offset errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The connection settings were rejected.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A request to the brokers failed.
    #[error("{what}")]
    Kafka {
        /// What was asked.
        what: &'static str,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// The topic has no partitions (it does not exist).
    #[error("topic {topic:?} does not exist")]
    UnknownTopic {
        /// The topic.
        topic: String,
    },
    /// The group has members: its consumers would commit over the reset.
    #[error("group {group:?} has {members} active member(s): stop its consumers first")]
    ActiveMembers {
        /// The group.
        group: String,
        /// How many.
        members: usize,
    },
    /// The broker refused the commit from outside the group: the group has
    /// members (or is rebalancing). Nothing was moved.
    #[error("the broker refused to move group {group:?}'s offsets: it has active members (stop its consumers first)")]
    Refused {
        /// The group.
        group: String,
        /// The broker's answer.
        #[source]
        source: KafkaError,
    },
    /// `--shift-by` needs a committed offset to shift.
    #[error("{topic}/{partition} has no committed offset to shift")]
    NoCommittedOffset {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
    },
}

impl AdminError {
    #[cold]
    fn kafka(what: &'static str) -> impl FnOnce(KafkaError) -> AdminError {
        move |source| AdminError::Kafka { what, source }
    }
}

/// What a partition's commit metadata says finished above its commit point.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MapSummary {
    /// No map (nothing finished out of order, or another client committed).
    None,
    /// A map of this many finished offsets above the commit point.
    Finished(u64),
    /// Metadata that is no map of this commit point: the consumer ignores it
    /// and replays.
    Unreadable(String),
}

impl fmt::Display for MapSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapSummary::None => f.write_str("-"),
            MapSummary::Finished(n) => write!(f, "{n} finished above"),
            MapSummary::Unreadable(why) => write!(f, "ignored ({why})"),
        }
    }
}

/// One partition's committed offset, map and lag.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionOffsets {
    /// The partition.
    pub partition: i32,
    /// The group's committed offset (the next to read), if any.
    pub committed: Option<i64>,
    /// The completion map in the commit's metadata.
    pub map: MapSummary,
    /// The first offset the broker still keeps.
    pub low: i64,
    /// The end offset (one past the last message).
    pub high: i64,
    /// Messages from the committed offset to the end (`None`: nothing
    /// committed); offsets the map says finished are still counted.
    pub lag: Option<i64>,
}

/// Where [`GroupOffsets::reset`] moves each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResetTo {
    /// The first offset still kept.
    Earliest,
    /// The end: only new messages are read.
    Latest,
    /// The first offset with a timestamp at or after this time (the end when
    /// there is none).
    Timestamp(DateTime<Utc>),
    /// The committed offset plus this many (negative: back), kept within what
    /// the broker holds.
    ShiftBy(i64),
}

/// One partition's move.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Moved {
    /// The partition.
    pub partition: i32,
    /// The committed offset before.
    pub old: Option<i64>,
    /// The committed offset after.
    pub new: i64,
    /// Whether it moves (a partition already there is left alone, map and all).
    pub moves: bool,
    /// Whether the commit dropped a completion map.
    pub map_cleared: bool,
}

/// What [`GroupOffsets::reset`] did, or would do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResetReport {
    /// The topic.
    pub topic: String,
    /// Per partition, in order.
    pub partitions: Vec<Moved>,
    /// Whether nothing was committed (`--dry-run`).
    pub dry_run: bool,
    /// Whether the broker listed the group's members (and it had none); when
    /// it cannot, only its refusal of the commit guards a running group, and a
    /// dry run cannot tell.
    pub members_checked: bool,
}

/// A group's offsets, read and moved from outside the group.
pub struct GroupOffsets {
    consumer: BaseConsumer,
    group: String,
}

impl fmt::Debug for GroupOffsets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupOffsets")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl GroupOffsets {
    /// A client on `kafka`'s cluster and credentials for `group`; it joins
    /// no group and subscribes to nothing.
    ///
    /// # Errors
    /// [`AdminError::Config`] for bad settings, [`AdminError::Kafka`] if
    /// librdkafka refuses them.
    pub fn connect(kafka: &KafkaConsumerConfig, group: &str) -> Result<Self, AdminError> {
        let mut kafka = kafka.clone();
        kafka.group_id = group.to_owned();
        let consumer = kafka
            .to_client_config()?
            .create()
            .map_err(AdminError::kafka("creating the client"))?;
        Ok(GroupOffsets {
            consumer,
            group: group.to_owned(),
        })
    }

    /// The group's committed offset, completion map and lag on every
    /// partition of `topic`.
    ///
    /// # Errors
    /// [`AdminError::UnknownTopic`], or [`AdminError::Kafka`] naming the
    /// request that failed.
    pub fn show(&self, topic: &str) -> Result<Vec<PartitionOffsets>, AdminError> {
        let partitions = self.partitions(topic)?;
        let committed = self.committed(topic, &partitions)?;
        partitions
            .iter()
            .zip(committed)
            .map(|(&partition, (offset, metadata))| {
                let (low, high) = self
                    .consumer
                    .fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
                    .map_err(AdminError::kafka("reading the watermarks"))?;
                let map = match (offset, metadata) {
                    (Some(base), Some(text)) if !text.is_empty() => {
                        match progress::decode(base, &text) {
                            Ok(m) if m.is_empty() => MapSummary::None,
                            Ok(m) => MapSummary::Finished(m.len()),
                            Err(e) => MapSummary::Unreadable(e.to_string()),
                        }
                    }
                    (Some(_), None) => MapSummary::Unreadable("not UTF-8".to_owned()),
                    _ => MapSummary::None,
                };
                Ok(PartitionOffsets {
                    partition,
                    committed: offset,
                    map,
                    low,
                    high,
                    lag: offset.map(|o| (high - o).max(0)),
                })
            })
            .collect()
    }

    /// Moves the group's committed offsets on `topic` to `to` (or, with
    /// `dry_run`, only says where), dropping the completion maps of the
    /// partitions it moves.
    ///
    /// # Errors
    /// [`AdminError::ActiveMembers`] or [`AdminError::Refused`] while the group
    /// has members (nothing moved); [`AdminError::NoCommittedOffset`] for a
    /// shift of a partition without one; [`AdminError::UnknownTopic`];
    /// [`AdminError::Kafka`] naming the request that failed.
    pub fn reset(
        &self,
        topic: &str,
        to: ResetTo,
        dry_run: bool,
    ) -> Result<ResetReport, AdminError> {
        let members_checked = self.check_no_members()?;
        let now = self.show(topic)?;
        let at = match to {
            ResetTo::Timestamp(t) => {
                let ask: Vec<(String, i32)> = now
                    .iter()
                    .map(|p| (topic.to_owned(), p.partition))
                    .collect();
                crate::source::offsets_at(&self.consumer, &ask, t, REQUEST_TIMEOUT)
                    .map_err(AdminError::kafka("looking up the offsets at the time"))?
            }
            _ => Vec::new(),
        };
        let mut partitions = Vec::with_capacity(now.len());
        for p in &now {
            let new = match to {
                ResetTo::Earliest => p.low,
                ResetTo::Latest => p.high,
                ResetTo::Timestamp(_) => match at.iter().find(|(k, _)| k.1 == p.partition) {
                    Some((_, Offset::Offset(o))) => *o,
                    _ => p.high,
                },
                ResetTo::ShiftBy(n) => {
                    let base = p.committed.ok_or_else(|| AdminError::NoCommittedOffset {
                        topic: topic.to_owned(),
                        partition: p.partition,
                    })?;
                    base.saturating_add(n).clamp(p.low, p.high)
                }
            };
            let moves = p.committed != Some(new);
            partitions.push(Moved {
                partition: p.partition,
                old: p.committed,
                new,
                moves,
                map_cleared: moves && p.map != MapSummary::None,
            });
        }
        if !dry_run {
            self.commit(topic, &partitions)?;
        }
        Ok(ResetReport {
            topic: topic.to_owned(),
            partitions,
            dry_run,
            members_checked,
        })
    }

    /// Refuses a group with members. `Ok(false)`: the broker does not list
    /// groups (its refusal of the commit is then the only check).
    fn check_no_members(&self) -> Result<bool, AdminError> {
        match self
            .consumer
            .fetch_group_list(Some(&self.group), REQUEST_TIMEOUT)
        {
            Ok(list) => {
                let members = list
                    .groups()
                    .iter()
                    .filter(|g| g.name() == self.group)
                    .map(|g| g.members().len())
                    .sum();
                if members > 0 {
                    return Err(AdminError::ActiveMembers {
                        group: self.group.clone(),
                        members,
                    });
                }
                Ok(true)
            }
            Err(error) => {
                tracing::warn!(%error, group = %self.group, "The broker does not list the group's members; relying on its refusal of the commit.");
                Ok(false)
            }
        }
    }

    fn commit(&self, topic: &str, partitions: &[Moved]) -> Result<(), AdminError> {
        let mut tpl = TopicPartitionList::new();
        for m in partitions.iter().filter(|m| m.moves) {
            tpl.add_partition_offset(topic, m.partition, Offset::Offset(m.new))
                .map_err(AdminError::kafka("building the commit"))?;
            if let Some(mut e) = tpl.find_partition(topic, m.partition) {
                // Empty metadata: the old map described the old commit point.
                e.set_metadata("");
            }
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        let result = self.consumer.commit(&tpl, CommitMode::Sync);
        drop(tpl);
        match result {
            Ok(()) => Ok(()),
            Err(e) if refused_for_members(&e) => Err(AdminError::Refused {
                group: self.group.clone(),
                source: e,
            }),
            Err(e) => Err(AdminError::Kafka {
                what: "committing the new offsets",
                source: e,
            }),
        }
    }

    fn partitions(&self, topic: &str) -> Result<Vec<i32>, AdminError> {
        let md = self
            .consumer
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
            .map_err(AdminError::kafka("reading the topic's metadata"))?;
        let mut parts: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if parts.is_empty() {
            return Err(AdminError::UnknownTopic {
                topic: topic.to_owned(),
            });
        }
        parts.sort_unstable();
        Ok(parts)
    }

    /// Committed offset and metadata (`None`: not UTF-8) per partition.
    fn committed(&self, topic: &str, partitions: &[i32]) -> Result<Vec<Committed>, AdminError> {
        let mut ask = TopicPartitionList::with_capacity(partitions.len());
        for p in partitions {
            ask.add_partition(topic, *p);
        }
        let got = self
            .consumer
            .committed_offsets(ask, REQUEST_TIMEOUT)
            .map_err(AdminError::kafka("reading the committed offsets"))?;
        let out = partitions
            .iter()
            .map(|&p| match got.find_partition(topic, p) {
                Some(e) => {
                    let offset = match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    };
                    // rdkafka panics on metadata that is not UTF-8 (another client's bytes).
                    let text = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        e.metadata().to_owned()
                    }))
                    .ok();
                    (offset, text)
                }
                None => (None, Some(String::new())),
            })
            .collect();
        // The list goes before the consumer can: a live list makes its destroy hang.
        drop(got);
        Ok(out)
    }
}

/// A partition's committed offset, and its metadata (`None`: not UTF-8).
type Committed = (Option<i64>, Option<String>);

/// The broker's answers to a commit from outside a group that has members.
fn refused_for_members(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::FencedInstanceId
                | RDKafkaErrorCode::StaleMemberEpoch
        )
    )
}
