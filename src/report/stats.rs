//! The reporter's counters, read by the metrics and health of the pipeline.

/// Counters of the reporter.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct ReporterStats {
    /// Posts acknowledged by XZepr.
    pub posted: std::sync::atomic::AtomicU64,
    /// Records acknowledged without a post (already acknowledged before).
    pub coalesced: std::sync::atomic::AtomicU64,
    /// Retries made.
    pub retries: std::sync::atomic::AtomicU64,
    /// Records that failed for good.
    pub failed: std::sync::atomic::AtomicU64,
    /// Times the breaker opened.
    pub breaker_opened: std::sync::atomic::AtomicU64,
    /// True from the breaker's opening until a post gets an answer again (while
    /// it is open and while its probe is out): XZepr is taken to be unreachable.
    pub breaker_open: std::sync::atomic::AtomicBool,
    /// Posts re-sent after a lost response: the previous attempt was handed in
    /// full to XZepr and no answer came, so XZepr may have recorded it. Each
    /// duplicate XZepr holds is one of these (and carries the same `post_key`).
    pub resent_after_lost_response: std::sync::atomic::AtomicU64,
    /// `completed`/`failed` records failed unsent because their `started` was
    /// not acknowledged.
    pub terminal_without_started: std::sync::atomic::AtomicU64,
    /// True from a 401/403 answer until XZepr answers a post otherwise: it
    /// refuses this client's credentials, posts are held (one probes now and
    /// then), and the pipeline is not ready.
    pub unauthorized: std::sync::atomic::AtomicBool,
    /// Posts answered 401 or 403.
    pub unauthorized_answers: std::sync::atomic::AtomicU64,
}
