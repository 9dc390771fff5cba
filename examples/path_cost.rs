//! The pipeline's cost per event in instructions, which do not depend on what
//! else the machine does: run it under callgrind at two sizes and divide the
//! difference by the difference in events (the fixed costs of starting, joining
//! the group and stopping cancel out).
//!
//! ```text
//! cargo build --release --features dev-stack --example path_cost
//! valgrind --tool=callgrind target/release/examples/path_cost async 8000
//! valgrind --tool=callgrind target/release/examples/path_cost async 24000
//! ```
//!
//! `sync`: a no-op closure on two workers; `async`: a handler that yields once,
//! 256 in flight, per key. Events are produced on 16 partitions of the mock
//! broker first (it keeps ~4,000 of these per partition).
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use std::time::{Duration, Instant};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::{CloudEvent, CloudEventMessage};
use xzepr_consumer::dispatch::Ordering;
use xzepr_consumer::handler::{Work, WorkInfo};
use xzepr_consumer::pipeline::Pipeline;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_else(|| "sync".into());
    let events: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    cluster.create_topic("t", 16, 1).unwrap();
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    for i in 0..events {
        let (key, payload) = xzepr_consumer::generate::xzepr_event(i, "01M82X4ET7AYGAEYSHF5AKVAVW");
        let mut rec = BaseRecord::to("t")
            .key(&key)
            .payload(&payload)
            .partition((i % 16) as i32);
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
    let cfg = KafkaConsumerConfig::new(&brokers, "t", "bench").with_group_id("g");
    let t = Instant::now();
    let running = match mode.as_str() {
        "sync" => Pipeline::builder(cfg)
            .workers(2)
            .start(|ev: &CloudEvent<'_>, _: &mut Work| -> Result<(), String> {
                std::hint::black_box(ev.event_type());
                Ok(())
            })
            .unwrap(),
        _ => Pipeline::builder(cfg)
            .ordering(Ordering::PerKey)
            .max_in_flight(256)
            .runtime(rt.handle().clone())
            .start_async(|_m: CloudEventMessage, _i: WorkInfo| async move {
                tokio::task::yield_now().await;
                Ok::<_, String>(serde_json::Value::Null)
            })
            .unwrap(),
    };
    while running.metrics().finished < events {
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("{mode} {events} in {:?}", t.elapsed());
    running.shutdown();
    let _ = running.join();
}
