//! The how-to's deployment handler, written against this crate: a
//! `MessageHandler` that filters `deployment.*` events and posts its own
//! lifecycle events through the client, run by `XzeprConsumer`.
//!
//! Against a real stack:
//!
//! ```sh
//! XZEPR_KAFKA_BROKERS=localhost:9092 XZEPR_API_URL=http://localhost:8042 \
//! XZEPR_API_TOKEN=... cargo run --example downstream_consumer
//! ```

use std::sync::Arc;

use xzepr_consumer::client::XzeprClient;
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::handler::MessageHandler;
use xzepr_consumer::pipeline::XzeprConsumer;

struct DeploymentHandler {
    client: XzeprClient,
    receiver_id: String,
    service_name: String,
}

#[async_trait::async_trait]
impl MessageHandler for DeploymentHandler {
    async fn handle(
        &self,
        message: CloudEventMessage,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if !message.event_type.starts_with("deployment.") {
            return Ok(());
        }
        let work_id = format!("work-{}", message.id);
        self.client
            .post_work_started(
                &self.receiver_id,
                &work_id,
                "deployment-check",
                "1.0.0",
                &message.platform_id,
                &self.service_name,
                serde_json::json!({ "source_event": message.id }),
            )
            .await?;
        // ... the service's own work goes here ...
        let success = message.success;
        self.client
            .post_work_completed(
                &self.receiver_id,
                &work_id,
                "deployment-check",
                "1.0.0",
                &message.platform_id,
                &self.service_name,
                success,
                serde_json::json!({ "result": if success { "ok" } else { "upstream failed" } }),
            )
            .await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let service_name = "deployment-checker";
    let kafka = KafkaConsumerConfig::from_env(service_name)?;
    let client = XzeprClient::from_env()?;
    let receiver_id = client
        .discover_or_create_event_receiver(
            "deployment-checker-receiver",
            "worker",
            "1.0.0",
            "Checks deployments",
            serde_json::json!({"type": "object"}),
        )
        .await?;
    let consumer = XzeprConsumer::new(kafka)?
        // The handler posts under this receiver: never feed on our own posts.
        .configure(|b| b.own_receiver_id(receiver_id.clone()));
    let handler = Arc::new(DeploymentHandler {
        client,
        receiver_id,
        service_name: service_name.into(),
    });
    consumer.run(handler).await?;
    Ok(())
}
