//! What the chaos tests share: waiting on child consumers, and a child's
//! connection to the stand-in XZepr and the mock broker.
#![allow(dead_code)]

use std::process::Child;
use std::time::{Duration, Instant};

use xzepr_consumer::client::{XzeprClient, XzeprClientConfig};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::report::{Reporter, ReporterConfig, ReporterTask};

/// Generous bound for "eventually" on a loaded machine; never a timing assertion.
pub const PATIENCE: Duration = Duration::from_secs(300);

/// Waits for `done`, failing if a child consumer exits by itself.
pub fn wait_for(children: &mut [&mut Child], what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        for child in children.iter_mut() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("a consumer exited ({status}) while waiting for {what}");
            }
        }
        assert!(start.elapsed() < PATIENCE, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child consumer's parts: its runtime, its receiver (found or created), a
/// reporter to the stand-in, and a Kafka config whose member is declared dead
/// 3 s after a kill (it holds its partitions until then).
pub struct ChildParts {
    pub rt: tokio::runtime::Runtime,
    pub receiver: String,
    pub reporter: Reporter,
    pub task: ReporterTask,
    pub kafka: KafkaConsumerConfig,
}

/// Heartbeats of the child consumers.
pub const HEARTBEAT: Duration = Duration::from_millis(300);

pub fn child_parts(brokers: &str, xzepr: &str, topic: &str, service: &str) -> ChildParts {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = XzeprClient::new(XzeprClientConfig::new(xzepr, "tok")).unwrap();
    let receiver = rt
        .block_on(client.discover_or_create_event_receiver(
            service,
            "worker",
            "1.0.0",
            "chaos test consumer",
            serde_json::json!({}),
        ))
        .unwrap();
    let (reporter, task) =
        rt.block_on(async { Reporter::start(client, ReporterConfig::default()) });
    let mut kafka = KafkaConsumerConfig::new(brokers, topic, service)
        .set("heartbeat.interval.ms", &HEARTBEAT.as_millis().to_string());
    kafka.session_timeout = Duration::from_secs(3);
    ChildParts {
        rt,
        receiver,
        reporter,
        task,
        kafka,
    }
}
