//! Flow control: pausing partitions over their share of the buffers or their
//! tracking limit, and resuming them once drained; pausing a delay topic's
//! partition until its next message is due.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use super::run::PollLoop;
use super::state::{PartMap, State};
use crate::dispatch::lanes::Scheduler;
use crate::source::Message;

/// The poll thread's lane scheduler.
type Sched = Scheduler<Message>;
use crate::source::SourceOptions;

impl PollLoop {
    /// Pauses the partitions holding more than their share of the buffers.
    /// The shares add up to the budget, so while the buffers are over it at
    /// least one partition is over its share.
    pub(super) fn pause_over_share(&self, st: &mut State) {
        let (share_bytes, share_n) = share(&self.options, st.parts.len());
        let State {
            parts,
            sched,
            paused,
            stats,
            ..
        } = st;
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), p) in parts.iter_mut() {
            if !p.paused
                && (sched.part_buffered_bytes(p.epoch) > share_bytes
                    || sched.part_buffered(p.epoch) > share_n)
            {
                p.paused = true;
                *paused += 1;
                tpl.add_partition(topic, *partition);
            }
        }
        if tpl.count() > 0 && self.consumer.pause(&tpl).is_ok() {
            stats.pauses.fetch_add(tpl.count() as u64, Relaxed);
        }
    }

    /// Resumes the paused partitions that are under their tracking limit and
    /// whose buffers drained: to half their share, or all the buffers to half
    /// the budget.
    pub(super) fn resume_ready(&self, st: &mut State) {
        let o = &self.options;
        let (share_bytes, share_n) = share(o, st.parts.len());
        let all_low = st.sched.buffered_bytes() <= o.buffer_budget / 2
            && st.sched.buffered() <= o.max_buffered / 2;
        let State {
            parts,
            sched,
            paused,
            stats,
            ..
        } = st;
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), p) in parts.iter_mut() {
            let low = all_low
                || (sched.part_buffered_bytes(p.epoch) <= share_bytes / 2
                    && sched.part_buffered(p.epoch) <= share_n / 2);
            // A delay topic's partition waiting for its next message stays
            // paused until due (`resume_due`).
            // One held back over the budget waits for all the buffers to drain
            // to half, or its own to a quarter of its share (the half that is
            // its own, half drained), or it would be read, refused and sought
            // back again at once.
            let own_low = sched.part_buffered_bytes(p.epoch) <= share_bytes / 4
                && sched.part_buffered(p.epoch) <= share_n / 4;
            if p.paused
                && low
                && (all_low || own_low || !p.held_back)
                && p.tracker.tracked() < o.max_tracked
                && p.delayed.is_none()
            {
                p.paused = false;
                p.held_back = false;
                *paused -= 1;
                tpl.add_partition(topic, *partition);
            }
        }
        // One call for all: each call is a round trip to librdkafka's threads.
        if tpl.count() > 0 {
            match self.consumer.resume(&tpl) {
                Ok(()) => {
                    stats.resumes.fetch_add(tpl.count() as u64, Relaxed);
                    self.start_fetching(parts, &tpl);
                }
                Err(e) => tracing::warn!(error = %e, "Resume failed."),
            }
        }
    }

    /// Seeks each partition of `resumed` to the offset it reads next, which
    /// is where librdkafka resumes it anyway: a resume alone does not wake a
    /// broker's thread, and one whose partitions were all paused sleeps up to
    /// a second on its socket before it fetches again (measured: ~440 ms with
    /// nothing to take after each such pause, `examples/pause_gap.rs`). A
    /// seek restarts the partition's fetcher, which wakes it.
    fn start_fetching(&self, parts: &PartMap, resumed: &TopicPartitionList) {
        for e in resumed.elements() {
            let key = (Arc::<str>::from(e.topic()), e.partition());
            let Some(next) = parts.get(&key).and_then(|p| p.next) else {
                // Nothing taken from it yet: librdkafka starts it itself.
                continue;
            };
            // Asynchronous (no wait), as the seeks back are.
            if let Err(err) = self.consumer.seek(
                e.topic(),
                e.partition(),
                Offset::Offset(next),
                Duration::ZERO,
            ) {
                tracing::debug!(topic = e.topic(), partition = e.partition(), offset = next, error = %err, "Seek of a resumed partition failed; it resumes on its own.");
            }
        }
    }

    pub(super) fn pause_marked(&mut self) {
        if self.to_pause.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in self.to_pause.drain(..) {
            tpl.add_partition(&topic, partition);
        }
        // One call for all: each call is a round trip to librdkafka's threads.
        if self.consumer.pause(&tpl).is_ok() {
            let stats = &self.consumer.context().stats;
            stats.pauses.fetch_add(tpl.count() as u64, Relaxed);
        }
    }
}

impl PollLoop {
    /// Pauses the partitions whose next message is not due (delay topics) or
    /// did not fit in the budget, and moves each back to that message, so it
    /// is read again once resumed (nothing of it is kept meanwhile: no
    /// memory, no polling).
    pub(super) fn rewind_marked(&mut self) {
        if self.to_rewind.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), _) in &self.to_rewind {
            tpl.add_partition(topic, *partition);
        }
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::warn!(error = %e, "Pause of partitions to read again failed.");
        }
        for ((topic, partition), offset) in self.to_rewind.drain(..) {
            // Asynchronous (no wait): messages fetched before it are dropped
            // by librdkafka, not delivered.
            if let Err(e) =
                self.consumer
                    .seek(&topic, partition, Offset::Offset(offset), Duration::ZERO)
            {
                tracing::warn!(topic = &*topic, partition, offset, error = %e, "Seek back to a message to read again failed.");
            }
        }
    }

    /// Resumes the delay-topic partitions whose next message is due (those
    /// also paused over their share resume with them, in `resume_ready`).
    pub(super) fn resume_due(&self, st: &mut State) {
        let now = Instant::now();
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), p) in st.parts.iter_mut() {
            if p.delayed.is_some_and(|due| due <= now) {
                p.delayed = None;
                st.delayed -= 1;
                if !p.paused {
                    tpl.add_partition(topic, *partition);
                }
            }
        }
        if tpl.count() > 0 {
            match self.consumer.resume(&tpl) {
                Ok(()) => self.start_fetching(&st.parts, &tpl),
                Err(e) => tracing::warn!(error = %e, "Resume of delay-topic partitions failed."),
            }
        }
    }
}

/// Whether the buffers are so far under the budget that a message costing
/// `cost` fits whatever the partitions hold: under half of it (the other
/// half being the partitions' own shares, see [`fits`]).
#[inline]
pub(super) fn plenty(sched: &Sched, o: &SourceOptions, cost: usize) -> bool {
    sched.buffered_bytes() + cost <= o.buffer_budget / 2 && sched.buffered() < o.max_buffered / 2
}

/// Whether a message of partition `epoch` costing `cost` bytes may be
/// buffered. Half the budget is the partitions' own, split evenly (what one
/// has not used stays its own: a partition that never drains cannot starve
/// the others), the other half is shared. So the buffers never pass the
/// budget, but by one message of a partition holding nothing, taken whatever
/// its size so that no partition waits for ever.
pub(super) fn fits(
    sched: &Sched,
    parts: &PartMap,
    o: &SourceOptions,
    epoch: u64,
    cost: usize,
) -> bool {
    let (share_bytes, share_n) = share(o, parts.len());
    let (own_bytes, own_n) = (share_bytes / 2, (share_n / 2).max(1));
    let (pb, pn) = (sched.part_buffered_bytes(epoch), sched.part_buffered(epoch));
    if pn == 0 || (pb + cost <= own_bytes && pn < own_n) {
        return true;
    }
    // From the shared half: what the others' own halves have left stays theirs.
    let (mut kept_bytes, mut kept_n) = (0, 0);
    for q in parts.values().filter(|q| q.epoch != epoch) {
        kept_bytes += own_bytes.saturating_sub(sched.part_buffered_bytes(q.epoch));
        kept_n += own_n.saturating_sub(sched.part_buffered(q.epoch));
    }
    sched.buffered_bytes() + cost + kept_bytes <= o.buffer_budget
        && sched.buffered() + 1 + kept_n <= o.max_buffered
}

/// Each assigned partition's share of the buffer budget: bytes and events.
fn share(o: &SourceOptions, partitions: usize) -> (usize, usize) {
    let n = partitions.max(1);
    ((o.buffer_budget / n).max(1), (o.max_buffered / n).max(1))
}
