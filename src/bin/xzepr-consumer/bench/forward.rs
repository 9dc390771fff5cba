//! `run --forward` (the command's own pipeline and forwarder) to a local
//! HTTP endpoint that answers at once.

use std::time::Duration;

use xzepr_consumer::dispatch::Ordering;
use xzepr_consumer::flow_control::Concurrency;
use xzepr_consumer::pipeline::{PipelineConfig, WorkTemplate};
use xzepr_consumer::report::ReporterConfig;

use super::{config, start_reporter, stop, time_until_finished, BENCH_RECEIVER};
use crate::baseline::anyhow_like::Result;

/// A local HTTP endpoint answering `200` at once, served on `rt` while it runs:
/// what `run --forward` posts to in the bench.
pub(super) fn zero_ms_endpoint(rt: &tokio::runtime::Runtime) -> Result<String> {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let url = format!("http://{}/", listener.local_addr()?);
    rt.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    use http_body_util::BodyExt;
                    let _ = req.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::new()),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(url)
}

/// `run --forward`'s settings with the command's defaults (128 in flight,
/// 60 s timeout, 3 attempts) and `ordering`.
pub(super) fn forward_settings(ordering: Ordering) -> PipelineConfig {
    let mut settings = PipelineConfig::default();
    settings.source.max_in_flight = Concurrency::Fixed(128);
    settings.source.ordering = ordering;
    settings.handler_timeout = Some(Duration::from_secs(60));
    settings.retry = xzepr_consumer::pipeline::RetryPolicy::attempts(3);
    settings
}

/// One pass of `run --forward` over `events`, with the command's defaults
/// (binary mode, [`forward_settings`]) and `ordering`, reporting to
/// `api_url` when given.
pub(super) fn run_forward(
    rt: &tokio::runtime::Runtime,
    (brokers, topic, group): (&str, &str, &str),
    events: u64,
    (endpoint, ordering): (&str, Ordering),
    api_url: Option<&str>,
) -> Result<(u64, f64)> {
    use crate::run::Action;
    let forward = crate::forward::Forward::new(endpoint, false, 128)?;
    let settings = forward_settings(ordering);
    let (lifecycle, task) = match api_url {
        Some(url) => {
            let (reporter, task) = start_reporter(rt.handle(), url, ReporterConfig::default())?;
            let work = WorkTemplate::new(BENCH_RECEIVER, "bench", "1.0.0", "bench");
            (Some((reporter, work)), Some(task))
        }
        None => (None, None),
    };
    let running = crate::run::start(
        config(brokers, topic, group),
        Action::Forward(forward),
        &settings,
        rt.handle().clone(),
        lifecycle,
    )?;
    let r = time_until_finished(&running, events)?;
    stop(running)?;
    if let Some(task) = task {
        rt.block_on(task.drain(Duration::from_secs(30)));
    }
    Ok(r)
}

/// A generated event with a key, a timestamp and two Kafka headers, as
/// `run --forward` gets it: the message and its work.
fn sample_event() -> Result<(
    xzepr_consumer::decode::CloudEventMessage,
    xzepr_consumer::handler::WorkInfo,
)> {
    use xzepr_consumer::handler::{Record, Timestamp, Work};
    let (id, payload) = xzepr_consumer::generate::xzepr_event(5, super::SOURCE_RECEIVER);
    let message = serde_json::from_slice(&payload)?;
    let headers = vec![
        (
            "ce_traceparent".to_owned(),
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec(),
        ),
        ("tenant".to_owned(), b"acme".to_vec()),
    ];
    let record = Record::new(
        Some(id.as_bytes()),
        &headers,
        Some(Timestamp::CreateTime(1_700_000_000_000)),
    );
    let info = Work::new(format!("work-{id}"), "bench-forward".into(), 3, 123_456)
        .with_record(record)
        .info();
    Ok((message, info))
}

/// The headers and body `run --forward` sends `endpoint` for that event:
/// what the load generator posts, prebuilt, to price the request's shape.
pub(super) fn forwarded_request(endpoint: &str) -> Result<(http::HeaderMap, bytes::Bytes)> {
    let (message, info) = sample_event()?;
    let forward = crate::forward::Forward::new(endpoint, false, 1)?;
    let req = forward.build(&message, &info).map_err(|e| e.to_string())?;
    let (parts, body) = req.into_parts();
    Ok((parts.headers, body))
}

/// Microseconds to build one `run --forward` request (binary mode: about
/// fifteen headers, `data` serialized as the body) for [`sample_event`]; the
/// median of three rounds.
pub(super) fn request_build_us() -> Result<f64> {
    const BUILDS: usize = 100_000;
    let (message, info) = sample_event()?;
    let forward = crate::forward::Forward::new("http://127.0.0.1:9/events", false, 1)?;
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let start = std::time::Instant::now();
        for _ in 0..BUILDS {
            let req = forward.build(&message, &info).map_err(|e| e.to_string())?;
            std::hint::black_box(req);
        }
        rounds.push(start.elapsed().as_secs_f64() * 1e6 / BUILDS as f64);
    }
    Ok(super::median(rounds))
}
