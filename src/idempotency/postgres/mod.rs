//! The PostgreSQL store: the guide's `processed_events` table, batched.
//!
//! See [`IdempotencyGuard`] (its "Batching" section) for how requests are batched.
//!
//! `guard` and `builder` hold the API; `store` queues each call to the `batcher`,
//! which runs the claim, settle and cleanup `statements` (and `renew`'s); `tx` is
//! the transactional path ([`TxClaim`]).

mod batcher;
mod builder;
mod guard;
mod renew;
mod statements;
mod store;
#[cfg(test)]
mod tests;
mod tx;

use std::time::Duration;

use sqlx::PgPool;

use super::Counters;

pub use builder::GuardBuilder;
use builder::Settings;
pub use guard::IdempotencyGuard;
pub use tx::{TxBegin, TxClaim};

/// The shipped migration (`migrations/…_create_processed_events_table.sql`): the table,
/// its retention index. Idempotent. Run it with [`IdempotencyGuard::migrate`].
pub const MIGRATION_SQL: &str =
    include_str!("../../../migrations/20261128000000_create_processed_events_table.sql");

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

/// `pg_advisory_xact_lock` key serializing concurrent migrations ("xzidem" in ASCII).
const MIGRATION_LOCK_ID: i64 = 0x787a_6964_656d;

/// What the batcher and cleanup tasks hold (never a sender: no cycle).
#[derive(Debug)]
struct Shared {
    pool: PgPool,
    settings: Settings,
    counters: Counters,
}
