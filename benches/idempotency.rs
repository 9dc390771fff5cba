//! The idempotency guard against the guide's way, side by side on one local PostgreSQL.
//!
//! `cargo bench --features postgres,dev-stack --bench idempotency [-- EVENTS]`
//!
//! Starts a throwaway server (`tests/pg_support`), twice: with PostgreSQL's durable
//! defaults (`fsync`, `synchronous_commit` on: production) and with durability off.
//! On each, N new events with a no-op work go through:
//!
//! - the guide's way: one `SELECT` then one `INSERT` per event, awaited in turn (its
//!   consumer loop), and the same with 256 concurrent callers on the pool;
//! - the batched guard (`IdempotencyGuard::process_if_new`, defaults) with 256
//!   concurrent callers, and with one caller (the latency of an idle guard).
//!
//! Prints events/s of each, the ratio to the guide's way, and how many statements the
//! guard ran. `IN_FLIGHT=n` and `DELAY_US=µs` override the guard's
//! `max_in_flight_batches` and `batch_delay` to compare settings.
//!
//! The whole pipeline with the guard against the guide's way in the same pipeline is
//! `xzepr-consumer bench --postgres local` (`guard_over_guide`).

#[path = "../tests/pg_support/mod.rs"]
mod pg_support;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use xzepr_consumer::idempotency::IdempotencyGuard;

const CONCURRENCY: usize = 256;
const POOL: u32 = 32;

const GUIDE_TABLE: &str = "\
CREATE TABLE guide_processed_events (
    event_id     TEXT PRIMARY KEY,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ON guide_processed_events (processed_at);";

/// The guide's sketch: is it there? if not, work, then insert.
async fn guide_process(pool: &PgPool, event_id: &str) {
    let seen: bool = sqlx::query_scalar(
        "SELECT EXISTS(SELECT 1 FROM guide_processed_events WHERE event_id = $1)",
    )
    .bind(event_id)
    .fetch_one(pool)
    .await
    .expect("select");
    if !seen {
        // (the work: nothing)
        sqlx::query(
            "INSERT INTO guide_processed_events (event_id) VALUES ($1) ON CONFLICT DO NOTHING",
        )
        .bind(event_id)
        .execute(pool)
        .await
        .expect("insert");
    }
}

/// Runs `n` events through `one` with `callers` concurrent callers; events/s.
async fn drive<F, Fut>(n: usize, callers: usize, one: F) -> f64
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let one = Arc::new(one);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let (next, one) = (next.clone(), one.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= n {
                    break;
                }
                one(format!("ev-{i:08}")).await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("caller");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn bench_server(name: &str, settings: &[&str], n: usize) {
    let Some(pg) = pg_support::PgServer::start("idempotency bench", settings) else {
        return;
    };
    let pool = pg.pool(POOL).await;
    sqlx::raw_sql(GUIDE_TABLE)
        .execute(&pool)
        .await
        .expect("guide table");
    // Guide sequential is slow with durable commits: a quarter of the events suffice.
    let n_seq = (n / 4).max(1000);

    let reset = |pool: PgPool| async move {
        sqlx::raw_sql("TRUNCATE processed_events, guide_processed_events; CHECKPOINT")
            .execute(&pool)
            .await
            .expect("truncate");
    };

    reset(pool.clone()).await;
    let p = pool.clone();
    let guide_seq = drive(n_seq, 1, move |id| {
        let p = p.clone();
        async move { guide_process(&p, &id).await }
    })
    .await;

    reset(pool.clone()).await;
    let p = pool.clone();
    let guide_conc = drive(n, CONCURRENCY, move |id| {
        let p = p.clone();
        async move { guide_process(&p, &id).await }
    })
    .await;

    reset(pool.clone()).await;
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let mut b = IdempotencyGuard::builder(pool.clone());
    if let Some(v) = env("IN_FLIGHT") {
        b = b.max_in_flight_batches(v as usize);
    }
    if let Some(v) = env("DELAY_US") {
        b = b.batch_delay(Duration::from_micros(v));
    }
    let guard = b.build().unwrap();
    let g = guard.clone();
    let batched = drive(n, CONCURRENCY, move |id| {
        let g = g.clone();
        async move {
            let r = g
                .process_if_new(&id, async { Ok(()) })
                .await
                .expect("guard");
            assert_eq!(r, xzepr_consumer::idempotency::ProcessingResult::Success);
        }
    })
    .await;
    let m = guard.metrics();
    assert_eq!(m.events_processed_total, n as u64);
    let batched_statements = m.statements_total;

    reset(pool.clone()).await;
    let g = guard.clone();
    let batched_seq = drive(n_seq, 1, move |id| {
        let g = g.clone();
        async move {
            g.process_if_new(&id, async { Ok(()) })
                .await
                .expect("guard");
        }
    })
    .await;

    println!("\n{name} ({n} events; {n_seq} for the one-caller rows; pool {POOL})");
    println!("| way | callers | events/s | vs guide, in turn |");
    println!("| --- | ---: | ---: | ---: |");
    for (way, callers, rate) in [
        ("guide: SELECT + INSERT per event", 1, guide_seq),
        ("guide: SELECT + INSERT per event", CONCURRENCY, guide_conc),
        ("batched guard (`process_if_new`)", CONCURRENCY, batched),
        ("batched guard (`process_if_new`)", 1, batched_seq),
    ] {
        println!(
            "| {way} | {callers} | {rate:.0} | {:.1}× |",
            rate / guide_seq
        );
    }
    println!(
        "batched guard, {CONCURRENCY} callers: {batched_statements} statements for {n} events \
         ({:.0} requests per statement)",
        2.0 * n as f64 / batched_statements as f64
    );
    println!(
        "batched guard vs guide in turn: {:.1}×; vs guide with {CONCURRENCY} callers: {:.1}×",
        batched / guide_seq,
        batched / guide_conc
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a bare number is the event count.
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(50_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        bench_server("durable (PostgreSQL defaults)", pg_support::DURABLE, n).await;
        bench_server(
            "durability off (fsync, synchronous_commit off)",
            pg_support::FAST,
            n,
        )
        .await;
    });
}
