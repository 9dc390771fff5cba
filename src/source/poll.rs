//! The poll thread: its loop in named steps, and the rebalance callbacks that
//! share its state.

use std::collections::HashMap;
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::{
    Batch, Completion, Executor, Message, PartShared, SourceError, SourceHandle, SourceOptions,
    SourceStats,
};
use crate::config::KafkaConsumerConfig;
use crate::dispatch::lanes::{Job, Scheduler};
use crate::offsets::{progress, PartitionTracker};

/// Called on the poll thread around rebalances (the handler's `on_assign` and
/// `on_revoke`).
pub(crate) trait RebalanceHooks: Send + Sync + 'static {
    /// After partitions were assigned.
    fn assigned(&self, partitions: &[(String, i32)]);
    /// Before partitions are revoked, after their running work drained (or the
    /// drain deadline passed) and their commit point was committed.
    fn revoked(&self, partitions: &[(String, i32)]);
}

/// Most messages taken from librdkafka per lock of the shared state.
const BURST: usize = 64;

/// Over budget with no completion for this long, the handlers are taken to be
/// stalled and the partitions are paused (see [`SourceOptions::pause_after`]).
const STALL: Duration = Duration::from_millis(100);

/// Longest wait for a completion while jobs run and Kafka has nothing new: a
/// released lane's next batch starts as soon as the release arrives, and new
/// messages wait at most this long.
const COMPLETION_WAIT: Duration = Duration::from_millis(1);

/// Longest wait for the committed offsets and their completion maps when
/// partitions are assigned (the poll thread waits; heartbeats go on in
/// librdkafka's threads). The coordinator answers in milliseconds; past this,
/// the maps are ignored and their offsets replayed.
const COMMITTED_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// One assigned partition, as the poll thread sees it.
struct Part {
    tracker: PartitionTracker,
    /// Unique per assignment; also the partition's id in the scheduler.
    epoch: u64,
    shared: Arc<PartShared>,
    paused: bool,
    committed: Option<i64>,
    /// `tracker.finished_count()` when `committed` was sent: the map changed
    /// since when it differs.
    committed_done: usize,
    /// Offsets a previous owner's completion map says finished, not yet reached.
    skip: Option<Skip>,
    /// How long its commit point has stood still.
    watch: super::stall::StallWatch,
}

/// The completion map read on assignment, consumed as offsets arrive.
struct Skip {
    /// The committed offset the map was written for.
    base: i64,
    ranges: std::collections::VecDeque<std::ops::Range<i64>>,
    started: bool,
}

impl Skip {
    /// Whether `offset` (arriving in increasing order) finished before.
    fn take(&mut self, offset: i64) -> bool {
        if !self.started {
            self.started = true;
            // Reading from before the map's commit point (an offset reset, a
            // recreated topic): the map is about other messages.
            if offset < self.base {
                tracing::warn!(
                    offset,
                    base = self.base,
                    "Completion map ignored: reading before its commit point."
                );
                self.ranges.clear();
            }
        }
        while self.ranges.front().is_some_and(|r| r.end <= offset) {
            self.ranges.pop_front();
        }
        self.ranges.front().is_some_and(|r| r.start <= offset)
    }
}

type PartKey = (Arc<str>, i32);
type PartMap = HashMap<PartKey, Part, crate::dispatch::TrustedState>;

/// What the poll thread and the rebalance callbacks share.
struct State {
    parts: PartMap,
    sched: Scheduler<Message>,
    /// `None` once the source is stopping: jobs made ready then are dropped
    /// (their messages held).
    executor: Option<Box<dyn Executor>>,
    executor_gone: bool,
    /// Jobs the scheduler made ready, handed over by [`State::run_ready`].
    ready: Vec<Job<Message>>,
    completions: Receiver<Completion>,
    /// Cloned into each partition's shared state and each batch.
    done: Sender<Completion>,
    epochs: u64,
    stats: Arc<SourceStats>,
    committed: super::Committed,
    /// When a completion last came back (the handlers are making progress).
    last_progress: Instant,
    /// Message buffers given back by finished messages, reused by the copy.
    recycle: Arc<super::Recycler>,
    /// The completion map's byte cap, when commits carry one.
    map_cap: Option<usize>,
    /// Partitions paused now (their share of the buffers, or their tracking
    /// limit), so the resume check costs nothing while none is.
    paused: usize,
    /// Where [`State::watch_partitions`] publishes what it saw.
    states: Arc<Mutex<Vec<super::PartitionState>>>,
    stall_timeout: Option<Duration>,
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
    fn drain_completions(&mut self) {
        self.apply_received(None);
    }

    /// Applies `first` (one already received) and every completion waiting,
    /// notes the progress once, then hands over what they made ready.
    fn apply_received(&mut self, first: Option<Completion>) {
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
    fn run_ready(&mut self) {
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
    fn drain_in_flight(&mut self, deadline: Instant, relevant: impl Fn(&PartKey) -> bool) {
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
    fn drop_waiting(&mut self, relevant: impl Fn(&PartKey) -> bool) {
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

    /// Commit points as a TPL: those that moved since the last commit, or with
    /// `force` every one (revoke and shutdown must not trust an async commit that
    /// may still be in flight or may have failed).
    fn commit_list(&mut self, only: Option<&[PartKey]>, force: bool) -> Option<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), p) in &mut self.parts {
            if only.is_some_and(|o| !o.iter().any(|(t, q)| t == topic && q == partition)) {
                continue;
            }
            let Some(point) = p.tracker.commit_point() else {
                continue;
            };
            let done = p.tracker.finished_count();
            // A straggler holds the point while work behind it finishes: the
            // map changes, and is worth committing, though the point did not move.
            let map_moved = self.map_cap.is_some() && p.committed_done != done;
            if force || p.committed != Some(point) || map_moved {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(point));
                if let Some(cap) = self.map_cap {
                    let map = completion_map(p, point, cap);
                    if let Some(mut el) = tpl.find_partition(topic, *partition) {
                        el.set_metadata(map);
                    }
                }
                p.committed = Some(point);
                p.committed_done = done;
            }
        }
        (tpl.count() > 0).then_some(tpl)
    }

    /// Publishes the committed points for [`SourceHandle::committed`].
    fn publish_committed(&self) {
        if let Ok(mut c) = self.committed.lock() {
            c.clear();
            c.extend(
                self.parts
                    .iter()
                    .filter_map(|((t, p), part)| part.committed.map(|o| (Arc::clone(t), *p, o))),
            );
        }
    }

    /// Forgets the commit points of `tpl` (an async commit not sent or refused),
    /// so the next round sends them again even if they have not moved.
    fn forget_committed(&mut self, tpl: &TopicPartitionList) {
        for el in tpl.elements() {
            self.forget_committed_part(&(Arc::from(el.topic()), el.partition()));
        }
    }

    fn forget_committed_part(&mut self, key: &PartKey) {
        if let Some(p) = self.parts.get_mut(key) {
            p.committed = None;
        }
    }

    /// Notes each partition's commit point, flags the stalled ones, and
    /// publishes what it saw for health and metrics.
    fn watch_partitions(&mut self, timeout: Option<Duration>) {
        let now = Instant::now();
        let mut states: Vec<super::PartitionState> = self
            .parts
            .iter_mut()
            .map(|((topic, partition), p)| {
                let point = p.tracker.commit_point();
                let unfinished = p.tracker.in_flight() + p.tracker.held();
                let (still, stalled) =
                    p.watch
                        .observe((topic, *partition), point, unfinished > 0, timeout, now);
                super::PartitionState {
                    topic: topic.to_string(),
                    partition: *partition,
                    commit_point: point,
                    unfinished,
                    held: p.tracker.held(),
                    stalled_for_ms: u64::try_from(still.as_millis()).unwrap_or(u64::MAX),
                    stalled,
                    paused: p.paused,
                }
            })
            .collect();
        states.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        if let Ok(mut s) = self.states.lock() {
            *s = states;
        }
    }

    fn publish_gauges(&self) {
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
    }
}

/// The metadata text for committing `p` at `point`: its finished offsets
/// above the point, and what is left of a previous owner's map beyond them.
fn completion_map(p: &Part, point: i64, cap: usize) -> String {
    let finished = p.tracker.finished_above().map(|o| o..o + 1);
    let inherited = p.skip.iter().flat_map(|s| s.ranges.iter().cloned());
    let e = progress::encode_ranges(point, finished.chain(inherited), cap);
    if e.left_out > 0 {
        tracing::debug!(
            point,
            encoded = e.encoded,
            left_out = e.left_out,
            "Completion map cut to its cap."
        );
    }
    e.text
}

/// Reads the committed offsets of `tpl`'s partitions and decodes their
/// completion maps. A map that does not decode is ignored with a warning
/// (replayed, never skipped); a failed fetch ignores them all.
fn read_completion_maps(
    consumer: &BaseConsumer<Context>,
    tpl: &TopicPartitionList,
    stats: &SourceStats,
) -> HashMap<PartKey, Skip> {
    let mut ask = TopicPartitionList::with_capacity(tpl.count());
    for e in tpl.elements() {
        ask.add_partition(e.topic(), e.partition());
    }
    let got = match consumer.committed_offsets(ask, COMMITTED_FETCH_TIMEOUT) {
        Ok(got) => got,
        Err(e) => {
            tracing::warn!(error = %e, "Committed offsets not read: completion maps ignored, their offsets replayed.");
            return HashMap::new();
        }
    };
    let mut maps = HashMap::new();
    for e in got.elements() {
        let Offset::Offset(base) = e.offset() else {
            continue;
        };
        // rdkafka panics on metadata that is not UTF-8 (another client's bytes).
        let text =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.metadata().to_owned()));
        let (topic, partition) = (e.topic(), e.partition());
        match text
            .map_err(|_| None)
            .and_then(|t| progress::decode(base, &t).map_err(Some))
        {
            Ok(map) if map.is_empty() => {}
            Ok(map) => {
                tracing::debug!(
                    topic,
                    partition,
                    base,
                    finished = map.len(),
                    "Completion map read."
                );
                maps.insert(
                    (Arc::from(topic), partition),
                    Skip {
                        base,
                        ranges: map.into_ranges().into(),
                        started: false,
                    },
                );
            }
            Err(error) => {
                stats.completion_maps_ignored.fetch_add(1, Relaxed);
                let error = error.map_or_else(|| "not UTF-8".to_owned(), |e| e.to_string());
                tracing::warn!(topic, partition, base, %error, "Completion map ignored: its offsets are replayed.");
            }
        }
    }
    // The list goes before the consumer can: a live list makes its destroy hang.
    drop(got);
    maps
}

fn owned_partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

/// Our `ConsumerContext`: rebalances drain and commit; errors are recorded.
struct Context {
    hooks: Option<Arc<dyn RebalanceHooks>>,
    /// Whether assigned partitions' completion maps are read.
    read_maps: bool,
    state: Mutex<State>,
    drain_timeout: Duration,
    fatal: Mutex<Option<SourceError>>,
    stats: Arc<SourceStats>,
    /// Published from librdkafka's statistics (see `watch`).
    progress: Arc<Mutex<Vec<super::PartitionProgress>>>,
    /// Commit answers seen by `commit_callback` (a wait on one counts them).
    commit_answers: AtomicU64,
    /// Partitions of async commits that failed, for the poll loop to send
    /// again: the callback may run while the state is locked (inside a sync
    /// commit), so it never takes that lock.
    failed_commits: Mutex<Vec<PartKey>>,
}

impl ClientContext for Context {
    fn stats_raw(&self, statistics: &[u8]) {
        super::watch::on_statistics(statistics, &self.stats, &self.progress);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
            super::watch::all_brokers_down(&self.stats);
        }
        let auth = matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::Authentication)
                | Some(rdkafka::types::RDKafkaErrorCode::SaslAuthenticationFailed)
        ) || reason.contains("SASL authentication error")
            || reason.contains("Authentication failed");
        if auth {
            tracing::error!(%error, reason, "Kafka authentication failed.");
            if let Ok(mut f) = self.fatal.lock() {
                f.get_or_insert(SourceError::Authentication {
                    reason: reason.to_owned(),
                });
            }
        } else {
            tracing::warn!(%error, reason, "Kafka client error.");
        }
    }
}

impl ConsumerContext for Context {
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        self.commit_answers.fetch_add(1, Release);
        let Err(e) = result else { return };
        tracing::debug!(error = %e, "Commit failed; retrying at the next interval.");
        if let Ok(mut failed) = self.failed_commits.lock() {
            failed.extend(
                offsets
                    .elements()
                    .iter()
                    .map(|el| (Arc::from(el.topic()), el.partition())),
            );
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: Vec<PartKey> = tpl
                .elements()
                .iter()
                .map(|e| (Arc::from(e.topic()), e.partition()))
                .collect();
            self.revoke(consumer, &revoked);
            if let Some(hooks) = &self.hooks {
                hooks.revoked(&owned_partitions(tpl));
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Before any message of these partitions is routed (this runs
            // inside `poll`, on the poll thread), so none runs that the map skips.
            let mut maps = if self.read_maps && tpl.count() > 0 {
                read_completion_maps(consumer, tpl, &self.stats)
            } else {
                HashMap::new()
            };
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            for e in tpl.elements() {
                st.epochs += 1;
                let epoch = st.epochs;
                let key = (Arc::from(e.topic()), e.partition());
                let shared = Arc::new(PartShared {
                    current: AtomicU64::new(epoch),
                    done: st.done.clone(),
                    cancel: tokio_util::sync::CancellationToken::new(),
                    recycle: Arc::clone(&st.recycle),
                });
                let skip = maps.remove(&key);
                // librdkafka resumes assigned partitions from the committed offsets.
                st.parts.insert(
                    key,
                    Part {
                        tracker: PartitionTracker::new(),
                        epoch,
                        shared,
                        paused: false,
                        committed: None,
                        committed_done: 0,
                        skip,
                        watch: super::stall::StallWatch::new(Instant::now()),
                    },
                );
            }
            self.stats.assigned.store(st.parts.len() as u64, Relaxed);
            self.stats.group_joined.store(true, Relaxed);
            drop(st);
            tracing::debug!(partitions = tpl.count(), "Partitions assigned.");
            if let Some(hooks) = &self.hooks {
                hooks.assigned(&owned_partitions(tpl));
            }
        }
    }
}

impl Context {
    /// Drops the revoked partitions' waiting messages, drains their running work
    /// (up to the deadline), commits their contiguous points synchronously,
    /// cancels what still runs and marks it stale.
    fn revoke(&self, consumer: &BaseConsumer<Self>, revoked: &[PartKey]) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let deadline = Instant::now() + self.drain_timeout;
        st.drop_waiting(|key| revoked.contains(key));
        st.drain_in_flight(deadline, |key| revoked.contains(key));
        if let Some(tpl) = st.commit_list(Some(revoked), true) {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                // librdkafka's mock broker refuses commits while the group prepares
                // a rebalance (a real broker accepts them from the current
                // generation): the last async commit stands, and more is replayed.
                self.stats.revoke_commit_failures.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "Commit on revoke failed.");
            } else {
                self.stats.commits.fetch_add(1, Relaxed);
            }
        }
        st.publish_committed();
        for key in revoked {
            if let Some(p) = st.parts.remove(key) {
                if p.paused {
                    st.paused -= 1;
                }
                retire(&p);
                let mut ready = std::mem::take(&mut st.ready);
                drop(st.sched.remove_part(p.epoch, &mut ready));
                st.ready = ready;
            }
        }
        st.run_ready();
        st.publish_gauges();
        let timeout = st.stall_timeout;
        st.watch_partitions(timeout);
        self.stats.assigned.store(st.parts.len() as u64, Relaxed);
        tracing::debug!(partitions = revoked.len(), "Partitions revoked.");
    }
}

/// A partition leaves this consumer: what it handed over is stale, and its
/// async handlers still running past the drain are cancelled (their offsets
/// stay unfinished; the next owner replays them).
fn retire(p: &Part) {
    p.shared.current.fetch_add(1, Release);
    p.shared.cancel.cancel();
}

/// Creates the consumer, subscribes, and starts the poll thread.
pub(super) fn start(
    config: &KafkaConsumerConfig,
    options: SourceOptions,
    hooks: Option<Arc<dyn RebalanceHooks>>,
    executor: Box<dyn Executor>,
) -> Result<SourceHandle, SourceError> {
    let mut client_config = config.to_client_config()?;
    if client_config.get("statistics.interval.ms").is_none() {
        client_config.set(
            "statistics.interval.ms",
            super::watch::STATISTICS_INTERVAL_MS,
        );
    }
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    let stats = Arc::new(SourceStats::default());
    let committed = Arc::new(Mutex::new(Vec::new()));
    let progress = Arc::new(Mutex::new(Vec::new()));
    let states = Arc::new(Mutex::new(Vec::new()));
    let context = Context {
        hooks,
        state: Mutex::new(State {
            parts: PartMap::default(),
            sched: Scheduler::new(options.ordering, options.max_in_flight, options.batch),
            executor: Some(executor),
            executor_gone: false,
            ready: Vec::new(),
            completions: done_rx,
            done: done_tx,
            epochs: 0,
            stats: Arc::clone(&stats),
            committed: Arc::clone(&committed),
            recycle: Arc::new(super::Recycler::new(options.buffer_budget)),
            last_progress: Instant::now(),
            map_cap: options
                .completion_map
                .then_some(options.completion_map_max_bytes),
            paused: 0,
            states: Arc::clone(&states),
            stall_timeout: options.stall_timeout,
        }),
        read_maps: options.completion_map,
        drain_timeout: options.drain_timeout,
        fatal: Mutex::new(None),
        stats: Arc::clone(&stats),
        progress: Arc::clone(&progress),
        commit_answers: AtomicU64::new(0),
        failed_commits: Mutex::new(Vec::new()),
    };
    let consumer: BaseConsumer<Context> = client_config.create_with_context(context)?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let stop = Arc::new(AtomicBool::new(false));
    let options_drain = options.drain_timeout;
    let thread = {
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("xzepr-poll".into())
            .spawn(move || PollLoop::new(consumer, options, stop).run())?
    };
    Ok(SourceHandle {
        stop,
        stop_at: Arc::new(Mutex::new(None)),
        drain_timeout: options_drain,
        stats,
        committed,
        thread: Arc::new(Mutex::new(Some(thread))),
        progress,
        states,
    })
}

/// The poll thread's own state between iterations.
struct PollLoop {
    consumer: BaseConsumer<Context>,
    options: SourceOptions,
    stop: Arc<AtomicBool>,
    completions: Receiver<Completion>,
    topic_names: HashMap<String, Arc<str>, crate::dispatch::TrustedState>,
    last_commit: Instant,
    to_pause: Vec<PartKey>,
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
}

impl PollLoop {
    fn new(consumer: BaseConsumer<Context>, options: SourceOptions, stop: Arc<AtomicBool>) -> Self {
        let completions = consumer
            .context()
            .state
            .lock()
            .map(|s| s.completions.clone())
            .unwrap_or_else(|p| p.into_inner().completions.clone());
        let watch_every = super::stall::check_interval(options.stall_timeout);
        PollLoop {
            consumer,
            options,
            stop,
            completions,
            topic_names: HashMap::default(),
            last_commit: Instant::now(),
            to_pause: Vec::new(),
            throttled: None,
            last_watch: Instant::now(),
            watch_every,
        }
    }

    fn run(mut self) -> Result<(), SourceError> {
        // A panic in the loop (a bug, or user code it calls) becomes a clean
        // stop: the shutdown below still drains and commits what finished.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.poll_until_stopped()))
            .unwrap_or_else(|panic| {
                let message = super::panic_message(&*panic);
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
            let Some(Flow { busy, poll }) = self.between_polls() else {
                break Ok(());
            };
            if !poll {
                self.wait_for_completion();
                continue;
            }
            let burst = poll_burst(&self.consumer, self.options.poll_interval, busy);
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
                burst,
            );
            if !routed {
                break Ok(());
            }
            self.pause_marked();
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
        Some(Flow {
            busy: st.sched.in_flight() > 0,
            poll,
        })
    }

    /// Pauses the partitions holding more than their share of the buffers.
    /// The shares add up to the budget, so while the buffers are over it at
    /// least one partition is over its share.
    fn pause_over_share(&self, st: &mut State) {
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
    fn resume_ready(&self, st: &mut State) {
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

    fn commit_async(&self, st: &mut State) {
        let Some(tpl) = st.commit_list(None, false) else {
            return;
        };
        match self.consumer.commit(&tpl, CommitMode::Async) {
            Ok(()) => {
                st.stats.commits.fetch_add(1, Relaxed);
                st.publish_committed();
            }
            Err(e) => {
                tracing::warn!(error = %e, "Async commit failed.");
                st.forget_committed(&tpl);
            }
        }
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

    /// Commits `tpl` and waits for the broker's answer until `deadline`,
    /// serving callbacks meanwhile (messages polled here are dropped, never
    /// handled: every partition is paused). A refusal (a rebalance in
    /// progress) is tried again while there is time.
    fn commit_within(&self, tpl: &TopicPartitionList, deadline: Instant) {
        let ctx = self.consumer.context();
        loop {
            let answers = ctx.commit_answers.load(Acquire);
            let failed_before = ctx.failed_commits.lock().map_or(0, |f| f.len());
            if let Err(e) = self.consumer.commit(tpl, CommitMode::Async) {
                tracing::warn!(error = %e, "Final commit not sent.");
                return;
            }
            while ctx.commit_answers.load(Acquire) == answers && Instant::now() < deadline {
                drop(self.consumer.poll(Duration::from_millis(20)));
            }
            let answered = ctx.commit_answers.load(Acquire) != answers;
            let failed = ctx.failed_commits.lock().map_or(0, |f| f.len()) > failed_before;
            match (answered, failed) {
                (true, false) => {
                    ctx.stats.commits.fetch_add(1, Relaxed);
                    return;
                }
                (true, true) if Instant::now() + Duration::from_millis(200) < deadline => {
                    tracing::debug!("Final commit refused; retrying.");
                    std::thread::sleep(Duration::from_millis(200));
                }
                _ => {
                    tracing::warn!(
                        answered,
                        "Final commit not acknowledged in time: what finished since the last commit is replayed."
                    );
                    return;
                }
            }
        }
    }

    fn pause_marked(&mut self) {
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

    /// Stop fetching, drop what waits in lanes, let running work finish (up to
    /// the drain timeout), commit synchronously, cancel the rest, and leave the
    /// group.
    fn shutdown(&self) {
        let consumer = &self.consumer;
        if let Ok(assignment) = consumer.assignment() {
            let _ = consumer.pause(&assignment);
        }
        let ctx = consumer.context();
        let deadline = Instant::now() + self.options.drain_timeout;
        // Poisoned only by a panic on this thread, caught in `run`: what the
        // tracker says finished is still finished, so commit it.
        let mut st = ctx.state.lock().unwrap_or_else(|p| p.into_inner());
        // No new jobs from here on; a sync executor's workers end once they have
        // run what they hold.
        st.executor = None;
        st.drop_waiting(|_| true);
        st.drain_in_flight(deadline, |_| true);
        let last = st.commit_list(None, true);
        st.publish_committed();
        drop(st);
        if let Some(tpl) = last {
            self.commit_within(&tpl, Instant::now() + FINAL_COMMIT_WAIT);
        }
        let mut st = ctx.state.lock().unwrap_or_else(|p| p.into_inner());
        st.publish_committed();
        for p in st.parts.values() {
            retire(p);
        }
        st.parts.clear();
        st.paused = 0;
        st.watch_partitions(None);
        st.publish_gauges();
        drop(st);
        consumer.unsubscribe();
        // Serve the revoke that unsubscribing queues while the group handler
        // still answers: left to the close in the consumer's `Drop`, its
        // `assign` can wait forever on a group already closing (librdkafka
        // #4884). Messages polled here are dropped unhandled, never committed.
        let until = Instant::now() + UNSUBSCRIBE_WAIT;
        while Instant::now() < until && consumer.assignment().is_ok_and(|a| a.count() > 0) {
            drop(consumer.poll(Duration::from_millis(20)));
        }
    }
}

/// Each assigned partition's share of the buffer budget: bytes and events.
fn share(o: &SourceOptions, partitions: usize) -> (usize, usize) {
    let n = partitions.max(1);
    ((o.buffer_budget / n).max(1), (o.max_buffered / n).max(1))
}

/// Most time shutdown spends serving the revoke of its own unsubscribe.
const UNSUBSCRIBE_WAIT: Duration = Duration::from_secs(2);

/// Most time shutdown waits for the broker to answer its last commit (and
/// tries again while a rebalance refuses it). With the brokers unreachable a
/// synchronous commit would wait on librdkafka's request timeouts, a minute
/// or more; what is not committed by then is replayed by the next owner.
const FINAL_COMMIT_WAIT: Duration = Duration::from_secs(2);

/// What [`SourceHandle::join`](super::SourceHandle::join) allows the poll
/// thread past the drain: the final commit, the unsubscribe, and a second for
/// librdkafka's close. Past it the thread is left to finish on its own.
pub(super) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Copies each message once, tracks its offset, puts it in its lane, hands
/// over what may run, and marks partitions to pause. False when the state
/// is poisoned.
fn route(
    consumer: &BaseConsumer<Context>,
    o: &SourceOptions,
    topic_names: &mut HashMap<String, Arc<str>, crate::dispatch::TrustedState>,
    to_pause: &mut Vec<PartKey>,
    burst: Vec<BorrowedMessage<'_>>,
) -> bool {
    let ctx = consumer.context();
    let Ok(mut guard) = ctx.state.lock() else {
        return false;
    };
    let st = &mut *guard;
    for m in burst {
        let topic = topic_arc(topic_names, m.topic());
        let Some(p) = st.parts.get_mut(&(Arc::clone(&topic), m.partition())) else {
            // A message for a partition we no longer own: the new owner reads it.
            continue;
        };
        let partition = m.partition();
        if let Some(skip) = &mut p.skip {
            if skip.take(m.offset()) {
                // Finished by a previous owner: finished here, never dispatched.
                let _ = p.tracker.dispatched(m.offset());
                p.tracker.finished(m.offset());
                st.stats.skipped_done.fetch_add(1, Relaxed);
                continue;
            }
            if skip.ranges.is_empty() {
                p.skip = None;
            }
        }
        let buf = st.recycle.take();
        let msg = copy_message(&m, Arc::clone(&topic), p, buf);
        drop(m);
        let _ = p.tracker.dispatched(msg.offset);
        st.sched.arrive(p.epoch, msg, &mut st.ready);
        // Past its tracking limit a partition pauses until its commit point
        // moves (the buffer budget is enforced between polls).
        if p.tracker.tracked() >= o.max_tracked && !p.paused {
            p.paused = true;
            st.paused += 1;
            to_pause.push((topic, partition));
        }
    }
    st.run_ready();
    st.publish_gauges();
    true
}

/// What librdkafka already holds, up to [`BURST`] messages (`poll(0)` after
/// the first does not wait), so the state lock is paid once per burst. While
/// jobs run the first poll does not wait either: releases are waited for on
/// their channel instead.
fn poll_burst(
    consumer: &BaseConsumer<Context>,
    poll_interval: Duration,
    busy: bool,
) -> Vec<BorrowedMessage<'_>> {
    let mut burst = Vec::with_capacity(BURST);
    let mut wait = if busy { Duration::ZERO } else { poll_interval };
    while burst.len() < BURST {
        match consumer.poll(wait) {
            Some(Ok(m)) => burst.push(m),
            Some(Err(e)) => tracing::warn!(error = %e, "Poll error."),
            None => break,
        }
        wait = Duration::ZERO;
    }
    if !burst.is_empty() {
        consumer
            .context()
            .stats
            .polled
            .fetch_add(burst.len() as u64, Relaxed);
    }
    burst
}

/// The shared topic name for `name`, allocated once per topic.
fn topic_arc(
    names: &mut HashMap<String, Arc<str>, crate::dispatch::TrustedState>,
    name: &str,
) -> Arc<str> {
    match names.get(name) {
        Some(t) => Arc::clone(t),
        None => {
            let t: Arc<str> = Arc::from(name);
            names.insert(name.to_owned(), Arc::clone(&t));
            t
        }
    }
}

/// The one copy of a message out of librdkafka.
fn copy_message(m: &BorrowedMessage<'_>, topic: Arc<str>, p: &Part, mut data: Vec<u8>) -> Message {
    data.clear();
    let payload = m.payload();
    let key = m.key();
    data.extend_from_slice(payload.unwrap_or_default());
    data.extend_from_slice(key.unwrap_or_default());
    Message {
        data,
        payload_len: payload.map(<[u8]>::len),
        has_key: key.is_some(),
        headers: m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        topic,
        partition: m.partition(),
        offset: m.offset(),
        timestamp: m.timestamp().to_millis(),
        epoch: p.epoch,
        shared: Arc::clone(&p.shared),
        completed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::Skip;

    fn skip(base: i64, ranges: &[std::ops::Range<i64>]) -> Skip {
        Skip {
            base,
            ranges: ranges.iter().cloned().collect(),
            started: false,
        }
    }

    #[test]
    fn skips_exactly_the_recorded_offsets_as_they_arrive() {
        let mut s = skip(10, &[12..14, 20..21]);
        let taken: Vec<i64> = (10..25).filter(|&o| s.take(o)).collect();
        assert_eq!(taken, vec![12, 13, 20]);
        assert!(s.ranges.is_empty());
    }

    #[test]
    fn reading_from_before_the_commit_point_ignores_the_map() {
        // An offset reset to an earlier position: the map is about other messages.
        let mut s = skip(10, &[12..14, 16..17]);
        assert!((0..20).all(|o| !s.take(o)));
    }
}
