//! A dead-letter topic the consumer also reads would loop forever (each letter
//! consumed, failing again, dead-lettered again): the builder refuses it, naming
//! the field. And a message that already carries dead-letter headers (a letter
//! replayed to a source topic) gets one set on its next letter, not two.
#![cfg(feature = "dev-stack")]

mod kafka_support;

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::{HandlerError, WorkInfo};
use xzepr_consumer::pipeline::{dead_letter_headers, DeadLetterConfig, Pipeline, RetryPolicy};

/// Generous bound for "eventually" on a loaded machine; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(120);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Starts a pipeline on `topics` with `dlq`; the error's text if refused.
fn start_err(rt: &tokio::runtime::Runtime, topics: &[&str], dlq: DeadLetterConfig) -> String {
    let mut kafka = KafkaConsumerConfig::new("127.0.0.1:1", topics[0], "loop");
    for t in &topics[1..] {
        kafka = kafka.with_topic(t);
    }
    let _enter = rt.enter();
    match Pipeline::builder(kafka)
        .runtime(rt.handle().clone())
        .dead_letter(dlq)
        .start_async(|_m: CloudEventMessage, _i: WorkInfo| async {
            Ok::<_, String>(serde_json::Value::Null)
        }) {
        // Not expected here (the checks that pass are the unit tests'): left
        // running, as a shutdown against no broker would wait for one.
        Ok(running) => {
            std::mem::forget(running);
            "started".to_owned()
        }
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_dead_letter_topic_the_consumer_reads_is_refused() {
    let rt = runtime();
    let refused = [
        // The one dead-letter topic is subscribed by name.
        (
            vec!["orders", "orders.failed"],
            DeadLetterConfig::new().topic("orders.failed"),
        ),
        // ... or matched by a regex subscription.
        (
            vec!["^orders.*"],
            DeadLetterConfig::new().topic("orders.failed"),
        ),
        // The per-topic default (`orders.dlq`) is subscribed by name ...
        (vec!["orders", "orders.dlq"], DeadLetterConfig::new()),
        // ... or matched by a regex.
        (vec!["orders", "^.*\\.dlq$"], DeadLetterConfig::new()),
    ];
    for (topics, dlq) in refused {
        let err = start_err(&rt, &topics, dlq);
        assert!(
            err.contains("dead_letter.topic"),
            "{topics:?}: not refused naming the field: {err}"
        );
    }
}

/// Every header of the first record of `topic`, in order.
fn first_record_headers(brokers: &str, topic: &str) -> Vec<(String, String)> {
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
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < PATIENCE, "no dead letter in {topic}");
        let Some(m) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.unwrap();
        return m
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
    }
}

#[test]
fn a_dead_letter_of_a_dead_letter_carries_one_set_of_headers() {
    let cluster = kafka_support::cluster("redriven", 1);
    cluster.create_topic("redriven.dlq", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    // A letter moved back to its source topic (a redrive), failing again.
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let payload = xzepr_event(1, "01SOMEONEELSE").1;
    let mut h = OwnedHeaders::new();
    for (key, value) in [
        ("trace", "t-1"),
        (dead_letter_headers::REASON, "handler_failed"),
        (dead_letter_headers::ERROR, "the first failure"),
        (dead_letter_headers::OFFSET, "4711"),
        ("__connect.errors.offset", "4711"),
    ] {
        h = h.insert(Header {
            key,
            value: Some(value),
        });
    }
    producer
        .send(
            BaseRecord::to("redriven")
                .key("k")
                .payload(&payload)
                .partition(0)
                .headers(h),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();

    let rt = runtime();
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "redriven", "redriven"))
        .commit_interval(Duration::from_millis(50))
        .runtime(rt.handle().clone())
        .retry(RetryPolicy::none())
        .dead_letter(DeadLetterConfig::new())
        .start_async(|_m: CloudEventMessage, _i: WorkInfo| async {
            Err::<serde_json::Value, _>(HandlerError::new("the second failure"))
        })
        .unwrap();
    let start = Instant::now();
    while running.metrics().finished < 1 {
        assert!(start.elapsed() < PATIENCE, "{:?}", running.metrics());
        std::thread::sleep(Duration::from_millis(10));
    }
    running.shutdown();
    running.join().unwrap();
    assert_eq!(running.metrics().dead_lettered, 1);

    let headers = first_record_headers(&brokers, "redriven.dlq");
    let count = |key: &str| headers.iter().filter(|(k, _)| k == key).count();
    let value = |key: &str| {
        headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    for key in [
        dead_letter_headers::REASON,
        dead_letter_headers::ERROR,
        dead_letter_headers::OFFSET,
        dead_letter_headers::TOPIC,
        "__connect.errors.offset",
    ] {
        assert_eq!(count(key), 1, "{key} in {headers:?}");
    }
    // The set is this letter's own; the producer's headers are kept.
    assert_eq!(
        value(dead_letter_headers::ERROR),
        Some("the second failure")
    );
    assert_eq!(value(dead_letter_headers::OFFSET), Some("0"));
    assert_eq!(value("__connect.errors.offset"), Some("0"));
    assert_eq!(value("trace"), Some("t-1"));
}
