//! Source-stage benchmark on librdkafka's mock cluster, in one run on the same
//! messages (~1 KB XZepr events): a bare `BaseConsumer` poll loop against the source
//! stage (poll thread, payload copy, queues, offset tracking, commits) with workers
//! that finish every message at once.
//!
//! `cargo bench --bench source --features dev-stack`
//!
//! Plain `main` rather than criterion: each sample is a whole consumer-group run
//! (join, drain, commit), which does not fit criterion's per-iteration model.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::source::{Source, SourceOptions};

const PARTITIONS: i32 = 8;
/// ~1 KB events; the mock keeps ~5 MB per partition, so 4,000 per partition.
const EVENTS: u64 = 32_000;
const ROUNDS: usize = 5;

fn produce(brokers: &str, topic: &str) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    for i in 0..EVENTS {
        let (key, payload) = xzepr_consumer::generate::xzepr_event(i, "01M82X4ET7AYGAEYSHF5AKVAVW");
        let mut rec = BaseRecord::to(topic)
            .key(&key)
            .payload(&payload)
            .partition((i % PARTITIONS as u64) as i32);
        while let Err((_, r)) = producer.send(rec) {
            rec = r;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
}

/// Messages per second of a bare poll loop, from the first message to the last.
fn bare(brokers: &str, topic: &str, group: &str) -> f64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    let (mut n, mut bytes, mut start) = (0u64, 0usize, None);
    while n < EVENTS {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            start.get_or_insert_with(Instant::now);
            bytes += m.payload().map_or(0, <[u8]>::len);
            n += 1;
        }
    }
    std::hint::black_box(bytes);
    n as f64 / start.map_or(1e-9, |s| s.elapsed().as_secs_f64())
}

/// Messages per second through the source stage with no-op workers.
fn staged(brokers: &str, topic: &str, group: &str) -> f64 {
    let config = KafkaConsumerConfig::new(brokers, topic, "bench").with_group_id(group);
    let mut source = Source::start(&config, SourceOptions::default()).expect("source");
    let first = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
    let rx = source.take_receiver().expect("receiver");
    // Two workers reading one job channel, as the pipeline's sync executor does.
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (rx, first) = (rx.clone(), std::sync::Arc::clone(&first));
            std::thread::spawn(move || {
                let mut n = 0u64;
                for batch in rx {
                    first.get_or_init(Instant::now);
                    for m in batch {
                        n += 1;
                        m.finish();
                    }
                }
                n
            })
        })
        .collect();
    drop(rx);
    let handle = source.handle();
    while handle
        .stats()
        .dispatched
        .load(std::sync::atomic::Ordering::Relaxed)
        < EVENTS
    {
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = first.get().map_or(1e-9, |s| s.elapsed().as_secs_f64());
    if std::env::var_os("XZEPR_BENCH_DEBUG").is_some() {
        eprintln!("{:.0}/s {:?}", EVENTS as f64 / elapsed, handle.stats());
    }
    handle.shutdown();
    handle.join().expect("join");
    let n: u64 = workers.into_iter().map(|w| w.join().expect("worker")).sum();
    assert!(n >= EVENTS);
    EVENTS as f64 / elapsed
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not used here.
    let cluster = MockCluster::new(1).expect("mock cluster");
    let brokers = cluster.bootstrap_servers();
    let (mut bare_rates, mut staged_rates) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // A fresh topic per round: the mock's retention would drop older messages.
        let topic = format!("bench-{round}");
        cluster.create_topic(&topic, PARTITIONS, 1).expect("topic");
        produce(&brokers, &topic);
        // Alternate the order so neither side always runs on a warmer broker.
        if round % 2 == 0 {
            bare_rates.push(bare(&brokers, &topic, &format!("bare-{round}")));
            staged_rates.push(staged(&brokers, &topic, &format!("staged-{round}")));
        } else {
            staged_rates.push(staged(&brokers, &topic, &format!("staged-{round}")));
            bare_rates.push(bare(&brokers, &topic, &format!("bare-{round}")));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (b, s) = (median(&mut bare_rates), median(&mut staged_rates));
    println!("source stage, {EVENTS} x ~1 KB events over {PARTITIONS} partitions, median of {ROUNDS} rounds");
    println!("| path | msgs/s |");
    println!("| --- | ---: |");
    println!("| bare BaseConsumer poll loop | {b:.0} |");
    println!("| source stage + tracker + commits, no-op finish | {s:.0} |");
    println!("| ratio | {:.2} |", s / b);
}
