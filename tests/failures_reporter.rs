//! The lifecycle reporter against an XZepr that refuses it: a stand-in on
//! 127.0.0.1:0 answering 401 to every event post, a mock Kafka cluster, and the
//! whole pipeline. The refusal must show (readiness, a metric), hold
//! consumption back, keep the posts few, let shutdown and drain finish, and
//! lose nothing once XZepr accepts the posts again.
#![cfg(feature = "dev-stack")]

mod kafka_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEvent;
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::Work;
use xzepr_consumer::observe::MetricsFormat;
use xzepr_consumer::pipeline::{Pipeline, RunningPipeline, WorkTemplate};
use xzepr_consumer::report::{
    Ack, OwnReceivers, OwnedWork, Record, Reporter, ReporterConfig, ReporterTask, Status,
};

use kafka_support::*;

/// What the stand-in answers a request: status and JSON body.
type Answer = (u16, String);
type Handler = Arc<dyn Fn(&str, &str, &Value) -> Answer + Send + Sync>;

/// Serves `handler(method, path, body)` on 127.0.0.1:0; returns the base URL.
async fn serve(handler: Handler) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let handler = Arc::clone(&handler);
                    async move {
                        let method = req.method().to_string();
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await?.to_bytes();
                        let body: Value = serde_json::from_slice(&body).unwrap_or_default();
                        let (status, answer) = handler(&method, &path, &body);
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(answer)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    url
}

/// An XZepr events endpoint that answers 401 while `refuse` is set.
#[derive(Default)]
struct Events {
    refuse: AtomicBool,
    /// Every `POST /api/v1/events`, answered or not.
    posts: AtomicU64,
    /// Bodies answered 2xx.
    accepted: Mutex<Vec<Value>>,
}

async fn events_standin(events: &Arc<Events>) -> String {
    let e = Arc::clone(events);
    serve(Arc::new(move |method, path, body| {
        if method != "POST" || path != "/api/v1/events" {
            return (404, r#"{"error":"not_found"}"#.into());
        }
        let n = e.posts.fetch_add(1, Relaxed);
        if e.refuse.load(Relaxed) {
            return (401, r#"{"error":"unauthorized"}"#.into());
        }
        e.accepted.lock().unwrap().push(body.clone());
        (200, format!(r#"{{"data":"E{n}"}}"#))
    }))
    .await
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Small bounds, so a refused reporter holds consumption back early, and
/// short backoffs, so the test does not wait long for the recovery.
fn reporter_config() -> ReporterConfig {
    let mut config = ReporterConfig::default();
    config.queue_capacity = 32;
    config.concurrency = xzepr_consumer::flow_control::Concurrency::Fixed(4);
    config.backoff_base = Duration::from_millis(1);
    config.backoff_max = Duration::from_millis(50);
    config.breaker_cooldown = Duration::from_millis(100);
    config.unauthorized_hold_max = Duration::from_millis(500);
    config.resubmit_backoff_max = Duration::from_millis(500);
    config
}

fn start_pipeline(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    topic: &str,
    url: &str,
) -> (RunningPipeline, ReporterTask) {
    let (reporter, task) = rt.block_on(async {
        let client = XzeprClient::new(XzeprClientConfig::new(url, "tok")).unwrap();
        Reporter::start(client, reporter_config())
    });
    let running = Pipeline::builder(KafkaConsumerConfig::new(brokers, topic, "refused"))
        .workers(2)
        .commit_interval(Duration::from_millis(100))
        .drain_timeout(Duration::from_secs(2))
        .lifecycle(
            reporter,
            WorkTemplate::new("01MYRECEIVER", "deploy", "1.0.0", "refused"),
        )
        .start(
            |ev: &CloudEvent<'_>, work: &mut Work| -> Result<(), String> {
                work.detail("type", ev.event_type());
                Ok(())
            },
        )
        .unwrap();
    (running, task)
}

/// Waits (up to `bound`) for `cond`, polling.
fn wait_for(bound: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < bound, "not within {bound:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `xzepr_consumer_reporter_unauthorized` gauge in the Prometheus output.
fn unauthorized_gauge(running: &RunningPipeline) -> Option<String> {
    let text = running.encode_metrics(MetricsFormat::PrometheusText);
    text.lines()
        .find(|l| l.starts_with("xzepr_consumer_reporter_unauthorized "))
        .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
}

/// Work ids XZepr accepted with a `started`, and with a terminal post.
fn accepted_by_work(events: &Events) -> (usize, usize) {
    let accepted = events.accepted.lock().unwrap();
    let mut by_work: HashMap<String, (bool, bool)> = HashMap::new();
    for body in accepted.iter() {
        let id = body["payload"]["work_id"].as_str().unwrap().to_owned();
        let seen = by_work.entry(id).or_default();
        match body["name"].as_str().unwrap() {
            "deploy.started" => seen.0 = true,
            _ => seen.1 = true,
        }
    }
    (
        by_work.values().filter(|s| s.0).count(),
        by_work.values().filter(|s| s.1).count(),
    )
}

/// Joins the pipeline on a thread and waits for it with a bound.
fn join_within(running: RunningPipeline, bound: Duration) -> RunningPipeline {
    running.shutdown();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let joined = running.join();
        tx.send((running, joined.is_ok())).unwrap();
    });
    let (running, _ok) = rx
        .recv_timeout(bound)
        .unwrap_or_else(|_| panic!("shutdown + join did not finish within {bound:?}"));
    running
}

#[test]
fn a_reporter_refused_with_401_is_signalled_holds_consumption_and_drains() {
    const N: u64 = 2_000;
    let topic = "refused";
    let cluster = cluster(topic, 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, topic, 2, N, |i| xzepr_event(i, "01SOMEONEELSE").1);
    let ends = end_offsets(&brokers, topic, 2);

    let rt = runtime();
    let events = Arc::new(Events::default());
    events.refuse.store(true, Relaxed);
    let url = rt.block_on(events_standin(&events));
    let (running, task) = start_pipeline(&rt, &brokers, topic, &url);

    // Signalled: readiness false (while in the group) and the gauge at 1.
    wait_for(Duration::from_secs(30), "readiness false under 401", || {
        let h = running.health();
        h.group_joined && !h.ready && events.posts.load(Relaxed) > 0
    });
    wait_for(
        Duration::from_secs(10),
        "the unauthorized gauge at 1",
        || unauthorized_gauge(&running).as_deref() == Some("1"),
    );
    let health = serde_json::to_value(running.health()).unwrap();
    assert_eq!(health["reporter_unauthorized"], true, "{health}");

    // Consumption stops growing well below what was produced.
    let mut last = (running.metrics().handled, Instant::now());
    wait_for(
        Duration::from_secs(30),
        "consumption to stop growing",
        || {
            let handled = running.metrics().handled;
            if handled != last.0 {
                last = (handled, Instant::now());
            }
            last.1.elapsed() > Duration::from_secs(1)
        },
    );
    let handled = running.metrics().handled;
    eprintln!("under 401: {handled} of {N} events handled");
    assert!(handled < N / 4, "{handled} of {N} events handled under 401");

    // The posts stay few: an observation window (not a synchronisation)
    // several times the longest hold, across which they must barely grow.
    let before = events.posts.load(Relaxed);
    std::thread::sleep(Duration::from_secs(2));
    let grown = events.posts.load(Relaxed) - before;
    eprintln!("under 401: {before} posts, then {grown} in 2 s");
    assert!(
        grown <= 20,
        "{grown} posts in 2 s under 401 ({before} before)"
    );

    // Shutdown, join and drain finish within their deadlines.
    let running = join_within(running, Duration::from_secs(20));
    drop(running);
    assert!(
        rt.block_on(task.drain(Duration::from_secs(10))),
        "the reporter did not drain within its deadline under 401"
    );
    // Nothing is posted after that: an observation window longer than every
    // hold and backoff in the reporter's configuration.
    let after = events.posts.load(Relaxed);
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(
        events.posts.load(Relaxed),
        after,
        "posts after the pipeline was dropped and drained"
    );
    // Nothing unreported was committed.
    let committed_now = committed(&brokers, "xzepr-consumer-refused", topic, 2);
    assert_ne!(committed_now, ends, "committed past unreported work");

    // XZepr accepts the posts again: a new pipeline reports and commits all.
    events.refuse.store(false, Relaxed);
    let (running, task) = start_pipeline(&rt, &brokers, topic, &url);
    wait_for(Duration::from_secs(60), "everything committed", || {
        committed(&brokers, "xzepr-consumer-refused", topic, 2) == ends
    });
    assert_eq!(accepted_by_work(&events), (N as usize, N as usize));
    let running = join_within(running, Duration::from_secs(20));
    drop(running);
    assert!(rt.block_on(task.drain(Duration::from_secs(10))));
}

#[test]
fn a_refused_reporter_recovers_in_place_once_xzepr_accepts_it() {
    const N: u64 = 500;
    let topic = "refused-then-accepted";
    let cluster = cluster(topic, 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, topic, 2, N, |i| xzepr_event(i, "01SOMEONEELSE").1);
    let ends = end_offsets(&brokers, topic, 2);

    let rt = runtime();
    let events = Arc::new(Events::default());
    events.refuse.store(true, Relaxed);
    let url = rt.block_on(events_standin(&events));
    let (running, task) = start_pipeline(&rt, &brokers, topic, &url);
    wait_for(
        Duration::from_secs(30),
        "the unauthorized gauge at 1",
        || unauthorized_gauge(&running).as_deref() == Some("1"),
    );
    events.refuse.store(false, Relaxed);
    wait_for(Duration::from_secs(60), "everything committed", || {
        committed(&brokers, "xzepr-consumer-refused", topic, 2) == ends
    });
    assert_eq!(accepted_by_work(&events), (N as usize, N as usize));
    assert_eq!(unauthorized_gauge(&running).as_deref(), Some("0"));
    assert!(running.health().ready, "{:?}", running.health());
    let running = join_within(running, Duration::from_secs(20));
    drop(running);
    assert!(rt.block_on(task.drain(Duration::from_secs(10))));
}

/// XZepr publishes `receiver.created` before it answers the create: the
/// own-event guard must know the new receiver by the time the create answers,
/// not only once the client's post-create wait and list are over.
#[test]
fn a_receiver_created_again_is_own_as_soon_as_the_create_answers() {
    let rt = runtime();
    let own_slot: Arc<OnceLock<OwnReceivers>> = Arc::default();
    let created = Arc::new(AtomicBool::new(false));
    // Whether the set held the new id at each list after the create.
    let own_at_list: Arc<Mutex<Vec<bool>>> = Arc::default();
    let url = {
        let (own_slot, created, own_at_list) = (
            Arc::clone(&own_slot),
            Arc::clone(&created),
            Arc::clone(&own_at_list),
        );
        rt.block_on(serve(Arc::new(move |method, path, body| {
            let listed = |id: &str| {
                json!({"data": [{"id": id, "name": "svc", "type": "worker", "version": "1.0.0",
                    "description": "", "schema": {}, "fingerprint": "f",
                    "created_at": "2026-11-23T00:00:00Z"}],
                    "pagination": {"limit": 50, "offset": 0, "total": 1, "has_more": false}})
                .to_string()
            };
            match (method, path) {
                ("GET", "/api/v1/receivers") if !created.load(Relaxed) => {
                    // Before the "restart" R-OLD is listed once; then nothing.
                    match own_slot.get() {
                        None => (200, listed("R-OLD")),
                        Some(_) => (
                            200,
                            json!({"data": [], "pagination": {"limit": 50, "offset": 0,
                                "total": 0, "has_more": false}})
                            .to_string(),
                        ),
                    }
                }
                ("GET", "/api/v1/receivers") => {
                    let own = own_slot.get().unwrap();
                    own_at_list.lock().unwrap().push(own.contains("R-NEW"));
                    (200, listed("R-NEW"))
                }
                ("POST", "/api/v1/receivers") => {
                    created.store(true, Relaxed);
                    (200, r#"{"data":"R-NEW"}"#.into())
                }
                ("POST", "/api/v1/events") if body["event_receiver_id"] == "R-OLD" => {
                    (404, r#"{"error":"not_found"}"#.into())
                }
                ("POST", "/api/v1/events") => (200, r#"{"data":"E1"}"#.into()),
                _ => (404, r#"{"error":"not_found"}"#.into()),
            }
        })))
    };
    rt.block_on(async {
        let client = XzeprClient::new(XzeprClientConfig::new(url, "tok")).unwrap();
        let receiver = client
            .discover_or_create_event_receiver("svc", "worker", "1.0.0", "d", json!({}))
            .await
            .unwrap();
        assert_eq!(receiver, "R-OLD");
        let (reporter, task) = Reporter::start(client, ReporterConfig::default());
        let own = reporter.own_receivers();
        own.insert("R-OLD");
        own_slot.set(own.clone()).ok().unwrap();
        let acked: Arc<Mutex<Vec<bool>>> = Arc::default();
        let a = Arc::clone(&acked);
        reporter
            .send(Record {
                work: OwnedWork::new("R-OLD", "w-1", "deploy", "1.0.0", "linux", "svc"),
                status: Status::Started,
                details: Value::Null,
                error: None,
                trace: None,
                ack: Ack::new(move |r| a.lock().unwrap().push(r.is_ok())),
            })
            .await
            .unwrap();
        drop(reporter);
        assert!(task.drain(Duration::from_secs(30)).await);
        assert_eq!(*acked.lock().unwrap(), [true]);
        assert!(own.contains("R-NEW"));
    });
    let seen = own_at_list.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the client lists after creating");
    assert!(
        seen[0],
        "the new receiver was not in the own set when the create answered: {seen:?}"
    );
}
