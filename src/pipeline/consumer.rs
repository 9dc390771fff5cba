//! The downstream-consumer plan's entry point, kept so code written against
//! the plan runs unchanged, on the same pipeline.

use std::sync::Arc;

use super::{Pipeline, PipelineBuilder};
use crate::config::KafkaConsumerConfig;

/// The downstream-consumer plan's entry point, on top of the same pipeline:
/// `XzeprConsumer::new(config)?.run(handler).await`.
///
/// Runs a [`MessageHandler`](crate::handler::MessageHandler) with the pipeline's
/// defaults (per-partition order, one worker per CPU, offsets committed only when
/// the handler returned). The handler posts its lifecycle events itself, as in the
/// plan's how-to.
#[derive(Debug)]
pub struct XzeprConsumer {
    builder: PipelineBuilder,
}

impl XzeprConsumer {
    /// Checks `config` and prepares a consumer.
    ///
    /// # Errors
    /// [`crate::Error::Config`] naming the setting at fault.
    pub fn new(config: KafkaConsumerConfig) -> Result<Self, crate::Error> {
        config.to_client_config()?;
        Ok(XzeprConsumer {
            builder: Pipeline::builder(config),
        })
    }

    /// Adjusts the underlying pipeline (workers, filter, queues, ...).
    pub fn configure(mut self, f: impl FnOnce(PipelineBuilder) -> PipelineBuilder) -> Self {
        self.builder = f(self.builder);
        self
    }

    /// Runs `handler` until Ctrl-C or SIGTERM (what Kubernetes sends), then
    /// drains and commits.
    ///
    /// # Errors
    /// A start-up error, or the error the consumer stopped on.
    pub async fn run<H>(self, handler: Arc<H>) -> Result<(), crate::Error>
    where
        H: crate::handler::MessageHandler + ?Sized + 'static,
    {
        self.run_until(handler, shutdown_signal()).await
    }

    /// Runs `handler` until `shutdown` completes (or the consumer stops on an
    /// error), then drains and commits.
    ///
    /// # Errors
    /// A start-up error, or the error the consumer stopped on.
    pub async fn run_until<H, F>(self, handler: Arc<H>, shutdown: F) -> Result<(), crate::Error>
    where
        H: crate::handler::MessageHandler + ?Sized + 'static,
        F: std::future::Future<Output = ()>,
    {
        let adapter = move |message: crate::decode::CloudEventMessage,
                            info: crate::handler::WorkInfo| {
            let handler = Arc::clone(&handler);
            async move {
                let id = message.id.clone();
                handler
                    .handle(message)
                    .await
                    .map(|()| serde_json::Value::Null)
                    .map_err(|e| {
                        tracing::warn!(
                            topic = %info.topic,
                            partition = info.partition,
                            offset = info.offset,
                            event_id = %id,
                            error = %e,
                            "Handler returned an error; offset finished (the plan's semantics)."
                        );
                        e.to_string()
                    })
            }
        };
        self.builder.build()?.run(adapter, shutdown).await.map(drop)
    }
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
