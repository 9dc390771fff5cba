//! The source stage: one OS thread owns the Kafka consumer, copies each payload
//! once, and hands messages to bounded worker queues; finished offsets come back
//! over a channel and are committed as a contiguous run per partition.
//!
//! ```text
//!             ┌──────────── poll thread ────────────┐
//!  Kafka ───> │ BaseConsumer::poll ─> copy ─> route │ ──try_send──> queue 0..n ──> workers
//!             │      ^ pause/resume     trackers <───┼─── completions <─── Message::finish
//!             │      └──── commit (async / sync) ────┤
//!             └──────────────────────────────────────┘
//! ```
//!
//! The thread never blocks on a worker: when a message's queue is full it keeps
//! the message aside in its partition's stash (in order); once the stashes hold
//! more than [`SourceOptions::stash_budget`] it **pauses the partitions** that
//! keep arriving, and resumes each once its queue has drained below the low
//! watermark, polling all the while so heartbeats and rebalances are served and
//! memory stays bounded: queues × capacity messages plus the stash budget.
//!
//! On revoke it waits (up to [`SourceOptions::drain_timeout`]) for the revoked
//! partitions' in-flight work, commits their contiguous point synchronously, and
//! marks what is still queued as stale: workers drop stale messages unhandled (the
//! new owner receives them again). Shutdown does the same for every partition.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::config::{ConfigError, KafkaConsumerConfig};
use crate::dispatch::{fnv1a, queue_index, Ordering};
use crate::offsets::PartitionTracker;

/// Source-stage errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The configuration was rejected.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// librdkafka refused to create or subscribe the consumer.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A broker rejected our credentials (fatal: not retried forever).
    #[error("authentication failed: {reason}")]
    Authentication {
        /// librdkafka's description.
        reason: String,
    },
    /// An option is out of range.
    #[error("invalid source option `{field}`: {reason}")]
    InvalidOption {
        /// The field.
        field: &'static str,
        /// What is allowed.
        reason: &'static str,
    },
    /// A worker queue lost its receiver (its worker stopped) while messages
    /// still came for it. The message that found it closed is left unfinished,
    /// so nothing at or after it in its partition is committed.
    #[error("worker queue {queue} closed: its worker stopped")]
    WorkerStopped {
        /// The queue's index.
        queue: usize,
    },
    /// The poll thread could not be started.
    #[error("cannot start the poll thread: {0}")]
    Spawn(#[from] std::io::Error),
}

/// Limits of the source stage.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SourceOptions {
    /// Number of worker queues (one per worker). Default: the number of CPUs.
    pub queues: usize,
    /// Messages each queue holds. Default 1024: about 1 MB of ~1 KB events per
    /// queue, enough to ride out a slow handler call without pausing. A message
    /// whose queue is full waits in its partition's stash (see `stash_budget`).
    pub queue_capacity: usize,
    /// A paused partition resumes when its queue is at most this full. Default:
    /// half the capacity, so pause/resume does not flap on every message.
    pub resume_below: usize,
    /// How events are spread over queues. Default: per partition (in order).
    pub ordering: Ordering,
    /// How often the contiguous commit points are committed (asynchronously).
    /// Default 1 s: a crash replays at most about a second of finished work.
    pub commit_interval: Duration,
    /// How long revoke and shutdown wait for in-flight work before committing what
    /// finished. Default 10 s, well inside the 30 s session timeout.
    pub drain_timeout: Duration,
    /// Longest single wait in `poll`. Default 50 ms: completions and resumes are
    /// handled at least this often when no message arrives.
    pub poll_interval: Duration,
    /// Bytes of messages held back, across all partitions, because their queue
    /// was full (payload, key and ~128 bytes of bookkeeping each). Default 16 MiB:
    /// a quarter of librdkafka's own prefetch limit, and about 13,000 ~1 KB events,
    /// enough to ride out a worker descheduled for tens of milliseconds. Over the
    /// budget, the partition of each message that has to wait is **paused**, and
    /// resumes once its own held-back messages are at most `resume_below` and the
    /// total is at most half the budget. A pause is not free: librdkafka drops the
    /// partition's prefetched messages and fetches them again after the resume.
    pub stash_budget: usize,
    /// Offsets tracked per partition from its commit point on: in flight, held,
    /// or finished behind an unfinished one. Default 100,000 (16 bytes each, so
    /// 1.6 MB a partition; about what a replay after a crash may cost). At the
    /// limit the partition's new messages wait in its stash and it is **paused**
    /// until its commit point moves, so one offset that never finishes (a held
    /// message, a report that failed for good) bounds memory and the replay
    /// instead of growing both without end.
    pub max_tracked: usize,
}

impl Default for SourceOptions {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, usize::from);
        SourceOptions {
            queues: cpus,
            queue_capacity: 1024,
            resume_below: 512,
            ordering: Ordering::PerPartition,
            commit_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(50),
            stash_budget: 16 << 20,
            max_tracked: 100_000,
        }
    }
}

impl SourceOptions {
    fn validate(&self, session_timeout: Duration) -> Result<(), SourceError> {
        let bad = |field, reason| Err(SourceError::InvalidOption { field, reason });
        if self.queues == 0 {
            return bad("queues", "must be at least 1");
        }
        if self.queue_capacity == 0 {
            return bad("queue_capacity", "must be at least 1");
        }
        if self.resume_below >= self.queue_capacity {
            return bad("resume_below", "must be below queue_capacity");
        }
        if self.stash_budget == 0 {
            return bad("stash_budget", "must be at least 1 byte");
        }
        if self.max_tracked == 0 {
            return bad("max_tracked", "must be at least 1");
        }
        if self.drain_timeout >= session_timeout {
            return bad("drain_timeout", "must be shorter than the session timeout");
        }
        Ok(())
    }
}

/// A message copied out of librdkafka, with what a worker needs to finish it.
#[derive(Debug)]
pub struct Message {
    /// The payload (the one copy; decoders borrow from it).
    pub payload: Option<Vec<u8>>,
    /// The key.
    pub key: Option<Vec<u8>>,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Timestamp in milliseconds since the epoch, when the broker gave one.
    pub timestamp: Option<i64>,
    epoch: u64,
    shared: Arc<PartShared>,
}

/// Per-partition state a message needs to finish itself: one `Arc` per message.
#[derive(Debug)]
struct PartShared {
    /// The partition's current epoch; bumped on revoke.
    current: AtomicU64,
    done: Sender<Completion>,
}

impl Message {
    /// Headers as `(key, value)` pairs, for binary-mode decoding.
    pub fn header_pairs(&self) -> impl Iterator<Item = (&str, &[u8])> + Clone {
        self.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// False once this message's partition was revoked (or reassigned) after it
    /// was queued: its work must not run, the new owner has it.
    pub fn is_current(&self) -> bool {
        self.shared.current.load(Acquire) == self.epoch
    }

    /// Marks the offset finished. Its partition's commit point passes it once every
    /// earlier offset has finished too. Dropping a message without finishing it
    /// holds the commit point before it.
    pub fn finish(self) {
        self.complete(false);
    }

    /// Marks the offset held: it will not finish in this assignment, so the
    /// commit point stays at or before it (a restart or the next owner reads it
    /// again), but revoke and shutdown no longer wait for it. Dropping a message
    /// holds the commit point too, but is waited for up to the drain timeout.
    pub fn hold(self) {
        self.complete(true);
    }

    fn complete(self, held: bool) {
        // The poll thread may be gone (shutdown): then nothing is committed, and
        // the offset is replayed, which is the safe side.
        let _ = self.shared.done.send(Completion {
            topic: self.topic,
            partition: self.partition,
            offset: self.offset,
            epoch: self.epoch,
            held,
        });
    }
}

#[derive(Debug)]
struct Completion {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    epoch: u64,
    held: bool,
}

/// One assigned partition, as the poll thread sees it.
struct Part {
    tracker: PartitionTracker,
    epoch: u64,
    shared: Arc<PartShared>,
    /// Messages polled but not yet queued (their queue was full), in order.
    stash: VecDeque<Message>,
    paused: bool,
    committed: Option<i64>,
}

/// A fast hasher for the `(topic, partition)` keys looked up once per message;
/// the keys come from the broker's assignment, not from an attacker.
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_i32(&mut self, i: i32) {
        self.0 =
            (self.0.rotate_left(5) ^ u64::from(i as u32)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type PartMap = HashMap<(Arc<str>, i32), Part, std::hash::BuildHasherDefault<KeyHasher>>;

/// What the poll thread and the rebalance callbacks share.
struct State {
    parts: PartMap,
    /// What the stashes of all partitions hold, by [`stash_cost`].
    stashed_bytes: usize,
    completions: Receiver<Completion>,
    epochs: u64,
}

impl State {
    fn apply(&mut self, c: Completion) {
        if let Some(p) = self.parts.get_mut(&(c.topic, c.partition)) {
            if p.epoch == c.epoch {
                if c.held {
                    p.tracker.hold(c.offset);
                } else {
                    p.tracker.finished(c.offset);
                }
            }
        }
    }

    fn drain_completions(&mut self) {
        while let Ok(c) = self.completions.try_recv() {
            self.apply(c);
        }
    }

    /// Applies completions until no partition picked by `relevant` has work in
    /// flight, or `deadline` passes (waiting on the channel, not sleeping).
    fn drain_in_flight(&mut self, deadline: Instant, relevant: impl Fn(&(Arc<str>, i32)) -> bool) {
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

    /// Commit points as a TPL: those that moved since the last commit, or with
    /// `force` every one (revoke and shutdown must not trust an async commit that
    /// may still be in flight or may have failed).
    fn commit_list(
        &mut self,
        only: Option<&[(Arc<str>, i32)]>,
        force: bool,
    ) -> Option<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), p) in &mut self.parts {
            if only.is_some_and(|o| !o.iter().any(|(t, q)| t == topic && q == partition)) {
                continue;
            }
            if let Some(point) = p.tracker.commit_point() {
                if force || p.committed != Some(point) {
                    let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(point));
                    p.committed = Some(point);
                }
            }
        }
        (tpl.count() > 0).then_some(tpl)
    }
}

/// Called on the poll thread around rebalances (the handler's `on_assign` and
/// `on_revoke`).
pub(crate) trait RebalanceHooks: Send + Sync + 'static {
    /// After partitions were assigned.
    fn assigned(&self, partitions: &[(String, i32)]);
    /// Before partitions are revoked, after their in-flight work drained (or the
    /// drain deadline passed) and their commit point was committed.
    fn revoked(&self, partitions: &[(String, i32)]);
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
    state: Mutex<State>,
    /// Cloned into each assigned partition's shared state.
    done: Sender<Completion>,
    drain_timeout: Duration,
    fatal: Mutex<Option<SourceError>>,
    stats: Arc<SourceStats>,
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
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
        let Err(e) = result else { return };
        tracing::debug!(error = %e, "Commit failed; retrying at the next interval.");
        // Forget what we thought was committed so the next round sends it again.
        // `try_lock`: a sync commit made under the lock may report here.
        if let Ok(mut st) = self.state.try_lock() {
            for el in offsets.elements() {
                if let Some(p) = st.parts.get_mut(&(Arc::from(el.topic()), el.partition())) {
                    p.committed = None;
                }
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: Vec<(Arc<str>, i32)> = tpl
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

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            for e in tpl.elements() {
                st.epochs += 1;
                let epoch = st.epochs;
                let key = (Arc::from(e.topic()), e.partition());
                // Librdkafka resumes assigned partitions from the committed offsets.
                st.parts.insert(
                    key,
                    Part {
                        tracker: PartitionTracker::new(),
                        epoch,
                        shared: Arc::new(PartShared {
                            current: AtomicU64::new(epoch),
                            done: self.done.clone(),
                        }),
                        stash: VecDeque::new(),
                        paused: false,
                        committed: None,
                    },
                );
            }
            self.stats.assigned.store(st.parts.len() as u64, Relaxed);
            drop(st);
            tracing::debug!(partitions = tpl.count(), "Partitions assigned.");
            if let Some(hooks) = &self.hooks {
                hooks.assigned(&owned_partitions(tpl));
            }
        }
    }
}

impl Context {
    /// Drain `revoked` (up to the deadline), commit their contiguous points
    /// synchronously, and mark what is left stale.
    fn revoke(&self, consumer: &BaseConsumer<Self>, revoked: &[(Arc<str>, i32)]) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let deadline = Instant::now() + self.drain_timeout;
        for key in revoked {
            if let Some(p) = st.parts.get_mut(key) {
                // Never dispatched: the next owner reads them again.
                p.stash.clear();
            }
        }
        st.stashed_bytes = st
            .parts
            .values()
            .flat_map(|p| &p.stash)
            .map(stash_cost)
            .sum();
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
        for key in revoked {
            if let Some(p) = st.parts.remove(key) {
                p.shared.current.fetch_add(1, Release);
            }
        }
        self.stats.assigned.store(st.parts.len() as u64, Relaxed);
        tracing::debug!(partitions = revoked.len(), "Partitions revoked.");
    }
}

/// Counters of the source stage, readable while it runs.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Messages polled from librdkafka.
    pub polled: AtomicU64,
    /// Messages handed to a queue.
    pub dispatched: AtomicU64,
    /// Times a partition was paused because its queue was full.
    pub pauses: AtomicU64,
    /// Times a paused partition was resumed.
    pub resumes: AtomicU64,
    /// Commits sent (async and sync).
    pub commits: AtomicU64,
    /// Synchronous commits on revoke that the broker refused.
    pub revoke_commit_failures: AtomicU64,
    /// Partitions currently assigned.
    pub assigned: AtomicU64,
    /// The longest any queue has been, in messages (never above its capacity).
    pub max_queue_len: AtomicU64,
    /// The most the stashes have held at once, in bytes (see
    /// [`SourceOptions::stash_budget`]; above it only by the messages librdkafka
    /// had already handed over for a partition when it was paused).
    pub max_stashed_bytes: AtomicU64,
}

/// The running source: its queues' receiving ends are handed out once.
#[derive(Debug)]
pub struct Source {
    receivers: Vec<Receiver<Message>>,
    handle: SourceHandle,
}

/// The poll thread, returning the error it stopped on.
type PollThread = JoinHandle<Result<(), SourceError>>;

/// Controls a running source: shutdown, stats, committed offsets.
#[derive(Debug, Clone)]
pub struct SourceHandle {
    stop: Arc<AtomicBool>,
    stats: Arc<SourceStats>,
    thread: Arc<Mutex<Option<PollThread>>>,
}

impl Source {
    /// Creates the consumer, subscribes, and starts the poll thread.
    ///
    /// # Errors
    /// [`SourceError::Config`] for bad settings, [`SourceError::InvalidOption`],
    /// [`SourceError::Kafka`] if librdkafka refuses the configuration.
    pub fn start(
        config: &KafkaConsumerConfig,
        options: SourceOptions,
    ) -> Result<Source, SourceError> {
        Self::start_with_hooks(config, options, None)
    }

    /// [`Source::start`], calling `hooks` around rebalances.
    pub(crate) fn start_with_hooks(
        config: &KafkaConsumerConfig,
        options: SourceOptions,
        hooks: Option<Arc<dyn RebalanceHooks>>,
    ) -> Result<Source, SourceError> {
        options.validate(config.session_timeout)?;
        let client_config = config.to_client_config()?;
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let stats = Arc::new(SourceStats::default());
        let context = Context {
            hooks,
            state: Mutex::new(State {
                parts: PartMap::default(),
                completions: done_rx,
                epochs: 0,
                stashed_bytes: 0,
            }),
            drain_timeout: options.drain_timeout,
            done: done_tx,
            fatal: Mutex::new(None),
            stats: Arc::clone(&stats),
        };
        let consumer: BaseConsumer<Context> = client_config.create_with_context(context)?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..options.queues)
            .map(|_| crossbeam_channel::bounded(options.queue_capacity))
            .unzip();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            let stats = Arc::clone(&stats);
            std::thread::Builder::new()
                .name("xzepr-poll".into())
                .spawn(move || poll_loop(consumer, senders, options, stop, stats))?
        };
        Ok(Source {
            receivers,
            handle: SourceHandle {
                stop,
                stats,
                thread: Arc::new(Mutex::new(Some(thread))),
            },
        })
    }

    /// The worker queues' receiving ends (one per queue), taken once.
    pub fn take_receivers(&mut self) -> Vec<Receiver<Message>> {
        std::mem::take(&mut self.receivers)
    }

    /// A handle to stop the source and read its stats.
    pub fn handle(&self) -> SourceHandle {
        self.handle.clone()
    }
}

impl SourceHandle {
    /// Asks the poll thread to stop: it stops fetching, drains in-flight work up to
    /// the drain timeout, commits synchronously, closes the consumer and the queues.
    pub fn shutdown(&self) {
        self.stop.store(true, Release);
    }

    /// True once the poll thread has exited.
    pub fn is_finished(&self) -> bool {
        self.thread
            .lock()
            .map(|t| t.as_ref().is_none_or(JoinHandle::is_finished))
            .unwrap_or(true)
    }

    /// Waits for the poll thread; returns its error, if it stopped on one
    /// (an authentication failure, say). Later calls return `Ok`.
    ///
    /// # Errors
    /// The [`SourceError`] the poll thread stopped with.
    pub fn join(&self) -> Result<(), SourceError> {
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        match thread.map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(SourceError::InvalidOption {
                field: "poll thread",
                reason: "panicked",
            }),
            None => Ok(()),
        }
    }

    /// The source's counters.
    pub fn stats(&self) -> &SourceStats {
        &self.stats
    }
}

/// Most messages taken from librdkafka per lock of the shared state.
const BURST: usize = 64;

/// Longest wait in `poll` while messages are stashed for a full queue: short, so
/// the stash moves on as soon as a worker frees space; at most a thousand idle
/// wake-ups a second, and only while a queue is full.
const STASHED_POLL_INTERVAL: Duration = Duration::from_millis(1);

fn tpl_of(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    tpl
}

fn poll_loop(
    consumer: BaseConsumer<Context>,
    senders: Vec<Sender<Message>>,
    options: SourceOptions,
    stop: Arc<AtomicBool>,
    stats: Arc<SourceStats>,
) -> Result<(), SourceError> {
    let ctx = consumer.context();
    let mut last_commit = Instant::now();
    let mut seq = 0u64;
    let mut topic_names: HashMap<String, Arc<str>> = HashMap::new();
    let queue_len_max =
        |senders: &[Sender<Message>]| senders.iter().map(Sender::len).max().unwrap_or(0);
    // A queue found closed: the loop ends with `WorkerStopped`.
    let mut worker_stopped: Option<usize> = None;
    let result = loop {
        // Whether messages wait in a stash for queue space (set below).
        let mut stashed = false;
        if let Some(queue) = worker_stopped {
            break Err(SourceError::WorkerStopped { queue });
        }
        if stop.load(Acquire) {
            break Ok(());
        }
        if let Some(err) = ctx.fatal.lock().ok().and_then(|mut f| f.take()) {
            break Err(err);
        }
        // Completions, stashed messages, resumes and commits, between polls.
        {
            let Ok(mut st) = ctx.state.lock() else {
                break Ok(());
            };
            st.drain_completions();
            let mut resume = Vec::new();
            let State {
                parts,
                stashed_bytes,
                ..
            } = &mut *st;
            for ((topic, partition), p) in parts.iter_mut() {
                while let Some(msg) = p.stash.pop_front() {
                    if p.tracker.tracked() >= options.max_tracked {
                        p.stash.push_front(msg);
                        break;
                    }
                    let q = queue_for(&options, &msg, seq);
                    seq += 1;
                    if senders[q].len() > options.resume_below && p.paused {
                        p.stash.push_front(msg);
                        break;
                    }
                    let (offset, cost) = (msg.offset, stash_cost(&msg));
                    match senders[q].try_send(msg) {
                        Ok(()) => {
                            *stashed_bytes -= cost;
                            let _ = p.tracker.dispatched(offset);
                            stats.dispatched.fetch_add(1, Relaxed);
                        }
                        Err(TrySendError::Full(msg)) => {
                            p.stash.push_front(msg);
                            break;
                        }
                        Err(TrySendError::Disconnected(msg)) => {
                            p.stash.push_front(msg);
                            worker_stopped.get_or_insert(q);
                            break;
                        }
                    }
                }
                if p.paused
                    && p.stash.len() <= options.resume_below
                    && *stashed_bytes <= options.stash_budget / 2
                    && p.tracker.tracked() < options.max_tracked
                {
                    p.paused = false;
                    resume.push((Arc::clone(topic), *partition));
                }
                stashed |= !p.stash.is_empty();
            }
            for (topic, partition) in resume {
                if consumer.resume(&tpl_of(&topic, partition)).is_ok() {
                    stats.resumes.fetch_add(1, Relaxed);
                }
            }
            if last_commit.elapsed() >= options.commit_interval {
                last_commit = Instant::now();
                if let Some(tpl) = st.commit_list(None, false) {
                    match consumer.commit(&tpl, CommitMode::Async) {
                        Ok(()) => {
                            stats.commits.fetch_add(1, Relaxed);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "Async commit failed.");
                            // Not sent: send these points again next interval,
                            // even if they have not moved by then.
                            for el in tpl.elements() {
                                if let Some(p) =
                                    st.parts.get_mut(&(Arc::from(el.topic()), el.partition()))
                                {
                                    p.committed = None;
                                }
                            }
                        }
                    }
                }
            }
        }
        // Take a burst of what librdkafka already holds (poll(0) does not wait),
        // so the state lock and the workers' wake-ups are paid once per burst.
        let mut burst = Vec::with_capacity(BURST);
        // Stashed messages wait for queue space, which the workers free within
        // microseconds: a long wait in `poll` (nothing arrives while partitions
        // are paused) would leave the queues empty and the consumer idle.
        let mut wait = if stashed {
            STASHED_POLL_INTERVAL
        } else {
            options.poll_interval
        };
        while burst.len() < BURST {
            match consumer.poll(wait) {
                Some(Ok(m)) => burst.push(m),
                Some(Err(e)) => tracing::warn!(error = %e, "Poll error."),
                None => break,
            }
            wait = Duration::ZERO;
        }
        if burst.is_empty() {
            continue;
        }
        stats.polled.fetch_add(burst.len() as u64, Relaxed);
        let Ok(mut st) = ctx.state.lock() else {
            break Ok(());
        };
        let State {
            parts,
            stashed_bytes,
            ..
        } = &mut *st;
        let mut to_pause = Vec::new();
        for m in burst {
            // Looked up by `&str` first: no allocation per message.
            let topic = match topic_names.get(m.topic()) {
                Some(t) => Arc::clone(t),
                None => {
                    let t: Arc<str> = Arc::from(m.topic());
                    topic_names.insert(m.topic().to_owned(), Arc::clone(&t));
                    t
                }
            };
            let Some(p) = parts.get_mut(&(Arc::clone(&topic), m.partition())) else {
                // A message for a partition we no longer own: the new owner reads it.
                continue;
            };
            let msg = Message {
                payload: m.payload().map(<[u8]>::to_vec),
                key: m.key().map(<[u8]>::to_vec),
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
            };
            drop(m);
            if p.paused || !p.stash.is_empty() || p.tracker.tracked() >= options.max_tracked {
                // Behind earlier stashed messages of its partition: order holds.
                stash(p, msg, stashed_bytes, &options, &mut to_pause);
                continue;
            }
            let q = queue_for(&options, &msg, seq);
            seq += 1;
            let offset = msg.offset;
            match senders[q].try_send(msg) {
                Ok(()) => {
                    let _ = p.tracker.dispatched(offset);
                    stats.dispatched.fetch_add(1, Relaxed);
                }
                Err(TrySendError::Full(msg)) => {
                    stash(p, msg, stashed_bytes, &options, &mut to_pause);
                }
                Err(TrySendError::Disconnected(msg)) => {
                    // Kept in its stash, never dispatched: the commit point cannot
                    // pass it, whatever later offsets other queues finish.
                    stash(p, msg, stashed_bytes, &options, &mut to_pause);
                    worker_stopped.get_or_insert(q);
                }
            }
        }
        stats
            .max_stashed_bytes
            .fetch_max(*stashed_bytes as u64, Relaxed);
        drop(st);
        stats
            .max_queue_len
            .fetch_max(queue_len_max(&senders) as u64, Relaxed);
        for (t, part) in to_pause {
            if consumer.pause(&tpl_of(&t, part)).is_ok() {
                stats.pauses.fetch_add(1, Relaxed);
            }
        }
    };
    shutdown(&consumer, senders, &options);
    result
}

/// What a stashed message counts against [`SourceOptions::stash_budget`].
fn stash_cost(msg: &Message) -> usize {
    const BOOKKEEPING: usize = 128;
    msg.payload.as_ref().map_or(0, Vec::len) + msg.key.as_ref().map_or(0, Vec::len) + BOOKKEEPING
}

/// Holds `msg` back until its queue has room. A momentarily full queue is absorbed
/// here; its partition pauses (which drops librdkafka's prefetched messages and
/// refetches them on resume) only once the stashes are over their budget.
fn stash(
    p: &mut Part,
    msg: Message,
    stashed_bytes: &mut usize,
    options: &SourceOptions,
    to_pause: &mut Vec<(Arc<str>, i32)>,
) {
    let cost = stash_cost(&msg);
    let over =
        *stashed_bytes + cost > options.stash_budget || p.tracker.tracked() >= options.max_tracked;
    if !p.paused && over {
        to_pause.push((Arc::clone(&msg.topic), msg.partition));
        p.paused = true;
    }
    *stashed_bytes += cost;
    p.stash.push_back(msg);
}

fn queue_for(options: &SourceOptions, msg: &Message, seq: u64) -> usize {
    queue_index(
        options.ordering,
        options.queues,
        fnv1a(msg.topic.as_bytes()),
        msg.partition,
        msg.key.as_deref(),
        seq,
    )
}

/// Stop fetching, let the workers finish what is queued (up to the drain timeout),
/// commit synchronously, close the queues, and leave the group.
fn shutdown(
    consumer: &BaseConsumer<Context>,
    senders: Vec<Sender<Message>>,
    options: &SourceOptions,
) {
    if let Ok(assignment) = consumer.assignment() {
        let _ = consumer.pause(&assignment);
    }
    // Closing the queues lets workers run to the end of what they hold.
    drop(senders);
    let ctx = consumer.context();
    let deadline = Instant::now() + options.drain_timeout;
    if let Ok(mut st) = ctx.state.lock() {
        for p in st.parts.values_mut() {
            p.stash.clear();
        }
        st.stashed_bytes = 0;
        st.drain_in_flight(deadline, |_| true);
        if let Some(tpl) = st.commit_list(None, true) {
            // A rebalance in progress (another member leaving) refuses commits for a
            // moment: try a few times before leaving the replay to the next owner.
            for attempt in 1..=3 {
                match consumer.commit(&tpl, CommitMode::Sync) {
                    Ok(()) => break,
                    Err(e) if attempt < 3 => {
                        tracing::debug!(error = %e, attempt, "Final commit refused; retrying.");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => tracing::warn!(error = %e, "Final commit failed."),
                }
            }
        }
        for p in st.parts.values() {
            p.shared.current.fetch_add(1, Release);
        }
        st.parts.clear();
    }
    consumer.unsubscribe();
}
