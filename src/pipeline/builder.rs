//! The pipeline's configuration: [`PipelineBuilder`], one setter per
//! setting (each with its default and the reason for it), and
//! [`PipelineBuilder::build`], which checks them all once.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::complete::MalformedPolicy;
use super::config::PipelineConfig;
use super::deadletter::{self, DeadLetterConfig};
use super::flow::Shared;
use super::guard::{self, IdempotencyKey};
use super::reporting::Reporting;
use super::retry::RetryPolicy;
use super::sink::{ReporterSink, SinkDebug, SinkInner, WorkTemplate};
use super::{Pipeline, PipelineError, RunningPipeline};
use crate::config::KafkaConsumerConfig;
use crate::decode::{Decoder, DecoderConfig};
use crate::dispatch::{Ordering, TypeFilter};
use crate::flow_control::{Concurrency, Limiter, RateLimit};
use crate::handler::{AsyncBatchHandler, AsyncHandler, BatchHandler, Handler};
use crate::idempotency::IdempotencyStore;
use crate::metrics::Metrics;
use crate::source::{Assignment, SourceError, SourceHandle, SourceOptions};

/// The metrics endpoint's listener, with the address asked for.
pub(super) type Bound = (std::net::SocketAddr, std::net::TcpListener);

/// Configures a [`Pipeline`]: setters never fail, [`PipelineBuilder::build`]
/// checks every setting and every rule between settings, once, naming the field.
#[derive(Debug)]
#[must_use]
pub struct PipelineBuilder {
    pub(super) kafka: KafkaConsumerConfig,
    /// Every setting that is data.
    pub(super) config: PipelineConfig,
    /// The reporter's own receivers (followed across its rediscoveries).
    pub(super) own_set: Option<crate::dispatch::OwnReceivers>,
    /// Checked when the pipeline starts.
    pub(super) work: Option<WorkTemplate>,
    pub(super) runtime: Option<tokio::runtime::Handle>,
    pub(super) sink: Option<SinkDebug>,
    pub(super) idempotency: Option<Arc<dyn IdempotencyStore>>,
    /// The lifecycle reporter's counters (breaker state), for metrics and health.
    pub(super) reporter_stats: Option<Arc<crate::report::ReporterStats>>,
    /// Reporting set up by the run itself ([`PipelineBuilder::report_to`]).
    pub(super) reporting: Option<Reporting>,
    /// Concurrency limits whose gauges the pipeline's metrics show.
    pub(super) limits: Vec<Limiter>,
    /// The handler's limit's name in its gauge.
    pub(super) limit_label: &'static str,
}

impl PipelineBuilder {
    pub(super) fn new(kafka: KafkaConsumerConfig) -> Self {
        PipelineBuilder {
            kafka,
            config: PipelineConfig::default(),
            own_set: None,
            work: None,
            runtime: None,
            sink: None,
            idempotency: None,
            reporter_stats: None,
            reporting: None,
            limits: Vec::new(),
            limit_label: "handler",
        }
    }

    /// Worker threads for a sync handler ([`PipelineBuilder::start`]). Default:
    /// the number of CPUs, since sync handlers are for CPU-bound work. Async
    /// handlers run on the tokio runtime and ignore it.
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n;
        self
    }

    /// Most handler calls in progress at once (default 1,024; see
    /// [`SourceOptions::max_in_flight`]). Async handlers run that many futures
    /// concurrently; for a sync handler it bounds the jobs queued for the
    /// worker threads. Past it, events wait in their lanes.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.config.source.max_in_flight = Concurrency::Fixed(n);
        self
    }

    /// Handler calls in progress at once, fixed or adaptive (default fixed
    /// 1,024; see [`SourceOptions::max_in_flight`]). Adaptive needs an async
    /// handler ([`PipelineBuilder::start_async`], [`Pipeline::run`]): its
    /// limit follows the handler's latency, its timeouts and its
    /// [`overloaded`](crate::handler::HandlerError::overloaded) errors, and is
    /// the gauge `xzepr_consumer_concurrency_limit{limit="handler"}`.
    pub fn concurrency(mut self, concurrency: Concurrency) -> Self {
        self.config.source.max_in_flight = concurrency;
        self
    }

    /// At most this many events a second reach the handler, with bursts
    /// (default: no limit; see [`SourceOptions::rate_limit`]). Events wait in
    /// their lanes for a token, never dropped or failed.
    pub fn rate_limit(mut self, rate: RateLimit) -> Self {
        self.config.source.rate_limit = Some(rate);
        self
    }

    /// Shows `limiter`'s current limit with the pipeline's metrics, as
    /// `xzepr_consumer_concurrency_limit{limit="NAME"}`: for a limit the
    /// handler keeps itself (as `run --forward` does). The handler's and the
    /// reporter's own are shown without it.
    pub fn observe_limit(mut self, limiter: Limiter) -> Self {
        self.limits.push(limiter);
        self
    }

    /// The handler's concurrency limit's name in
    /// `xzepr_consumer_concurrency_limit{limit="NAME"}` and
    /// [`RunningPipeline::concurrency_limit`] (default `handler`; `run
    /// --forward` shows its endpoint's as `forward`).
    pub fn limit_label(mut self, label: &'static str) -> Self {
        self.limit_label = label;
        self
    }

    /// Most waiting events of one lane handed to a handler task or worker as
    /// one job (default 64; see [`SourceOptions::batch`]): also the most
    /// events a batch handler gets in one call.
    pub fn batch(mut self, n: usize) -> Self {
        self.config.source.batch = n;
        self
    }

    /// Bytes of events between arrival and the end of their handler call
    /// (default 16 MiB); over it, arriving partitions are paused until the
    /// buffers are half empty. See [`SourceOptions::buffer_budget`].
    pub fn buffer_budget(mut self, bytes: usize) -> Self {
        self.config.source.buffer_budget = bytes;
        self
    }

    /// Events between arrival and the end of their handler call (default
    /// 50,000); over it, arriving partitions are paused like over the byte
    /// budget. See [`SourceOptions::max_buffered`].
    pub fn max_buffered(mut self, n: usize) -> Self {
        self.config.source.max_buffered = n;
        self
    }

    /// Offsets tracked per partition from its commit point on (default 100,000);
    /// at the limit the partition pauses until its commit point moves. See
    /// [`SourceOptions::max_tracked`].
    pub fn max_tracked(mut self, n: usize) -> Self {
        self.config.source.max_tracked = n;
        self
    }

    /// Ordering mode (default per partition): what may run concurrently. See
    /// [`Ordering`]; a message without a key keeps its partition's order.
    pub fn ordering(mut self, ordering: Ordering) -> Self {
        self.config.source.ordering = ordering;
        self
    }

    /// How partitions move between the group's members on a rebalance
    /// (default [`Assignment::Eager`]). Under [`Assignment::Cooperative`] a
    /// rebalance revokes only the partitions that move: only they drain, and
    /// the rest keep being handled. Every member of a group must use the same;
    /// static membership is [`KafkaConsumerConfig::group_instance_id`].
    pub fn assignment(mut self, assignment: Assignment) -> Self {
        self.config.source.assignment = assignment;
        self
    }

    /// A span per event (`process {topic}`, child of the producer's W3C
    /// context from the record's `traceparent` header or CloudEvent
    /// extension) with a child per idempotency claim, handler attempt, dead
    /// letter and lifecycle post; the handler runs inside its attempt's span,
    /// and the posts carry `traceparent` to XZepr. Default off: then the flow
    /// makes no span and reads no trace header. Needs feature `otel`, and a
    /// subscriber with [`TraceGuard::layer`](crate::trace::TraceGuard::layer)
    /// to export them (see [`crate::trace`]).
    pub fn traces(mut self, on: bool) -> Self {
        self.config.traces = on;
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
        self.config.handler_timeout = Some(timeout);
        self
    }

    /// Which event types reach the handler; the rest finish at once and are committed.
    pub fn type_filter(mut self, filter: TypeFilter) -> Self {
        self.config.types = filter;
        self
    }

    /// Whether to skip events whose `source` is this service's own receiver (on by
    /// default: XZepr republishes every event it records, so a service would
    /// otherwise see its own lifecycle posts come back).
    pub fn skip_own_events(mut self, skip: bool) -> Self {
        self.config.skip_own_events = skip;
        self
    }

    /// The service's own receiver id (set automatically when the pipeline reports
    /// lifecycle events; set it by hand when the handler posts by itself).
    pub fn own_receiver_id(mut self, id: impl Into<String>) -> Self {
        self.config.own_receiver_id = Some(id.into());
        self
    }

    /// What to do with messages that do not decode (default: skip).
    pub fn malformed(mut self, policy: MalformedPolicy) -> Self {
        self.config.malformed = policy;
        self
    }

    /// Decoder limits.
    pub fn decoder(mut self, config: DecoderConfig) -> Self {
        self.config.decoder = config;
        self
    }

    /// How often finished offsets are committed (default 1 s).
    pub fn commit_interval(mut self, every: Duration) -> Self {
        self.config.source.commit_interval = every;
        self
    }

    /// How long revoke and shutdown wait for running handlers (default 10 s);
    /// async handlers still running then are cancelled and their offsets
    /// replayed by the next owner, and [`RunningPipeline::join`] waits at most
    /// this long for sync workers after the poll thread stopped.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.source.drain_timeout = timeout;
        self
    }

    /// How long a partition may hold unfinished work while its commit point
    /// stands still before it counts as stalled (default 5 minutes; `None`
    /// turns detection off; see [`SourceOptions::stall_timeout`]): health then
    /// answers not alive, so `GET /health` answers 503 naming the partitions
    /// and their oldest unfinished offsets, until their commit points move.
    pub fn stall_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.config.source.stall_timeout = timeout.into();
        self
    }

    /// Whether each commit carries the offsets finished above the commit point,
    /// so a restart or the next owner after a rebalance skips them instead of
    /// replaying them (default on; see [`SourceOptions::completion_map`]).
    pub fn completion_map(mut self, on: bool) -> Self {
        self.config.source.completion_map = on;
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
        self.config.own_receiver_id = Some(work.receiver_id.clone());
        let own = reporter.own_receivers();
        own.insert(&work.receiver_id);
        self.own_set = Some(own);
        self.reporter_stats = Some(reporter.stats_shared());
        self.limits.push(reporter.limiter().clone());
        self.work = Some(work.clone());
        self.sink = Some(SinkDebug(Arc::new(ReporterSink(Arc::new(SinkInner {
            reporter,
            work,
            stopped: tokio_util::sync::CancellationToken::new(),
        })))));
        self
    }

    /// Reports the work to XZepr as part of [`Pipeline::run`]: the run finds
    /// the service's receiver by name and type (or creates it), starts the
    /// reporter, sets the automatic lifecycle
    /// ([`PipelineBuilder::lifecycle`]) with it, and after the pipeline
    /// drained, waits up to the reporting's drain timeout for the posts still
    /// queued. For [`Pipeline::start`] and [`Pipeline::start_async`], which
    /// do not wait on XZepr, set [`PipelineBuilder::lifecycle`] instead.
    pub fn report_to(mut self, reporting: Reporting) -> Self {
        self.reporting = Some(reporting);
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
    /// is a timer in its task; a sync handler's waits on a timer of its worker's
    /// own runtime while that worker runs other jobs, so no worker thread
    /// sleeps through it.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// A dead-letter topic (default: none). An event whose handler failed on
    /// its last attempt, a malformed message under
    /// [`MalformedPolicy::DeadLetter`], and an event whose lifecycle post XZepr
    /// refused for good (reason `report_rejected`) are produced to it with
    /// their key, payload and headers unchanged, plus headers saying why (Kafka
    /// Connect's `__connect.errors.*` and [`dead_letter_headers`](super::dead_letter_headers)). The event's
    /// offset finishes only once the broker acknowledged the dead letter; if
    /// it did not, the offset is held (the partition commits no further) and
    /// the failure is logged as an error and counted (`dead_letter_failed`).
    /// The `failed` post of a dead-lettered event names the letter's topic,
    /// partition and offset in `details.dead_letter`.
    pub fn dead_letter(mut self, config: DeadLetterConfig) -> Self {
        self.config.dead_letter = Some(config);
        self
    }

    /// Where the idempotency key comes from (default: the `idempotency_key`
    /// header, falling back to the CloudEvent `id`).
    pub fn idempotency_key(mut self, key: IdempotencyKey) -> Self {
        self.config.idempotency_key = key;
        self
    }

    /// Serves `GET /metrics` (Prometheus or OpenMetrics text), `GET /health`
    /// and `GET /ready` on `addr` (default: not served; see
    /// [`crate::observe`] and `docs/reference/metrics.md`). The address is bound when the
    /// pipeline starts (port 0 picks a free one: read it from
    /// [`RunningPipeline::metrics_addr`]); the endpoint runs on a thread of its
    /// own until [`RunningPipeline::join`] returns or the pipeline is dropped.
    ///
    /// A start fails with [`PipelineError::MetricsBind`] when `addr` cannot be
    /// bound, before anything else starts.
    pub fn metrics_addr(mut self, addr: std::net::SocketAddr) -> Self {
        self.config.metrics_addr = Some(addr);
        self
    }

    /// How long the poll thread waits, the buffers over budget and the
    /// handlers draining them, before it pauses partitions (default 1 s; see
    /// [`SourceOptions::pause_after`]).
    pub fn pause_after(mut self, wait: Duration) -> Self {
        self.config.source.pause_after = wait;
        self
    }

    /// Longest single wait in `poll` while nothing runs (default 50 ms; see
    /// [`SourceOptions::poll_interval`]).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.config.source.poll_interval = every;
        self
    }

    /// Most bytes of one partition's completion map in a commit's metadata
    /// (default 2,048, at most 4,096; see
    /// [`SourceOptions::completion_map_max_bytes`]).
    pub fn completion_map_max_bytes(mut self, bytes: usize) -> Self {
        self.config.source.completion_map_max_bytes = bytes;
        self
    }

    /// Every source setting at once (ordering, limits, budgets, timings),
    /// e.g. read from a service's own configuration file.
    pub fn source_options(mut self, options: SourceOptions) -> Self {
        self.config.source = options;
        self
    }

    /// Every data setting at once (replacing what setters set before; set
    /// the others after it), e.g. read from a configuration file with
    /// [`PipelineConfig::from_json`] or any `serde` format.
    pub fn config(mut self, config: PipelineConfig) -> Self {
        self.config = config;
        self
    }

    /// The data settings as they stand.
    pub fn settings(&self) -> &PipelineConfig {
        &self.config
    }

    /// Checks every setting, and every rule between settings, and gives the
    /// pipeline ready to start: nothing runs yet.
    ///
    /// # Errors
    /// [`crate::Error::Source`] ([`SourceError::InvalidOption`]) or
    /// [`crate::Error::Config`] naming the field at fault;
    /// [`crate::Error::Decode`] for bad decoder limits.
    pub fn build(self) -> Result<Pipeline, crate::Error> {
        self.validate()?;
        Ok(Pipeline { b: self })
    }

    /// [`PipelineBuilder::build`], then [`Pipeline::start`].
    ///
    /// # Errors
    /// As both.
    pub fn start<H: Handler>(self, handler: H) -> Result<RunningPipeline, crate::Error> {
        self.build()?.start(handler)
    }

    /// [`PipelineBuilder::build`], then [`Pipeline::start_async`].
    ///
    /// # Errors
    /// As both.
    pub fn start_async<H: AsyncHandler>(self, handler: H) -> Result<RunningPipeline, crate::Error> {
        self.build()?.start_async(handler)
    }

    /// [`PipelineBuilder::build`], then [`Pipeline::start_batch`].
    ///
    /// # Errors
    /// As both.
    pub fn start_batch<H: BatchHandler>(self, handler: H) -> Result<RunningPipeline, crate::Error> {
        self.build()?.start_batch(handler)
    }

    /// [`PipelineBuilder::build`], then [`Pipeline::start_async_batch`].
    ///
    /// # Errors
    /// As both.
    pub fn start_async_batch<H: AsyncBatchHandler>(
        self,
        handler: H,
    ) -> Result<RunningPipeline, crate::Error> {
        self.build()?.start_async_batch(handler)
    }

    /// `report_to` is [`Pipeline::run`]'s: a start cannot wait on XZepr.
    pub(super) fn no_reporting(&self) -> Result<(), SourceError> {
        match self.reporting {
            Some(_) => Err(SourceError::InvalidOption {
                field: "report_to",
                reason: "is set up by Pipeline::run; to start a pipeline, use `lifecycle` instead",
            }),
            None => Ok(()),
        }
    }

    /// Binds the metrics endpoint's address, if one is set.
    pub(super) fn bind_metrics(&self) -> Result<Option<Bound>, PipelineError> {
        self.config
            .metrics_addr
            .map(|addr| match crate::observe::Server::bind(addr) {
                Ok(listener) => Ok((addr, listener)),
                Err(source) => Err(PipelineError::MetricsBind { addr, source }),
            })
            .transpose()
    }

    /// The running pipeline, serving its endpoint on `listener` if bound. On
    /// an error the pipeline is dropped, which stops it.
    pub(super) fn running(
        &self,
        source: SourceHandle,
        workers: Vec<JoinHandle<()>>,
        metrics: Vec<Arc<Metrics>>,
        listener: Option<Bound>,
    ) -> Result<RunningPipeline, crate::Error> {
        let mut running = RunningPipeline::new(source, workers, metrics, &self.config.source);
        running.reporter = self.reporter_stats.clone();
        running.limits = self.limits.clone();
        if let Some((addr, listener)) = listener {
            let server = crate::observe::Server::start(listener, running.observed())
                .map_err(|source| PipelineError::MetricsBind { addr, source })?;
            running.server = std::sync::Mutex::new(Some(server));
        }
        Ok(running)
    }

    /// The runtime the async parts run on: the one set, else the current one.
    pub(super) fn runtime_for(
        &self,
        what: &'static str,
    ) -> Result<tokio::runtime::Handle, SourceError> {
        match &self.runtime {
            Some(r) => Ok(r.clone()),
            None => tokio::runtime::Handle::try_current().map_err(|_| SourceError::InvalidOption {
                field: "runtime",
                reason: what,
            }),
        }
    }

    /// Checks what spans fields, before any thread starts.
    pub(super) fn validate(&self) -> Result<(), crate::Error> {
        let c = &self.config;
        c.check_known()?;
        if c.workers == 0 {
            return Err(SourceError::InvalidOption {
                field: "workers",
                reason: "must be at least 1",
            }
            .into());
        }
        self.kafka.to_client_config()?;
        c.source.validate(self.kafka.session_timeout)?;
        Decoder::new(c.decoder.clone())?;
        c.retry.validate()?;
        if c.traces && !cfg!(feature = "otel") {
            return Err(crate::config::ConfigError::Invalid {
                name: "traces",
                value: "true".to_owned(),
                expected: "false in a build without feature `otel`",
            }
            .into());
        }
        c.report_concurrency.validate("report_concurrency")?;
        if c.handler_timeout == Some(Duration::ZERO) {
            return Err(crate::config::ConfigError::Invalid {
                name: "handler_timeout",
                value: "0s".to_owned(),
                expected: "more than zero (no setting means no limit)",
            }
            .into());
        }
        if c.malformed == MalformedPolicy::DeadLetter && c.dead_letter.is_none() {
            return Err(crate::config::ConfigError::Invalid {
                name: "malformed",
                value: "DeadLetter".to_owned(),
                expected: "a dead-letter topic set with `dead_letter` for this policy",
            }
            .into());
        }
        c.retry.check_subscriptions(&self.kafka.topics)?;
        if let Some(dlq) = &c.dead_letter {
            dlq.validate()?;
            dlq.check_not_subscribed(&self.kafka.topics)?;
        }
        if let Some(r) = &self.reporting {
            r.validate()?;
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
    pub(super) fn own_receivers(&self) -> Option<crate::dispatch::OwnReceivers> {
        if !self.config.skip_own_events {
            return None;
        }
        let set = self.own_set.clone();
        match (set, &self.config.own_receiver_id) {
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
    pub(super) fn shared(
        &self,
        metrics: &Arc<Metrics>,
        runtime: Option<&tokio::runtime::Handle>,
        producers: &Producers,
        remote_store: bool,
        tail_room: &Arc<tokio::sync::Semaphore>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            filter: self.config.types.clone(),
            own_receiver: self.own_receivers(),
            lifecycle: self.sink.as_ref().map(|s| Arc::clone(&s.0)),
            metrics: Arc::clone(metrics),
            malformed: self.config.malformed,
            handler_timeout: self.config.handler_timeout,
            idempotency: self
                .idempotency
                .as_ref()
                .zip(runtime)
                .map(|(store, runtime)| guard::Guard {
                    store: Arc::clone(store),
                    key: self.config.idempotency_key.clone(),
                    runtime: runtime.clone(),
                    remote: remote_store,
                }),
            retry: self.config.retry.clone(),
            dead_letters: producers.dead_letters.clone(),
            delays: producers.delays.clone(),
            tail_room: Arc::clone(tail_room),
            spans: self.config.traces.then(|| crate::trace::EventSpans {
                group: self.kafka.group_id.as_str().into(),
            }),
        })
    }

    /// The pipeline's room for dead letters waiting on the broker: at most
    /// `max_in_flight` at once, each holding its message.
    pub(super) fn tail_room(&self) -> Arc<tokio::sync::Semaphore> {
        Arc::new(tokio::sync::Semaphore::new(
            self.config.source.max_in_flight.max().max(1),
        ))
    }

    /// The dead-letter and delay-topic producers, those that are set.
    pub(super) fn producers(&self) -> Result<Producers, crate::Error> {
        let dead_letters = self
            .config
            .dead_letter
            .as_ref()
            .map(|c| deadletter::DeadLetters::new(&self.kafka, c.clone()).map(Arc::new))
            .transpose()?;
        let delays = super::delay::DelayTopics::new(&self.kafka, &self.config.retry)?.map(Arc::new);
        Ok(Producers {
            dead_letters,
            delays,
        })
    }

    /// The source's settings: the Kafka configuration with the delay topics
    /// subscribed beside the source topics, and the options naming them.
    pub(super) fn source_settings(&self) -> (KafkaConsumerConfig, crate::source::SourceOptions) {
        let (mut kafka, mut options) = (self.kafka.clone(), self.config.source.clone());
        let delay_topics: Vec<String> = self
            .kafka
            .topics
            .iter()
            .flat_map(|t| self.config.retry.delay_topic_names(t))
            .collect();
        kafka.topics.extend(delay_topics.iter().cloned());
        options.delay_topics = delay_topics;
        (kafka, options)
    }
}

/// The pipeline's producers, shared by every executor.
pub(super) struct Producers {
    pub(super) dead_letters: Option<Arc<deadletter::DeadLetters>>,
    pub(super) delays: Option<Arc<super::delay::DelayTopics>>,
}
