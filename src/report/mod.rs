//! The reporter stage: lifecycle records from the workers to XZepr's events API.
//!
//! ```text
//!  workers ──send / send_blocking──> bounded queue ──> concurrency.max() posting tasks
//!                                     (full: the worker waits)   │  (each: take one record,
//!                                                                 │   encode into its own
//!                                                                 │   buffer, post over the
//!                                                                 │   keep-alive pool, retry)
//!          ack(Ok(event id)) <── after a 2xx ──────────────────────┘
//! ```
//!
//! The posting tasks are started once and live as long as the reporter: a record
//! costs no task spawn. Each attempt takes a permit from the reporter's
//! [`Limiter`] (`limit="reporter"`): with a fixed
//! [`ReporterConfig::concurrency`] the number of tasks is the bound; an
//! adaptive one lets fewer of them post while XZepr slows down or answers
//! 429/503 (honouring its `Retry-After`).
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
//!   ([`WorkRef::with_fallbacks`](crate::client::WorkRef::with_fallbacks)), so no record is refused for them.
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
//! `concurrency.max()` `started` posts are in flight, so at most that many work ids
//! hold parked records.
//!
//! | File | Holds |
//! |---|---|
//! | `record.rs` | [`Record`], [`Ack`], [`OwnedWork`] |
//! | `config.rs` | [`ReporterConfig`] |
//! | `stats.rs` | [`ReporterStats`] |
//! | `dedup.rs` | coalescing and per-work-id ordering |
//! | `post.rs` | the posting tasks: encode, retry, breaker, rediscovery |
//! | `breaker.rs` | the circuit breaker |

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

mod breaker;
mod config;
mod dedup;
mod post;
mod record;
mod stats;

pub use crate::client::Status;
pub use config::ReporterConfig;
pub use record::{validate_work_fields, Ack, OwnedWork, Record, WorkTemplate};
pub use stats::ReporterStats;

use crate::client::{ClientError, XzeprClient};
use crate::flow_control::Limiter;
use breaker::Breaker;
use dedup::DedupState;

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

pub use crate::dispatch::OwnReceivers;

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
    /// The posts' concurrency limit.
    limiter: Limiter,
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
    /// Starts the reporter (its `concurrency.max()` posting tasks) on the current
    /// tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(client: XzeprClient, config: ReporterConfig) -> (Reporter, ReporterTask) {
        // Clamped to what tokio's channel accepts; a zero bound means one.
        let (tx, rx) = mpsc::channel(config.queue_capacity.clamp(1, 1 << 30));
        let stats = Arc::new(ReporterStats::default());
        let own = OwnReceivers::new();
        let posters = config.concurrency.max().max(1);
        let limiter = Limiter::new("reporter", config.concurrency);
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
            limiter: limiter.clone(),
        });
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..posters {
            tasks.spawn(post::poster(Arc::clone(&shared)));
        }
        let task = tokio::spawn(async move { while tasks.join_next().await.is_some() {} });
        (
            Reporter {
                tx,
                stats,
                own,
                resubmit_after,
                resubmit_max,
                limiter,
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

    /// The posts' concurrency limit ([`ReporterConfig::concurrency`]): its
    /// current [`Limiter::limit`] is the gauge
    /// `xzepr_consumer_concurrency_limit{limit="reporter"}`.
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
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
    /// Each attempt takes a permit.
    limiter: Limiter,
}

#[cfg(test)]
mod tests;
