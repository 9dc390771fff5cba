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

mod worker;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::KafkaConsumerConfig;
use crate::decode::{Decoder, DecoderConfig};
use crate::dispatch::{Ordering, TypeFilter};
use crate::handler::{AsyncHandler, Handler};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::source::{Message, Source, SourceError, SourceHandle, SourceOptions};

use worker::{Delivery, WorkerShared};
pub(crate) use worker::{Lifecycle, LifecycleSink};

impl Delivery for Message {
    fn topic(&self) -> &str {
        &self.topic
    }
    fn topic_arc(&self) -> Arc<str> {
        Arc::clone(&self.topic)
    }
    fn partition(&self) -> i32 {
        self.partition
    }
    fn offset(&self) -> i64 {
        self.offset
    }
    fn payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }
    fn headers(&self) -> Vec<(&str, &[u8])> {
        self.header_pairs().collect()
    }
    fn is_current(&self) -> bool {
        Message::is_current(self)
    }
    fn finish(self) {
        Message::finish(self);
    }
    fn hold(self) {
        Message::hold(self);
    }
}

/// A lifecycle sink shared by all workers.
pub(crate) type SharedSink = Arc<dyn LifecycleSink>;

impl LifecycleSink for SharedSink {
    fn submit(&self, record: Lifecycle, ack: Box<dyn FnOnce(bool) + Send>) {
        (**self).submit(record, ack);
    }
}

/// Configures a [`Pipeline`]; setters never fail, [`PipelineBuilder::start`] checks.
#[derive(Debug)]
#[must_use]
pub struct PipelineBuilder {
    kafka: KafkaConsumerConfig,
    source: SourceOptions,
    decoder: DecoderConfig,
    filter: TypeFilter,
    skip_own_events: bool,
    own_receiver: Option<String>,
    runtime: Option<tokio::runtime::Handle>,
    sink: Option<SinkDebug>,
    malformed: MalformedPolicy,
}

/// `Debug` placeholder for the type-erased sink.
struct SinkDebug(SharedSink);

impl std::fmt::Debug for SinkDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LifecycleSink")
    }
}

/// What the automatic lifecycle posts are about: the work and where it is reported.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkTemplate {
    /// The service's receiver id (see
    /// [`XzeprClient::discover_or_create_event_receiver`](crate::client::XzeprClient::discover_or_create_event_receiver)).
    pub receiver_id: String,
    /// Work name: events are posted as `{work_name}.started` and so on.
    pub work_name: String,
    /// Work version (also the release).
    pub work_version: String,
    /// The service's name (the posts' `package`).
    pub package: String,
}

impl WorkTemplate {
    /// Builds it.
    pub fn new(
        receiver_id: impl Into<String>,
        work_name: impl Into<String>,
        work_version: impl Into<String>,
        package: impl Into<String>,
    ) -> Self {
        WorkTemplate {
            receiver_id: receiver_id.into(),
            work_name: work_name.into(),
            work_version: work_version.into(),
            package: package.into(),
        }
    }
}

/// The reporter as the workers' lifecycle sink.
struct ReporterSink {
    reporter: crate::report::Reporter,
    work: WorkTemplate,
}

impl LifecycleSink for ReporterSink {
    fn submit(&self, record: Lifecycle, ack: Box<dyn FnOnce(bool) + Send>) {
        use crate::report::{OwnedWork, Record, Status as S};
        let w = &self.work;
        let record = Record {
            work: OwnedWork::new(
                w.receiver_id.clone(),
                record.work_id,
                w.work_name.clone(),
                w.work_version.clone(),
                record.platform_id,
                w.package.clone(),
            ),
            status: match record.status {
                worker::Status::Started => S::Started,
                worker::Status::Completed => S::Completed,
                worker::Status::Failed => S::Failed,
            },
            details: record.details,
            error: record.error,
            ack: crate::report::Ack::new(move |r| ack(r.is_ok())),
        };
        // Blocks while the reporter's queue is full: backpressure onto the worker.
        // A closed reporter hands the record back; dropping it acknowledges
        // `Closed`, so the offset stays unfinished.
        let _ = self.reporter.send_blocking(record);
    }
}

/// What the pipeline does with a message that does not decode as a CloudEvent.
/// Either way it is counted and logged with topic, partition, offset and error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MalformedPolicy {
    /// Finish its offset (committed, never read again). The default: one bad
    /// message must not stall its partition.
    #[default]
    Skip,
    /// Leave its offset unfinished: nothing after it in its partition is
    /// committed, and a restart reads it again.
    Hold,
}

/// Entry point: `Pipeline::builder(kafka_config)`.
#[derive(Debug)]
pub struct Pipeline;

impl Pipeline {
    /// A builder consuming with `kafka`.
    pub fn builder(kafka: KafkaConsumerConfig) -> PipelineBuilder {
        PipelineBuilder {
            kafka,
            source: SourceOptions::default(),
            decoder: DecoderConfig::default(),
            filter: TypeFilter::any(),
            skip_own_events: true,
            own_receiver: None,
            runtime: None,
            sink: None,
            malformed: MalformedPolicy::Skip,
        }
    }
}

impl PipelineBuilder {
    /// Handler workers, one queue each. Default: the number of CPUs.
    pub fn workers(mut self, n: usize) -> Self {
        self.source.queues = n;
        self
    }

    /// Messages per worker queue (default 1024); a message whose queue is full
    /// waits in its partition's stash. Also sets the resume watermark to half of it.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.source.queue_capacity = n;
        self.source.resume_below = n / 2;
        self
    }

    /// Bytes of messages held back for full queues, across partitions (default
    /// 16 MiB); over it, their partitions are paused until the queues drain. See
    /// [`SourceOptions::stash_budget`](crate::source::SourceOptions::stash_budget).
    pub fn stash_budget(mut self, bytes: usize) -> Self {
        self.source.stash_budget = bytes;
        self
    }

    /// Offsets tracked per partition from its commit point on (default 100,000);
    /// at the limit the partition pauses until its commit point moves. See
    /// [`SourceOptions::max_tracked`](crate::source::SourceOptions::max_tracked).
    pub fn max_tracked(mut self, n: usize) -> Self {
        self.source.max_tracked = n;
        self
    }

    /// Ordering mode (default per partition).
    pub fn ordering(mut self, ordering: Ordering) -> Self {
        self.source.ordering = ordering;
        self
    }

    /// Which event types reach the handler; the rest finish at once and are committed.
    pub fn type_filter(mut self, filter: TypeFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Whether to skip events whose `source` is this service's own receiver (on by
    /// default: XZepr republishes every event it records, so a service would
    /// otherwise see its own lifecycle posts come back).
    pub fn skip_own_events(mut self, skip: bool) -> Self {
        self.skip_own_events = skip;
        self
    }

    /// The service's own receiver id (set automatically when the pipeline reports
    /// lifecycle events; set it by hand when the handler posts by itself).
    pub fn own_receiver_id(mut self, id: impl Into<String>) -> Self {
        self.own_receiver = Some(id.into());
        self
    }

    /// What to do with messages that do not decode (default: skip).
    pub fn malformed(mut self, policy: MalformedPolicy) -> Self {
        self.malformed = policy;
        self
    }

    /// Decoder limits.
    pub fn decoder(mut self, config: DecoderConfig) -> Self {
        self.decoder = config;
        self
    }

    /// How often finished offsets are committed (default 1 s).
    pub fn commit_interval(mut self, every: Duration) -> Self {
        self.source.commit_interval = every;
        self
    }

    /// How long revoke and shutdown wait for in-flight work (default 10 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.source.drain_timeout = timeout;
        self
    }

    /// The tokio runtime that drives async handlers (default: the current one).
    pub fn runtime(mut self, handle: tokio::runtime::Handle) -> Self {
        self.runtime = Some(handle);
        self
    }

    /// Automatic lifecycle: for every handled event, `{work_name}.started` is
    /// handed to `reporter` before the handler runs and `completed`/`failed` after;
    /// the event's offset finishes only when both posts were acknowledged.
    /// Also sets [`PipelineBuilder::own_receiver_id`] to the work's receiver.
    pub fn lifecycle(mut self, reporter: crate::report::Reporter, work: WorkTemplate) -> Self {
        self.own_receiver = Some(work.receiver_id.clone());
        self.sink = Some(SinkDebug(Arc::new(ReporterSink { reporter, work })));
        self
    }

    fn prepare(
        self,
        hooks: Option<Arc<dyn crate::source::RebalanceHooks>>,
    ) -> Result<Prepared, crate::Error> {
        // Checked up front so a bad setting fails before any thread starts.
        Decoder::new(self.decoder.clone())?;
        let mut source = Source::start_with_hooks(&self.kafka, self.source, hooks)?;
        Ok(Prepared {
            receivers: source.take_receivers(),
            handle: source.handle(),
            decoder: self.decoder,
            filter: self.filter,
            own_receiver: self.own_receiver.filter(|_| self.skip_own_events),
            sink: self.sink.map(|s| s.0),
            malformed: self.malformed,
        })
    }

    /// Starts the pipeline with a sync handler, run on worker threads.
    ///
    /// # Errors
    /// [`crate::Error::Config`] / [`crate::Error::Source`] for bad settings or a
    /// consumer librdkafka refuses; [`crate::Error::Decode`] for bad decoder limits.
    pub fn start<H: Handler>(self, handler: H) -> Result<RunningPipeline, crate::Error> {
        let handler = Arc::new(handler);
        let p = self.prepare(Some(Arc::new(HandlerHooks(Arc::clone(&handler)))))?;
        p.spawn(|rx, decoder, shared| {
            let handler = Arc::clone(&handler);
            move || worker::run_sync(rx, decoder, handler, shared)
        })
    }

    /// Starts the pipeline with an async handler, each worker driving one event's
    /// future at a time on the runtime (so queue order holds).
    ///
    /// # Errors
    /// As [`PipelineBuilder::start`]; also [`SourceError::InvalidOption`] when there
    /// is no tokio runtime to drive the handler.
    pub fn start_async<H: AsyncHandler>(self, handler: H) -> Result<RunningPipeline, crate::Error> {
        let runtime = match &self.runtime {
            Some(r) => r.clone(),
            None => {
                tokio::runtime::Handle::try_current().map_err(|_| SourceError::InvalidOption {
                    field: "runtime",
                    reason: "async handlers need a tokio runtime (call from one, or set `runtime`)",
                })?
            }
        };
        let p = self.prepare(None)?;
        let handler = Arc::new(handler);
        p.spawn(|rx, decoder, shared| {
            let handler = Arc::clone(&handler);
            let runtime = runtime.clone();
            move || worker::run_async(rx, decoder, handler, shared, runtime)
        })
    }
}

/// A sync handler's `on_assign` / `on_revoke`, called by the poll thread.
struct HandlerHooks<H>(Arc<H>);

impl<H: Handler> crate::source::RebalanceHooks for HandlerHooks<H> {
    fn assigned(&self, partitions: &[(String, i32)]) {
        self.0.on_assign(partitions);
    }
    fn revoked(&self, partitions: &[(String, i32)]) {
        self.0.on_revoke(partitions);
    }
}

struct Prepared {
    receivers: Vec<crossbeam_channel::Receiver<Message>>,
    handle: SourceHandle,
    decoder: DecoderConfig,
    filter: TypeFilter,
    own_receiver: Option<String>,
    sink: Option<SharedSink>,
    malformed: MalformedPolicy,
}

impl Prepared {
    fn spawn<F, W>(self, mut make: F) -> Result<RunningPipeline, crate::Error>
    where
        F: FnMut(crossbeam_channel::Receiver<Message>, Decoder, Arc<WorkerShared<SharedSink>>) -> W,
        W: FnOnce() + Send + 'static,
    {
        let mut workers = Vec::with_capacity(self.receivers.len());
        let mut metrics = Vec::with_capacity(self.receivers.len());
        for (i, rx) in self.receivers.into_iter().enumerate() {
            let decoder = Decoder::new(self.decoder.clone())?;
            // Per worker, so the hot counters never share a cache line.
            let shared = Arc::new(WorkerShared {
                filter: self.filter.clone(),
                own_receiver: self.own_receiver.clone(),
                lifecycle: self.sink.clone(),
                metrics: Arc::new(Metrics::default()),
                malformed: self.malformed,
            });
            metrics.push(Arc::clone(&shared.metrics));
            let job = make(rx, decoder, shared);
            let spawned = std::thread::Builder::new()
                .name(format!("xzepr-worker-{i}"))
                .spawn(job)
                .map_err(SourceError::Spawn);
            match spawned {
                Ok(w) => workers.push(w),
                Err(e) => {
                    self.handle.shutdown();
                    return Err(e.into());
                }
            }
        }
        Ok(RunningPipeline {
            source: self.handle,
            workers: std::sync::Mutex::new(workers),
            metrics,
        })
    }
}

/// A started pipeline: its poll thread and workers run until [`RunningPipeline::shutdown`].
#[derive(Debug)]
pub struct RunningPipeline {
    source: SourceHandle,
    workers: std::sync::Mutex<Vec<JoinHandle<()>>>,
    metrics: Vec<Arc<Metrics>>,
}

impl RunningPipeline {
    /// Stops fetching; in-flight work drains (up to the drain timeout), the last
    /// commit is synchronous, the workers end when their queues are empty.
    pub fn shutdown(&self) {
        self.source.shutdown();
    }

    /// Waits for the poll thread and every worker.
    ///
    /// # Errors
    /// The error the poll thread stopped on (an authentication failure, say).
    pub fn join(&self) -> Result<(), crate::Error> {
        let source = self.source.join();
        let workers = self
            .workers
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default();
        for w in workers {
            let _ = w.join();
        }
        source.map_err(Into::into)
    }

    /// The pipeline's counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        let mut total = MetricsSnapshot::default();
        for m in &self.metrics {
            total += m.snapshot();
        }
        total
    }

    /// The source stage's handle (stats, stop).
    pub fn source(&self) -> &SourceHandle {
        &self.source
    }
}

impl Drop for RunningPipeline {
    /// Dropping a running pipeline stops it (as [`RunningPipeline::shutdown`]):
    /// its threads drain, commit and exit on their own; call
    /// [`RunningPipeline::join`] first to wait for that.
    fn drop(&mut self) {
        self.source.shutdown();
    }
}

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
        let running = Arc::new(self.builder.start_async(adapter)?);
        let watch = {
            let running = Arc::clone(&running);
            async move {
                while !running.source().is_finished() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        tokio::select! {
            () = shutdown => {}
            () = watch => {}
        }
        // Draining blocks (it waits on threads): keep it off the async workers.
        tokio::task::spawn_blocking(move || {
            running.shutdown();
            running.join()
        })
        .await
        .map_err(|_| SourceError::InvalidOption {
            field: "shutdown",
            reason: "the drain task panicked",
        })?
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
