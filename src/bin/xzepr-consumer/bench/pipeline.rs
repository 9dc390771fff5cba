//! The pipeline's own passes: the bare poll loop, the no-op sync pipeline,
//! the async I/O-bound handler, one event per blocked worker thread, and the
//! pipeline with lifecycle reporting.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xzepr_consumer::decode::{CloudEvent, CloudEventMessage};
use xzepr_consumer::dispatch::Ordering;
use xzepr_consumer::handler::{BatchEntry, BatchOutcome, Work, WorkInfo};
use xzepr_consumer::pipeline::{Pipeline, PipelineBuilder, RunningPipeline, WorkTemplate};
use xzepr_consumer::report::ReporterConfig;

use super::{config, debug, start_reporter, stop, time_until_finished, BENCH_RECEIVER};
use crate::baseline::{self, anyhow_like::Result};

/// The no-op pipelines' builder: two workers, traces per `traces`, and
/// `XZEPR_BUDGET` (bytes) as the buffer budget when set.
fn noop_builder(brokers: &str, topic: &str, group: &str, traces: bool) -> PipelineBuilder {
    let mut b = Pipeline::builder(config(brokers, topic, group))
        .workers(2)
        .traces(traces);
    if let Some(v) = std::env::var("XZEPR_BUDGET")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        b = b.buffer_budget(v).max_buffered(1 << 30);
    }
    b
}

/// Times `running` over `events`, then stops it.
fn timed(what: &str, running: RunningPipeline, events: u64) -> Result<(u64, f64)> {
    let r = time_until_finished(&running, events)?;
    if debug() {
        eprintln!(
            "{what} {:.0}/s {:?}",
            r.0 as f64 / r.1,
            running.source().stats()
        );
    }
    stop(running)?;
    Ok(r)
}

/// One pass of the pipeline with a no-op sync handler over `events`.
pub(super) fn pipeline_noop(
    brokers: &str,
    topic: &str,
    group: &str,
    events: u64,
    traces: bool,
) -> Result<(u64, f64)> {
    let running = noop_builder(brokers, topic, group, traces).start(
        |ev: &CloudEvent<'_>, _: &mut Work| -> std::result::Result<(), String> {
            std::hint::black_box(ev.event_type());
            Ok(())
        },
    )?;
    timed("noop", running, events)
}

/// The same with a no-op batch handler: one call per lane's run of up to
/// `batch` (64) events, one outcome each.
pub(super) fn pipeline_batch_noop(
    brokers: &str,
    topic: &str,
    group: &str,
    events: u64,
) -> Result<(u64, f64)> {
    let running = noop_builder(brokers, topic, group, false).start_batch(
        |batch: &mut [BatchEntry<'_, '_>]| -> std::result::Result<Vec<BatchOutcome>, String> {
            Ok(batch
                .iter()
                .map(|e| {
                    std::hint::black_box(e.event().event_type());
                    BatchOutcome::Done(serde_json::Value::Null)
                })
                .collect())
        },
    )?;
    timed("batch noop", running, events)
}

/// One pass of the bare poll loop over `events`.
pub(super) fn raw_pass(brokers: &str, topic: &str, group: &str, events: u64) -> Result<(u64, f64)> {
    let eps = baseline::raw_poll(brokers, topic, group, events)?;
    Ok((events, events as f64 / eps))
}

/// Total and count of the handlers' waits, to measure the real `L`.
#[derive(Default)]
pub(super) struct Waits {
    nanos: AtomicU64,
    count: AtomicU64,
}

/// The most bytes one I/O pass held: in the pipeline's buffers, and
/// prefetched by librdkafka (to break the memory down).
pub(super) struct Peaks {
    pub(super) buffered: u64,
    pub(super) prefetched: u64,
}

impl Waits {
    pub(super) fn mean_ms(&self) -> f64 {
        self.nanos.load(Relaxed) as f64 / self.count.load(Relaxed).max(1) as f64 / 1e6
    }
}

/// One pass of an async handler that only awaits `sleep(latency)`, `PerKey`,
/// `max_in_flight` futures at once, no lifecycle.
pub(super) fn io_pass(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    topic: &str,
    group: &str,
    events: u64,
    (max_in_flight, latency, traces): (usize, Duration, bool),
    waits: &Arc<Waits>,
) -> Result<(u64, f64, Peaks)> {
    let w = Arc::clone(waits);
    let running = Pipeline::builder(config(brokers, topic, group))
        .traces(traces)
        .ordering(Ordering::PerKey)
        .max_in_flight(max_in_flight)
        .runtime(rt.handle().clone())
        .start_async(move |_m: CloudEventMessage, _info: WorkInfo| {
            let w = Arc::clone(&w);
            async move {
                let t = Instant::now();
                tokio::time::sleep(latency).await;
                w.nanos.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
                w.count.fetch_add(1, Relaxed);
                Ok::<_, String>(serde_json::Value::Null)
            }
        })?;
    let (n, secs) = time_until_finished(&running, events)?;
    let stats = running.source().stats();
    let peaks = Peaks {
        buffered: stats.peak_buffered_bytes.load(Relaxed),
        prefetched: stats.peak_prefetched_bytes.load(Relaxed),
    };
    if debug() {
        eprintln!(
            "io {max_in_flight} x {latency:?}: {:.0}/s {:?}",
            n as f64 / secs,
            running.source().stats()
        );
    }
    stop(running)?;
    Ok((n, secs, peaks))
}

/// One pass of a sync handler blocking its thread for `latency`, 4 workers.
pub(super) fn threads_pass(
    brokers: &str,
    topic: &str,
    group: &str,
    events: u64,
) -> Result<(u64, f64)> {
    let running = Pipeline::builder(config(brokers, topic, group))
        .ordering(Ordering::PerKey)
        .workers(4)
        .max_in_flight(8)
        .start(
            |_: &CloudEvent<'_>, _: &mut Work| -> std::result::Result<(), String> {
                std::thread::sleep(Duration::from_millis(5));
                Ok(())
            },
        )?;
    let r = time_until_finished(&running, events)?;
    stop(running)?;
    Ok(r)
}

/// The process's peak resident set while it lives, sampled every 10 ms on a
/// thread of its own.
pub(super) struct PeakRss {
    sampling: Arc<std::sync::atomic::AtomicBool>,
    sampler: std::thread::JoinHandle<f64>,
}

impl PeakRss {
    pub(super) fn start() -> Self {
        let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let on = Arc::clone(&sampling);
        let sampler = std::thread::spawn(move || {
            let mut peak = 0.0f64;
            while on.load(Relaxed) {
                peak = peak.max(rss_mb());
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        PeakRss { sampling, sampler }
    }

    /// The peak in MB.
    pub(super) fn stop(self) -> f64 {
        self.sampling.store(false, Relaxed);
        self.sampler.join().unwrap_or(0.0)
    }
}

/// The process's resident set, in MB (0 where /proc is not there).
pub(super) fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Events per second through the pipeline with automatic lifecycle reporting
/// (two posts per event to the latency endpoint), no-op handler.
pub(super) fn pipeline_report(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    topic: &str,
    group: &str,
    events: u64,
    api_url: &str,
) -> Result<f64> {
    let (reporter, task) = start_reporter(rt.handle(), api_url, ReporterConfig::default())?;
    let running = Pipeline::builder(config(brokers, topic, group))
        .workers(1)
        .lifecycle(
            reporter,
            WorkTemplate::new(BENCH_RECEIVER, "bench", "1.0.0", "bench"),
        )
        .start(
            |ev: &CloudEvent<'_>, _: &mut Work| -> std::result::Result<(), String> {
                std::hint::black_box(ev.event_type());
                Ok(())
            },
        )?;
    let (n, secs) = time_until_finished(&running, events)?;
    stop(running)?;
    rt.block_on(task.drain(Duration::from_secs(30)));
    Ok(n as f64 / secs)
}
