//! Failure handling on librdkafka's mock cluster, with a real HTTP server standing
//! in for XZepr: retries that wait in their lane, a dead-letter topic whose
//! acknowledgement gates the offset (the model is Vector's
//! `advances_offset_past_poison_messages`), and an XZepr outage that holds the
//! commit point until XZepr answers again, without a restart.
#![cfg(feature = "dev-stack")]

mod http_support;
mod kafka_support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::{HandlerError, WorkInfo};
use xzepr_consumer::pipeline::{
    DeadLetterConfig, MalformedPolicy, Pipeline, RetryPolicy, RunningPipeline, WorkTemplate,
};
use xzepr_consumer::report::{Reporter, ReporterConfig, ReporterTask};

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

fn wait_for(what: &str, running: &RunningPipeline, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < PATIENCE,
            "gave up waiting for {what}: {:?}",
            running.metrics()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Produces `n` messages to `partition` of `topic`: payload and headers from `f(i)`.
fn produce_with(
    brokers: &str,
    topic: &str,
    partition: i32,
    n: u64,
    f: impl Fn(u64) -> (Vec<u8>, Vec<(&'static str, &'static str)>),
) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for i in 0..n {
        let (payload, headers) = f(i);
        let key = format!("key-{i}");
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let record = BaseRecord::to(topic)
            .key(&key)
            .payload(&payload)
            .partition(partition)
            .headers(h);
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// A dead letter as read back: key, payload, headers.
struct Letter {
    key: Vec<u8>,
    payload: Vec<u8>,
    headers: HashMap<String, String>,
}

fn read_all(brokers: &str, topic: &str, n: usize) -> Vec<Letter> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "dlq-reader")
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
        assert!(
            start.elapsed() < PATIENCE,
            "read {} of {n} dead letters",
            out.len()
        );
        let Some(m) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.unwrap();
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(Letter {
            key: m.key().unwrap_or_default().to_vec(),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
        });
    }
    // Nothing more than expected arrives.
    if let Some(extra) = c.poll(Duration::from_millis(500)) {
        panic!("an extra dead letter: {:?}", extra.map(|m| m.offset()));
    }
    drop(tpl);
    out
}

fn reporter(
    rt: &tokio::runtime::Runtime,
    url: &str,
    config: ReporterConfig,
) -> (Reporter, ReporterTask) {
    rt.block_on(async {
        let client = XzeprClient::new(XzeprClientConfig::new(url, "tok")).unwrap();
        Reporter::start(client, config)
    })
}

fn quick_reporter() -> ReporterConfig {
    let mut c = ReporterConfig::default();
    c.backoff_base = Duration::from_millis(1);
    c.backoff_max = Duration::from_millis(20);
    c.max_attempts = 3;
    c
}

const MALFORMED_AT: i64 = 50;
const FLAKY_AT: i64 = 80;
const POISON_AT: i64 = 120;
const REJECTED_AT: i64 = 150;

#[test]
fn poison_messages_are_dead_lettered_and_the_partition_moves_past_them() {
    const N: u64 = 200;
    let cluster = cluster("poison", 1);
    cluster.create_topic("poison.dlq", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    produce_with(&brokers, "poison", 0, N, |i| match i as i64 {
        MALFORMED_AT => (b"{not json".to_vec(), vec![("trace", "m-1")]),
        POISON_AT => (xzepr_event(i, "01SOMEONEELSE").1, vec![("trace", "p-1")]),
        _ => (xzepr_event(i, "01SOMEONEELSE").1, vec![]),
    });
    let ends = end_offsets(&brokers, "poison", 1);
    let rt = runtime();
    let xzepr = rt.block_on(http_support::start(http_support::Chaos::default()));
    // XZepr refuses this event's posts with a 400, for good.
    let rejected_work = format!("work-{}", xzepr_event(REJECTED_AT as u64, "x").0);
    *xzepr.seen.reject_containing.lock().unwrap() = Some(rejected_work);
    let (reporter, task) = reporter(&rt, &xzepr.url, quick_reporter());
    // (offset, attempt) in the order the handler saw them.
    let log: Arc<Mutex<Vec<(i64, u32)>>> = Arc::default();
    let l = Arc::clone(&log);
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "poison", "poison"))
        .commit_interval(Duration::from_millis(100))
        .runtime(rt.handle().clone())
        .retry(RetryPolicy::attempts(3).backoff(Duration::from_millis(1), Duration::from_millis(5)))
        .dead_letter(DeadLetterConfig::new())
        .malformed(MalformedPolicy::DeadLetter)
        .lifecycle(
            reporter,
            WorkTemplate::new("01MYRECEIVER", "deploy", "1.0.0", "poison"),
        )
        .start_async(move |_m: CloudEventMessage, info: WorkInfo| {
            let l = Arc::clone(&l);
            async move {
                let attempt = {
                    let mut log = l.lock().unwrap();
                    let attempt = 1 + log.iter().filter(|(o, _)| *o == info.offset).count() as u32;
                    log.push((info.offset, attempt));
                    attempt
                };
                match info.offset {
                    POISON_AT => Err(HandlerError::with_code("always fails", "POISON")),
                    FLAKY_AT if attempt < 3 => Err(HandlerError::new("flaky")),
                    _ => Ok(serde_json::Value::Null),
                }
            }
        })
        .unwrap();
    wait_for("every offset", &running, || running.metrics().finished >= N);
    running.shutdown();
    running.join().unwrap();
    assert!(rt.block_on(task.drain(Duration::from_secs(30))));

    let m = running.metrics();
    assert_eq!(
        (
            m.malformed,
            m.handler_failed,
            m.retried,
            m.dead_lettered,
            m.dead_letter_failed,
            m.report_rejected
        ),
        // The rejected event's `started` is refused; its terminal post is
        // never sent (XZepr gets no terminal without its start).
        (1, 1, 4, 3, 0, 1),
        "{m:?}"
    );
    assert_eq!(
        committed(&brokers, "xzepr-consumer-poison", "poison", 1),
        ends
    );

    // Under per-partition order a retry waits in its lane: offsets never go back.
    let log = log.lock().unwrap();
    assert!(
        log.windows(2).all(|w| w[0].0 <= w[1].0),
        "out of order: {log:?}"
    );
    assert_eq!(log.iter().filter(|(o, _)| *o == POISON_AT).count(), 3);

    let letters = read_all(&brokers, "poison.dlq", 3);
    let (malformed, poison, rejected) = (&letters[0], &letters[1], &letters[2]);
    assert_eq!(malformed.payload, b"{not json");
    assert_eq!(malformed.key, format!("key-{MALFORMED_AT}").as_bytes());
    assert_eq!(
        poison.payload,
        xzepr_event(POISON_AT as u64, "01SOMEONEELSE").1
    );
    for (letter, offset, reason, attempts, trace) in [
        (malformed, MALFORMED_AT, "malformed", "0", "m-1"),
        (poison, POISON_AT, "handler_failed", "3", "p-1"),
        (rejected, REJECTED_AT, "report_rejected", "1", ""),
    ] {
        let h = &letter.headers;
        if !trace.is_empty() {
            assert_eq!(h["trace"], trace, "original headers kept");
        }
        assert_eq!(h["__connect.errors.topic"], "poison");
        assert_eq!(h["__connect.errors.partition"], "0");
        assert_eq!(h["__connect.errors.offset"], offset.to_string());
        assert_eq!(h["xzepr.dlq.reason"], reason);
        assert_eq!(h["xzepr.dlq.attempts"], attempts);
        assert_eq!(h["xzepr.dlq.consumer_group"], "xzepr-consumer-poison");
        assert!(!h["__connect.errors.exception.message"].is_empty());
        assert!(h.contains_key("xzepr.dlq.time"));
    }
    assert_eq!(poison.headers["xzepr.dlq.error_code"], "POISON");
    assert_eq!(rejected.headers["xzepr.dlq.error_code"], "report_rejected");
    assert!(
        rejected.headers["xzepr.dlq.error"].contains("validation"),
        "XZepr's answer: {:?}",
        rejected.headers
    );

    // The lifecycle posts say what happened.
    let accepted = xzepr.seen.accepted.lock().unwrap();
    let terminal = |seq: i64| {
        let work = format!("work-{}", xzepr_event(seq as u64, "x").0);
        accepted
            .iter()
            .find(|b| b["payload"]["work_id"] == work.as_str() && b["name"] != "deploy.started")
            .unwrap_or_else(|| panic!("no terminal post for {seq}"))
            .clone()
    };
    let failed = terminal(POISON_AT);
    assert_eq!(failed["name"], "deploy.failed");
    let details = &failed["payload"]["details"];
    assert_eq!(details["attempts"], 3);
    assert_eq!(details["dead_letter"]["topic"], "poison.dlq");
    assert_eq!(details["dead_letter"]["offset"], 1);
    let flaky = terminal(FLAKY_AT);
    assert_eq!(flaky["name"], "deploy.completed");
    assert_eq!(flaky["payload"]["details"]["attempts"], 3);
}

#[test]
fn a_dead_letter_the_broker_never_acknowledges_is_tried_again_and_holds_the_offset() {
    const N: u64 = 100;
    const BAD: i64 = 40;
    let cluster = cluster("dlqdown", 1);
    let brokers = cluster.bootstrap_servers();
    produce_with(&brokers, "dlqdown", 0, N, |i| {
        (xzepr_event(i, "01SOMEONEELSE").1, vec![])
    });
    let rt = runtime();
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "dlqdown", "dlqdown"))
        .commit_interval(Duration::from_millis(50))
        // The letter still being tried is cancelled at the drain deadline.
        .drain_timeout(Duration::from_secs(1))
        .runtime(rt.handle().clone())
        // A dead-letter cluster nobody listens on: the produce times out.
        .dead_letter(
            DeadLetterConfig::new()
                .set("bootstrap.servers", "127.0.0.1:1")
                .message_timeout(Duration::from_millis(500)),
        )
        .start_async(move |_m: CloudEventMessage, info: WorkInfo| async move {
            if info.offset == BAD {
                Err("always fails".to_owned())
            } else {
                Ok(serde_json::Value::Null)
            }
        })
        .unwrap();
    // Tried again and again while the broker does not answer, and the commit
    // point waits at the hole.
    wait_for("the dead letter tried again", &running, || {
        let m = running.metrics();
        m.dead_letter_failed >= 2 && m.finished == N - 1
    });
    wait_for("the commit point at the hole", &running, || {
        running
            .source()
            .committed()
            .iter()
            .any(|(_, p, o)| (*p, *o) == (0, BAD))
    });
    running.shutdown();
    running.join().unwrap();
    assert_eq!(running.metrics().dead_lettered, 0);
    assert_eq!(
        committed(&brokers, "xzepr-consumer-dlqdown", "dlqdown", 1),
        HashMap::from([(0, BAD)])
    );
}

#[test]
fn an_xzepr_outage_holds_the_commit_point_and_everything_is_reported_after() {
    const N: u64 = 3_000;
    const P: i32 = 2;
    let cluster = cluster("outage", P);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "outage", P, N, |i| {
        xzepr_event(i, "01SOMEONEELSE").1
    });
    let ends = end_offsets(&brokers, "outage", P);
    let rt = runtime();
    let xzepr = rt.block_on(http_support::start(http_support::Chaos::default()));
    let mut config = quick_reporter();
    config.breaker_threshold = 5;
    config.breaker_cooldown = Duration::from_millis(100);
    let (reporter, task) = reporter(&rt, &xzepr.url, config);
    let stats = reporter.clone();
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "outage", "outage"))
        .commit_interval(Duration::from_millis(50))
        .max_in_flight(64)
        .runtime(rt.handle().clone())
        .lifecycle(
            reporter,
            WorkTemplate::new("01MYRECEIVER", "deploy", "1.0.0", "outage"),
        )
        .start_async(|_m: CloudEventMessage, _info: WorkInfo| async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok::<_, String>(serde_json::Value::Null)
        })
        .unwrap();

    // Which events are fully reported: both posts accepted.
    let reported = |accepted: &[serde_json::Value]| {
        let mut posts: HashMap<String, u32> = HashMap::new();
        for b in accepted {
            *posts
                .entry(b["payload"]["work_id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        posts
            .into_iter()
            .filter(|(_, n)| *n >= 2)
            .map(|(w, _)| w)
            .collect::<HashSet<_>>()
    };
    // Every offset below a partition's commit point was reported.
    let check_commits = |when: &str| {
        let committed = committed(&brokers, "xzepr-consumer-outage", "outage", P);
        let done = reported(&xzepr.seen.accepted.lock().unwrap());
        for (p, c) in &committed {
            for offset in 0..(*c).max(0) {
                let seq = offset as u64 * P as u64 + *p as u64;
                let work = format!("work-{}", xzepr_event(seq, "x").0);
                assert!(
                    done.contains(&work),
                    "{when}: offset {offset} of partition {p} committed unreported"
                );
            }
        }
        committed
    };

    wait_for("a part reported", &running, || {
        running.metrics().posted_completed >= 500
    });
    xzepr.seen.outage.store(true, Relaxed);
    let during = Instant::now();
    wait_for("the breaker to open", &running, || {
        stats.stats().breaker_opened.load(Relaxed) >= 1
    });
    // The outage lasts a while; commits go on and must never pass unreported work.
    let mut before = check_commits("during the outage");
    while during.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(200));
        before = check_commits("during the outage");
    }
    let refused = xzepr.seen.refused.load(Relaxed);
    assert!(refused > 0);
    let reported_during = running.metrics().posted_completed;
    xzepr.seen.outage.store(false, Relaxed);

    wait_for("every event reported", &running, || {
        running.metrics().finished >= N
    });
    let after = check_commits("after the outage");
    assert!(
        before.iter().any(|(p, c)| after[p] > *c),
        "commits moved on without a restart"
    );
    running.shutdown();
    running.join().unwrap();
    let opened = stats.stats().breaker_opened.load(Relaxed);
    // The reporter ends once every handle to it is gone.
    drop(stats);
    let m = running.metrics();
    drop(running);
    assert!(rt.block_on(task.drain(Duration::from_secs(30))));
    assert_eq!(m.report_failed, 0, "{m:?}");
    assert_eq!((m.posted_started, m.posted_completed), (N, N));
    assert_eq!(
        committed(&brokers, "xzepr-consumer-outage", "outage", P),
        ends
    );
    eprintln!(
        "outage: {refused} requests refused, breaker opened {opened} time(s), {reported_during} \
         completed before the outage ended, all {N} reported after"
    );
}

/// A sync handler's retry does not hold its worker: with one worker thread, an
/// event of another partition runs while the failing one waits for its next
/// attempt. The failing event succeeds only once that happened, so a worker
/// that slept through its backoff would exhaust every attempt instead.
#[test]
fn a_sync_retry_waits_without_its_worker() {
    use std::sync::atomic::AtomicBool;
    use xzepr_consumer::decode::CloudEvent;
    use xzepr_consumer::handler::Work;

    const N: u64 = 10;
    let cluster = cluster("syncretry", 2);
    let brokers = cluster.bootstrap_servers();
    let event = |i: u64| (xzepr_event(i, "01SOMEONEELSE").1, vec![]);
    // First only the event that fails; the other partition's events arrive
    // once it has failed, so only a free worker can run them.
    produce_with(&brokers, "syncretry", 0, 1, event);
    let failed_once = Arc::new(AtomicBool::new(false));
    let other_ran = Arc::new(AtomicBool::new(false));
    let (f, o) = (Arc::clone(&failed_once), Arc::clone(&other_ran));
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "syncretry", "syncretry"))
        .workers(1)
        .commit_interval(Duration::from_millis(50))
        .retry(
            RetryPolicy::attempts(2_000)
                .backoff(Duration::from_millis(1), Duration::from_millis(2)),
        )
        .start(
            move |_ev: &CloudEvent<'_>, work: &mut Work| -> Result<(), String> {
                let info = work.info();
                if (info.partition, info.offset) == (0, 0) {
                    if !f.swap(true, Relaxed) || !o.load(Relaxed) {
                        return Err("not yet".to_owned());
                    }
                } else if info.partition == 1 && f.load(Relaxed) {
                    o.store(true, Relaxed);
                }
                Ok(())
            },
        )
        .unwrap();
    wait_for("the first failure", &running, || failed_once.load(Relaxed));
    produce_with(&brokers, "syncretry", 1, N, event);
    let ends = end_offsets(&brokers, "syncretry", 2);
    wait_for("every event", &running, || running.metrics().finished > N);
    running.shutdown();
    running.join().unwrap();
    let m = running.metrics();
    assert_eq!(m.handler_failed, 0, "the retried event succeeded: {m:?}");
    assert!(m.retried >= 1, "{m:?}");
    assert!(other_ran.load(Relaxed));
    assert_eq!(
        committed(&brokers, "xzepr-consumer-syncretry", "syncretry", 2),
        ends
    );
}
