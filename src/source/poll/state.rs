//! What the poll thread and the rebalance callbacks share ([`State`]), each
//! assigned partition's [`Part`], and the steps that apply completions and hand
//! ready jobs over.

use std::collections::HashMap;
use std::sync::atomic::Ordering::{Relaxed, Release};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::maps::Skip;
use crate::dispatch::lanes::{Job, Scheduler};
use crate::offsets::PartitionTracker;
use crate::source::{Batch, Completion, Executor, Message, PartShared, SourceStats};

/// One assigned partition, as the poll thread sees it.
pub(super) struct Part {
    pub(super) tracker: PartitionTracker,
    /// Unique per assignment; also the partition's id in the scheduler.
    pub(super) epoch: u64,
    pub(super) shared: Arc<PartShared>,
    pub(super) paused: bool,
    pub(super) committed: Option<i64>,
    /// `tracker.finished_count()` when `committed` was sent: the map changed
    /// since when it differs.
    pub(super) committed_done: usize,
    /// Offsets a previous owner's completion map says finished, not yet reached.
    pub(super) skip: Option<Skip>,
    /// How long its commit point has stood still.
    pub(super) watch: crate::source::stall::StallWatch,
    /// When its unfinished offsets arrived.
    pub(super) arrivals: crate::source::age::Arrivals,
    /// A delay topic's partition: its messages run only once due.
    pub(super) delay: bool,
    /// Paused until then: its next message is not due. It is read again from
    /// that message's offset once resumed.
    pub(super) delayed: Option<Instant>,
    /// Paused because its next message did not fit in the buffer budget (and
    /// sought back to it): resumed once all the buffers are half empty.
    pub(super) held_back: bool,
    /// The offset it reads next: after the last message taken from it, or the
    /// one it was sought back to. A resume seeks it there (see
    /// `PollLoop::resume_ready`).
    pub(super) next: Option<i64>,
}

pub(super) type PartKey = (Arc<str>, i32);
pub(super) type PartMap = HashMap<PartKey, Part, crate::dispatch::TrustedState>;

/// What the poll thread and the rebalance callbacks share.
pub(super) struct State {
    pub(super) parts: PartMap,
    pub(super) sched: Scheduler<Message>,
    /// `None` once the source is stopping: jobs made ready then are dropped
    /// (their messages held).
    pub(super) executor: Option<Box<dyn Executor>>,
    pub(super) executor_gone: bool,
    /// Jobs the scheduler made ready, handed over by [`State::run_ready`].
    pub(super) ready: Vec<Job<Message>>,
    pub(super) completions: Receiver<Completion>,
    /// Cloned into each partition's shared state and each batch.
    pub(super) done: Sender<Completion>,
    pub(super) epochs: u64,
    pub(super) stats: Arc<SourceStats>,
    pub(super) committed: crate::source::Committed,
    /// When a completion last came back (the handlers are making progress).
    pub(super) last_progress: Instant,
    /// Message buffers given back by finished messages, reused by the copy.
    pub(super) recycle: Arc<crate::source::Recycler>,
    /// The completion map's byte cap, when commits carry one.
    pub(super) map_cap: Option<usize>,
    /// Partitions paused now (their share of the buffers, or their tracking
    /// limit), so the resume check costs nothing while none is.
    pub(super) paused: usize,
    /// Where [`State::watch_partitions`] publishes what it saw.
    pub(super) states: Arc<Mutex<Vec<crate::source::PartitionState>>>,
    pub(super) stall_timeout: Option<Duration>,
    /// The subscribed delay topics (see [`Part::delay`]).
    pub(super) delay_topics: Vec<String>,
    /// Partitions paused now until their next message is due.
    pub(super) delayed: usize,
}

impl State {
    fn apply(&mut self, c: Completion) {
        match c {
            Completion::Offset {
                topic,
                partition,
                offset,
                epoch,
                held,
            } => {
                if let Some(p) = self.parts.get_mut(&(topic, partition)) {
                    if p.epoch == epoch {
                        if held {
                            p.tracker.hold(offset);
                        } else {
                            p.tracker.finished(offset);
                        }
                    }
                }
            }
            Completion::Release(lane, items) => {
                self.sched.release(lane, &mut self.ready);
                self.sched.recycle(items);
            }
            Completion::Many(all) => {
                for c in all {
                    self.apply(c);
                }
            }
        }
    }

    /// Applies every completion waiting, then hands over what they made ready.
    pub(super) fn drain_completions(&mut self) {
        self.apply_received(None);
    }

    /// Applies `first` (one already received) and every completion waiting,
    /// notes the progress once, then hands over what they made ready.
    pub(super) fn apply_received(&mut self, first: Option<Completion>) {
        let mut any = first.is_some();
        if let Some(c) = first {
            self.apply(c);
        }
        while let Ok(c) = self.completions.try_recv() {
            self.apply(c);
            any = true;
        }
        if any {
            self.last_progress = Instant::now();
        }
        self.run_ready();
    }

    /// Hands the ready jobs to the executor.
    pub(super) fn run_ready(&mut self) {
        for job in self.ready.drain(..) {
            let n = job.items.len() as u64;
            let batch = Batch {
                items: job.items.into(),
                lane: job.lane,
                done: self.done.clone(),
            };
            let Some(executor) = &self.executor else {
                continue;
            };
            match executor.execute(batch) {
                Ok(()) => {
                    self.stats.dispatched.fetch_add(n, Relaxed);
                    self.stats.jobs.fetch_add(1, Relaxed);
                }
                // Dropped: its messages are held, so the commit point cannot pass them.
                Err(_) => self.executor_gone = true,
            }
        }
    }

    /// Applies completions until no partition picked by `relevant` has work in
    /// flight, or `deadline` passes (waiting on the channel, not sleeping).
    pub(super) fn drain_in_flight(
        &mut self,
        deadline: Instant,
        relevant: impl Fn(&PartKey) -> bool,
    ) {
        loop {
            self.drain_completions();
            let busy = self
                .parts
                .iter()
                .any(|(key, p)| relevant(key) && p.tracker.in_flight() > 0);
            if !busy || Instant::now() >= deadline {
                return;
            }
            if let Ok(c) = self.completions.recv_timeout(Duration::from_millis(5)) {
                self.apply(c);
            }
        }
    }

    /// Takes the waiting messages of the partitions picked by `relevant` out of
    /// their lanes; dropped, they are held (never started here).
    pub(super) fn drop_waiting(&mut self, relevant: impl Fn(&PartKey) -> bool) {
        let epochs: Vec<u64> = self
            .parts
            .iter()
            .filter(|(k, _)| relevant(k))
            .map(|(_, p)| p.epoch)
            .collect();
        for epoch in epochs {
            drop(self.sched.take_waiting(epoch));
        }
    }

    /// Notes each partition's commit point, flags the stalled ones, and
    /// publishes what it saw for health and metrics.
    pub(super) fn watch_partitions(&mut self, timeout: Option<Duration>) {
        let now = Instant::now();
        let wall_ms = crate::source::age::wall_ms();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let mut states: Vec<crate::source::PartitionState> = self
            .parts
            .iter_mut()
            .map(|((topic, partition), p)| {
                let point = p.tracker.commit_point();
                let unfinished = p.tracker.in_flight() + p.tracker.held();
                let (still, stalled) =
                    p.watch
                        .observe((topic, *partition), point, unfinished > 0, timeout, now);
                // Read (and pruned) at every look, so marks never pile up
                // while nothing is owed; with work unfinished the commit point
                // is its oldest offset.
                let arrived = point.and_then(|o| p.arrivals.at(o, now));
                let (oldest_unfinished_ms, commit_point_age_ms) = match arrived {
                    _ if unfinished == 0 => (0, Some(0)),
                    Some((age, ts)) => (
                        ms(age),
                        ts.map(|t| u64::try_from(wall_ms.saturating_sub(t)).unwrap_or(0)),
                    ),
                    None => (0, None),
                };
                crate::source::PartitionState {
                    topic: topic.to_string(),
                    partition: *partition,
                    commit_point: point,
                    unfinished,
                    held: p.tracker.held(),
                    stalled_for_ms: ms(still),
                    oldest_unfinished_ms,
                    commit_point_age_ms,
                    stalled,
                    paused: p.paused || p.delayed.is_some(),
                    due_in_ms: p.delayed.map(|due| ms(due.saturating_duration_since(now))),
                }
            })
            .collect();
        states.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        if let Ok(mut s) = self.states.lock() {
            *s = states;
        }
    }

    pub(super) fn publish_gauges(&self) {
        let s = &self.stats;
        s.in_flight.store(self.sched.in_flight() as u64, Relaxed);
        s.peak_in_flight
            .store(self.sched.peak_in_flight() as u64, Relaxed);
        s.buffered_bytes
            .store(self.sched.buffered_bytes() as u64, Relaxed);
        s.peak_buffered_bytes
            .store(self.sched.peak_buffered_bytes() as u64, Relaxed);
        s.lanes.store(self.sched.lanes() as u64, Relaxed);
        s.buffered.store(self.sched.buffered() as u64, Relaxed);
        s.rate_tokens_granted
            .store(self.sched.tokens_granted(), Relaxed);
    }
}

/// A partition leaves this consumer: what it handed over is stale, and its
/// async handlers still running past the drain are cancelled (their offsets
/// stay unfinished; the next owner replays them).
pub(super) fn retire(p: &Part) {
    p.shared.current.fetch_add(1, Release);
    p.shared.cancel.cancel();
}
