//! `bench`: in one process, on the same messages, the bare poll loop against the
//! pipeline with a no-op handler.

use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEvent;
use xzepr_consumer::handler::Work;
use xzepr_consumer::pipeline::{Pipeline, WorkTemplate};
use xzepr_consumer::report::{Reporter, ReporterConfig};

use crate::baseline::{self, anyhow_like::Result};
use crate::produce::produce;

/// The figures of one `bench` run.
#[derive(Debug, serde::Serialize)]
pub struct Figures {
    pub events: u64,
    pub partitions: i32,
    pub raw_poll_eps: f64,
    pub pipeline_noop_eps: f64,
    pub noop_over_raw: f64,
    pub api_latency_ms: u64,
    pub report_events: u64,
    pub pipeline_report_eps: f64,
    pub seed_events: u64,
    pub seed_design_eps: f64,
    pub report_over_seed: f64,
}

/// Events per second through the pipeline with automatic lifecycle reporting
/// (two posts per event to the latency endpoint), no-op handler.
fn pipeline_report(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    topic: &str,
    group: &str,
    events: u64,
    api_url: &str,
) -> Result<f64> {
    let (reporter, task) = rt.block_on(async {
        let client = XzeprClient::new(XzeprClientConfig::new(api_url, "bench-token"))?;
        Ok::<_, xzepr_consumer::client::ClientError>(Reporter::start(
            client,
            ReporterConfig::default(),
        ))
    })?;
    let config = KafkaConsumerConfig::new(brokers, topic, "bench").with_group_id(group);
    let running = Pipeline::builder(config)
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
    let rate = time_until_finished(&running, events)?;
    running.shutdown();
    running.join()?;
    drop(running);
    rt.block_on(task.drain(Duration::from_secs(30)));
    Ok(rate)
}

const BENCH_RECEIVER: &str = "01BENCHRECEIVER00000000000";

/// From the first consumed event until `events` have finished.
fn time_until_finished(
    running: &xzepr_consumer::pipeline::RunningPipeline,
    events: u64,
) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut start = None;
    loop {
        let m = running.metrics();
        if m.consumed > 0 {
            start.get_or_insert_with(Instant::now);
        }
        if m.finished >= events {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("pipeline finished only {} of {events}", m.finished).into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(events as f64 / start.map_or(1e-9, |s| s.elapsed().as_secs_f64()))
}

/// Events per second through the pipeline (decode, filter, no-op handler, offset
/// tracking, commits), from the first event consumed until all have finished.
fn pipeline_noop(brokers: &str, topic: &str, group: &str, events: u64) -> Result<f64> {
    let config = KafkaConsumerConfig::new(brokers, topic, "bench").with_group_id(group);
    let running = Pipeline::builder(config).workers(2).start(
        |ev: &CloudEvent<'_>, _: &mut Work| -> std::result::Result<(), String> {
            std::hint::black_box(ev.event_type());
            Ok(())
        },
    )?;
    let rate = time_until_finished(&running, events)?;
    if std::env::var_os("XZEPR_BENCH_DEBUG").is_some() {
        eprintln!("{rate:.0}/s {:?}", running.source().stats());
    }
    running.shutdown();
    running.join()?;
    Ok(rate)
}

/// Rounds per path; the medians are reported.
const ROUNDS: usize = 5;

/// Runs the benchmark on an in-process mock broker.
pub fn run(
    events: u64,
    partitions: i32,
    latency_ms: u64,
    report_events: u64,
    seed_events: u64,
) -> Result<Figures> {
    let cluster = MockCluster::new(1)?;
    let brokers = cluster.bootstrap_servers();
    // The mock keeps ~5 MB per partition: a fresh topic per measured run. Three
    // rounds, the paths alternating first, medians reported.
    let (mut raw, mut noop) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for path in [round % 2, 1 - round % 2] {
            let topic = format!("bench-{round}-{path}");
            cluster.create_topic(&topic, partitions, 1)?;
            produce(
                &brokers,
                &topic,
                0,
                events,
                None,
                "01M82X4ET7AYGAEYSHF5AKVAVW",
            )?;
            let group = format!("bench-{round}-{path}");
            match path {
                0 => raw.push(baseline::raw_poll(&brokers, &topic, &group, events)?),
                _ => noop.push(pipeline_noop(&brokers, &topic, &group, events)?),
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let rates = [median(raw), median(noop)];
    // Reporting paths: against a local endpoint answering after `latency_ms`.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (addr, _count) = rt.block_on(crate::standin::start(Duration::from_millis(latency_ms)))?;
    let api_url = format!("http://{addr}");
    let topic = "bench-report".to_owned();
    cluster.create_topic(&topic, partitions, 1)?;
    produce(
        &brokers,
        &topic,
        0,
        report_events,
        None,
        "01M82X4ET7AYGAEYSHF5AKVAVW",
    )?;
    let report = pipeline_report(
        &rt,
        &brokers,
        &topic,
        "bench-report",
        report_events,
        &api_url,
    )?;
    let topic = "bench-seed".to_owned();
    cluster.create_topic(&topic, partitions, 1)?;
    produce(
        &brokers,
        &topic,
        0,
        seed_events,
        None,
        "01M82X4ET7AYGAEYSHF5AKVAVW",
    )?;
    let seed = rt.block_on(baseline::seed_design(
        &brokers,
        &topic,
        "bench-seed",
        seed_events,
        &api_url,
        "bench-token",
        BENCH_RECEIVER,
    ))?;
    Ok(Figures {
        events,
        partitions,
        raw_poll_eps: rates[0],
        pipeline_noop_eps: rates[1],
        noop_over_raw: rates[1] / rates[0],
        api_latency_ms: latency_ms,
        report_events,
        pipeline_report_eps: report,
        seed_events,
        seed_design_eps: seed,
        report_over_seed: report / seed,
    })
}
