//! The reporter's limits and policies, each with its default and reason.

use std::time::Duration;

use crate::flow_control::Concurrency;

/// Limits and policies of the reporter. Every bound has a numeric default.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReporterConfig {
    /// Records waiting to be sent, counting those that failed for now and
    /// wait to be submitted again ([`Reporter::resubmit_delay`](super::Reporter::resubmit_delay)). Default 4096
    /// (two per event: ~2,000 events of slack). Full: submitters wait, so while
    /// XZepr takes nothing the handlers stop being fed instead of piling up
    /// unreported work.
    pub queue_capacity: usize,
    /// Posts in flight at once: [`Concurrency::Fixed`] (default 128: the real
    /// server, ~5.5 ms a post, reached ~7,800 posts/s at 64 concurrent
    /// connections; twice that keeps the server, not this client, the limit
    /// when its latency spikes), or [`Concurrency::Adaptive`], which finds
    /// the limit from XZepr's latency and cuts it on timeouts, 429 and 503
    /// (see [`crate::flow_control`]). The reporter runs `max` posting tasks; at
    /// the limit a post waits for a slot (and so, through the queue, holds the
    /// workers). Formerly `max_in_flight`.
    pub concurrency: Concurrency,
    /// Attempts per record, the first included. Default 8: with the backoff below,
    /// up to ~6 s of waiting between attempts (~3 s on average), plus whatever the
    /// breaker holds them; a record that still fails comes back failed and its
    /// offset stays uncommitted.
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt, with full jitter. Default 50 ms.
    pub backoff_base: Duration,
    /// Longest retry delay. Default 5 s.
    pub backoff_max: Duration,
    /// Consecutive failures that open the breaker. Default 20.
    pub breaker_threshold: u32,
    /// How long the open breaker holds posts before one probes. Default 2 s.
    /// Also the first hold after XZepr refuses the credentials (401/403).
    pub breaker_cooldown: Duration,
    /// Longest hold between probes while XZepr refuses the credentials
    /// (401/403): the hold starts at `breaker_cooldown` and doubles with each
    /// refused probe, with jitter. Default 60 s: one post a minute at most
    /// against a refusing XZepr, and a fixed token is noticed within a minute.
    pub unauthorized_hold_max: Duration,
    /// Longest wait before a record that failed for now (retries exhausted, a
    /// 404 no rediscovery fixed, a refusal) is submitted again by the
    /// pipeline: the wait starts at `backoff_max` and doubles with each
    /// resubmission of the record, with jitter. Default 60 s, for the same
    /// reasons as `unauthorized_hold_max`.
    pub resubmit_backoff_max: Duration,
    /// Acknowledged (work id, status) pairs remembered for coalescing. Default
    /// 65,536 (a few MB); the oldest are forgotten first.
    pub dedup_capacity: usize,
    /// At most this many posts per second, if set. Default: no limit.
    pub rate_limit: Option<u32>,
    /// Work ids whose `started` failed for good, remembered so their later
    /// `completed`/`failed` fails unsent instead of going out without it.
    /// Default 65,536 (a few MB); the oldest are forgotten first.
    pub failed_starts_capacity: usize,
}

impl Default for ReporterConfig {
    fn default() -> Self {
        ReporterConfig {
            queue_capacity: 4096,
            concurrency: Concurrency::Fixed(128),
            max_attempts: 8,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            breaker_threshold: 20,
            breaker_cooldown: Duration::from_secs(2),
            unauthorized_hold_max: Duration::from_secs(60),
            resubmit_backoff_max: Duration::from_secs(60),
            dedup_capacity: 65_536,
            rate_limit: None,
            failed_starts_capacity: 65_536,
        }
    }
}
