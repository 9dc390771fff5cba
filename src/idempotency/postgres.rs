//! The PostgreSQL store: the guide's `processed_events` table, batched.
//!
//! See [`IdempotencyGuard`] (its "Batching" section) for how requests are batched.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::{
    nonzero, process_if_new, wait_for_claim, Begin, BoxError, BoxFuture, BusyWait, Claim, Counters,
    Error, IdempotencyMetrics, IdempotencyStore, ProcessingResult, Settle, WorkError,
    DEFAULT_BUSY_POLL_INTERVAL, DEFAULT_LEASE,
};
use crate::config::ConfigError;

mod renew;

/// The shipped migration (`migrations/…_create_processed_events_table.sql`): the table,
/// its retention index. Idempotent. Run it with [`IdempotencyGuard::migrate`].
pub const MIGRATION_SQL: &str =
    include_str!("../../migrations/20261128000000_create_processed_events_table.sql");

/// Default retention: 7 days, the guide's. Longer than any replay Kafka can produce
/// with the default 7-day topic retention.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 86_400);
/// Default [`GuardBuilder::max_batch_size`]: 512 keys per statement. Twice the guide's
/// 256 concurrent callers; past a few hundred rows a statement costs more than the
/// round trip it saves, and it holds its row locks longer.
pub const DEFAULT_MAX_BATCH_SIZE: usize = 512;
/// Largest accepted [`GuardBuilder::max_batch_size`]: keeps one statement's locks and
/// its parameter array bounded.
pub const MAX_BATCH_SIZE_LIMIT: usize = 10_000;
/// Default [`GuardBuilder::batch_delay`]: none. While a statement runs, requests pile up
/// on their own and leave together in the next (group commit); callers waiting on their
/// answers gain nothing from a linger, and Tokio's timer rounds any delay up to whole
/// milliseconds: in the bench a 1 ms delay cost about a third of the throughput at 256
/// callers. Set one to trade latency for fewer statements at a steady arrival rate.
pub const DEFAULT_BATCH_DELAY: Duration = Duration::ZERO;
/// Default [`GuardBuilder::max_in_flight_batches`]: 2 statements (2 pool connections) at
/// once: one runs while the next fills. In the bench, 4 split the same load into twice
/// the statements for no more events/s; the rest of the pool is the handlers'.
pub const DEFAULT_MAX_IN_FLIGHT_BATCHES: usize = 2;
/// Default [`GuardBuilder::queue_capacity`]: 4,096 requests waiting for a statement,
/// eight full batches; beyond, callers wait for room.
pub const DEFAULT_QUEUE_CAPACITY: usize = 4_096;
/// Default [`GuardBuilder::cleanup_chunk_size`]: 5,000 rows per `DELETE`, a few ms of
/// locks each, so cleanup never stalls claims on a big table.
pub const DEFAULT_CLEANUP_CHUNK_SIZE: u32 = 5_000;
/// How often [`IdempotencyGuard::spawn_cleanup`] is usually run: hourly, the guide's.
pub const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(3_600);

/// Retries of a statement that lost a deadlock or serialization race. Each statement
/// is atomic, so a retry is safe; sorted keys make this rare.
const TRANSIENT_RETRIES: u32 = 3;
/// `pg_advisory_xact_lock` key serializing concurrent migrations ("xzidem" in ASCII).
const MIGRATION_LOCK_ID: i64 = 0x787a_6964_656d;

const CLAIM_SQL: &str = "\
WITH claimed AS (
    INSERT INTO processed_events AS p (event_id, state, claim_token, claimed_until, processed_at)
    SELECT k, 'claimed', $2, now() + make_interval(secs => $3), now()
    FROM unnest($1::text[]) AS k
    ON CONFLICT (event_id) DO UPDATE
        SET state = 'claimed',
            claim_token = EXCLUDED.claim_token,
            claimed_until = EXCLUDED.claimed_until,
            processed_at = EXCLUDED.processed_at
        WHERE p.state = 'claimed' AND p.claimed_until <= now()
    RETURNING p.event_id, (p.xmax = 0) AS inserted
)
SELECT k.k,
       c.event_id IS NOT NULL,
       COALESCE(c.inserted, false),
       COALESCE(e.state = 'processed', false)
FROM unnest($1::text[]) AS k(k)
LEFT JOIN claimed c ON c.event_id = k.k
LEFT JOIN processed_events e ON e.event_id = k.k";
// The outer SELECT sees the table as of the statement's start: a key neither claimed
// nor processed there is held by another claim (possibly one committed meanwhile),
// which is `Busy`: safe, since the caller asks again.

// Settling leaves `processed_at` (the claim time) alone: no indexed column changes, so
// the update can stay on its page (HOT) and skip both index writes.
const SETTLE_SQL: &str = "\
UPDATE processed_events AS p
SET state = CASE WHEN u.done THEN 'processed' ELSE 'claimed' END,
    claimed_until = CASE WHEN u.done THEN NULL ELSE '-infinity'::timestamptz END
FROM unnest($1::text[], $2::int8[], $3::bool[]) AS u(event_id, token, done)
WHERE p.event_id = u.event_id AND p.claim_token = u.token AND p.state = 'claimed'
RETURNING p.event_id";

const MARK_IN_TX_SQL: &str = "\
UPDATE processed_events
SET state = 'processed', claimed_until = NULL
WHERE event_id = $1 AND claim_token = $2 AND state = 'claimed'";

// SKIP LOCKED: rows a claim is touching, or another guard's cleanup, are left for later.
const CLEANUP_SQL: &str = "\
DELETE FROM processed_events WHERE event_id IN (
    SELECT event_id FROM processed_events
    WHERE processed_at < now() - make_interval(secs => $1)
      AND (state = 'processed' OR claimed_until < now())
    LIMIT $2
    FOR UPDATE SKIP LOCKED)";

/// The idempotency guard of the guide, on PostgreSQL: which keys were processed, shared
/// by every consumer of the `processed_events` table. Cheap to clone (shared state).
///
/// Build it with [`new`](IdempotencyGuard::new) (the guide's call) or
/// [`builder`](IdempotencyGuard::builder), create the table once with
/// [`migrate`](IdempotencyGuard::migrate), then use
/// [`process_if_new`](IdempotencyGuard::process_if_new),
/// [`process_in_tx`](IdempotencyGuard::process_in_tx) or the [`IdempotencyStore`] trait.
/// See the [module docs](super) for the states of a key.
///
/// # Batching
///
/// [`begin`](IdempotencyStore::begin), [`Claim::complete`] and [`Claim::release`] do not
/// run a statement each: they queue a request to the guard's batcher task (spawned on
/// first use), which turns whatever is queued into one claim statement
/// (`INSERT … SELECT FROM unnest($1) … ON CONFLICT … RETURNING`) and one settle statement
/// (`UPDATE … FROM unnest($1, $2, $3)`). At most
/// [`max_in_flight_batches`](GuardBuilder::max_in_flight_batches) statements run at
/// once; while they do, new requests pile up and go out together in the next one
/// (up to [`max_batch_size`](GuardBuilder::max_batch_size)). A lone caller on an idle
/// guard is sent at once; with a statement already in flight the batcher can linger at
/// most [`batch_delay`](GuardBuilder::batch_delay) for company (none by default).
///
/// Keys are sorted within a statement, so concurrent statements lock rows in the same
/// order; a deadlock or serialization failure is retried a few times anyway.
///
/// All times come from the database clock (`now()`), so consumers on machines with
/// skewed clocks agree on leases and retention.
#[derive(Clone)]
pub struct IdempotencyGuard {
    inner: Arc<GuardInner>,
}

/// What the claims hold: the way to the batcher.
struct GuardInner {
    shared: Arc<Shared>,
    // Spawned on first use, so `new` needs no runtime. The batcher ends when the last
    // sender (this guard, its clones and their claims) is gone.
    batcher: OnceLock<mpsc::Sender<Request>>,
}

/// What the batcher and cleanup tasks hold (never a sender: no cycle).
#[derive(Debug)]
struct Shared {
    pool: PgPool,
    settings: Settings,
    counters: Counters,
}

#[derive(Debug, Clone)]
struct Settings {
    retention: Duration,
    lease: Duration,
    max_batch_size: usize,
    batch_delay: Duration,
    max_in_flight_batches: usize,
    queue_capacity: usize,
    cleanup_chunk_size: u32,
    wait: BusyWait,
}

enum Request {
    Claim {
        key: String,
        reply: oneshot::Sender<Result<ClaimReply, Error>>,
    },
    Settle {
        key: String,
        token: i64,
        done: bool,
        // None: released from `Drop`, nobody waits.
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
    Renew {
        key: String,
        token: i64,
        reply: oneshot::Sender<Result<bool, Error>>,
    },
}

#[derive(Debug, Clone, Copy)]
enum ClaimReply {
    Claimed(i64),
    Processed,
    Busy,
}

/// Settings of an [`IdempotencyGuard`]; see each setter for its default and
/// [`build`](GuardBuilder::build) for the rules.
#[derive(Debug, Clone)]
#[must_use]
pub struct GuardBuilder {
    pool: PgPool,
    retention: Duration,
    lease: Duration,
    max_batch_size: usize,
    batch_delay: Duration,
    max_in_flight_batches: usize,
    queue_capacity: usize,
    cleanup_chunk_size: u32,
    busy_poll_interval: Duration,
    busy_timeout: Option<Duration>,
}

impl GuardBuilder {
    /// How long a processed key is remembered; cleanup deletes older rows.
    /// Default [`DEFAULT_RETENTION`] (7 days).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// How long a claim holds its key unsettled; after it another worker takes the key
    /// over. Set it above the handler's worst-case run time. Default [`DEFAULT_LEASE`].
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Most keys per claim or settle statement. Default [`DEFAULT_MAX_BATCH_SIZE`], at
    /// most [`MAX_BATCH_SIZE_LIMIT`]. A fuller queue waits for the next statement.
    pub fn max_batch_size(mut self, n: usize) -> Self {
        self.max_batch_size = n;
        self
    }

    /// How long the batcher waits for more requests before sending a statement while
    /// another is in flight (an idle guard sends at once); rounded up to whole
    /// milliseconds by Tokio's timer. Zero: never wait, batch what queued up while the
    /// previous statement ran. Default [`DEFAULT_BATCH_DELAY`] (zero).
    pub fn batch_delay(mut self, delay: Duration) -> Self {
        self.batch_delay = delay;
        self
    }

    /// Most statements (and pool connections) the batcher uses at once; more requests
    /// queue. Default [`DEFAULT_MAX_IN_FLIGHT_BATCHES`].
    pub fn max_in_flight_batches(mut self, n: usize) -> Self {
        self.max_in_flight_batches = n;
        self
    }

    /// Requests queued for the batcher; when full, `begin`/`complete`/`release` wait for
    /// room, and a dropped claim is left to its lease. Default [`DEFAULT_QUEUE_CAPACITY`].
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n;
        self
    }

    /// Rows per cleanup `DELETE`. Default [`DEFAULT_CLEANUP_CHUNK_SIZE`].
    pub fn cleanup_chunk_size(mut self, n: u32) -> Self {
        self.cleanup_chunk_size = n;
        self
    }

    /// First pause of `process_if_new` on a busy key, doubling up to 1 s.
    /// Default [`DEFAULT_BUSY_POLL_INTERVAL`].
    pub fn busy_poll_interval(mut self, interval: Duration) -> Self {
        self.busy_poll_interval = interval;
        self
    }

    /// How long `process_if_new` waits on a key another worker holds before failing
    /// with [`Error::Busy`]. Default: twice the lease, so a waiter outlives a crashed
    /// holder's lease and takes the key over itself.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = Some(timeout);
        self
    }

    /// Builds the guard. Spawns nothing yet: the batcher starts on first use, on the
    /// runtime of that call.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] when a duration other than `batch_delay` is zero, the
    /// lease is not shorter than the retention, a count is zero, or `max_batch_size`
    /// is above [`MAX_BATCH_SIZE_LIMIT`].
    pub fn build(self) -> Result<IdempotencyGuard, ConfigError> {
        nonzero("retention", self.retention)?;
        nonzero("lease", self.lease)?;
        nonzero("busy_poll_interval", self.busy_poll_interval)?;
        if self.lease >= self.retention {
            return Err(ConfigError::Invalid {
                name: "lease",
                value: format!("{:?}", self.lease),
                expected: "shorter than the retention",
            });
        }
        if !(1..=MAX_BATCH_SIZE_LIMIT).contains(&self.max_batch_size) {
            return Err(ConfigError::Invalid {
                name: "max_batch_size",
                value: self.max_batch_size.to_string(),
                expected: "1 to 10000",
            });
        }
        for (name, n) in [
            ("max_in_flight_batches", self.max_in_flight_batches),
            ("queue_capacity", self.queue_capacity),
            ("cleanup_chunk_size", self.cleanup_chunk_size as usize),
        ] {
            if n == 0 {
                return Err(ConfigError::Invalid {
                    name,
                    value: "0".into(),
                    expected: "at least 1",
                });
            }
        }
        let settings = Settings {
            retention: self.retention,
            lease: self.lease,
            max_batch_size: self.max_batch_size,
            batch_delay: self.batch_delay,
            max_in_flight_batches: self.max_in_flight_batches,
            queue_capacity: self.queue_capacity,
            cleanup_chunk_size: self.cleanup_chunk_size,
            wait: BusyWait {
                first_poll: self.busy_poll_interval,
                timeout: self.busy_timeout.unwrap_or(self.lease * 2),
            },
        };
        Ok(IdempotencyGuard {
            inner: Arc::new(GuardInner {
                shared: Arc::new(Shared {
                    pool: self.pool,
                    settings,
                    counters: Counters::default(),
                }),
                batcher: OnceLock::new(),
            }),
        })
    }
}

impl IdempotencyGuard {
    /// The guide's constructor: a guard on `pool` remembering keys for `retention`,
    /// every other setting at its default (the lease is capped at half the retention).
    ///
    /// # Panics
    ///
    /// When `retention` is zero (the guide's call has no way to return the error; use
    /// [`builder`](IdempotencyGuard::builder) to get it as a value).
    pub fn new(pool: PgPool, retention: Duration) -> Self {
        Self::builder(pool)
            .retention(retention)
            .lease(DEFAULT_LEASE.min(retention / 2))
            .build()
            .expect("IdempotencyGuard::new: the retention must not be zero")
    }

    /// Settings for a guard on `pool`.
    pub fn builder(pool: PgPool) -> GuardBuilder {
        GuardBuilder {
            pool,
            retention: DEFAULT_RETENTION,
            lease: DEFAULT_LEASE,
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
            batch_delay: DEFAULT_BATCH_DELAY,
            max_in_flight_batches: DEFAULT_MAX_IN_FLIGHT_BATCHES,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            cleanup_chunk_size: DEFAULT_CLEANUP_CHUNK_SIZE,
            busy_poll_interval: DEFAULT_BUSY_POLL_INTERVAL,
            busy_timeout: None,
        }
    }

    /// Creates the `processed_events` table and its index if absent ([`MIGRATION_SQL`]),
    /// under an advisory lock so concurrent starts do not race. Needs no
    /// `DATABASE_URL` at build time.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] with `op = "migrate"`.
    pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
        let db = |e| Error::database("migrate", e);
        let mut tx = pool.begin().await.map_err(db)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK_ID)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::raw_sql(MIGRATION_SQL)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    /// Runs `work` unless `event_id` was processed before (the guide's call).
    ///
    /// Claims the key (batched with concurrent callers), runs `work`, then marks the key
    /// processed ([`ProcessingResult::Success`]) or, when `work` fails, releases it so a
    /// retry runs it again ([`ProcessingResult::Failed`]). While another worker holds
    /// the key it waits, polling with backoff, until that worker finishes
    /// ([`ProcessingResult::AlreadyProcessed`]), fails or crashes (then this call runs
    /// the work), at most the busy timeout. `work` is not polled unless it runs.
    ///
    /// # Errors
    ///
    /// Database errors (nothing was decided: do not commit the offset);
    /// [`Error::Busy`] after the busy timeout; [`Error::LeaseLost`] when `work` outran
    /// the lease and another worker took the key over.
    pub async fn process_if_new<F>(
        &self,
        event_id: &str,
        work: F,
    ) -> Result<ProcessingResult, Error>
    where
        F: Future<Output = Result<(), BoxError>>,
    {
        process_if_new(self, event_id, self.inner.shared.settings.wait, work).await
    }

    /// Claims `key` and opens a transaction for the handler's writes; the processed
    /// mark is written in that same transaction by [`TxClaim::commit`]. The claim itself
    /// is batched and committed at once, so the transaction holds no lock on the
    /// guard's row until the commit.
    ///
    /// # Errors
    ///
    /// As [`IdempotencyStore::begin`], plus [`Error::Database`] (`op = "begin"`) when no
    /// transaction could be opened (the claim is then released).
    pub async fn begin_in_tx(&self, key: &str) -> Result<TxBegin, Error> {
        match self.begin(key).await? {
            Begin::Run(claim) => Ok(TxBegin::Run(self.open_tx(claim).await?)),
            Begin::AlreadyProcessed => Ok(TxBegin::AlreadyProcessed),
            Begin::Busy => Ok(TxBegin::Busy),
        }
    }

    async fn open_tx(&self, claim: Claim) -> Result<TxClaim, Error> {
        let shared = &self.inner.shared;
        // On error `claim` drops here and is released.
        let tx = shared
            .pool
            .begin()
            .await
            .map_err(|e| Error::database("begin", e))?;
        Ok(TxClaim {
            claim,
            tx,
            shared: Arc::clone(shared),
        })
    }

    /// Exactly-once effects for handlers that write to this database: runs `work` in a
    /// transaction that also writes the processed mark, so the handler's writes and the
    /// mark commit together or not at all. Waits on a busy key as
    /// [`process_if_new`](IdempotencyGuard::process_if_new) does.
    ///
    /// `work` gets the open transaction's connection and returns a boxed future:
    ///
    /// ```no_run
    /// # async fn f(guard: xzepr_consumer::idempotency::IdempotencyGuard) -> Result<(), Box<dyn std::error::Error>> {
    /// let result = guard
    ///     .process_in_tx("event-42", |tx| {
    ///         Box::pin(async move {
    ///             sqlx::query("INSERT INTO notifications (id) VALUES ($1)")
    ///                 .bind("event-42")
    ///                 .execute(&mut *tx)
    ///                 .await?;
    ///             Ok(())
    ///         })
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// If `work` fails, the transaction rolls back (its writes vanish) and the key is
    /// released: [`ProcessingResult::Failed`].
    ///
    /// # Errors
    ///
    /// As `process_if_new`. With [`Error::LeaseLost`] the transaction was rolled back:
    /// the other worker's run is the one that counts.
    pub async fn process_in_tx<F>(&self, event_id: &str, work: F) -> Result<ProcessingResult, Error>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<(), BoxError>>,
    {
        let Some(claim) = wait_for_claim(self, event_id, self.inner.shared.settings.wait).await?
        else {
            return Ok(ProcessingResult::AlreadyProcessed);
        };
        let mut claim = self.open_tx(claim).await?;
        match work(claim.connection()).await {
            Ok(()) => {
                claim.commit().await?;
                Ok(ProcessingResult::Success)
            }
            Err(err) => {
                let err = WorkError::new(err);
                if let Err(release) = claim.rollback().await {
                    tracing::warn!(key = event_id, error = %release, "Could not release a failed event's claim.");
                }
                Ok(ProcessingResult::Failed(err))
            }
        }
    }

    /// Deletes the rows older than the retention (processed keys, and claims abandoned
    /// that long ago), in chunks of [`cleanup_chunk_size`](GuardBuilder::cleanup_chunk_size)
    /// rows, each its own short statement; then counts the table for the size gauge.
    /// Returns how many rows were deleted.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] (`op = "cleanup"` or `"count"`); chunks deleted before it
    /// stay deleted.
    pub async fn cleanup_old_events(&self) -> Result<u64, Error> {
        self.inner.shared.cleanup().await
    }

    /// Counts the rows of `processed_events` (`count(*)`: a full scan, hence only
    /// after cleanup) and sets the table-size gauge.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] with `op = "count"`.
    pub async fn refresh_table_size(&self) -> Result<u64, Error> {
        self.inner.shared.refresh_table_size().await
    }

    /// Runs [`cleanup_old_events`](IdempotencyGuard::cleanup_old_events) now and every
    /// `every` (usually [`DEFAULT_CLEANUP_INTERVAL`]) on the current runtime, logging
    /// failures, until the returned handle is aborted. A run that overruns delays the
    /// next instead of piling up.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or when `every` is zero.
    pub fn spawn_cleanup(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        assert!(
            !every.is_zero(),
            "spawn_cleanup: the interval must not be zero"
        );
        let shared = Arc::clone(&self.inner.shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match shared.cleanup().await {
                    Ok(deleted) => tracing::debug!(deleted, "Idempotency cleanup done."),
                    Err(error) => tracing::warn!(%error, "Idempotency cleanup failed."),
                }
            }
        })
    }

    /// The guard's counters (the guide's three, plus failures).
    pub fn metrics(&self) -> IdempotencyMetrics {
        self.inner.shared.counters.snapshot()
    }

    /// The pool the guard runs on.
    pub fn pool(&self) -> &PgPool {
        &self.inner.shared.pool
    }

    fn sender(&self) -> &mpsc::Sender<Request> {
        self.inner.sender()
    }
}

impl fmt::Debug for IdempotencyGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyGuard")
            .field("settings", &self.inner.shared.settings)
            .field("metrics", &self.metrics())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for GuardInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardInner").finish_non_exhaustive()
    }
}

impl GuardInner {
    fn sender(&self) -> &mpsc::Sender<Request> {
        self.batcher.get_or_init(|| {
            let (tx, rx) = mpsc::channel(self.shared.settings.queue_capacity);
            tokio::spawn(run_batcher(Arc::clone(&self.shared), rx));
            tx
        })
    }
}

#[async_trait::async_trait]
impl IdempotencyStore for IdempotencyGuard {
    async fn begin(&self, key: &str) -> Result<Begin, Error> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Claim {
            key: key.to_owned(),
            reply,
        };
        self.sender()
            .send(request)
            .await
            .map_err(|_| Error::Closed)?;
        match answer.await.map_err(|_| Error::Closed)?? {
            ClaimReply::Claimed(token) => Ok(Begin::Run(Claim::new(
                key.to_owned(),
                token,
                Arc::clone(&self.inner) as Arc<dyn Settle>,
            ))),
            ClaimReply::Processed => {
                self.inner.shared.counters.duplicates.fetch_add(1, Relaxed);
                Ok(Begin::AlreadyProcessed)
            }
            ClaimReply::Busy => Ok(Begin::Busy),
        }
    }

    fn lease(&self) -> Duration {
        self.inner.shared.settings.lease
    }

    fn metrics(&self) -> IdempotencyMetrics {
        self.inner.shared.counters.snapshot()
    }
}

impl Settle for GuardInner {
    fn settle(&self, key: String, token: i64, done: bool) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            let request = Request::Settle {
                key,
                token,
                done,
                reply: Some(reply),
            };
            self.sender()
                .send(request)
                .await
                .map_err(|_| Error::Closed)?;
            answer.await.map_err(|_| Error::Closed)?
        })
    }

    fn abandon(&self, key: String, token: i64) {
        // Only if the batcher runs (a claim implies it does) and has room: `Drop` cannot
        // wait. Otherwise the lease frees the key.
        if let Some(tx) = self.batcher.get() {
            let _ = tx.try_send(Request::Settle {
                key,
                token,
                done: false,
                reply: None,
            });
        }
    }

    fn renew(&self, key: String, token: i64) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            self.sender()
                .send(Request::Renew { key, token, reply })
                .await
                .map_err(|_| Error::Closed)?;
            answer.await.map_err(|_| Error::Closed)?
        })
    }

    fn lease(&self) -> Duration {
        self.shared.settings.lease
    }
}

/// A claim with an open transaction, from [`IdempotencyGuard::begin_in_tx`]. Write
/// through [`connection`](TxClaim::connection), then [`commit`](TxClaim::commit)
/// (writes + processed mark) or [`rollback`](TxClaim::rollback) (nothing, key
/// released). Dropped, it rolls back and releases the key.
#[must_use = "a transactional claim must be committed or rolled back"]
pub struct TxClaim {
    claim: Claim,
    tx: Transaction<'static, Postgres>,
    shared: Arc<Shared>,
}

/// The answer of [`IdempotencyGuard::begin_in_tx`]; as [`Begin`], with a transaction.
#[derive(Debug)]
#[non_exhaustive]
pub enum TxBegin {
    /// The caller holds the key and a transaction.
    Run(TxClaim),
    /// Processed before: skip the work.
    AlreadyProcessed,
    /// Another worker holds the key: ask again later.
    Busy,
}

impl TxClaim {
    /// The idempotency key.
    pub fn key(&self) -> &str {
        self.claim.key()
    }

    /// The open transaction's connection, for the handler's statements
    /// (`.execute(&mut *conn)`).
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// The open transaction itself (savepoints: `begin()` on it).
    pub fn transaction(&mut self) -> &mut Transaction<'static, Postgres> {
        &mut self.tx
    }

    /// Writes the processed mark in the transaction and commits it: the handler's
    /// writes and the mark land together.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] when the lease ran out and another worker took the key over
    /// (the transaction is rolled back: nothing of this run lands); [`Error::Database`]
    /// (`op = "mark"` or `"commit"`): rolled back, the key released.
    pub async fn commit(self) -> Result<(), Error> {
        let TxClaim {
            claim,
            mut tx,
            shared,
        } = self;
        let marked = sqlx::query(MARK_IN_TX_SQL)
            .bind(claim.key())
            .bind(claim.token())
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::database("mark", e))?
            .rows_affected();
        if marked == 0 {
            let key = claim.key().to_owned();
            // Not ours any more: nothing to release; `tx` rolls back on drop.
            claim.disarm();
            return Err(Error::LeaseLost { key });
        }
        // On a commit error `claim` drops and is released; if the commit did land, the
        // release finds the key processed and changes nothing.
        tx.commit()
            .await
            .map_err(|e| Error::database("commit", e))?;
        claim.disarm();
        shared.counters.processed.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Rolls the transaction back and releases the key so a retry runs it.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] with `op = "rollback"` (the key is still released), or the
    /// release's error.
    pub async fn rollback(self) -> Result<(), Error> {
        let TxClaim { claim, tx, .. } = self;
        let rolled_back = tx
            .rollback()
            .await
            .map_err(|e| Error::database("rollback", e));
        claim.release().await?;
        rolled_back
    }
}

impl fmt::Debug for TxClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxClaim")
            .field("claim", &self.claim)
            .finish_non_exhaustive()
    }
}

impl Shared {
    async fn cleanup(&self) -> Result<u64, Error> {
        let chunk = self.settings.cleanup_chunk_size;
        let retention = self.settings.retention.as_secs_f64();
        let mut deleted = 0u64;
        loop {
            let n = sqlx::query(CLEANUP_SQL)
                .bind(retention)
                .bind(i64::from(chunk))
                .execute(&self.pool)
                .await
                .map_err(|e| Error::database("cleanup", e))?
                .rows_affected();
            deleted += n;
            self.counters.table_size.fetch_sub(n as i64, Relaxed);
            if n < u64::from(chunk) {
                break;
            }
        }
        let rows = self.refresh_table_size().await?;
        tracing::debug!(
            deleted,
            rows,
            "Deleted processed events past the retention."
        );
        Ok(deleted)
    }

    async fn refresh_table_size(&self) -> Result<u64, Error> {
        let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM processed_events")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| Error::database("count", e))?;
        self.counters.table_size.store(rows, Relaxed);
        Ok(rows.max(0) as u64)
    }

    /// Claims, then frees the statement slot `permit` (before answering: a caller's
    /// next request must find the guard idle, not linger behind this batch).
    async fn claim_batch(
        &self,
        requests: Vec<(String, oneshot::Sender<Result<ClaimReply, Error>>)>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        // Sorted (row-lock order) and deduplicated: one statement may not touch a row
        // twice. Callers asking for the same key share one answer; only the first gets
        // the claim, the others hear `Busy`.
        let mut by_key: BTreeMap<String, Vec<oneshot::Sender<Result<ClaimReply, Error>>>> =
            BTreeMap::new();
        for (key, reply) in requests {
            by_key.entry(key).or_default().push(reply);
        }
        let keys: Vec<String> = by_key.keys().cloned().collect();
        let token: i64 = rand::random();
        let lease = self.settings.lease.as_secs_f64();
        let rows = with_retries(|| {
            sqlx::query_as::<_, (String, bool, bool, bool)>(CLAIM_SQL)
                .bind(&keys)
                .bind(token)
                .bind(lease)
                .fetch_all(&self.pool)
        })
        .await;
        drop(permit);
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(keys = keys.len(), error = %e, "Idempotency claim batch failed.");
                let source = Arc::new(e);
                for reply in by_key.into_values().flatten() {
                    let _ = reply.send(Err(Error::Database {
                        op: "claim",
                        source: Arc::clone(&source),
                    }));
                }
                return;
            }
        };
        let (mut claimed, mut inserted_rows, mut processed) = (0usize, 0i64, 0usize);
        for (key, won, inserted, was_processed) in rows {
            let Some(replies) = by_key.remove(&key) else {
                continue;
            };
            let answer = if won {
                claimed += 1;
                inserted_rows += i64::from(inserted);
                ClaimReply::Claimed(token)
            } else if was_processed {
                processed += 1;
                ClaimReply::Processed
            } else {
                ClaimReply::Busy
            };
            let mut replies = replies.into_iter();
            if let Some(first) = replies.next() {
                let _ = first.send(Ok(answer));
            }
            let rest = match answer {
                ClaimReply::Claimed(_) => ClaimReply::Busy,
                other => other,
            };
            for reply in replies {
                let _ = reply.send(Ok(rest));
            }
        }
        // Every key comes back from the statement; if one did not, `Busy` is the
        // answer that decides nothing.
        for reply in by_key.into_values().flatten() {
            let _ = reply.send(Ok(ClaimReply::Busy));
        }
        self.counters.table_size.fetch_add(inserted_rows, Relaxed);
        tracing::trace!(
            keys = keys.len(),
            claimed,
            processed,
            "Idempotency claim batch."
        );
    }

    /// Settles, then frees `permit` if given (as in `claim_batch`).
    async fn settle_batch(
        &self,
        mut requests: Vec<SettleRequest>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        requests.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<&str> = requests.iter().map(|r| r.key.as_str()).collect();
        let tokens: Vec<i64> = requests.iter().map(|r| r.token).collect();
        let dones: Vec<bool> = requests.iter().map(|r| r.done).collect();
        let settled = with_retries(|| {
            sqlx::query_scalar::<_, String>(SETTLE_SQL)
                .bind(&keys)
                .bind(&tokens)
                .bind(&dones)
                .fetch_all(&self.pool)
        })
        .await;
        drop(permit);
        let settled = match settled {
            Ok(settled) => settled,
            Err(e) => {
                tracing::warn!(keys = keys.len(), error = %e, "Idempotency settle batch failed.");
                let source = Arc::new(e);
                for r in requests {
                    if let Some(reply) = r.reply {
                        let _ = reply.send(Err(Error::Database {
                            op: "settle",
                            source: Arc::clone(&source),
                        }));
                    }
                }
                return;
            }
        };
        // `settled` comes back in no particular order; keys are unique per request
        // (one claim per key at a time), so a sorted search finds each.
        let mut settled = settled;
        settled.sort_unstable();
        let (mut done, mut released) = (0u64, 0u64);
        for r in requests {
            let ok = settled.binary_search(&r.key).is_ok();
            if ok && r.done {
                done += 1;
            } else if ok {
                released += 1;
            }
            if let Some(reply) = r.reply {
                let _ = reply.send(if ok {
                    Ok(())
                } else {
                    Err(Error::LeaseLost { key: r.key })
                });
            }
        }
        self.counters.processed.fetch_add(done, Relaxed);
        self.counters.failed.fetch_add(released, Relaxed);
    }
}

struct SettleRequest {
    key: String,
    token: i64,
    done: bool,
    reply: Option<oneshot::Sender<Result<(), Error>>>,
}

/// Runs `statement` again when it lost a deadlock or serialization race.
async fn with_retries<T, Fut>(mut statement: impl FnMut() -> Fut) -> Result<T, sqlx::Error>
where
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut tries = 0;
    loop {
        match statement().await {
            Err(sqlx::Error::Database(e))
                if tries < TRANSIENT_RETRIES
                    && matches!(e.code().as_deref(), Some("40P01" | "40001")) =>
            {
                tries += 1;
                tracing::debug!(tries, code = ?e.code(), "Retrying an idempotency statement.");
            }
            other => return other,
        }
    }
}

/// The batcher: turns queued requests into statements, at most
/// `max_in_flight_batches` at once. Ends when every sender is gone.
async fn run_batcher(shared: Arc<Shared>, mut rx: mpsc::Receiver<Request>) {
    let max = shared.settings.max_batch_size;
    let in_flight = shared.settings.max_in_flight_batches;
    let permits = Arc::new(Semaphore::new(in_flight));
    let mut buf = Vec::with_capacity(max);
    loop {
        // Waiting for a free statement slot first: meanwhile requests pile up in the
        // channel and leave together.
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        if rx.recv_many(&mut buf, max).await == 0 {
            break;
        }
        // Linger only if another statement is running (our answers would not come
        // sooner than its anyway); an idle guard sends a lone request at once.
        let others_running = permits.available_permits() + 1 < in_flight;
        if others_running && buf.len() < max && !shared.settings.batch_delay.is_zero() {
            let deadline = tokio::time::Instant::now() + shared.settings.batch_delay;
            while buf.len() < max {
                let room = max - buf.len();
                tokio::select! {
                    n = rx.recv_many(&mut buf, room) => if n == 0 { break },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        let batch = std::mem::replace(&mut buf, Vec::with_capacity(max));
        tokio::spawn(execute(Arc::clone(&shared), batch, permit));
    }
}

/// One batch: renewals first (a release in the same batch then wins), settles next
/// (so a waiter polling the same key sees it processed), then claims; one statement
/// each.
async fn execute(shared: Arc<Shared>, batch: Vec<Request>, permit: OwnedSemaphorePermit) {
    let mut claims = Vec::new();
    let mut settles = Vec::new();
    let mut renewals = Vec::new();
    for request in batch {
        match request {
            Request::Renew { key, token, reply } => renewals.push((key, token, reply)),
            Request::Claim { key, reply } => claims.push((key, reply)),
            Request::Settle {
                key,
                token,
                done,
                reply,
            } => settles.push(SettleRequest {
                key,
                token,
                done,
                reply,
            }),
        }
    }
    shared.counters.statements.fetch_add(
        u64::from(!claims.is_empty())
            + u64::from(!settles.is_empty())
            + u64::from(!renewals.is_empty()),
        Relaxed,
    );
    // The slot is held until the batch's last statement returns.
    let mut permit = Some(permit);
    if !renewals.is_empty() {
        let last = (claims.is_empty() && settles.is_empty())
            .then(|| permit.take())
            .flatten();
        shared.renew_batch(renewals, last).await;
    }
    if !settles.is_empty() {
        let last = claims.is_empty().then(|| permit.take()).flatten();
        shared.settle_batch(settles, last).await;
    }
    if !claims.is_empty() {
        shared.claim_batch(claims, permit).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::postgres::PgPoolOptions;

    fn pool() -> PgPool {
        // Lazy: never connects in these tests.
        PgPoolOptions::new()
            .connect_lazy("postgres://localhost/none")
            .unwrap()
    }

    #[tokio::test]
    async fn builder_validates() {
        let b = || IdempotencyGuard::builder(pool());
        assert!(b().build().is_ok());
        assert!(b()
            .lease(Duration::from_secs(10))
            .retention(Duration::from_secs(10))
            .build()
            .is_err());
        assert!(b().max_batch_size(0).build().is_err());
        assert!(b()
            .max_batch_size(MAX_BATCH_SIZE_LIMIT + 1)
            .build()
            .is_err());
        assert!(b().max_in_flight_batches(0).build().is_err());
        assert!(b().queue_capacity(0).build().is_err());
        assert!(b().cleanup_chunk_size(0).build().is_err());
        assert!(b().batch_delay(Duration::ZERO).build().is_ok());
    }

    #[tokio::test]
    async fn new_caps_the_lease_at_half_the_retention() {
        let g = IdempotencyGuard::new(pool(), Duration::from_secs(20));
        assert_eq!(g.lease(), Duration::from_secs(10));
        let g = IdempotencyGuard::new(pool(), DEFAULT_RETENTION);
        assert_eq!(g.lease(), DEFAULT_LEASE);
    }

    #[test]
    fn guard_is_send_sync() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<IdempotencyGuard>();
        assert_send_sync::<TxClaim>();
    }

    #[test]
    fn migration_creates_the_table_and_index_idempotently() {
        assert!(MIGRATION_SQL.contains("CREATE TABLE IF NOT EXISTS processed_events"));
        assert!(MIGRATION_SQL.contains("CREATE INDEX IF NOT EXISTS"));
    }
}
