//! Starting a built pipeline, and the running pipeline's handle.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::sync::atomic::AtomicUsize;

use super::execute::{
    self, AsyncAttempts, AsyncBatchAttempts, AsyncExecutor, SyncAttempts, SyncBatchAttempts,
};
use super::flow::Attempts;
use super::{Pipeline, PipelineError};
use crate::decode::Decoder;
use crate::flow_control::{Concurrency, Limiter};
use crate::handler::{AsyncBatchHandler, AsyncHandler, BatchHandler, Handler};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::source::{Executor, Source, SourceError, SourceHandle, SourceOptions};

impl Pipeline {
    /// Starts the pipeline with a sync handler, run on [`PipelineBuilder::workers`](super::PipelineBuilder::workers)
    /// threads that share one job channel; the lanes keep the ordering mode.
    ///
    /// # Errors
    /// [`crate::Error::Config`] / [`crate::Error::Source`] for bad settings or a
    /// consumer librdkafka refuses; [`crate::Error::Decode`] for bad decoder limits.
    pub fn start<H: Handler>(self, handler: H) -> Result<RunningPipeline, crate::Error> {
        let handler = Arc::new(handler);
        let hooks = Arc::new(HandlerHooks(Arc::clone(&handler)));
        self.start_sync(Some(hooks), move |live| SyncAttempts {
            handler: Arc::clone(&handler),
            live,
        })
    }

    /// Starts the pipeline with a sync batch handler: each job (a lane's run
    /// of up to [`PipelineBuilder::batch`](super::PipelineBuilder::batch)
    /// events, in the ordering mode's order) is one call on a worker thread,
    /// with an outcome per event; everything else stays per event (see
    /// [`BatchHandler`]).
    ///
    /// # Errors
    /// As [`Pipeline::start`].
    pub fn start_batch<H: BatchHandler>(self, handler: H) -> Result<RunningPipeline, crate::Error> {
        let handler = Arc::new(handler);
        self.start_sync(None, move |live| SyncBatchAttempts {
            handler: Arc::clone(&handler),
            live,
        })
    }

    /// Starts the sync workers, each with the attempts `attempts` makes.
    fn start_sync<A: Attempts + Send + Sync + 'static>(
        self,
        hooks: Option<Arc<dyn crate::source::RebalanceHooks>>,
        attempts: impl Fn(Arc<AtomicUsize>) -> A,
    ) -> Result<RunningPipeline, crate::Error> {
        let mut b = self.b;
        b.no_reporting()?;
        if b.config.source.max_in_flight.is_adaptive() {
            // A sync call holds its worker thread: the workers, not a limit,
            // bound what runs.
            return Err(SourceError::InvalidOption {
                field: "max_in_flight",
                reason: "adaptive needs an async handler (start_async or run); sync handlers are bounded by `workers`",
            }
            .into());
        }
        b.limits
            .push(Limiter::new(b.limit_label, b.config.source.max_in_flight));
        let guard_runtime = match b.idempotency {
            Some(_) => Some(b.runtime_for(
                "the idempotency store needs a tokio runtime (start from one, or set `runtime`)",
            )?),
            None => None,
        };
        let listener = b.bind_metrics()?;
        let producers = b.producers()?;
        let decoder = Arc::new(Decoder::new(b.config.decoder.clone())?);
        let (tx, rx) = crossbeam_channel::bounded(b.config.source.max_in_flight.max().max(1));
        // Each worker drives its jobs' flows on a runtime of its own, made
        // before anything starts so a failure to make one fails here.
        let mut runtimes = Vec::with_capacity(b.config.workers);
        for _ in 0..b.config.workers {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(SourceError::Spawn)?;
            runtimes.push(runtime);
        }
        let (kafka, options) = b.source_settings();
        let source = Source::start_with(
            &kafka,
            options,
            hooks,
            // Sync handlers: one job channel read by every worker thread.
            Box::new(crate::source::ChannelExecutor(tx)),
        )?;
        let mut workers = Vec::with_capacity(b.config.workers);
        let mut metrics = Vec::with_capacity(b.config.workers);
        let room = b.tail_room();
        for (i, runtime) in runtimes.into_iter().enumerate() {
            let m = Arc::new(Metrics::default());
            let guard = guard_runtime.as_ref();
            let shared = b.shared(&m, guard, &producers, true, &room);
            metrics.push(m);
            let (rx, decoder) = (rx.clone(), Arc::clone(&decoder));
            let live = Arc::new(AtomicUsize::new(0));
            let attempts = attempts(Arc::clone(&live));
            let spawned = std::thread::Builder::new()
                .name(format!("xzepr-worker-{i}"))
                .spawn(move || {
                    execute::run_sync_worker(rx, runtime, live, attempts, shared, decoder)
                });
            match spawned {
                Ok(w) => workers.push(w),
                Err(e) => {
                    source.shutdown();
                    return Err(SourceError::Spawn(e).into());
                }
            }
        }
        b.running(source, workers, metrics, listener)
    }

    /// Starts the pipeline with an async handler: each job runs as a task on the
    /// runtime, up to [`PipelineBuilder::max_in_flight`](super::PipelineBuilder::max_in_flight) at once, in the
    /// ordering mode's lanes.
    ///
    /// # Errors
    /// As [`Pipeline::start`]; also [`SourceError::InvalidOption`] when there
    /// is no tokio runtime to drive the handler.
    pub fn start_async<H: AsyncHandler>(self, handler: H) -> Result<RunningPipeline, crate::Error> {
        let handler = Arc::new(handler);
        self.start_tasks(|limit| AsyncAttempts { handler, limit })
    }

    /// Starts the pipeline with an async batch handler: each job (a lane's
    /// run of up to [`PipelineBuilder::batch`](super::PipelineBuilder::batch)
    /// events) is one awaited call, with an outcome per event; everything
    /// else stays per event (see [`AsyncBatchHandler`]).
    ///
    /// # Errors
    /// As [`Pipeline::start_async`].
    pub fn start_async_batch<H: AsyncBatchHandler>(
        self,
        handler: H,
    ) -> Result<RunningPipeline, crate::Error> {
        let handler = Arc::new(handler);
        self.start_tasks(|limit| AsyncBatchAttempts { handler, limit })
    }

    /// Starts the pipeline with its jobs as tokio tasks, with the attempts
    /// `attempts` makes (given the handler's limit when it is adaptive).
    fn start_tasks<A: Attempts + Send + Sync + 'static>(
        self,
        attempts: impl FnOnce(Option<Limiter>) -> A,
    ) -> Result<RunningPipeline, crate::Error> {
        let mut b = self.b;
        b.no_reporting()?;
        let limit = Limiter::new(b.limit_label, b.config.source.max_in_flight);
        b.limits.push(limit.clone());
        // A fixed limit is the lanes' own bound: no permit per call.
        let limit =
            matches!(b.config.source.max_in_flight, Concurrency::Adaptive { .. }).then_some(limit);
        let runtime =
            b.runtime_for("async handlers need a tokio runtime (call from one, or set `runtime`)")?;
        let listener = b.bind_metrics()?;
        let producers = b.producers()?;
        let metrics = Arc::new(Metrics::default());
        let executor: Box<dyn Executor> = Box::new(AsyncExecutor {
            shared: b.shared(&metrics, Some(&runtime), &producers, false, &b.tail_room()),
            runtime,
            attempts: Arc::new(attempts(limit)),
            decoder: Arc::new(Decoder::new(b.config.decoder.clone())?),
        });
        let (kafka, options) = b.source_settings();
        let source = Source::start_with(&kafka, options, None, executor)?;
        b.running(source, Vec::new(), vec![metrics], listener)
    }
}

/// A sync handler's `on_assign` / `on_revoke`, called by the poll thread.
struct HandlerHooks<H>(Arc<H>);

impl<H: Handler> crate::source::RebalanceHooks for HandlerHooks<H> {
    fn assigned(&self, partitions: &[(String, i32)]) {
        contain("on_assign", || self.0.on_assign(partitions));
    }
    fn revoked(&self, partitions: &[(String, i32)]) {
        contain("on_revoke", || self.0.on_revoke(partitions));
    }
}

/// Runs a rebalance hook (user code, on the poll thread): a panic in it is
/// logged and the rebalance goes on, so the poll thread never unwinds through
/// librdkafka's callback.
fn contain(hook: &'static str, f: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        tracing::error!(
            hook,
            panic = %crate::source::panic_message(&*panic),
            "Rebalance hook panicked; the rebalance goes on."
        );
    }
}

/// A started pipeline: its poll thread and workers run until [`RunningPipeline::shutdown`].
#[derive(Debug)]
pub struct RunningPipeline {
    source: SourceHandle,
    workers: std::sync::Mutex<Vec<JoinHandle<()>>>,
    metrics: Vec<Arc<Metrics>>,
    drain_timeout: Duration,
    /// The lifecycle reporter's counters, when it reports.
    pub(super) reporter: Option<Arc<crate::report::ReporterStats>>,
    /// The metrics and health endpoint, when served.
    pub(super) server: std::sync::Mutex<Option<crate::observe::Server>>,
    /// The concurrency limits shown as gauges.
    pub(super) limits: Vec<Limiter>,
}

impl RunningPipeline {
    pub(super) fn new(
        source: SourceHandle,
        workers: Vec<JoinHandle<()>>,
        metrics: Vec<Arc<Metrics>>,
        options: &SourceOptions,
    ) -> Self {
        RunningPipeline {
            source,
            workers: std::sync::Mutex::new(workers),
            metrics,
            drain_timeout: options.drain_timeout,
            reporter: None,
            server: std::sync::Mutex::new(None),
            limits: Vec::new(),
        }
    }

    pub(super) fn observed(&self) -> crate::observe::Observed {
        crate::observe::Observed {
            source: self.source.clone(),
            metrics: self.metrics.clone(),
            reporter: self.reporter.clone(),
            limits: self.limits.clone(),
        }
    }

    /// The current limit of the concurrency limit named `name` (`handler`,
    /// `reporter`, or one given to
    /// [`PipelineBuilder::observe_limit`](super::PipelineBuilder::observe_limit)),
    /// as the gauge `xzepr_consumer_concurrency_limit` shows it.
    pub fn concurrency_limit(&self, name: &str) -> Option<usize> {
        self.limits
            .iter()
            .find(|l| l.name() == name)
            .map(Limiter::limit)
    }

    /// Whether the pipeline is alive and ready, with the facts behind it (what
    /// `GET /health` and `GET /ready` answer). See [`crate::observe::Health`].
    pub fn health(&self) -> crate::observe::Health {
        self.observed().health()
    }

    /// The address the metrics endpoint listens on, when
    /// [`PipelineBuilder::metrics_addr`](super::PipelineBuilder::metrics_addr) was set (and until [`RunningPipeline::join`]
    /// returns).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.server
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(crate::observe::Server::addr))
    }

    /// The pipeline's metrics as a `prometheus-client` collector, for a
    /// registry the service serves itself (see [`crate::observe`]).
    pub fn prometheus_collector(&self) -> crate::observe::PipelineCollector {
        crate::observe::PipelineCollector {
            observed: self.observed(),
        }
    }

    /// The pipeline's metrics as text in `format`, as `GET /metrics` answers.
    pub fn encode_metrics(&self, format: crate::observe::MetricsFormat) -> String {
        self.prometheus_collector().encode(format)
    }

    /// Stops the metrics endpoint, if it runs.
    fn stop_server(&self) {
        let server = self.server.lock().ok().and_then(|mut s| s.take());
        if let Some(mut server) = server {
            server.stop();
        }
    }

    /// Stops fetching; running handlers drain (up to the drain timeout, then
    /// async ones are cancelled), the last commit is synchronous, the workers end
    /// when their jobs are done.
    pub fn shutdown(&self) {
        self.source.shutdown();
    }

    /// Waits for the poll thread (which stops within the drain timeout of
    /// [`RunningPipeline::shutdown`]) and then, at most the drain timeout more,
    /// for the sync workers.
    ///
    /// # Errors
    /// The error the poll thread stopped on (an authentication failure, say);
    /// else [`PipelineError::WorkerPanicked`] for a worker that panicked outside
    /// the handler, or [`PipelineError::Stuck`] for workers still inside a
    /// handler at the deadline (they are detached).
    pub fn join(&self) -> Result<(), crate::Error> {
        let source = self.source.join();
        // The endpoint answered (not ready, then not alive) through the drain.
        self.stop_server();
        let workers = self
            .workers
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default();
        let deadline = Instant::now() + self.drain_timeout;
        let mut first_error: Option<PipelineError> = None;
        let mut stuck = 0;
        for (i, w) in workers.into_iter().enumerate() {
            while !w.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !w.is_finished() {
                stuck += 1;
                continue;
            }
            if let Err(panic) = w.join() {
                first_error.get_or_insert(PipelineError::WorkerPanicked {
                    worker: i,
                    message: crate::source::panic_message(&*panic),
                });
            }
        }
        source?;
        if stuck > 0 {
            tracing::error!(
                workers = stuck,
                "Worker threads stuck in a handler; detached."
            );
            return Err(PipelineError::Stuck { workers: stuck }.into());
        }
        first_error.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Resolves once the poll thread has stopped: after
    /// [`RunningPipeline::shutdown`], or by itself on a fatal error (then
    /// [`RunningPipeline::join`] says which).
    pub async fn stopped(&self) {
        // The poll thread is a plain thread: ask it, a few times a second.
        while !self.source.is_finished() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The pipeline's counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        let mut total = MetricsSnapshot::default();
        for m in &self.metrics {
            total += m.snapshot();
        }
        total
    }

    /// The source stage's handle (stats: in flight, buffered bytes, pauses).
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
        self.stop_server();
    }
}
