//! Shared helpers for tests on librdkafka's in-process mock cluster.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

/// Waits until `done`, checking every 20 ms; fails the test, naming `what`,
/// after `patience` (a generous bound for a loaded machine, never a timing
/// assertion).
pub fn wait_for(patience: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < patience, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A message's headers as text, in order (a null value is empty).
pub fn header_texts(m: &impl rdkafka::message::Message) -> Vec<(String, String)> {
    use rdkafka::message::Headers;
    m.headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    let v = String::from_utf8_lossy(h.value.unwrap_or_default());
                    (h.key.to_owned(), v.into_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A mock cluster with one topic.
pub fn cluster(topic: &str, partitions: i32) -> MockCluster<'static, DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster
        .create_topic(topic, partitions, 1)
        .expect("create topic");
    cluster
}

/// Produces `n` messages round-robin over `partitions`, payload from `payload(i)`,
/// each keyed by its index.
pub fn produce(
    brokers: &str,
    topic: &str,
    partitions: i32,
    n: u64,
    payload: impl Fn(u64) -> Vec<u8>,
) {
    produce_keyed(brokers, topic, partitions, n, |i| i.to_string(), payload);
}

/// As [`produce`], with the key from `key(i)`.
pub fn produce_keyed(
    brokers: &str,
    topic: &str,
    partitions: i32,
    n: u64,
    key: impl Fn(u64) -> String,
    payload: impl Fn(u64) -> Vec<u8>,
) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "500000")
        .create()
        .expect("producer");
    for i in 0..n {
        let body = payload(i);
        let key = key(i);
        let partition = (i % partitions as u64) as i32;
        let mut record = BaseRecord::to(topic)
            .key(&key)
            .payload(&body)
            .partition(partition);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
}

/// High watermarks (end offsets) per partition.
pub fn end_offsets(brokers: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "watermarks")
        .create()
        .expect("consumer");
    (0..partitions)
        .map(|p| {
            let (_, high) = c
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            (p, high)
        })
        .collect()
}

/// The group's committed offsets per partition (-1 for none).
pub fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let out = {
        let got = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        let map = got
            .elements()
            .iter()
            .map(|e| {
                let o = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => -1,
                };
                (e.partition(), o)
            })
            .collect();
        drop(got);
        map
    };
    // The list is dropped before the consumer: otherwise its destroy hangs.
    drop(c);
    out
}

/// The group's committed offset and its metadata for one partition.
pub fn committed_with_metadata(
    brokers: &str,
    group: &str,
    topic: &str,
    partition: i32,
) -> (i64, String) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let out = {
        let got = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        let els = got.elements();
        let o = match els[0].offset() {
            Offset::Offset(o) => o,
            _ => -1,
        };
        let out = (o, els[0].metadata().to_owned());
        drop(els);
        drop(got);
        out
    };
    drop(c);
    out
}

/// Commits `offset` with `metadata` for `group` from outside it, as an admin
/// tool would (the mock broker takes that only from a group that never had a
/// member).
pub fn commit_with_metadata(
    brokers: &str,
    group: &str,
    topic: &str,
    partition: i32,
    offset: i64,
    metadata: &str,
) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .expect("offset");
    tpl.find_partition(topic, partition)
        .expect("partition")
        .set_metadata(metadata);
    c.commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        .expect("commit");
    drop(tpl);
    drop(c);
}

/// Resident memory of this process in KiB (Linux).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
