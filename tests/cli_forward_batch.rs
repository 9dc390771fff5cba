//! `run --forward URL --forward-batch`: a lane's run in one request, an
//! outcome per event in the answer, everything else per event; the command
//! runs as a child process against the mock broker and the XZepr stand-in.
#![cfg(all(feature = "cli", target_os = "linux"))]

mod cli_support;
mod kafka_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use cli_support::*;

/// What the endpoint saw: per request, its events' (partition, offset, work id).
type Requests = Arc<Mutex<Vec<Vec<(i64, i64, String)>>>>;

/// An endpoint answering batches: its first request 503, then per event
/// `failed` for `scan.finished`, `retry` once for offsets ≡ 3 (mod 7), else
/// `done` with the request's size.
fn endpoint(stack: &Stack, seen: Requests) -> String {
    let listener = stack
        .rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}/batch", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicU64::new(0));
    let tries: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    stack.rt.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (seen, requests, tries) = (seen.clone(), requests.clone(), tries.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (seen, requests, tries) = (seen.clone(), requests.clone(), tries.clone());
                    async move {
                        let size = req.headers()["xzepr-batch-size"]
                            .to_str()
                            .unwrap()
                            .to_owned();
                        let body: Value =
                            serde_json::from_slice(&req.into_body().collect().await?.to_bytes())
                                .unwrap();
                        let events = body["events"].as_array().unwrap();
                        assert_eq!(size, events.len().to_string());
                        let mut got = Vec::new();
                        let mut results = Vec::new();
                        for e in events {
                            let (p, o) = (
                                e["partition"].as_i64().unwrap(),
                                e["offset"].as_i64().unwrap(),
                            );
                            let work = e["work_id"].as_str().unwrap().to_owned();
                            assert_eq!(
                                e["key"].as_str(),
                                e["event"]["id"].as_str(),
                                "the Kafka key (the produced event id) is sent"
                            );
                            got.push((p, o, work.clone()));
                            let n = {
                                let mut t = tries.lock().unwrap();
                                let n = t.entry(work).or_insert(0);
                                *n += 1;
                                *n
                            };
                            results.push(if e["event"]["type"] == "scan.finished" {
                                json!({"status": "failed", "error": "bad scan", "code": "E7"})
                            } else if o % 7 == 3 && n == 1 {
                                json!({"status": "retry", "error": "row locked"})
                            } else {
                                json!({"status": "done", "details": {"batch": events.len()}})
                            });
                        }
                        seen.lock().unwrap().push(got);
                        let (status, body) = match requests.fetch_add(1, SeqCst) {
                            0 => (503, json!({"error": "warming up"})),
                            _ => (200, json!({ "results": results })),
                        };
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(body.to_string())))
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

#[test]
fn a_forwarded_batch_gets_an_outcome_per_event_and_retries_only_what_asked() {
    const N: u64 = 60;
    let stack = Stack::start("fb", 2);
    let ids = stack.produce(N);
    let seen: Requests = Arc::default();
    let url = endpoint(&stack, Arc::clone(&seen));
    let mut cli = stack.spawn(
        &[
            "run",
            "--service-name",
            "fb",
            "--retries",
            "2",
            "--batch",
            "8",
            "--metrics-addr",
            "127.0.0.1:0",
            "--forward-batch",
            "--forward",
            &url,
        ],
        &[],
    );
    let posts = stack.wait_reported(&ids, &mut cli);
    let metrics = http_get(&metrics_addr(&cli.stderr()), "/metrics");
    assert!(
        metrics.contains("xzepr_consumer_concurrency_limit{limit=\"forward\"}"),
        "the endpoint's limit is shown as `forward`:\n{metrics}"
    );
    cli.stop_cleanly();

    let requests = seen.lock().unwrap().clone();
    assert!(
        requests.iter().any(|r| r.len() > 1),
        "never more than one event per request"
    );
    for r in &requests {
        assert!(r.len() <= 8, "a request over --batch: {r:?}");
        assert!(
            r.windows(2).all(|w| w[0].0 == w[1].0 && w[0].1 < w[1].1),
            "{r:?}"
        );
    }
    let first: Vec<&String> = requests[0].iter().map(|(_, _, w)| w).collect();
    for (i, id) in ids.iter().enumerate() {
        let work = format!("work-{id}");
        let (status, details) = &posts[&work];
        // `xzepr_event`'s sixth kind is `scan.finished`.
        if i % 6 == 5 {
            assert_eq!(status, "failed", "{details}");
            assert_eq!(details["error_code"], "E7", "{details}");
            assert_eq!(
                details["attempts"],
                1 + u64::from(first.contains(&&work)),
                "{details}"
            );
        } else {
            assert_eq!(status, "completed", "{work}: {details}");
            assert!(
                details["batch"].as_u64().is_some(),
                "the endpoint's details: {details}"
            );
        }
    }
    // The 503 answered the first request as a whole: its events ran again.
    for work in first {
        let attempts = posts[work].1["attempts"].as_u64().unwrap();
        assert!(attempts >= 2, "{work} was not retried after the 503");
    }
}
