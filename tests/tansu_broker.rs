//! The source stage against a real Kafka-compatible broker (Tansu, SQLite storage):
//! SASL/SCRAM-SHA-256 and -512, a wrong password, resuming from committed
//! offsets across a broker restart, and starting from and resetting to a time
//! (`offsets_for_times`, which the mock broker cannot answer).
//!
//! The broker binary is found through `TANSU_BIN`, `~/.cargo/bin/tansu` or `PATH`
//! (`.ci/test` installs it). Without it each test prints `SKIPPED` and why; with
//! `CI` set it fails instead.

mod kafka_support;
#[macro_use]
mod tansu_support;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use xzepr_consumer::config::{KafkaConsumerConfig, SaslMechanism};
use xzepr_consumer::source::{Source, SourceError, SourceOptions};

use tansu_support::Broker;

fn options() -> SourceOptions {
    let mut o = SourceOptions::default();
    o.max_in_flight = 256.into();
    o.commit_interval = Duration::from_millis(200);
    o.drain_timeout = Duration::from_secs(5);
    o
}

/// Consumes until `n` distinct offsets were seen (finishing all but those for
/// which `keep` says no), then shuts down. Returns offsets seen per partition.
fn consume(
    config: &KafkaConsumerConfig,
    n: usize,
    keep: impl Fn(i32, i64) -> bool + Send + Sync + 'static,
) -> HashMap<i32, BTreeSet<i64>> {
    consume_with(config, options(), n, keep)
}

/// [`consume`] with these options.
fn consume_with(
    config: &KafkaConsumerConfig,
    options: SourceOptions,
    n: usize,
    keep: impl Fn(i32, i64) -> bool + Send + Sync + 'static,
) -> HashMap<i32, BTreeSet<i64>> {
    let mut source = Source::start(config, options).unwrap();
    let seen: Arc<Mutex<HashMap<i32, BTreeSet<i64>>>> = Arc::default();
    let keep = Arc::new(keep);
    let rx = source.take_receiver().unwrap();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (seen, keep, rx) = (Arc::clone(&seen), Arc::clone(&keep), rx.clone());
            std::thread::spawn(move || {
                for m in rx.iter().flatten() {
                    seen.lock()
                        .unwrap()
                        .entry(m.partition)
                        .or_default()
                        .insert(m.offset);
                    if keep(m.partition, m.offset) {
                        m.finish();
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    while seen
        .lock()
        .unwrap()
        .values()
        .map(BTreeSet::len)
        .sum::<usize>()
        < n
    {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "consumed too little"
        );
        assert!(
            !source.handle().is_finished(),
            "source stopped: {:?}",
            source.handle().join()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let handle = source.handle();
    handle.shutdown();
    handle.join().unwrap();
    for w in workers {
        w.join().unwrap();
    }
    let out = seen.lock().unwrap().clone();
    out
}

fn committed_with(config: &ClientConfig, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    let c: BaseConsumer = config.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(20)).unwrap();
    let out = got
        .elements()
        .iter()
        .map(|e| {
            (
                e.partition(),
                if let Offset::Offset(o) = e.offset() {
                    o
                } else {
                    -1
                },
            )
        })
        .collect();
    drop(got);
    drop(c);
    out
}

#[test]
fn scram_sha_256_and_512_consume_and_commit_and_a_wrong_password_fails_fast() {
    let bin = require_tansu!();
    let mut broker = Broker::start(bin);
    broker.create_topic("secure", 2);
    let url = broker.url();
    broker.tansu(&[
        "user",
        "create",
        "--broker",
        &url,
        "--mechanism",
        "scram256",
        "alice",
        "alice-secret",
    ]);
    broker.tansu(&[
        "user",
        "create",
        "--broker",
        &url,
        "--mechanism",
        "scram512",
        "bob",
        "bob-secret",
    ]);
    kafka_support::produce(&broker.brokers(), "secure", 2, 500, |i| {
        format!("{{\"n\":{i}}}").into_bytes()
    });
    broker.restart(true);

    for (mechanism, user, password) in [
        (SaslMechanism::ScramSha256, "alice", "alice-secret"),
        (SaslMechanism::ScramSha512, "bob", "bob-secret"),
    ] {
        let config = KafkaConsumerConfig::new(&broker.brokers(), "secure", user)
            .with_sasl(mechanism, user, password);
        let seen = consume(&config, 500, |_, _| true);
        assert_eq!(
            seen.values().map(BTreeSet::len).sum::<usize>(),
            500,
            "{user}"
        );
        let client = config.to_client_config().unwrap();
        let committed = committed_with(&client, "secure", 2);
        assert_eq!(
            committed.values().sum::<i64>(),
            500,
            "{user}: {committed:?}"
        );
    }

    // A wrong password: the poll thread stops with an authentication error.
    let config = KafkaConsumerConfig::new(&broker.brokers(), "secure", "mallory").with_sasl(
        SaslMechanism::ScramSha256,
        "alice",
        "not-her-password",
    );
    let source = Source::start(&config, options()).unwrap();
    let handle = source.handle();
    let start = Instant::now();
    while !handle.is_finished() {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "a wrong password must fail, not hang"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let err = handle.join().unwrap_err();
    assert!(matches!(err, SourceError::Authentication { .. }), "{err}");
}

#[test]
fn consume_commit_restart_resumes_at_the_committed_offsets() {
    let bin = require_tansu!();
    let mut broker = Broker::start(bin);
    broker.create_topic("resume", 2);
    kafka_support::produce(&broker.brokers(), "resume", 2, 1_000, |i| {
        format!("{i}").into_bytes()
    });
    let config = KafkaConsumerConfig::new(&broker.brokers(), "resume", "resume");
    // Offset 200 of partition 0 never finishes: the commit point stops there.
    let first = consume(&config, 1_000, |p, o| !(p == 0 && o == 200));
    assert_eq!(first.values().map(BTreeSet::len).sum::<usize>(), 1_000);

    broker.restart(false);
    let again = consume(&config, 300, |_, _| true);
    let replayed: Vec<i64> = again
        .get(&0)
        .map(|s| s.iter().copied().collect())
        .unwrap_or_default();
    assert_eq!(
        replayed,
        (200..500).collect::<Vec<_>>(),
        "resumes exactly at the commit point"
    );
    assert!(
        !again.contains_key(&1),
        "partition 1 was committed to its end"
    );
}

/// The pipeline rides through a broker restart mid-stream: it reconnects on its
/// own, every event is handled, and it commits to the end.
#[test]
fn the_pipeline_rides_through_a_broker_restart_mid_stream() {
    use xzepr_consumer::decode::CloudEventMessage;
    use xzepr_consumer::handler::WorkInfo;
    use xzepr_consumer::pipeline::Pipeline;

    const N: u64 = 3_000;
    let bin = require_tansu!();
    let mut broker = Broker::start(bin);
    broker.create_topic("ride", 2);
    kafka_support::produce(&broker.brokers(), "ride", 2, N, |i| {
        xzepr_consumer::generate::xzepr_event(i, "01SOMEONEELSE").1
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seen: Arc<Mutex<BTreeSet<(i32, i64)>>> = Arc::default();
    let s = Arc::clone(&seen);
    let running = Pipeline::builder(KafkaConsumerConfig::new(&broker.brokers(), "ride", "ride"))
        .commit_interval(Duration::from_millis(100))
        .max_in_flight(64)
        .runtime(rt.handle().clone())
        .start_async(move |_m: CloudEventMessage, info: WorkInfo| {
            s.lock().unwrap().insert((info.partition, info.offset));
            async {
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok::<_, String>(serde_json::Value::Null)
            }
        })
        .unwrap();
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < Duration::from_secs(240),
                "gave up waiting for {what}: {:?}",
                running.metrics()
            );
            assert!(!running.source().is_finished(), "the pipeline stopped");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait("a third", &|| running.metrics().finished >= N / 3);
    broker.restart(false);
    let after_restart = running.metrics().finished;
    wait("every event", &|| running.metrics().finished >= N);
    // The last commits reach the broker.
    std::thread::sleep(Duration::from_millis(500));
    running.shutdown();
    running.join().unwrap();
    let seen = seen.lock().unwrap();
    let expected: BTreeSet<(i32, i64)> = (0..2)
        .flat_map(|p| (0..(N / 2) as i64).map(move |o| (p, o)))
        .collect();
    assert_eq!(*seen, expected, "nothing missing");
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", broker.brokers())
        .set("group.id", "xzepr-consumer-ride");
    assert_eq!(
        committed_with(&config, "ride", 2),
        HashMap::from([(0, (N / 2) as i64), (1, (N / 2) as i64)])
    );
    eprintln!(
        "broker restart: {after_restart} of {N} finished when the broker restarted; all {N} after"
    );
}

/// Produces `n` messages to each of `partitions`, message `i` of a partition
/// timestamped `base_ms + i` seconds; returns `base_ms`, an hour ago.
fn produce_timestamped(brokers: &str, topic: &str, partitions: i32, n: i64) -> i64 {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let base_ms = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for p in 0..partitions {
        for i in 0..n {
            let (key, body) = (format!("{p}-{i}"), format!("{i}"));
            let record = BaseRecord::to(topic)
                .key(&key)
                .payload(&body)
                .partition(p)
                .timestamp(base_ms + i * 1_000);
            producer.send(record).map_err(|(e, _)| e).unwrap();
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    base_ms
}

fn at_ms(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap()
}

/// `start_from` a time (librdkafka's `offsets_for_times`, which the mock
/// broker cannot answer): the first event handled on each partition is the
/// first at or after the time, and a committed offset wins on the next start.
#[test]
fn start_from_a_time_handles_first_the_first_event_at_or_after_it() {
    use xzepr_consumer::source::StartFrom;
    let bin = require_tansu!();
    let broker = Broker::start(bin);
    broker.create_topic("times", 2);
    let base = produce_timestamped(&broker.brokers(), "times", 2, 50);
    let config = KafkaConsumerConfig::new(&broker.brokers(), "times", "times");
    let mut o = options();
    // Between messages 30 and 31: the first at or after it is 31.
    o.start_from = StartFrom::Timestamp(at_ms(base + 30_500));
    let seen = consume_with(&config, o.clone(), 2 * 19, |_, _| true);
    for p in 0..2 {
        let offsets: Vec<i64> = seen[&p].iter().copied().collect();
        assert_eq!(offsets, (31..50).collect::<Vec<_>>(), "partition {p}");
    }
    // Committed now: the time no longer applies to this group.
    kafka_support::produce(&broker.brokers(), "times", 2, 4, |i| {
        i.to_string().into_bytes()
    });
    let again = consume_with(&config, o, 4, |_, _| true);
    assert_eq!(again.values().map(BTreeSet::len).sum::<usize>(), 4);
    assert!(again.values().flatten().all(|&o| o >= 50), "{again:?}");
}

/// `offsets reset --to-timestamp` on a real broker moves a stopped group to
/// the first offset at or after the time. (Tansu 0.6 neither lists a group's
/// members nor refuses a commit from outside a group that has some, so the
/// refusal is shown on the mock broker, `offsets_mock.rs`.)
#[test]
fn offsets_reset_to_a_time_moves_a_stopped_group() {
    use xzepr_consumer::offsets::admin::{GroupOffsets, ResetTo};
    let bin = require_tansu!();
    let broker = Broker::start(bin);
    broker.create_topic("rewind", 2);
    let base = produce_timestamped(&broker.brokers(), "rewind", 2, 50);
    let config = KafkaConsumerConfig::new(&broker.brokers(), "rewind", "rewind");
    let seen = consume(&config, 100, |_, _| true);
    assert_eq!(seen.values().map(BTreeSet::len).sum::<usize>(), 100);

    let admin = GroupOffsets::connect(&config, &config.group_id).unwrap();
    let to = ResetTo::Timestamp(at_ms(base + 40_000));
    let plan = admin.reset("rewind", to, true).unwrap();
    assert!(
        plan.partitions
            .iter()
            .all(|m| m.old == Some(50) && m.new == 40),
        "{plan:?}"
    );
    let shown = admin.show("rewind").unwrap();
    assert!(
        shown.iter().all(|p| p.committed == Some(50)),
        "a dry run moves nothing"
    );
    let report = admin.reset("rewind", to, false).unwrap();
    assert!(
        report.partitions.iter().all(|m| m.moves && m.new == 40),
        "{report:?}"
    );
    let shown = admin.show("rewind").unwrap();
    assert!(
        shown
            .iter()
            .all(|p| p.committed == Some(40) && p.lag == Some(10)),
        "{shown:?}"
    );
    drop(admin);
    let replayed = consume(&config, 20, |_, _| true);
    for p in 0..2 {
        let offsets: Vec<i64> = replayed[&p].iter().copied().collect();
        assert_eq!(offsets, (40..50).collect::<Vec<_>>(), "partition {p}");
    }
}
