//! Reporter benchmark against a local HTTP server, at 0 ms and at 5 ms per request
//! (what the real XZepr server takes per event POST), in one run:
//! - the reporter's posts/s;
//! - the plan's way: one request at a time, a fresh request and body per post,
//!   each awaited before the next;
//! - the raw rate of a pooled concurrent load generator on the same server.
//!
//! `cargo bench --bench report`

#[path = "../tests/http_support/mod.rs"]
mod http_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::report::{Ack, OwnedWork, Record, Reporter, ReporterConfig, Status};

async fn reporter_rate(url: &str, n: usize) -> f64 {
    let client = XzeprClient::new(XzeprClientConfig::new(url, "tok")).expect("client");
    let (reporter, task) = Reporter::start(client, ReporterConfig::default());
    let start = Instant::now();
    for i in 0..n {
        let record = Record {
            work: OwnedWork::new("R1", format!("w-{i}"), "bench", "1.0.0", "linux", "bench"),
            status: Status::Started,
            details: json!({"i": i}),
            error: None,
            trace: None,
            ack: Ack::new(|r| assert!(r.is_ok())),
        };
        reporter.send(record).await.expect("send");
    }
    drop(reporter);
    assert!(task.drain(Duration::from_secs(300)).await);
    n as f64 / start.elapsed().as_secs_f64()
}

async fn plan_rate(url: &str, n: usize) -> f64 {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let start = Instant::now();
    for i in 0..n {
        let body = json!({
            "name": "bench.started", "version": "1.0.0", "release": "1.0.0",
            "platform_id": "linux", "package": "bench",
            "description": format!("Work started: bench (w-{i})"),
            "payload": {"work_id": format!("w-{i}"), "status": "started"},
            "success": true, "event_receiver_id": "R1",
        });
        let req = hyper::Request::post(format!("{url}/api/v1/events"))
            .header("content-type", "application/json")
            .header("authorization", "Bearer tok")
            .body(Full::new(Bytes::from(
                serde_json::to_vec(&body).expect("json"),
            )))
            .expect("request");
        let resp = client.request(req).await.expect("post");
        let _ = resp.into_body().collect().await.expect("body");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn raw_rate(url: &str, n: usize, concurrency: usize) -> f64 {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build_http();
    // The same body a lifecycle post carries, so the server does the same work.
    let body = Bytes::from(
        serde_json::to_vec(&json!({
            "name": "bench.started", "version": "1.0.0", "release": "1.0.0",
            "platform_id": "linux", "package": "bench",
            "description": "Work started: bench (w-0)",
            "payload": {"work_id": "w-0", "status": "started",
                        "started_at": "2026-11-23T00:00:00.000000000Z", "details": {"i": 0}},
            "success": true, "event_receiver_id": "R1",
        }))
        .expect("json"),
    );
    let uri: hyper::Uri = format!("{url}/api/v1/events").parse().expect("uri");
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, body, uri, next) =
            (client.clone(), body.clone(), uri.clone(), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let req = hyper::Request::post(uri.clone())
                    .body(Full::new(body.clone()))
                    .expect("req");
                let resp = client.request(req).await.expect("post");
                let _ = resp.into_body().collect().await.expect("body");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("| server latency | reporter posts/s | plan's way posts/s | raw pooled posts/s | reporter / plan | reporter / raw |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (latency, n, plan_n) in [(0u64, 40_000usize, 4_000usize), (5, 20_000, 200)] {
        rt.block_on(async {
            let chaos = http_support::Chaos {
                slow: if latency > 0 { 1.0 } else { 0.0 },
                delay: Duration::from_millis(latency),
                ..Default::default()
            };
            let server = http_support::start(chaos).await;
            let reporter = reporter_rate(&server.url, n).await;
            let plan = plan_rate(&server.url, plan_n).await;
            let raw = raw_rate(&server.url, n, 128).await;
            println!(
                "| {latency} ms | {reporter:.0} | {plan:.0} | {raw:.0} | {:.1}x | {:.2} |",
                reporter / plan,
                reporter / raw
            );
        });
    }
}
