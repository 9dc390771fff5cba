//! Failures that must never freeze, crash or loop the consumer, on librdkafka's
//! mock cluster. Every test holds the failure: a lane that never releases, a
//! member that joins while the consumer lags, a partition paused when a
//! rebalance takes it and gives it back, a handler that overruns its
//! timeout, a dead-letter cluster that is down and comes back, brokers that
//! disappear before a shutdown.
#![cfg(feature = "dev-stack")]

mod kafka_support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::{Offset, TopicPartitionList};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::{CloudEvent, CloudEventMessage};
use xzepr_consumer::dispatch::Ordering;
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::{Work, WorkInfo};
use xzepr_consumer::pipeline::{DeadLetterConfig, Pipeline, RetryPolicy, RunningPipeline};

use kafka_support::*;

/// Generous bound for "eventually" on a loaded CI machine; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(90);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn wait_for(what: &str, running: &RunningPipeline, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < PATIENCE,
            "gave up waiting for {what}: {:?} {:?}",
            running.metrics(),
            running.health()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The mock broker waits a session timeout less a second for every member to
/// rejoin when one joins or leaves a group: 29 s with the default.
fn short_session(mut config: KafkaConsumerConfig) -> KafkaConsumerConfig {
    config.session_timeout = Duration::from_secs(6);
    config
}

fn event(i: u64) -> Vec<u8> {
    xzepr_event(i, "01SOMEONEELSE").1
}

/// Scenario 1: a handler that never returns holds its own partition, not
/// every partition. The byte budget is small enough that the held
/// partition's waiting events fill it many times over.
#[test]
fn other_partitions_run_to_the_end_while_one_lane_never_releases() {
    const PER_PARTITION: u64 = 2_000;
    let cluster = cluster("stuck", 2);
    let brokers = cluster.bootstrap_servers();
    // Round-robin: even indexes on partition 0, odd on partition 1.
    produce(&brokers, "stuck", 2, 2 * PER_PARTITION, event);
    let rt = runtime();
    let (release, gate) = tokio::sync::watch::channel(false);
    let on_one = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&on_one);
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "stuck", "stuck"))
        .runtime(rt.handle().clone())
        .commit_interval(Duration::from_millis(50))
        .buffer_budget(256 * 1024)
        .start_async(move |_m: CloudEventMessage, info: WorkInfo| {
            let mut gate = gate.clone();
            let counted = Arc::clone(&counted);
            async move {
                if info.partition == 0 && info.offset == 0 {
                    // Held until the test lets go: no handler timeout is set.
                    let _ = gate.wait_for(|open| *open).await;
                }
                if info.partition == 1 {
                    counted.fetch_add(1, Relaxed);
                }
                Ok::<_, String>(serde_json::Value::Null)
            }
        })
        .unwrap();
    wait_for("partition 1 to run to its end", &running, || {
        on_one.load(Relaxed) == PER_PARTITION
    });
    // Partition 0 is still held at its first offset.
    assert_eq!(running.metrics().finished, PER_PARTITION);
    release.send(true).unwrap();
    wait_for("partition 0 after the release", &running, || {
        running.metrics().finished == 2 * PER_PARTITION
    });
    running.shutdown();
    running.join().unwrap();
    assert_eq!(
        committed(&brokers, "xzepr-consumer-stuck", "stuck", 2),
        end_offsets(&brokers, "stuck", 2)
    );
}

/// Scenario 2: a second member joins while a sync pipeline's job channel is
/// full of jobs of partitions that are then revoked. The consumer keeps
/// running; between the two members every event is handled.
#[test]
fn a_member_joining_while_a_sync_pipeline_lags_keeps_it_running() {
    const N: u64 = 200;
    let cluster = cluster("lagging", 4);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "lagging", 4, N, event);
    let seen: Arc<Mutex<HashSet<(i32, i64)>>> = Arc::default();
    let start = |slow: bool| {
        let seen = Arc::clone(&seen);
        let config = short_session(KafkaConsumerConfig::new(&brokers, "lagging", "lagging"));
        Pipeline::builder(config)
            .ordering(Ordering::Unordered)
            .max_in_flight(8)
            .batch(1)
            .workers(1)
            // Shorter than the queued jobs take: the revoke leaves them queued.
            .drain_timeout(Duration::from_millis(300))
            .commit_interval(Duration::from_millis(50))
            .start(
                move |_e: &CloudEvent<'_>, work: &mut Work| -> Result<(), String> {
                    if slow {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    seen.lock()
                        .unwrap()
                        .insert((work.partition(), work.offset()));
                    Ok(())
                },
            )
            .unwrap()
    };
    let lagging = start(true);
    wait_for("the first member to handle some", &lagging, || {
        seen.lock().unwrap().len() >= 5
    });
    let joining = start(false);
    wait_for(
        "every event handled by one member or the other",
        &joining,
        || seen.lock().unwrap().len() as u64 == N,
    );
    assert!(
        lagging.health().alive,
        "the lagging member stopped: {:?}",
        lagging.health()
    );
    // One member leaves at a time. Two leaving together start a rebalance
    // that neither rejoins, and the mock broker refuses every commit while a
    // group is joining (Kafka takes a current generation's commit then).
    joining.shutdown();
    joining.join().expect("the joining member stops cleanly");
    let ends = end_offsets(&brokers, "lagging", 4);
    wait_for(
        "the lagging member to commit every partition",
        &lagging,
        || committed(&brokers, "xzepr-consumer-lagging", "lagging", 4) == ends,
    );
    lagging.shutdown();
    lagging.join().expect("the lagging member stops cleanly");
    assert_eq!(
        committed(&brokers, "xzepr-consumer-lagging", "lagging", 4),
        ends
    );
}

/// Scenario 2b: librdkafka keeps a partition's pause through a rebalance
/// that gives the partition back to the same member. Both partitions are
/// paused over their buffer share (their first events held) when a second
/// member joins and then leaves; each is assigned back, and must be read
/// again to its end.
#[test]
fn a_partition_paused_when_revoked_is_read_again_when_assigned_back() {
    const PER_PARTITION: u64 = 300;
    let cluster = cluster("pausedback", 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "pausedback", 2, 2 * PER_PARTITION, event);
    let rt = runtime();
    let (release, gate) = tokio::sync::watch::channel(false);
    let config = short_session(KafkaConsumerConfig::new(
        &brokers,
        "pausedback",
        "pausedback",
    ));
    let running = Pipeline::builder(config)
        .runtime(rt.handle().clone())
        .commit_interval(Duration::from_millis(50))
        .drain_timeout(Duration::from_millis(200))
        .buffer_budget(64 * 1024)
        .start_async(move |_m: CloudEventMessage, _info: WorkInfo| {
            let mut gate = gate.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                Ok::<_, String>(serde_json::Value::Null)
            }
        })
        .unwrap();
    let pauses = || running.source().stats().pauses.load(Relaxed);
    wait_for("both partitions paused over their share", &running, || {
        pauses() >= 2
    });
    // A second member: the group rebalances, every partition is revoked from
    // the paused one, and it gets one of them back.
    let other: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "xzepr-consumer-pausedback")
        .set("session.timeout.ms", "6000")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    other.subscribe(&["pausedback"]).unwrap();
    let start = Instant::now();
    while other.assignment().map_or(0, |a| a.count()) == 0 {
        assert!(
            start.elapsed() < PATIENCE,
            "the second member got no partition"
        );
        let _ = other.poll(Duration::from_millis(50));
    }
    release.send(true).unwrap();
    // It leaves: both partitions are assigned back to the first member.
    other.unsubscribe();
    drop(other);
    let ends = end_offsets(&brokers, "pausedback", 2);
    wait_for("every partition committed to its end", &running, || {
        committed(&brokers, "xzepr-consumer-pausedback", "pausedback", 2) == ends
    });
    running.shutdown();
    running.join().unwrap();
}

/// Scenario 6: a sync closure cannot be cancelled; when it succeeds past its
/// timeout its work is done, and running it again would repeat it.
#[test]
fn a_sync_handler_that_succeeds_past_its_timeout_is_not_run_again() {
    const N: u64 = 3;
    let cluster = cluster("overrun", 1);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "overrun", 1, N, event);
    let calls = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&calls);
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "overrun", "overrun"))
        .commit_interval(Duration::from_millis(50))
        .handler_timeout(Duration::from_millis(20))
        .retry(RetryPolicy::attempts(3).backoff(Duration::from_millis(1), Duration::from_millis(2)))
        .start(
            move |_e: &CloudEvent<'_>, _w: &mut Work| -> Result<(), String> {
                counted.fetch_add(1, Relaxed);
                std::thread::sleep(Duration::from_millis(80));
                Ok(())
            },
        )
        .unwrap();
    wait_for("every event finished", &running, || {
        running.metrics().finished == N
    });
    running.shutdown();
    running.join().unwrap();
    let m = running.metrics();
    assert_eq!(calls.load(Relaxed), N, "work that succeeded was run again");
    assert_eq!((m.handler_failed, m.handler_timeouts), (0, N));
}

/// Reads every record of `topic` partition 0 on `brokers` until `n` arrived.
fn read_topic(brokers: &str, topic: &str, n: usize) -> Vec<Vec<u8>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let start = Instant::now();
    while out.len() < n {
        assert!(start.elapsed() < PATIENCE, "read {} of {n}", out.len());
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            out.push(m.unwrap().payload().unwrap_or_default().to_vec());
        }
    }
    out
}

/// Scenario 4: the dead-letter cluster is down when the letter is first
/// produced, then comes back. The letter is produced again until the broker
/// takes it, and the commit point moves past it without a restart.
fn a_dead_letter_that_failed_is_retried_until_the_broker_takes_it(sync: bool) {
    const N: u64 = 50;
    const BAD: i64 = 20;
    let topic = if sync {
        "dlqflap-sync"
    } else {
        "dlqflap-async"
    };
    let cluster = cluster(topic, 1);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, topic, 1, N, event);
    let dlq = MockCluster::new(1).unwrap();
    let dead_letter_topic = format!("{topic}.dlq");
    dlq.create_topic(&dead_letter_topic, 1, 1).unwrap();
    dlq.broker_down(1).unwrap();
    let rt = runtime();
    let builder = Pipeline::builder(KafkaConsumerConfig::new(&brokers, topic, topic))
        .commit_interval(Duration::from_millis(50))
        .runtime(rt.handle().clone())
        .dead_letter(
            DeadLetterConfig::new()
                .set("bootstrap.servers", dlq.bootstrap_servers())
                .message_timeout(Duration::from_millis(500)),
        );
    let running = if sync {
        builder.start(
            move |_e: &CloudEvent<'_>, w: &mut Work| -> Result<(), String> {
                if w.offset() == BAD {
                    Err("always fails".to_owned())
                } else {
                    Ok(())
                }
            },
        )
    } else {
        builder.start_async(move |_m: CloudEventMessage, info: WorkInfo| async move {
            if info.offset == BAD {
                Err("always fails".to_owned())
            } else {
                Ok(serde_json::Value::Null)
            }
        })
    }
    .unwrap();
    wait_for("the first failed dead letter", &running, || {
        running.metrics().dead_letter_failed >= 1
    });
    dlq.broker_up(1).unwrap();
    wait_for("the dead letter delivered", &running, || {
        running.metrics().dead_lettered == 1
    });
    let want = HashMap::from([(0, N as i64)]);
    let start = Instant::now();
    loop {
        let got = committed(&brokers, &format!("xzepr-consumer-{topic}"), topic, 1);
        if got == want {
            break;
        }
        assert!(start.elapsed() < PATIENCE, "committed {got:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    running.shutdown();
    running.join().unwrap();
    let letters = read_topic(&dlq.bootstrap_servers(), &dead_letter_topic, 1);
    assert_eq!(letters[0], event(BAD as u64));
}

#[test]
fn an_async_dead_letter_that_failed_is_retried_until_the_broker_takes_it() {
    a_dead_letter_that_failed_is_retried_until_the_broker_takes_it(false);
}

#[test]
fn a_sync_dead_letter_that_failed_is_retried_until_the_broker_takes_it() {
    a_dead_letter_that_failed_is_retried_until_the_broker_takes_it(true);
}

/// Scenario 14: with the brokers gone, shutdown still ends within its
/// documented bound (twice the drain timeout plus 5 s); what it could not
/// commit is replayed by the next owner.
#[test]
fn shutdown_stays_within_its_bound_when_the_brokers_are_unreachable() {
    const N: u64 = 100;
    let drain = Duration::from_secs(1);
    let cluster = cluster("vanish", 1);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "vanish", 1, N, event);
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "vanish", "vanish"))
        .commit_interval(Duration::from_millis(50))
        .drain_timeout(drain)
        .start(|_e: &CloudEvent<'_>, _w: &mut Work| -> Result<(), String> { Ok(()) })
        .unwrap();
    wait_for("every event finished", &running, || {
        running.metrics().finished == N
    });
    cluster.broker_down(1).unwrap();
    let running = Arc::new(running);
    let (tx, rx) = std::sync::mpsc::channel();
    let stopping = Arc::clone(&running);
    std::thread::spawn(move || {
        stopping.shutdown();
        let _ = tx.send(stopping.join().map_err(|e| e.to_string()));
    });
    // The bound, with room for a loaded machine; the point is that it ends.
    let bound = 2 * drain + Duration::from_secs(5);
    match rx.recv_timeout(bound + Duration::from_secs(20)) {
        Ok(_) => {}
        Err(_) => panic!("shutdown still running long past its bound of {bound:?}"),
    }
}
