//! The reporter stage: lifecycle records from the workers to XZepr's events API.
//!
//! ```text
//!  workers ──send / send_blocking──> bounded queue ──> max_in_flight posting tasks
//!                                     (full: the worker waits)   │  (each: take one record,
//!                                                                 │   encode into its own
//!                                                                 │   buffer, post over the
//!                                                                 │   keep-alive pool, retry)
//!          ack(Ok(event id)) <── after a 2xx ──────────────────────┘
//! ```
//!
//! The posting tasks are started once and live as long as the reporter: a record
//! costs no task spawn, and the number of tasks *is* the in-flight bound.
//!
//! - **Never drops**: a full queue makes the submitting worker wait; a record that
//!   exhausts its retries is acknowledged with its error, never silently lost.
//! - **Order per work id**: a `completed`/`failed` waits until its `started` was
//!   acknowledged. If the `started` fails for good, its terminal record fails
//!   unsent (acknowledged with [`ReportError::Failed`], `attempts: 0`), whether
//!   it was waiting already or is submitted later: XZepr never sees a
//!   `completed`/`failed` without its `started`. The submitter's offset stays
//!   unfinished, so a replay submits both again. (The work ids whose `started`
//!   failed are remembered up to [`ReporterConfig::failed_starts_capacity`]; a
//!   terminal submitted with no `started` ever seen is posted as given.)
//! - **A stable key per post**: every lifecycle body carries
//!   `details.post_key` = `{work_id}:{status}` (see [`crate::client::post_key`]),
//!   the same on every retry and replay.
//! - **Lost responses**: a post handed in full to XZepr whose answer never came
//!   (timeout, or the connection closed) may have been recorded. It is re-sent
//!   all the same (at least once), counted in
//!   [`ReporterStats::resent_after_lost_response`] and logged at `warn` as
//!   "re-sent after a lost response"; a duplicate it causes carries the same
//!   `post_key`. With the client's 30 s default timeout this takes a server
//!   slower than XZepr's slowest measured answer (10–14 s).
//! - **Required fields are never empty**: an empty `platform_id` (a source event
//!   without one) is posted as the `package`, other empty fields as `unknown`
//!   ([`WorkRef::with_fallbacks`]), so no record is refused for them.
//! - **Coalescing**: a (work id, status) already acknowledged, or being posted
//!   right now (a replay after a rebalance or restart produces these), is not sent
//!   again: it is acknowledged with the result of the one post.
//! - **Retries** with exponential backoff and jitter on connection errors, timeouts,
//!   5xx and 429 (a `Retry-After` is honoured); other 4xx are final. A **circuit
//!   breaker** opens after a run of failures: posts wait out the cool-down (they
//!   are not failed), then one probe goes out alone (half-open); its success
//!   closes the breaker, its failure opens it again (see `breaker.rs`).
//! - **A refused token** (401/403) holds the posts the same way from the first
//!   refusal, with a hold that doubles per refused probe up to
//!   [`ReporterConfig::unauthorized_hold_max`]: one post now and then instead of
//!   every record in a loop. [`ReporterStats::unauthorized`] is set (the
//!   pipeline is not ready, `xzepr_consumer_reporter_unauthorized` is 1) and
//!   one error names the status, until a post is answered otherwise. While held,
//!   the queue fills and the submitters wait. Once every [`Reporter`] is
//!   dropped, held posts are acknowledged [`ReportError::Closed`].
//! - **Resubmission** by the pipeline of records that failed for now waits
//!   [`Reporter::resubmit_delay`] (growing per round) holding a queue slot
//!   ([`ReporterConfig::queue_capacity`]), so unreported work cannot pile up.
//! - **Receiver rediscovery**: XZepr keeps receivers in memory, so after it
//!   restarts a receiver id comes back 404. For a receiver this client discovered
//!   ([`XzeprClient::discover_or_create_event_receiver`]) the reporter discovers it
//!   again once, posts the record under the new id, and uses the new id for every
//!   later record of the old one.
//!
//! Records parked for ordering or coalescing are out of the queue: at most
//! `max_in_flight` `started` posts are in flight, so at most that many work ids
//! hold parked records.

use std::collections::{HashMap, VecDeque};
mod breaker;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use breaker::{Answer, Breaker};

pub use crate::client::Status;
use crate::client::{ClientError, LifecycleBody, Phase, WorkRef, XzeprClient};
use crate::config::ConfigError;
use crate::ErrorChain;

/// Reporter errors, as acknowledged to the submitter.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The post failed for good (a final 4xx, or retries exhausted), or was
    /// never sent (`attempts: 0`).
    #[error("lifecycle post failed after {attempts} attempt(s): {reason}")]
    Failed {
        /// Attempts made.
        attempts: u32,
        /// Why it stopped there (the client's error, if any, is the source).
        reason: Arc<str>,
        /// Whether the last error was retryable (retries ran out).
        retryable: bool,
        /// The last attempt's error, when one was made.
        #[source]
        source: Option<Arc<ClientError>>,
    },
    /// XZepr refused the post with a 4xx it will never accept (any but 401, 403,
    /// 404 and 429): sending it again cannot help.
    #[error("lifecycle post rejected with HTTP {status}: {reason}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The error.
        reason: Arc<str>,
        /// The response body, as XZepr sent it.
        body: Arc<str>,
    },
    /// The reporter was shut down before the record could be sent.
    #[error("the reporter is shut down")]
    Closed,
}

impl ReportError {
    /// The client error of the last attempt, when one was made (also the
    /// error's `source()`, as an `Arc<ClientError>`: a failure is shared by
    /// every record coalesced into the post).
    pub fn client_error(&self) -> Option<&ClientError> {
        match self {
            ReportError::Failed { source, .. } => source.as_deref(),
            _ => None,
        }
    }

    /// Whether XZepr will never accept the post ([`ReportError::Rejected`]).
    pub fn is_rejected(&self) -> bool {
        matches!(self, ReportError::Rejected { .. })
    }
}

/// Limits and policies of the reporter. Every bound has a numeric default.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReporterConfig {
    /// Records waiting to be sent, counting those that failed for now and
    /// wait to be submitted again ([`Reporter::resubmit_delay`]). Default 4096
    /// (two per event: ~2,000 events of slack). Full: submitters wait, so while
    /// XZepr takes nothing the handlers stop being fed instead of piling up
    /// unreported work.
    pub queue_capacity: usize,
    /// Posts in flight at once. Default 128: the real server (~5.5 ms a post)
    /// reached ~7,800 posts/s at 64 concurrent connections; twice that keeps the
    /// server, not this client, the limit when its latency spikes. More waits for
    /// a slot (and so, through the queue, holds the workers).
    pub max_in_flight: usize,
    /// Attempts per record, the first included. Default 8: with the backoff below,
    /// up to ~6 s of waiting between attempts (~3 s on average), plus whatever the
    /// breaker holds them; a record that still fails comes back failed and its
    /// offset stays uncommitted.
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt, with full jitter. Default 50 ms.
    pub backoff_base: Duration,
    /// Longest retry delay. Default 5 s.
    pub backoff_max: Duration,
    /// Consecutive failures that open the breaker. Default 20.
    pub breaker_threshold: u32,
    /// How long the open breaker holds posts before one probes. Default 2 s.
    /// Also the first hold after XZepr refuses the credentials (401/403).
    pub breaker_cooldown: Duration,
    /// Longest hold between probes while XZepr refuses the credentials
    /// (401/403): the hold starts at `breaker_cooldown` and doubles with each
    /// refused probe, with jitter. Default 60 s: one post a minute at most
    /// against a refusing XZepr, and a fixed token is noticed within a minute.
    pub unauthorized_hold_max: Duration,
    /// Longest wait before a record that failed for now (retries exhausted, a
    /// 404 no rediscovery fixed, a refusal) is submitted again by the
    /// pipeline: the wait starts at `backoff_max` and doubles with each
    /// resubmission of the record, with jitter. Default 60 s, for the same
    /// reasons as `unauthorized_hold_max`.
    pub resubmit_backoff_max: Duration,
    /// Acknowledged (work id, status) pairs remembered for coalescing. Default
    /// 65,536 (a few MB); the oldest are forgotten first.
    pub dedup_capacity: usize,
    /// At most this many posts per second, if set. Default: no limit.
    pub rate_limit: Option<u32>,
    /// Work ids whose `started` failed for good, remembered so their later
    /// `completed`/`failed` fails unsent instead of going out without it.
    /// Default 65,536 (a few MB); the oldest are forgotten first.
    pub failed_starts_capacity: usize,
}

impl Default for ReporterConfig {
    fn default() -> Self {
        ReporterConfig {
            queue_capacity: 4096,
            max_in_flight: 128,
            max_attempts: 8,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            breaker_threshold: 20,
            breaker_cooldown: Duration::from_secs(2),
            unauthorized_hold_max: Duration::from_secs(60),
            resubmit_backoff_max: Duration::from_secs(60),
            dedup_capacity: 65_536,
            rate_limit: None,
            failed_starts_capacity: 65_536,
        }
    }
}

/// What to post and whom to tell.
pub struct Record {
    /// The work's identity.
    pub work: OwnedWork,
    /// Which lifecycle event.
    pub status: Status,
    /// `details` of the payload.
    pub details: Value,
    /// For `failed`: message and code.
    pub error: Option<(String, String)>,
    /// Called once: `Ok(event id)` after a 2xx, or the final error.
    pub ack: Ack,
}

/// The acknowledgement of one [`Record`]: called exactly once. A record dropped
/// unsent (its reporter's runtime shut down, a task cancelled) acknowledges
/// [`ReportError::Closed`], so no caller waits for ever.
pub struct Ack(Option<AckFn>);

type AckFn = Box<dyn FnOnce(Result<String, ReportError>) + Send>;

impl Ack {
    /// Wraps the callback.
    pub fn new(f: impl FnOnce(Result<String, ReportError>) + Send + 'static) -> Self {
        Ack(Some(Box::new(f)))
    }

    /// Calls the callback with `result`.
    pub fn send(mut self, result: Result<String, ReportError>) {
        if let Some(f) = self.0.take() {
            f(result);
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Err(ReportError::Closed));
        }
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ack")
    }
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("work", &self.work)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// The owned form of [`WorkRef`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OwnedWork {
    /// Receiver id.
    pub receiver_id: String,
    /// Work id.
    pub work_id: String,
    /// Work name.
    pub work_name: String,
    /// Work version.
    pub work_version: String,
    /// Platform id.
    pub platform_id: String,
    /// Package (service name).
    pub package: String,
}

impl OwnedWork {
    /// Builds it.
    pub fn new(
        receiver_id: impl Into<String>,
        work_id: impl Into<String>,
        work_name: impl Into<String>,
        work_version: impl Into<String>,
        platform_id: impl Into<String>,
        package: impl Into<String>,
    ) -> Self {
        OwnedWork {
            receiver_id: receiver_id.into(),
            work_id: work_id.into(),
            work_name: work_name.into(),
            work_version: work_version.into(),
            platform_id: platform_id.into(),
            package: package.into(),
        }
    }

    fn as_ref(&self) -> WorkRef<'_> {
        WorkRef::new(
            &self.receiver_id,
            &self.work_id,
            &self.work_name,
            &self.work_version,
            &self.platform_id,
            &self.package,
        )
    }
}

/// Counters of the reporter.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct ReporterStats {
    /// Posts acknowledged by XZepr.
    pub posted: std::sync::atomic::AtomicU64,
    /// Records acknowledged without a post (already acknowledged before).
    pub coalesced: std::sync::atomic::AtomicU64,
    /// Retries made.
    pub retries: std::sync::atomic::AtomicU64,
    /// Records that failed for good.
    pub failed: std::sync::atomic::AtomicU64,
    /// Times the breaker opened.
    pub breaker_opened: std::sync::atomic::AtomicU64,
    /// True from the breaker's opening until a post gets an answer again (while
    /// it is open and while its probe is out): XZepr is taken to be unreachable.
    pub breaker_open: std::sync::atomic::AtomicBool,
    /// Posts re-sent after a lost response: the previous attempt was handed in
    /// full to XZepr and no answer came, so XZepr may have recorded it. Each
    /// duplicate XZepr holds is one of these (and carries the same `post_key`).
    pub resent_after_lost_response: std::sync::atomic::AtomicU64,
    /// `completed`/`failed` records failed unsent because their `started` was
    /// not acknowledged.
    pub terminal_without_started: std::sync::atomic::AtomicU64,
    /// True from a 401/403 answer until XZepr answers a post otherwise: it
    /// refuses this client's credentials, posts are held (one probes now and
    /// then), and the pipeline is not ready.
    pub unauthorized: std::sync::atomic::AtomicBool,
    /// Posts answered 401 or 403.
    pub unauthorized_answers: std::sync::atomic::AtomicU64,
}

pub use crate::dispatch::OwnReceivers;

/// Checks the work fields a lifecycle configuration gives every post: XZepr
/// requires each to be non-empty, and an empty work name would be recorded as
/// `.started`. Call it when the configuration is built.
///
/// # Errors
/// [`ConfigError::Empty`] naming the first empty (or blank) field: `work_name`,
/// `work_version`, `release` or `package`.
pub fn validate_work_fields(
    work_name: &str,
    work_version: &str,
    release: &str,
    package: &str,
) -> Result<(), ConfigError> {
    for (name, value) in [
        ("work_name", work_name),
        ("work_version", work_version),
        ("release", release),
        ("package", package),
    ] {
        if value.trim().is_empty() {
            return Err(ConfigError::Empty { name });
        }
    }
    Ok(())
}

/// Submits records; cheap to clone.
#[derive(Debug, Clone)]
pub struct Reporter {
    tx: mpsc::Sender<Record>,
    stats: Arc<ReporterStats>,
    own: OwnReceivers,
    /// The longest retry delay: how long a record that failed waits before it
    /// is submitted again by the pipeline, the first time.
    resubmit_after: Duration,
    /// The longest such wait ([`ReporterConfig::resubmit_backoff_max`]).
    resubmit_max: Duration,
    /// Closes the reporter when the last handle is dropped.
    _open: Arc<OpenGuard>,
}

/// Cancels `closing` when dropped, with the last [`Reporter`]: the posts held
/// by a refusal give up then, so a drain ends.
#[derive(Debug)]
struct OpenGuard(CancellationToken);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A slot taken in the reporter's queue ([`Reporter::reserve`]): the record
/// sent through it is queued without waiting.
pub(crate) struct Slot(mpsc::OwnedPermit<Record>);

impl Slot {
    /// Queues `record` in the slot. Should the reporter have stopped meanwhile,
    /// the record is dropped, which acknowledges [`ReportError::Closed`].
    pub(crate) fn send(self, record: Record) {
        let _ = self.0.send(record);
    }
}

impl Reporter {
    /// Starts the reporter (its `max_in_flight` posting tasks) on the current
    /// tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(client: XzeprClient, config: ReporterConfig) -> (Reporter, ReporterTask) {
        // Clamped to what tokio's channel accepts; a zero bound means one.
        let (tx, rx) = mpsc::channel(config.queue_capacity.clamp(1, 1 << 30));
        let stats = Arc::new(ReporterStats::default());
        let own = OwnReceivers::new();
        let posters = config.max_in_flight.max(1);
        let resubmit_after = config.backoff_max.max(Duration::from_millis(1));
        let resubmit_max = config.resubmit_backoff_max.max(resubmit_after);
        let closing = CancellationToken::new();
        let shared = Arc::new(Shared {
            closing: closing.clone(),
            client,
            config,
            stats: Arc::clone(&stats),
            queue: tokio::sync::Mutex::new(rx),
            breaker: Breaker::default(),
            next_slot: Mutex::new(Instant::now()),
            state: Mutex::new(DedupState::default()),
            moved: Mutex::new(HashMap::new()),
            own: own.clone(),
        });
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..posters {
            tasks.spawn(poster(Arc::clone(&shared)));
        }
        let task = tokio::spawn(async move { while tasks.join_next().await.is_some() {} });
        (
            Reporter {
                tx,
                stats,
                own,
                resubmit_after,
                resubmit_max,
                _open: Arc::new(OpenGuard(closing)),
            },
            ReporterTask { task },
        )
    }

    /// How long a record that failed for now waits before it is submitted again
    /// the first time (the longest retry delay, [`ReporterConfig::backoff_max`]).
    pub fn resubmit_after(&self) -> Duration {
        self.resubmit_after
    }

    /// How long a record that failed for now waits before it is submitted again
    /// for the `round`-th time (from 0): [`Reporter::resubmit_after`] doubled
    /// `round` times, capped at [`ReporterConfig::resubmit_backoff_max`], of
    /// which a random half to all (records that failed together spread out).
    pub fn resubmit_delay(&self, round: u32) -> Duration {
        let cap = self
            .resubmit_after
            .saturating_mul(1u32 << round.min(16))
            .min(self.resubmit_max);
        cap.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }

    /// Takes a slot in the queue, waiting while it is full, for a record to be
    /// sent later ([`Slot::send`]): a record held for resubmission counts
    /// against [`ReporterConfig::queue_capacity`], so submitters wait behind it.
    /// `None` once the reporter's tasks are gone.
    pub(crate) async fn reserve(&self) -> Option<Slot> {
        self.tx.clone().reserve_owned().await.ok().map(Slot)
    }

    /// Submits a record, waiting while the queue is full.
    ///
    /// # Errors
    /// The record back, when the reporter is shut down.
    pub async fn send(&self, record: Record) -> Result<(), Box<Record>> {
        self.tx.send(record).await.map_err(|e| Box::new(e.0))
    }

    /// Submits from a thread outside the runtime (a worker), blocking while the
    /// queue is full.
    ///
    /// # Errors
    /// The record back, when the reporter is shut down.
    pub fn send_blocking(&self, record: Record) -> Result<(), Box<Record>> {
        self.tx.blocking_send(record).map_err(|e| Box::new(e.0))
    }

    /// The reporter's counters.
    pub fn stats(&self) -> &ReporterStats {
        &self.stats
    }

    /// The counters, shared (for the pipeline's metrics and health).
    pub(crate) fn stats_shared(&self) -> Arc<ReporterStats> {
        Arc::clone(&self.stats)
    }

    /// The receiver ids this service reports under, kept current by the
    /// reporter: seed it with the service's receiver id
    /// ([`OwnReceivers::insert`]) before the first record, and whenever a
    /// receiver of the set comes back 404 and is discovered again, the reporter
    /// adds the new id before posting under it. Every clone of the reporter
    /// returns the same set.
    pub fn own_receivers(&self) -> OwnReceivers {
        self.own.clone()
    }
}

/// The running posting tasks; await it after dropping every [`Reporter`] to drain.
#[derive(Debug)]
pub struct ReporterTask {
    task: tokio::task::JoinHandle<()>,
}

impl ReporterTask {
    /// Waits (up to `deadline`) for every queued and in-flight record after all
    /// `Reporter` handles were dropped. Records held because XZepr refuses the
    /// credentials (401/403) are not waited for: they are acknowledged
    /// [`ReportError::Closed`] once the last handle is gone. Returns false when
    /// the deadline passed; the posting tasks are then stopped, and what they
    /// still held is acknowledged [`ReportError::Closed`] (nothing is posted
    /// after `drain` returns).
    pub async fn drain(mut self, deadline: Duration) -> bool {
        if tokio::time::timeout(deadline, &mut self.task).await.is_ok() {
            return true;
        }
        // Dropping the join set aborts every posting task.
        self.task.abort();
        let _ = self.task.await;
        false
    }
}

/// Shared state of the posting tasks.
struct Shared {
    client: XzeprClient,
    /// Cancelled when the last [`Reporter`] handle is dropped.
    closing: CancellationToken,
    config: ReporterConfig,
    stats: Arc<ReporterStats>,
    /// The record queue. A task takes one record at a time and admits it while it
    /// still holds the lock, so records are admitted in queue order: a terminal
    /// record always finds its `started` already admitted.
    queue: tokio::sync::Mutex<mpsc::Receiver<Record>>,
    breaker: Breaker,
    next_slot: Mutex<Instant>,
    state: Mutex<DedupState>,
    /// Receiver ids that came back 404 and were discovered again: old → new.
    moved: Mutex<HashMap<String, String>>,
    /// This service's receivers: a moved one's new id joins it.
    own: OwnReceivers,
}

/// A (work id, status) pair.
type Key = (String, Status);

#[derive(Default)]
struct DedupState {
    /// Acknowledged keys with the event id XZepr gave them, oldest first in `order`.
    acked: HashMap<Key, Arc<str>>,
    order: VecDeque<Key>,
    /// Keys being posted, with the acks of duplicates that arrived meanwhile.
    in_flight: HashMap<Key, Vec<Ack>>,
    /// Terminal records waiting for their work's `started`, which is in flight.
    waiting: HashMap<String, Vec<Record>>,
    /// Work ids whose `started` failed for good, oldest first in `failed_order`.
    failed_starts: std::collections::HashSet<String>,
    failed_order: VecDeque<String>,
}

/// What admission decided for a record.
enum Admission {
    /// Post it.
    Post(Record),
    /// Acknowledge at once with this result (already acknowledged before).
    Done(Ack, Result<String, ReportError>),
    /// Parked: behind its `started`, or behind the same key in flight.
    Parked,
    /// A terminal record whose `started` failed for good: failed unsent.
    WithoutStarted(Ack),
}

impl DedupState {
    fn admit(&mut self, record: Record) -> Admission {
        let key = (record.work.work_id.clone(), record.status);
        if let Some(id) = self.acked.get(&key) {
            return Admission::Done(record.ack, Ok(id.to_string()));
        }
        if let Some(followers) = self.in_flight.get_mut(&key) {
            followers.push(record.ack);
            return Admission::Parked;
        }
        if record.status != Status::Started
            && self
                .in_flight
                .contains_key(&(record.work.work_id.clone(), Status::Started))
        {
            self.waiting
                .entry(record.work.work_id.clone())
                .or_default()
                .push(record);
            return Admission::Parked;
        }
        if record.status != Status::Started && self.failed_starts.contains(&record.work.work_id) {
            return Admission::WithoutStarted(record.ack);
        }
        self.in_flight.insert(key, Vec::new());
        Admission::Post(record)
    }

    /// Records how a `started` ended, for the terminal records still to come.
    fn started_ended(&mut self, config: &ReporterConfig, work_id: &str, acknowledged: bool) {
        if acknowledged {
            if self.failed_starts.remove(work_id) {
                self.failed_order.retain(|w| w != work_id);
            }
            return;
        }
        if config.failed_starts_capacity == 0 || !self.failed_starts.insert(work_id.to_owned()) {
            return;
        }
        self.failed_order.push_back(work_id.to_owned());
        while self.failed_order.len() > config.failed_starts_capacity {
            if let Some(old) = self.failed_order.pop_front() {
                self.failed_starts.remove(&old);
            }
        }
    }

    fn remember(&mut self, config: &ReporterConfig, key: Key, id: &str) {
        if config.dedup_capacity == 0 {
            return;
        }
        if self.acked.insert(key.clone(), id.into()).is_none() {
            self.order.push_back(key);
            while self.order.len() > config.dedup_capacity {
                if let Some(old) = self.order.pop_front() {
                    self.acked.remove(&old);
                }
            }
        }
    }
}

/// One posting task: takes the next admitted record, posts it (and any terminal
/// records its `started` held back), until the queue is closed and empty.
async fn poster(shared: Arc<Shared>) {
    // Reused for every body: after a post its `Bytes` are dropped and the next
    // `reserve` takes the allocation back.
    let mut buf = BytesMut::with_capacity(BODY_CAPACITY);
    loop {
        let record = {
            let mut queue = shared.queue.lock().await;
            loop {
                let Some(record) = queue.recv().await else {
                    return;
                };
                if let Some(record) = admit(&shared, record) {
                    break record;
                }
            }
        };
        let mut next = post_record(&shared, record, &mut buf).await;
        // Only a `started` releases records (its terminal ones, which release
        // nothing): a short list, posted by this task in order.
        while let Some(record) = next.pop() {
            next.extend(post_record(&shared, record, &mut buf).await);
        }
    }
}

/// Typical encoded lifecycle body is 400-600 bytes.
const BODY_CAPACITY: usize = 1024;

/// Coalesces and orders: returns the record if it should be posted now.
fn admit(shared: &Shared, record: Record) -> Option<Record> {
    let admission = shared
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .admit(record);
    match admission {
        Admission::Post(record) => Some(record),
        Admission::Done(ack, result) => {
            shared.stats.coalesced.fetch_add(1, Relaxed);
            ack.send(result);
            None
        }
        Admission::Parked => None,
        Admission::WithoutStarted(ack) => {
            shared.stats.terminal_without_started.fetch_add(1, Relaxed);
            ack.send(Err(started_not_acknowledged()));
            None
        }
    }
}

/// Why a terminal record was not sent: XZepr must never get a `completed` or
/// `failed` without its `started`. Retryable: a replay submits both again.
fn started_not_acknowledged() -> ReportError {
    ReportError::Failed {
        attempts: 0,
        reason: "its `started` was not acknowledged".into(),
        retryable: true,
        source: None,
    }
}

/// Posts one record and acknowledges it (and the duplicates that waited on it);
/// returns the terminal records that waited for it to be posted next.
async fn post_record(shared: &Shared, mut record: Record, buf: &mut BytesMut) -> Vec<Record> {
    let status = record.status;
    let result = post_with_rediscovery(shared, &mut record, buf).await;
    let Record { work, ack, .. } = record;
    let key = (work.work_id, status);
    let mut to_ack = Vec::new();
    let mut to_post = Vec::new();
    {
        let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let followers = st.in_flight.remove(&key).unwrap_or_default();
        shared
            .stats
            .coalesced
            .fetch_add(followers.len() as u64, Relaxed);
        to_ack.extend(followers.into_iter().map(|a| (a, result.clone())));
        if let Ok(id) = &result {
            st.remember(&shared.config, key.clone(), id);
        }
        if status == Status::Started {
            st.started_ended(&shared.config, &key.0, result.is_ok());
            for waiting in st.waiting.remove(&key.0).unwrap_or_default() {
                // Never a terminal without its `started`: after a failed one it
                // fails unsent, its offset stays unfinished and a replay posts both.
                if result.is_err() {
                    shared.stats.terminal_without_started.fetch_add(1, Relaxed);
                    to_ack.push((waiting.ack, Err(started_not_acknowledged())));
                    continue;
                }
                match st.admit(waiting) {
                    Admission::Post(r) => to_post.push(r),
                    Admission::Done(a, r) => to_ack.push((a, r)),
                    Admission::WithoutStarted(a) => {
                        shared.stats.terminal_without_started.fetch_add(1, Relaxed);
                        to_ack.push((a, Err(started_not_acknowledged())));
                    }
                    Admission::Parked => {}
                }
            }
        }
    }
    // Callbacks run outside the lock: a slow one must not stall the other tasks.
    ack.send(result);
    for (a, r) in to_ack {
        a.send(r);
    }
    to_post
}

/// Posts the record; after a 404 for a receiver this client discovered, discovers
/// it again and posts once more under the new id.
async fn post_with_rediscovery(
    shared: &Shared,
    record: &mut Record,
    buf: &mut BytesMut,
) -> Result<String, ReportError> {
    if let Some(new) = moved_receiver(shared, &record.work.receiver_id) {
        record.work.receiver_id = new;
    }
    let body = encode(record, buf)?;
    match post(shared, body, &record.work.work_id).await {
        Err(Posted::NotFound(e)) => {
            let stale = record.work.receiver_id.clone();
            let own = shared.own.contains(&stale);
            // XZepr publishes the new receiver's `receiver.created` before it
            // answers the create: the own-event guard must know the id from the
            // create's answer on, not only once the discovery is over.
            let created = |id: &str| {
                if own {
                    shared.own.insert(id);
                }
            };
            match shared
                .client
                .rediscover_receiver_with(&stale, &created)
                .await
            {
                Ok(Some(new)) if new != stale => {
                    // Before the first post under the new id, as above.
                    if own {
                        shared.own.insert(&new);
                    }
                    let before = shared
                        .moved
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(stale.clone(), new.clone());
                    // Every posting task with a record for the stale id gets
                    // here from the one shared discovery: log it once.
                    if before.as_deref() != Some(new.as_str()) {
                        tracing::warn!(
                            stale = %stale, receiver = %new,
                            "Receiver came back 404: discovered again."
                        );
                    }
                    record.work.receiver_id = new;
                    let body = encode(record, buf)?;
                    post(shared, body, &record.work.work_id)
                        .await
                        .map_err(Posted::into_report)
                }
                Ok(_) => Err(e),
                Err(discovery) => {
                    tracing::error!(error = %ErrorChain(&discovery), "Rediscovering the receiver failed.");
                    Err(e)
                }
            }
        }
        other => other.map_err(Posted::into_report),
    }
}

fn moved_receiver(shared: &Shared, receiver_id: &str) -> Option<String> {
    let moved = shared.moved.lock().unwrap_or_else(|p| p.into_inner());
    if moved.is_empty() {
        return None;
    }
    // Follow the chain: a receiver may move more than once.
    let mut id = moved.get(receiver_id)?;
    for _ in 0..moved.len() {
        match moved.get(id) {
            Some(next) => id = next,
            None => break,
        }
    }
    Some(id.clone())
}

/// The record's body in the contract's JSON, written into `buf`.
fn encode(record: &Record, buf: &mut BytesMut) -> Result<Bytes, ReportError> {
    let error = record
        .error
        .as_ref()
        .map_or((UNSPECIFIED_ERROR, UNSPECIFIED_ERROR_CODE), |(m, c)| {
            (m.as_str(), c.as_str())
        });
    let phase = Phase::new(record.status, error);
    buf.reserve(BODY_CAPACITY);
    let body = LifecycleBody::new(record.work.as_ref(), phase, &record.details);
    serde_json::to_writer((&mut *buf).writer(), &body).map_err(|e| ReportError::Failed {
        attempts: 0,
        reason: "cannot encode the lifecycle body".into(),
        retryable: false,
        source: Some(Arc::new(ClientError::json(e))),
    })?;
    Ok(buf.split().freeze())
}

/// A `failed` record's error when its submitter gave none: XZepr needs both fields.
const UNSPECIFIED_ERROR: &str = "work failed";
const UNSPECIFIED_ERROR_CODE: &str = "unspecified";

/// How a post ended, when it did not succeed.
enum Posted {
    /// A 404 on the first attempt: the receiver may be gone (XZepr restarted).
    NotFound(ReportError),
    Failed(ReportError),
}

impl Posted {
    fn into_report(self) -> ReportError {
        match self {
            Posted::NotFound(e) | Posted::Failed(e) => e,
        }
    }
}

/// Sends one body with retries, the breaker and the rate limit.
async fn post(shared: &Shared, body: Bytes, work_id: &str) -> Result<String, Posted> {
    let cfg = &shared.config;
    let mut attempt = 0u32;
    let mut lost = false;
    loop {
        attempt += 1;
        wait_rate(shared).await;
        let Some(permit) = shared.breaker.admit(cfg, &shared.closing).await else {
            // Held for a refusal when the reporter closed: waiting cannot help.
            return Err(Posted::Failed(ReportError::Closed));
        };
        if lost {
            shared
                .stats
                .resent_after_lost_response
                .fetch_add(1, Relaxed);
            tracing::warn!(
                work_id,
                attempt,
                "Lifecycle post re-sent after a lost response: XZepr may hold it twice, \
                 both with the same post_key."
            );
        }
        let result = shared.client.post_event_body(body.clone()).await;
        let answer = match &result {
            Ok(_) => Answer::Answered,
            Err(ClientError::Unauthorized { status }) => {
                shared.stats.unauthorized_answers.fetch_add(1, Relaxed);
                Answer::Refused { status: *status }
            }
            Err(e) if e.is_retryable() => Answer::Unreachable,
            Err(_) => Answer::Answered,
        };
        shared.breaker.record(permit, answer, cfg, &shared.stats);
        match result {
            Ok(id) => {
                shared.stats.posted.fetch_add(1, Relaxed);
                return Ok(id);
            }
            Err(e) => {
                let retryable = e.is_retryable();
                lost = e.is_response_lost();
                if !retryable || attempt >= cfg.max_attempts {
                    let not_found = e.is_not_found();
                    // A 404 is not logged: the receiver is found again.
                    if e.is_unauthorized() {
                        // Logged once per refusal by the gate, not per post.
                        tracing::debug!(work_id, error = %ErrorChain(&e), "Lifecycle post refused.");
                    } else if !not_found {
                        tracing::error!(work_id, error = %ErrorChain(&e), attempt, "Lifecycle post failed.");
                    }
                    let err = match &e {
                        ClientError::Api(api) if rejects_for_good(api.status) => {
                            ReportError::Rejected {
                                status: api.status,
                                reason: e.to_string().into(),
                                body: api.body.as_str().into(),
                            }
                        }
                        _ => ReportError::Failed {
                            attempts: attempt,
                            reason: if retryable {
                                "retries exhausted".into()
                            } else {
                                "refused".into()
                            },
                            retryable,
                            source: Some(Arc::new(e)),
                        },
                    };
                    if not_found {
                        return Err(Posted::NotFound(err));
                    }
                    shared.stats.failed.fetch_add(1, Relaxed);
                    return Err(Posted::Failed(err));
                }
                shared.stats.retries.fetch_add(1, Relaxed);
                tokio::time::sleep(backoff(cfg, attempt, &e)).await;
            }
        }
    }
}

/// A 4xx that sending again cannot fix. 401 and 403 are the credentials (fixed
/// by the operator), 404 the receiver (found again), 429 the rate: all pass.
fn rejects_for_good(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 401 | 403 | 404 | 429)
}

/// Exponential backoff with full jitter: attempt `n` waits a random time up to
/// `backoff_base × 2^(n-1)`, capped at `backoff_max`. A server's `Retry-After` is
/// a floor (up to a minute).
fn backoff(cfg: &ReporterConfig, attempt: u32, err: &ClientError) -> Duration {
    let exp = cfg
        .backoff_base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let cap = exp.min(cfg.backoff_max);
    let jitter: f64 = rand::random();
    let wait = cap.mul_f64(jitter);
    match err.retry_after() {
        Some(asked) => wait.max(asked.min(Duration::from_secs(60))),
        None => wait,
    }
}

async fn wait_rate(shared: &Shared) {
    let Some(rate) = shared.config.rate_limit.filter(|r| *r > 0) else {
        return;
    };
    let slot = {
        let mut next = shared.next_slot.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let slot = (*next).max(now);
        *next = slot + Duration::from_secs_f64(1.0 / f64::from(rate));
        slot
    };
    let now = Instant::now();
    if slot > now {
        tokio::time::sleep(slot - now).await;
    }
}

#[cfg(test)]
mod tests;
