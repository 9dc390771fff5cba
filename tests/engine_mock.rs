//! The async execution engine on librdkafka's mock cluster: concurrency up to
//! `max_in_flight`, per-key lanes without head-of-line blocking, handler
//! timeouts, and shutdown with hundreds of futures in flight.
#![cfg(feature = "dev-stack")]

mod http_support;
mod kafka_support;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::dispatch::Ordering;
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::WorkInfo;
use xzepr_consumer::pipeline::{Pipeline, RunningPipeline, WorkTemplate};
use xzepr_consumer::report::{Reporter, ReporterConfig};

use kafka_support::*;

/// Generous bound for "eventually" on a loaded CI machine; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(240);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn stop(running: &RunningPipeline) {
    running.shutdown();
    running.join().unwrap();
}

/// Counts handlers running at once.
#[derive(Default)]
struct Gauge {
    now: AtomicI64,
    peak: AtomicI64,
}

impl Gauge {
    fn enter(&self) {
        let n = self.now.fetch_add(1, Relaxed) + 1;
        self.peak.fetch_max(n, Relaxed);
    }
    fn leave(&self) {
        self.now.fetch_sub(1, Relaxed);
    }
}

#[test]
fn peak_concurrency_reaches_max_in_flight_with_an_io_handler() {
    const N: u64 = 12_000;
    const MAX: usize = 256;
    let cluster = cluster("io", 4);
    let brokers = cluster.bootstrap_servers();
    produce_keyed(
        &brokers,
        "io",
        4,
        N,
        |i| format!("key-{}", i % 4096),
        |i| xzepr_event(i, "01SOMEONEELSE").1,
    );
    let ends = end_offsets(&brokers, "io", 4);
    let rt = runtime();
    let gauge = Arc::new(Gauge::default());
    let handled = Arc::new(AtomicU64::new(0));
    let (g, h) = (Arc::clone(&gauge), Arc::clone(&handled));
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "io", "io-test"))
        .ordering(Ordering::PerKey)
        .max_in_flight(MAX)
        .commit_interval(Duration::from_millis(100))
        .runtime(rt.handle().clone())
        .start_async(move |_m: CloudEventMessage, _info: WorkInfo| {
            let (g, h) = (Arc::clone(&g), Arc::clone(&h));
            async move {
                g.enter();
                // An I/O-bound handler: it only waits.
                tokio::time::sleep(Duration::from_millis(20)).await;
                g.leave();
                h.fetch_add(1, Relaxed);
                Ok::<_, String>(serde_json::Value::Null)
            }
        })
        .unwrap();
    wait_for(PATIENCE, "every event", || running.metrics().finished >= N);
    stop(&running);
    let peak = gauge.peak.load(Relaxed);
    let engine_peak = running.source().stats().peak_in_flight.load(Relaxed);
    eprintln!("io: handler peak concurrency {peak}, engine peak jobs {engine_peak}");
    assert_eq!(
        peak, MAX as i64,
        "concurrency reaches max_in_flight, never more"
    );
    assert!(engine_peak <= MAX as u64);
    assert_eq!(handled.load(Relaxed), N);
    assert_eq!(committed(&brokers, "xzepr-consumer-io-test", "io", 4), ends);
}

#[test]
fn a_slow_key_parks_only_its_own_lane() {
    const N: u64 = 600;
    let cluster = cluster("lanes", 1);
    let brokers = cluster.bootstrap_servers();
    // Events 0 and 1 share the key "slow"; every other event has a key of its own,
    // all in the same partition.
    produce_keyed(
        &brokers,
        "lanes",
        1,
        N,
        |i| {
            if i < 2 {
                "slow".to_owned()
            } else {
                format!("k{i}")
            }
        },
        |i| xzepr_event(i, "01SOMEONEELSE").1,
    );
    let slow_ids: Vec<String> = (0..2).map(|i| xzepr_event(i, "x").0).collect();
    let rt = runtime();
    let others_done = Arc::new(AtomicU64::new(0));
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let (done, log2, slow) = (Arc::clone(&others_done), Arc::clone(&log), slow_ids.clone());
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "lanes", "lanes-test"))
        .ordering(Ordering::PerKey)
        .max_in_flight(64)
        .runtime(rt.handle().clone())
        .start_async(move |m: CloudEventMessage, _info: WorkInfo| {
            let (done, log, slow) = (Arc::clone(&done), Arc::clone(&log2), slow.clone());
            async move {
                if m.id == slow[0] {
                    log.lock().unwrap().push("slow-0 start".into());
                    // Held until every other key's event has been handled: were
                    // they waiting behind this one, this would never end.
                    while done.load(Relaxed) < N - 2 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    log.lock().unwrap().push("slow-0 end".into());
                } else if m.id == slow[1] {
                    log.lock().unwrap().push("slow-1 start".into());
                } else {
                    done.fetch_add(1, Relaxed);
                }
                Ok::<_, String>(serde_json::Value::Null)
            }
        })
        .unwrap();
    wait_for(PATIENCE, "every event", || running.metrics().finished >= N);
    stop(&running);
    assert_eq!(others_done.load(Relaxed), N - 2);
    // The slow key's second event waited for its first: offset order within a key.
    assert_eq!(
        *log.lock().unwrap(),
        ["slow-0 start", "slow-0 end", "slow-1 start"]
    );
    assert_eq!(
        committed(&brokers, "xzepr-consumer-lanes-test", "lanes", 1)[&0],
        N as i64
    );
}

#[test]
fn a_handler_past_its_timeout_is_reported_failed_with_code_timeout() {
    const N: u64 = 200;
    let cluster = cluster("timeouts", 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "timeouts", 2, N, |i| {
        xzepr_event(i, "01SOMEONEELSE").1
    });
    let ends = end_offsets(&brokers, "timeouts", 2);
    let stuck_id = xzepr_event(7, "x").0;
    let rt = runtime();
    let server = rt.block_on(http_support::start(http_support::Chaos::default()));
    let (reporter, task) = rt.block_on(async {
        let client = XzeprClient::new(XzeprClientConfig::new(server.url.clone(), "tok")).unwrap();
        Reporter::start(client, ReporterConfig::default())
    });
    let stuck = stuck_id.clone();
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "timeouts", "to"))
        .ordering(Ordering::PerKey)
        .handler_timeout(Duration::from_millis(300))
        .commit_interval(Duration::from_millis(100))
        .runtime(rt.handle().clone())
        .lifecycle(
            reporter,
            WorkTemplate::new("01MYRECEIVER", "deploy", "1.0.0", "to"),
        )
        .start_async(move |m: CloudEventMessage, _info: WorkInfo| {
            let stuck = stuck.clone();
            async move {
                if m.id == stuck {
                    // Never returns on its own: only the timeout ends it.
                    std::future::pending::<()>().await;
                }
                Ok::<_, String>(serde_json::json!({"ok": true}))
            }
        })
        .unwrap();
    wait_for(PATIENCE, "every event", || running.metrics().finished >= N);
    stop(&running);
    let m = running.metrics();
    assert_eq!((m.handler_timeouts, m.posted_failed), (1, 1));
    let accepted = server.seen.accepted.lock().unwrap().clone();
    let failed: Vec<_> = accepted
        .iter()
        .filter(|b| b["name"] == "deploy.failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(
        failed[0]["payload"]["work_id"],
        format!("work-{stuck_id}").as_str()
    );
    assert_eq!(failed[0]["payload"]["details"]["error_code"], "timeout");
    assert_eq!(
        committed(&brokers, "xzepr-consumer-to", "timeouts", 2),
        ends
    );
    drop(running);
    assert!(rt.block_on(task.drain(Duration::from_secs(30))));
}

#[test]
fn shutdown_with_hundreds_in_flight_loses_nothing_and_replays_only_what_it_must() {
    const N: u64 = 6_000;
    const P: i32 = 4;
    let cluster = cluster("drain", P);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "drain", P, N, |i| {
        xzepr_event(i, "01SOMEONEELSE").1
    });
    let ends = end_offsets(&brokers, "drain", P);
    let config = KafkaConsumerConfig::new(&brokers, "drain", "drain-test");
    let rt = runtime();

    // First owner: slow, varied handlers; stopped with hundreds in flight and a
    // drain deadline shorter than the slowest, so some futures are cancelled.
    type Done = Arc<Mutex<HashMap<i32, BTreeSet<i64>>>>;
    let first_done: Done = Arc::default();
    let gauge = Arc::new(Gauge::default());
    let (d, g) = (Arc::clone(&first_done), Arc::clone(&gauge));
    let first = Pipeline::builder(config.clone())
        .ordering(Ordering::PerKey)
        .max_in_flight(512)
        .drain_timeout(Duration::from_millis(500))
        .commit_interval(Duration::from_millis(100))
        .runtime(rt.handle().clone())
        .start_async(move |_m: CloudEventMessage, info: WorkInfo| {
            let (d, g) = (Arc::clone(&d), Arc::clone(&g));
            async move {
                g.enter();
                let ms = 50 + (info.offset as u64 * 7919) % 1500;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                g.leave();
                d.lock()
                    .unwrap()
                    .entry(info.partition)
                    .or_default()
                    .insert(info.offset);
                Ok::<_, String>(serde_json::Value::Null)
            }
        })
        .unwrap();
    wait_for(PATIENCE, "hundreds in flight", || {
        gauge.now.load(Relaxed) >= 300 && first.metrics().finished >= 500
    });
    let in_flight_at_stop = gauge.now.load(Relaxed);
    stop(&first);
    let after_first = committed(&brokers, "xzepr-consumer-drain-test", "drain", P);
    let first_done = first_done.lock().unwrap().clone();
    // Nothing committed that did not finish.
    for p in 0..P {
        let done = first_done.get(&p).cloned().unwrap_or_default();
        let point = after_first.get(&p).copied().unwrap_or(0).max(0);
        for o in 0..point {
            assert!(
                done.contains(&o),
                "partition {p}: offset {o} committed unfinished"
            );
        }
    }

    // Second owner: quick handlers, to the end.
    let second_seen: Done = Arc::default();
    let s = Arc::clone(&second_seen);
    let second = Pipeline::builder(config)
        .ordering(Ordering::PerKey)
        .commit_interval(Duration::from_millis(100))
        .runtime(rt.handle().clone())
        .start_async(move |_m: CloudEventMessage, info: WorkInfo| {
            let s = Arc::clone(&s);
            async move {
                s.lock()
                    .unwrap()
                    .entry(info.partition)
                    .or_default()
                    .insert(info.offset);
                Ok::<_, String>(serde_json::Value::Null)
            }
        })
        .unwrap();
    let remaining: u64 = (0..P)
        .map(|p| (ends[&p] - after_first.get(&p).copied().unwrap_or(0).max(0)) as u64)
        .sum();
    // Work the first owner finished above its commit point is skipped, through
    // the completion map of its last commit.
    let skipped = || second.source().stats().skipped_done.load(Relaxed);
    wait_for(PATIENCE, "the replay", || {
        second.metrics().finished + skipped() >= remaining
    });
    stop(&second);
    let second_seen = second_seen.lock().unwrap();
    let mut duplicates = 0;
    for p in 0..P {
        let a = first_done.get(&p).cloned().unwrap_or_default();
        let b = second_seen.get(&p).cloned().unwrap_or_default();
        let point = after_first.get(&p).copied().unwrap_or(0).max(0);
        // The replay starts exactly at the commit point: nothing committed is
        // handled again, and nothing is lost (what was skipped, the first owner
        // finished).
        assert_eq!(
            b.iter().next().copied(),
            (point < ends[&p]).then_some(point)
        );
        let all: BTreeSet<i64> = a.union(&b).copied().collect();
        assert_eq!(
            all.len() as i64,
            ends[&p],
            "partition {p}: every offset handled"
        );
        duplicates += a.intersection(&b).count();
    }
    eprintln!(
        "drain: {in_flight_at_stop} in flight at shutdown, {} finished by the first owner, \
         {} skipped as done by the second, {duplicates} handled again (finished after the \
         first owner's last commit)",
        first_done.values().map(BTreeSet::len).sum::<usize>(),
        skipped(),
    );
    assert_eq!(
        committed(&brokers, "xzepr-consumer-drain-test", "drain", P),
        ends
    );
}

#[test]
fn a_lifecycle_with_an_empty_work_field_fails_at_start_naming_it() {
    let rt = runtime();
    let (reporter, _task) = rt.block_on(async {
        let client = XzeprClient::new(XzeprClientConfig::new("http://127.0.0.1:9", "tok")).unwrap();
        Reporter::start(client, ReporterConfig::default())
    });
    for (work, field) in [
        (WorkTemplate::new("01R", "", "1.0.0", "svc"), "work_name"),
        (
            WorkTemplate::new("01R", "deploy", "", "svc"),
            "work_version",
        ),
        (WorkTemplate::new("01R", "deploy", "1.0.0", " "), "package"),
    ] {
        let err = Pipeline::builder(KafkaConsumerConfig::new("127.0.0.1:9", "t", "svc"))
            .lifecycle(reporter.clone(), work)
            .runtime(rt.handle().clone())
            .start_async(|_m: CloudEventMessage, _i: WorkInfo| async {
                Ok::<_, String>(serde_json::Value::Null)
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
}
