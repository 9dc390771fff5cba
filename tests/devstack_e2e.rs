//! End to end on the dev stack: mock broker → pipeline with automatic lifecycle →
//! the XZepr stand-in, which publishes every post back to the topic; shutdown in
//! the middle, restart, nothing lost.
#![cfg(feature = "dev-stack")]

mod kafka_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEvent;
use xzepr_consumer::devstack::{KafkaSink, StandIn};
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::Work;
use xzepr_consumer::pipeline::{Pipeline, RunningPipeline, WorkTemplate};
use xzepr_consumer::report::{Reporter, ReporterConfig};

use kafka_support::*;

#[test]
fn lifecycle_on_the_dev_stack_survives_a_restart() {
    const N: u64 = 3_000;
    const TOPIC: &str = "xzepr.dev.events";
    let cluster = cluster(TOPIC, 8);
    let brokers = cluster.bootstrap_servers();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sink = Arc::new(KafkaSink::new(&brokers, TOPIC).unwrap());
    let standin = rt
        .block_on(StandIn::start("tok", Duration::from_millis(1), sink))
        .unwrap();
    let client = XzeprClient::new(XzeprClientConfig::new(standin.url(), "tok")).unwrap();
    let receiver = rt
        .block_on(client.discover_or_create_event_receiver(
            "e2e",
            "worker",
            "1.0.0",
            "d",
            serde_json::json!({}),
        ))
        .unwrap();
    produce(&brokers, TOPIC, 8, N, |i| {
        xzepr_event(i, "01SOMEBODYELSE000000000000").1
    });

    // The first run is slow and has small queues, so the shutdown finds most of the
    // topic not yet fetched: shutdown drains what is queued (at most two queues of
    // 64) and drops the per-partition stashes, leaving work for the second run.
    let start = |slow: bool| -> RunningPipeline {
        let (reporter, _task) =
            rt.block_on(async { Reporter::start(client.clone(), ReporterConfig::default()) });
        Pipeline::builder(KafkaConsumerConfig::new(&brokers, TOPIC, "e2e"))
            .workers(2)
            .max_in_flight(if slow { 64 } else { 1024 })
            .commit_interval(Duration::from_millis(100))
            .lifecycle(
                reporter,
                WorkTemplate::new(receiver.clone(), "e2e", "1.0.0", "e2e"),
            )
            .start(
                move |ev: &CloudEvent<'_>, _: &mut Work| -> Result<(), String> {
                    if slow {
                        std::thread::sleep(Duration::from_micros(300));
                    }
                    if ev.event_type() == "scan.finished" {
                        return Err("scan found something".into());
                    }
                    Ok(())
                },
            )
            .unwrap()
    };
    let first = start(true);
    let t = Instant::now();
    while first.metrics().handled < 500 {
        assert!(t.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(20));
    }
    first.shutdown();
    first.join().unwrap();
    let handled_first = first.metrics().handled;
    assert!(
        handled_first < N / 2,
        "shutdown drained only what was queued: {handled_first} handled"
    );

    let second = start(false);
    let stats = standin.stats();
    let t = Instant::now();
    // Every produced event reported at least once (started + terminal), and the
    // republished posts consumed and skipped as our own.
    while stats.completed.load(std::sync::atomic::Ordering::Relaxed)
        + stats.failed.load(std::sync::atomic::Ordering::Relaxed)
        < N
    {
        assert!(
            t.elapsed() < Duration::from_secs(240),
            "{:?}",
            second.metrics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    second.shutdown();
    second.join().unwrap();
    let (a, b) = (first.metrics(), second.metrics());
    // One started and one terminal post per delivery.
    assert_eq!(a.posted_started, a.handled);
    assert_eq!(b.posted_started, b.handled);
    assert_eq!(a.posted_completed + a.posted_failed, a.handled);
    assert_eq!(b.posted_completed + b.posted_failed, b.handled);
    assert!(a.handled + b.handled >= N, "nothing lost");
    assert!(b.posted_failed > 0, "handler errors are reported as failed");
    assert!(
        a.own_skipped + b.own_skipped > 0,
        "our own republished posts are skipped"
    );
    assert_eq!(a.report_failed + b.report_failed, 0);
}
