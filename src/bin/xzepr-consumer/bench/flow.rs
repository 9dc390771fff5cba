//! `bench --flow-control`: the reporter's posts against a service with a
//! capacity ([`KneeServer`]), at a sweep of fixed concurrency limits and with
//! the adaptive one, rounds interleaved; and `run --rate` over a backlog.
//!
//! Each pass starts a fresh knee server and reporter, keeps the reporter's
//! queue full for [`SETTLE`] + [`WINDOW`], and counts only the window: the
//! posts acknowledged in it, the server's answer times (2xx, arrival to
//! answer) and the requests it refused for being past `2 × knee`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xzepr_consumer::devstack::{KneeServer, LatencySnapshot};
use xzepr_consumer::dispatch::Ordering;
use xzepr_consumer::flow_control::{Concurrency, RateLimit};
use xzepr_consumer::report::{Ack, OwnedWork, Record, ReporterConfig, Status};

use super::forward::forward_settings;
use super::{config, debug, median, start_reporter, stop, time_until_finished, BENCH_RECEIVER};
use crate::baseline::anyhow_like::Result;

/// Concurrent requests up to which the service's latency stays flat.
const KNEE: usize = 32;
/// Its latency up to the knee: what XZepr takes per event post.
const KNEE_BASE: Duration = Duration::from_millis(5);
/// The fixed limits swept. 1 gives the unloaded latency; 128 is the
/// reporter's default ([`ReporterConfig::default`]).
const FIXED: [usize; 7] = [1, 8, 16, 32, 48, 64, 128];
/// The reporter's default concurrency, the comparison the issue asks for.
const DEFAULT_FIXED: usize = 128;
/// Not counted: the adaptive limit's climb from 1 and the fixed limits'
/// first retries.
const SETTLE: Duration = Duration::from_secs(1);
/// Counted.
const WINDOW: Duration = Duration::from_secs(2);
/// Rounds; each runs every case once, in an order rotated by the round.
const ROUNDS: usize = 3;
/// How often the adaptive limit is sampled in the first round.
const SAMPLE_EVERY: Duration = Duration::from_millis(25);
/// `run --rate`'s target, events a second, and how long the backlog lasts
/// at it.
const RATE: f64 = 2_000.0;
const RATE_SECS: u64 = 20;

/// One concurrency setting's figures, medians over the rounds.
#[derive(Debug, serde::Serialize)]
pub struct KneeCase {
    /// `8`, or `adaptive:1-256`.
    pub concurrency: String,
    /// Posts acknowledged per second in the window.
    pub posts_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Requests past the 503 threshold over all requests, all rounds' windows.
    pub past_threshold_share: f64,
    /// Posts acknowledged with an error in the windows (retries exhausted).
    pub failed: u64,
    pub rounds: Vec<f64>,
}

/// The figures of `bench --flow-control`.
#[derive(Debug, serde::Serialize)]
pub struct FlowFigures {
    pub knee: usize,
    pub knee_base_ms: f64,
    pub knee_cases: Vec<KneeCase>,
    /// The fixed limit with the most posts/s.
    pub best_fixed: usize,
    pub adaptive_over_best_fixed: f64,
    /// The p50 at a fixed limit of 1.
    pub unloaded_ms: f64,
    pub adaptive_p99_over_unloaded: f64,
    pub adaptive_past_threshold_share: f64,
    pub default_fixed_over_best_fixed: f64,
    pub default_fixed_p99_over_unloaded: f64,
    pub default_fixed_past_threshold_share: f64,
    /// `(ms since the reporter started, limit)` for the first adaptive pass.
    pub adaptive_limit_over_time: Vec<(u64, usize)>,
    pub rate_target: f64,
    pub rate_events: u64,
    /// Events over the time from the first consumed to the last finished
    /// (the bucket starts full: its burst, a tenth of a second's worth, is
    /// inside that).
    pub rate_measured: f64,
    pub rate_measured_over_target: f64,
    /// Handler attempts that failed, plus dead letters.
    pub rate_failed: u64,
}

impl std::fmt::Display for FlowFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "reporter to a knee server (flat {:.0} ms to {} concurrent, 503 past {}):",
            self.knee_base_ms,
            self.knee,
            2 * self.knee
        )?;
        for c in &self.knee_cases {
            writeln!(
                f,
                "  {:>16}: {:>7.0} posts/s  p50 {:>6.2} ms  p99 {:>6.2} ms  past 503 threshold {:.2} %",
                c.concurrency,
                c.posts_per_s,
                c.p50_ms,
                c.p99_ms,
                c.past_threshold_share * 100.0
            )?;
        }
        writeln!(
            f,
            "adaptive_over_best_fixed: {:.3} (best fixed {}); adaptive_p99_over_unloaded: {:.2} (unloaded {:.2} ms); past threshold {:.2} %",
            self.adaptive_over_best_fixed,
            self.best_fixed,
            self.adaptive_p99_over_unloaded,
            self.unloaded_ms,
            self.adaptive_past_threshold_share * 100.0
        )?;
        write!(
            f,
            "run --rate {:.0}: {:.1} events/s over {} events ({:.4} of target), {} failed",
            self.rate_target,
            self.rate_measured,
            self.rate_events,
            self.rate_measured_over_target,
            self.rate_failed
        )
    }
}

/// What one pass counted in its window.
struct Pass {
    posts_per_s: f64,
    failed: u64,
    requests: u64,
    past_threshold: u64,
    latency: LatencySnapshot,
    samples: Vec<(u64, usize)>,
}

/// One pass of the reporter under `concurrency` against a fresh knee server.
async fn knee_pass(concurrency: Concurrency, sample: bool) -> Result<Pass> {
    let server = KneeServer::start(KNEE, KNEE_BASE).await?;
    let mut rc = ReporterConfig::default();
    rc.concurrency = concurrency;
    let (reporter, task) = start_reporter(&tokio::runtime::Handle::current(), &server.url(), rc)?;
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let feeder = tokio::spawn({
        let (reporter, ok, failed) = (reporter.clone(), Arc::clone(&ok), Arc::clone(&failed));
        async move {
            for i in 0u64.. {
                let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
                let record = Record {
                    work: OwnedWork::new(
                        BENCH_RECEIVER,
                        format!("w-{i}"),
                        "bench",
                        "1.0.0",
                        "linux",
                        "bench",
                    ),
                    status: Status::Started,
                    details: serde_json::Value::Null,
                    error: None,
                    trace: None,
                    ack: Ack::new(move |r| {
                        let counter = if r.is_ok() { &ok } else { &failed };
                        counter.fetch_add(1, Relaxed);
                    }),
                };
                if reporter.send(record).await.is_err() {
                    break;
                }
            }
        }
    });
    let began = Instant::now();
    let mut samples = Vec::new();
    let snapshot = || {
        let st = server.stats();
        (
            ok.load(Relaxed),
            failed.load(Relaxed),
            st.requests.load(Relaxed),
            st.over_threshold.load(Relaxed),
            st.latency.snapshot(),
        )
    };
    let mut settled = None;
    let mut settled_at = began;
    while began.elapsed() < SETTLE + WINDOW {
        tokio::time::sleep(SAMPLE_EVERY).await;
        if sample {
            samples.push((
                began.elapsed().as_millis() as u64,
                reporter.limiter().limit(),
            ));
        }
        if settled.is_none() && began.elapsed() >= SETTLE {
            settled = Some(snapshot());
            settled_at = Instant::now();
        }
    }
    let end = snapshot();
    let secs = settled_at.elapsed().as_secs_f64();
    feeder.abort();
    drop(reporter);
    // The window is counted; what is still queued is not waited for.
    task.drain(Duration::from_millis(100)).await;
    let start = settled.ok_or("the window never started")?;
    Ok(Pass {
        posts_per_s: (end.0 - start.0) as f64 / secs,
        failed: end.1 - start.1,
        requests: end.2 - start.2,
        past_threshold: end.3 - start.3,
        latency: end.4.since(&start.4),
        samples,
    })
}

fn ms(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

/// The knee sweep and the rate case; `endpoint` answers at once (the
/// `run --forward` target of the rate case).
pub(super) fn run(
    rt: &tokio::runtime::Runtime,
    cluster: &rdkafka::mocking::MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    brokers: &str,
    endpoint: &str,
) -> Result<FlowFigures> {
    let adaptive = Concurrency::Adaptive {
        min: xzepr_consumer::flow_control::ADAPTIVE_MIN,
        max: xzepr_consumer::flow_control::ADAPTIVE_MAX,
    };
    let settings: Vec<Concurrency> = FIXED
        .iter()
        .map(|&n| Concurrency::Fixed(n))
        .chain([adaptive])
        .collect();
    let mut passes: Vec<Vec<Pass>> = settings.iter().map(|_| Vec::new()).collect();
    let mut limit_over_time = Vec::new();
    for round in 0..ROUNDS {
        for i in (0..settings.len()).map(|i| (i + round) % settings.len()) {
            let sample = round == 0 && settings[i].is_adaptive();
            let pass = rt.block_on(knee_pass(settings[i], sample))?;
            if debug() {
                eprintln!(
                    "knee round {round} {}: {:.0} posts/s, p99 {:.2} ms, {} of {} past threshold",
                    settings[i],
                    pass.posts_per_s,
                    ms(pass.latency.quantile(0.99)),
                    pass.past_threshold,
                    pass.requests
                );
            }
            if sample {
                limit_over_time.clone_from(&pass.samples);
            }
            passes[i].push(pass);
        }
    }
    let cases: Vec<KneeCase> = settings
        .iter()
        .zip(&passes)
        .map(|(c, ps)| {
            let (requests, past) = ps
                .iter()
                .fold((0, 0), |(r, p), x| (r + x.requests, p + x.past_threshold));
            let rounds: Vec<f64> = ps.iter().map(|p| p.posts_per_s).collect();
            KneeCase {
                concurrency: c.to_string(),
                posts_per_s: median(rounds.clone()),
                p50_ms: median(ps.iter().map(|p| ms(p.latency.quantile(0.5))).collect()),
                p99_ms: median(ps.iter().map(|p| ms(p.latency.quantile(0.99))).collect()),
                past_threshold_share: past as f64 / requests.max(1) as f64,
                failed: ps.iter().map(|p| p.failed).sum(),
                rounds,
            }
        })
        .collect();
    let fixed = &cases[..FIXED.len()];
    let (best, best_case) = FIXED
        .iter()
        .zip(fixed)
        .max_by(|a, b| a.1.posts_per_s.total_cmp(&b.1.posts_per_s))
        .ok_or("no fixed case")?;
    let unloaded_ms = fixed[0].p50_ms;
    let default = &fixed[FIXED
        .iter()
        .position(|&n| n == DEFAULT_FIXED)
        .ok_or("the default is swept")?];
    let adaptive = cases.last().ok_or("no adaptive case")?;
    let (measured, events, failed) = rate_case(rt, cluster, brokers, endpoint)?;
    Ok(FlowFigures {
        knee: KNEE,
        knee_base_ms: KNEE_BASE.as_secs_f64() * 1e3,
        best_fixed: *best,
        adaptive_over_best_fixed: adaptive.posts_per_s / best_case.posts_per_s,
        unloaded_ms,
        adaptive_p99_over_unloaded: adaptive.p99_ms / unloaded_ms,
        adaptive_past_threshold_share: adaptive.past_threshold_share,
        default_fixed_over_best_fixed: default.posts_per_s / best_case.posts_per_s,
        default_fixed_p99_over_unloaded: default.p99_ms / unloaded_ms,
        default_fixed_past_threshold_share: default.past_threshold_share,
        adaptive_limit_over_time: limit_over_time,
        rate_target: RATE,
        rate_events: events,
        rate_measured: measured,
        rate_measured_over_target: measured / RATE,
        rate_failed: failed,
        knee_cases: cases,
    })
}

/// `run --rate RATE --forward ENDPOINT --no-report` over a backlog of
/// `RATE × RATE_SECS` events produced ahead: `(events/s, events, failed)`.
fn rate_case(
    rt: &tokio::runtime::Runtime,
    cluster: &rdkafka::mocking::MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    brokers: &str,
    endpoint: &str,
) -> Result<(f64, u64, u64)> {
    let events = RATE as u64 * RATE_SECS;
    cluster.create_topic("bench-rate", 16, 1)?;
    crate::produce::produce(
        brokers,
        "bench-rate",
        0,
        events,
        None,
        super::SOURCE_RECEIVER,
    )?;
    let mut settings = forward_settings(Ordering::PerPartition);
    settings.source.rate_limit = Some(RateLimit::per_second(RATE));
    let running = crate::run::start(
        config(brokers, "bench-rate", "bench-rate"),
        crate::run::Action::Forward(crate::forward::Forward::new(endpoint, false, 128)?),
        &settings,
        rt.handle().clone(),
        None,
    )?;
    let (n, secs) = time_until_finished(&running, events)?;
    let m = running.metrics();
    stop(running)?;
    Ok((n as f64 / secs, n, m.handler_failed + m.dead_lettered))
}
