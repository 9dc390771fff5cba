//! The loop itself ([`PollLoop`]): poll, route, and between polls apply
//! completions, decide whether to poll ([`Flow`]), watch and commit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Acquire};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::rebalance::Context;
use super::route::{poll_burst, route};
use super::state::PartKey;
use crate::source::{Completion, SourceError, SourceOptions};

/// Over budget with no completion for this long, the handlers are taken to be
/// stalled and the partitions are paused (see [`SourceOptions::pause_after`]).
const STALL: Duration = Duration::from_millis(100);

/// Longest wait for a completion while jobs run and Kafka has nothing new: a
/// released lane's next batch starts as soon as the release arrives, and new
/// messages wait at most this long.
const COMPLETION_WAIT: Duration = Duration::from_millis(1);

/// The poll thread's own state between iterations.
pub(super) struct PollLoop {
    pub(super) consumer: BaseConsumer<Context>,
    pub(super) options: SourceOptions,
    stop: Arc<AtomicBool>,
    completions: Receiver<Completion>,
    topic_names: HashMap<String, Arc<str>, crate::dispatch::TrustedState>,
    last_commit: Instant,
    pub(super) to_pause: Vec<PartKey>,
    /// Partitions to pause, with the offset to read again from (a delay
    /// topic's message not due, a message over the budget).
    pub(super) to_rewind: Vec<(PartKey, i64)>,
    /// Since when the buffers are over budget (polling stopped).
    throttled: Option<Instant>,
    last_watch: Instant,
    watch_every: Duration,
}

/// What the loop does next.
struct Flow {
    /// Jobs are running: wait for their releases rather than in `poll`.
    busy: bool,
    /// Whether to poll Kafka now.
    poll: bool,
    /// Longest wait in `poll`: none while jobs run, until the next token
    /// while lanes wait for one, else the poll interval.
    wait: Duration,
}

impl PollLoop {
    pub(super) fn new(
        consumer: BaseConsumer<Context>,
        options: SourceOptions,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let completions = consumer
            .context()
            .state
            .lock()
            .map(|s| s.completions.clone())
            .unwrap_or_else(|p| p.into_inner().completions.clone());
        let watch_every = crate::source::stall::check_interval(options.stall_timeout);
        PollLoop {
            consumer,
            options,
            stop,
            completions,
            topic_names: HashMap::default(),
            last_commit: Instant::now(),
            to_pause: Vec::new(),
            to_rewind: Vec::new(),
            throttled: None,
            last_watch: Instant::now(),
            watch_every,
        }
    }

    pub(super) fn run(mut self) -> Result<(), SourceError> {
        // A panic in the loop (a bug, or user code it calls) becomes a clean
        // stop: the shutdown below still drains and commits what finished.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.poll_until_stopped()))
            .unwrap_or_else(|panic| {
                let message = crate::source::panic_message(&*panic);
                tracing::error!(panic = %message, "Poll thread panicked; draining and committing what finished.");
                Err(SourceError::Panicked(message))
            });
        self.shutdown();
        result
    }

    fn poll_until_stopped(&mut self) -> Result<(), SourceError> {
        loop {
            if let Some(end) = self.should_stop() {
                break end;
            }
            // Completions, resumes and commits, between polls.
            let Some(Flow { busy, poll, wait }) = self.between_polls() else {
                break Ok(());
            };
            if !poll {
                self.wait_for_completion();
                continue;
            }
            let burst = poll_burst(&self.consumer, wait);
            if burst.is_empty() {
                if busy {
                    self.wait_for_completion();
                }
                continue;
            }
            let routed = route(
                &self.consumer,
                &self.options,
                &mut self.topic_names,
                &mut self.to_pause,
                &mut self.to_rewind,
                burst,
            );
            if !routed {
                break Ok(());
            }
            self.pause_marked();
            self.rewind_marked();
        }
    }

    /// `Some(result)` when the loop must end: asked to stop, a fatal client
    /// error, or the executor gone.
    fn should_stop(&self) -> Option<Result<(), SourceError>> {
        let ctx = self.consumer.context();
        if self.stop.load(Acquire) {
            return Some(Ok(()));
        }
        if let Some(err) = ctx.fatal.lock().ok().and_then(|mut f| f.take()) {
            return Some(Err(err));
        }
        if ctx.state.lock().map_or(true, |s| s.executor_gone) {
            return Some(Err(SourceError::WorkerStopped));
        }
        None
    }

    /// Applies completions, resumes what may resume, commits on schedule,
    /// and decides whether to poll. Returns whether jobs are running (`None`:
    /// the state is poisoned).
    fn between_polls(&mut self) -> Option<Flow> {
        let ctx = self.consumer.context();
        let mut st = ctx.state.lock().ok()?;
        st.drain_completions();
        if st.sched.waiting_for_tokens() {
            let st = &mut *st;
            st.sched.refill(&mut st.ready);
            st.run_ready();
        }
        let o = &self.options;
        let (bytes, n) = (st.sched.buffered_bytes(), st.sched.buffered());
        if bytes > o.buffer_budget || n > o.max_buffered {
            self.throttled.get_or_insert_with(Instant::now);
        } else if bytes <= o.buffer_budget / 2 && n <= o.max_buffered / 2 {
            self.throttled = None;
        }
        if st.paused > 0 {
            self.resume_ready(&mut st);
        }
        if st.delayed > 0 {
            self.resume_due(&mut st);
        }
        // Over budget: stop polling (librdkafka keeps its own prefetch, within
        // its own limits) while the handlers drain the buffers. When they stall
        // (no completion for `STALL`) or the drain takes longer than
        // `pause_after`, pause the partitions over their share of the budget, so
        // that the others, and rebalances, go on: one partition whose handler
        // never returns holds its own share, never everyone's.
        let poll = match self.throttled {
            None => true,
            Some(since)
                if since.elapsed() >= o.pause_after || st.last_progress.elapsed() >= STALL =>
            {
                self.pause_over_share(&mut st);
                true
            }
            Some(_) => false,
        };
        if self.last_watch.elapsed() >= self.watch_every {
            self.last_watch = Instant::now();
            st.watch_partitions(o.stall_timeout);
        }
        if self.last_commit.elapsed() >= self.options.commit_interval {
            self.last_commit = Instant::now();
            let failed = ctx
                .failed_commits
                .lock()
                .map(|mut f| std::mem::take(&mut *f))
                .unwrap_or_default();
            for key in &failed {
                st.forget_committed_part(key);
            }
            self.commit_async(&mut st);
        }
        st.publish_gauges();
        let busy = st.sched.in_flight() > 0;
        let wait = match st.sched.next_token() {
            _ if busy => Duration::ZERO,
            Some(token) => token.clamp(COMPLETION_WAIT, self.options.poll_interval),
            None => self.options.poll_interval,
        };
        Some(Flow { busy, poll, wait })
    }

    /// Nothing new from Kafka while jobs run: wait for the next release (or
    /// finish) and apply it, so a lane's next batch starts at once.
    fn wait_for_completion(&self) {
        if let Ok(c) = self.completions.recv_timeout(COMPLETION_WAIT) {
            if let Ok(mut st) = self.consumer.context().state.lock() {
                st.apply_received(Some(c));
            }
        }
    }
}
