//! Redrive after a fix, on librdkafka's mock cluster: dead letters written by
//! the pipeline itself (a failing handler, malformed messages) and by hand (a
//! rejected post, whose letters need an XZepr refusing posts), one reason
//! redriven and seen by the handler again with its key and headers, a letter
//! redriven too often refused, and a produce the broker refuses leaving its
//! letter uncommitted.
#![cfg(feature = "dev-stack")]

mod kafka_support;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaApiKey;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::{HandlerError, WorkInfo};
use xzepr_consumer::pipeline::{
    dead_letter_headers, DeadLetterConfig, MalformedPolicy, Pipeline, Redrive, RedriveError,
    RetryPolicy, REDRIVE_COUNT_HEADER,
};

use kafka_support::*;

/// Generous bound for "eventually" on a loaded machine; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(120);

/// One record as read back: key, headers, payload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    partition: i32,
    offset: i64,
    key: Option<String>,
    headers: Vec<(String, String)>,
    payload: Vec<u8>,
}

/// Every record of `topic` from `from` per partition up to the end now.
fn read_all(brokers: &str, topic: &str, from: &BTreeMap<i32, i64>) -> Vec<Record> {
    let ends = end_offsets(brokers, topic, from.len() as i32);
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "redrive-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for (&p, &o) in from {
        tpl.add_partition_offset(topic, p, Offset::Offset(o))
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    drop(tpl);
    let want: usize = from.iter().map(|(p, o)| (ends[p] - o) as usize).sum();
    let mut out = Vec::new();
    let start = Instant::now();
    while out.len() < want {
        assert!(start.elapsed() < PATIENCE, "read {} of {want}", out.len());
        let Some(m) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.unwrap();
        let headers = header_texts(&m);
        out.push(Record {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            payload: m.payload().unwrap_or_default().to_vec(),
        });
    }
    drop(c);
    out
}

fn header<'a>(r: &'a Record, key: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn producer(brokers: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap()
}

fn send(
    p: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    partition: i32,
    key: &str,
    payload: &[u8],
    headers: &[(&str, &str)],
) {
    let mut h = OwnedHeaders::new();
    for (key, value) in headers {
        h = h.insert(Header {
            key,
            value: Some(*value),
        });
    }
    let record = BaseRecord::to(topic)
        .key(key)
        .payload(payload)
        .partition(partition)
        .headers(h);
    p.send(record).map_err(|(e, _)| e).unwrap();
}

/// Runs a pipeline on `topic` until `n` events finished; the handler fails
/// the events whose id is in `fail`, and records every event id it is given.
fn run_pipeline(
    brokers: &str,
    topic: &str,
    n: u64,
    fail: &HashSet<String>,
) -> BTreeMap<String, (i32, i64)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seen: Arc<Mutex<BTreeMap<String, (i32, i64)>>> = Arc::default();
    let (fail, record) = (Arc::new(fail.clone()), Arc::clone(&seen));
    let running = Pipeline::builder(KafkaConsumerConfig::new(brokers, topic, "redrive-test"))
        .commit_interval(Duration::from_millis(50))
        .runtime(rt.handle().clone())
        .retry(RetryPolicy::none())
        .malformed(MalformedPolicy::DeadLetter)
        .dead_letter(DeadLetterConfig::new())
        .start_async(move |m: CloudEventMessage, i: WorkInfo| {
            let failing = fail.contains(&m.id);
            record
                .lock()
                .unwrap()
                .insert(m.id.clone(), (i.partition, i.offset));
            async move {
                if failing {
                    Err(HandlerError::new("downstream bug"))
                } else {
                    Ok(serde_json::Value::Null)
                }
            }
        })
        .unwrap();
    wait_for(PATIENCE, "the events to finish", || {
        running.metrics().finished >= n
    });
    running.shutdown();
    running.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    seen
}

#[test]
fn redriving_one_reason_brings_exactly_those_events_back_with_key_and_headers() {
    let cluster = cluster("orders", 2);
    cluster.create_topic("orders.dlq", 2, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let p = producer(&brokers);
    // Twelve messages: every third malformed, every third failing the handler.
    let mut fail = HashSet::new();
    let mut ids = BTreeMap::new();
    for i in 0..12u64 {
        let (key, trace) = (format!("k{i}"), format!("t-{i}"));
        let (id, payload) = match i % 3 {
            2 => (String::new(), b"{not json".to_vec()),
            _ => xzepr_event(i, "01SOMEONEELSE"),
        };
        if i % 3 == 0 {
            fail.insert(id.clone());
        }
        if !id.is_empty() {
            ids.insert(id.clone(), (key.clone(), trace.clone()));
        }
        send(
            &p,
            "orders",
            (i % 2) as i32,
            &key,
            &payload,
            &[("trace", &trace)],
        );
    }
    // Two letters of a post XZepr rejected, as the dead-letter stage writes them.
    for i in 12..14u64 {
        let (_, payload) = xzepr_event(i, "01SOMEONEELSE");
        send(
            &p,
            "orders.dlq",
            0,
            &format!("k{i}"),
            &payload,
            &[
                (dead_letter_headers::REASON, "report_rejected"),
                (dead_letter_headers::TOPIC, "orders"),
                (dead_letter_headers::PARTITION, "0"),
                (dead_letter_headers::OFFSET, "999"),
            ],
        );
    }
    p.flush(Duration::from_secs(30)).unwrap();
    let first = run_pipeline(&brokers, "orders", 12, &fail);
    assert_eq!(first.len(), 8, "the well-formed events ran once");
    let before: BTreeMap<i32, i64> = end_offsets(&brokers, "orders", 2).into_iter().collect();
    assert_eq!(before.values().sum::<i64>(), 12);

    let kafka = KafkaConsumerConfig::new(&brokers, "orders", "ops");
    let plan = Redrive::new("orders.dlq")
        .reason("handler")
        .unwrap()
        .dry_run(true)
        .run(&kafka)
        .unwrap();
    assert_eq!(
        plan.moved,
        BTreeMap::from([("handler_failed".to_owned(), 4)])
    );
    assert_eq!(
        end_offsets(&brokers, "orders", 2)
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        before,
        "a dry run produces nothing"
    );
    let report = Redrive::new("orders.dlq")
        .reason("handler")
        .unwrap()
        .run(&kafka)
        .unwrap();
    assert_eq!(
        report.moved,
        BTreeMap::from([("handler_failed".to_owned(), 4)])
    );
    assert_eq!(report.skipped, 4 + 2, "the malformed and rejected letters");
    assert!(report.to_string().contains("handler_failed: 4"), "{report}");
    // Run again: its group is past every letter, so nothing moves twice.
    let again = Redrive::new("orders.dlq")
        .reason("handler")
        .unwrap()
        .run(&kafka)
        .unwrap();
    assert!(again.moved.is_empty(), "{again}");

    // The fixed handler sees exactly the events that had failed.
    let second = run_pipeline(&brokers, "orders", 4, &HashSet::new());
    let seen: BTreeSet<&String> = second.keys().collect();
    assert_eq!(seen, fail.iter().collect::<BTreeSet<_>>());
    let redriven = read_all(&brokers, "orders", &before);
    assert_eq!(redriven.len(), 4);
    for r in &redriven {
        let id = second
            .iter()
            .find(|(_, at)| **at == (r.partition, r.offset))
            .map(|(id, _)| id)
            .unwrap();
        let (key, trace) = &ids[id];
        assert_eq!(r.key.as_ref(), Some(key), "the original key");
        assert_eq!(
            header(r, "trace"),
            Some(trace.as_str()),
            "the original headers"
        );
        assert_eq!(header(r, REDRIVE_COUNT_HEADER), Some("1"));
        assert!(
            !r.headers
                .iter()
                .any(|(k, _)| k.starts_with("xzepr.dlq.") || k.starts_with("__connect.errors.")),
            "no dead-letter headers: {:?}",
            r.headers
        );
    }

    // The other reasons are still there for their own redrive.
    let rest = Redrive::new("orders.dlq")
        .reason("malformed")
        .unwrap()
        .run(&kafka)
        .unwrap();
    assert_eq!(rest.moved, BTreeMap::from([("malformed".to_owned(), 4)]));
    let e = Redrive::new("orders.dlq").reason("sideways").unwrap_err();
    assert!(e.to_string().contains("reason"), "{e}");
}

#[test]
fn a_letter_redriven_past_the_limit_is_refused() {
    let cluster = cluster("loops", 1);
    cluster.create_topic("loops.dlq", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let p = producer(&brokers);
    let (id, payload) = xzepr_event(1, "01SOMEONEELSE");
    send(&p, "loops", 0, "k", &payload, &[("trace", "t")]);
    p.flush(Duration::from_secs(30)).unwrap();
    let still_broken = HashSet::from([id]);
    let kafka = KafkaConsumerConfig::new(&brokers, "loops", "ops");
    let redrive = || {
        Redrive::new("loops.dlq")
            .max_redrives(1)
            .run(&kafka)
            .unwrap()
    };

    run_pipeline(&brokers, "loops", 1, &still_broken);
    assert_eq!(redrive().moved.values().sum::<u64>(), 1);
    // The redriven event fails again: its new letter says it was redriven once.
    run_pipeline(&brokers, "loops", 1, &still_broken);
    let letters = read_all(&brokers, "loops.dlq", &BTreeMap::from([(0, 0)]));
    assert_eq!(letters.len(), 2);
    assert_eq!(header(&letters[1], REDRIVE_COUNT_HEADER), Some("1"));
    let refused = redrive();
    assert!(refused.moved.is_empty(), "{refused}");
    assert_eq!(refused.refused, vec![(0, 1)]);
    assert_eq!(
        end_offsets(&brokers, "loops", 1)[&0],
        2,
        "not produced again"
    );
}

#[test]
fn a_produce_the_broker_refuses_leaves_its_letter_uncommitted() {
    let cluster = cluster("refused", 1);
    cluster.create_topic("refused.dlq", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let p = producer(&brokers);
    for i in 0..2u64 {
        let (_, payload) = xzepr_event(i, "01SOMEONEELSE");
        send(
            &p,
            "refused.dlq",
            0,
            &format!("k{i}"),
            &payload,
            &[
                (dead_letter_headers::REASON, "handler_failed"),
                (dead_letter_headers::TOPIC, "refused"),
                (dead_letter_headers::PARTITION, "0"),
            ],
        );
    }
    p.flush(Duration::from_secs(30)).unwrap();
    drop(p);
    let kafka = KafkaConsumerConfig::new(&brokers, "refused", "ops");
    let group = Redrive::new("refused.dlq").group_id();
    // The broker refuses every produce, as it does a client without rights
    // to write the topic (not retriable).
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 32],
    );
    let e = Redrive::new("refused.dlq")
        .message_timeout(Duration::from_secs(5))
        .run(&kafka)
        .unwrap_err();
    assert!(
        matches!(
            e,
            RedriveError::Produce {
                partition: 0,
                offset: 0,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        committed(&brokers, &group, "refused.dlq", 1)[&0],
        -1,
        "uncommitted"
    );
    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    let report = Redrive::new("refused.dlq").run(&kafka).unwrap();
    assert_eq!(
        report.moved.values().sum::<u64>(),
        2,
        "the next run redrives them"
    );
    assert_eq!(committed(&brokers, &group, "refused.dlq", 1)[&0], 2);
}
