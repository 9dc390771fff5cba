//! The assembled pipeline: source → decode → dispatch → handler → report → offsets.
//!
//! ```no_run
//! use xzepr_consumer::config::KafkaConsumerConfig;
//! use xzepr_consumer::decode::CloudEvent;
//! use xzepr_consumer::dispatch::TypeFilter;
//! use xzepr_consumer::handler::Work;
//! use xzepr_consumer::pipeline::Pipeline;
//!
//! let kafka = KafkaConsumerConfig::from_env("deployer")?;
//! let running = Pipeline::builder(kafka)
//!     .workers(4)
//!     .type_filter(TypeFilter::any().prefix("deployment."))
//!     .start(|event: &CloudEvent<'_>, work: &mut Work| -> Result<(), String> {
//!         work.detail("platform", event.platform_id().unwrap_or("?"));
//!         Ok(())
//!     })?;
//! // ... later: stop fetching, drain, commit, join every thread.
//! running.shutdown();
//! running.join()?;
//! # Ok::<(), xzepr_consumer::Error>(())
//! ```

mod builder;
mod complete;
mod config;
mod consumer;
mod deadletter;
mod delay;
mod delivery;
mod execute;
mod flow;
mod guard;
mod produce;
mod redrive;
mod reporting;
mod retry;
mod running;
mod sink;

use std::sync::Arc;

use crate::config::KafkaConsumerConfig;
use crate::handler::{AsyncBatchHandler, AsyncHandler};
use crate::metrics::MetricsSnapshot;
use crate::source::SourceError;

pub use builder::PipelineBuilder;
pub use complete::MalformedPolicy;
pub use config::PipelineConfig;
pub use consumer::XzeprConsumer;
pub use deadletter::{
    headers as dead_letter_headers, DeadLetterConfig, DEFAULT_DEAD_LETTER_SUFFIX,
};
pub use delay::headers as delay_topic_headers;
pub use guard::IdempotencyKey;
pub use redrive::{
    Redrive, RedriveError, RedriveReport, DEFAULT_MAX_REDRIVES, REDRIVE_COUNT_HEADER,
};
pub use reporting::{Reporting, DEFAULT_REPORT_DRAIN};
pub use retry::{RetryPolicy, DELAY_TOPIC_INFIX};
pub use running::RunningPipeline;
pub use sink::WorkTemplate;

/// Pipeline errors (besides the stages' own, wrapped in [`crate::Error`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// A worker thread panicked outside the handler (handler panics fail their
    /// event instead).
    #[error("worker thread {worker} panicked: {message}")]
    WorkerPanicked {
        /// The worker's index.
        worker: usize,
        /// The panic's message.
        message: String,
    },
    /// The metrics endpoint's address could not be bound (see
    /// [`PipelineBuilder::metrics_addr`]); nothing was started.
    #[error("cannot serve metrics on {addr}: {source}")]
    MetricsBind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why not (in use, not permitted, ...).
        source: std::io::Error,
    },
    /// [`Pipeline::run`] could not find or create the service's receiver
    /// in XZepr ([`PipelineBuilder::report_to`]); nothing was consumed.
    #[error("finding or creating receiver {name:?} of type {receiver_type:?} in XZepr")]
    Discovery {
        /// The receiver's name.
        name: String,
        /// The receiver's type.
        receiver_type: String,
        /// Why not.
        #[source]
        source: crate::client::ClientError,
    },
    /// Worker threads still ran a handler when `join` gave up waiting (the
    /// drain timeout after the poll thread stopped); they are detached, and
    /// their offsets were not committed.
    #[error("{workers} worker thread(s) still running a handler after the drain timeout")]
    Stuck {
        /// How many.
        workers: usize,
    },
}

/// A checked pipeline configuration, ready to start:
/// `Pipeline::builder(kafka)` … [`build`](PipelineBuilder::build).
#[derive(Debug)]
#[must_use]
pub struct Pipeline {
    b: PipelineBuilder,
}

impl Pipeline {
    /// A builder consuming with `kafka`.
    pub fn builder(kafka: KafkaConsumerConfig) -> PipelineBuilder {
        PipelineBuilder::new(kafka)
    }

    /// Runs `handler` until `shutdown` completes or the pipeline stops by
    /// itself (a fatal error), then stops fetching, drains within
    /// [`drain_timeout`](PipelineBuilder::drain_timeout), commits, and (with
    /// [`report_to`](PipelineBuilder::report_to)) sends the lifecycle posts
    /// still queued: the whole run cycle of a service, in one call.
    ///
    /// # Errors
    /// A start-up error (an unreachable XZepr while finding the receiver, or
    /// [`Pipeline::start_async`]'s), or the error the pipeline stopped on.
    pub async fn run<H, F>(self, handler: H, shutdown: F) -> Result<Summary, crate::Error>
    where
        H: AsyncHandler,
        F: std::future::Future<Output = ()>,
    {
        self.run_watching(handler, |_| shutdown).await
    }

    /// [`Pipeline::run`], with `watch` given the running pipeline (to show
    /// its progress, serve it, …): the run stops when `watch` returns.
    ///
    /// # Errors
    /// As [`Pipeline::run`].
    pub async fn run_watching<H, W, F>(self, handler: H, watch: W) -> Result<Summary, crate::Error>
    where
        H: AsyncHandler,
        W: FnOnce(Arc<RunningPipeline>) -> F,
        F: std::future::Future<Output = ()>,
    {
        self.run_with(|p| p.start_async(handler), watch).await
    }

    /// [`Pipeline::run`] with an async batch handler (see
    /// [`Pipeline::start_async_batch`]).
    ///
    /// # Errors
    /// As [`Pipeline::run`].
    pub async fn run_batch<H, F>(self, handler: H, shutdown: F) -> Result<Summary, crate::Error>
    where
        H: AsyncBatchHandler,
        F: std::future::Future<Output = ()>,
    {
        self.run_batch_watching(handler, |_| shutdown).await
    }

    /// [`Pipeline::run_watching`] with an async batch handler.
    ///
    /// # Errors
    /// As [`Pipeline::run`].
    pub async fn run_batch_watching<H, W, F>(
        self,
        handler: H,
        watch: W,
    ) -> Result<Summary, crate::Error>
    where
        H: AsyncBatchHandler,
        W: FnOnce(Arc<RunningPipeline>) -> F,
        F: std::future::Future<Output = ()>,
    {
        self.run_with(|p| p.start_async_batch(handler), watch).await
    }

    /// The run cycle, with the pipeline started by `start`.
    async fn run_with<W, F>(
        self,
        start: impl FnOnce(Pipeline) -> Result<RunningPipeline, crate::Error>,
        watch: W,
    ) -> Result<Summary, crate::Error>
    where
        W: FnOnce(Arc<RunningPipeline>) -> F,
        F: std::future::Future<Output = ()>,
    {
        let mut b = self.b;
        let reporting = match b.reporting.take() {
            Some(r) => {
                let (reporter, task, work) = r.connect(b.config.report_concurrency).await?;
                b = b.lifecycle(reporter, work);
                Some((task, r.drain_timeout))
            }
            None => None,
        };
        let running = Arc::new(start(Pipeline { b })?);
        tokio::select! {
            () = watch(Arc::clone(&running)) => {}
            () = running.stopped() => {}
        }
        let draining = Arc::clone(&running);
        // Draining waits on threads: keep it off the runtime's workers.
        let joined = tokio::task::spawn_blocking(move || {
            draining.shutdown();
            draining.join()
        })
        .await
        .map_err(|_| SourceError::InvalidOption {
            field: "shutdown",
            reason: "the drain task panicked",
        })?;
        let metrics = running.metrics();
        // The pipeline holds the reporter: dropped, the reporter's queue
        // closes and its task ends once the posts still queued are sent.
        drop(running);
        let reports_sent = match reporting {
            Some((task, deadline)) => {
                let sent = task.drain(deadline).await;
                if !sent {
                    tracing::warn!(
                        deadline_s = deadline.as_secs(),
                        "Lifecycle posts still unsent at the deadline; their offsets were not committed and are replayed."
                    );
                }
                sent
            }
            None => true,
        };
        joined?;
        Ok(Summary {
            metrics,
            reports_sent,
        })
    }
}

/// How a [`Pipeline::run`] ended.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Summary {
    /// The pipeline's final counters.
    pub metrics: MetricsSnapshot,
    /// Whether every queued lifecycle post was sent before the reporting's
    /// drain timeout (true without reporting).
    pub reports_sent: bool,
}
