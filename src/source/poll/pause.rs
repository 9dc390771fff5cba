//! Flow control: pausing partitions over their share of the buffers or their
//! tracking limit, and resuming them once drained.

use std::sync::atomic::Ordering::Relaxed;

use rdkafka::consumer::Consumer;
use rdkafka::TopicPartitionList;

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
            if p.paused && low && p.tracker.tracked() < o.max_tracked {
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

/// Each assigned partition's share of the buffer budget: bytes and events.
fn share(o: &SourceOptions, partitions: usize) -> (usize, usize) {
    let n = partitions.max(1);
    ((o.buffer_budget / n).max(1), (o.max_buffered / n).max(1))
}
