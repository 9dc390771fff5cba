//! deployer: handles XZepr's `deployment.*` events and reports each one's
//! work to XZepr as `deploy.started`, then `deploy.completed` (or
//! `deploy.failed`).

use xzepr_consumer::client::XzeprClient;
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::dispatch::TypeFilter;
use xzepr_consumer::handler::WorkInfo;
use xzepr_consumer::pipeline::{Pipeline, Reporting};

#[tokio::main]
async fn main() -> Result<(), xzepr_consumer::Error> {
    // Kafka from the XZEPR_KAFKA_* variables, XZepr from XZEPR_API_URL and _TOKEN.
    let kafka = KafkaConsumerConfig::from_env("deployer")?;
    let xzepr = XzeprClient::from_env()?;
    let pipeline = Pipeline::builder(kafka)
        .type_filter(TypeFilter::any().prefix("deployment."))
        // Receiver `deployer` (found or created); posts `deploy.started` and
        // `deploy.completed` or `deploy.failed`.
        .report_to(Reporting::new(xzepr, "deployer").work("deploy", "1.0.0"))
        .build()?;
    println!("deployer: consuming (Ctrl-C to stop)");

    let summary = pipeline
        .run(
            |event: CloudEventMessage, info: WorkInfo| async move {
                println!(
                    "deploying {} ({}) from partition {}",
                    event.id, event.event_type, info.partition
                );
                // An Err here would be posted as `deploy.failed` with its message.
                Ok::<_, String>(serde_json::json!({ "deployed": event.id }))
            },
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await?;

    let m = &summary.metrics;
    println!(
        "deployer: stopped; handled {}, posted {} started and {} completed",
        m.handled, m.posted_started, m.posted_completed
    );
    Ok(())
}
