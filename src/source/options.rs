//! [`SourceOptions`]: the source stage's limits, their defaults and the reasons
//! for them, and the checks `build` runs on them.

use std::time::Duration;

#[cfg(doc)]
use super::SourceStats;
use super::{SourceError, StartFrom};
use crate::dispatch::Ordering;
use crate::flow_control::{Concurrency, RateLimit};

/// How the group moves partitions between members on a rebalance, and so
/// what stops while it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Assignment {
    /// Every rebalance revokes every partition of every member, which drains
    /// them all, then assigns anew (librdkafka's `range,roundrobin`): while a
    /// member joins or leaves, the whole group stops. The default, since a
    /// group must not mix protocols: moving a running group to cooperative
    /// takes a rolling restart (see `docs/explanation/membership.md`).
    #[default]
    Eager,
    /// Incremental, cooperative-sticky assignment (KIP-429): a rebalance
    /// revokes only the partitions that move, and only those drain; the
    /// others keep being handled through it.
    Cooperative,
}

impl Assignment {
    /// librdkafka's `partition.assignment.strategy` for it.
    pub fn strategy(self) -> &'static str {
        match self {
            Assignment::Eager => "range,roundrobin",
            Assignment::Cooperative => "cooperative-sticky",
        }
    }
}

/// Limits of the source stage. In configuration files every field is
/// optional (its default applies) and durations read as `500ms`, `30s`,
/// `5m` or `1h` ([`crate::config::duration`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct SourceOptions {
    /// How events are put in lanes, and so what order is kept. Default: per
    /// partition.
    pub ordering: Ordering,
    /// How partitions move between the group's members (`eager` or
    /// `cooperative`). Default eager; see [`Assignment`]. Every member of a
    /// group must use the same.
    pub assignment: Assignment,
    /// Jobs handed to the executor and not yet finished: at most this many
    /// handler calls run at once. Default 1,024: the services this crate serves
    /// mostly wait on other services, and by Little's law 1,024 calls of ~20 ms
    /// keep ~50,000 events/s moving, more than one consumer's partitions usually
    /// carry; a few KB of task state each. Past it, lanes with waiting events
    /// queue for room, oldest first.
    ///
    /// [`Concurrency::Adaptive`] (async handlers only) lets the lanes hand out
    /// up to `max` jobs and starts at most the adaptive limit's handler calls
    /// at once: the limit grows while the handler's latency stays near the
    /// lowest seen, and is cut when it rises, on timeouts, and on errors the
    /// handler marks [`HandlerError::overloaded`](crate::handler::HandlerError::overloaded)
    /// (see [`crate::flow_control`]). The lanes' ordering and the buffer
    /// budget are unchanged: the limit only decides how many calls run. In
    /// configuration: `256` or `{"adaptive": {"min": 1, "max": 256}}`.
    pub max_in_flight: Concurrency,
    /// Most waiting events of one lane handed over as one job (run in order by
    /// one executor). Default 64: a busy partition costs one hand-off and one
    /// release per 64 events instead of per event.
    pub batch: usize,
    /// Bytes of messages between their arrival and their job's release (payload,
    /// key and ~128 bytes of bookkeeping each). Default 16 MiB: a quarter of
    /// librdkafka's own prefetch limit, about 13,000 ~1 KB events. The buffers
    /// **never pass it**: a message that does not fit is not copied; its
    /// partition is paused and sought back to it, and resumes once the buffers
    /// are at most half full (then the message is read again). Half the
    /// budget is the partitions' own, split evenly: a partition whose handler
    /// never returns holds at most its share and the shared half, never the
    /// others' own. Only a partition holding nothing takes a message bigger
    /// than its room. A pause is not
    /// free: librdkafka drops the partition's prefetched messages and fetches
    /// them again after the resume.
    pub buffer_budget: usize,
    /// Messages between their arrival and their job's release, counted as for
    /// `buffer_budget` (which tiny messages would not reach). Default 50,000.
    pub max_buffered: usize,
    /// How long the poll thread stops polling, the buffers over budget and the
    /// handlers draining them, before it pauses the partitions. Default 1 s:
    /// while handlers make progress, the buffers drain from full to half in a
    /// fraction of that at any useful rate, and a pause, which drops
    /// librdkafka's prefetch and refetches it, is avoided; while nothing is
    /// polled, rebalances wait, so it is kept well under the rebalance timeout.
    /// Handlers that stall (no completion for 100 ms) pause at once, so polling,
    /// and with it rebalances, goes on while nothing is fetched. While it does
    /// not poll, librdkafka still prefetches, within its own
    /// `queued.max.messages.kbytes`.
    #[serde(with = "crate::config::duration")]
    pub pause_after: Duration,
    /// How often the contiguous commit points are committed (asynchronously).
    /// Default 1 s: a crash replays at most about a second of finished work.
    #[serde(with = "crate::config::duration")]
    pub commit_interval: Duration,
    /// How long revoke and shutdown wait for running work before committing what
    /// finished and cancelling the rest. Default 10 s, well inside the 30 s
    /// session timeout.
    #[serde(with = "crate::config::duration")]
    pub drain_timeout: Duration,
    /// Longest single wait in `poll` while nothing runs. Default 50 ms: commits
    /// and resumes are handled at least this often when no message arrives.
    #[serde(with = "crate::config::duration")]
    pub poll_interval: Duration,
    /// Offsets tracked per partition from its commit point on: waiting, running,
    /// held, or finished behind an unfinished one. Default 100,000 (16 bytes
    /// each, so 1.6 MB a partition; about what a replay after a crash may cost).
    /// At the limit the partition is **paused** until its commit point moves, so
    /// one offset that never finishes (a held message, a report that failed for
    /// good) bounds memory and the replay instead of growing both without end.
    pub max_tracked: usize,
    /// Whether each commit carries, in its metadata, the offsets above the
    /// commit point that already finished (see [`crate::offsets::progress`]),
    /// and whether an assigned partition's committed map is read, so a restart
    /// or the next owner skips them (counted in [`SourceStats::skipped_done`])
    /// instead of replaying them. Default on. A map that does not decode is
    /// ignored with a warning: its offsets are replayed, never skipped.
    pub completion_map: bool,
    /// Most bytes of one partition's map. Default 2,048
    /// ([`crate::offsets::progress::DEFAULT_MAX_BYTES`], where the reason is);
    /// at most 4,096, the broker's default `offset.metadata.max.bytes`, past
    /// which the broker refuses the whole commit. A map that does not fit is
    /// cut to its longest prefix that does; the rest is replayed.
    pub completion_map_max_bytes: usize,
    /// How long a partition may hold unfinished work while its commit point
    /// stands still before it counts as **stalled**: health then answers not
    /// alive (`GET /health` 503, naming the partitions and their oldest
    /// unfinished offsets) and an error is logged, so an orchestrator restarts
    /// the process and the work is replayed. `None` turns detection off.
    /// Default 5 minutes: far longer than one event's work should take in a
    /// service this crate serves (a handler, XZepr's 10–14 s posts while its
    /// Kafka is down, the reporter's retries), and short enough that a hung
    /// consumer is recovered within an incident rather than found the next day.
    #[serde(with = "crate::config::duration::option")]
    pub stall_timeout: Option<Duration>,
    /// Where a partition the group has **no committed offset** for starts:
    /// `committed` (default: as `auto_offset_reset` says), `earliest`,
    /// `latest`, or a time, for the first event at or after it (librdkafka's
    /// `offsets_for_times`, looked up before the partition is assigned). A
    /// committed offset always wins; to move a group that has one, stop it and
    /// run `xzepr-consumer offsets reset`. `earliest` and `latest` override
    /// `auto_offset_reset`. If a time cannot be looked up, the partitions stay
    /// paused and the source stops with [`SourceError::StartFrom`].
    pub start_from: StartFrom,
    /// At most this many events a second handed to the handler, with a
    /// burst (see [`RateLimit`]); `None` (the default): no limit. An event
    /// without a token waits in its lane; the lanes' waiting events count
    /// against the buffer budget, so the partitions pause as when handlers
    /// are slow. Nothing is dropped or failed for the rate.
    pub rate_limit: Option<RateLimit>,
    /// The delay topics among the subscribed ones (the pipeline's retry
    /// policy names them): a partition of one is paused while its next
    /// message is not due.
    #[serde(skip)]
    pub(crate) delay_topics: Vec<String>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            ordering: Ordering::PerPartition,
            assignment: Assignment::Eager,
            max_in_flight: Concurrency::Fixed(1024),
            batch: 64,
            buffer_budget: 16 << 20,
            max_buffered: 50_000,
            pause_after: Duration::from_secs(1),
            commit_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(50),
            max_tracked: 100_000,
            completion_map: true,
            completion_map_max_bytes: crate::offsets::progress::DEFAULT_MAX_BYTES,
            stall_timeout: Some(Duration::from_secs(300)),
            start_from: StartFrom::Committed,
            rate_limit: None,
            delay_topics: Vec::new(),
        }
    }
}

impl SourceOptions {
    pub(crate) fn validate(&self, session_timeout: Duration) -> Result<(), SourceError> {
        let bad = |field, reason| Err(SourceError::InvalidOption { field, reason });
        if let Some(reason) = self.max_in_flight.problem() {
            return bad("max_in_flight", reason);
        }
        if let Some((field, reason)) = self.rate_limit.as_ref().and_then(RateLimit::problem) {
            return bad(field, reason);
        }
        if self.batch == 0 {
            return bad("batch", "must be at least 1");
        }
        if self.buffer_budget == 0 {
            return bad("buffer_budget", "must be at least 1 byte");
        }
        if self.max_buffered == 0 {
            return bad("max_buffered", "must be at least 1");
        }
        if self.max_tracked == 0 {
            return bad("max_tracked", "must be at least 1");
        }
        if self.completion_map_max_bytes > crate::offsets::progress::BROKER_DEFAULT_MAX_BYTES {
            return bad(
                "completion_map_max_bytes",
                "must be at most 4,096 (the broker's default offset.metadata.max.bytes)",
            );
        }
        if self.stall_timeout == Some(Duration::ZERO) {
            return bad(
                "stall_timeout",
                "must be more than zero (None turns stall detection off)",
            );
        }
        if self.pause_after >= session_timeout {
            return bad("pause_after", "must be shorter than the session timeout");
        }
        if self.drain_timeout >= session_timeout {
            return bad("drain_timeout", "must be shorter than the session timeout");
        }
        Ok(())
    }
}
