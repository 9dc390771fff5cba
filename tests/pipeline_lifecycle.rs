//! Automatic lifecycle end to end: mock Kafka cluster → pipeline → reporter → a
//! real HTTP server on loopback standing in for XZepr's events endpoint.
#![cfg(feature = "dev-stack")]

mod http_support;
mod kafka_support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEvent;
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::Work;
use xzepr_consumer::pipeline::{Pipeline, WorkTemplate};
use xzepr_consumer::report::{Reporter, ReporterConfig};

use kafka_support::*;

#[test]
fn every_event_gets_one_started_and_one_terminal_post_and_offsets_reach_the_end() {
    const N: u64 = 2_000;
    let cluster = cluster("lifecycle", 4);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "lifecycle", 4, N, |i| {
        xzepr_event(i, "01SOMEONEELSE").1
    });
    let ends = end_offsets(&brokers, "lifecycle", 4);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(http_support::start(http_support::Chaos {
        fail: 0.1,
        ..Default::default()
    }));
    let (reporter, task) = rt.block_on(async {
        let client = XzeprClient::new(XzeprClientConfig::new(server.url.clone(), "tok")).unwrap();
        let mut config = ReporterConfig::default();
        config.backoff_base = Duration::from_millis(1);
        config.max_attempts = 30;
        Reporter::start(client, config)
    });

    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "lifecycle", "lc"))
        .workers(2)
        .commit_interval(Duration::from_millis(100))
        .lifecycle(
            reporter,
            WorkTemplate::new("01MYRECEIVER", "deploy", "1.0.0", "lc"),
        )
        .start(
            |ev: &CloudEvent<'_>, work: &mut Work| -> Result<(), String> {
                work.detail("type", ev.event_type());
                if ev.event_type() == "build.completed" {
                    work.error_code("BUILD_RED");
                    return Err("the build is red".into());
                }
                Ok(())
            },
        )
        .unwrap();
    let start = Instant::now();
    while running.metrics().finished < N {
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "{:?}",
            running.metrics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    running.shutdown();
    running.join().unwrap();
    let m = running.metrics();
    assert_eq!(
        (
            m.handled,
            m.posted_started,
            m.posted_completed + m.posted_failed
        ),
        (N, N, N)
    );
    assert_eq!(m.posted_failed, m.handler_failed);
    assert!(m.handler_failed > 0);
    assert_eq!(m.report_failed, 0);

    let accepted = server.seen.accepted.lock().unwrap().clone();
    let mut by_work: HashMap<String, Vec<String>> = HashMap::new();
    for body in &accepted {
        assert_eq!(body["event_receiver_id"], "01MYRECEIVER");
        assert_eq!(body["package"], "lc");
        let id = body["payload"]["work_id"].as_str().unwrap().to_owned();
        by_work
            .entry(id)
            .or_default()
            .push(body["name"].as_str().unwrap().to_owned());
        if body["name"] == "deploy.failed" {
            assert_eq!(body["payload"]["details"]["error"], "the build is red");
            assert_eq!(body["payload"]["details"]["error_code"], "BUILD_RED");
        }
    }
    assert_eq!(by_work.len() as u64, N);
    for (id, names) in &by_work {
        assert_eq!(names.len(), 2, "{id}: {names:?}");
        assert_eq!(names[0], "deploy.started", "{id}: {names:?}");
    }
    assert_eq!(
        committed(&brokers, "xzepr-consumer-lc", "lifecycle", 4),
        ends
    );
    drop(running);
    assert!(rt.block_on(task.drain(Duration::from_secs(30))));
}
