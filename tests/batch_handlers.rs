//! Batch handlers through the one event flow: a lane's run in one call, an
//! outcome per event, and everything else per event (started, retries of only
//! the events that asked, dead letters, terminal posts, idempotency, offsets).
#![cfg(feature = "dev-stack")]

mod http_support;
mod kafka_support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::{BatchEntry, BatchOutcome, HandlerError, WorkInfo};
use xzepr_consumer::idempotency::MemoryStore;
use xzepr_consumer::pipeline::{
    DeadLetterConfig, IdempotencyKey, Pipeline, RetryPolicy, RunningPipeline, WorkTemplate,
};
use xzepr_consumer::report::{Reporter, ReporterConfig, ReporterTask};

use kafka_support::*;

/// Generous bound for "eventually" on a loaded machine; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(180);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A reporter posting to the stand-in at `url`.
fn reporter(rt: &tokio::runtime::Runtime, url: &str) -> (Reporter, ReporterTask) {
    rt.block_on(async {
        let client = XzeprClient::new(XzeprClientConfig::new(url.to_owned(), "tok")).unwrap();
        let mut config = ReporterConfig::default();
        config.backoff_base = Duration::from_millis(1);
        Reporter::start(client, config)
    })
}

/// The accepted posts' names by work id, in order, and the bodies.
fn posts(server: &http_support::Server) -> (HashMap<String, Vec<String>>, Vec<Value>) {
    let accepted = server.seen.accepted.lock().unwrap().clone();
    let mut by_work: HashMap<String, Vec<String>> = HashMap::new();
    for body in &accepted {
        let id = body["payload"]["work_id"].as_str().unwrap().to_owned();
        let name = body["name"].as_str().unwrap().to_owned();
        by_work.entry(id).or_default().push(name);
    }
    (by_work, accepted)
}

fn stop(running: RunningPipeline) {
    running.shutdown();
    running.join().unwrap();
}

/// One call of a batch handler: its partition, its offsets, and which of
/// them were retries.
type Call = (i32, Vec<i64>, Vec<bool>);

#[test]
fn a_sync_batch_retries_only_its_failed_entries_and_keeps_every_event_s_life_per_event() {
    const N: u64 = 1_200;
    const BATCH: usize = 32;
    let cluster = cluster("batches", 4);
    cluster.create_topic("batches.dlq", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    // A backlog first: the lanes' runs are full batches.
    produce(&brokers, "batches", 4, N, |i| {
        xzepr_event(i, "01SOMEONEELSE").1
    });
    let ends = end_offsets(&brokers, "batches", 4);
    let rt = runtime();
    let server = rt.block_on(http_support::start(http_support::Chaos::default()));
    let (reporter, task) = reporter(&rt, &server.url);

    // Per work id: the attempts seen. Per call: (partition, offsets, retry round?).
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let (s, c) = (Arc::clone(&seen), Arc::clone(&calls));
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "batches", "bt"))
        .workers(2)
        .batch(BATCH)
        .commit_interval(Duration::from_millis(100))
        .retry(RetryPolicy::attempts(3).backoff(Duration::from_millis(1), Duration::from_millis(5)))
        .dead_letter(DeadLetterConfig::new())
        .lifecycle(
            reporter,
            WorkTemplate::new("01MYRECEIVER", "load", "1.0.0", "bt"),
        )
        .start_batch(
            move |batch: &mut [BatchEntry<'_, '_>]| -> Result<Vec<BatchOutcome>, HandlerError> {
                let mut seen = s.lock().unwrap();
                let mut out = Vec::with_capacity(batch.len());
                let (mut offsets, mut again) = (Vec::new(), Vec::new());
                let partition = batch[0].work().partition();
                for entry in batch.iter_mut() {
                    let work = entry.work();
                    assert_eq!(work.partition(), partition, "one lane: one partition");
                    offsets.push(work.offset());
                    let attempt = seen.entry(work.id().to_owned()).or_insert(0);
                    *attempt += 1;
                    again.push(*attempt > 1);
                    out.push(match work.offset() % 10 {
                        // Fails once, then succeeds.
                        3 if *attempt == 1 => BatchOutcome::Retry(HandlerError::new("busy row")),
                        // Fails for good, at once.
                        7 => BatchOutcome::Failed(HandlerError::with_code("bad row", "E7")),
                        _ => {
                            work.detail("rows", 1);
                            BatchOutcome::done()
                        }
                    });
                }
                c.lock().unwrap().push((partition, offsets, again));
                Ok(out)
            },
        )
        .unwrap();
    wait_for(PATIENCE, "every event finished", || {
        running.metrics().finished >= N
    });
    wait_for(PATIENCE, "offsets committed to the end", || {
        committed(&brokers, "xzepr-consumer-bt", "batches", 4) == ends
    });
    stop(running);
    drop(task);

    let calls = calls.lock().unwrap().clone();
    assert!(
        calls.iter().any(|(_, offsets, _)| offsets.len() > 1),
        "the handler was never given more than one event"
    );
    for (partition, offsets, again) in &calls {
        assert!(offsets.len() <= BATCH, "a call over `batch`: {offsets:?}");
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "partition {partition}: a call out of offset order: {offsets:?}"
        );
        // A retry round holds only the events that asked for one.
        assert!(
            again.iter().all(|a| *a) || again.iter().all(|a| !*a),
            "a call mixed first attempts and retries: {offsets:?} {again:?}"
        );
        if again[0] {
            assert!(
                offsets.iter().all(|o| o % 10 == 3),
                "a retry round ran events that did not ask: {offsets:?}"
            );
        }
    }

    let (by_work, bodies) = posts(&server);
    assert_eq!(by_work.len() as u64, N, "an event without posts");
    for (id, names) in &by_work {
        assert_eq!(names.len(), 2, "{id}: {names:?}");
        assert_eq!(names[0], "load.started", "{id}: {names:?}");
    }
    let (mut failed, mut retried) = (0, 0);
    for body in bodies.iter().filter(|b| b["name"] != "load.started") {
        let details = &body["payload"]["details"];
        match body["name"].as_str().unwrap() {
            "load.failed" => {
                failed += 1;
                assert_eq!(details["error_code"], "E7", "{body}");
                assert_eq!(details["attempts"], 1, "a permanent failure was retried");
                assert!(details["dead_letter"].is_object(), "no dead letter: {body}");
            }
            "load.completed" => {
                assert_eq!(details["rows"], 1, "the work's details were lost: {body}");
                if details["attempts"] == 2 {
                    retried += 1;
                } else {
                    assert_eq!(details["attempts"], 1, "{body}");
                }
            }
            other => panic!("unexpected post {other}"),
        }
    }
    let by_offset = |digit: i64| {
        let ends = &ends;
        (0..4)
            .map(|p| (0..ends[&p]).filter(|o| o % 10 == digit).count())
            .sum::<usize>()
    };
    assert_eq!(failed, by_offset(7), "failed posts");
    assert_eq!(
        retried,
        by_offset(3),
        "events that succeeded on their retry"
    );
    assert_eq!(
        end_offsets(&brokers, "batches.dlq", 1)[&0] as usize,
        by_offset(7),
        "dead letters"
    );
}

#[test]
fn an_async_batch_error_or_miscount_fails_the_call_s_events_and_they_are_retried() {
    const N: u64 = 600;
    let cluster = cluster("abatches", 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "abatches", 2, N, |i| {
        xzepr_event(i, "01SOMEONEELSE").1
    });
    let ends = end_offsets(&brokers, "abatches", 2);
    let rt = runtime();
    let server = rt.block_on(http_support::start(http_support::Chaos::default()));
    let (reporter, task) = reporter(&rt, &server.url);

    let call_no = Arc::new(AtomicU64::new(0));
    // The work ids of the calls that failed as a whole.
    let spoiled: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (n, sp) = (Arc::clone(&call_no), Arc::clone(&spoiled));
    let _enter = rt.enter();
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "abatches", "abt"))
        .runtime(rt.handle().clone())
        .batch(16)
        .max_in_flight(4)
        .commit_interval(Duration::from_millis(100))
        .retry(RetryPolicy::attempts(3).backoff(Duration::from_millis(1), Duration::from_millis(5)))
        .lifecycle(
            reporter,
            WorkTemplate::new("01MYRECEIVER", "load", "1.0.0", "abt"),
        )
        .start_async_batch(move |batch: Vec<(CloudEventMessage, WorkInfo)>| {
            let (n, sp) = (Arc::clone(&n), Arc::clone(&sp));
            async move {
                tokio::task::yield_now().await;
                let call = n.fetch_add(1, SeqCst);
                if call < 2 {
                    sp.lock()
                        .unwrap()
                        .extend(batch.iter().map(|(_, info)| info.work_id.clone()));
                }
                match call {
                    0 => Err(HandlerError::new("database unavailable")),
                    // One outcome short: the whole call failed, never a
                    // guess at which event was meant.
                    1 => Ok(vec![BatchOutcome::done(); batch.len() - 1]),
                    _ => Ok(batch
                        .iter()
                        .map(|(m, _)| BatchOutcome::Done(json!({ "id": m.id })))
                        .collect()),
                }
            }
        })
        .unwrap();
    wait_for(PATIENCE, "every event finished", || {
        running.metrics().finished >= N
    });
    wait_for(PATIENCE, "offsets committed to the end", || {
        committed(&brokers, "xzepr-consumer-abt", "abatches", 2) == ends
    });
    stop(running);
    drop(task);

    let spoiled = spoiled.lock().unwrap().clone();
    assert!(!spoiled.is_empty());
    let (by_work, bodies) = posts(&server);
    assert_eq!(by_work.len() as u64, N);
    for (id, names) in &by_work {
        let terminal = bodies
            .iter()
            .find(|b| b["payload"]["work_id"] == id.as_str() && b["name"] != "load.started");
        assert_eq!(
            names,
            &["load.started".to_owned(), "load.completed".to_owned()],
            "{id}: {terminal:?}"
        );
    }
    for body in bodies.iter().filter(|b| b["name"] == "load.completed") {
        let id = body["payload"]["work_id"].as_str().unwrap();
        let attempts = body["payload"]["details"]["attempts"].as_u64().unwrap();
        assert_eq!(
            spoiled.contains(id),
            attempts > 1,
            "{id}: attempts {attempts}, in a failed call: {}",
            spoiled.contains(id)
        );
        assert_eq!(
            body["payload"]["details"]["id"],
            id.trim_start_matches("work-")
        );
    }
}

#[test]
fn a_batch_never_waits_on_an_idempotency_key_it_holds_itself() {
    // Pairs of the same event, side by side in one partition: the second of
    // each pair is a duplicate of the first, in the same lane's run.
    const PAIRS: u64 = 200;
    let cluster = cluster("dups", 1);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "dups", 1, PAIRS * 2, |i| {
        xzepr_event(i / 2, "01SOMEONEELSE").1
    });
    let ends = end_offsets(&brokers, "dups", 1);
    let rt = runtime();
    let handled = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&handled);
    let _enter = rt.enter();
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "dups", "dup"))
        .runtime(rt.handle().clone())
        .batch(64)
        .commit_interval(Duration::from_millis(100))
        .idempotency(MemoryStore::new())
        .idempotency_key(IdempotencyKey::EventId)
        .start_async_batch(move |batch: Vec<(CloudEventMessage, WorkInfo)>| {
            let h = Arc::clone(&h);
            async move {
                h.fetch_add(batch.len() as u64, SeqCst);
                Ok::<_, HandlerError>(vec![BatchOutcome::done(); batch.len()])
            }
        })
        .unwrap();
    wait_for(PATIENCE, "every event finished", || {
        running.metrics().finished >= PAIRS * 2
    });
    wait_for(PATIENCE, "offsets committed to the end", || {
        committed(&brokers, "xzepr-consumer-dup", "dups", 1) == ends
    });
    let m = running.metrics();
    stop(running);
    assert_eq!(handled.load(SeqCst), PAIRS, "each pair's work ran once");
    assert_eq!(m.duplicates, PAIRS, "each pair's second was a duplicate");
}
