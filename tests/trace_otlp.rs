//! Traces end to end: events produced with a producer's `traceparent`, the
//! pipeline run with its spans exported over OTLP/HTTP to a receiver in this
//! test, and XZepr's stand-in seeing the context on every lifecycle post.

mod kafka_support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::Value;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::devstack::StandIn;
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::WorkInfo;
use xzepr_consumer::pipeline::{Pipeline, Reporting};
use xzepr_consumer::trace::TraceContext;

use kafka_support::{cluster, wait_for};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";
const PATIENCE: Duration = Duration::from_secs(120);

/// An OTLP/HTTP receiver on 127.0.0.1:0: every span of every export request.
struct Receiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<Span>>>,
}

async fn receiver() -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    let spans = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&spans);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = Arc::clone(&seen);
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            let ty = req.headers()[http::header::CONTENT_TYPE].clone();
                            assert_eq!(ty, "application/x-protobuf");
                            let body = req.into_body().collect().await?.to_bytes();
                            let export = ExportTraceServiceRequest::decode(body).unwrap();
                            let mut seen = seen.lock().unwrap();
                            for rs in export.resource_spans {
                                for ss in rs.scope_spans {
                                    seen.extend(ss.spans);
                                }
                            }
                            Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::new())))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Receiver { endpoint, spans }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Any::StringValue(s) => s.clone(),
            Any::IntValue(i) => i.to_string(),
            Any::BoolValue(b) => b.to_string(),
            other => format!("{other:?}"),
        })
}

/// Events `0..n` on partition 0, each with the producer's `traceparent`.
fn produce_traced(brokers: &str, topic: &str, n: u64) -> Vec<String> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let traceparent = format!("00-{TRACE_ID}-{PRODUCER_SPAN}-01");
    let mut ids = Vec::new();
    for i in 0..n {
        let (id, body) = xzepr_event(i, "01SOMEONEELSE");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "traceparent",
                value: Some(traceparent.as_str()),
            })
            .insert(Header {
                key: "tracestate",
                value: Some("congo=t61rcWkgMzE"),
            });
        producer
            .send(
                BaseRecord::to(topic)
                    .key(&id)
                    .payload(&body)
                    .partition(0)
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .unwrap();
        ids.push(id);
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    ids
}

#[test]
fn spans_continue_the_producers_trace_and_the_posts_carry_it() {
    const N: u64 = 4;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let otlp = rt.block_on(receiver());
    std::env::set_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &otlp.endpoint);
    std::env::set_var("OTEL_SERVICE_NAME", "trace-test");
    let guard = xzepr_consumer::trace::init_from_env()
        .unwrap()
        .expect("an endpoint is set: traces are on");
    tracing_subscriber::registry().with(guard.layer()).init();

    let cluster = cluster("traced", 1);
    let brokers = cluster.bootstrap_servers();
    let ids = produce_traced(&brokers, "traced", N);
    let standin = rt.block_on(StandIn::builder("tok").start()).unwrap();
    let client = XzeprClient::new(XzeprClientConfig::new(standin.url(), "tok")).unwrap();
    // What each handler saw as its current context, by event id.
    let seen: Arc<Mutex<HashMap<String, Option<TraceContext>>>> = Arc::default();
    let in_handler = Arc::clone(&seen);
    let handler = move |m: CloudEventMessage, _w: WorkInfo| {
        let seen = Arc::clone(&in_handler);
        async move {
            seen.lock()
                .unwrap()
                .insert(m.id.clone(), xzepr_consumer::trace::current());
            Ok::<Value, String>(serde_json::json!({}))
        }
    };
    let pipeline = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "traced", "svc"))
        .traces(true)
        .idempotency(xzepr_consumer::idempotency::MemoryStore::new())
        .report_to(
            Reporting::new(client, "svc")
                .receiver("svc-receiver", "worker")
                .work("deploy", "1.0.0"),
        )
        .build()
        .unwrap();
    let recorded = || standin.recorded_events().len() >= 2 * N as usize;
    let summary = rt
        .block_on(pipeline.run(handler, async {
            while !recorded() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }))
        .unwrap();
    assert_eq!(summary.metrics.handled, N);

    // Every lifecycle post carried the trace on to XZepr.
    let sent = standin.recorded_traceparents();
    assert_eq!(sent.len(), 2 * N as usize, "{sent:?}");
    for tp in &sent {
        let c = TraceContext::parse(tp.as_bytes(), None).expect(tp);
        assert_eq!(c.trace_id_hex(), TRACE_ID, "{tp}");
        assert_ne!(c.span_id_hex(), PRODUCER_SPAN, "the post's own span: {tp}");
    }
    // The handler ran inside its attempt's span.
    let seen = seen.lock().unwrap().clone();
    for id in &ids {
        let c = seen[id].as_ref().expect("a current context in the handler");
        assert_eq!(c.trace_id_hex(), TRACE_ID);
        assert_eq!(c.state.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    guard.flush();
    let want = |spans: &[Span]| {
        spans
            .iter()
            .filter(|s| s.name.starts_with("process"))
            .count()
            >= N as usize
            && spans
                .iter()
                .filter(|s| s.name.starts_with("lifecycle post"))
                .count()
                >= 2 * N as usize
    };
    wait_for(PATIENCE, "the spans at the receiver", || {
        guard.flush();
        want(&otlp.spans.lock().unwrap())
    });
    let spans = otlp.spans.lock().unwrap().clone();
    let by_id: HashMap<String, &Span> = spans.iter().map(|s| (hex(&s.span_id), s)).collect();
    let events: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "process traced")
        .collect();
    assert_eq!(events.len(), N as usize, "{:?}", names(&spans));
    let mut event_spans = HashMap::new();
    for ev in &events {
        assert_eq!(hex(&ev.trace_id), TRACE_ID);
        assert_eq!(
            hex(&ev.parent_span_id),
            PRODUCER_SPAN,
            "the producer's span is the parent"
        );
        // SpanKind::Consumer.
        assert_eq!(ev.kind, 5);
        assert_eq!(attr(ev, "messaging.system").as_deref(), Some("kafka"));
        assert_eq!(
            attr(ev, "messaging.destination.name").as_deref(),
            Some("traced")
        );
        assert_eq!(
            attr(ev, "messaging.destination.partition.id").as_deref(),
            Some("0")
        );
        assert_eq!(
            attr(ev, "messaging.operation.type").as_deref(),
            Some("process")
        );
        assert_eq!(
            attr(ev, "messaging.consumer.group.name").as_deref(),
            Some("xzepr-consumer-svc")
        );
        assert!(attr(ev, "messaging.kafka.offset").is_some());
        let id = attr(ev, "messaging.message.id").unwrap();
        assert!(ids.contains(&id), "{id}");
        event_spans.insert(hex(&ev.span_id), id);
    }
    // Each attempt and each post is a child of its event's span.
    let parent_event = |s: &Span| event_spans.get(&hex(&s.parent_span_id)).cloned();
    for (name, per_event) in [
        ("handler attempt", 1),
        ("idempotency claim", 1),
        ("lifecycle post started", 1),
    ] {
        let children: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(
            children.len(),
            N as usize * per_event,
            "{name}: {:?}",
            names(&spans)
        );
        for c in children {
            assert_eq!(hex(&c.trace_id), TRACE_ID);
            assert!(
                parent_event(c).is_some(),
                "{name} is a child of an event span"
            );
        }
    }
    let completed = spans
        .iter()
        .filter(|s| s.name == "lifecycle post completed")
        .count();
    assert_eq!(completed, N as usize);
    // The context the stand-in saw is a post span's.
    for tp in &sent {
        let c = TraceContext::parse(tp.as_bytes(), None).unwrap();
        let post = by_id.get(&c.span_id_hex()).expect("a post span was sent");
        assert!(post.name.starts_with("lifecycle post"), "{}", post.name);
    }
    drop(guard);
}

fn names(spans: &[Span]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}
