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
