//! [`SourceStats`]: the source stage's counters and gauges.

use std::sync::atomic::{AtomicBool, AtomicU64};

#[cfg(doc)]
use super::SourceOptions;

/// Counters and gauges of the source stage, readable while it runs.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Messages polled from librdkafka.
    pub polled: AtomicU64,
    /// Messages handed to the executor.
    pub dispatched: AtomicU64,
    /// Jobs handed to the executor.
    pub jobs: AtomicU64,
    /// Times a partition was paused (buffers over budget, or the tracking limit).
    pub pauses: AtomicU64,
    /// Delay-topic partitions paused until their next message was due.
    pub delay_pauses: AtomicU64,
    /// Times a paused partition was resumed.
    pub resumes: AtomicU64,
    /// Commits sent (async and sync).
    pub commits: AtomicU64,
    /// Final commits at shutdown the group coordinator confirmed (the
    /// committed offsets read back equal those sent).
    pub final_commits_confirmed: AtomicU64,
    /// Synchronous commits on revoke that the broker refused.
    pub revoke_commit_failures: AtomicU64,
    /// Partitions currently assigned.
    pub assigned: AtomicU64,
    /// Jobs running now (handler calls in progress, or queued for a sync worker).
    pub in_flight: AtomicU64,
    /// The most jobs that ran at once (never above `max_in_flight`).
    pub peak_in_flight: AtomicU64,
    /// Bytes buffered now (see [`SourceOptions::buffer_budget`]).
    pub buffered_bytes: AtomicU64,
    /// The most bytes buffered at once; above the budget only by the messages
    /// librdkafka had already handed over for a partition when it was paused.
    pub peak_buffered_bytes: AtomicU64,
    /// Lanes alive now.
    pub lanes: AtomicU64,
    // For health and metrics (see `watch`).
    /// Messages buffered now (see [`SourceOptions::max_buffered`]).
    pub buffered: AtomicU64,
    /// True once the consumer joined its group: an assignment came, even an
    /// empty one (more members than partitions).
    pub group_joined: AtomicBool,
    /// True while no broker is reachable: set by librdkafka's
    /// `ALL_BROKERS_DOWN` event and by statistics without a broker up, cleared
    /// by the next statistics with one.
    pub brokers_down: AtomicBool,
    /// Messages finished without dispatch: a previous owner's completion map
    /// said they were done (see [`SourceOptions::completion_map`]).
    pub skipped_done: AtomicU64,
    /// Committed completion maps ignored because they did not decode (their
    /// offsets are replayed).
    pub completion_maps_ignored: AtomicU64,
    /// Events let through by the rate limit ([`SourceOptions::rate_limit`]):
    /// its tokens handed out, never more than `burst + per_second × elapsed`
    /// (per bucket).
    pub rate_tokens_granted: AtomicU64,
    /// Bytes of messages librdkafka has prefetched and not yet handed to the
    /// poll thread (its consumer queue, as of its last statistics, once a
    /// second): bounded by librdkafka's `queued.max.messages.kbytes` plus the
    /// fetch responses in flight, and counted apart from `buffered_bytes`.
    pub prefetched_bytes: AtomicU64,
    /// The most of `prefetched_bytes` seen.
    pub peak_prefetched_bytes: AtomicU64,
}
