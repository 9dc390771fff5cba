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

mod complete;
mod deadletter;
mod execute;
mod flow;
mod guard;
mod retry;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::KafkaConsumerConfig;
use crate::decode::{Decoder, DecoderConfig};
use crate::dispatch::{Ordering, TypeFilter};
use crate::handler::{AsyncHandler, BoxFuture, Handler};
use crate::idempotency::IdempotencyStore;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::source::{Executor, Message, Source, SourceError, SourceHandle, SourceOptions};

pub use complete::MalformedPolicy;
use complete::{AckFn, Acked, Delivery, Lifecycle, LifecycleSink, SharedSink};
pub use deadletter::{
    headers as dead_letter_headers, DeadLetterConfig, DEFAULT_DEAD_LETTER_SUFFIX,
};
use execute::{AsyncAttempts, AsyncExecutor, DecoderPool};
use flow::Shared;
pub use guard::IdempotencyKey;
pub use retry::RetryPolicy;

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
        Message::payload(self)
    }
    fn key(&self) -> Option<&[u8]> {
        Message::key(self)
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
    /// Worker threads still ran a handler when `join` gave up waiting (the
    /// drain timeout after the poll thread stopped); they are detached, and
    /// their offsets were not committed.
    #[error("{workers} worker thread(s) still running a handler after the drain timeout")]
    Stuck {
        /// How many.
        workers: usize,
    },
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
    /// The reporter's own receivers (followed across its rediscoveries).
    own_set: Option<crate::dispatch::OwnReceivers>,
    /// Checked when the pipeline starts.
    work: Option<WorkTemplate>,
    runtime: Option<tokio::runtime::Handle>,
    sink: Option<SinkDebug>,
    malformed: MalformedPolicy,
    workers: usize,
    handler_timeout: Option<Duration>,
    idempotency: Option<Arc<dyn IdempotencyStore>>,
    idempotency_key: IdempotencyKey,
    /// Where `/metrics`, `/health` and `/ready` are served, if anywhere.
    metrics_addr: Option<std::net::SocketAddr>,
    /// The lifecycle reporter's counters (breaker state), for metrics and health.
    reporter_stats: Option<Arc<crate::report::ReporterStats>>,
    retry: RetryPolicy,
    dead_letter: Option<DeadLetterConfig>,
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
struct ReporterSink(Arc<SinkInner>);

impl Drop for ReporterSink {
    /// The pipeline let go of its sink (its workers and executor are gone):
    /// the records waiting to be resubmitted give up, and with them the last
    /// handles of the reporter, so its drain can end.
    fn drop(&mut self) {
        self.0.stopped.cancel();
    }
}

struct SinkInner {
    reporter: crate::report::Reporter,
    work: WorkTemplate,
    /// Cancelled when the pipeline drops the sink.
    stopped: tokio_util::sync::CancellationToken,
}

impl SinkInner {
    fn record(self: &Arc<Self>, record: Lifecycle, ack: AckFn) -> crate::report::Record {
        self.record_round(record, ack, 0)
    }

    /// The reporter's record; `round`: how many times it was submitted before.
    fn record_round(
        self: &Arc<Self>,
        record: Lifecycle,
        ack: AckFn,
        round: u32,
    ) -> crate::report::Record {
        use crate::report::{OwnedWork, Record};
        let w = &self.work;
        let again = record.clone();
        // Weak: a queued record must not keep the reporter open (its handle
        // is in here) once the pipeline let go of the sink.
        let me = Arc::downgrade(self);
        Record {
            work: OwnedWork::new(
                w.receiver_id.clone(),
                record.work_id,
                w.work_name.clone(),
                w.work_version.clone(),
                record.platform_id,
                w.package.clone(),
            ),
            status: record.status,
            details: record.details,
            error: record.error,
            ack: crate::report::Ack::new(move |r| match me.upgrade() {
                Some(me) => me.acknowledged(r, again, ack, round),
                None if r.is_ok() => ack.send(Acked::Ok),
                None => ack.send(Acked::Failed),
            }),
        }
    }

    /// A post that failed for now (XZepr down past the reporter's retries, its
    /// breaker open, a 401, a receiver gone) is submitted again, for as long
    /// as it takes: its offset waits, and the commit point moves on as soon as
    /// XZepr answers, without a restart. The waits grow with each round
    /// ([`Reporter::resubmit_delay`](crate::report::Reporter::resubmit_delay)),
    /// and a waiting record holds a slot of the reporter's queue, so the
    /// submitters (and the handlers behind them) stop while the queue is full.
    /// It ends as failed, which holds the offset, once the reporter is gone,
    /// the event's partition is revoked, or the pipeline stops.
    fn acknowledged(
        self: Arc<Self>,
        result: Result<String, crate::report::ReportError>,
        record: Lifecycle,
        ack: AckFn,
        round: u32,
    ) {
        use crate::report::ReportError;
        match result {
            Ok(_) => ack.send(Acked::Ok),
            Err(ReportError::Rejected { body, .. }) => ack.send(Acked::Rejected(body.to_string())),
            // The event's other post was rejected: this one can never help.
            Err(ReportError::Failed { .. }) if !ack.wanted() => ack.send(Acked::Abandoned),
            Err(ReportError::Failed { .. }) if !ack.current() || self.stopped.is_cancelled() => {
                ack.send(Acked::Failed);
            }
            Err(ReportError::Failed { .. }) => match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(self.resubmit(record, ack, round));
                }
                Err(_) => ack.send(Acked::Failed),
            },
            Err(_) => ack.send(Acked::Failed),
        }
    }

    /// Takes a queue slot, waits out the round's delay, and submits the
    /// record again through the slot, unless it became moot meanwhile.
    async fn resubmit(self: Arc<Self>, record: Lifecycle, ack: AckFn, round: u32) {
        let delay = self.reporter.resubmit_delay(round);
        let slot = tokio::select! {
            slot = self.reporter.reserve() => slot,
            () = self.stopped.cancelled() => None,
        };
        let Some(slot) = slot else {
            return ack.send(Acked::Failed);
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = self.stopped.cancelled() => return ack.send(Acked::Failed),
        }
        if !ack.wanted() {
            return ack.send(Acked::Abandoned);
        }
        if !ack.current() {
            return ack.send(Acked::Failed);
        }
        slot.send(self.record_round(record, ack, round.saturating_add(1)));
    }
}

impl LifecycleSink for ReporterSink {
    fn submit(&self, record: Lifecycle, ack: AckFn) -> BoxFuture<()> {
        let record = self.0.record(record, ack);
        let reporter = self.0.reporter.clone();
        Box::pin(async move {
            // Waits while the reporter's queue is full: backpressure onto the
            // lane. A closed reporter hands the record back; dropping it
            // acknowledges `Closed`, so the offset is held.
            let _ = reporter.send(record).await;
        })
    }
}

/// The metrics endpoint's listener, with the address asked for.
type Bound = (std::net::SocketAddr, std::net::TcpListener);

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
            own_set: None,
            work: None,
            runtime: None,
            sink: None,
            malformed: MalformedPolicy::Skip,
            workers: std::thread::available_parallelism().map_or(2, usize::from),
            handler_timeout: None,
            idempotency: None,
            idempotency_key: IdempotencyKey::default(),
            metrics_addr: None,
            reporter_stats: None,
            retry: RetryPolicy::default(),
            dead_letter: None,
        }
    }
}

impl PipelineBuilder {
    /// Worker threads for a sync handler ([`PipelineBuilder::start`]). Default:
    /// the number of CPUs, since sync handlers are for CPU-bound work. Async
    /// handlers run on the tokio runtime and ignore it.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Most handler calls in progress at once (default 1,024; see
    /// [`SourceOptions::max_in_flight`]). Async handlers run that many futures
    /// concurrently; for a sync handler it bounds the jobs queued for the
    /// worker threads. Past it, events wait in their lanes.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.source.max_in_flight = n;
        self
    }

    /// Most waiting events of one lane handed to a handler task or worker as
    /// one job (default 64; see [`SourceOptions::batch`]).
    pub fn batch(mut self, n: usize) -> Self {
        self.source.batch = n;
        self
    }

    /// Bytes of events between arrival and the end of their handler call
    /// (default 16 MiB); over it, arriving partitions are paused until the
    /// buffers are half empty. See [`SourceOptions::buffer_budget`].
    pub fn buffer_budget(mut self, bytes: usize) -> Self {
        self.source.buffer_budget = bytes;
        self
    }

    /// Events between arrival and the end of their handler call (default
    /// 50,000); over it, arriving partitions are paused like over the byte
    /// budget. See [`SourceOptions::max_buffered`].
    pub fn max_buffered(mut self, n: usize) -> Self {
        self.source.max_buffered = n;
        self
    }

    /// Offsets tracked per partition from its commit point on (default 100,000);
    /// at the limit the partition pauses until its commit point moves. See
    /// [`SourceOptions::max_tracked`].
    pub fn max_tracked(mut self, n: usize) -> Self {
        self.source.max_tracked = n;
        self
    }

    /// Ordering mode (default per partition): what may run concurrently. See
    /// [`Ordering`]; a message without a key keeps its partition's order.
    pub fn ordering(mut self, ordering: Ordering) -> Self {
        self.source.ordering = ordering;
        self
    }

    /// How long a handler call may take (default: no limit, since how long a
    /// service's work takes is the service's knowledge). An async handler past
    /// it is **cancelled** (its future dropped) and its event reported `failed`
    /// with error code `timeout`; its offset finishes like any failure. A sync
    /// closure cannot be cancelled: it runs to its end, its overrun is counted
    /// (`handler_timeouts`) and logged, and its outcome stands: a success past
    /// the limit did its work and is reported `completed`, never run again.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = Some(timeout);
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

    /// How long revoke and shutdown wait for running handlers (default 10 s);
    /// async handlers still running then are cancelled and their offsets
    /// replayed by the next owner, and [`RunningPipeline::join`] waits at most
    /// this long for sync workers after the poll thread stopped.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.source.drain_timeout = timeout;
        self
    }

    /// How long a partition may hold unfinished work while its commit point
    /// stands still before it counts as stalled (default 5 minutes; `None`
    /// turns detection off; see [`SourceOptions::stall_timeout`]): health then
    /// answers not alive, so `GET /health` answers 503 naming the partitions
    /// and their oldest unfinished offsets, until their commit points move.
    pub fn stall_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.source.stall_timeout = timeout.into();
        self
    }

    /// Whether each commit carries the offsets finished above the commit point,
    /// so a restart or the next owner after a rebalance skips them instead of
    /// replaying them (default on; see [`SourceOptions::completion_map`]).
    pub fn completion_map(mut self, on: bool) -> Self {
        self.source.completion_map = on;
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
    /// Also sets [`PipelineBuilder::own_receiver_id`] to the work's receiver, and
    /// follows it when the reporter finds the receiver again under a new id
    /// (after an XZepr restart), so the service's own events stay skipped.
    ///
    /// The work's fields are checked when the pipeline starts: an empty work
    /// name, version or package fails with [`crate::config::ConfigError::Empty`]
    /// naming it.
    pub fn lifecycle(mut self, reporter: crate::report::Reporter, work: WorkTemplate) -> Self {
        self.own_receiver = Some(work.receiver_id.clone());
        let own = reporter.own_receivers();
        own.insert(&work.receiver_id);
        self.own_set = Some(own);
        self.reporter_stats = Some(reporter.stats_shared());
        self.work = Some(work.clone());
        self.sink = Some(SinkDebug(Arc::new(ReporterSink(Arc::new(SinkInner {
            reporter,
            work,
            stopped: tokio_util::sync::CancellationToken::new(),
        })))));
        self
    }

    /// Runs each event's work at most once per idempotency key, across replays,
    /// rebalances and consumers sharing the store (see [`crate::idempotency`]).
    ///
    /// Before the handler, the event's key ([`PipelineBuilder::idempotency_key`])
    /// is claimed in `store`:
    /// - processed before: the event finishes at once, without the handler and
    ///   without lifecycle posts, counted in `duplicates`;
    /// - held by another worker, or the store unreachable: only this event's
    ///   lane waits (polling with backoff up to 1 s), until the store answers or
    ///   the partition is revoked;
    /// - claimed: the handler runs. After a success the key is marked processed
    ///   once the lifecycle posts were acknowledged (so a crash before that
    ///   replays the work and its posts), and then the offset finishes; after a
    ///   failure the claim is released, so a replay runs it again.
    ///
    /// Both stores are `Clone` and share their state: keep a clone to read its
    /// [`metrics`](IdempotencyStore::metrics). The store's futures run on the
    /// pipeline's runtime ([`PipelineBuilder::runtime`] or the current one),
    /// also for sync handlers.
    pub fn idempotency<S: IdempotencyStore + 'static>(mut self, store: S) -> Self {
        self.idempotency = Some(Arc::new(store));
        self
    }

    /// How failed handler calls are retried (default: not at all; see
    /// [`RetryPolicy`]). Only the event's lane waits: an async handler's retry
    /// is a timer in its task; a sync handler's job goes to a timer thread and
    /// back to the workers when due, so no worker thread sleeps through it.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// A dead-letter topic (default: none). An event whose handler failed on
    /// its last attempt, a malformed message under
    /// [`MalformedPolicy::DeadLetter`], and an event whose lifecycle post XZepr
    /// refused for good (reason `report_rejected`) are produced to it with
    /// their key, payload and headers unchanged, plus headers saying why (Kafka
    /// Connect's `__connect.errors.*` and [`dead_letter_headers`]). The event's
    /// offset finishes only once the broker acknowledged the dead letter; if
    /// it did not, the offset is held (the partition commits no further) and
    /// the failure is logged as an error and counted (`dead_letter_failed`).
    /// The `failed` post of a dead-lettered event names the letter's topic,
    /// partition and offset in `details.dead_letter`.
    pub fn dead_letter(mut self, config: DeadLetterConfig) -> Self {
        self.dead_letter = Some(config);
        self
    }

    /// Where the idempotency key comes from (default: the `idempotency_key`
    /// header, falling back to the CloudEvent `id`).
    pub fn idempotency_key(mut self, key: IdempotencyKey) -> Self {
        self.idempotency_key = key;
        self
    }

    /// Serves `GET /metrics` (Prometheus or OpenMetrics text), `GET /health`
    /// and `GET /ready` on `addr` (default: not served; see
    /// [`crate::observe`] and `docs/metrics.md`). The address is bound when the
    /// pipeline starts (port 0 picks a free one: read it from
    /// [`RunningPipeline::metrics_addr`]); the endpoint runs on a thread of its
    /// own until [`RunningPipeline::join`] returns or the pipeline is dropped.
    ///
    /// A start fails with [`PipelineError::MetricsBind`] when `addr` cannot be
    /// bound, before anything else starts.
    pub fn metrics_addr(mut self, addr: std::net::SocketAddr) -> Self {
        self.metrics_addr = Some(addr);
        self
    }

    /// Binds the metrics endpoint's address, if one is set.
    fn bind_metrics(&self) -> Result<Option<Bound>, PipelineError> {
        self.metrics_addr
            .map(|addr| match crate::observe::Server::bind(addr) {
                Ok(listener) => Ok((addr, listener)),
                Err(source) => Err(PipelineError::MetricsBind { addr, source }),
            })
            .transpose()
    }

    /// The running pipeline, serving its endpoint on `listener` if bound. On
    /// an error the pipeline is dropped, which stops it.
    fn running(
        &self,
        source: SourceHandle,
        workers: Vec<JoinHandle<()>>,
        metrics: Vec<Arc<Metrics>>,
        listener: Option<Bound>,
    ) -> Result<RunningPipeline, crate::Error> {
        let mut running = RunningPipeline::new(source, workers, metrics, &self.source);
        running.reporter = self.reporter_stats.clone();
        if let Some((addr, listener)) = listener {
            let server = crate::observe::Server::start(listener, running.observed())
                .map_err(|source| PipelineError::MetricsBind { addr, source })?;
            running.server = std::sync::Mutex::new(Some(server));
        }
        Ok(running)
    }

    /// The runtime the async parts run on: the one set, else the current one.
    fn runtime_for(&self, what: &'static str) -> Result<tokio::runtime::Handle, SourceError> {
        match &self.runtime {
            Some(r) => Ok(r.clone()),
            None => tokio::runtime::Handle::try_current().map_err(|_| SourceError::InvalidOption {
                field: "runtime",
                reason: what,
            }),
        }
    }

    /// Checks what spans fields, before any thread starts.
    fn validate(&self) -> Result<(), crate::Error> {
        Decoder::new(self.decoder.clone())?;
        if self.malformed == MalformedPolicy::DeadLetter && self.dead_letter.is_none() {
            return Err(crate::config::ConfigError::Invalid {
                name: "malformed",
                value: "DeadLetter".to_owned(),
                expected: "a dead-letter topic set with `dead_letter` for this policy",
            }
            .into());
        }
        if let Some(dlq) = &self.dead_letter {
            dlq.check_not_subscribed(&self.kafka.topics)?;
        }
        if let Some(w) = &self.work {
            crate::report::validate_work_fields(
                &w.work_name,
                &w.work_version,
                &w.work_version,
                &w.package,
            )?;
            if w.receiver_id.is_empty() {
                return Err(crate::config::ConfigError::Empty {
                    name: "receiver_id",
                }
                .into());
            }
        }
        Ok(())
    }

    /// The receiver ids whose events are this service's own, if skipped.
    fn own_receivers(&self) -> Option<crate::dispatch::OwnReceivers> {
        if !self.skip_own_events {
            return None;
        }
        let set = self.own_set.clone();
        match (set, &self.own_receiver) {
            (Some(set), Some(id)) => {
                set.insert(id);
                Some(set)
            }
            (None, Some(id)) => {
                let set = crate::dispatch::OwnReceivers::new();
                set.insert(id);
                Some(set)
            }
            (set, None) => set,
        }
    }

    /// What an executor (or one sync worker, so hot counters never share a
    /// cache line) needs, counting into `metrics`.
    fn shared(
        &self,
        metrics: &Arc<Metrics>,
        runtime: Option<&tokio::runtime::Handle>,
        dead_letters: Option<&Arc<deadletter::DeadLetters>>,
        remote_store: bool,
        tail_room: &Arc<tokio::sync::Semaphore>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            filter: self.filter.clone(),
            own_receiver: self.own_receivers(),
            lifecycle: self.sink.as_ref().map(|s| Arc::clone(&s.0)),
            metrics: Arc::clone(metrics),
            malformed: self.malformed,
            handler_timeout: self.handler_timeout,
            idempotency: self
                .idempotency
                .as_ref()
                .zip(runtime)
                .map(|(store, runtime)| guard::Guard {
                    store: Arc::clone(store),
                    key: self.idempotency_key.clone(),
                    runtime: runtime.clone(),
                    remote: remote_store,
                }),
            retry: self.retry.clone(),
            dead_letters: dead_letters.cloned(),
            tail_room: Arc::clone(tail_room),
        })
    }

    /// The pipeline's room for dead letters waiting on the broker: at most
    /// `max_in_flight` at once, each holding its message.
    fn tail_room(&self) -> Arc<tokio::sync::Semaphore> {
        Arc::new(tokio::sync::Semaphore::new(
            self.source.max_in_flight.max(1),
        ))
    }

    /// The dead-letter producer, if one is set.
    fn dead_letters(&self) -> Result<Option<Arc<deadletter::DeadLetters>>, crate::Error> {
        self.dead_letter
            .as_ref()
            .map(|c| deadletter::DeadLetters::new(&self.kafka, c.clone()).map(Arc::new))
            .transpose()
    }

    /// Starts the pipeline with a sync handler, run on [`PipelineBuilder::workers`]
    /// threads that share one job channel; the lanes keep the ordering mode.
    ///
    /// # Errors
    /// [`crate::Error::Config`] / [`crate::Error::Source`] for bad settings or a
    /// consumer librdkafka refuses; [`crate::Error::Decode`] for bad decoder limits.
    pub fn start<H: Handler>(self, handler: H) -> Result<RunningPipeline, crate::Error> {
        if self.workers == 0 {
            return Err(SourceError::InvalidOption {
                field: "workers",
                reason: "must be at least 1",
            }
            .into());
        }
        self.validate()?;
        let guard_runtime = match self.idempotency {
            Some(_) => Some(self.runtime_for(
                "the idempotency store needs a tokio runtime (start from one, or set `runtime`)",
            )?),
            None => None,
        };
        let listener = self.bind_metrics()?;
        let dead_letters = self.dead_letters()?;
        let decoders = Arc::new(DecoderPool::new(self.decoder.clone())?);
        let handler = Arc::new(handler);
        let (tx, rx) = crossbeam_channel::bounded(self.source.max_in_flight.max(1));
        let hooks = Arc::new(HandlerHooks(Arc::clone(&handler)));
        // Each worker drives its jobs' flows on a runtime of its own, made
        // before anything starts so a failure to make one fails here.
        let mut runtimes = Vec::with_capacity(self.workers);
        for _ in 0..self.workers {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(SourceError::Spawn)?;
            runtimes.push(runtime);
        }
        let source = Source::start_with(
            &self.kafka,
            self.source.clone(),
            Some(hooks),
            // Sync handlers: one job channel read by every worker thread.
            Box::new(crate::source::ChannelExecutor(tx)),
        )?;
        let mut workers = Vec::with_capacity(self.workers);
        let mut metrics = Vec::with_capacity(self.workers);
        let room = self.tail_room();
        for (i, runtime) in runtimes.into_iter().enumerate() {
            let m = Arc::new(Metrics::default());
            let guard = guard_runtime.as_ref();
            let shared = self.shared(&m, guard, dead_letters.as_ref(), true, &room);
            metrics.push(m);
            let (rx, handler, decoders) = (rx.clone(), Arc::clone(&handler), Arc::clone(&decoders));
            let spawned = std::thread::Builder::new()
                .name(format!("xzepr-worker-{i}"))
                .spawn(move || execute::run_sync_worker(rx, runtime, handler, shared, decoders));
            match spawned {
                Ok(w) => workers.push(w),
                Err(e) => {
                    source.shutdown();
                    return Err(SourceError::Spawn(e).into());
                }
            }
        }
        self.running(source, workers, metrics, listener)
    }

    /// Starts the pipeline with an async handler: each job runs as a task on the
    /// runtime, up to [`PipelineBuilder::max_in_flight`] at once, in the
    /// ordering mode's lanes.
    ///
    /// # Errors
    /// As [`PipelineBuilder::start`]; also [`SourceError::InvalidOption`] when there
    /// is no tokio runtime to drive the handler.
    pub fn start_async<H: AsyncHandler>(self, handler: H) -> Result<RunningPipeline, crate::Error> {
        let runtime = self
            .runtime_for("async handlers need a tokio runtime (call from one, or set `runtime`)")?;
        self.validate()?;
        let listener = self.bind_metrics()?;
        let dead_letters = self.dead_letters()?;
        let metrics = Arc::new(Metrics::default());
        let executor: Box<dyn Executor> = Box::new(AsyncExecutor {
            shared: self.shared(
                &metrics,
                Some(&runtime),
                dead_letters.as_ref(),
                false,
                &self.tail_room(),
            ),
            runtime,
            attempts: Arc::new(AsyncAttempts(Arc::new(handler))),
            decoders: Arc::new(DecoderPool::new(self.decoder.clone())?),
        });
        let source = Source::start_with(&self.kafka, self.source.clone(), None, executor)?;
        self.running(source, Vec::new(), vec![metrics], listener)
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
    reporter: Option<Arc<crate::report::ReporterStats>>,
    /// The metrics and health endpoint, when served.
    server: std::sync::Mutex<Option<crate::observe::Server>>,
}

impl RunningPipeline {
    fn new(
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
        }
    }

    fn observed(&self) -> crate::observe::Observed {
        crate::observe::Observed {
            source: self.source.clone(),
            metrics: self.metrics.clone(),
            reporter: self.reporter.clone(),
        }
    }

    /// Whether the pipeline is alive and ready, with the facts behind it (what
    /// `GET /health` and `GET /ready` answer). See [`crate::observe::Health`].
    pub fn health(&self) -> crate::observe::Health {
        self.observed().health()
    }

    /// The address the metrics endpoint listens on, when
    /// [`PipelineBuilder::metrics_addr`] was set (and until [`RunningPipeline::join`]
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
