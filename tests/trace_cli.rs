//! `run` built with `otel` and an OTEL_* endpoint set: `--forward` requests
//! carry `traceparent`, `--exec` programs get `TRACEPARENT`, both in the
//! producer's trace, and the spans go out over OTLP/HTTP.

mod kafka_support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use xzepr_consumer::devstack::StandIn;
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::trace::TraceContext;

use kafka_support::{cluster, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_xzepr-consumer");
const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const PATIENCE: Duration = Duration::from_secs(120);

/// Every request's path and headers; answers 200 to all (forward and OTLP).
type Seen = Arc<Mutex<Vec<(String, http::HeaderMap)>>>;

async fn endpoint() -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let all = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let all = Arc::clone(&all);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let all = Arc::clone(&all);
                        async move {
                            let (head, body) = req.into_parts();
                            body.collect().await?;
                            all.lock()
                                .unwrap()
                                .push((head.uri.path().to_owned(), head.headers));
                            Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::new())))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (url, seen)
}

fn produce_traced(brokers: &str, topic: &str, n: u64) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let traceparent = format!("00-{TRACE_ID}-b7ad6b7169203331-01");
    for i in 0..n {
        let (id, body) = xzepr_event(i, "01SOMEONEELSE");
        let headers = OwnedHeaders::new().insert(Header {
            key: "traceparent",
            value: Some(traceparent.as_str()),
        });
        let record = BaseRecord::to(topic)
            .key(&id)
            .payload(&body)
            .headers(headers);
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(60)).unwrap();
}

/// Runs `run` with `args` until the stand-in holds `posts` lifecycle posts.
fn run_until_reported(
    topic: &str,
    args: &[&str],
    env: &[(&str, &str)],
    otlp: &str,
    posts: usize,
) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cluster = cluster(topic, 1);
    let brokers = cluster.bootstrap_servers();
    produce_traced(&brokers, topic, (posts / 2) as u64);
    let standin = rt.block_on(StandIn::builder("tok").start()).unwrap();
    let mut child: Child = Command::new(BIN)
        .args(["run", "--service-name", "traced-cli"])
        .args(args)
        .envs(env.iter().copied())
        .env("XZEPR_KAFKA_BROKERS", &brokers)
        .env("XZEPR_KAFKA_TOPIC", topic)
        .env("XZEPR_API_URL", standin.url())
        .env("XZEPR_API_TOKEN", "tok")
        .env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", otlp)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while standin.recorded_events().len() < posts {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("run exited early: {status}");
        }
        assert!(start.elapsed() < PATIENCE, "not every event was reported");
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = standin.recorded_traceparents();
    assert_eq!(
        sent.len(),
        posts,
        "every post carried a traceparent: {sent:?}"
    );
    // SIGTERM: run drains, and the guard flushes the spans on the way out.
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    drop(rt);
    stderr
}

fn trace_id_of(traceparent: &str) -> String {
    TraceContext::parse(traceparent.as_bytes(), None)
        .unwrap_or_else(|| panic!("not a traceparent: {traceparent:?}"))
        .trace_id_hex()
}

#[test]
fn forward_requests_carry_the_events_trace_and_run_exports_its_spans() {
    const N: usize = 3;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (url, seen) = rt.block_on(endpoint());
    let forward = format!("{url}/forward");
    let otlp = format!("{url}/v1/traces");
    run_until_reported(
        "traced.forward",
        &["--forward", &forward],
        &[],
        &otlp,
        2 * N,
    );
    let seen = seen.lock().unwrap().clone();
    let forwarded: Vec<&http::HeaderMap> = seen
        .iter()
        .filter(|(p, _)| p == "/forward")
        .map(|(_, h)| h)
        .collect();
    assert_eq!(forwarded.len(), N);
    for h in forwarded {
        let tp = h["traceparent"].to_str().unwrap();
        assert_eq!(trace_id_of(tp), TRACE_ID, "{tp}");
    }
    let exports = seen.iter().filter(|(p, _)| p == "/v1/traces").count();
    assert!(exports > 0, "run exported its spans: {seen:?}");
}

#[test]
fn exec_programs_get_the_events_trace_in_their_environment() {
    const N: usize = 3;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (url, _seen) = rt.block_on(endpoint());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("traceparents");
    let script = format!(
        "printf '%s %s\\n' \"$TRACEPARENT\" \"${{TRACESTATE-none}}\" >> '{}'",
        out.display()
    );
    // run's own context must not pass for the event's.
    let inherited = [(
        "TRACEPARENT",
        "00-11111111111111111111111111111111-2222222222222222-01",
    )];
    run_until_reported(
        "traced.exec",
        &["--exec", "sh", "-c", &script],
        &inherited,
        &format!("{url}/v1/traces"),
        2 * N,
    );
    let mut lines: HashMap<String, usize> = HashMap::new();
    wait_for(PATIENCE, "each program's line", || {
        std::fs::read_to_string(&out).is_ok_and(|t| t.lines().count() == N)
    });
    for line in std::fs::read_to_string(&out).unwrap().lines() {
        let (tp, state) = line.split_once(' ').unwrap();
        assert_eq!(trace_id_of(tp), TRACE_ID, "{line}");
        assert_eq!(state, "none", "the producer sent no tracestate: {line}");
        *lines.entry(tp.to_owned()).or_default() += 1;
    }
    assert_eq!(lines.len(), N, "one attempt span per event: {lines:?}");
}
