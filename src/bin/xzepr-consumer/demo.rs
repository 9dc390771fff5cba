//! `demo`: producer → in-process broker → pipeline with automatic lifecycle →
//! XZepr stand-in (which publishes every recorded event back, as XZepr does), end
//! to end, with a summary; fails if anything was lost.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::{Offset, TopicPartitionList};
use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEvent;
use xzepr_consumer::devstack::{KafkaSink, StandIn};
use xzepr_consumer::handler::Work;
use xzepr_consumer::pipeline::{Pipeline, WorkTemplate};
use xzepr_consumer::report::{Reporter, ReporterConfig};

use crate::baseline::anyhow_like::Result;
use crate::produce::produce;

const TOPIC: &str = "xzepr.dev.events";
const TOKEN: &str = "demo-token";

/// The demo's summary.
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub produced: u64,
    pub consumed: u64,
    pub handled: u64,
    pub posted_started: u64,
    pub posted_completed: u64,
    pub posted_failed: u64,
    pub lost: u64,
    pub committed: i64,
    pub end_offsets: i64,
    pub events_per_s: f64,
    pub wall_s: f64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "events produced:              {:>10}", self.produced)?;
        writeln!(
            f,
            "messages consumed:            {:>10}  (events, our own republished posts, the receiver)",
            self.consumed
        )?;
        writeln!(f, "events handled:               {:>10}", self.handled)?;
        writeln!(
            f,
            "posted started / completed / failed: {} / {} / {}",
            self.posted_started, self.posted_completed, self.posted_failed
        )?;
        writeln!(f, "events lost:                  {:>10}", self.lost)?;
        writeln!(
            f,
            "offsets committed / end:      {:>10} / {}",
            self.committed, self.end_offsets
        )?;
        writeln!(
            f,
            "handled and reported:         {:>10.0} events/s",
            self.events_per_s
        )?;
        write!(f, "wall time:                    {:>10.1} s", self.wall_s)
    }
}

fn offsets(brokers: &str, partitions: i32) -> Result<(i64, i64)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "xzepr-consumer-demo")
        .create()?;
    let mut ends = 0;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        ends += c.fetch_watermarks(TOPIC, p, Duration::from_secs(10))?.1;
        tpl.add_partition(TOPIC, p);
    }
    let committed = {
        let got = c.committed_offsets(tpl, Duration::from_secs(10))?;
        let sum = got
            .elements()
            .iter()
            .map(|e| {
                if let Offset::Offset(o) = e.offset() {
                    o
                } else {
                    0
                }
            })
            .sum();
        drop(got);
        sum
    };
    drop(c);
    Ok((committed, ends))
}

/// The embedded stack: broker, a runtime, and the XZepr stand-in publishing to it.
struct Stack {
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    brokers: String,
    rt: tokio::runtime::Runtime,
    standin: StandIn,
}

impl Stack {
    fn start(partitions: i32, latency_ms: u64) -> Result<Stack> {
        let cluster = MockCluster::new(1)?;
        let brokers = cluster.bootstrap_servers();
        cluster.create_topic(TOPIC, partitions, 1)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let sink = Arc::new(KafkaSink::new(&brokers, TOPIC)?);
        let standin = rt.block_on(StandIn::start(
            TOKEN,
            Duration::from_millis(latency_ms),
            sink,
        ))?;
        Ok(Stack {
            cluster,
            brokers,
            rt,
            standin,
        })
    }
}

/// Runs the demo; `progress` shows a bar on stderr.
pub fn run(events: u64, partitions: i32, latency_ms: u64, progress: bool) -> Result<Summary> {
    let wall = Instant::now();
    let Stack {
        cluster: _cluster,
        brokers,
        rt,
        standin,
    } = Stack::start(partitions, latency_ms)?;
    let client = XzeprClient::new(XzeprClientConfig::new(standin.url(), TOKEN))?;
    let receiver = rt.block_on(client.discover_or_create_event_receiver(
        "xzepr-consumer-demo",
        "worker",
        "1.0.0",
        "The quickstart's consumer",
        serde_json::json!({"type": "object"}),
    ))?;
    let (reporter, reporter_task) =
        rt.block_on(async { Reporter::start(client, ReporterConfig::default()) });

    let seen = Arc::new(Mutex::new(HashSet::<String>::new()));
    let handler_seen = Arc::clone(&seen);
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, TOPIC, "demo"))
        .lifecycle(
            reporter,
            WorkTemplate::new(receiver, "demo-work", "1.0.0", "xzepr-consumer-demo"),
        )
        .start(
            move |ev: &CloudEvent<'_>, work: &mut Work| -> std::result::Result<(), String> {
                work.detail("platform", ev.platform_id().unwrap_or("unknown"));
                if let Ok(mut s) = handler_seen.lock() {
                    s.insert(ev.id().to_owned());
                }
                Ok(())
            },
        )?;
    produce(
        &brokers,
        TOPIC,
        0,
        events,
        None,
        "01M82X4ET7AYGAEYSHF5AKVAVW",
    )?;

    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(events);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} events handled and reported ({per_sec})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    // Everything produced handled and reported, and every message on the topic
    // (the republished lifecycle events included) consumed and finished.
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut done_at = None;
    // Rates count from the first event consumed: the group join is not the pipeline.
    let mut start = None;
    loop {
        let m = running.metrics();
        if m.consumed > 0 {
            start.get_or_insert_with(Instant::now);
        }
        let unique = seen.lock().map_or(0, |s| s.len() as u64);
        if let Some(b) = &bar {
            b.set_position(unique.min(m.posted_completed + m.posted_failed));
        }
        let reported = m.posted_completed + m.posted_failed >= events && m.posted_started >= events;
        if unique >= events && reported {
            done_at.get_or_insert_with(Instant::now);
            // XZepr republishes each post: 1 receiver event + 2 per event + the events.
            if m.consumed > events * 3 && m.finished == m.consumed {
                break;
            }
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let start = start.unwrap_or(wall);
    let elapsed = done_at.map_or(start.elapsed(), |d| d - start);
    if let Some(b) = bar {
        b.finish();
    }
    running.shutdown();
    running.join()?;
    rt.block_on(reporter_task.drain(Duration::from_secs(30)));
    let m = running.metrics();
    let (committed, end_offsets) = offsets(&brokers, partitions)?;
    let unique = seen.lock().map_or(0, |s| s.len() as u64);
    drop(standin);
    Ok(Summary {
        produced: events,
        consumed: m.consumed,
        handled: m.handled,
        posted_started: m.posted_started,
        posted_completed: m.posted_completed,
        posted_failed: m.posted_failed,
        lost: events.saturating_sub(unique),
        committed,
        end_offsets,
        events_per_s: events as f64 / elapsed.as_secs_f64(),
        wall_s: wall.elapsed().as_secs_f64(),
    })
}

/// `dev`: the embedded stack, until Ctrl-C.
pub fn dev(partitions: i32, latency_ms: u64) -> Result<()> {
    let Stack {
        cluster: _cluster,
        brokers,
        rt,
        standin,
    } = Stack::start(partitions, latency_ms)?;
    println!("XZEPR_KAFKA_BROKERS={brokers}");
    println!("XZEPR_KAFKA_TOPIC={TOPIC}");
    println!("XZEPR_API_URL={}", standin.url());
    println!("XZEPR_API_TOKEN={TOKEN}");
    println!("(Ctrl-C to stop)");
    rt.block_on(tokio::signal::ctrl_c())?;
    drop(standin);
    Ok(())
}
