//! Pipeline counters: relaxed atomics bumped once per message per stage, read as a
//! [`MetricsSnapshot`]. Each worker has its own set (summed on read), so workers
//! never contend on a cache line. Nothing here logs; callers aggregate.
//! [`crate::observe`] exposes them to Prometheus, read at scrape time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Live counters of one pipeline (shared by its stages).
        #[derive(Debug, Default)]
        pub struct Metrics {
            $($(#[$doc])* pub(crate) $name: AtomicU64,)*
            /// How long handler calls took (the only metric recorded per call
            /// rather than derived from a counter).
            pub(crate) handler_latency: Latency,
        }

        /// A copy of the counters at one moment.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
        #[non_exhaustive]
        pub struct MetricsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Metrics {
            /// Reads every counter (each atomically; not all at one instant).
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }

        impl std::ops::AddAssign for MetricsSnapshot {
            fn add_assign(&mut self, other: MetricsSnapshot) {
                $(self.$name += other.$name;)*
            }
        }
    };
}

counters! {
    /// Messages taken from the source queues by workers.
    consumed,
    /// Messages that failed to decode (counted, logged, handled per policy).
    malformed,
    /// Events skipped by the type filter.
    filtered,
    /// Events skipped because their source is this service's own receiver.
    own_skipped,
    /// Events given to the handler.
    handled,
    /// Handler calls that returned an error (or panicked, or timed out).
    handler_failed,
    /// Handler calls that ran past `handler_timeout` (async: cancelled and
    /// failed with code `timeout`; sync: ran to their end, outcome kept).
    handler_timeouts,
    /// `started` posts acknowledged by XZepr.
    posted_started,
    /// `completed` posts acknowledged by XZepr.
    posted_completed,
    /// `failed` posts acknowledged by XZepr.
    posted_failed,
    /// Lifecycle posts that failed and were not submitted again: the reporter
    /// is gone, the event's partition was revoked, or the pipeline stopped
    /// (their offsets stay uncommitted). Posts that fail for now are submitted
    /// again, as often as it takes, after waits that grow to the reporter's
    /// `resubmit_backoff_max`.
    report_failed,
    /// Of `report_failed`: `started` posts.
    report_failed_started,
    /// Of `report_failed`: `completed` posts.
    report_failed_completed,
    /// Of `report_failed`: `failed` posts.
    report_failed_failed,
    /// Lifecycle posts XZepr refused for good (a 4xx other than 401, 403, 404,
    /// 429): their events are dead-lettered with reason `report_rejected`.
    report_rejected,
    /// Handler attempts after the first (the retry policy's).
    retried,
    /// Events produced to the dead-letter topic and acknowledged by the broker.
    dead_lettered,
    /// Dead-letter produces that failed (their offsets are held).
    dead_letter_failed,
    /// Events sent to a delay topic (the retry policy's `delay_topics`) and
    /// acknowledged by the broker: they run again once due.
    delayed,
    /// Delay-topic produces that failed (produced again; their offsets wait).
    delay_failed,
    /// Events finished without running: the idempotency store had their key
    /// processed (by this consumer before a replay, or by another).
    duplicates,
    /// Idempotency store calls that failed (retried; the event waited).
    idempotency_errors,
    /// Handed-over messages dropped unhandled because their partition was revoked.
    stale_dropped,
    /// Offsets finished (handled and reported, or skipped).
    finished,
}

impl Metrics {
    #[inline]
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

/// Upper bounds, in seconds, of the handler-duration histogram's buckets (a
/// last, unbounded one follows): from 0.5 ms, a CPU-bound closure, to 10 s, a
/// slow downstream call; Prometheus' default buckets with a finer low end.
pub const HANDLER_SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// [`HANDLER_SECONDS_BUCKETS`] in nanoseconds, for an integer comparison per call.
const BOUNDS_NANOS: [u64; 14] = {
    let mut out = [0u64; 14];
    let mut i = 0;
    while i < out.len() {
        out[i] = (HANDLER_SECONDS_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    out
};

/// A histogram of durations in atomic buckets: one bucket and the sum are
/// bumped per observation (two relaxed adds, no lock); counts are made
/// cumulative only when read.
#[derive(Debug, Default)]
pub(crate) struct Latency {
    /// Per bucket (not cumulative); the last is past every bound.
    buckets: [AtomicU64; BOUNDS_NANOS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Latency {
    #[inline]
    pub(crate) fn observe(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NANOS.partition_point(|&bound| bound < nanos);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    /// Adds this histogram's counts into `into`.
    pub(crate) fn add_to(&self, into: &mut LatencySnapshot) {
        for (total, b) in into.buckets.iter_mut().zip(&self.buckets) {
            *total += b.load(Relaxed);
        }
        into.sum_nanos += self.sum_nanos.load(Relaxed);
    }
}

/// Handler durations at one moment, summed over workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LatencySnapshot {
    /// Per bucket of [`HANDLER_SECONDS_BUCKETS`] (not cumulative), then the
    /// unbounded one.
    pub(crate) buckets: [u64; BOUNDS_NANOS.len() + 1],
    pub(crate) sum_nanos: u64,
}

impl LatencySnapshot {
    /// Observations in all.
    pub(crate) fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// `(upper bound, count)` per bucket, not cumulative (the encoders add
    /// them up), the last bound `+Inf`.
    pub(crate) fn buckets(&self) -> Vec<(f64, u64)> {
        HANDLER_SECONDS_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets)
            .collect()
    }

    /// The sum of the observations, in seconds.
    pub(crate) fn sum_seconds(&self) -> f64 {
        self.sum_nanos as f64 / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_inclusive_upper_bounds() {
        let h = Latency::default();
        h.observe(Duration::from_micros(500)); // on the first bound: first bucket
        h.observe(Duration::from_micros(501));
        h.observe(Duration::from_secs(60)); // past every bound
        let mut s = LatencySnapshot::default();
        h.add_to(&mut s);
        assert_eq!(s.count(), 3);
        let b = s.buckets();
        assert_eq!(b.len(), HANDLER_SECONDS_BUCKETS.len() + 1);
        assert_eq!(b[0], (0.0005, 1));
        assert_eq!(b[1], (0.001, 1));
        assert_eq!(b.last().copied(), Some((f64::INFINITY, 1)));
        assert_eq!(s.sum_nanos, 500_000 + 501_000 + 60_000_000_000);
    }
}
