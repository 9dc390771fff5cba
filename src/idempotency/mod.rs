//! Idempotency: run each event's work once, however often Kafka delivers it.
//!
//! At-least-once delivery means replays (a crash before the commit, a rebalance, a
//! retry). A store remembers which idempotency keys (the `idempotency_key` header,
//! [`IDEMPOTENCY_KEY_HEADER`], or the CloudEvent `id`) were processed, and hands the
//! work of a key to exactly one caller at a time.
//!
//! Two stores implement [`IdempotencyStore`]:
//!
//! - [`IdempotencyGuard`] (feature `postgres`): the `processed_events` table of the
//!   idempotent-consumer guide, on the service's own sqlx `PgPool`, shared by every
//!   consumer of the table. Claims and marks are batched: many keys per statement.
//!   It also offers [`IdempotencyGuard::process_in_tx`] for handlers whose effects are
//!   rows in the same database: their writes and the processed mark commit together.
//! - [`MemoryStore`]: the same semantics in one process, bounded in size and time; for
//!   tests and for services without a database.
//!
//! # States of a key
//!
//! ```text
//!               begin: Run(claim)                      claim.complete()
//!   (absent) ─────────────────────────> claimed ──────────────────────────> processed
//!      ^                              (lease until)                             │
//!      │                               │   │  ^                                 │
//!      │   claim.release() / dropped   │   │  │ begin after the lease ran out:  │
//!      │   (claimable again at once) <─┘   └──┘ Run(new claim), the old one     │
//!      │                                        can no longer complete          │
//!      └──────────────────────── cleanup after the retention ───────────────────┘
//! ```
//!
//! - **absent**: never seen (or cleaned up). [`begin`](IdempotencyStore::begin) claims it
//!   and returns [`Begin::Run`].
//! - **claimed** with a lease: one caller runs the work. Any other `begin` gets
//!   [`Begin::Busy`] until the claim is completed, released or its lease runs out. A
//!   worker that crashed never settles its claim; after the lease, the next `begin`
//!   takes the key over with a new claim, and the old claim's `complete` then fails with
//!   [`Error::LeaseLost`]. Set the lease above the handler's worst-case run time: past
//!   it, a second worker may run the same work. The pipeline renews its claims while
//!   their work is pending (handler and lifecycle posts, which a slow XZepr can
//!   stretch), every third of the lease, so there the lease only bounds how long a
//!   crashed consumer's keys stay busy.
//! - **processed**: every `begin` returns [`Begin::AlreadyProcessed`] (counted in
//!   `events_duplicates_total`) until retention cleanup forgets the key.
//!
//! A failed work releases its claim (the key is claimable again at once, so a retry
//! runs it); a claim dropped without being settled is released on a best-effort basis,
//! with the lease as the backstop.
//!
//! # Two ways to use it
//!
//! The guide's one-call form, [`IdempotencyGuard::process_if_new`] (also on
//! [`MemoryStore`]), returns a [`ProcessingResult`] and waits (bounded) while another
//! worker holds the key. The pipeline-facing form is the object-safe trait:
//!
//! ```no_run
//! # async fn f(store: std::sync::Arc<dyn xzepr_consumer::idempotency::IdempotencyStore>)
//! # -> Result<(), xzepr_consumer::idempotency::Error> {
//! use xzepr_consumer::idempotency::Begin;
//! match store.begin("event-42").await? {
//!     Begin::Run(claim) => {
//!         let ok = true; // run the handler here
//!         if ok { claim.complete().await? } else { claim.release().await? }
//!     }
//!     Begin::AlreadyProcessed => { /* skip: a duplicate */ }
//!     Begin::Busy => { /* another worker holds it: hold the offset, try later */ }
//!     _ => {}
//! }
//! # Ok(()) }
//! ```

// Without the `postgres` feature the links to `IdempotencyGuard` have no target; the
// docs are built (and checked) with every feature.
#![cfg_attr(not(feature = "postgres"), allow(rustdoc::broken_intra_doc_links))]

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

mod memory;
#[cfg(feature = "postgres")]
mod postgres;

pub use memory::{
    MemoryStore, MemoryStoreBuilder, DEFAULT_MEMORY_CAPACITY, DEFAULT_MEMORY_RETENTION,
};
#[cfg(feature = "postgres")]
pub use postgres::{
    GuardBuilder, IdempotencyGuard, TxBegin, TxClaim, DEFAULT_BATCH_DELAY,
    DEFAULT_CLEANUP_CHUNK_SIZE, DEFAULT_CLEANUP_INTERVAL, DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_IN_FLIGHT_BATCHES, DEFAULT_QUEUE_CAPACITY, DEFAULT_RETENTION, MAX_BATCH_SIZE_LIMIT,
    MIGRATION_SQL,
};

/// Default claim lease of both stores: 30 s, above a typical handler's run time and
/// short enough that a crashed worker's events are taken over within the minute.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default first pause of `process_if_new` on a busy key (doubling up to 1 s): 10 ms,
/// a few handler runs.
pub const DEFAULT_BUSY_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The Kafka header producers put the idempotency key in (the guide's name).
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency_key";

/// The error a work future may fail with. Anything `?` turns into it, including
/// `anyhow::Error` and every `std::error::Error + Send + Sync`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A boxed, `Send` future: what [`IdempotencyGuard::process_in_tx`] handlers return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What [`IdempotencyGuard::process_if_new`] did with an event.
///
/// Not `#[non_exhaustive]`, on purpose: the guide matches it exhaustively, and that code
/// must keep compiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessingResult {
    /// The work ran and succeeded; the key is marked processed.
    Success,
    /// The key was processed before; the work did not run.
    AlreadyProcessed,
    /// The work ran and failed; the claim was released, so a retry runs it again.
    Failed(WorkError),
}

/// A work future's error, kept whole (`source()` and all) inside
/// [`ProcessingResult::Failed`]. Two are equal when their messages are (the error
/// itself need not be `PartialEq`).
#[derive(Clone)]
pub struct WorkError(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl WorkError {
    /// Wraps a work error.
    pub fn new(err: BoxError) -> Self {
        Self(Arc::from(err))
    }

    /// The work's own error.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl fmt::Display for WorkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for WorkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::error::Error for WorkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for WorkError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl Eq for WorkError {}

/// Errors of the idempotency stores.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A statement failed. Nothing was decided: the caller must not commit the offset.
    #[cfg(feature = "postgres")]
    #[error("idempotency store: {op} failed: {source}")]
    Database {
        /// The operation (`claim`, `settle`, `cleanup`, `migrate`, ...).
        op: &'static str,
        /// The database error (shared by every request of a failed batch).
        #[source]
        source: Arc<sqlx::Error>,
    },
    /// Another worker still held the key when the wait ran out.
    #[error("idempotency key {key:?} still held by another worker after {waited:?}")]
    Busy {
        /// The idempotency key.
        key: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The claim's lease ran out and another worker took the key over: this worker's
    /// work may have run twice, and its mark was not written.
    #[error("the claim on idempotency key {key:?} was lost (its lease ran out)")]
    LeaseLost {
        /// The idempotency key.
        key: String,
    },
    /// The in-memory store is full of claims in flight and cannot take another key.
    #[error("in-memory idempotency store full: {capacity} keys in flight")]
    Full {
        /// Its capacity.
        capacity: usize,
    },
    /// The store's background batcher is gone (the runtime is shutting down).
    #[error("idempotency store closed")]
    Closed,
}

impl Error {
    /// Whether trying the same call later may succeed (database trouble, a busy key, a
    /// full store). [`Error::LeaseLost`] is not: the work already ran.
    pub fn is_retryable(&self) -> bool {
        match self {
            #[cfg(feature = "postgres")]
            Error::Database { .. } => true,
            Error::Busy { .. } | Error::Full { .. } => true,
            Error::LeaseLost { .. } | Error::Closed => false,
        }
    }

    /// Whether this is [`Error::LeaseLost`].
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Error::LeaseLost { .. })
    }

    #[cfg(feature = "postgres")]
    #[cold]
    pub(crate) fn database(op: &'static str, source: sqlx::Error) -> Self {
        Error::Database {
            op,
            source: Arc::new(source),
        }
    }
}

/// The counters of one store, as the guide names them. Relaxed atomics: each is exact,
/// a snapshot is not taken at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyMetrics {
    /// Works that ran and were marked processed by this store.
    pub events_processed_total: u64,
    /// Keys found already processed (their work skipped).
    pub events_duplicates_total: u64,
    /// Works that failed (their claims released).
    pub events_failed_total: u64,
    /// Rows (keys) in the store. For PostgreSQL: counted exactly by each cleanup and
    /// [`IdempotencyGuard::refresh_table_size`], moved by this guard's own inserts and
    /// deletes in between (other consumers' rows show up at the next count).
    pub processed_events_table_size: u64,
    /// Claim and settle statements run (PostgreSQL; 0 in memory). Against the events,
    /// it tells how well requests are batched.
    pub statements_total: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    processed: AtomicU64,
    duplicates: AtomicU64,
    failed: AtomicU64,
    // Signed: other consumers' deletes can make our running estimate dip below zero
    // between two exact counts.
    table_size: AtomicI64,
    statements: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> IdempotencyMetrics {
        IdempotencyMetrics {
            events_processed_total: self.processed.load(Relaxed),
            events_duplicates_total: self.duplicates.load(Relaxed),
            events_failed_total: self.failed.load(Relaxed),
            processed_events_table_size: self.table_size.load(Relaxed).max(0) as u64,
            statements_total: self.statements.load(Relaxed),
        }
    }
}

/// The answer of [`IdempotencyStore::begin`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Begin {
    /// The caller holds the key: run the work, then [`Claim::complete`] or
    /// [`Claim::release`] it.
    Run(Claim),
    /// Processed before: skip the work (counted as a duplicate).
    AlreadyProcessed,
    /// Another worker holds the key (its lease has not run out). Nothing is decided:
    /// ask again later; it resolves at the latest after [`IdempotencyStore::lease`].
    Busy,
}

/// How a claim is settled by the store that made it.
pub(crate) trait Settle: Send + Sync + fmt::Debug {
    /// Marks the key processed (`done`) or releases it, if the claim still holds it.
    fn settle(&self, key: String, token: i64, done: bool) -> BoxFuture<'_, Result<(), Error>>;
    /// Releases without waiting (from `Drop`); the lease is the backstop if it cannot.
    fn abandon(&self, key: String, token: i64);
    /// Extends the claim's lease by a whole lease from now, if the claim still holds
    /// the key and its lease has not run out: `Ok(false)` once it does not (a
    /// released claim is never revived).
    fn renew(&self, key: String, token: i64) -> BoxFuture<'_, Result<bool, Error>>;
    /// The store's lease.
    fn lease(&self) -> Duration;
}

/// The right to run one key's work, from [`Begin::Run`]. Settle it with
/// [`complete`](Claim::complete) or [`release`](Claim::release); dropping it releases it
/// on a best-effort basis (the lease is the backstop).
#[must_use = "a claim must be completed or released"]
pub struct Claim {
    key: String,
    token: i64,
    store: Arc<dyn Settle>,
    settled: bool,
    /// The task renewing the lease ([`Claim::keep_alive`]), stopped with the claim.
    renewal: Option<tokio::task::AbortHandle>,
}

impl Claim {
    pub(crate) fn new(key: String, token: i64, store: Arc<dyn Settle>) -> Self {
        Self {
            key,
            token,
            store,
            settled: false,
            renewal: None,
        }
    }

    /// Keeps the lease from running out while this claim lives: a task on `runtime`
    /// extends it every third of the lease until the claim is completed, released or
    /// dropped. The lease then only bounds how long a *crashed* holder's key stays
    /// busy, not how long the work may take: the pipeline holds a claim until both
    /// lifecycle posts are acknowledged, which a slow XZepr can stretch past any lease,
    /// and a duplicate must not run the work meanwhile. Stops by itself once the claim
    /// is lost (taken over, or not renewed in time because the store was down).
    pub(crate) fn keep_alive(&mut self, runtime: &tokio::runtime::Handle) {
        if self.renewal.is_some() {
            return;
        }
        let store = Arc::clone(&self.store);
        let (key, token) = (self.key.clone(), self.token);
        // Three tries per lease: one slow or failed renewal does not lose the claim.
        let every = (store.lease() / 3).max(Duration::from_millis(1));
        let task = runtime.spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut logged = false;
            loop {
                tick.tick().await;
                match store.renew(key.clone(), token).await {
                    Ok(true) => logged = false,
                    Ok(false) => {
                        tracing::warn!(key, "Idempotency claim lost before its work was settled.");
                        return;
                    }
                    Err(e) if e.is_retryable() => {
                        if !logged {
                            logged = true;
                            tracing::warn!(key, error = %e, "Could not renew an idempotency claim; retrying.");
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        self.renewal = Some(task.abort_handle());
    }

    /// Stops the renewal task, if any.
    fn stop_renewal(&mut self) {
        if let Some(task) = self.renewal.take() {
            task.abort();
        }
    }

    /// The idempotency key.
    pub fn key(&self) -> &str {
        &self.key
    }

    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn token(&self) -> i64 {
        self.token
    }

    /// Marks the claim settled without telling the store (the store settled it itself).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn disarm(mut self) {
        self.settled = true;
        self.stop_renewal();
    }

    /// Marks the key processed: every later `begin` returns
    /// [`Begin::AlreadyProcessed`].
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] when the lease ran out and another worker took the key
    /// over; a database error when the mark could not be written (the key stays
    /// claimed until the lease runs out, then the work runs again).
    pub async fn complete(mut self) -> Result<(), Error> {
        self.settled = true;
        self.stop_renewal();
        let key = std::mem::take(&mut self.key);
        self.store.settle(key, self.token, true).await
    }

    /// Gives the key back unprocessed (the work failed): the next `begin` runs it.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] when another worker took the key over meanwhile (nothing
    /// to release); a database error (the lease is then the backstop).
    pub async fn release(mut self) -> Result<(), Error> {
        self.settled = true;
        self.stop_renewal();
        let key = std::mem::take(&mut self.key);
        self.store.settle(key, self.token, false).await
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.stop_renewal();
        if !self.settled {
            self.store
                .abandon(std::mem::take(&mut self.key), self.token);
        }
    }
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("key", &self.key)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// A store of processed idempotency keys, shared by the workers of a pipeline as
/// `Arc<dyn IdempotencyStore>`.
///
/// Implemented by [`IdempotencyGuard`] (PostgreSQL) and [`MemoryStore`]. Only this
/// crate can make a [`Claim`], so other implementations are not supported (yet).
#[async_trait::async_trait]
pub trait IdempotencyStore: Send + Sync + fmt::Debug {
    /// Claims `key` for the caller if it is neither processed nor held by another
    /// worker. Concurrent calls are batched by the PostgreSQL store.
    ///
    /// # Errors
    ///
    /// A database error, [`Error::Full`] (in-memory store), [`Error::Closed`]. Nothing
    /// was claimed then.
    async fn begin(&self, key: &str) -> Result<Begin, Error>;

    /// The claims' lease: how long a crashed worker's key stays [`Begin::Busy`].
    fn lease(&self) -> Duration;

    /// The store's counters.
    fn metrics(&self) -> IdempotencyMetrics;
}

/// How [`process_if_new`] waits on a key another worker holds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BusyWait {
    pub(crate) first_poll: Duration,
    pub(crate) timeout: Duration,
}

/// Upper bound of the busy-poll backoff: a waiter asks at least once a second, so it
/// sees a long handler's completion within a second without flooding the store.
const MAX_BUSY_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The guide's `process_if_new` on any store: claim (waiting out another worker's
/// claim, bounded), run, then mark or release.
pub(crate) async fn process_if_new<S, F>(
    store: &S,
    key: &str,
    wait: BusyWait,
    work: F,
) -> Result<ProcessingResult, Error>
where
    S: IdempotencyStore + ?Sized,
    F: Future<Output = Result<(), BoxError>>,
{
    let claim = match wait_for_claim(store, key, wait).await? {
        Some(claim) => claim,
        None => return Ok(ProcessingResult::AlreadyProcessed),
    };
    // A panicking work drops `claim`, which releases it.
    match work.await {
        Ok(()) => {
            claim.complete().await?;
            Ok(ProcessingResult::Success)
        }
        Err(err) => {
            let err = WorkError::new(err);
            if let Err(release) = claim.release().await {
                // The work failed either way; the lease frees the key if this did not.
                tracing::warn!(key, error = %release, "Could not release a failed event's claim.");
            }
            Ok(ProcessingResult::Failed(err))
        }
    }
}

/// `begin` until the key is ours (`Some`) or processed (`None`), polling with backoff
/// while another worker holds it, at most `wait.timeout`.
pub(crate) async fn wait_for_claim<S>(
    store: &S,
    key: &str,
    wait: BusyWait,
) -> Result<Option<Claim>, Error>
where
    S: IdempotencyStore + ?Sized,
{
    let started = tokio::time::Instant::now();
    let mut pause = wait.first_poll;
    loop {
        match store.begin(key).await? {
            Begin::Run(claim) => return Ok(Some(claim)),
            Begin::AlreadyProcessed => return Ok(None),
            Begin::Busy => {
                let waited = started.elapsed();
                if waited >= wait.timeout {
                    return Err(Error::Busy {
                        key: key.to_owned(),
                        waited,
                    });
                }
                tokio::time::sleep(pause.min(wait.timeout - waited)).await;
                pause = (pause * 2).min(MAX_BUSY_POLL_INTERVAL);
            }
        }
    }
}

/// Checks one `Duration` setting is non-zero.
fn nonzero(name: &'static str, d: Duration) -> Result<(), crate::config::ConfigError> {
    if d.is_zero() {
        return Err(crate::config::ConfigError::Invalid {
            name,
            value: format!("{d:?}"),
            expected: "a non-zero duration",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_send_sync_and_small() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Error>();
        assert_send_sync::<Claim>();
        assert_send_sync::<ProcessingResult>();
        // Returned per event: keep it a few words.
        assert!(
            std::mem::size_of::<Error>() <= 48,
            "{}",
            std::mem::size_of::<Error>()
        );
    }

    #[test]
    fn work_errors_compare_by_message() {
        let a = WorkError::new("boom".into());
        let b = WorkError::new("boom".into());
        assert_eq!(
            ProcessingResult::Failed(a.clone()),
            ProcessingResult::Failed(b)
        );
        assert_ne!(a, WorkError::new("other".into()));
        assert_eq!(a.to_string(), "boom");
    }

    #[test]
    fn retryable_predicate() {
        assert!(Error::Busy {
            key: "k".into(),
            waited: Duration::ZERO
        }
        .is_retryable());
        assert!(!Error::LeaseLost { key: "k".into() }.is_retryable());
        assert!(Error::LeaseLost { key: "k".into() }.is_lease_lost());
    }
}
