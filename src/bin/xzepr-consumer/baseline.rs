//! The two reference points the `bench` command measures the pipeline against:
//! a bare `BaseConsumer` poll loop, and the downstream-consumer plan's design.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use xzepr_consumer::decode::CloudEventMessage;

/// How long a baseline waits for the first message (covers the group join).
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);

fn consumer_config(brokers: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    c
}

/// Events per second of a bare poll loop over `events` messages, timed from the
/// first message (so the group join is not counted).
pub fn raw_poll(brokers: &str, topic: &str, group: &str, events: u64) -> anyhow_like::Result<f64> {
    let consumer: BaseConsumer = consumer_config(brokers, group).create()?;
    consumer.subscribe(&[topic])?;
    let mut seen = 0u64;
    let mut bytes = 0usize;
    let mut start = None;
    let mut deadline = Instant::now() + FIRST_MESSAGE_TIMEOUT;
    while seen < events {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                start.get_or_insert_with(Instant::now);
                // Keep waiting while messages flow; give up after a silence.
                deadline = Instant::now() + Duration::from_secs(10);
                bytes += m.payload().map_or(0, <[u8]>::len);
                seen += 1;
            }
            Some(Err(e)) => return Err(e.into()),
            None if Instant::now() > deadline => {
                return Err(format!("only {seen} of {events} messages arrived").into())
            }
            None => {}
        }
    }
    let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    std::hint::black_box(bytes);
    Ok(seen as f64 / secs.max(1e-9))
}

/// The plan's design: a `StreamConsumer`, serde_json into the owned structs, two
/// lifecycle posts per event awaited one after the other (a fresh request and body
/// each time), an asynchronous commit per message. Events per second.
pub async fn seed_design(
    brokers: &str,
    topic: &str,
    group: &str,
    events: u64,
    api_url: &str,
    token: &str,
    receiver_id: &str,
) -> anyhow_like::Result<f64> {
    let consumer: StreamConsumer = consumer_config(brokers, group).create()?;
    consumer.subscribe(&[topic])?;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url: hyper::Uri = format!("{api_url}/api/v1/events").parse()?;
    let mut start = None;
    let mut seen = 0u64;
    while seen < events {
        let msg = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, consumer.recv())
            .await
            .map_err(|_| "no message within the timeout")??;
        start.get_or_insert_with(Instant::now);
        let event: CloudEventMessage = serde_json::from_slice(msg.payload().unwrap_or_default())?;
        let work_id = format!("work-{}", event.id);
        for status in ["started", "completed"] {
            let body = serde_json::json!({
                "name": format!("seed.{status}"),
                "version": "1.0.0",
                "release": "1.0.0",
                "platform_id": event.platform_id,
                "package": "seed",
                "description": format!("Work {status}: seed ({work_id})"),
                "payload": {"work_id": work_id, "status": status},
                "success": true,
                "event_receiver_id": receiver_id,
            });
            let req = hyper::Request::post(url.clone())
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {token}"))
                .body(Full::new(Bytes::from(serde_json::to_vec(&body)?)))?;
            let resp = client.request(req).await?;
            let status_code = resp.status();
            let _ = resp.into_body().collect().await?;
            if !status_code.is_success() {
                return Err(format!("post failed: {status_code}").into());
            }
        }
        consumer.commit_message(&msg, CommitMode::Async)?;
        seen += 1;
    }
    let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    Ok(seen as f64 / secs.max(1e-9))
}

/// A boxed error, enough for a command-line tool.
pub mod anyhow_like {
    /// Any error.
    pub type Error = Box<dyn std::error::Error + Send + Sync>;
    /// `Result` with [`Error`].
    pub type Result<T> = std::result::Result<T, Error>;
}
