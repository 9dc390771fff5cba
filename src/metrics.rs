//! Pipeline counters: relaxed atomics bumped once per message per stage, read as a
//! [`MetricsSnapshot`]. Each worker has its own set (summed on read), so workers
//! never contend on a cache line. Nothing here logs; callers aggregate.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Live counters of one pipeline (shared by its stages).
        #[derive(Debug, Default)]
        pub struct Metrics {
            $($(#[$doc])* pub(crate) $name: AtomicU64,)*
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
    /// Handler calls that ran past `handler_timeout` (async: cancelled; sync:
    /// ran to their end, reported as a timeout).
    handler_timeouts,
    /// `started` posts acknowledged by XZepr.
    posted_started,
    /// `completed` posts acknowledged by XZepr.
    posted_completed,
    /// `failed` posts acknowledged by XZepr.
    posted_failed,
    /// Lifecycle posts that failed and could not be submitted again (their
    /// offsets stay uncommitted). Posts that fail for now are submitted again
    /// after the reporter's longest backoff, as often as it takes.
    report_failed,
    /// Lifecycle posts XZepr refused for good (a 4xx other than 401, 403, 404,
    /// 429): their events are dead-lettered with reason `report_rejected`.
    report_rejected,
    /// Handler attempts after the first (the retry policy's).
    retried,
    /// Events produced to the dead-letter topic and acknowledged by the broker.
    dead_lettered,
    /// Dead-letter produces that failed (their offsets are held).
    dead_letter_failed,
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
