//! When a partition's unfinished offsets arrived, for the lag figures that
//! count work still owed rather than the distance to the log's end: the age of
//! the oldest unfinished offset (since the poll thread received it) and the
//! commit point's age (since its message's Kafka timestamp).
//!
//! Kept per partition as arrival marks, one per [`GRANULARITY`] of arrivals
//! at most rather than one per message: the poll thread takes the time once
//! per burst, and a mark costs a comparison per message and a push per
//! granule. A mark says "offsets from here on arrived at or after this
//! instant", so an age read from it is at most one granule over the truth,
//! never under.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Now, in milliseconds since the epoch (the clock Kafka timestamps use).
pub(crate) fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Finest spacing of two marks: ages are exact to this.
pub(crate) const GRANULARITY: Duration = Duration::from_millis(10);

/// Most marks kept per partition: 40 s of arrivals at full resolution past
/// the commit point (~100 KB). Past it no mark is added until the commit point
/// moves, so newer offsets read as older than they are (an upper bound still).
const MAX_MARKS: usize = 4096;

/// One mark: the first offset of a granule, when it arrived, and its
/// message's Kafka timestamp (ms since the epoch), if it had one.
#[derive(Debug, Clone, Copy)]
struct Mark {
    offset: i64,
    at: Instant,
    timestamp: Option<i64>,
}

/// A partition's arrival marks, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Arrivals {
    marks: VecDeque<Mark>,
}

impl Arrivals {
    /// Notes that `offset` arrived at `now` (the burst's time).
    pub(crate) fn arrived(&mut self, offset: i64, now: Instant, timestamp: Option<i64>) {
        let due = self
            .marks
            .back()
            .is_none_or(|m| now.saturating_duration_since(m.at) >= GRANULARITY);
        if due && self.marks.len() < MAX_MARKS {
            self.marks.push_back(Mark {
                offset,
                at: now,
                timestamp,
            });
        }
    }

    /// Drops the marks no offset at or past `point` needs (all but the last
    /// one at or below it), then returns how long ago `point` arrived and its
    /// granule's Kafka timestamp; `None` when no mark covers it.
    pub(crate) fn at(&mut self, point: i64, now: Instant) -> Option<(Duration, Option<i64>)> {
        while self.marks.get(1).is_some_and(|m| m.offset <= point) {
            self.marks.pop_front();
        }
        let m = self.marks.front().filter(|m| m.offset <= point)?;
        Some((now.saturating_duration_since(m.at), m.timestamp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_age_is_never_under_the_truth_and_marks_are_dropped_behind_the_point() {
        let t0 = Instant::now();
        let mut a = Arrivals::default();
        // Offsets 0..100 in bursts 5 ms apart: a mark every other burst.
        for burst in 0..10u32 {
            let at = t0 + Duration::from_millis(5) * burst;
            for o in 0..10 {
                a.arrived(
                    i64::from(burst) * 10 + o,
                    at,
                    Some(1_000 + i64::from(burst)),
                );
            }
        }
        assert_eq!(a.marks.len(), 5);
        let now = t0 + Duration::from_secs(1);
        // Offset 35 arrived with burst 3 (15 ms); its mark is burst 2's (10 ms).
        let (age, ts) = a.at(35, now).unwrap();
        assert!(age >= now - (t0 + Duration::from_millis(15)));
        assert!(age <= now - (t0 + Duration::from_millis(15)) + GRANULARITY);
        assert_eq!(ts, Some(1_002));
        assert_eq!(a.marks.front().unwrap().offset, 20, "marks behind dropped");
        assert!(
            a.at(-1, now).is_none(),
            "nothing arrived before the first mark"
        );
    }

    #[test]
    fn marks_stop_at_the_cap_and_resume_once_the_point_moves() {
        let t0 = Instant::now();
        let mut a = Arrivals::default();
        for i in 0..(MAX_MARKS as i64 + 10) {
            a.arrived(i, t0 + GRANULARITY * u32::try_from(i).unwrap(), None);
        }
        assert_eq!(a.marks.len(), MAX_MARKS);
        let late = t0 + GRANULARITY * 10_000;
        // The newest offsets read as arrived at the last mark: older, not younger.
        let (age, _) = a.at(MAX_MARKS as i64 + 5, late).unwrap();
        assert!(age >= late - (t0 + GRANULARITY * (MAX_MARKS as u32 + 5)));
        assert_eq!(a.marks.len(), 1);
        a.arrived(MAX_MARKS as i64 + 20, late, None);
        assert_eq!(a.marks.len(), 2);
    }
}
