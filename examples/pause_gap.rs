//! The longest time a consumer takes nothing while work is left, across the
//! pauses the buffer budget makes: N events on P partitions of the mock broker,
//! an async handler that waits W ms each, 256 in flight, so the poll thread
//! reads faster than the handlers finish and the budget pauses partitions.
//!
//! ```text
//! cargo run --release --features dev-stack --example pause_gap -- 8 20000 10
//! ```
//!
//! Prints the events/s, the longest gap with nothing taken and the pauses.
//! When every partition of a broker is paused at once, librdkafka's thread for
//! that broker sleeps on its socket (up to a second), and a resume alone does
//! not wake it; the source seeks each resumed partition to its next offset,
//! which does. Extra arguments `name=value` are librdkafka properties.
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::dispatch::Ordering;
use xzepr_consumer::handler::WorkInfo;
use xzepr_consumer::pipeline::Pipeline;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: u64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (partitions, events, wait_ms) = (arg(1, 8) as i32, arg(2, 20_000), arg(3, 10));
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    cluster.create_topic("t", partitions, 1).unwrap();
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    for i in 0..events {
        let (key, payload) = xzepr_consumer::generate::xzepr_event(i, "01M82X4ET7AYGAEYSHF5AKVAVW");
        let mut rec = BaseRecord::to("t").key(&key).payload(&payload);
        while let Err((_, r)) = producer.send(rec) {
            rec = r;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = KafkaConsumerConfig::new(&brokers, "t", "bench").with_group_id("g");
    for kv in args.iter().skip(4) {
        let (k, v) = kv.split_once('=').expect("name=value");
        cfg = cfg.set(k, v);
    }
    let running = Pipeline::builder(cfg)
        .ordering(Ordering::PerKey)
        .max_in_flight(256)
        .runtime(rt.handle().clone())
        .start_async(move |_: CloudEventMessage, _: WorkInfo| async move {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            Ok::<_, String>(serde_json::Value::Null)
        })
        .unwrap();
    while running.metrics().consumed == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let start = Instant::now();
    let (mut last, mut since, mut worst) = (0, Instant::now(), Duration::ZERO);
    while running.metrics().finished < events {
        let consumed = running.metrics().consumed;
        if consumed != last {
            worst = worst.max(since.elapsed());
            (last, since) = (consumed, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let elapsed = start.elapsed();
    let stats = running.source().stats();
    println!(
        "{partitions} partitions, {events} events in {elapsed:.2?} ({:.0}/s); longest with nothing taken {worst:.1?}; {} pauses, {} resumes",
        events as f64 / elapsed.as_secs_f64(),
        stats.pauses.load(Relaxed),
        stats.resumes.load(Relaxed)
    );
    running.shutdown();
    let _ = running.join();
}
