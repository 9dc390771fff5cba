//! [`IdempotencyGuard`]: the guard's public calls (build, migrate, process,
//! clean up, metrics).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio::sync::mpsc;

use super::batcher::Request;
use super::store::GuardInner;
#[cfg(doc)]
use super::DEFAULT_CLEANUP_INTERVAL;
use super::{
    GuardBuilder, TxBegin, TxClaim, DEFAULT_BATCH_DELAY, DEFAULT_CLEANUP_CHUNK_SIZE,
    DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_IN_FLIGHT_BATCHES, DEFAULT_QUEUE_CAPACITY,
    DEFAULT_RETENTION, MIGRATION_LOCK_ID, MIGRATION_SQL,
};
use crate::idempotency::{
    process_if_new, wait_for_claim, Begin, BoxError, BoxFuture, Claim, Error, IdempotencyMetrics,
    IdempotencyStore, ProcessingResult, WorkError, DEFAULT_BUSY_POLL_INTERVAL, DEFAULT_LEASE,
};

/// The idempotency guard of the guide, on PostgreSQL: which keys were processed, shared
/// by every consumer of the `processed_events` table. Cheap to clone (shared state).
///
/// Build it with [`new`](IdempotencyGuard::new) (the guide's call) or
/// [`builder`](IdempotencyGuard::builder), create the table once with
/// [`migrate`](IdempotencyGuard::migrate), then use
/// [`process_if_new`](IdempotencyGuard::process_if_new),
/// [`process_in_tx`](IdempotencyGuard::process_in_tx) or the [`IdempotencyStore`] trait.
/// See the [module docs](crate::idempotency) for the states of a key.
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
    pub(super) inner: Arc<GuardInner>,
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

    pub(super) fn sender(&self) -> &mpsc::Sender<Request> {
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
