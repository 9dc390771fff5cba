//! The Kafka record each handler sees, on librdkafka's mock cluster: a sync
//! handler reads the key, the headers and the timestamp borrowed through
//! `Work`; an async one gets them owned in `WorkInfo`. Headers keep their
//! order, repeats and binary values.
#![cfg(feature = "dev-stack")]

mod kafka_support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::{CloudEvent, CloudEventMessage};
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::{Timestamp, Work, WorkInfo};
use xzepr_consumer::pipeline::Pipeline;

use kafka_support::*;

const N: u64 = 20;
const STAMP: i64 = 1_700_000_000_000;

/// `(key, headers, timestamp)` as a handler saw them, by offset.
type Seen = Arc<Mutex<HashMap<i64, (Option<Vec<u8>>, Vec<(String, Vec<u8>)>, Option<Timestamp>)>>>;

fn headers_of(i: u64) -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "ce_traceparent".into(),
            format!("00-{i:032x}-{i:016x}-01").into_bytes(),
        ),
        ("bin".into(), vec![0, 0xff, i as u8]),
        ("ce_traceparent".into(), b"repeated".to_vec()),
    ]
}

fn produce_records(brokers: &str, topic: &str) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for i in 0..N {
        let body = xzepr_event(i, "01SOMEONEELSE").1;
        let key = format!("key-{i}");
        let mut headers = OwnedHeaders::new();
        for (name, value) in headers_of(i) {
            headers = headers.insert(Header {
                key: &name,
                value: Some(&value),
            });
        }
        let record = BaseRecord::to(topic)
            .key(&key)
            .payload(&body)
            .partition(0)
            .headers(headers)
            .timestamp(STAMP + i as i64);
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

fn wait_for(seen: &Seen) {
    let start = Instant::now();
    while seen.lock().unwrap().len() < N as usize {
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "not every event seen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn check(seen: &Seen) {
    let seen = seen.lock().unwrap();
    for i in 0..N {
        let (key, headers, ts) = &seen[&(i as i64)];
        assert_eq!(key.as_deref(), Some(format!("key-{i}").as_bytes()));
        assert_eq!(
            headers,
            &headers_of(i),
            "offset {i}: order, repeats and bytes kept"
        );
        assert_eq!(*ts, Some(Timestamp::CreateTime(STAMP + i as i64)));
    }
}

#[test]
fn a_sync_handler_borrows_the_record_and_an_async_one_owns_it() {
    let cluster = cluster("records", 1);
    let brokers = cluster.bootstrap_servers();
    produce_records(&brokers, "records");

    let seen: Seen = Seen::default();
    let s = Arc::clone(&seen);
    let running = Pipeline::builder(
        KafkaConsumerConfig::new(&brokers, "records", "rec").with_group_id("sync"),
    )
    .workers(2)
    .start(
        move |_: &CloudEvent<'_>, work: &mut Work<'_>| -> Result<(), String> {
            let first = work.header("ce_traceparent").map(<[u8]>::to_vec);
            let headers: Vec<(String, Vec<u8>)> = work
                .headers()
                .map(|(k, v)| (k.to_owned(), v.to_vec()))
                .collect();
            assert_eq!(first.as_deref(), Some(headers[0].1.as_slice()));
            assert_eq!(
                work.info().headers,
                headers,
                "info() copies the same record"
            );
            s.lock().unwrap().insert(
                work.offset(),
                (work.key().map(<[u8]>::to_vec), headers, work.timestamp()),
            );
            Ok(())
        },
    )
    .unwrap();
    wait_for(&seen);
    running.shutdown();
    running.join().unwrap();
    check(&seen);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seen: Seen = Seen::default();
    let s = Arc::clone(&seen);
    let running = Pipeline::builder(
        KafkaConsumerConfig::new(&brokers, "records", "rec").with_group_id("async"),
    )
    .runtime(rt.handle().clone())
    .start_async(move |_: CloudEventMessage, info: WorkInfo| {
        let s = Arc::clone(&s);
        async move {
            assert_eq!(info.header("bin").map(<[u8]>::len), Some(3));
            s.lock()
                .unwrap()
                .insert(info.offset, (info.key, info.headers, info.timestamp));
            Ok::<_, String>(serde_json::Value::Null)
        }
    })
    .unwrap();
    wait_for(&seen);
    running.shutdown();
    running.join().unwrap();
    check(&seen);
}
