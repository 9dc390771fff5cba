//! The offset tracker: per partition, which dispatched offsets have finished, and
//! so how far it is safe to commit.
//!
//! Work finishes in any order; the commit point is the first dispatched offset not
//! yet finished (or one past the last dispatched when all have). Kafka's committed
//! offset means "the next one to read", so committing the commit point replays
//! exactly the unfinished work after a crash or a rebalance, and skips nothing.
//!
//! ```
//! use xzepr_consumer::offsets::PartitionTracker;
//!
//! let mut t = PartitionTracker::new();
//! for offset in [10, 11, 12, 14] {      // 13 was compacted away: gaps are fine
//!     t.dispatched(offset).unwrap();
//! }
//! t.finished(11);
//! t.finished(14);
//! assert_eq!(t.commit_point(), Some(10));  // 10 is still running
//! t.finished(10);
//! assert_eq!(t.commit_point(), Some(12));  // 12 is still running
//! t.finished(12);
//! assert_eq!(t.commit_point(), Some(15));  // all done: resume after the last
//! ```
//!
//! [`progress`] encodes the offsets finished above the commit point into the
//! commit's metadata, so a restart or the next owner skips them.

pub mod admin;

// The completion map's encoding is public only for the fuzz targets and tests.
#[cfg(feature = "unstable-fuzzing")]
pub mod progress;
#[cfg(not(feature = "unstable-fuzzing"))]
#[allow(unreachable_pub, dead_code)] // the fuzz build's API, partly unused by the crate
pub(crate) mod progress;

use std::collections::VecDeque;

/// Offset tracker errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Offsets must be dispatched in increasing order (Kafka delivers them so).
    #[error("offset {offset} dispatched after {last}: offsets must increase")]
    NotIncreasing {
        /// The offending offset.
        offset: i64,
        /// The last offset dispatched before it.
        last: i64,
    },
}

/// One partition's in-flight offsets, in dispatch order.
///
/// Memory is one entry per offset from the commit point on: the in-flight ones
/// (bounded by the queue and worker limits) and the finished ones behind an
/// unfinished one (bounded by the source's `max_tracked` per partition, past
/// which the partition is paused); `dispatched` and the front-popping in `finished` are O(1), and
/// finding a finished offset is O(1) while offsets are contiguous, O(log n) past
/// a gap.
#[derive(Debug, Clone, Default)]
pub struct PartitionTracker {
    /// `(offset, state)` for every dispatched offset from the commit point on.
    pending: VecDeque<(i64, u8)>,
    /// One past the last offset dispatched, once any has been.
    next: Option<i64>,
    /// How many entries in `pending` are finished (so `in_flight` is O(1)).
    done: usize,
    /// How many entries in `pending` are held: never to finish in this
    /// assignment, but not in flight either (drains do not wait for them).
    held: usize,
}

/// `pending` entry states.
const PENDING: u8 = 0;
const HELD: u8 = 1;
const DONE: u8 = 2;

impl PartitionTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was handed to a worker.
    ///
    /// # Errors
    /// [`Error::NotIncreasing`] if `offset` is not above every offset dispatched before.
    pub fn dispatched(&mut self, offset: i64) -> Result<(), Error> {
        if let Some(next) = self.next {
            if offset < next {
                return Err(Error::NotIncreasing {
                    offset,
                    last: next - 1,
                });
            }
        }
        self.pending.push_back((offset, PENDING));
        self.next = Some(offset + 1);
        Ok(())
    }

    /// Records that `offset` finished. Returns `false` (and changes nothing) for
    /// an offset that is not in flight: never dispatched, already finished, or
    /// from before a reset.
    pub fn finished(&mut self, offset: i64) -> bool {
        let Some(idx) = self.index(offset) else {
            return false;
        };
        let entry = &mut self.pending[idx];
        if entry.1 != PENDING {
            return false;
        }
        entry.1 = DONE;
        self.done += 1;
        while let Some(&(_, DONE)) = self.pending.front() {
            self.pending.pop_front();
            self.done -= 1;
        }
        true
    }

    /// Records that `offset` will not finish in this assignment (its work is
    /// held: a message kept by policy, a report that failed for good). The commit
    /// point stays at or before it, but it no longer counts as in flight, so a
    /// revoke or shutdown does not wait for it. Returns `false` (and changes
    /// nothing) for an offset that is not in flight.
    pub fn hold(&mut self, offset: i64) -> bool {
        let Some(idx) = self.index(offset) else {
            return false;
        };
        let entry = &mut self.pending[idx];
        if entry.1 != PENDING {
            return false;
        }
        entry.1 = HELD;
        self.held += 1;
        true
    }

    fn index(&self, offset: i64) -> Option<usize> {
        let &(front, _) = self.pending.front()?;
        // Contiguous offsets (the common case) index directly.
        let guess = usize::try_from(offset.wrapping_sub(front)).ok();
        match guess.and_then(|i| self.pending.get(i).map(|e| (i, e.0))) {
            Some((i, o)) if o == offset => Some(i),
            _ => self.pending.binary_search_by_key(&offset, |e| e.0).ok(),
        }
    }

    /// The offset to commit: the first dispatched offset not yet finished, or one
    /// past the last dispatched when all have finished; `None` before any dispatch.
    pub fn commit_point(&self) -> Option<i64> {
        match self.pending.front() {
            Some(&(offset, _)) => Some(offset),
            None => self.next,
        }
    }

    /// The finished offsets above the commit point (waiting behind an
    /// unfinished one), in order: what [`progress::encode`] puts in the commit.
    pub fn finished_above(&self) -> impl Iterator<Item = i64> + '_ {
        self.pending.iter().filter(|e| e.1 == DONE).map(|e| e.0)
    }

    /// How many offsets [`PartitionTracker::finished_above`] yields (O(1)).
    pub fn finished_count(&self) -> usize {
        self.done
    }

    /// One past the last offset dispatched; `None` before any dispatch.
    pub fn next_offset(&self) -> Option<i64> {
        self.next
    }

    /// How many dispatched offsets have not finished.
    pub fn in_flight(&self) -> usize {
        self.pending.len() - self.done - self.held
    }

    /// How many dispatched offsets are held (see [`PartitionTracker::hold`]).
    pub fn held(&self) -> usize {
        self.held
    }

    /// How many offsets are held in memory (in flight, plus finished ones waiting
    /// behind an unfinished one).
    pub fn tracked(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn poison_offset_holds_the_commit_point() {
        let mut t = PartitionTracker::new();
        for o in 0..100 {
            t.dispatched(o).unwrap();
        }
        for o in (0..100).filter(|&o| o != 42) {
            assert!(t.finished(o));
        }
        assert_eq!(t.commit_point(), Some(42));
        assert_eq!(t.in_flight(), 1);
        assert!(t.finished_above().eq(43..100));
        assert_eq!(t.finished_count(), 57);
        assert!(t.finished(42));
        assert_eq!(t.commit_point(), Some(100));
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn a_held_offset_keeps_the_commit_point_but_is_not_in_flight() {
        let mut t = PartitionTracker::new();
        for o in 0..10 {
            t.dispatched(o).unwrap();
        }
        assert!(t.hold(3));
        assert!(!t.hold(3));
        for o in (0..10).filter(|&o| o != 3) {
            assert!(t.finished(o));
        }
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.commit_point(), Some(3));
        assert_eq!(t.tracked(), 7);
        assert!(!t.finished(3), "held is not finished later");
    }

    #[test]
    fn rejects_decreasing_and_ignores_unknown() {
        let mut t = PartitionTracker::new();
        assert_eq!(t.commit_point(), None);
        t.dispatched(5).unwrap();
        assert_eq!(
            t.dispatched(5),
            Err(Error::NotIncreasing { offset: 5, last: 5 })
        );
        assert!(!t.finished(4));
        assert!(!t.finished(6));
        assert!(t.finished(5));
        assert!(!t.finished(5));
        assert_eq!(t.commit_point(), Some(6));
    }

    proptest! {
        /// Under any completion order and any gaps, the commit point never passes an
        /// unfinished offset, and reaches one past the last when all finish.
        #[test]
        fn never_commits_past_unfinished(
            gaps in proptest::collection::vec(1i64..4, 1..300),
            order_seed in any::<u64>(),
        ) {
            let mut offsets = Vec::with_capacity(gaps.len());
            let mut o = 1000;
            for g in gaps {
                o += g;
                offsets.push(o);
            }
            let mut t = PartitionTracker::new();
            for &o in &offsets {
                t.dispatched(o).unwrap();
            }
            // A deterministic shuffle from the seed.
            let mut order = offsets.clone();
            let mut s = order_seed | 1;
            for i in (1..order.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                order.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let mut finished = std::collections::BTreeSet::new();
            for &o in &order {
                prop_assert!(t.finished(o));
                finished.insert(o);
                let point = t.commit_point().unwrap();
                // Every offset below the point is finished ...
                for &d in offsets.iter().take_while(|&&d| d < point) {
                    prop_assert!(finished.contains(&d));
                }
                // ... and the point itself is unfinished, or past the end.
                prop_assert!(!finished.contains(&point));
                prop_assert_eq!(t.in_flight(), offsets.len() - finished.len());
            }
            prop_assert_eq!(t.commit_point(), Some(offsets[offsets.len() - 1] + 1));
            prop_assert_eq!(t.tracked(), 0);
        }
    }
}
