//! A pipeline with an idempotency store whose lease is shorter than the time XZepr
//! takes to acknowledge the lifecycle posts (a stand-in that holds every answer
//! until told), and a duplicate of the same key arriving after the lease would have
//! run out: the duplicate must find the key busy, then processed, never run again.
//! Shared by the in-memory and the PostgreSQL variants.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::WorkInfo;
use xzepr_consumer::idempotency::{Begin, Error, IdempotencyMetrics, IdempotencyStore};
use xzepr_consumer::pipeline::{Pipeline, RunningPipeline, WorkTemplate};
use xzepr_consumer::report::{Reporter, ReporterConfig};

/// Generous bound for "eventually" on a loaded machine; never a timing assertion.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// An XZepr stand-in that answers nothing until [`Gate::open`].
pub struct Gate {
    pub url: String,
    /// Posts received (answered or not).
    pub received: Arc<AtomicU64>,
    open: watch::Sender<bool>,
}

impl Gate {
    pub async fn start() -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let received = Arc::new(AtomicU64::new(0));
        let (open, rx) = watch::channel(false);
        let r = Arc::clone(&received);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (r, rx) = (Arc::clone(&r), rx.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (r, mut rx) = (Arc::clone(&r), rx.clone());
                        async move {
                            let _ = req.into_body().collect().await;
                            let n = r.fetch_add(1, Relaxed);
                            let _ = rx.wait_for(|open| *open).await;
                            Ok::<_, std::io::Error>(Response::new(Full::new(Bytes::from(format!(
                                "{{\"data\":\"E{n}\"}}"
                            )))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Gate {
            url,
            received,
            open,
        }
    }

    /// Answers every held post, and every later one at once.
    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

/// A store that counts the `Busy` answers of the one it wraps.
#[derive(Debug)]
pub struct Counting<S> {
    pub inner: S,
    pub busy: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl<S: IdempotencyStore> IdempotencyStore for Counting<S> {
    async fn begin(&self, key: &str) -> Result<Begin, Error> {
        let answer = self.inner.begin(key).await?;
        if matches!(answer, Begin::Busy) {
            self.busy.fetch_add(1, Relaxed);
        }
        Ok(answer)
    }
    fn lease(&self) -> Duration {
        self.inner.lease()
    }
    fn metrics(&self) -> IdempotencyMetrics {
        self.inner.metrics()
    }
}

fn produce_one(brokers: &str, topic: &str, i: u64, key: &str) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let payload = xzepr_event(i, "01SOMEONEELSE").1;
    let kafka_key = format!("kafka-key-{i}");
    let headers = OwnedHeaders::new().insert(Header {
        key: "idempotency_key",
        value: Some(key),
    });
    let record = BaseRecord::to(topic)
        .key(&kafka_key)
        .payload(&payload)
        .partition(0)
        .headers(headers);
    producer.send(record).map_err(|(e, _)| e).unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
}

fn wait_for(what: &str, running: &RunningPipeline, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < PATIENCE,
            "gave up waiting for {what}: {:?}",
            running.metrics()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The scenario on `store` (lease `lease`), with `brokers` serving `topic`.
pub fn duplicate_after_the_lease_is_not_run_again<S: IdempotencyStore + 'static>(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    topic: &str,
    store: S,
    lease: Duration,
) {
    let xzepr = rt.block_on(Gate::start());
    let (reporter, task) = rt.block_on(async {
        let client = XzeprClient::new(XzeprClientConfig::new(xzepr.url.clone(), "tok")).unwrap();
        Reporter::start(client, ReporterConfig::default())
    });
    let busy = Arc::new(AtomicU64::new(0));
    let store = Counting {
        inner: store,
        busy: Arc::clone(&busy),
    };
    let calls = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&calls);
    let running = Pipeline::builder(KafkaConsumerConfig::new(brokers, topic, topic))
        .commit_interval(Duration::from_millis(50))
        .runtime(rt.handle().clone())
        .idempotency(store)
        .lifecycle(
            reporter,
            WorkTemplate::new("01MYRECEIVER", "deploy", "1.0.0", topic),
        )
        .start_async(move |_m: CloudEventMessage, _info: WorkInfo| {
            c.fetch_add(1, Relaxed);
            async { Ok::<_, String>(serde_json::Value::Null) }
        })
        .unwrap();

    produce_one(brokers, topic, 1, "order-7");
    wait_for(
        "the first run and its held `started` post",
        &running,
        || calls.load(Relaxed) == 1 && xzepr.received.load(Relaxed) >= 1,
    );
    // The posts stay unanswered past several leases: an unrenewed claim runs out.
    let held_since = Instant::now();
    wait_for("three leases to pass", &running, || {
        held_since.elapsed() > lease * 3
    });
    produce_one(brokers, topic, 2, "order-7");
    wait_for(
        "the duplicate to find the key busy (or run)",
        &running,
        || busy.load(Relaxed) >= 1 || calls.load(Relaxed) > 1,
    );
    assert_eq!(
        calls.load(Relaxed),
        1,
        "the duplicate ran the work again while the first run's posts were pending"
    );

    xzepr.open();
    wait_for("the duplicate to finish as one (or run)", &running, || {
        running.metrics().duplicates >= 1 || calls.load(Relaxed) > 1
    });
    wait_for("both offsets to finish", &running, || {
        running.metrics().finished >= 2
    });
    assert_eq!(calls.load(Relaxed), 1, "{:?}", running.metrics());
    let m = running.metrics();
    assert_eq!((m.handled, m.duplicates), (1, 1), "{m:?}");
    running.shutdown();
    running.join().unwrap();
    assert!(rt.block_on(task.drain(Duration::from_secs(30))));
}
