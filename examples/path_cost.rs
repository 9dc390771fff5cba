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
//!
//! What traces cost: build it without feature `otel`, then with it
//! (`--features dev-stack,otel`) and run it as above (the feature in, no
//! tracer installed, traces off), then with a third argument `traced` (a span
//! per event and step, exported over OTLP/HTTP to a local endpoint answering
//! at once, every span sampled):
//!
//! ```text
//! valgrind --tool=callgrind target/release/examples/path_cost async 8000 traced
//! ```
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
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
    let traced = args.get(3).is_some_and(|a| a == "traced");
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
    let exported = Arc::new(AtomicU64::new(0));
    let guard = traced.then(|| export_to_sink(&rt, Arc::clone(&exported)));
    let cfg = KafkaConsumerConfig::new(&brokers, "t", "bench").with_group_id("g");
    let t = Instant::now();
    let running = match mode.as_str() {
        "sync" => Pipeline::builder(cfg)
            .traces(traced)
            .workers(2)
            .start(|ev: &CloudEvent<'_>, _: &mut Work| -> Result<(), String> {
                std::hint::black_box(ev.event_type());
                Ok(())
            })
            .unwrap(),
        _ => Pipeline::builder(cfg)
            .traces(traced)
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
    if let Some(guard) = guard {
        // Its drop flushes what is still queued.
        #[allow(clippy::drop_non_drop, dropping_copy_types)]
        drop(guard);
        eprintln!("{} export requests", exported.load(Relaxed));
    }
}

/// Exports the spans to a local OTLP/HTTP endpoint that answers `200` at
/// once (served on `rt`), through the crate's `OTEL_*` set-up.
#[cfg(feature = "otel")]
fn export_to_sink(
    rt: &tokio::runtime::Runtime,
    requests: Arc<AtomicU64>,
) -> xzepr_consumer::trace::TraceGuard {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let requests = Arc::clone(&requests);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        requests.fetch_add(1, Relaxed);
                        async move {
                            use http_body_util::BodyExt;
                            let _ = req.into_body().collect().await;
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::new()),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    // Before any thread of the pipeline reads the environment.
    std::env::set_var(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        format!("http://{addr}/v1/traces"),
    );
    let guard = xzepr_consumer::trace::init_from_env()
        .unwrap()
        .expect("an endpoint is set");
    tracing_subscriber::registry().with(guard.layer()).init();
    guard
}

#[cfg(not(feature = "otel"))]
fn export_to_sink(_rt: &tokio::runtime::Runtime, _requests: Arc<AtomicU64>) {
    panic!("`traced` needs feature otel");
}
