//! `bench`: in one process, on the same messages, the bare poll loop against the
//! pipeline with a no-op handler; the async engine with I/O-bound handlers
//! against Little's law; the memory held under a backlog far larger than the
//! budget; lifecycle reporting against the plan's sequential design; and
//! `run --forward` (the command's own pipeline and forwarder) to a local HTTP
//! endpoint that answers at once.
//!
//! Every round of every case measures at least [`MIN_WINDOW`] of work (repeated
//! passes over a topic, each with a fresh consumer group, timed from its first
//! message), so that medians from two runs agree.
//!
//! With `--flow-control`, also the reporter against a service with a knee at
//! fixed and adaptive concurrency, and `run --rate` over a backlog.
//!
//! With `--postgres`, also the pipeline with the PostgreSQL idempotency guard
//! against the guide's way in the same pipeline.
//!
//! With `--broker`, also the no-op, I/O and reporting cases and the memory
//! under a backlog against a broker in its own process (Tansu, or an address).
//!
//! One file per family of cases: `pipeline.rs` (poll loop, no-op, batch
//! no-op, I/O, threads, reporting), `forward.rs` (`run --forward`), `wraps.rs`
//! (the reporter, `run --forward`, `run --exec` and large-event decoding
//! beside the bare thing each wraps), `guard.rs` (the idempotency guard),
//! `flow.rs` (flow control), `traces.rs`
//! (the OTLP sink of `bench --traces`), `broker.rs` (the broker apart); this
//! file holds the settings, the figures and the order the cases run in.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::dispatch::Ordering;
use xzepr_consumer::pipeline::RunningPipeline;
use xzepr_consumer::report::{Reporter, ReporterConfig, ReporterTask};

use crate::baseline::{self, anyhow_like::Result};
use crate::produce::produce;

mod broker;
mod flow;
mod forward;
mod guard;
mod pipeline;
#[cfg(feature = "otel")]
mod traces;
mod wraps;

pub use broker::{BrokerSettings, Target};
use forward::{run_forward, zero_ms_endpoint};
pub use guard::Postgres;
use pipeline::{
    io_pass, pipeline_batch_noop, pipeline_noop, pipeline_report, raw_pass, rss_mb, threads_pass,
    PeakRss, Waits,
};
#[cfg(feature = "otel")]
pub use traces::traces;
pub use wraps::WrapFigures;

/// Least measured time per round of a case.
const MIN_WINDOW: Duration = Duration::from_secs(1);

/// The settings of one `bench` run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Events per topic of the poll/no-op rounds.
    pub events: u64,
    /// Partitions of those topics.
    pub partitions: i32,
    /// Rounds of the poll/no-op comparison (medians reported).
    pub rounds: usize,
    /// Events of the I/O-bound topic.
    pub io_events: u64,
    /// Messages waiting in the broker for the memory case.
    pub backlog: u64,
    /// Latency of the local XZepr endpoint, in ms.
    pub latency_ms: u64,
    /// Events for the reporting pipeline.
    pub report_events: u64,
    /// Events for the plan's sequential design.
    pub seed_events: u64,
    /// Events for `run --forward`.
    pub forward_events: u64,
    /// Events for `run --exec`.
    pub exec_events: u64,
    /// Also the no-op and I/O cases with traces on.
    pub traces: bool,
    /// Also the flow-control cases (`flow.rs`).
    pub flow_control: bool,
    /// Also the cases against a broker apart (`broker.rs`).
    pub broker: Option<broker::BrokerSettings>,
    /// Also the idempotency guard against the guide's way (`guard.rs`).
    pub postgres: Option<guard::Postgres>,
    /// Events of that comparison.
    pub guard_events: u64,
}

/// The figures of one `bench` run.
#[derive(Debug, serde::Serialize)]
pub struct Figures {
    pub events: u64,
    pub partitions: i32,
    pub rounds: usize,
    pub raw_poll_eps: f64,
    pub pipeline_noop_eps: f64,
    pub noop_over_raw: f64,
    pub raw_poll_rounds: Vec<f64>,
    pub pipeline_noop_rounds: Vec<f64>,
    /// The no-op as a batch handler (a call per lane's run of up to 64), in
    /// the same rounds.
    pub pipeline_batch_noop_eps: f64,
    pub batch_over_single: f64,
    pub pipeline_batch_noop_rounds: Vec<f64>,
    pub io_events: u64,
    pub io_eps_256_5ms: f64,
    pub io_eps_1024_20ms: f64,
    /// The lower of the two `eps / (N / L)`, with the nominal `L`.
    pub littles_law_efficiency: f64,
    /// The same with `L` the handlers' measured mean wait (tokio's timer rounds
    /// a sleep up to its next millisecond tick).
    pub littles_law_efficiency_measured_l: f64,
    pub io_mean_wait_ms_5: f64,
    pub io_mean_wait_ms_20: f64,
    /// One event in flight per worker thread (4 threads each blocked 5 ms): the
    /// shape of the engine before the async one.
    pub io_eps_threads_4_5ms: f64,
    pub backlog: u64,
    pub buffer_budget: u64,
    pub peak_buffered_bytes: u64,
    pub rss_before_mb: f64,
    pub peak_rss_mb: f64,
    pub api_latency_ms: u64,
    pub report_events: u64,
    pub pipeline_report_eps: f64,
    pub seed_events: u64,
    pub seed_design_eps: f64,
    pub report_over_seed: f64,
    pub forward_events: u64,
    /// `run --forward --no-report` to a local endpoint answering at once
    /// (binary mode, the command's defaults), events per second.
    pub run_forward_eps: f64,
    /// The same with lifecycle reporting to the XZepr endpoint
    /// (`api_latency_ms`).
    pub run_forward_report_eps: f64,
    /// The same with `--ordering key` (XZepr keys by event id: every event its
    /// own lane), so a partition's events wait on their posts concurrently.
    pub run_forward_report_key_eps: f64,
    /// With `--traces`: the no-op pipeline with a span per event and step,
    /// in the same rounds as `pipeline_noop_eps`.
    pub pipeline_noop_traced_eps: Option<f64>,
    pub noop_traced_over_noop: Option<f64>,
    pub pipeline_noop_traced_rounds: Vec<f64>,
    /// With `--traces`: `io_eps_256_5ms` with traces on, rounds interleaved
    /// with an untraced rerun (`io_eps_256_5ms_untraced`).
    pub io_eps_256_5ms_traced: Option<f64>,
    pub io_eps_256_5ms_untraced: Option<f64>,
    pub io_eps_256_5ms_traced_rounds: Vec<f64>,
    pub io_eps_256_5ms_untraced_rounds: Vec<f64>,
    /// With `--flow-control`: the knee sweep and the rate limit.
    #[serde(flatten)]
    pub flow_control: Option<flow::FlowFigures>,
    /// Each path beside the bare thing it wraps.
    #[serde(flatten)]
    pub wraps: wraps::WrapFigures,
    /// With `--broker`: the same cases against a broker in its own process.
    #[serde(flatten)]
    pub broker: Option<broker::BrokerFigures>,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} events per topic over {} partitions, {} rounds, medians",
            self.events, self.partitions, self.rounds
        )?;
        writeln!(f, "raw_poll_eps:          {:>10.0}", self.raw_poll_eps)?;
        writeln!(
            f,
            "pipeline_noop_eps:     {:>10.0}  ({:.2} of raw)",
            self.pipeline_noop_eps, self.noop_over_raw
        )?;
        writeln!(
            f,
            "pipeline_batch_noop:   {:>10.0}  ({:.2} of the single-event no-op)",
            self.pipeline_batch_noop_eps, self.batch_over_single
        )?;
        writeln!(
            f,
            "io_eps_256_5ms:        {:>10.0}  (ideal 51,200)",
            self.io_eps_256_5ms
        )?;
        writeln!(
            f,
            "io_eps_1024_20ms:      {:>10.0}  (ideal 51,200)",
            self.io_eps_1024_20ms
        )?;
        writeln!(
            f,
            "littles_law_efficiency: {:>9.3}  ({:.3} against the measured waits)",
            self.littles_law_efficiency, self.littles_law_efficiency_measured_l
        )?;
        writeln!(
            f,
            "io_eps_threads_4_5ms:  {:>10.0}  (one in flight per worker thread)",
            self.io_eps_threads_4_5ms
        )?;
        writeln!(
            f,
            "backlog {}: peak_buffered_bytes {} (budget {}), rss {:.0} MB before, {:.0} MB peak",
            self.backlog,
            self.peak_buffered_bytes,
            self.buffer_budget,
            self.rss_before_mb,
            self.peak_rss_mb
        )?;
        writeln!(f, "with XZepr answering in {} ms:", self.api_latency_ms)?;
        writeln!(
            f,
            "pipeline_report_eps:   {:>10.0}  ({} events, lifecycle posts acknowledged)",
            self.pipeline_report_eps, self.report_events
        )?;
        writeln!(
            f,
            "seed_design_eps:       {:>10.0}  ({} events, the plan's sequential design)",
            self.seed_design_eps, self.seed_events
        )?;
        writeln!(f, "report / seed:         {:>10.1}x", self.report_over_seed)?;
        writeln!(
            f,
            "run_forward_eps:       {:>10.0}  ({} events, run --forward --no-report to a 0 ms endpoint; {:.2} of pipeline_noop_eps)",
            self.run_forward_eps,
            self.forward_events,
            self.run_forward_eps / self.pipeline_noop_eps
        )?;
        if let (Some(noop), Some(io), Some(io_off)) = (
            self.pipeline_noop_traced_eps,
            self.io_eps_256_5ms_traced,
            self.io_eps_256_5ms_untraced,
        ) {
            writeln!(
                f,
                "pipeline_noop_traced_eps: {noop:>7.0}  ({:.2} of pipeline_noop_eps, same rounds)",
                noop / self.pipeline_noop_eps
            )?;
            writeln!(
                f,
                "io_eps_256_5ms_traced: {io:>10.0}  ({:.2} of {io_off:.0} untraced, same rounds)",
                io / io_off
            )?;
        }
        writeln!(
            f,
            "run_forward_report_eps:{:>10.0}  (the same, reporting to XZepr answering in {} ms)",
            self.run_forward_report_eps, self.api_latency_ms
        )?;
        write!(
            f,
            "run_forward_report_key_eps:{:>6.0}  (the same with --ordering key)",
            self.run_forward_report_key_eps
        )?;
        write!(f, "\n{}", self.wraps)?;
        if let Some(flow) = &self.flow_control {
            write!(f, "\n{flow}")?;
        }
        if let Some(broker) = &self.broker {
            write!(f, "\n{broker}")?;
        }
        Ok(())
    }
}

fn debug() -> bool {
    std::env::var_os("XZEPR_BENCH_DEBUG").is_some()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs `pass` (which returns `(events, seconds)`) until at least
/// [`MIN_WINDOW`] was measured; events per second over all passes.
fn windowed(mut pass: impl FnMut(usize) -> Result<(u64, f64)>) -> Result<f64> {
    let (mut events, mut secs) = (0u64, 0.0f64);
    let mut i = 0;
    while secs < MIN_WINDOW.as_secs_f64() {
        let (e, s) = pass(i)?;
        events += e;
        secs += s;
        i += 1;
    }
    Ok(events as f64 / secs.max(1e-9))
}

/// From the first consumed event until `events` have finished: `(events, secs)`.
fn time_until_finished(running: &RunningPipeline, events: u64) -> Result<(u64, f64)> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut start = None;
    let mut ticks = 0u64;
    loop {
        let m = running.metrics();
        ticks += 1;
        if debug() && ticks % 20 == 0 {
            let st = running.source().stats();
            eprintln!(
                "  consumed {} finished {} polled {} jobs {} in_flight {} buffered {} pauses {}",
                m.consumed,
                m.finished,
                st.polled.load(Relaxed),
                st.jobs.load(Relaxed),
                st.in_flight.load(Relaxed),
                st.buffered_bytes.load(Relaxed),
                st.pauses.load(Relaxed)
            );
        }
        if m.consumed > 0 {
            start.get_or_insert_with(Instant::now);
        }
        if m.finished >= events {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("pipeline finished only {} of {events}", m.finished).into());
        }
        // Coarse on purpose: a waking thread competes with the pipeline for
        // the two cores; 5 ms in windows of at least a second is 0.5 %.
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((events, start.map_or(1e-9, |s| s.elapsed().as_secs_f64())))
}

fn stop(running: RunningPipeline) -> Result<()> {
    running.shutdown();
    running.join()?;
    Ok(())
}

/// A reporter posting to `url` with `bench`'s token, its tasks on `rt`.
fn start_reporter(
    rt: &tokio::runtime::Handle,
    url: &str,
    config: ReporterConfig,
) -> Result<(Reporter, ReporterTask)> {
    let _entered = rt.enter();
    let client = XzeprClient::new(XzeprClientConfig::new(url, "bench-token"))?;
    Ok(Reporter::start(client, config))
}

fn config(brokers: &str, topic: &str, group: &str) -> KafkaConsumerConfig {
    KafkaConsumerConfig::new(brokers, topic, "bench").with_group_id(group)
}

const BENCH_RECEIVER: &str = "01BENCHRECEIVER00000000000";
const SOURCE_RECEIVER: &str = "01M82X4ET7AYGAEYSHF5AKVAVW";

/// Creates `name` with `partitions` on the mock broker and produces `events`
/// generated events into it.
fn fill_topic(
    cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    (brokers, name): (&str, &str),
    partitions: i32,
    events: u64,
) -> Result<()> {
    cluster.create_topic(name, partitions, 1)?;
    produce(brokers, name, 0, events, None, SOURCE_RECEIVER)?;
    Ok(())
}

/// The runtime every case runs on: two workers, as the machine has two cores.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Consumer group names, fresh for each pass.
fn groups() -> impl Fn(&str) -> String {
    let n = AtomicU64::new(0);
    move |what: &str| format!("bench-{what}-{}", n.fetch_add(1, Relaxed))
}

/// Only the paths beside the bare thing each wraps (`wraps.rs`, `bench
/// --wraps-only`): a minute or two instead of the whole run, so one of them
/// can be profiled on its own.
pub fn run_wraps(s: &Settings) -> Result<WrapFigures> {
    let cluster = MockCluster::new(1)?;
    let brokers = cluster.bootstrap_servers();
    let rt = runtime()?;
    let endpoint = zero_ms_endpoint(&rt)?;
    fill_topic(
        &cluster,
        (&brokers, "bench-forward"),
        s.partitions,
        s.forward_events,
    )?;
    wraps_family(&rt, &cluster, s, &endpoint, &groups())
}

/// The family of `wraps.rs`, on `cluster` whose `bench-forward` holds
/// `forward_events` generated events: fills `bench-exec`, then runs it.
fn wraps_family(
    rt: &tokio::runtime::Runtime,
    cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    s: &Settings,
    endpoint: &str,
    group: &dyn Fn(&str) -> String,
) -> Result<WrapFigures> {
    let brokers = cluster.bootstrap_servers();
    fill_topic(
        cluster,
        (&brokers, "bench-exec"),
        s.partitions,
        s.exec_events,
    )?;
    let mut figures = wraps::run(
        rt,
        &brokers,
        ("bench-forward", s.forward_events),
        ("bench-exec", s.exec_events),
        endpoint,
        group,
    )?;
    if let Some(target) = &s.postgres {
        fill_topic(
            cluster,
            (&brokers, "bench-guard"),
            s.partitions,
            s.guard_events,
        )?;
        figures.guard = Some(guard_family(rt, &brokers, s.guard_events, target, group)?);
    }
    Ok(figures)
}

#[cfg(feature = "postgres")]
fn guard_family(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    events: u64,
    target: &guard::Postgres,
    group: &dyn Fn(&str) -> String,
) -> Result<guard::GuardFigures> {
    guard::run(rt, (brokers, "bench-guard", events), target, group)
}

#[cfg(not(feature = "postgres"))]
fn guard_family(
    _: &tokio::runtime::Runtime,
    _: &str,
    _: u64,
    _: &guard::Postgres,
    _: &dyn Fn(&str) -> String,
) -> Result<guard::GuardFigures> {
    Err("bench --postgres needs a build with feature postgres".into())
}

/// Runs the benchmark on an in-process mock broker.
pub fn run(s: &Settings) -> Result<Figures> {
    let cluster = MockCluster::new(1)?;
    let brokers = cluster.bootstrap_servers();
    let rt = runtime()?;
    let group = groups();
    // The broker apart first: its memory case reads this process's resident
    // set, which the mock's backlog would fill.
    let broker = (s.broker.as_ref())
        .map(|b| broker::run(&rt, b, s, &group))
        .transpose()?;

    // Memory first, while the process holds nothing else: a backlog far larger
    // than the budget, consumed by the I/O case for a few seconds.
    let partitions = i32::try_from(s.backlog.div_ceil(4_000))
        .unwrap_or(i32::MAX)
        .max(1);
    fill_topic(&cluster, (&brokers, "bench-backlog"), partitions, s.backlog)?;
    let rss_before_mb = rss_mb();
    let sampler = PeakRss::start();
    let waits = Arc::new(Waits::default());
    let (_, _, peaks) = io_pass(
        &rt,
        &brokers,
        "bench-backlog",
        &group("backlog"),
        (s.backlog / 5).max(1),
        (1024, Duration::from_millis(20), false),
        &waits,
    )?;
    let peak_rss_mb = sampler.stop();

    // The bare poll loop against the no-op pipeline, on the same messages.
    // With traces, the traced no-op pipeline is a third path of each round.
    let (mut raw, mut noop, mut batch, mut traced) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let paths = if s.traces { 4 } else { 3 };
    for round in 0..s.rounds {
        let topic = format!("bench-{round}");
        fill_topic(&cluster, (&brokers, &topic), s.partitions, s.events)?;
        for path in (0..paths).map(|p| (p + round) % paths) {
            let noop_pass = |traces| {
                windowed(|_| pipeline_noop(&brokers, &topic, &group("noop"), s.events, traces))
            };
            let rate = match path {
                0 => windowed(|_| raw_pass(&brokers, &topic, &group("raw"), s.events))?,
                1 => noop_pass(false)?,
                2 => {
                    windowed(|_| pipeline_batch_noop(&brokers, &topic, &group("batch"), s.events))?
                }
                _ => noop_pass(true)?,
            };
            if debug() {
                eprintln!("round {round} path {path}: {rate:.0}/s");
            }
            match path {
                0 => raw.push(rate),
                1 => noop.push(rate),
                2 => batch.push(rate),
                _ => traced.push(rate),
            }
        }
    }
    let (raw_poll_eps, pipeline_noop_eps) = (median(raw.clone()), median(noop.clone()));

    // I/O-bound handlers: Little's law says N in flight of L each give N / L.
    let io_partitions = i32::try_from(s.io_events.div_ceil(4_000))
        .unwrap_or(1)
        .max(1);
    fill_topic(&cluster, (&brokers, "bench-io"), io_partitions, s.io_events)?;
    let mut io = Vec::new();
    for (n, ms) in [(256usize, 5u64), (1024, 20)] {
        let waits = Arc::new(Waits::default());
        let mut rounds = Vec::new();
        for _ in 0..3 {
            rounds.push(windowed(|_| {
                let (e, secs, _) = io_pass(
                    &rt,
                    &brokers,
                    "bench-io",
                    &group("io"),
                    s.io_events,
                    (n, Duration::from_millis(ms), false),
                    &waits,
                )?;
                Ok((e, secs))
            })?);
        }
        let eps = median(rounds);
        io.push((
            eps,
            eps / (n as f64 / (ms as f64 / 1e3)),
            waits.mean_ms(),
            n,
        ));
    }
    let measured =
        |(eps, _, wait_ms, n): (f64, f64, f64, usize)| eps / (n as f64 / (wait_ms / 1e3));
    // Traces on and off at 256 x 5 ms, alternating, in the same minutes.
    let (mut io_on, mut io_off) = (Vec::new(), Vec::new());
    if s.traces {
        let waits = Arc::new(Waits::default());
        for round in 0..6 {
            let traces = round % 2 == 0;
            let rate = windowed(|_| {
                let (e, secs, _) = io_pass(
                    &rt,
                    &brokers,
                    "bench-io",
                    &group("io-traces"),
                    s.io_events,
                    (256, Duration::from_millis(5), traces),
                    &waits,
                )?;
                Ok((e, secs))
            })?;
            if traces {
                io_on.push(rate);
            } else {
                io_off.push(rate);
            }
        }
    }
    let threads_events = 2_000.min(s.io_events);
    let io_eps_threads_4_5ms =
        windowed(|_| threads_pass(&brokers, "bench-io", &group("threads"), threads_events))?;

    // Reporting paths: against a local endpoint answering after `latency_ms`.
    let (addr, _standin) =
        rt.block_on(crate::standin::start(Duration::from_millis(s.latency_ms)))?;
    let api_url = format!("http://{addr}");
    fill_topic(
        &cluster,
        (&brokers, "bench-report"),
        s.partitions,
        s.report_events,
    )?;
    let report = pipeline_report(
        &rt,
        &brokers,
        "bench-report",
        "bench-report",
        s.report_events,
        &api_url,
    )?;
    fill_topic(
        &cluster,
        (&brokers, "bench-seed"),
        s.partitions,
        s.seed_events,
    )?;
    let seed = rt.block_on(baseline::seed_design(
        &brokers,
        "bench-seed",
        "bench-seed",
        s.seed_events,
        &api_url,
        "bench-token",
        BENCH_RECEIVER,
    ))?;
    // `run --forward` to an endpoint answering at once, without and with the
    // lifecycle posts.
    let endpoint = zero_ms_endpoint(&rt)?;
    fill_topic(
        &cluster,
        (&brokers, "bench-forward"),
        s.partitions,
        s.forward_events,
    )?;
    let mut forward_rounds = Vec::new();
    for _ in 0..3 {
        forward_rounds.push(windowed(|_| {
            let group = group("forward");
            run_forward(
                &rt,
                (&brokers, "bench-forward", &group),
                s.forward_events,
                (&endpoint, Ordering::PerPartition),
                None,
            )
        })?);
    }
    let run_forward_eps = median(forward_rounds);
    let mut reported = Vec::new();
    for ordering in [Ordering::PerPartition, Ordering::PerKey] {
        let group = group("forward-report");
        let (n, secs) = run_forward(
            &rt,
            (&brokers, "bench-forward", &group),
            s.forward_events,
            (&endpoint, ordering),
            Some(&api_url),
        )?;
        reported.push(n as f64 / secs);
    }
    let wraps = wraps_family(&rt, &cluster, s, &endpoint, &group)?;
    let flow_control = if s.flow_control {
        Some(flow::run(&rt, &cluster, &brokers, &endpoint)?)
    } else {
        None
    };
    Ok(Figures {
        events: s.events,
        partitions: s.partitions,
        rounds: s.rounds,
        raw_poll_eps,
        pipeline_noop_eps,
        noop_over_raw: pipeline_noop_eps / raw_poll_eps,
        raw_poll_rounds: raw,
        pipeline_noop_rounds: noop,
        pipeline_batch_noop_eps: median(batch.clone()),
        batch_over_single: median(batch.clone()) / pipeline_noop_eps,
        pipeline_batch_noop_rounds: batch,
        io_events: s.io_events,
        io_eps_256_5ms: io[0].0,
        io_eps_1024_20ms: io[1].0,
        littles_law_efficiency: io[0].1.min(io[1].1),
        littles_law_efficiency_measured_l: measured(io[0]).min(measured(io[1])),
        io_mean_wait_ms_5: io[0].2,
        io_mean_wait_ms_20: io[1].2,
        io_eps_threads_4_5ms,
        backlog: s.backlog,
        buffer_budget: xzepr_consumer::source::SourceOptions::default().buffer_budget as u64,
        peak_buffered_bytes: peaks.buffered,
        rss_before_mb,
        peak_rss_mb,
        api_latency_ms: s.latency_ms,
        report_events: s.report_events,
        pipeline_report_eps: report,
        seed_events: s.seed_events,
        seed_design_eps: seed,
        report_over_seed: report / seed,
        forward_events: s.forward_events,
        run_forward_eps,
        run_forward_report_eps: reported[0],
        run_forward_report_key_eps: reported[1],
        pipeline_noop_traced_eps: s.traces.then(|| median(traced.clone())),
        noop_traced_over_noop: s.traces.then(|| median(traced.clone()) / pipeline_noop_eps),
        pipeline_noop_traced_rounds: traced,
        io_eps_256_5ms_traced: s.traces.then(|| median(io_on.clone())),
        io_eps_256_5ms_untraced: s.traces.then(|| median(io_off.clone())),
        io_eps_256_5ms_traced_rounds: io_on,
        io_eps_256_5ms_untraced_rounds: io_off,
        flow_control,
        wraps,
        broker,
    })
}
