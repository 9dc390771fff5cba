//! Unit tests of the guard that need no database.

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use super::{IdempotencyGuard, TxClaim, DEFAULT_RETENTION, MAX_BATCH_SIZE_LIMIT, MIGRATION_SQL};
use crate::idempotency::{IdempotencyStore, DEFAULT_LEASE};

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
