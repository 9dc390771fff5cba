//! Each path beside the bare thing it wraps, in interleaved rounds: the
//! reporter against a pooled load generator posting a prebuilt body (0 ms and
//! 5 ms endpoints), `run --forward` against the same generator at equal
//! concurrency, `run --exec` against a loop that only spawns the same program,
//! and the envelope decode of large events against the plan's owned serde_json.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use xzepr_consumer::decode::{CloudEventMessage, Decoder, DecoderConfig};
use xzepr_consumer::dispatch::Ordering;
use xzepr_consumer::flow_control::Concurrency;
use xzepr_consumer::report::{Ack, OwnedWork, Record, ReporterConfig, Status};

use super::forward::{forward_settings, run_forward};
use super::{config, median, start_reporter, stop, time_until_finished, windowed, BENCH_RECEIVER};
use crate::baseline::anyhow_like::Result;

/// Concurrency of both sides of each HTTP comparison: the reporter's default
/// posting tasks, and `run --forward`'s default in flight.
const HTTP_CONCURRENCY: usize = 128;

/// Programs in flight at once in the exec comparison.
const EXEC_CONCURRENCY: usize = 16;

/// Interleaved rounds per comparison (medians reported).
const ROUNDS: usize = 3;

/// The figures of this family.
#[derive(Debug, serde::Serialize)]
pub struct WrapFigures {
    pub reporter_posts_0ms: f64,
    pub raw_posts_0ms: f64,
    pub reporter_over_raw_0ms: f64,
    pub reporter_posts_5ms: f64,
    pub raw_posts_5ms: f64,
    pub reporter_over_raw_5ms: f64,
    /// `run --forward --no-report --ordering key` (every event its own lane,
    /// 128 in flight) to the 0 ms endpoint.
    pub forward_key_eps: f64,
    /// The generator posting a body the size of a forwarded event's, 128 tasks.
    pub raw_forward_posts: f64,
    pub forward_over_raw: f64,
    /// The generator posting the forwarder's whole request, prebuilt (its
    /// ~15 `ce-*` and `kafka-*` headers too): what the request's shape costs
    /// the client and the server, apart from the pipeline.
    pub raw_forward_posts_full: f64,
    pub forward_over_raw_full: f64,
    /// Microseconds of CPU to build one forwarded request (headers and body),
    /// apart from the pipeline and the network.
    pub forward_request_build_us: f64,
    /// `run --exec /bin/true`, 16 in flight, and a loop spawning it 16 at once.
    pub exec_true_eps: f64,
    pub spawn_true_eps: f64,
    /// The same with `sh -c 'cat >/dev/null'` (reads the event from stdin).
    pub exec_sh_eps: f64,
    pub spawn_sh_eps: f64,
    /// The lower of the two programs' exec / spawn.
    pub exec_over_spawn: f64,
    /// Envelope decode against the plan's owned serde_json decode, the lower
    /// over the 17 KB and 67 KB long-string vectors; and ours in GB/s.
    pub decode_large_over_plan: f64,
    pub decode_large_gbps: f64,
    /// With `--postgres`: the idempotency guard against the guide's way.
    #[serde(flatten)]
    pub guard: Option<super::guard::GuardFigures>,
}

impl std::fmt::Display for WrapFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "reporter / raw posts:  {:>10.2} at 0 ms ({:.0} / {:.0}), {:.2} at 5 ms ({:.0} / {:.0})",
            self.reporter_over_raw_0ms,
            self.reporter_posts_0ms,
            self.raw_posts_0ms,
            self.reporter_over_raw_5ms,
            self.reporter_posts_5ms,
            self.raw_posts_5ms
        )?;
        writeln!(
            f,
            "forward / raw posts:   {:>10.2} ({:.0} / {:.0}, {HTTP_CONCURRENCY} at once; {:.2} µs to build a request)",
            self.forward_over_raw, self.forward_key_eps, self.raw_forward_posts, self.forward_request_build_us
        )?;
        writeln!(
            f,
            "forward / raw, same request: {:>4.2} ({:.0} posts/s with the forwarded headers)",
            self.forward_over_raw_full, self.raw_forward_posts_full
        )?;
        writeln!(
            f,
            "exec / spawn:          {:>10.2} (true {:.0} / {:.0}, sh {:.0} / {:.0}, {EXEC_CONCURRENCY} at once)",
            self.exec_over_spawn,
            self.exec_true_eps,
            self.spawn_true_eps,
            self.exec_sh_eps,
            self.spawn_sh_eps
        )?;
        write!(
            f,
            "decode large / plan:   {:>10.2} ({:.2} GB/s, envelope)",
            self.decode_large_over_plan, self.decode_large_gbps
        )?;
        if let Some(guard) = &self.guard {
            write!(f, "\n{guard}")?;
        }
        Ok(())
    }
}

/// Medians of `ROUNDS` interleaved rounds of each path (each a rate); the
/// order turns by one each round.
fn interleaved<const N: usize>(paths: [&mut dyn FnMut() -> Result<f64>; N]) -> Result<[f64; N]> {
    let mut rates: [Vec<f64>; N] = std::array::from_fn(|_| Vec::new());
    for round in 0..ROUNDS {
        for i in (0..N).map(|p| (p + round) % N) {
            rates[i].push(paths[i]()?);
        }
    }
    Ok(rates.map(median))
}

/// [`interleaved`] of two.
fn side_by_side(
    mut a: impl FnMut() -> Result<f64>,
    mut b: impl FnMut() -> Result<f64>,
) -> Result<(f64, f64)> {
    let [a, b] = interleaved([&mut a, &mut b])?;
    Ok((a, b))
}

/// Repeats `pass(n)` (a rate over `n` items) until a second of work was timed.
fn window_of(n: usize, mut pass: impl FnMut(usize) -> Result<f64>) -> Result<f64> {
    windowed(|_| {
        let rate = pass(n)?;
        Ok((n as u64, n as f64 / rate.max(1e-9)))
    })
}

/// `n` posts of a prebuilt `body` by `concurrency` tasks over one pooled
/// client: the bare HTTP rate the reporter and the forwarder build on.
async fn raw_posts(
    url: &str,
    (headers, body): Prebuilt,
    n: usize,
    concurrency: usize,
) -> Result<f64> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build_http();
    let uri: hyper::Uri = url.parse()?;
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, headers, body, uri, next) = (
                client.clone(),
                headers.clone(),
                body.clone(),
                uri.clone(),
                Arc::clone(&next),
            );
            tokio::spawn(async move {
                while next.fetch_add(1, Relaxed) < n {
                    let mut req =
                        hyper::Request::post(uri.clone()).body(Full::new(body.clone()))?;
                    *req.headers_mut() = headers.clone();
                    let resp = client.request(req).await?;
                    let status = resp.status();
                    resp.into_body().collect().await?;
                    // An answer the reporter would not count as done is no
                    // figure to compare with.
                    if !status.is_success() {
                        return Err(format!("{uri}: {status}").into());
                    }
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .collect();
    for t in tasks {
        t.await?.map_err(|e| e.to_string())?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// The headers and body the load generator posts, each time.
type Prebuilt = (http::HeaderMap, Bytes);

/// A JSON post with `bench`'s token: the headers a client sends at least.
fn plain(body: Bytes) -> Prebuilt {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_static("Bearer bench-token"),
    );
    (headers, body)
}

/// The body of a `started` post as the reporter writes it, for the generator.
fn started_body() -> Bytes {
    Bytes::from(
        json!({
            "name": "bench.started", "version": "1.0.0", "release": "1.0.0",
            "platform_id": "bench", "package": "bench",
            "description": "Work started: bench (w-0)",
            "payload": {"work_id": "w-0", "status": "started",
                        "started_at": "2026-11-23T00:00:00.000000000Z", "details": {"i": 0}},
            "success": true, "event_receiver_id": BENCH_RECEIVER,
        })
        .to_string(),
    )
}

/// `n` `started` records through a reporter with its defaults, each
/// acknowledged: posts per second.
fn reporter_posts(rt: &tokio::runtime::Runtime, url: &str, n: usize) -> Result<f64> {
    let (reporter, task) = start_reporter(rt.handle(), url, ReporterConfig::default())?;
    let failed = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    rt.block_on(async {
        for i in 0..n {
            let failed = Arc::clone(&failed);
            let record = Record {
                work: OwnedWork::new(
                    BENCH_RECEIVER,
                    format!("w-{i}"),
                    "bench",
                    "1.0.0",
                    "bench",
                    "bench",
                ),
                status: Status::Started,
                details: json!({ "i": i }),
                error: None,
                trace: None,
                ack: Ack::new(move |r| {
                    if r.is_err() {
                        failed.fetch_add(1, Relaxed);
                    }
                }),
            };
            reporter
                .send(record)
                .await
                .map_err(|_| "reporter closed".to_string())?;
        }
        drop(reporter);
        Ok::<_, String>(())
    })?;
    if !rt.block_on(task.drain(Duration::from_secs(300))) {
        return Err("reporter did not drain".into());
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    match failed.load(Relaxed) {
        0 => Ok(rate),
        f => Err(format!("{f} of {n} reporter posts failed").into()),
    }
}

/// The reporter against the generator on the stand-in answering after
/// `latency`: `(reporter, raw)` posts per second.
fn reporter_and_raw(rt: &tokio::runtime::Runtime, latency: Duration) -> Result<(f64, f64)> {
    let (addr, _standin) = rt.block_on(crate::standin::start(latency))?;
    let base = format!("http://{addr}");
    let events = format!("{base}/api/v1/events");
    let n = if latency.is_zero() { 20_000 } else { 10_000 };
    side_by_side(
        || window_of(n, |n| reporter_posts(rt, &base, n)),
        || {
            window_of(n, |n| {
                rt.block_on(raw_posts(
                    &events,
                    plain(started_body()),
                    n,
                    HTTP_CONCURRENCY,
                ))
            })
        },
    )
}

/// A forwarded event's body: `data` of a generated event, as binary mode sends it.
fn forwarded_body() -> Result<Bytes> {
    let (_, payload) = xzepr_consumer::generate::xzepr_event(0, BENCH_RECEIVER);
    let event: CloudEventMessage = serde_json::from_slice(&payload)?;
    Ok(Bytes::from(serde_json::to_vec(&event.data)?))
}

/// `run --forward` under per-key order (128 in flight) against the generator
/// at 128 tasks, same endpoint, posting the body with a client's two headers
/// and posting the forwarder's whole request (its ~15 headers) prebuilt:
/// `[forward, raw, raw with the forwarded headers]` per second.
fn forward_and_raw(
    rt: &tokio::runtime::Runtime,
    (brokers, topic, events): (&str, &str, u64),
    endpoint: &str,
    group: &dyn Fn(&str) -> String,
) -> Result<[f64; 3]> {
    let body = plain(forwarded_body()?);
    let full = super::forward::forwarded_request(endpoint)?;
    let generator = |prebuilt: &Prebuilt| {
        window_of(events as usize, |n| {
            rt.block_on(raw_posts(endpoint, prebuilt.clone(), n, HTTP_CONCURRENCY))
        })
    };
    interleaved([
        &mut || {
            windowed(|_| {
                let group = group("forward-key");
                run_forward(
                    rt,
                    (brokers, topic, &group),
                    events,
                    (endpoint, Ordering::PerKey),
                    None,
                )
            })
        },
        &mut || generator(&body),
        &mut || generator(&full),
    ])
}

/// One pass of `run --exec PROGRAM...` over `events`, per-key order,
/// [`EXEC_CONCURRENCY`] in flight, no lifecycle posts.
fn exec_pass(
    rt: &tokio::runtime::Runtime,
    (brokers, topic, group): (&str, &str, &str),
    events: u64,
    command: &[String],
) -> Result<(u64, f64)> {
    let exec = crate::exec::Exec::new(command).ok_or("empty command")?;
    let mut settings = forward_settings(Ordering::PerKey);
    settings.source.max_in_flight = Concurrency::Fixed(EXEC_CONCURRENCY);
    let running = crate::run::start(
        config(brokers, topic, group),
        crate::run::Action::Exec(exec),
        &settings,
        rt.handle().clone(),
        None,
    )?;
    let r = time_until_finished(&running, events)?;
    stop(running)?;
    Ok(r)
}

/// `n` runs of `command`, [`EXEC_CONCURRENCY`] at once, nothing else: per second.
async fn spawn_loop(command: &[String], n: usize) -> Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..EXEC_CONCURRENCY)
        .map(|_| {
            let (command, next) = (command.to_vec(), Arc::clone(&next));
            tokio::spawn(async move {
                while next.fetch_add(1, Relaxed) < n {
                    let status = tokio::process::Command::new(&command[0])
                        .args(&command[1..])
                        .stdin(std::process::Stdio::null())
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .status()
                        .await?;
                    if !status.success() {
                        return Err(std::io::Error::other(format!("{command:?}: {status}")));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// `run --exec` against the bare spawn loop for `/bin/true` and a shell that
/// reads its stdin: `[(exec, spawn); 2]` per second.
fn exec_and_spawn(
    rt: &tokio::runtime::Runtime,
    (brokers, topic, events): (&str, &str, u64),
    group: &dyn Fn(&str) -> String,
) -> Result<[(f64, f64); 2]> {
    let programs = [
        vec!["/bin/true".to_string()],
        vec!["/bin/sh".into(), "-c".into(), "cat >/dev/null".into()],
    ];
    let mut out = [(0.0, 0.0); 2];
    for (slot, command) in out.iter_mut().zip(&programs) {
        *slot = side_by_side(
            || windowed(|_| exec_pass(rt, (brokers, topic, &group("exec")), events, command)),
            || window_of(events as usize, |n| rt.block_on(spawn_loop(command, n))),
        )?;
    }
    Ok(out)
}

/// The large long-string vectors of `benches/decode.rs`.
const LARGE: [&[u8]; 2] = [
    include_bytes!("../../../../tests/data/large-16k-strings.json"),
    include_bytes!("../../../../tests/data/large-64k-strings.json"),
];

/// Bytes per second of `decode` over `bytes`, timed over at least 200 ms.
fn decode_rate(bytes: &[u8], mut decode: impl FnMut(&[u8]) -> Result<usize>) -> Result<f64> {
    let (mut n, start) = (0u64, Instant::now());
    while start.elapsed() < Duration::from_millis(200) {
        for _ in 0..16 {
            std::hint::black_box(decode(std::hint::black_box(bytes))?);
        }
        n += 16;
    }
    Ok((n as f64 * bytes.len() as f64) / start.elapsed().as_secs_f64())
}

/// `(lower ours / plan over the vectors, ours in GB/s on the largest)`.
fn decode_large() -> Result<(f64, f64)> {
    let decoder = Decoder::new(DecoderConfig::default())?;
    let (mut ratio, mut gbps) = (f64::INFINITY, 0.0);
    for bytes in LARGE {
        let (ours, plan) = side_by_side(
            || decode_rate(bytes, |b| Ok(decoder.decode(b)?.event_type().len())),
            || {
                decode_rate(bytes, |b| {
                    Ok(serde_json::from_slice::<CloudEventMessage>(b)?
                        .event_type
                        .len())
                })
            },
        )?;
        ratio = f64::min(ratio, ours / plan);
        gbps = ours / 1e9;
    }
    Ok((ratio, gbps))
}

/// Runs the family; `forward` and `exec` are topics already holding
/// `forward_events` and `exec_events` generated events.
pub(super) fn run(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    (forward, forward_events): (&str, u64),
    (exec, exec_events): (&str, u64),
    endpoint: &str,
    group: &dyn Fn(&str) -> String,
) -> Result<WrapFigures> {
    let (reporter_posts_0ms, raw_posts_0ms) = reporter_and_raw(rt, Duration::ZERO)?;
    let (reporter_posts_5ms, raw_posts_5ms) = reporter_and_raw(rt, Duration::from_millis(5))?;
    let [forward_key_eps, raw_forward_posts, raw_forward_posts_full] =
        forward_and_raw(rt, (brokers, forward, forward_events), endpoint, group)?;
    let [(exec_true_eps, spawn_true_eps), (exec_sh_eps, spawn_sh_eps)] =
        exec_and_spawn(rt, (brokers, exec, exec_events), group)?;
    let (decode_large_over_plan, decode_large_gbps) = decode_large()?;
    let forward_request_build_us = super::forward::request_build_us()?;
    Ok(WrapFigures {
        reporter_posts_0ms,
        raw_posts_0ms,
        reporter_over_raw_0ms: reporter_posts_0ms / raw_posts_0ms,
        reporter_posts_5ms,
        raw_posts_5ms,
        reporter_over_raw_5ms: reporter_posts_5ms / raw_posts_5ms,
        forward_key_eps,
        raw_forward_posts,
        forward_over_raw: forward_key_eps / raw_forward_posts,
        raw_forward_posts_full,
        forward_over_raw_full: forward_key_eps / raw_forward_posts_full,
        forward_request_build_us,
        exec_true_eps,
        spawn_true_eps,
        exec_sh_eps,
        spawn_sh_eps,
        exec_over_spawn: f64::min(exec_true_eps / spawn_true_eps, exec_sh_eps / spawn_sh_eps),
        decode_large_over_plan,
        decode_large_gbps,
        guard: None,
    })
}
