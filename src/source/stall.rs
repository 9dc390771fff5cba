//! Stall detection, the safety net under every other failure path: a partition
//! that holds unfinished work while its commit point stands still for
//! [`SourceOptions::stall_timeout`](super::SourceOptions::stall_timeout) is
//! **stalled**, whatever the cause (a handler that never returns, a report or
//! dead letter that never gets through, a held offset), and health says so.
//!
//! The poll thread looks at its partitions every [`check_interval`]; what it
//! sees is published as [`PartitionState`]s for health and metrics, so a
//! reader never touches the poll thread's state.

use std::time::{Duration, Instant};

/// Longest time between two looks at the partitions.
const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How often the poll thread looks: a quarter of the stall timeout, at most a
/// second, so a stall shows within the timeout plus one interval.
pub(crate) fn check_interval(stall_timeout: Option<Duration>) -> Duration {
    stall_timeout.map_or(MAX_CHECK_INTERVAL, |t| {
        (t / 4).clamp(Duration::from_millis(10), MAX_CHECK_INTERVAL)
    })
}

/// One assigned partition's progress, as the poll thread last saw it (at most
/// a check interval old).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct PartitionState {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The offset a commit would carry now: the oldest unfinished offset
    /// while there is one. `None` before the first message.
    pub commit_point: Option<i64>,
    /// Offsets received and not finished: waiting, running or held.
    pub unfinished: usize,
    /// Of those, held: they will not finish in this assignment (a dead letter
    /// or report that did not get through, the `hold` malformed policy), and
    /// keep the commit point where it is until the partition is replayed.
    pub held: usize,
    /// How long the commit point has stood still while the partition had
    /// unfinished work, in milliseconds (0 when it has none).
    pub stalled_for_ms: u64,
    /// How long ago the oldest unfinished offset arrived (was polled), in
    /// milliseconds, to within 10 ms over; 0 when none is unfinished.
    pub oldest_unfinished_ms: u64,
    /// The commit point's age: how long ago, by its Kafka timestamp, the
    /// message at the commit point was produced (or appended, with
    /// `LogAppendTime`), in milliseconds: how far back in time a restart
    /// would replay from. 0 when nothing is unfinished; `None` when that
    /// message had no timestamp.
    pub commit_point_age_ms: Option<u64>,
    /// `stalled_for_ms` reached the stall timeout.
    pub stalled: bool,
    /// The partition is paused (its share of the buffers, its tracking limit,
    /// or a delay topic's next message not yet due).
    pub paused: bool,
    /// A delay topic's partition paused until its next message is due: in how
    /// many milliseconds. `None` otherwise.
    pub due_in_ms: Option<u64>,
}

/// How long one partition's commit point has stood still.
#[derive(Debug)]
pub(super) struct StallWatch {
    point: Option<i64>,
    since: Instant,
    stalled: bool,
}

impl StallWatch {
    pub(super) fn new(now: Instant) -> Self {
        StallWatch {
            point: None,
            since: now,
            stalled: false,
        }
    }

    /// Notes the partition's commit point and whether it has unfinished work;
    /// returns how long the point has stood still with work behind it, and
    /// whether that is a stall, logging the change either way.
    pub(super) fn observe(
        &mut self,
        (topic, partition): (&str, i32),
        point: Option<i64>,
        unfinished: bool,
        timeout: Option<Duration>,
        now: Instant,
    ) -> (Duration, bool) {
        if !unfinished || point != self.point {
            self.point = point;
            self.since = now;
        }
        let still = now.saturating_duration_since(self.since);
        let stalled = timeout.is_some_and(|t| unfinished && still >= t);
        if stalled != self.stalled {
            self.stalled = stalled;
            if stalled {
                tracing::error!(
                    topic,
                    partition,
                    oldest_unfinished = point,
                    stalled_for_ms = still.as_millis() as u64,
                    "Partition stalled: unfinished work and no commit progress."
                );
            } else {
                tracing::info!(
                    topic,
                    partition,
                    commit_point = point,
                    "Partition moving again."
                );
            }
        }
        (still, stalled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standing_point_with_work_behind_it_stalls_and_recovers_when_it_moves() {
        let t0 = Instant::now();
        let timeout = Some(Duration::from_secs(10));
        let mut w = StallWatch::new(t0);
        let at = |s| t0 + Duration::from_secs(s);
        assert!(!w.observe(("t", 0), Some(5), true, timeout, at(0)).1);
        assert_eq!(
            w.observe(("t", 0), Some(5), true, timeout, at(9)),
            (Duration::from_secs(9), false)
        );
        assert!(w.observe(("t", 0), Some(5), true, timeout, at(10)).1);
        // The point moves: no longer stalled, and the clock starts again.
        assert_eq!(
            w.observe(("t", 0), Some(6), true, timeout, at(11)),
            (Duration::ZERO, false)
        );
        // Nothing unfinished: never stalled, however long the point stands.
        assert_eq!(
            w.observe(("t", 0), Some(6), false, timeout, at(100)),
            (Duration::ZERO, false)
        );
        // Detection off: the age is still reported.
        let mut off = StallWatch::new(t0);
        off.observe(("t", 0), Some(1), true, None, at(0));
        assert_eq!(
            off.observe(("t", 0), Some(1), true, None, at(50)),
            (Duration::from_secs(50), false)
        );
    }

    #[test]
    fn the_check_interval_follows_the_timeout() {
        assert_eq!(check_interval(None), MAX_CHECK_INTERVAL);
        assert_eq!(
            check_interval(Some(Duration::from_secs(2))),
            Duration::from_millis(500)
        );
        assert_eq!(
            check_interval(Some(Duration::from_secs(300))),
            MAX_CHECK_INTERVAL
        );
    }
}
