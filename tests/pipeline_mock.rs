//! The assembled pipeline on librdkafka's mock cluster: realistic XZepr events,
//! a type filter, malformed messages, handler errors, shutdown and restart.
#![cfg(feature = "dev-stack")]

mod kafka_support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::{CloudEvent, CloudEventMessage};
use xzepr_consumer::dispatch::TypeFilter;
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::{MessageHandler, Work};
use xzepr_consumer::pipeline::{Pipeline, XzeprConsumer};

use kafka_support::*;

const RECEIVER: &str = "01M82X4ET7AYGAEYSHF5AKVAVW";

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "gave up waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every 100th message is not JSON; the rest are generated XZepr events.
fn payload(i: u64) -> Vec<u8> {
    if i % 100 == 99 {
        format!("{{\"broken\": {i}").into_bytes()
    } else {
        xzepr_event(i, RECEIVER).1
    }
}

#[test]
fn filters_skips_malformed_and_commits_everything() {
    const N: u64 = 4_000;
    let cluster = cluster("xzepr.dev.events", 4);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "xzepr.dev.events", 4, N, payload);
    let ends = end_offsets(&brokers, "xzepr.dev.events", 4);

    let seen = Arc::new(Mutex::new(HashSet::new()));
    let config = KafkaConsumerConfig::new(&brokers, "xzepr.dev.events", "e2e");
    let handler_seen = Arc::clone(&seen);
    let running = Pipeline::builder(config)
        .workers(3)
        .commit_interval(Duration::from_millis(100))
        .type_filter(TypeFilter::any().prefix("deployment.").glob("*.completed"))
        .start(
            move |ev: &CloudEvent<'_>, work: &mut Work| -> Result<(), String> {
                let ty = ev.event_type();
                assert!(
                    ty.starts_with("deployment.") || ty.ends_with(".completed"),
                    "{ty}"
                );
                handler_seen.lock().unwrap().insert(ev.id().to_owned());
                work.detail("type", ty);
                if ty == "build.completed" {
                    return Err("builds fail here".into());
                }
                Ok(())
            },
        )
        .unwrap();
    wait_for("every offset to finish", || running.metrics().finished >= N);
    running.shutdown();
    running.join().unwrap();

    let m = running.metrics();
    let malformed = N / 100;
    let handled = seen.lock().unwrap().len() as u64;
    assert_eq!(m.malformed, malformed);
    assert_eq!(m.consumed, N);
    assert_eq!(m.handled, handled);
    assert_eq!(m.handled + m.filtered + m.malformed + m.own_skipped, N);
    // Generated kinds cycle through 6 types; 3 of them pass the filter.
    assert!(handled > N / 3 && handled < N * 2 / 3, "{handled}");
    assert!(m.handler_failed > 0 && m.handler_failed < handled);
    assert_eq!(
        m.finished, N,
        "handler errors, filtered and malformed events all finish"
    );
    assert_eq!(
        committed(&brokers, "xzepr-consumer-e2e", "xzepr.dev.events", 4),
        ends
    );
}

#[test]
fn own_events_are_skipped_unless_asked() {
    let cluster = cluster("own", 1);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "own", 1, 50, |i| {
        xzepr_event(i, if i < 20 { "ME" } else { "OTHER" }).1
    });
    for (skip, expect_handled) in [(true, 30u64), (false, 50)] {
        let config = KafkaConsumerConfig::new(&brokers, "own", &format!("own-{skip}"));
        let running = Pipeline::builder(config)
            .workers(1)
            .own_receiver_id("ME")
            .skip_own_events(skip)
            .start(|_: &CloudEvent<'_>, _: &mut Work| -> Result<(), String> { Ok(()) })
            .unwrap();
        wait_for("all 50", || running.metrics().finished >= 50);
        running.shutdown();
        running.join().unwrap();
        assert_eq!(running.metrics().handled, expect_handled, "skip={skip}");
    }
}

#[test]
fn shutdown_mid_stream_then_restart_loses_nothing() {
    const N: u64 = 6_000;
    let cluster = cluster("restart", 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "restart", 2, N, |i| xzepr_event(i, RECEIVER).1);
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let config = KafkaConsumerConfig::new(&brokers, "restart", "restart");
    let start = |seen: Arc<Mutex<HashSet<String>>>| {
        Pipeline::builder(config.clone())
            .workers(2)
            .commit_interval(Duration::from_millis(50))
            .start(
                move |ev: &CloudEvent<'_>, _: &mut Work| -> Result<(), String> {
                    // Slow enough that the shutdown lands mid-stream.
                    std::thread::sleep(Duration::from_micros(200));
                    seen.lock().unwrap().insert(ev.id().to_owned());
                    Ok(())
                },
            )
            .unwrap()
    };
    let first = start(Arc::clone(&seen));
    wait_for("some progress", || first.metrics().finished >= 500);
    first.shutdown();
    first.join().unwrap();
    let after_first = first.metrics().finished;
    assert!(
        after_first < N,
        "the shutdown came too late to test anything"
    );

    let second = start(Arc::clone(&seen));
    wait_for("the rest", || seen.lock().unwrap().len() as u64 >= N);
    second.shutdown();
    second.join().unwrap();
    assert_eq!(
        seen.lock().unwrap().len() as u64,
        N,
        "every event handled at least once"
    );
    let ends = end_offsets(&brokers, "restart", 2);
    assert_eq!(
        committed(&brokers, "xzepr-consumer-restart", "restart", 2),
        ends
    );
}

struct PlanHandler {
    seen: Arc<Mutex<Vec<String>>>,
}

#[async_trait::async_trait]
impl MessageHandler for PlanHandler {
    async fn handle(
        &self,
        message: CloudEventMessage,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        tokio::time::sleep(Duration::from_micros(50)).await;
        self.seen
            .lock()
            .unwrap()
            .push(message.data.events[0].id.clone());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plans_message_handler_runs_on_the_pipeline() {
    let cluster = cluster("plan", 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "plan", 2, 300, |i| xzepr_event(i, RECEIVER).1);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = Arc::new(PlanHandler {
        seen: Arc::clone(&seen),
    });
    let consumer = XzeprConsumer::new(KafkaConsumerConfig::new(&brokers, "plan", "plan")).unwrap();
    let watched = Arc::clone(&seen);
    consumer
        .run_until(handler, async move {
            while watched.lock().unwrap().len() < 300 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap();
    let mut ids = seen.lock().unwrap().clone();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 300);
    let ends = tokio::task::spawn_blocking(move || {
        (
            end_offsets(&brokers, "plan", 2),
            committed(&brokers, "xzepr-consumer-plan", "plan", 2),
        )
    })
    .await
    .unwrap();
    assert_eq!(ends.0, ends.1);
}

/// What a handler with rebalance hooks was told.
#[derive(Default)]
struct Hooked {
    assigned: Mutex<Vec<(String, i32)>>,
    handled: std::sync::atomic::AtomicU64,
}

/// The handler, sharing [`Hooked`] with the test.
struct HookedHandler(Arc<Hooked>);

impl xzepr_consumer::handler::Handler for HookedHandler {
    fn handle(
        &self,
        _event: &CloudEvent<'_>,
        _work: &mut Work,
    ) -> Result<(), xzepr_consumer::handler::HandlerError> {
        self.0
            .handled
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn on_assign(&self, partitions: &[(String, i32)]) {
        self.0
            .assigned
            .lock()
            .unwrap()
            .extend_from_slice(partitions);
    }
}

#[test]
fn the_handler_hears_of_its_assignment() {
    let cluster = cluster("hooks", 3);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "hooks", 3, 30, |i| xzepr_event(i, RECEIVER).1);
    let hooked = Arc::new(Hooked::default());
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "hooks", "hooks"))
        .workers(1)
        .start(HookedHandler(Arc::clone(&hooked)))
        .unwrap();
    wait_for("every event", || {
        hooked.handled.load(std::sync::atomic::Ordering::Relaxed) >= 30
    });
    running.shutdown();
    running.join().unwrap();
    let mut assigned = hooked.assigned.lock().unwrap().clone();
    assigned.sort();
    assert_eq!(
        assigned,
        (0..3).map(|p| ("hooks".to_owned(), p)).collect::<Vec<_>>()
    );
}

#[test]
fn an_idempotency_store_without_a_runtime_fails_at_start_naming_it() {
    let err = Pipeline::builder(KafkaConsumerConfig::new("127.0.0.1:1", "t", "svc"))
        .idempotency(xzepr_consumer::idempotency::MemoryStore::new())
        .start(|_: &CloudEvent<'_>, _: &mut Work| -> Result<(), String> { Ok(()) })
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("runtime"), "{text}");
}

/// A handler whose rebalance hooks panic.
struct PanickyHooks(Arc<std::sync::atomic::AtomicU64>);

impl xzepr_consumer::handler::Handler for PanickyHooks {
    fn handle(
        &self,
        _event: &CloudEvent<'_>,
        _work: &mut Work,
    ) -> Result<(), xzepr_consumer::handler::HandlerError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    fn on_assign(&self, _partitions: &[(String, i32)]) {
        panic!("a bug in on_assign");
    }
    fn on_revoke(&self, _partitions: &[(String, i32)]) {
        panic!("a bug in on_revoke");
    }
}

#[test]
fn a_panicking_rebalance_hook_is_contained() {
    let cluster = cluster("panicky", 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "panicky", 2, 40, |i| xzepr_event(i, RECEIVER).1);
    let ends = end_offsets(&brokers, "panicky", 2);
    let handled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "panicky", "panicky"))
        .workers(1)
        .commit_interval(Duration::from_millis(50))
        .start(PanickyHooks(Arc::clone(&handled)))
        .unwrap();
    wait_for("every event", || running.metrics().finished >= 40);
    running.shutdown();
    running.join().unwrap();
    assert_eq!(handled.load(std::sync::atomic::Ordering::Relaxed), 40);
    assert_eq!(
        committed(&brokers, "xzepr-consumer-panicky", "panicky", 2),
        ends
    );
}
