//! The idempotency guard against a real PostgreSQL server, started per test by
//! `pg_support` (Debian's `postgresql`, installed by `.ci/deps`). Without the server
//! binaries each test prints `SKIPPED` and why; with `CI` set it fails instead.
#![cfg(feature = "postgres")]

#[cfg(feature = "dev-stack")]
mod http_support;
#[cfg(feature = "dev-stack")]
mod kafka_support;
mod pg_support;
#[cfg(feature = "dev-stack")]
mod slow_xzepr;

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use pg_support::{PgServer, FAST};
use sqlx::PgPool;
use xzepr_consumer::idempotency::{
    Begin, BoxError, BoxFuture, Claim, IdempotencyGuard, IdempotencyStore, ProcessingResult,
    TxBegin,
};

/// Generous bound for "eventually" on a loaded machine; never a timing assertion.
const EVENTUALLY: Duration = Duration::from_secs(30);

async fn server(test: &str, connections: u32) -> Option<(PgServer, PgPool)> {
    let server = PgServer::start(test, FAST)?;
    let pool = server.pool(connections).await;
    Some((server, pool))
}

async fn run(store: &dyn IdempotencyStore, key: &str) -> Claim {
    match store.begin(key).await.unwrap() {
        Begin::Run(claim) => claim,
        other => panic!("expected Run for {key}, got {other:?}"),
    }
}

async fn state(pool: &PgPool, key: &str) -> Option<String> {
    sqlx::query_scalar("SELECT state FROM processed_events WHERE event_id = $1")
        .bind(key)
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// The guide's own test (`test_duplicate_event_not_reprocessed`), ported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_event_not_reprocessed() {
    let Some((_pg, pool)) = server("duplicate_event_not_reprocessed", 10).await else {
        return;
    };
    let guard = IdempotencyGuard::new(pool.clone(), Duration::from_secs(86400));
    let event_id = "test-event-123";

    // Track how many times processing logic is called
    let call_count = Arc::new(AtomicU32::new(0));

    // First processing (with a `?` in it, as the guide's consumer has)
    let call_count_clone = call_count.clone();
    let result1 = guard
        .process_if_new(event_id, async move {
            let _payload: serde_json::Value = serde_json::from_slice(b"{}")?;
            call_count_clone.fetch_add(1, SeqCst);
            Ok(())
        })
        .await
        .unwrap();

    assert_eq!(result1, ProcessingResult::Success);
    assert_eq!(call_count.load(SeqCst), 1);

    // Second processing (duplicate)
    let call_count_clone = call_count.clone();
    let result2 = guard
        .process_if_new(event_id, async move {
            call_count_clone.fetch_add(1, SeqCst);
            Ok(())
        })
        .await
        .unwrap();

    assert_eq!(result2, ProcessingResult::AlreadyProcessed);
    assert_eq!(call_count.load(SeqCst), 1); // Still 1 (not called again)

    assert_eq!(state(&pool, event_id).await.as_deref(), Some("processed"));
    let m = guard.metrics();
    assert_eq!(m.events_processed_total, 1);
    assert_eq!(m.events_duplicates_total, 1);
}

/// 8 tasks × the same 1,000 ids, all at once; `one_guard`: the tasks share one guard
/// (one batcher: the same key twice in a batch), else each is its own consumer.
async fn race(test: &str, one_guard: bool) {
    const IDS: usize = 1_000;
    const TASKS: usize = 8;
    let Some((_pg, pool)) = server(test, 40).await else {
        return;
    };
    // The shared guard also lingers for company (a non-default batch delay), so that
    // path runs too.
    let shared = IdempotencyGuard::builder(pool.clone())
        .batch_delay(Duration::from_millis(2))
        .build()
        .unwrap();
    let runs: Arc<Vec<AtomicU32>> = Arc::new((0..IDS).map(|_| AtomicU32::new(0)).collect());
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let guard = if one_guard {
            shared.clone()
        } else {
            IdempotencyGuard::new(pool.clone(), Duration::from_secs(86400))
        };
        let runs = runs.clone();
        tasks.spawn(async move {
            let mut calls = tokio::task::JoinSet::new();
            for n in 0..IDS {
                // Each task walks the ids in its own order.
                let i = (n * 7 + t * 131) % IDS;
                let (guard, runs) = (guard.clone(), runs.clone());
                calls.spawn(async move {
                    guard
                        .process_if_new(&format!("race-{i}"), async move {
                            runs[i].fetch_add(1, SeqCst);
                            // Hold the claim a moment so the others find it busy.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            Ok(())
                        })
                        .await
                        .unwrap()
                });
            }
            let (mut success, mut duplicate) = (0usize, 0usize);
            while let Some(r) = calls.join_next().await {
                match r.unwrap() {
                    ProcessingResult::Success => success += 1,
                    ProcessingResult::AlreadyProcessed => duplicate += 1,
                    other => panic!("{other:?}"),
                }
            }
            (success, duplicate, guard.metrics())
        });
    }
    let (mut success, mut duplicate, mut processed_metric, mut duplicate_metric) = (0, 0, 0, 0);
    while let Some(r) = tasks.join_next().await {
        let (s, d, m) = r.unwrap();
        success += s;
        duplicate += d;
        if !one_guard {
            processed_metric += m.events_processed_total;
            duplicate_metric += m.events_duplicates_total;
        }
    }
    if one_guard {
        let m = shared.metrics();
        (processed_metric, duplicate_metric) =
            (m.events_processed_total, m.events_duplicates_total);
        // Batched: thousands of concurrent requests (8,000 first claims, their settles,
        // the busy polls) went out in far fewer statements.
        let requests = (TASKS * IDS + IDS) as u64;
        assert!(
            m.statements_total * 10 < requests,
            "{} statements for at least {requests} requests",
            m.statements_total
        );
    }
    let twice: Vec<usize> = (0..IDS).filter(|&i| runs[i].load(SeqCst) != 1).collect();
    assert!(twice.is_empty(), "ids not run exactly once: {twice:?}");
    assert_eq!((success, duplicate), (IDS, IDS * (TASKS - 1)));
    assert_eq!(processed_metric, IDS as u64);
    assert_eq!(duplicate_metric, (IDS * (TASKS - 1)) as u64);
    let processed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_events WHERE state = 'processed'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(processed, IDS as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_eight_consumers_same_1000_ids_each_runs_once() {
    race("race_eight_consumers_same_1000_ids_each_runs_once", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_eight_tasks_one_guard_same_1000_ids_each_runs_once() {
    race(
        "race_eight_tasks_one_guard_same_1000_ids_each_runs_once",
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_claim_is_taken_over_and_the_old_owner_cannot_complete() {
    let Some((_pg, pool)) = server("expired_claim_is_taken_over", 10).await else {
        return;
    };
    let lease = Duration::from_millis(300);
    let guard = |pool: &PgPool| {
        IdempotencyGuard::builder(pool.clone())
            .lease(lease)
            .build()
            .unwrap()
    };
    let (old_owner, new_owner) = (guard(&pool), guard(&pool));

    // A worker that vanished: its claim is never settled (not even on drop).
    std::mem::forget(run(&old_owner, "vanished").await);
    assert!(matches!(
        new_owner.begin("vanished").await.unwrap(),
        Begin::Busy
    ));
    // process_if_new waits the lease out, then runs the work itself.
    let ran = Arc::new(AtomicU32::new(0));
    let r = ran.clone();
    let result = new_owner
        .process_if_new("vanished", async move {
            r.fetch_add(1, SeqCst);
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(result, ProcessingResult::Success);
    assert_eq!(ran.load(SeqCst), 1);

    // A worker that outran its lease: the key is taken over, its late mark is refused.
    let slow = run(&old_owner, "slow").await;
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    let taken_over = run(&new_owner, "slow").await;
    let err = slow.complete().await.unwrap_err();
    assert!(err.is_lease_lost(), "{err}");
    assert_eq!(state(&pool, "slow").await.as_deref(), Some("claimed"));
    taken_over.complete().await.unwrap();
    assert!(matches!(
        old_owner.begin("slow").await.unwrap(),
        Begin::AlreadyProcessed
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_or_dropped_work_can_be_retried() {
    let Some((_pg, pool)) = server("failed_or_dropped_work_can_be_retried", 10).await else {
        return;
    };
    let guard = IdempotencyGuard::new(pool.clone(), Duration::from_secs(86400));
    let ran = Arc::new(AtomicU32::new(0));

    let r = ran.clone();
    let failed = guard
        .process_if_new("flaky", async move {
            r.fetch_add(1, SeqCst);
            Err("downstream unavailable".into())
        })
        .await
        .unwrap();
    assert!(
        matches!(&failed, ProcessingResult::Failed(e) if e.to_string() == "downstream unavailable"),
        "{failed:?}"
    );
    // Released at once: no lease to wait out.
    assert!(matches!(guard.begin("flaky").await.unwrap(), Begin::Run(_)));

    let r = ran.clone();
    let retried = guard
        .process_if_new("flaky", async move {
            r.fetch_add(1, SeqCst);
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(retried, ProcessingResult::Success);
    assert_eq!(ran.load(SeqCst), 2);
    assert!(guard.metrics().events_failed_total >= 1);

    // A claim dropped unsettled (a panicking handler) is released in the background.
    drop(run(&guard, "dropped").await);
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        match guard.begin("dropped").await.unwrap() {
            Begin::Run(claim) => break claim.complete().await.unwrap(),
            Begin::Busy if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => panic!("dropped claim not released: {other:?}"),
        }
    }
}

async fn side_effect(pool: &PgPool, key: &str) -> bool {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM notifications WHERE event_id = $1")
        .bind(key)
        .fetch_one(pool)
        .await
        .unwrap()
        == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_handler_writes_and_mark_land_together() {
    let Some((_pg, pool)) = server("transactional_handler", 10).await else {
        return;
    };
    sqlx::query("CREATE TABLE notifications (event_id TEXT PRIMARY KEY, body TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let guard = IdempotencyGuard::new(pool.clone(), Duration::from_secs(86400));

    // Fails half-way: its first write is done, the second statement fails.
    let result = guard
        .process_in_tx("tx-1", |tx| {
            Box::pin(async move {
                sqlx::query("INSERT INTO notifications VALUES ($1, 'hello')")
                    .bind("tx-1")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO no_such_table VALUES (1)")
                    .execute(&mut *tx)
                    .await?;
                Ok(())
            })
        })
        .await
        .unwrap();
    assert!(matches!(result, ProcessingResult::Failed(_)), "{result:?}");
    assert!(!side_effect(&pool, "tx-1").await, "handler write survived");
    assert_ne!(state(&pool, "tx-1").await.as_deref(), Some("processed"));

    // The retry runs (the claim was released) and both land.
    // A fn item keeps the handler's lifetime generic (a closure in a `let` would not).
    fn insert(tx: &mut sqlx::PgConnection) -> BoxFuture<'_, Result<(), BoxError>> {
        Box::pin(async move {
            sqlx::query("INSERT INTO notifications VALUES ('tx-1', 'hello')")
                .execute(&mut *tx)
                .await?;
            Ok(())
        })
    }
    assert_eq!(
        guard.process_in_tx("tx-1", insert).await.unwrap(),
        ProcessingResult::Success
    );
    assert!(side_effect(&pool, "tx-1").await);
    assert_eq!(state(&pool, "tx-1").await.as_deref(), Some("processed"));
    assert_eq!(
        guard.process_in_tx("tx-1", insert).await.unwrap(),
        ProcessingResult::AlreadyProcessed
    );

    // A handler that outran its lease: another worker took the key over (still
    // running); the late commit is refused and its write rolled back.
    let short = IdempotencyGuard::builder(pool.clone())
        .lease(Duration::from_millis(300))
        .build()
        .unwrap();
    let TxBegin::Run(mut late) = short.begin_in_tx("tx-2").await.unwrap() else {
        panic!("expected Run");
    };
    sqlx::query("INSERT INTO notifications VALUES ('tx-2', 'late')")
        .execute(late.connection())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new_owner = run(&guard, "tx-2").await;
    let err = late.commit().await.unwrap_err();
    assert!(err.is_lease_lost(), "{err}");
    assert!(!side_effect(&pool, "tx-2").await, "late write landed");
    assert_eq!(state(&pool, "tx-2").await.as_deref(), Some("claimed"));
    new_owner.complete().await.unwrap();
    assert_eq!(state(&pool, "tx-2").await.as_deref(), Some("processed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_only_rows_older_than_the_retention() {
    let Some((_pg, pool)) = server("cleanup_removes_only_old_rows", 10).await else {
        return;
    };
    let guard = IdempotencyGuard::builder(pool.clone())
        .retention(Duration::from_secs(3600))
        .cleanup_chunk_size(7) // several chunks
        .build()
        .unwrap();
    for i in 0..50 {
        run(&guard, &format!("k{i}"))
            .await
            .complete()
            .await
            .unwrap();
    }
    run(&guard, "released").await.release().await.unwrap();
    let live = run(&guard, "live-claim").await;
    // 23 processed rows, the released claim and the live claim are two hours old; the
    // live claim's lease still runs, so it must stay.
    sqlx::query(
        "UPDATE processed_events SET processed_at = now() - interval '2 hours'
         WHERE event_id IN ('released', 'live-claim')
            OR (event_id LIKE 'k%' AND substr(event_id, 2)::int < 23)",
    )
    .execute(&pool)
    .await
    .unwrap();
    // Just inside the retention: stays.
    sqlx::query(
        "UPDATE processed_events SET processed_at = now() - interval '59 minutes'
         WHERE event_id = 'k49'",
    )
    .execute(&pool)
    .await
    .unwrap();

    assert_eq!(guard.cleanup_old_events().await.unwrap(), 24);
    let mut left: Vec<String> = sqlx::query_scalar("SELECT event_id FROM processed_events")
        .fetch_all(&pool)
        .await
        .unwrap();
    left.sort();
    let mut expected: Vec<String> = (23..50).map(|i| format!("k{i}")).collect();
    expected.push("live-claim".into());
    expected.sort();
    assert_eq!(left, expected);
    assert_eq!(guard.metrics().processed_events_table_size, 28);
    assert_eq!(guard.cleanup_old_events().await.unwrap(), 0);
    live.complete().await.unwrap();

    // The periodic helper runs it at once, then every interval.
    sqlx::query("UPDATE processed_events SET processed_at = now() - interval '2 hours'")
        .execute(&pool)
        .await
        .unwrap();
    let task = guard.spawn_cleanup(Duration::from_secs(3600));
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while guard.metrics().processed_events_table_size != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "periodic cleanup did not run"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_concurrent_safe() {
    let Some((_pg, pool)) = server("migrate_is_idempotent", 10).await else {
        return;
    };
    // `pool()` migrated once already; run it twice more, concurrently.
    let (a, b) = tokio::join!(
        IdempotencyGuard::migrate(&pool),
        IdempotencyGuard::migrate(&pool)
    );
    a.unwrap();
    b.unwrap();
    let index: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_indexes WHERE tablename = 'processed_events'
         AND indexname = 'processed_events_processed_at_idx'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(index, 1);
}

/// The pipeline with the guard: the same 10,000 events consumed twice, the second
/// time by a fresh consumer group (as after a lost commit, or a second deployment
/// sharing the table). The work runs once per event in all; the replay finishes
/// every event as a duplicate, posts nothing, and still commits to the end.
#[cfg(feature = "dev-stack")]
#[test]
fn a_pipeline_replaying_every_event_runs_each_work_once() {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
    use xzepr_consumer::config::KafkaConsumerConfig;
    use xzepr_consumer::decode::CloudEventMessage;
    use xzepr_consumer::dispatch::Ordering;
    use xzepr_consumer::generate::xzepr_event;
    use xzepr_consumer::handler::WorkInfo;
    use xzepr_consumer::pipeline::{Pipeline, WorkTemplate};
    use xzepr_consumer::report::{Reporter, ReporterConfig};

    const N: u64 = 10_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let Some((_pg, pool)) = rt.block_on(server("pipeline_replay", 16)) else {
        return;
    };
    let guard =
        rt.block_on(async { IdempotencyGuard::new(pool.clone(), Duration::from_secs(86400)) });
    let cluster = kafka_support::cluster("replay", 4);
    let brokers = cluster.bootstrap_servers();
    kafka_support::produce_keyed(
        &brokers,
        "replay",
        4,
        N,
        |i| format!("key-{}", i % 512),
        |i| xzepr_event(i, "01SOMEONEELSE").1,
    );
    let ends = kafka_support::end_offsets(&brokers, "replay", 4);
    let xzepr = rt.block_on(http_support::start(http_support::Chaos::default()));
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();

    let consume = |group: &str| {
        let (reporter, task) = rt.block_on(async {
            let client =
                XzeprClient::new(XzeprClientConfig::new(xzepr.url.clone(), "tok")).unwrap();
            Reporter::start(client, ReporterConfig::default())
        });
        let runs = Arc::clone(&runs);
        let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "replay", group))
            .ordering(Ordering::PerKey)
            .max_in_flight(256)
            .commit_interval(Duration::from_millis(100))
            .runtime(rt.handle().clone())
            .idempotency(guard.clone())
            .lifecycle(
                reporter,
                WorkTemplate::new("01MYRECEIVER", "deploy", "1.0.0", group),
            )
            .start_async(move |m: CloudEventMessage, _info: WorkInfo| {
                *runs.lock().unwrap().entry(m.id).or_default() += 1;
                async { Ok::<_, String>(serde_json::Value::Null) }
            })
            .unwrap();
        let start = std::time::Instant::now();
        while running.metrics().finished < N {
            assert!(start.elapsed() < EVENTUALLY * 8, "{:?}", running.metrics());
            std::thread::sleep(Duration::from_millis(20));
        }
        running.shutdown();
        running.join().unwrap();
        assert!(rt.block_on(task.drain(Duration::from_secs(30))));
        let group_id = format!("xzepr-consumer-{group}");
        assert_eq!(
            kafka_support::committed(&brokers, &group_id, "replay", 4),
            ends,
            "{group} commits to the end"
        );
        running.metrics()
    };

    let first = consume("first");
    assert_eq!((first.handled, first.duplicates), (N, 0));
    assert_eq!(first.posted_started + first.posted_completed, 2 * N);
    let second = consume("second");
    assert_eq!(
        (second.handled, second.duplicates, second.posted_started),
        (0, N, 0),
        "the replay runs and posts nothing: {second:?}"
    );
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len() as u64, N);
    assert!(runs.values().all(|&n| n == 1), "each work ran once");
    assert_eq!(xzepr.seen.accepted.lock().unwrap().len() as u64, 2 * N);
    let m = guard.metrics();
    assert_eq!(
        (m.events_processed_total, m.events_duplicates_total),
        (N, N)
    );
    eprintln!(
        "pipeline replay: {N} events twice, handler runs {}, duplicates {}, statements {}",
        runs.len(),
        m.events_duplicates_total,
        m.statements_total
    );
}

/// The claim outlives its lease while XZepr holds the lifecycle posts (it is
/// renewed), so a duplicate of the key arriving after the lease would have run out
/// finds it busy, then processed: the work runs once. As `failures_idempotency.rs`,
/// on the table.
#[cfg(feature = "dev-stack")]
#[test]
fn a_duplicate_after_the_lease_is_not_run_again_while_xzepr_is_slow() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let Some((_pg, pool)) = rt.block_on(server("slow_xzepr", 4)) else {
        return;
    };
    let lease = Duration::from_millis(300);
    let guard = rt.block_on(async {
        IdempotencyGuard::builder(pool.clone())
            .lease(lease)
            .build()
            .unwrap()
    });
    let cluster = kafka_support::cluster("slow-xzepr-pg", 1);
    let brokers = cluster.bootstrap_servers();
    slow_xzepr::duplicate_after_the_lease_is_not_run_again(
        &rt,
        &brokers,
        "slow-xzepr-pg",
        guard,
        lease,
    );
}
