//! The metrics and health endpoint on librdkafka's mock cluster: `/metrics`
//! scraped over HTTP and read with a Prometheus text parser, checked against
//! what the test produced, handled and failed; `/ready` following the
//! assignment, a broker taken down and brought back, and XZepr's breaker.
#![cfg(feature = "dev-stack")]

mod kafka_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use prometheus_parse::{Scrape, Value};
use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEvent;
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::Work;
use xzepr_consumer::observe::MetricsFormat;
use xzepr_consumer::pipeline::{MalformedPolicy, Pipeline, PipelineError, WorkTemplate};
use xzepr_consumer::report::{Reporter, ReporterConfig};

use kafka_support::*;

/// Generous bound for "eventually" on a loaded CI machine; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(240);

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < PATIENCE, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// One HTTP/1.1 GET, the connection closed after it: `(status, content type, body)`.
fn get(addr: SocketAddr, path: &str, accept: &str) -> std::io::Result<(u16, String, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    Ok((status, content_type, body.to_owned()))
}

/// Scrapes `/metrics` as Prometheus does without OpenMetrics, and parses it.
fn scrape(addr: SocketAddr) -> Scrape {
    let (status, content_type, body) = get(addr, "/metrics", "text/plain").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("valid exposition")
}

/// The value of the sample `name` whose labels include `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name} is not a single value: {other:?}"),
        })
}

fn counter(scrape: &Scrape, name: &str) -> u64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .unwrap_or_else(|| panic!("no {name}"));
    match sample.value {
        Value::Counter(v) => v as u64,
        ref other => panic!("{name} is not a counter: {other:?}"),
    }
}

/// The test's XZepr stand-in: answers every post, or fails every one while
/// `failing` is set.
struct StandIn {
    url: String,
    failing: Arc<AtomicBool>,
}

async fn stand_in() -> StandIn {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let failing = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&failing);
    tokio::spawn(async move {
        let n = Arc::new(AtomicU64::new(0));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (f, n) = (Arc::clone(&f), Arc::clone(&n));
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (f, n) = (Arc::clone(&f), Arc::clone(&n));
                    async move {
                        let _ = req.into_body().collect().await;
                        let i = n.fetch_add(1, Relaxed);
                        let response = if f.load(Relaxed) {
                            Response::builder()
                                .status(500)
                                .body(Full::new(Bytes::from_static(b"{\"error\":\"down\"}")))
                                .unwrap()
                        } else {
                            Response::new(Full::new(Bytes::from(format!("{{\"data\":\"E{i}\"}}"))))
                        };
                        Ok::<_, std::io::Error>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    StandIn { url, failing }
}

fn reporter(rt: &tokio::runtime::Runtime, url: &str, config: ReporterConfig) -> Reporter {
    let _guard = rt.enter();
    let client = XzeprClient::new(XzeprClientConfig::new(url, "tok")).unwrap();
    let (reporter, task) = Reporter::start(client, config);
    drop(task); // the posting tasks run on `rt` on their own
    reporter
}

#[test]
fn scraped_counters_equal_the_work_done_and_lag_reaches_zero() {
    const N: u64 = 600;
    const MALFORMED: u64 = 25;
    const PARTITIONS: i32 = 3;
    let cluster = cluster("observed", PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "observed", PARTITIONS, N, |i| {
        xzepr_event(i, "01SOMEONEELSE").1
    });
    produce(&brokers, "observed", PARTITIONS, MALFORMED, |_| {
        b"{not a cloudevent".to_vec()
    });
    let ends = end_offsets(&brokers, "observed", PARTITIONS);
    assert_eq!(ends.values().sum::<i64>() as u64, N + MALFORMED);

    let rt = runtime();
    let standin = rt.block_on(stand_in());
    let mut config = ReporterConfig::default();
    config.backoff_base = Duration::from_millis(1);
    let reporter = reporter(&rt, &standin.url, config);

    // The handler fails every 7th event it sees, and counts what it did.
    let seen = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (s, f) = (Arc::clone(&seen), Arc::clone(&failed));
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "observed", "obs"))
        .workers(2)
        .commit_interval(Duration::from_millis(100))
        .malformed(MalformedPolicy::Skip)
        .metrics_addr("127.0.0.1:0".parse().unwrap())
        .lifecycle(
            reporter,
            WorkTemplate::new("01MYRECEIVER", "observe", "1.0.0", "obs"),
        )
        .start(
            move |_: &CloudEvent<'_>, _: &mut Work| -> Result<(), String> {
                if s.fetch_add(1, Relaxed) % 7 == 0 {
                    f.fetch_add(1, Relaxed);
                    return Err("every seventh".into());
                }
                Ok(())
            },
        )
        .unwrap();
    let addr = running.metrics_addr().expect("the endpoint is bound");
    assert_ne!(addr.port(), 0);

    // Every offset finished, then every partition's lag down to 0 at its end.
    wait_for("every offset finished", || {
        counter(&scrape(addr), "xzepr_consumer_offsets_finished_total") == N + MALFORMED
    });
    let mut last = None;
    wait_for("lag 0 on every partition", || {
        let s = scrape(addr);
        let done = (0..PARTITIONS).all(|p| {
            let p_s = p.to_string();
            let labels = [("topic", "observed"), ("partition", p_s.as_str())];
            value(&s, "xzepr_consumer_partition_lag", &labels) == Some(0.0)
                && value(&s, "xzepr_consumer_partition_committed_offset", &labels)
                    == Some(ends[&p] as f64)
                && value(&s, "xzepr_consumer_partition_high_watermark", &labels)
                    == Some(ends[&p] as f64)
        });
        last = Some(s);
        done
    });
    let s = last.unwrap();

    let handled = seen.load(Relaxed);
    let failures = failed.load(Relaxed);
    assert_eq!(handled, N);
    assert!(failures > 0);
    assert_eq!(
        counter(&s, "xzepr_consumer_messages_polled_total"),
        N + MALFORMED
    );
    assert_eq!(
        counter(&s, "xzepr_consumer_messages_consumed_total"),
        N + MALFORMED
    );
    assert_eq!(
        counter(&s, "xzepr_consumer_messages_malformed_total"),
        MALFORMED
    );
    assert_eq!(
        counter(&s, "xzepr_consumer_messages_handled_total"),
        handled
    );
    assert_eq!(
        counter(&s, "xzepr_consumer_messages_failed_total"),
        failures
    );
    assert_eq!(counter(&s, "xzepr_consumer_messages_filtered_total"), 0);
    assert_eq!(counter(&s, "xzepr_consumer_messages_duplicate_total"), 0);
    assert_eq!(counter(&s, "xzepr_consumer_handler_retries_total"), 0);
    assert_eq!(
        counter(&s, "xzepr_consumer_messages_dead_lettered_total"),
        0
    );
    let posts = |status: &str, outcome: &str| {
        value(
            &s,
            "xzepr_consumer_lifecycle_posts_total",
            &[("status", status), ("outcome", outcome)],
        )
        .map(|v| v as u64)
    };
    assert_eq!(posts("started", "acknowledged"), Some(N));
    assert_eq!(posts("completed", "acknowledged"), Some(N - failures));
    assert_eq!(posts("failed", "acknowledged"), Some(failures));
    assert_eq!(posts("failed", "failed"), Some(0));
    assert_eq!(
        value(&s, "xzepr_consumer_assigned_partitions", &[]),
        Some(f64::from(PARTITIONS))
    );
    assert_eq!(value(&s, "xzepr_consumer_in_flight_jobs", &[]), Some(0.0));
    assert_eq!(
        value(&s, "xzepr_consumer_reporter_breaker_open", &[]),
        Some(0.0)
    );
    assert_eq!(value(&s, "xzepr_consumer_ready", &[]), Some(1.0));

    // The handler-duration histogram saw every call, in increasing buckets.
    let histogram = s
        .samples
        .iter()
        .find(|x| x.metric == "xzepr_consumer_handler_duration_seconds")
        .expect("the handler histogram");
    let Value::Histogram(buckets) = &histogram.value else {
        panic!("not a histogram: {histogram:?}");
    };
    let inf = buckets.iter().find(|b| b.less_than.is_infinite()).unwrap();
    assert_eq!(inf.count as u64, N);
    assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count));
    assert_eq!(
        value(&s, "xzepr_consumer_handler_duration_seconds_count", &[]),
        Some(N as f64)
    );

    // The same figures without the server, and as OpenMetrics.
    let open = running.encode_metrics(MetricsFormat::OpenMetrics);
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(open.contains(&format!("xzepr_consumer_messages_handled_total {N}\n")));
    let (_, content_type, body) = get(
        addr,
        "/metrics",
        "application/openmetrics-text;version=1.0.0",
    )
    .unwrap();
    assert!(content_type.starts_with("application/openmetrics-text"));
    assert!(body.contains("# TYPE xzepr_consumer_messages_handled counter\n"));

    running.shutdown();
    running.join().unwrap();
    assert_eq!(running.metrics_addr(), None);
    assert!(
        get(addr, "/health", "*/*").is_err(),
        "the endpoint stops with the pipeline"
    );
    assert_eq!(
        committed(&brokers, "xzepr-consumer-obs", "observed", PARTITIONS),
        ends
    );
}

/// `/ready`'s status and the health facts it answers with.
fn ready(addr: SocketAddr) -> (u16, serde_json::Value) {
    let (status, _, body) = get(addr, "/ready", "*/*").unwrap();
    (status, serde_json::from_str(&body).unwrap())
}

#[test]
fn ready_follows_the_assignment_the_broker_and_the_breaker() {
    let cluster = cluster("health", 2);
    let brokers = cluster.bootstrap_servers();
    let rt = runtime();
    let standin = rt.block_on(stand_in());
    let mut config = ReporterConfig::default();
    config.backoff_base = Duration::from_millis(1);
    config.backoff_max = Duration::from_millis(50);
    config.max_attempts = 1_000_000; // posts wait out the outage rather than fail
    config.breaker_threshold = 3;
    config.breaker_cooldown = Duration::from_millis(200);
    let reporter = reporter(&rt, &standin.url, config);

    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "health", "hc"))
        .workers(1)
        .metrics_addr("127.0.0.1:0".parse().unwrap())
        .lifecycle(
            reporter,
            WorkTemplate::new("01MYRECEIVER", "check", "1.0.0", "hc"),
        )
        .start(|_: &CloudEvent<'_>, _: &mut Work| -> Result<(), String> { Ok(()) })
        .unwrap();
    let addr = running.metrics_addr().unwrap();

    // Ready once the group is joined and the partitions assigned.
    wait_for("ready after the assignment", || ready(addr).0 == 200);
    let (_, facts) = ready(addr);
    assert_eq!(facts["assigned_partitions"], 2, "{facts}");
    assert_eq!(facts["broker_reachable"], true, "{facts}");
    let h = running.health();
    assert!(
        h.alive && h.ready && h.group_joined && !h.breaker_open,
        "{h:?}"
    );

    assert_eq!(get(addr, "/nowhere", "*/*").unwrap().0, 404);

    // The only broker down: alive, not ready; back up: ready again.
    cluster.broker_down(1).unwrap();
    wait_for("not ready without a broker", || {
        let (status, facts) = ready(addr);
        status == 503 && facts["broker_reachable"] == false
    });
    assert!(!running.health().ready);
    assert_eq!(get(addr, "/health", "*/*").unwrap().0, 200);
    cluster.broker_up(1).unwrap();
    wait_for("ready with the broker back", || ready(addr).0 == 200);

    // XZepr failing every post: the breaker opens, not ready; answering
    // again: the next probe closes it, ready.
    standin.failing.store(true, Relaxed);
    produce(&brokers, "health", 2, 20, |i| {
        xzepr_event(i, "01SOMEONEELSE").1
    });
    wait_for("not ready with the breaker open", || {
        let (status, facts) = ready(addr);
        status == 503 && facts["breaker_open"] == true
    });
    assert!(running.health().breaker_open);
    assert_eq!(
        value(&scrape(addr), "xzepr_consumer_reporter_breaker_open", &[]),
        Some(1.0)
    );
    standin.failing.store(false, Relaxed);
    wait_for("ready with the breaker closed", || ready(addr).0 == 200);
    wait_for("every event finished", || running.metrics().finished == 20);

    // Stopping: not ready at once, and the endpoint goes with the pipeline.
    running.shutdown();
    let h = running.health();
    assert!(h.stopping && !h.ready, "{h:?}");
    running.join().unwrap();
    assert!(get(addr, "/ready", "*/*").is_err());
}

#[test]
fn a_taken_metrics_address_fails_the_start_before_anything_runs() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    // No broker: the start must fail on the address before it would need one.
    let result = Pipeline::builder(KafkaConsumerConfig::new("127.0.0.1:1", "t", "taken"))
        .workers(1)
        .metrics_addr(addr)
        .start(|_: &CloudEvent<'_>, _: &mut Work| -> Result<(), String> { Ok(()) });
    match result {
        Err(xzepr_consumer::Error::Pipeline(PipelineError::MetricsBind { addr: at, .. })) => {
            assert_eq!(at, addr)
        }
        other => panic!("expected MetricsBind, got {other:?}"),
    }
}
