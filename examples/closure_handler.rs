//! A sync closure handler with automatic lifecycle reporting: every
//! `deployment.*` event gets `deploy.started`, then `deploy.completed` or
//! `deploy.failed`, under this service's own receiver (discovered or created).
//!
//! Against a real stack, set the contract's variables and run:
//!
//! ```sh
//! XZEPR_KAFKA_BROKERS=localhost:9092 XZEPR_API_URL=http://localhost:8042 \
//! XZEPR_API_TOKEN=... cargo run --example closure_handler
//! ```
//!
//! Ctrl-C drains in-flight work, commits, and exits.

use std::time::Duration;

use xzepr_consumer::client::XzeprClient;
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEvent;
use xzepr_consumer::dispatch::TypeFilter;
use xzepr_consumer::handler::Work;
use xzepr_consumer::pipeline::{Pipeline, WorkTemplate};
use xzepr_consumer::report::{Reporter, ReporterConfig};

const SERVICE: &str = "closure-deployer";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = XzeprClient::from_env()?;
    let receiver = client
        .discover_or_create_event_receiver(
            SERVICE,
            "worker",
            "1.0.0",
            "Example deployer (closure handler)",
            serde_json::json!({"type": "object"}),
        )
        .await?;
    println!("reporting under receiver {receiver}");
    let (reporter, reporter_task) = Reporter::start(client, ReporterConfig::default());
    let running = Pipeline::builder(KafkaConsumerConfig::from_env(SERVICE)?)
        .type_filter(TypeFilter::any().prefix("deployment."))
        .lifecycle(
            reporter,
            WorkTemplate::new(receiver, "deploy", "1.0.0", SERVICE),
        )
        .start(
            |event: &CloudEvent<'_>, work: &mut Work| -> Result<(), String> {
                let platform = event.platform_id().unwrap_or("unknown");
                work.detail("platform", platform);
                if event.success() == Some(false) {
                    work.error_code("UPSTREAM_FAILED");
                    return Err(format!("upstream event {} reported failure", event.id()));
                }
                Ok(())
            },
        )?;
    tokio::signal::ctrl_c().await?;
    let metrics = tokio::task::spawn_blocking(move || {
        running.shutdown();
        running.join().map(|()| running.metrics())
    })
    .await??;
    reporter_task.drain(Duration::from_secs(10)).await;
    println!("{metrics:?}");
    Ok(())
}
