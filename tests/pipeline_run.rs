//! `Pipeline::run` owns the whole run cycle: with `report_to` it finds or
//! creates the service's receiver, reports every event under it, drains the
//! pipeline, then the reporter, and commits; a run that cannot reach XZepr
//! fails before it consumes anything.
#![cfg(feature = "dev-stack")]

mod kafka_support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::devstack::{NoSink, StandIn};
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::WorkInfo;
use xzepr_consumer::pipeline::{Pipeline, PipelineError, Reporting};
use xzepr_consumer::source::SourceError;

use kafka_support::*;

async fn handler(_m: CloudEventMessage, _w: WorkInfo) -> Result<Value, String> {
    Ok(serde_json::json!({"done": true}))
}

/// Waits for `what` (bounded), checking every 20 ms.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_report_to_finds_its_receiver_reports_every_event_and_drains() {
    const N: u64 = 300;
    let cluster = cluster("runcycle", 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "runcycle", 2, N, |i| {
        xzepr_event(i, "01SOMEONEELSE").1
    });
    let ends = end_offsets(&brokers, "runcycle", 2);
    let standin = StandIn::builder("tok")
        .sink(Arc::new(NoSink))
        .start()
        .await
        .unwrap();
    let client = XzeprClient::new(XzeprClientConfig::new(standin.url(), "tok")).unwrap();
    let pipeline = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "runcycle", "svc"))
        .commit_interval(Duration::from_millis(50))
        .report_to(
            Reporting::new(client, "svc")
                .receiver("svc-receiver", "worker")
                .work("deploy", "2.0.0"),
        )
        .build()
        .unwrap();
    let recorded = {
        let s = &standin;
        move || s.recorded_events().len()
    };
    let summary = pipeline
        .run(
            handler,
            until("every event reported", || recorded() >= 2 * N as usize),
        )
        .await
        .unwrap();
    assert!(summary.reports_sent);
    assert_eq!(summary.metrics.handled, N);
    // One receiver, created by the run, and every post under it.
    let receivers = standin.receivers();
    assert_eq!(receivers.len(), 1, "{receivers:?}");
    assert_eq!(receivers[0]["name"], "svc-receiver");
    let events = standin.recorded_events();
    let names: Vec<_> = events.iter().filter_map(|e| e["name"].as_str()).collect();
    assert_eq!(
        names.iter().filter(|n| **n == "deploy.started").count(),
        N as usize
    );
    assert_eq!(
        names.iter().filter(|n| **n == "deploy.completed").count(),
        N as usize
    );
    assert_eq!(
        committed(&brokers, "xzepr-consumer-svc", "runcycle", 2),
        ends
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_cannot_reach_xzepr_fails_before_consuming() {
    let cluster = cluster("noxzepr", 1);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "noxzepr", 1, 10, |i| xzepr_event(i, "01X").1);
    // Nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let mut config = XzeprClientConfig::new(url, "tok");
    config.request_timeout = Duration::from_secs(2);
    config.connect_timeout = Duration::from_secs(2);
    let client = XzeprClient::new(config).unwrap();
    let run = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "noxzepr", "svc"))
        .report_to(Reporting::new(client, "svc"))
        .build()
        .unwrap()
        .run(handler, std::future::pending());
    let err = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the run gave up on XZepr within its retries")
        .unwrap_err();
    assert!(
        matches!(
            &err,
            xzepr_consumer::Error::Pipeline(PipelineError::Discovery { name, .. }) if name == "svc"
        ),
        "{err}"
    );
    // The client's error is kept as the cause.
    let cause = std::error::Error::source(&err);
    assert!(
        cause.is_some_and(|c| c.is::<xzepr_consumer::client::ClientError>()),
        "{err:?}"
    );
    let committed = committed(&brokers, "xzepr-consumer-svc", "noxzepr", 1);
    assert!(
        committed.values().all(|o| *o < 0),
        "nothing consumed: {committed:?}"
    );
}

#[test]
fn report_to_is_for_run_and_its_fields_are_checked_at_build() {
    let client = XzeprClient::new(XzeprClientConfig::new("http://127.0.0.1:9", "tok")).unwrap();
    let kafka = || KafkaConsumerConfig::new("127.0.0.1:9", "t", "svc");
    let err = Pipeline::builder(kafka())
        .report_to(Reporting::new(client.clone(), "svc").work("", "1"))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("work_name"), "{err}");
    let err = Pipeline::builder(kafka())
        .report_to(Reporting::new(client, "svc"))
        .build()
        .unwrap()
        .start(
            |_: &xzepr_consumer::decode::CloudEvent<'_>,
             _: &mut xzepr_consumer::handler::Work|
             -> Result<(), String> { Ok(()) },
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            xzepr_consumer::Error::Source(SourceError::InvalidOption {
                field: "report_to",
                ..
            })
        ),
        "{err}"
    );
}
