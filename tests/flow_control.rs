//! Adaptive concurrency against a real server on loopback whose latency and
//! answers change mid-test (devstack's `KneeServer`): the limit falls when it
//! answers 503 or slows down, and grows back once it is healthy, and no
//! record or event is lost on the way. Every wait has a bound; nothing here
//! asserts a timing.
#![cfg(feature = "dev-stack")]

mod kafka_support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use xzepr_consumer::client::{HttpTransport, TransportConfig, XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::devstack::KneeServer;
use xzepr_consumer::dispatch::Ordering;
use xzepr_consumer::flow_control::{Concurrency, Limiter};
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::{HandlerError, WorkInfo};
use xzepr_consumer::observe::MetricsFormat;
use xzepr_consumer::pipeline::{Pipeline, RetryPolicy, RunningPipeline};
use xzepr_consumer::report::{Ack, OwnedWork, Record, Reporter, ReporterConfig, Status};

/// Generous bound for "eventually" on a loaded machine; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(90);
/// The server's capacity: flat 5 ms up to 8 requests at once.
const KNEE: usize = 8;
const BASE: Duration = Duration::from_millis(5);
const ADAPTIVE: Concurrency = Concurrency::Adaptive { min: 1, max: 64 };

async fn eventually(what: &str, limit: impl Fn() -> usize, done: impl Fn(usize) -> bool) {
    let start = Instant::now();
    while !done(limit()) {
        assert!(
            start.elapsed() < PATIENCE,
            "gave up waiting for {what} (limit {})",
            limit()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Healthy, 503s, healthy, ten times slower, healthy: the limit seen to
/// fall and recover at each step.
async fn phases(knee: &KneeServer, limit: impl Fn() -> usize) {
    eventually("the limit to grow to the knee", &limit, |l| l >= KNEE).await;
    knee.force_status(Some(503));
    eventually("the limit to fall on 503s", &limit, |l| l <= 2).await;
    knee.force_status(None);
    eventually("the limit to recover after 503s", &limit, |l| l >= KNEE).await;
    knee.set_base(BASE * 10);
    eventually("the limit to fall on rising latency", &limit, |l| l <= 3).await;
    knee.set_base(BASE);
    eventually("the limit to recover after the slowdown", &limit, |l| {
        l >= KNEE
    })
    .await;
}

type Acks = Arc<Mutex<Vec<(String, Status, bool)>>>;

fn record(i: u64, status: Status, acks: &Acks) -> Record {
    let work_id = format!("w-{i}");
    let acks = Arc::clone(acks);
    let id = work_id.clone();
    Record {
        work: OwnedWork::new("R1", work_id, "deploy", "1.0.0", "linux", "svc"),
        status,
        details: json!({"i": i}),
        error: None,
        trace: None,
        ack: Ack::new(move |r| acks.lock().unwrap().push((id, status, r.is_ok()))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reporters_adaptive_limit_falls_and_recovers_and_every_record_is_acknowledged() {
    let knee = KneeServer::start(KNEE, BASE).await.unwrap();
    let mut cc = XzeprClientConfig::new(knee.url(), "tok");
    cc.pool_max_idle_per_host = 64;
    let client = XzeprClient::new(cc).unwrap();
    let mut config = ReporterConfig::default();
    config.concurrency = ADAPTIVE;
    // Retried until XZepr takes them, quickly, and the breaker kept shut: the
    // limit, not the breaker, is under test.
    config.max_attempts = u32::MAX;
    config.backoff_base = Duration::from_millis(1);
    config.backoff_max = Duration::from_millis(20);
    config.breaker_threshold = u32::MAX;
    let (reporter, task) = Reporter::start(client, config);
    let limiter: Limiter = reporter.limiter().clone();
    let acks: Acks = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let producer = tokio::spawn({
        let (reporter, acks, stop) = (reporter.clone(), Arc::clone(&acks), Arc::clone(&stop));
        async move {
            let mut i = 0;
            while !stop.load(Relaxed) {
                reporter
                    .send(record(i, Status::Started, &acks))
                    .await
                    .unwrap();
                reporter
                    .send(record(i, Status::Completed, &acks))
                    .await
                    .unwrap();
                i += 1;
            }
            i
        }
    });
    phases(&knee, || limiter.limit()).await;
    stop.store(true, Relaxed);
    let sent = producer.await.unwrap();
    drop(reporter);
    assert!(task.drain(PATIENCE).await, "the reporter drained");
    let acks = acks.lock().unwrap();
    assert_eq!(acks.len() as u64, 2 * sent, "one ack per record");
    assert!(
        acks.iter().all(|(_, _, ok)| *ok),
        "every record acknowledged by XZepr"
    );
    let distinct: HashSet<_> = acks.iter().map(|(w, s, _)| (w, *s)).collect();
    assert_eq!(distinct.len() as u64, 2 * sent);
    let s = knee.stats();
    assert!(s.ok.load(Relaxed) >= 2 * sent, "at least once");
    assert!(s.forced.load(Relaxed) > 0, "the 503s were seen");
    assert!(limiter.cuts() > 0);
}

/// POSTs the event to the server: 2xx done, 429/503 overloaded (with the
/// server's `Retry-After`), else an error.
async fn call(http: &HttpTransport, url: &str) -> Result<serde_json::Value, HandlerError> {
    let req = http::Request::post(url)
        .body(Bytes::from_static(b"{}"))
        .map_err(|e| HandlerError::new(e.to_string()))?;
    let resp = http
        .send(req)
        .await
        .map_err(|e| HandlerError::with_code(e.to_string(), "transport"))?;
    let status = resp.status().as_u16();
    match status {
        200..=299 => Ok(json!({"http_status": status})),
        429 | 503 => {
            let mut err = HandlerError::overloaded(format!("answered {status}"));
            let after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok());
            if let Some(s) = after {
                err = err.with_retry_after(Duration::from_secs(s));
            }
            Err(err)
        }
        _ => Err(HandlerError::with_code(
            format!("answered {status}"),
            "http_status",
        )),
    }
}

fn gauge(running: &RunningPipeline, name: &str) -> Option<usize> {
    let text = running.encode_metrics(MetricsFormat::PrometheusText);
    let line = format!("xzepr_consumer_concurrency_limit{{limit=\"{name}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn an_async_handlers_adaptive_limit_falls_and_recovers_and_every_event_is_handled() {
    const N: u64 = 16_000;
    let cluster = kafka_support::cluster("adaptive", 4);
    let brokers = cluster.bootstrap_servers();
    kafka_support::produce(&brokers, "adaptive", 4, N, |i| {
        xzepr_event(i, "01SOMEONE").1
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let knee = rt.block_on(KneeServer::start(KNEE, BASE)).unwrap();
    let url = knee.url();
    let http =
        HttpTransport::new(&TransportConfig::default().with_pool_max_idle_per_host(64)).unwrap();
    let done = Arc::new(Mutex::new(HashSet::new()));
    let calls = Arc::new(AtomicU64::new(0));
    let running = {
        let (done, calls) = (Arc::clone(&done), Arc::clone(&calls));
        let _entered = rt.enter();
        Pipeline::builder(KafkaConsumerConfig::new(&brokers, "adaptive", "adaptive"))
            .runtime(rt.handle().clone())
            .ordering(Ordering::Unordered)
            .concurrency(ADAPTIVE)
            .commit_interval(Duration::from_millis(100))
            .retry(
                RetryPolicy::attempts(u32::MAX)
                    .backoff(Duration::from_millis(1), Duration::from_millis(20)),
            )
            .start_async(move |_m: CloudEventMessage, info: WorkInfo| {
                let (http, url, done, calls) = (
                    http.clone(),
                    url.clone(),
                    Arc::clone(&done),
                    Arc::clone(&calls),
                );
                async move {
                    calls.fetch_add(1, Relaxed);
                    let ran = call(&http, &url).await;
                    if ran.is_ok() {
                        done.lock().unwrap().insert((info.partition, info.offset));
                    }
                    ran
                }
            })
            .unwrap()
    };
    rt.block_on(async {
        phases(&knee, || running.concurrency_limit("handler").unwrap_or(0)).await;
        assert!(gauge(&running, "handler").is_some(), "the gauge is exposed");
        eventually(
            "every event handled",
            || done.lock().unwrap().len(),
            |n| n as u64 == N,
        )
        .await;
    });
    let ends = kafka_support::end_offsets(&brokers, "adaptive", 4);
    kafka_support::wait_for(PATIENCE, "the commits to reach the end", || {
        kafka_support::committed(&brokers, "xzepr-consumer-adaptive", "adaptive", 4) == ends
    });
    running.shutdown();
    running.join().unwrap();
    let m = running.metrics();
    assert_eq!(m.handled, N, "each event handled once, to its end");
    assert!(calls.load(Relaxed) > N, "the 503s were retried");
}

#[test]
fn a_rate_limit_lets_a_backlog_through_at_its_rate_and_fails_nothing() {
    const N: u64 = 2_000;
    const RATE: f64 = 500.0;
    const BURST: u32 = 50;
    let cluster = kafka_support::cluster("rated", 2);
    let brokers = cluster.bootstrap_servers();
    kafka_support::produce(&brokers, "rated", 2, N, |i| xzepr_event(i, "01SOMEONE").1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Before the pipeline (and its bucket) exists: the bound below is loose
    // by the start-up, never tight.
    let began = Instant::now();
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "rated", "rated"))
        .runtime(rt.handle().clone())
        .ordering(Ordering::Unordered)
        .rate_limit(xzepr_consumer::flow_control::RateLimit::per_second(RATE).with_burst(BURST))
        .start_async(|_m: CloudEventMessage, _i: WorkInfo| async {
            Ok::<_, HandlerError>(json!({}))
        })
        .unwrap();
    let stats = running.source().stats();
    kafka_support::wait_for(PATIENCE, "every event handled", || {
        let granted = stats.rate_tokens_granted.load(Relaxed) as f64;
        let bound = f64::from(BURST) + RATE * began.elapsed().as_secs_f64();
        assert!(granted <= bound, "{granted} tokens, more than {bound}");
        running.metrics().handled == N
    });
    running.shutdown();
    running.join().unwrap();
    let m = running.metrics();
    assert_eq!((m.handled, m.handler_failed), (N, 0));
    assert_eq!(stats.rate_tokens_granted.load(Relaxed), N);
}
