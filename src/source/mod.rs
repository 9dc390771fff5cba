//! The source stage: one OS thread owns the Kafka consumer, copies each payload
//! once, puts every message in its lane, and hands the lanes' jobs to an
//! executor; finished offsets and released lanes come back over one channel, and
//! finished offsets are committed as a contiguous run per partition.
//!
//! ```text
//!             ┌───────────────────── poll thread ─────────────────────┐
//!  Kafka ───> │ poll burst ─> copy ─> track ─> lanes (dispatch::lanes) │ ──Batch──> executor
//!             │    ^ pause/resume        trackers <──┬── completions <─┼── Message::finish / drop
//!             │    └── commit (async / sync)    lanes <──┘   releases <─┼── Batch dropped
//!             └────────────────────────────────────────────────────────┘
//! ```
//!
//! The thread never blocks on the executor: a job is handed over only when there
//! is room under [`SourceOptions::max_in_flight`], and everything else waits in
//! its lane. Every message counts against [`SourceOptions::buffer_budget`] and
//! [`SourceOptions::max_buffered`] from its arrival until its job's lane is
//! released; over either, the thread stops polling until the buffers are down
//! to half, and if that takes longer than [`SourceOptions::pause_after`] it
//! **pauses** the partitions and polls on, so rebalances are served, resuming
//! them once the buffers are down to half. Memory is therefore bounded by the
//! budget plus one poll burst, beside librdkafka's own bounded prefetch.
//!
//! On revoke, the revoked partitions' waiting messages are dropped (never
//! started; the new owner reads them), their running work is given up to
//! [`SourceOptions::drain_timeout`], their contiguous point is committed
//! synchronously, and what still runs is cancelled (async handlers) or marked
//! stale (queued sync batches are dropped unhandled). Shutdown does the same for
//! every partition.
//!
//! A [`Message`] finishes its offset with [`Message::finish`], holds it with
//! [`Message::hold`], and **holds it when dropped** unfinished (a panic, a
//! cancelled future): the commit point stays before it, but revoke and shutdown
//! do not wait for it.

mod poll;
mod stall;
mod watch;

use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{Acquire, Release},
};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use rdkafka::error::KafkaError;

use crate::config::{ConfigError, KafkaConsumerConfig};
use crate::dispatch::lanes::{Item, LaneId};
use crate::dispatch::Ordering;

pub(crate) use poll::RebalanceHooks;
pub use stall::PartitionState;
pub use watch::PartitionProgress;

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
    /// The executor stopped taking jobs (its workers are gone) while messages
    /// still came. The job that found it closed is dropped unfinished, so nothing
    /// at or after it in its partition is committed.
    #[error("the executor stopped: its workers are gone")]
    WorkerStopped,
    /// The poll thread panicked.
    #[error("the poll thread panicked: {0}")]
    Panicked(String),
    /// The poll thread could not be started.
    #[error("cannot start the poll thread: {0}")]
    Spawn(#[from] std::io::Error),
}

/// Limits of the source stage. In configuration files every field is
/// optional (its default applies) and durations read as `500ms`, `30s`,
/// `5m` or `1h` ([`crate::config::duration`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct SourceOptions {
    /// How events are put in lanes, and so what order is kept. Default: per
    /// partition.
    pub ordering: Ordering,
    /// Jobs handed to the executor and not yet finished: at most this many
    /// handler calls run at once. Default 1,024: the services this crate serves
    /// mostly wait on other services, and by Little's law 1,024 calls of ~20 ms
    /// keep ~50,000 events/s moving, more than one consumer's partitions usually
    /// carry; a few KB of task state each. Past it, lanes with waiting events
    /// queue for room, oldest first.
    pub max_in_flight: usize,
    /// Most waiting events of one lane handed over as one job (run in order by
    /// one executor). Default 64: a busy partition costs one hand-off and one
    /// release per 64 events instead of per event.
    pub batch: usize,
    /// Bytes of messages between their arrival and their job's release (payload,
    /// key and ~128 bytes of bookkeeping each). Default 16 MiB: a quarter of
    /// librdkafka's own prefetch limit, about 13,000 ~1 KB events. Over it, the
    /// partition of each arriving message is **paused**, and resumes once the
    /// buffers are at most half full. A pause is not free: librdkafka drops the
    /// partition's prefetched messages and fetches them again after the resume.
    pub buffer_budget: usize,
    /// Messages between their arrival and their job's release, counted as for
    /// `buffer_budget` (which tiny messages would not reach). Default 50,000.
    pub max_buffered: usize,
    /// How long the poll thread stops polling, the buffers over budget and the
    /// handlers draining them, before it pauses the partitions. Default 1 s:
    /// while handlers make progress, the buffers drain from full to half in a
    /// fraction of that at any useful rate, and a pause, which drops
    /// librdkafka's prefetch and refetches it, is avoided; while nothing is
    /// polled, rebalances wait, so it is kept well under the rebalance timeout.
    /// Handlers that stall (no completion for 100 ms) pause at once, so polling,
    /// and with it rebalances, goes on while nothing is fetched. While it does
    /// not poll, librdkafka still prefetches, within its own
    /// `queued.max.messages.kbytes`.
    #[serde(with = "crate::config::duration")]
    pub pause_after: Duration,
    /// How often the contiguous commit points are committed (asynchronously).
    /// Default 1 s: a crash replays at most about a second of finished work.
    #[serde(with = "crate::config::duration")]
    pub commit_interval: Duration,
    /// How long revoke and shutdown wait for running work before committing what
    /// finished and cancelling the rest. Default 10 s, well inside the 30 s
    /// session timeout.
    #[serde(with = "crate::config::duration")]
    pub drain_timeout: Duration,
    /// Longest single wait in `poll` while nothing runs. Default 50 ms: commits
    /// and resumes are handled at least this often when no message arrives.
    #[serde(with = "crate::config::duration")]
    pub poll_interval: Duration,
    /// Offsets tracked per partition from its commit point on: waiting, running,
    /// held, or finished behind an unfinished one. Default 100,000 (16 bytes
    /// each, so 1.6 MB a partition; about what a replay after a crash may cost).
    /// At the limit the partition is **paused** until its commit point moves, so
    /// one offset that never finishes (a held message, a report that failed for
    /// good) bounds memory and the replay instead of growing both without end.
    pub max_tracked: usize,
    /// Whether each commit carries, in its metadata, the offsets above the
    /// commit point that already finished (see [`crate::offsets::progress`]),
    /// and whether an assigned partition's committed map is read, so a restart
    /// or the next owner skips them (counted in [`SourceStats::skipped_done`])
    /// instead of replaying them. Default on. A map that does not decode is
    /// ignored with a warning: its offsets are replayed, never skipped.
    pub completion_map: bool,
    /// Most bytes of one partition's map. Default 2,048
    /// ([`crate::offsets::progress::DEFAULT_MAX_BYTES`], where the reason is);
    /// at most 4,096, the broker's default `offset.metadata.max.bytes`, past
    /// which the broker refuses the whole commit. A map that does not fit is
    /// cut to its longest prefix that does; the rest is replayed.
    pub completion_map_max_bytes: usize,
    /// How long a partition may hold unfinished work while its commit point
    /// stands still before it counts as **stalled**: health then answers not
    /// alive (`GET /health` 503, naming the partitions and their oldest
    /// unfinished offsets) and an error is logged, so an orchestrator restarts
    /// the process and the work is replayed. `None` turns detection off.
    /// Default 5 minutes: far longer than one event's work should take in a
    /// service this crate serves (a handler, XZepr's 10–14 s posts while its
    /// Kafka is down, the reporter's retries), and short enough that a hung
    /// consumer is recovered within an incident rather than found the next day.
    #[serde(with = "crate::config::duration::option")]
    pub stall_timeout: Option<Duration>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            ordering: Ordering::PerPartition,
            max_in_flight: 1024,
            batch: 64,
            buffer_budget: 16 << 20,
            max_buffered: 50_000,
            pause_after: Duration::from_secs(1),
            commit_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(50),
            max_tracked: 100_000,
            completion_map: true,
            completion_map_max_bytes: crate::offsets::progress::DEFAULT_MAX_BYTES,
            stall_timeout: Some(Duration::from_secs(300)),
        }
    }
}

impl SourceOptions {
    pub(crate) fn validate(&self, session_timeout: Duration) -> Result<(), SourceError> {
        let bad = |field, reason| Err(SourceError::InvalidOption { field, reason });
        if self.max_in_flight == 0 {
            return bad("max_in_flight", "must be at least 1");
        }
        if self.batch == 0 {
            return bad("batch", "must be at least 1");
        }
        if self.buffer_budget == 0 {
            return bad("buffer_budget", "must be at least 1 byte");
        }
        if self.max_buffered == 0 {
            return bad("max_buffered", "must be at least 1");
        }
        if self.max_tracked == 0 {
            return bad("max_tracked", "must be at least 1");
        }
        if self.completion_map_max_bytes > crate::offsets::progress::BROKER_DEFAULT_MAX_BYTES {
            return bad(
                "completion_map_max_bytes",
                "must be at most 4,096 (the broker's default offset.metadata.max.bytes)",
            );
        }
        if self.stall_timeout == Some(Duration::ZERO) {
            return bad(
                "stall_timeout",
                "must be more than zero (None turns stall detection off)",
            );
        }
        if self.pause_after >= session_timeout {
            return bad("pause_after", "must be shorter than the session timeout");
        }
        if self.drain_timeout >= session_timeout {
            return bad("drain_timeout", "must be shorter than the session timeout");
        }
        Ok(())
    }
}

/// A message copied out of librdkafka, with what it needs to finish itself.
///
/// Dropping it unfinished **holds** its offset (see [`Message::hold`]).
#[derive(Debug)]
pub struct Message {
    /// Payload then key, in one buffer taken from (and given back to) the
    /// source's pool: the one copy out of librdkafka, never freed on a thread
    /// other than the one that allocated it (glibc's arenas lock on that).
    data: Vec<u8>,
    /// Payload length; `None` for a null payload.
    payload_len: Option<usize>,
    /// Whether there is a key (the rest of `data`).
    has_key: bool,
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
    completed: bool,
}

/// Per-partition state a message needs to finish itself: one `Arc` per message.
#[derive(Debug)]
pub(crate) struct PartShared {
    /// The partition's current epoch; bumped on revoke.
    current: AtomicU64,
    done: Sender<Completion>,
    /// Cancelled when the partition's drain deadline passes: running async
    /// handlers stop, and their offsets stay unfinished.
    pub(crate) cancel: tokio_util::sync::CancellationToken,
    /// Where finished messages give their buffer back.
    pub(crate) recycle: Arc<Recycler>,
}

/// Message buffers given back by finished messages and reused by the poll
/// thread's copy, so a buffer is allocated and freed on one thread (glibc's
/// malloc locks the owning arena when another thread frees into it, and the
/// poll thread then waits on the workers). Holds at most `cap` bytes of
/// capacity, the buffer budget, so an idle consumer keeps no more than what a
/// busy one is allowed to buffer.
#[derive(Debug)]
pub(crate) struct Recycler {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    bytes: std::sync::atomic::AtomicUsize,
    cap: usize,
}

impl Recycler {
    pub(crate) fn new(cap: usize) -> Self {
        // The count bound only sizes the channel; the byte cap is the limit.
        let (tx, rx) = crossbeam_channel::bounded(65_536);
        Recycler {
            tx,
            rx,
            bytes: std::sync::atomic::AtomicUsize::new(0),
            cap,
        }
    }

    /// A buffer to copy into (empty, maybe with capacity).
    pub(crate) fn take(&self) -> Vec<u8> {
        match self.rx.try_recv() {
            Ok(buf) => {
                self.bytes
                    .fetch_sub(buf.capacity(), std::sync::atomic::Ordering::Relaxed);
                buf
            }
            Err(_) => Vec::new(),
        }
    }

    fn give(&self, mut buf: Vec<u8>) {
        let n = buf.capacity();
        let held = self.bytes.load(std::sync::atomic::Ordering::Relaxed);
        if n == 0 || held + n > self.cap {
            return;
        }
        buf.clear();
        self.bytes
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.tx.try_send(buf) {
            self.bytes.fetch_sub(
                e.into_inner().capacity(),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }
}

impl Message {
    /// The payload (the one copy; decoders borrow from it).
    pub fn payload(&self) -> Option<&[u8]> {
        self.payload_len.map(|n| &self.data[..n])
    }

    /// The key.
    pub fn key(&self) -> Option<&[u8]> {
        self.has_key
            .then(|| &self.data[self.payload_len.unwrap_or(0)..])
    }

    /// Headers as `(key, value)` pairs, for binary-mode decoding.
    pub fn header_pairs(&self) -> impl Iterator<Item = (&str, &[u8])> + Clone {
        self.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// False once this message's partition was revoked (or reassigned) after it
    /// was handed over: its work must not run, the new owner has it.
    pub fn is_current(&self) -> bool {
        self.shared.current.load(Acquire) == self.epoch
    }

    /// Marks the offset finished. Its partition's commit point passes it once every
    /// earlier offset has finished too.
    pub fn finish(mut self) {
        self.complete(false);
    }

    /// Marks the offset held: it will not finish in this assignment, so the
    /// commit point stays at or before it (a restart or the next owner reads it
    /// again), but revoke and shutdown no longer wait for it.
    pub fn hold(mut self) {
        self.complete(true);
    }

    fn complete(&mut self, held: bool) {
        self.completed = true;
        send_completion(
            &self.shared.done,
            Completion::Offset {
                topic: Arc::clone(&self.topic),
                partition: self.partition,
                offset: self.offset,
                epoch: self.epoch,
                held,
            },
        );
    }
}

impl Drop for Message {
    /// Holds the offset at once, so a panicking path or a cancelled future never
    /// makes a drain wait for a message nobody will finish; gives the buffer
    /// back to the source's pool.
    fn drop(&mut self) {
        if !self.completed {
            self.complete(true);
        }
        self.shared.recycle.give(std::mem::take(&mut self.data));
    }
}

impl Item for Message {
    fn key(&self) -> Option<&[u8]> {
        Message::key(self)
    }
    fn cost(&self) -> usize {
        const BOOKKEEPING: usize = 128;
        self.data.len() + BOOKKEEPING
    }
}

thread_local! {
    /// Completions held back on this thread while a [`DeferCompletions`] guard
    /// lives, sent as one.
    static DEFERRED: std::cell::RefCell<Option<(Sender<Completion>, Vec<Completion>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Sends `c` to the poll thread, or holds it back while this thread defers.
fn send_completion(done: &Sender<Completion>, c: Completion) {
    let c = DEFERRED.with(|d| match &mut *d.borrow_mut() {
        Some((to, held)) if to.same_channel(done) => {
            held.push(c);
            None
        }
        _ => Some(c),
    });
    if let Some(c) = c {
        // The poll thread may be gone (shutdown): then nothing is committed, and
        // the offset is replayed, which is the safe side.
        let _ = done.send(c);
    }
}

/// While it lives, completions made on this thread (finished offsets, released
/// lanes) are held back and sent as one when it drops: a worker running a job
/// of 64 events wakes the poll thread once, not 65 times. Used per poll of a
/// job ([`deferring`]).
struct DeferCompletions(());

impl DeferCompletions {
    fn to(done: &Sender<Completion>, expected: usize) -> Self {
        DEFERRED.with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some((done.clone(), Vec::with_capacity(expected)));
            }
        });
        DeferCompletions(())
    }
}

/// Where a job's deferred completions go ([`Batch::deferral`]).
pub(crate) struct Deferral {
    done: Sender<Completion>,
    expected: usize,
}

/// Runs a job's future with its completions deferred during each poll: what
/// finishes within one poll (often the whole job) reaches the poll thread as
/// one message. A guard per poll, never across an `.await`, so it suits tasks
/// that move between threads and jobs that wait.
pub(crate) async fn deferring<F: std::future::Future>(to: Deferral, job: F) -> F::Output {
    let Deferral { done, expected } = to;
    let mut job = std::pin::pin!(job);
    std::future::poll_fn(|cx| {
        let _defer = DeferCompletions::to(&done, expected);
        job.as_mut().poll(cx)
    })
    .await
}

impl Drop for DeferCompletions {
    fn drop(&mut self) {
        if let Some((to, held)) = DEFERRED.with(|d| d.borrow_mut().take()) {
            if !held.is_empty() {
                let _ = to.send(Completion::Many(held));
            }
        }
    }
}

/// What comes back to the poll thread.
#[derive(Debug)]
pub(crate) enum Completion {
    /// Several, from one job (see [`DeferCompletions`]).
    Many(Vec<Completion>),
    Offset {
        topic: Arc<str>,
        partition: i32,
        offset: i64,
        epoch: u64,
        held: bool,
    },
    /// A job finished; its emptied vector comes back for reuse.
    Release(LaneId, Vec<Message>),
}

/// Messages of one lane to handle **in order**, one at a time; dropping the
/// batch releases the lane, so its next messages may run. Messages left in it
/// when it is dropped are held.
#[derive(Debug)]
pub struct Batch {
    items: std::collections::VecDeque<Message>,
    lane: LaneId,
    done: Sender<Completion>,
}

impl Batch {
    /// Messages not yet taken.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when every message was taken.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// For [`deferring`] the job that runs this batch.
    pub(crate) fn deferral(&self) -> Deferral {
        Deferral {
            done: self.done.clone(),
            expected: self.len() + 1,
        }
    }

    /// Cancelled once the batch's partition passed its drain deadline (`None`
    /// for an empty batch).
    pub(crate) fn cancellation(&self) -> Option<tokio_util::sync::CancellationToken> {
        self.items.front().map(|m| m.shared.cancel.clone())
    }
}

impl Iterator for Batch {
    type Item = Message;
    fn next(&mut self) -> Option<Message> {
        self.items.pop_front()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // Messages first: their holds reach the poll thread before the release.
        self.items.clear();
        let items = Vec::from(std::mem::take(&mut self.items));
        send_completion(&self.done, Completion::Release(self.lane, items));
    }
}

/// Where the poll thread hands jobs. Never blocks: the scheduler hands over at
/// most `max_in_flight` jobs, so a bounded channel of that size never fills.
pub(crate) trait Executor: Send + 'static {
    /// Runs `batch`; gives it back when the executor is gone.
    fn execute(&self, batch: Batch) -> Result<(), Batch>;
}

/// The raw source's executor: a channel that any number of threads read.
#[derive(Debug)]
pub(crate) struct ChannelExecutor(pub(crate) Sender<Batch>);

impl Executor for ChannelExecutor {
    fn execute(&self, batch: Batch) -> Result<(), Batch> {
        use crossbeam_channel::TrySendError;
        match self.0.try_send(batch) {
            Ok(()) => Ok(()),
            // Only a channel with no reader means the workers are gone. The
            // scheduler counts every job until its release (a revoked
            // partition's too), so the channel, sized `max_in_flight`, has room
            // for every job it hands out; should it be full all the same, the
            // workers are alive and taking jobs, so wait for one.
            Err(TrySendError::Full(batch)) => self.0.send(batch).map_err(|e| e.into_inner()),
            Err(TrySendError::Disconnected(batch)) => Err(batch),
        }
    }
}

/// Counters and gauges of the source stage, readable while it runs.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Messages polled from librdkafka.
    pub polled: AtomicU64,
    /// Messages handed to the executor.
    pub dispatched: AtomicU64,
    /// Jobs handed to the executor.
    pub jobs: AtomicU64,
    /// Times a partition was paused (buffers over budget, or the tracking limit).
    pub pauses: AtomicU64,
    /// Times a paused partition was resumed.
    pub resumes: AtomicU64,
    /// Commits sent (async and sync).
    pub commits: AtomicU64,
    /// Synchronous commits on revoke that the broker refused.
    pub revoke_commit_failures: AtomicU64,
    /// Partitions currently assigned.
    pub assigned: AtomicU64,
    /// Jobs running now (handler calls in progress, or queued for a sync worker).
    pub in_flight: AtomicU64,
    /// The most jobs that ran at once (never above `max_in_flight`).
    pub peak_in_flight: AtomicU64,
    /// Bytes buffered now (see [`SourceOptions::buffer_budget`]).
    pub buffered_bytes: AtomicU64,
    /// The most bytes buffered at once; above the budget only by the messages
    /// librdkafka had already handed over for a partition when it was paused.
    pub peak_buffered_bytes: AtomicU64,
    /// Lanes alive now.
    pub lanes: AtomicU64,
    // For health and metrics (see `watch`).
    /// Messages buffered now (see [`SourceOptions::max_buffered`]).
    pub buffered: AtomicU64,
    /// True once the consumer joined its group: an assignment came, even an
    /// empty one (more members than partitions).
    pub group_joined: AtomicBool,
    /// True while no broker is reachable: set by librdkafka's
    /// `ALL_BROKERS_DOWN` event and by statistics without a broker up, cleared
    /// by the next statistics with one.
    pub brokers_down: AtomicBool,
    /// Messages finished without dispatch: a previous owner's completion map
    /// said they were done (see [`SourceOptions::completion_map`]).
    pub skipped_done: AtomicU64,
    /// Committed completion maps ignored because they did not decode (their
    /// offsets are replayed).
    pub completion_maps_ignored: AtomicU64,
}

/// The running source: its executor's receiving end is handed out once.
#[derive(Debug)]
pub struct Source {
    receiver: Option<Receiver<Batch>>,
    handle: SourceHandle,
}

/// The last commit points sent: `(topic, partition, next offset to read)`.
pub(crate) type Committed = Arc<Mutex<Vec<(Arc<str>, i32, i64)>>>;

/// The poll thread, returning the error it stopped on.
type PollThread = JoinHandle<Result<(), SourceError>>;

/// Controls a running source: shutdown, stats, committed offsets.
#[derive(Debug, Clone)]
pub struct SourceHandle {
    stop: Arc<AtomicBool>,
    /// When [`SourceHandle::shutdown`] was first called: `join`'s bound runs from it.
    stop_at: Arc<Mutex<Option<std::time::Instant>>>,
    /// How long the poll thread drains (the bound's first part).
    drain_timeout: Duration,
    stats: Arc<SourceStats>,
    committed: Committed,
    thread: Arc<Mutex<Option<PollThread>>>,
    /// The assigned partitions' progress, from librdkafka's statistics.
    progress: Arc<Mutex<Vec<PartitionProgress>>>,
    /// The assigned partitions' commit points and stalls, from the poll thread.
    states: Arc<Mutex<Vec<PartitionState>>>,
}

impl Source {
    /// Creates the consumer, subscribes, and starts the poll thread. Jobs are
    /// read from [`Source::take_receiver`], by any number of threads.
    ///
    /// # Errors
    /// [`SourceError::Config`] for bad settings, [`SourceError::InvalidOption`],
    /// [`SourceError::Kafka`] if librdkafka refuses the configuration.
    pub fn start(
        config: &KafkaConsumerConfig,
        options: SourceOptions,
    ) -> Result<Source, SourceError> {
        let (tx, rx) = crossbeam_channel::bounded(options.max_in_flight.max(1));
        let handle = Self::start_with(config, options, None, Box::new(ChannelExecutor(tx)))?;
        Ok(Source {
            receiver: Some(rx),
            handle,
        })
    }

    /// Starts the poll thread handing jobs to `executor`, calling `hooks` around
    /// rebalances.
    pub(crate) fn start_with(
        config: &KafkaConsumerConfig,
        options: SourceOptions,
        hooks: Option<Arc<dyn RebalanceHooks>>,
        executor: Box<dyn Executor>,
    ) -> Result<SourceHandle, SourceError> {
        options.validate(config.session_timeout)?;
        poll::start(config, options, hooks, executor)
    }

    /// The jobs' receiving end, taken once (clone it for more reader threads).
    pub fn take_receiver(&mut self) -> Option<Receiver<Batch>> {
        self.receiver.take()
    }

    /// A handle to stop the source and read its stats.
    pub fn handle(&self) -> SourceHandle {
        self.handle.clone()
    }
}

impl SourceHandle {
    /// Asks the poll thread to stop: it stops fetching, drains running work up to
    /// the drain timeout, commits synchronously, and closes the consumer.
    pub fn shutdown(&self) {
        if let Ok(mut at) = self.stop_at.lock() {
            at.get_or_insert_with(std::time::Instant::now);
        }
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
        // After a shutdown the wait is bounded: the drain, then the final
        // commit, the unsubscribe and the close within `SHUTDOWN_GRACE`,
        // whatever the brokers do. A thread still inside librdkafka's close
        // then is left to finish on its own; what it had not committed is
        // replayed by the next owner.
        let stopped_at = self.stop_at.lock().ok().and_then(|at| *at);
        if let Some(at) = stopped_at {
            let deadline = at + self.drain_timeout + poll::SHUTDOWN_GRACE;
            while !self.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !self.is_finished() {
                tracing::error!(
                    "The poll thread is still closing the consumer past the shutdown bound; left to finish on its own."
                );
                drop(self.thread.lock().ok().and_then(|mut t| t.take()));
                return Ok(());
            }
        }
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        match thread.map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(panic)) => Err(SourceError::Panicked(panic_message(&*panic))),
            None => Ok(()),
        }
    }

    /// The source's counters.
    pub fn stats(&self) -> &SourceStats {
        &self.stats
    }

    /// The offsets last committed (sent) per partition: `(topic, partition,
    /// next offset to read)`.
    pub fn committed(&self) -> Vec<(Arc<str>, i32, i64)> {
        self.committed.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// The assigned partitions' committed offsets, high watermarks and lag,
    /// sorted by topic and partition, as of librdkafka's last statistics (at
    /// most a second old while the poll thread runs).
    pub fn partitions(&self) -> Vec<PartitionProgress> {
        self.progress.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// The assigned partitions' commit points, unfinished and held offsets,
    /// and stalls (see [`SourceOptions::stall_timeout`]), sorted by topic and
    /// partition, as the poll thread last saw them (at most a second old).
    pub fn partition_states(&self) -> Vec<PartitionState> {
        self.states.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// The stalled partitions among [`SourceHandle::partition_states`].
    pub fn stalled_partitions(&self) -> Vec<PartitionState> {
        self.states
            .lock()
            .map(|p| p.iter().filter(|s| s.stalled).cloned().collect())
            .unwrap_or_default()
    }

    /// True once [`SourceHandle::shutdown`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stop.load(Acquire)
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned())
}
