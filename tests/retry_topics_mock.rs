//! Long-delay retries through delay topics, on the mock broker: an event whose
//! attempts are spent goes to `<topic>.retry.<delay>`, its source partition
//! commits past it while it waits, and it runs again once due, with one
//! `started` and one terminal post for the whole; after the last delay it is
//! dead-lettered as coming from its source topic.
#![cfg(feature = "dev-stack")]

mod http_support;
mod kafka_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use serde_json::Value;
use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::{HandlerError, WorkInfo};
use xzepr_consumer::pipeline::{
    dead_letter_headers, delay_topic_headers, DeadLetterConfig, Pipeline, RetryPolicy, WorkTemplate,
};
use xzepr_consumer::report::{Reporter, ReporterConfig};

use kafka_support::*;

/// Generous bound for "eventually" on a loaded machine; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(120);
const PARTITIONS: i32 = 2;
const N: u64 = 20;
/// The event that fails.
const FLAKY: u64 = 7;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// One handler call as the handler saw it.
#[derive(Debug, Clone)]
struct Call {
    event: String,
    topic: String,
    /// The delay topic's not-before header, if any.
    not_before: Option<i64>,
    /// The wall clock when the call began, in ms since the epoch.
    at: i64,
}

fn header(info: &WorkInfo, name: &str) -> Option<String> {
    info.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The lifecycle posts XZepr accepted, by work id: their names.
fn posts_by_work(server: &http_support::Server) -> HashMap<String, Vec<Value>> {
    let mut by_work: HashMap<String, Vec<Value>> = HashMap::new();
    for body in server.seen.accepted.lock().unwrap().iter() {
        let id = body["payload"]["work_id"].as_str().unwrap().to_owned();
        by_work.entry(id).or_default().push(body.clone());
    }
    by_work
}

#[test]
fn an_event_failing_twice_waits_in_two_delay_topics_and_succeeds_on_its_third_attempt() {
    let cluster = cluster("orders", PARTITIONS);
    for t in ["orders.retry.1s", "orders.retry.2s"] {
        cluster.create_topic(t, PARTITIONS, 1).unwrap();
    }
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "orders", PARTITIONS, N, |i| {
        xzepr_event(i, "01SOMEONEELSE").1
    });
    let ends = end_offsets(&brokers, "orders", PARTITIONS);
    let flaky_id = serde_json::from_slice::<Value>(&xzepr_event(FLAKY, "x").1).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let rt = runtime();
    let server = rt.block_on(http_support::start(http_support::Chaos::default()));
    let (reporter, task) = rt.block_on(async {
        let client = XzeprClient::new(XzeprClientConfig::new(server.url.clone(), "tok")).unwrap();
        Reporter::start(client, ReporterConfig::default())
    });
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    // The third attempt waits here until the test has seen the source
    // partitions commit past the event: the commit point moved on while the
    // event was not done.
    let gate = Arc::new(AtomicBool::new(false));
    let running = {
        let _enter = rt.enter();
        let (calls, gate, flaky_id) = (Arc::clone(&calls), Arc::clone(&gate), flaky_id.clone());
        Pipeline::builder(KafkaConsumerConfig::new(&brokers, "orders", "delays"))
            .runtime(rt.handle().clone())
            .commit_interval(Duration::from_millis(50))
            .retry(
                RetryPolicy::attempts(1)
                    .delay_topics([Duration::from_secs(1), Duration::from_secs(2)]),
            )
            .lifecycle(
                reporter,
                WorkTemplate::new("01MYRECEIVER", "deploy", "1.0.0", "delays"),
            )
            .start_async(move |m: CloudEventMessage, info: WorkInfo| {
                let (calls, gate, flaky_id) =
                    (Arc::clone(&calls), Arc::clone(&gate), flaky_id.clone());
                async move {
                    calls.lock().unwrap().push(Call {
                        event: m.id.clone(),
                        topic: info.topic.clone(),
                        not_before: header(&info, delay_topic_headers::NOT_BEFORE)
                            .and_then(|v| v.parse().ok()),
                        at: now_ms(),
                    });
                    if m.id != flaky_id {
                        return Ok(Value::Null);
                    }
                    match info.topic.as_str() {
                        "orders.retry.2s" => {
                            while !gate.load(SeqCst) {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            Ok(Value::Null)
                        }
                        _ => Err(HandlerError::new("partner API down")),
                    }
                }
            })
            .unwrap()
    };

    // While the event is in its delay topics (or held at the gate), its source
    // partitions commit to their ends.
    wait_for(
        PATIENCE,
        "the source partitions to commit past the delayed event",
        || committed(&brokers, "xzepr-consumer-delays", "orders", PARTITIONS) == ends,
    );
    let completed = |by_work: &HashMap<String, Vec<Value>>| {
        by_work
            .get(&format!("work-{flaky_id}"))
            .is_some_and(|posts| posts.iter().any(|p| p["name"] == "deploy.completed"))
    };
    assert!(
        !completed(&posts_by_work(&server)),
        "the delayed event was not done when its partition committed past it"
    );
    gate.store(true, SeqCst);
    wait_for(PATIENCE, "the delayed event to complete", || {
        completed(&posts_by_work(&server))
    });
    wait_for(PATIENCE, "every offset to finish", || {
        running.metrics().finished >= N + 2
    });
    running.shutdown();
    running.join().unwrap();
    assert!(rt.block_on(task.drain(Duration::from_secs(30))));

    let calls = calls.lock().unwrap().clone();
    let flaky: Vec<&Call> = calls.iter().filter(|c| c.event == flaky_id).collect();
    let topics: Vec<&str> = flaky.iter().map(|c| c.topic.as_str()).collect();
    assert_eq!(
        topics,
        ["orders", "orders.retry.1s", "orders.retry.2s"],
        "{flaky:?}"
    );
    for c in &flaky[1..] {
        let due = c
            .not_before
            .expect("a delay topic's event carries its due time");
        assert!(c.at >= due, "ran before it was due: {c:?}");
    }
    assert_eq!(calls.len() as u64, N + 2, "every other event ran once");

    // One `started` and one terminal post per event, the delayed one's
    // carrying its attempts over every visit.
    let by_work = posts_by_work(&server);
    assert_eq!(by_work.len() as u64, N);
    for (id, posts) in &by_work {
        let names: Vec<&str> = posts.iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["deploy.started", "deploy.completed"], "{id}");
    }
    let terminal = &by_work[&format!("work-{flaky_id}")][1];
    assert_eq!(terminal["payload"]["details"]["attempts"], 3, "{terminal}");

    let m = running.metrics();
    assert_eq!((m.delayed, m.delay_failed), (2, 0), "{m:?}");
    assert_eq!(m.handled, N, "{m:?}");
    // The delay topics' partitions commit past what they held (one never
    // written has nothing to commit).
    for t in ["orders.retry.1s", "orders.retry.2s"] {
        let got = committed(&brokers, "xzepr-consumer-delays", t, PARTITIONS);
        for (p, end) in end_offsets(&brokers, t, PARTITIONS) {
            assert_eq!(got[&p].max(0), end, "{t} [{p}]: {got:?}");
        }
    }
}

#[test]
fn after_its_last_delay_an_event_is_dead_lettered_as_from_its_source_topic() {
    let cluster = cluster("pay", 1);
    for t in ["pay.retry.1s", "pay.dlq"] {
        cluster.create_topic(t, 1, 1).unwrap();
    }
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "pay", 1, N, |i| xzepr_event(i, "01SOMEONEELSE").1);
    let flaky_id = serde_json::from_slice::<Value>(&xzepr_event(FLAKY, "x").1).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let rt = runtime();
    let running = {
        let _enter = rt.enter();
        let flaky_id = flaky_id.clone();
        Pipeline::builder(KafkaConsumerConfig::new(&brokers, "pay", "lastdelay"))
            .runtime(rt.handle().clone())
            .commit_interval(Duration::from_millis(50))
            .retry(RetryPolicy::attempts(2).delay_topics([Duration::from_secs(1)]))
            .dead_letter(DeadLetterConfig::new())
            .start_async(move |m: CloudEventMessage, _info: WorkInfo| {
                let fail = m.id == flaky_id;
                async move {
                    if fail {
                        Err(HandlerError::with_code("still down", "PARTNER_DOWN"))
                    } else {
                        Ok(Value::Null)
                    }
                }
            })
            .unwrap()
    };
    wait_for(PATIENCE, "the event to be dead-lettered", || {
        running.metrics().dead_lettered == 1
    });
    wait_for(PATIENCE, "every offset to finish", || {
        running.metrics().finished > N
    });
    running.shutdown();
    running.join().unwrap();
    let m = running.metrics();
    assert_eq!((m.delayed, m.handler_failed, m.retried), (1, 1, 2), "{m:?}");

    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "dlq-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&["pay.dlq"]).unwrap();
    let mut letter = None;
    wait_for(PATIENCE, "the dead letter", || {
        if let Some(Ok(msg)) = c.poll(Duration::from_millis(100)) {
            let headers: HashMap<String, String> = header_texts(&msg).into_iter().collect();
            let id = serde_json::from_slice::<Value>(msg.payload().unwrap()).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned();
            letter = Some((id, headers));
        }
        letter.is_some()
    });
    let (id, headers) = letter.unwrap();
    assert_eq!(id, flaky_id);
    assert_eq!(headers[dead_letter_headers::TOPIC], "pay", "{headers:?}");
    assert_eq!(headers[dead_letter_headers::OFFSET], FLAKY.to_string());
    assert_eq!(headers[dead_letter_headers::ATTEMPTS], "4", "two per visit");
    assert_eq!(headers[dead_letter_headers::ERROR_CODE], "PARTNER_DOWN");
    assert!(
        !headers
            .keys()
            .any(|k| k.starts_with(delay_topic_headers::PREFIX)),
        "a dead letter carries no delay-topic headers (a redrive starts afresh): {headers:?}"
    );
    drop(c);
}

#[test]
fn delay_topics_need_named_source_topics_and_distinct_delays() {
    let rt = runtime();
    let _enter = rt.enter();
    let start = |topic: &str, policy: RetryPolicy| {
        Pipeline::builder(KafkaConsumerConfig::new("127.0.0.1:1", topic, "refused"))
            .runtime(rt.handle().clone())
            .retry(policy)
            .start_async(|_m: CloudEventMessage, _i: WorkInfo| async {
                Ok::<_, String>(Value::Null)
            })
            .map(std::mem::forget)
            .map_err(|e| e.to_string())
    };
    let one = RetryPolicy::none().delay_topics([Duration::from_secs(60)]);
    for (topic, policy) in [
        ("^orders.*", one.clone()),
        ("orders.retry.1m", one),
        (
            "orders",
            RetryPolicy::none().delay_topics([Duration::from_secs(60), Duration::from_secs(60)]),
        ),
        ("orders", RetryPolicy::none().delay_topics([Duration::ZERO])),
    ] {
        let err = start(topic, policy).unwrap_err();
        assert!(err.contains("retry.delay_topics"), "{topic}: {err}");
    }
}
