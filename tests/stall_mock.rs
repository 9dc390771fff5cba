//! The stall detector, the safety net under every failure path: a handler that
//! never returns turns liveness to 503 within the stall timeout (plus one
//! check), naming the partition and its oldest unfinished offset, and back to
//! 200 once it is released.
#![cfg(feature = "dev-stack")]

mod kafka_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::WorkInfo;
use xzepr_consumer::pipeline::{Pipeline, RunningPipeline};

use kafka_support::*;

/// Generous bound for "eventually" on a loaded CI machine; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(90);

fn get(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap())
}

fn wait_for(what: &str, running: &RunningPipeline, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < PATIENCE,
            "gave up waiting for {what}: {:?}",
            running.health()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_hung_handler_turns_health_to_503_naming_its_partition_and_back_after_release() {
    const N: u64 = 50;
    const HUNG_AT: i64 = 10;
    let cluster = cluster("hung", 1);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "hung", 1, N, |i| {
        xzepr_event(i, "01SOMEONEELSE").1
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (release, gate) = tokio::sync::watch::channel(false);
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "hung", "hung"))
        .runtime(rt.handle().clone())
        .commit_interval(Duration::from_millis(50))
        .stall_timeout(Duration::from_secs(1))
        .metrics_addr("127.0.0.1:0".parse().unwrap())
        .start_async(move |_m: CloudEventMessage, info: WorkInfo| {
            let mut gate = gate.clone();
            async move {
                if info.offset == HUNG_AT {
                    let _ = gate.wait_for(|open| *open).await;
                }
                Ok::<_, String>(serde_json::Value::Null)
            }
        })
        .unwrap();
    let addr = running.metrics_addr().unwrap();
    wait_for("the events before the hung one", &running, || {
        running.metrics().finished == HUNG_AT as u64
    });
    assert_eq!(get(addr, "/health").0, 200, "not stalled yet");
    wait_for("/health to answer 503", &running, || {
        get(addr, "/health").0 == 503
    });
    let (_, body) = get(addr, "/health");
    assert_eq!(body["stalled"], true);
    let stalled = &body["stalled_partitions"][0];
    assert_eq!(
        (
            &stalled["topic"],
            &stalled["partition"],
            &stalled["commit_point"]
        ),
        (&"hung".into(), &0.into(), &HUNG_AT.into()),
        "{body}"
    );
    assert!(running.health().stalled);
    assert!(running
        .encode_metrics(xzepr_consumer::observe::MetricsFormat::PrometheusText)
        .contains("xzepr_consumer_stalled_partitions 1"));
    release.send(true).unwrap();
    wait_for("/health back to 200", &running, || {
        get(addr, "/health").0 == 200
    });
    assert!(!running.health().stalled);
    wait_for("every event finished", &running, || {
        running.metrics().finished == N
    });
    running.shutdown();
    running.join().unwrap();
    assert_eq!(
        committed(&brokers, "xzepr-consumer-hung", "hung", 1),
        end_offsets(&brokers, "hung", 1)
    );
}
