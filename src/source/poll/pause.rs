//! Flow control: pausing partitions over their share of the buffers or their
//! tracking limit, and resuming them once drained; pausing a delay topic's
//! partition until its next message is due.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use super::run::PollLoop;
use super::state::State;
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
            if p.paused && low && p.tracker.tracked() < o.max_tracked && p.delayed.is_none() {
                p.paused = false;
                *paused -= 1;
                tpl.add_partition(topic, *partition);
            }
        }
        // One call for all: each call is a round trip to librdkafka's threads.
        if tpl.count() > 0 {
            match self.consumer.resume(&tpl) {
                Ok(()) => {
                    stats.resumes.fetch_add(tpl.count() as u64, Relaxed);
                }
                Err(e) => tracing::warn!(error = %e, "Resume failed."),
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
    /// Pauses the delay-topic partitions whose next message is not due and
    /// moves each back to that message, so it is read again once resumed
    /// (nothing of it is kept meanwhile: no memory, no polling).
    pub(super) fn delay_marked(&mut self) {
        if self.to_delay.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), _) in &self.to_delay {
            tpl.add_partition(topic, *partition);
        }
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::warn!(error = %e, "Pause of delay-topic partitions failed.");
        }
        for ((topic, partition), offset) in self.to_delay.drain(..) {
            // Asynchronous (no wait): messages fetched before it are dropped
            // by librdkafka, not delivered.
            if let Err(e) =
                self.consumer
                    .seek(&topic, partition, Offset::Offset(offset), Duration::ZERO)
            {
                tracing::warn!(topic = &*topic, partition, offset, error = %e, "Seek back to a delayed message failed.");
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
            if let Err(e) = self.consumer.resume(&tpl) {
                tracing::warn!(error = %e, "Resume of delay-topic partitions failed.");
            }
        }
    }
}

/// Each assigned partition's share of the buffer budget: bytes and events.
fn share(o: &SourceOptions, partitions: usize) -> (usize, usize) {
    let n = partitions.max(1);
    ((o.buffer_budget / n).max(1), (o.max_buffered / n).max(1))
}
