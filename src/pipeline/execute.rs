//! The execution stage: running the handler on each event of a job.
//!
//! - **Sync handlers** run on a pool of worker threads that all read one bounded
//!   channel of jobs; each worker decodes in place with its own reusable
//!   [`Decoder`] and handles the job's events in order.
//! - **Async handlers** run as tokio tasks, one per job: up to `max_in_flight`
//!   futures at once on the runtime, never a thread or a `block_on` per event.
//!   Decoders come from a small pool, used only before the first `.await`.
//!
//! The scheduler in [`dispatch::lanes`](crate::dispatch::lanes) decides what may
//! run; this stage only runs it. Every event goes through the same steps: stale
//! check, decode, filter, `started`, handler (panics caught, timeout applied),
//! terminal post, finish.

use std::collections::HashMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde_json::Value;

use super::complete::{
    begin, begin_blocking, complete, complete_blocking, dead_letter, finish_now, malformed,
    malformed_dead_lettered, malformed_reason, Delivery, MalformedPolicy, Mark, Outcome, Pending,
    SharedSink, WorkStart,
};
use super::deadletter::{DeadLetters, Placed, Reason, Why};
use super::guard::Guard;
use super::retry::{RetryPolicy, PANIC_CODE, TIMEOUT_CODE};
use crate::decode::{CloudEvent, Decoder, DecoderConfig};
use crate::dispatch::TypeFilter;
use crate::handler::{AsyncHandler, Handler, HandlerError, Work};
use crate::metrics::Metrics;
use crate::source::{Batch, DeferCompletions, Executor, Message};

/// What every executor needs to handle an event.
pub(crate) struct Shared {
    pub(crate) filter: TypeFilter,
    /// Skip events whose source is one of these receivers (the service's own).
    pub(crate) own_receiver: Option<crate::report::OwnReceivers>,
    pub(crate) lifecycle: Option<SharedSink>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) malformed: MalformedPolicy,
    /// Past it an async handler is cancelled and its event fails with code
    /// `timeout`; a sync handler cannot be cancelled (see the builder).
    pub(crate) handler_timeout: Option<Duration>,
    /// Runs each key's work once across replays.
    pub(crate) idempotency: Option<Guard>,
    pub(crate) retry: RetryPolicy,
    /// Where events that failed for good go.
    pub(crate) dead_letters: Option<Arc<DeadLetters>>,
    /// Sync workers: where a dead letter's wait goes (set with `dead_letters`).
    pub(crate) tails: Option<Tails>,
}

impl Shared {
    /// Whether a decoded event goes to the handler; counts the reason when not.
    fn wanted(&self, ev: &CloudEvent<'_>) -> bool {
        if !self.filter.accepts(ev.event_type()) {
            Metrics::add(&self.metrics.filtered, 1);
            return false;
        }
        if let (Some(own), Some(src)) = (&self.own_receiver, ev.source_receiver_id()) {
            if own.contains(src) {
                Metrics::add(&self.metrics.own_skipped, 1);
                return false;
            }
        }
        true
    }

    /// Counts a delivery in, or drops it unhandled when its partition was revoked
    /// after it was handed over (the new owner has it).
    fn take<D: Delivery>(&self, delivery: &D) -> bool {
        if !delivery.is_current() {
            Metrics::add(&self.metrics.stale_dropped, 1);
            return false;
        }
        Metrics::add(&self.metrics.consumed, 1);
        true
    }

    fn timed_out(&self, after: Duration) -> HandlerError {
        Metrics::add(&self.metrics.handler_timeouts, 1);
        HandlerError::with_code(
            format!("handler timed out after {} ms", after.as_millis()),
            TIMEOUT_CODE,
        )
    }

    /// Whether a failed attempt runs again; counts it and logs it if so.
    fn retries<D: Delivery>(&self, d: &D, err: &HandlerError, attempt: u32) -> bool {
        if !self.retry.retries(err, attempt) || !d.is_current() {
            return false;
        }
        Metrics::add(&self.metrics.retried, 1);
        tracing::debug!(
            topic = d.topic(),
            partition = d.partition(),
            offset = d.offset(),
            attempt,
            error = %err,
            "Handler failed; retrying."
        );
        true
    }

    /// After the last attempt: the dead letter a failure needs, if a
    /// dead-letter topic is set.
    fn failure_letter<'a>(
        &'a self,
        result: &'a Result<(), HandlerError>,
        attempts: u32,
    ) -> Option<(&'a DeadLetters, Reason<'a>)> {
        let (Err(e), Some(dlq)) = (result, &self.dead_letters) else {
            return None;
        };
        let reason = Reason {
            why: Why::HandlerFailed,
            message: e.message(),
            code: e.code().unwrap_or("handler_error"),
            attempts,
        };
        Some((dlq, reason))
    }

    /// See [`annotate_terminal`].
    fn annotate_terminal(
        &self,
        details: &mut Value,
        attempts: u32,
        letter: Option<Option<Placed>>,
    ) -> bool {
        annotate_terminal(details, attempts, self.retry.max_attempts() > 1, letter)
    }
}

/// Adds the attempts (when retries are on) and where the dead letter went
/// (`letter`: `None` when none was sent, `Some(None)` when the broker did
/// not take it) to the terminal post's details. Returns whether the offset
/// must be held.
fn annotate_terminal(
    details: &mut Value,
    attempts: u32,
    retries_on: bool,
    letter: Option<Option<Placed>>,
) -> bool {
    if retries_on {
        annotate(details, "attempts", attempts.into());
    }
    match letter {
        Some(Some(placed)) => {
            annotate(details, "dead_letter", placed.to_json());
            false
        }
        Some(None) => true,
        None => false,
    }
}

/// Adds `key` to a terminal post's details (an object; a `null` becomes one).
fn annotate(details: &mut Value, key: &str, value: Value) {
    if details.is_null() {
        *details = Value::Object(Default::default());
    }
    if let Some(map) = details.as_object_mut() {
        map.insert(key.to_owned(), value);
    }
}

fn panicked() -> HandlerError {
    HandlerError::with_code("handler panicked", PANIC_CODE)
}

/// Handles one event with a sync handler, on the calling thread.
///
/// With `requeue`, an attempt that will be retried is not waited out on this
/// thread: the event's state goes into the table and the delivery comes back
/// with when to run it again, for the worker to hand its job to the
/// [`RetryTimer`]. Without, the thread sleeps through the backoff.
pub(crate) fn handle_sync<D: Delivery, H: Handler + ?Sized>(
    delivery: D,
    decoder: &mut Decoder,
    handler: &H,
    shared: &Shared,
    requeue: Option<&RetryTable<D>>,
) -> Option<(D, Instant)> {
    let metrics = &shared.metrics;
    // The assignment is part of the key: after a revoke and a new assignment
    // the same offset starts afresh, never from an old assignment's state.
    let mut key = requeue.map(|_| {
        (
            delivery.topic_arc(),
            delivery.partition(),
            delivery.offset(),
            delivery.epoch(),
        )
    });
    let earlier = requeue
        .zip(key.as_ref())
        .and_then(|(table, key)| table.lock().ok()?.remove(key));
    if earlier.is_some() {
        if !delivery.is_current() {
            // Revoked while it waited: the new owner has it.
            Metrics::add(&metrics.stale_dropped, 1);
            return None;
        }
    } else if !shared.take(&delivery) {
        return None;
    }
    let headers = delivery.headers();
    let ev = match decoder.decode_message(headers.iter().copied(), delivery.payload()) {
        Ok(ev) => ev,
        Err(e) => {
            drop(headers);
            if let Some(d) = malformed(delivery, &e, metrics, shared.malformed) {
                let message = e.to_string();
                match (shared.dead_letters.clone(), &shared.tails) {
                    (Some(dlq), Some(tails)) => {
                        tails.spawn(malformed_tail(dlq, d, message, metrics))
                    }
                    _ => malformed_dead_lettered(d, None, metrics),
                }
            }
            return None;
        }
    };
    // A retried event was wanted and claimed on its first attempt.
    let (first_attempt, mark, pending) = match earlier {
        Some(e) => (e.attempts + 1, e.mark, Some(e.pending)),
        None => {
            if !shared.wanted(&ev) {
                drop((ev, headers));
                finish_now(delivery, metrics);
                return None;
            }
            let mark = match &shared.idempotency {
                Some(guard) => {
                    let key = guard.key.of(&headers, ev.id());
                    match guard.admit_blocking(key, &delivery, metrics) {
                        Ok(mark) => Some(mark),
                        Err(skip) => {
                            drop((ev, headers));
                            skip.apply(delivery, metrics);
                            return None;
                        }
                    }
                }
                None => None,
            };
            (1, mark, None)
        }
    };
    let mut work = Work::new(
        format!("work-{}", ev.id()),
        delivery.topic_arc(),
        delivery.partition(),
        delivery.offset(),
    );
    let platform_id = ev.platform_id().unwrap_or_default().to_owned();
    let sink = shared.lifecycle.as_ref();
    // `started` goes to the reporter before the first attempt, once.
    let pending = pending.unwrap_or_else(|| {
        begin_blocking(
            sink,
            metrics,
            shared.dead_letters.as_ref(),
            &WorkStart {
                work_id: work.id(),
                platform_id: &platform_id,
                event_id: ev.id(),
                event_type: ev.event_type(),
            },
        )
    });
    let mut attempt = first_attempt;
    let result = loop {
        let result = call_sync(handler, &ev, &mut work, shared, &delivery);
        match result {
            Err(e) if shared.retries(&delivery, &e, attempt) => {
                let due = Instant::now() + shared.retry.delay(attempt);
                if let (Some(table), Some(key)) = (requeue, key.take()) {
                    drop((ev, headers));
                    let state = SyncRetry {
                        attempts: attempt,
                        pending,
                        mark,
                    };
                    if let Ok(mut t) = table.lock() {
                        t.insert(key, state);
                    }
                    return Some((delivery, due));
                }
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                attempt += 1;
                work.details.clear();
            }
            result => break result,
        }
    };
    drop((ev, headers));
    let mut details = Value::Object(std::mem::take(&mut work.details));
    let mut outcome = Outcome {
        work_id: work.id,
        platform_id,
        result,
        details: Value::Null,
        mark,
        hold: false,
    };
    let Some((dlq, tails)) = shared
        .failure_letter(&outcome.result, attempt)
        .and(shared.dead_letters.clone())
        .zip(shared.tails.as_ref())
    else {
        outcome.hold = shared.annotate_terminal(&mut details, attempt, None);
        outcome.details = details;
        complete_blocking(sink, metrics, pending, delivery, outcome);
        return None;
    };
    // The dead letter waits on the broker, through an outage if need be: the
    // rest of the event's flow goes to the runtime, so no worker thread waits.
    tails.spawn(failure_tail(
        shared, dlq, delivery, pending, details, outcome, attempt,
    ));
    None
}

/// The end of a failed event's flow, the same for sync and async handlers:
/// its dead letter, tried until the broker takes it (its offset waits, its
/// lane goes on), then its terminal post and its offset.
fn failure_tail<D: Delivery>(
    shared: &Shared,
    dlq: Arc<DeadLetters>,
    delivery: D,
    pending: Option<Arc<Pending<D>>>,
    mut details: Value,
    mut outcome: Outcome,
    attempt: u32,
) -> impl Future<Output = ()> + Send + 'static {
    let (message, code) = match &outcome.result {
        Err(e) => (
            e.message().to_owned(),
            e.code().unwrap_or("handler_error").to_owned(),
        ),
        Ok(()) => (String::new(), String::new()),
    };
    let (metrics, sink) = (Arc::clone(&shared.metrics), shared.lifecycle.clone());
    let attempts_noted = shared.retry.max_attempts() > 1;
    async move {
        let reason = Reason {
            why: Why::HandlerFailed,
            message: &message,
            code: &code,
            attempts: attempt,
        };
        let placed = dead_letter(&dlq, &delivery, &reason, &metrics).await;
        outcome.hold = annotate_terminal(&mut details, attempt, attempts_noted, Some(placed));
        outcome.details = details;
        complete(sink.as_ref(), &metrics, pending, delivery, outcome).await;
    }
}

/// A malformed message's dead letter, tried until the broker takes it, then
/// its offset.
fn malformed_tail<D: Delivery>(
    dlq: Arc<DeadLetters>,
    d: D,
    message: String,
    metrics: &Arc<Metrics>,
) -> impl Future<Output = ()> + Send + 'static {
    let metrics = Arc::clone(metrics);
    async move {
        let placed = dead_letter(&dlq, &d, &malformed_reason(&message), &metrics).await;
        malformed_dead_lettered(d, placed, &metrics);
    }
}

/// Where the part of an event's flow that waits on a broker (its dead
/// letter) runs, so neither a worker thread nor the event's lane waits
/// through an outage.
#[derive(Clone)]
pub(crate) struct Tails {
    pub(crate) runtime: tokio::runtime::Handle,
    /// At most `max_in_flight` tails at once; past it a worker waits for room
    /// (each holds its message, which no longer counts in the buffer budget).
    pub(crate) room: Arc<tokio::sync::Semaphore>,
}

impl Tails {
    /// From a task: waits for room without blocking a thread.
    async fn spawn_async(&self, tail: impl Future<Output = ()> + Send + 'static) {
        let permit = Arc::clone(&self.room).acquire_owned().await.ok();
        self.runtime.spawn(async move {
            let _permit = permit;
            tail.await;
        });
    }

    /// From a worker thread.
    fn spawn(&self, tail: impl Future<Output = ()> + Send + 'static) {
        // On a worker thread, never inside the runtime: waiting here is allowed.
        let permit = self
            .runtime
            .block_on(Arc::clone(&self.room).acquire_owned())
            .ok();
        self.runtime.spawn(async move {
            let _permit = permit;
            tail.await;
        });
    }
}

/// A sync event between attempts: what its first attempt set up.
pub(crate) struct SyncRetry<D: Delivery> {
    /// Attempts made.
    attempts: u32,
    /// Its `started` post's acknowledgement.
    pending: Option<Arc<Pending<D>>>,
    /// Its idempotency claim.
    mark: Option<Mark>,
}

/// Sync events waiting for their next attempt, by topic, partition, offset and
/// assignment.
pub(crate) type RetryTable<D> = Mutex<HashMap<RetryKey, SyncRetry<D>>>;

/// Topic, partition, offset and assignment epoch.
pub(crate) type RetryKey = (Arc<str>, i32, i64, u64);

/// Holds the jobs of sync events waiting for their next attempt, and hands each
/// back to the workers when it is due: the job keeps its lane (so its key, or
/// partition, stays in order), no worker thread waits.
pub(crate) struct RetryTimer;

/// The sync workers' shared retry table, and the way to the [`RetryTimer`].
pub(crate) type SyncRetries = (Arc<RetryTable<Message>>, Sender<(Instant, Batch)>);

/// How often the timer looks at the source, so a stop never waits on a backoff.
const TIMER_TICK: Duration = Duration::from_millis(50);

impl RetryTimer {
    /// Starts the timer thread; it ends once `source` stops (dropping the jobs
    /// it holds: their offsets are held and replayed) or every worker is gone.
    pub(crate) fn spawn(
        jobs: Sender<Batch>,
        source: crate::source::SourceHandle,
        capacity: usize,
    ) -> std::io::Result<Sender<(Instant, Batch)>> {
        // Bounded by the jobs in flight: each waiting job is one of them.
        let (tx, rx) = crossbeam_channel::bounded::<(Instant, Batch)>(capacity.max(1));
        std::thread::Builder::new()
            .name("xzepr-retry-timer".to_owned())
            .spawn(move || {
                let mut waiting: Vec<(Instant, Batch)> = Vec::new();
                loop {
                    if source.is_stopping() || source.is_finished() {
                        return;
                    }
                    let next = waiting.iter().map(|(due, _)| *due).min();
                    let wait = next.map_or(TIMER_TICK, |due| {
                        due.saturating_duration_since(Instant::now())
                            .min(TIMER_TICK)
                    });
                    match rx.recv_timeout(wait) {
                        Ok(job) => waiting.push(job),
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                            if waiting.is_empty() {
                                return;
                            }
                        }
                    }
                    let now = Instant::now();
                    let mut i = 0;
                    while i < waiting.len() {
                        if waiting[i].0 <= now {
                            let (_, batch) = waiting.swap_remove(i);
                            // Workers gone: dropping it holds its offsets.
                            let _ = jobs.send(batch);
                        } else {
                            i += 1;
                        }
                    }
                }
            })?;
        Ok(tx)
    }
}

/// One call of a sync handler: panics caught, the timeout applied after the fact.
fn call_sync<D: Delivery, H: Handler + ?Sized>(
    handler: &H,
    ev: &CloudEvent<'_>,
    work: &mut Work,
    shared: &Shared,
    delivery: &D,
) -> Result<(), HandlerError> {
    let start = shared.handler_timeout.map(|t| (t, Instant::now()));
    let began = Instant::now();
    // The handler is user code: a panic fails this event, never the worker.
    let result = catch_unwind(AssertUnwindSafe(|| handler.handle(ev, work)))
        .unwrap_or_else(|_| Err(panicked()));
    shared.metrics.handler_latency.observe(began.elapsed());
    if let Some((limit, start)) = start {
        let took = start.elapsed();
        if took > limit {
            // It cannot be cancelled, so its outcome stands: a success did its
            // work, and turning it into a (retryable) timeout would run that
            // work again. The overrun is counted and logged.
            Metrics::add(&shared.metrics.handler_timeouts, 1);
            tracing::warn!(
                topic = delivery.topic(),
                partition = delivery.partition(),
                offset = delivery.offset(),
                took_ms = took.as_millis() as u64,
                limit_ms = limit.as_millis() as u64,
                succeeded = result.is_ok(),
                "Sync handler ran past its timeout; its outcome stands."
            );
        }
    }
    result
}

/// Polls a future, turning a panic into `Err`: a handler's bug fails its
/// event, never the task that runs the lane.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match catch_unwind(AssertUnwindSafe(|| Pin::new(&mut *inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(_) => Poll::Ready(Err(())),
        }
    }
}

/// Decoders for the async path, reused across tasks: each is taken for the
/// synchronous decode step only, so a handful serve any number of tasks.
pub(crate) struct DecoderPool {
    config: DecoderConfig,
    tx: Sender<Decoder>,
    rx: Receiver<Decoder>,
}

impl DecoderPool {
    /// Most idle decoders kept; more are made when needed, and dropped after.
    const KEPT: usize = 16;

    pub(crate) fn new(config: DecoderConfig) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(Self::KEPT);
        DecoderPool { config, tx, rx }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Decoder) -> R) -> Result<R, crate::decode::Error> {
        let mut decoder = match self.rx.try_recv() {
            Ok(d) => d,
            Err(_) => Decoder::new(self.config.clone())?,
        };
        let r = f(&mut decoder);
        let _ = self.tx.try_send(decoder);
        Ok(r)
    }
}

/// Handles one event with an async handler.
pub(crate) async fn handle_async<D: Delivery, H: AsyncHandler + ?Sized>(
    delivery: D,
    handler: &H,
    shared: &Shared,
    decoders: &DecoderPool,
) {
    let metrics = &shared.metrics;
    if !shared.take(&delivery) {
        return;
    }
    // Decode and own the event (and its idempotency key) before the first
    // await: the decoder goes back to the pool at once.
    let decoded = decoders
        .with(|decoder| {
            let headers = delivery.headers();
            decoder
                .decode_message(headers.iter().copied(), delivery.payload())
                .and_then(|ev| {
                    if !shared.wanted(&ev) {
                        return Ok(None);
                    }
                    let key = shared
                        .idempotency
                        .as_ref()
                        .map(|g| g.key.of(&headers, ev.id()).to_owned());
                    ev.to_owned_message().map(|m| Some((m, key)))
                })
        })
        .and_then(|r| r);
    let (message, key) = match decoded {
        Ok(Some(m)) => m,
        Ok(None) => {
            finish_now(delivery, metrics);
            return;
        }
        Err(e) => {
            if let Some(d) = malformed(delivery, &e, metrics, shared.malformed) {
                let message = e.to_string();
                match (shared.dead_letters.clone(), &shared.tails) {
                    (Some(dlq), Some(tails)) => {
                        tails
                            .spawn_async(malformed_tail(dlq, d, message, metrics))
                            .await;
                    }
                    _ => malformed_dead_lettered(d, None, metrics),
                }
            }
            return;
        }
    };
    let mark = match (&shared.idempotency, key) {
        (Some(guard), Some(key)) => match guard.admit(&key, &delivery, metrics).await {
            Ok(mark) => Some(mark),
            Err(skip) => {
                skip.apply(delivery, metrics);
                return;
            }
        },
        _ => None,
    };
    let work = Work::new(
        format!("work-{}", message.id),
        delivery.topic_arc(),
        delivery.partition(),
        delivery.offset(),
    );
    let platform_id = message.platform_id.clone();
    let sink = shared.lifecycle.as_ref();
    let pending = begin(
        sink,
        metrics,
        shared.dead_letters.as_ref(),
        &WorkStart {
            work_id: work.id(),
            platform_id: &platform_id,
            event_id: &message.id,
            event_type: &message.event_type,
        },
    )
    .await;
    // Every attempt but the last gets a copy; the last takes the message.
    let mut message = Some(message);
    let mut attempt = 1;
    let result = loop {
        let last = attempt >= shared.retry.max_attempts();
        let m = if last {
            message.take()
        } else {
            message.clone()
        };
        let Some(m) = m else {
            break Err(panicked());
        };
        let began = Instant::now();
        let ran = run_handler(handler, m, &work, shared).await;
        metrics.handler_latency.observe(began.elapsed());
        match ran {
            Err(e) if shared.retries(&delivery, &e, attempt) => {
                // Only this task waits: its lane, no thread, no other lane.
                tokio::time::sleep(shared.retry.delay(attempt)).await;
                attempt += 1;
            }
            result => break result,
        }
    };
    let (result, mut details) = match result {
        Ok(details) => (Ok(()), details),
        Err(e) => (Err(e), Value::Object(Default::default())),
    };
    let mut outcome = Outcome {
        work_id: work.id,
        platform_id,
        result,
        details: Value::Null,
        mark,
        hold: false,
    };
    match shared
        .failure_letter(&outcome.result, attempt)
        .and(shared.dead_letters.clone())
        .zip(shared.tails.as_ref())
    {
        Some((dlq, tails)) => {
            let tail = failure_tail(shared, dlq, delivery, pending, details, outcome, attempt);
            tails.spawn_async(tail).await;
        }
        None => {
            outcome.hold = shared.annotate_terminal(&mut details, attempt, None);
            outcome.details = details;
            complete(sink, metrics, pending, delivery, outcome).await;
        }
    }
}

/// The handler's future, with panics caught and the timeout applied.
async fn run_handler<H: AsyncHandler + ?Sized>(
    handler: &H,
    message: crate::decode::CloudEventMessage,
    work: &Work,
    shared: &Shared,
) -> Result<Value, HandlerError> {
    // A panic while building the future fails the event too.
    let Ok(fut) = catch_unwind(AssertUnwindSafe(|| handler.handle(message, work.info()))) else {
        return Err(panicked());
    };
    let fut = CatchUnwind(fut);
    let ran = match shared.handler_timeout {
        // Dropping the future on timeout cancels the handler's work.
        Some(limit) => match tokio::time::timeout(limit, fut).await {
            Ok(ran) => ran,
            Err(_) => return Err(shared.timed_out(limit)),
        },
        None => fut.await,
    };
    ran.unwrap_or_else(|()| Err(panicked()))
}

/// Runs a job's events in order, then drops the batch (releasing the lane).
/// Cancelled at its partition's drain deadline: what has not finished is held.
async fn run_batch<H: AsyncHandler + ?Sized>(
    mut batch: Batch,
    handler: Arc<H>,
    shared: Arc<Shared>,
    decoders: Arc<DecoderPool>,
) {
    let Some(cancel) = batch.cancellation() else {
        return;
    };
    let run = async {
        for message in batch.by_ref() {
            handle_async(message, &*handler, &shared, &decoders).await;
        }
    };
    tokio::select! {
        biased;
        () = cancel.cancelled() => {}
        () = run => {}
    }
}

/// Async handlers: a tokio task per job.
pub(crate) struct AsyncExecutor<H: ?Sized> {
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) handler: Arc<H>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) decoders: Arc<DecoderPool>,
}

impl<H: AsyncHandler + ?Sized> Executor for AsyncExecutor<H> {
    fn execute(&self, batch: Batch) -> Result<(), Batch> {
        // A runtime that is shutting down drops the task, and with it the batch:
        // its messages are held and its lane released.
        self.runtime.spawn(run_batch(
            batch,
            Arc::clone(&self.handler),
            Arc::clone(&self.shared),
            Arc::clone(&self.decoders),
        ));
        Ok(())
    }
}

/// A worker thread's loop: jobs until the channel closes and is empty.
pub(crate) fn run_sync_worker<H: Handler + ?Sized>(
    jobs: Receiver<Batch>,
    mut decoder: Decoder,
    handler: Arc<H>,
    shared: Arc<Shared>,
    retries: Option<SyncRetries>,
) {
    let table = retries.as_ref().map(|(t, _)| &**t);
    for batch in jobs {
        // Declared first, dropped last: the batch's release goes out with its
        // finished offsets, in one message to the poll thread.
        let _one_wake = DeferCompletions::new(&batch);
        let mut batch = batch;
        let due = loop {
            let Some(message) = batch.next() else {
                break None;
            };
            if let Some((message, due)) =
                handle_sync(message, &mut decoder, &*handler, &shared, table)
            {
                // The rest of the job waits with it, in order.
                batch.put_back(message);
                break Some(due);
            }
        };
        if let (Some(due), Some((_, timer))) = (due, &retries) {
            // A timer that is gone drops the job: its offsets are held.
            let _ = timer.send((due, batch));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::complete::{AckFn, Acked, Lifecycle, LifecycleSink, Status};
    use super::*;
    use crate::handler::BoxFuture;
    use serde_json::json;
    use std::sync::Mutex as StdMutex;

    struct TestDelivery {
        offset: i64,
        epoch: u64,
        payload: Vec<u8>,
        finished: Arc<StdMutex<Vec<(i64, bool)>>>,
    }

    impl Delivery for TestDelivery {
        fn topic(&self) -> &str {
            "t"
        }
        fn topic_arc(&self) -> Arc<str> {
            Arc::from("t")
        }
        fn partition(&self) -> i32 {
            0
        }
        fn offset(&self) -> i64 {
            self.offset
        }
        fn epoch(&self) -> u64 {
            self.epoch
        }
        fn payload(&self) -> Option<&[u8]> {
            Some(&self.payload)
        }
        fn headers(&self) -> Vec<(&str, &[u8])> {
            Vec::new()
        }
        fn finish(self) {
            self.finished.lock().unwrap().push((self.offset, true));
        }
        fn hold(self) {
            self.finished.lock().unwrap().push((self.offset, false));
        }
    }

    /// Holds acks until released, to prove an offset waits for its posts.
    #[derive(Default)]
    struct HeldSink {
        held: StdMutex<Vec<(Lifecycle, AckFn)>>,
    }

    impl LifecycleSink for HeldSink {
        fn submit_blocking(&self, record: Lifecycle, ack: AckFn) {
            self.held.lock().unwrap().push((record, ack));
        }
        fn submit(&self, record: Lifecycle, ack: AckFn) -> BoxFuture<()> {
            self.submit_blocking(record, ack);
            Box::pin(async {})
        }
    }

    fn event(ty: &str, source: &str) -> Vec<u8> {
        format!(r#"{{"id":"e1","source":"{source}","specversion":"1.0.1","type":"{ty}","platform_id":"linux"}}"#)
            .into_bytes()
    }

    fn shared(sink: Option<Arc<HeldSink>>, filter: TypeFilter, policy: MalformedPolicy) -> Shared {
        Shared {
            filter,
            own_receiver: Some({
                let own = crate::report::OwnReceivers::new();
                own.insert("ME");
                own
            }),
            lifecycle: sink.map(|s| s as SharedSink),
            metrics: Arc::new(Metrics::default()),
            malformed: policy,
            handler_timeout: None,
            idempotency: None,
            retry: RetryPolicy::none(),
            dead_letters: None,
            tails: None,
        }
    }

    type Finished = Arc<StdMutex<Vec<(i64, bool)>>>;

    fn deliveries(payloads: Vec<Vec<u8>>) -> (Vec<TestDelivery>, Finished) {
        let finished = Arc::new(StdMutex::new(Vec::new()));
        let ds = payloads
            .into_iter()
            .enumerate()
            .map(|(i, payload)| TestDelivery {
                offset: i as i64,
                epoch: 1,
                payload,
                finished: Arc::clone(&finished),
            })
            .collect();
        (ds, finished)
    }

    fn run_sync(payloads: Vec<Vec<u8>>, shared: &Shared) -> Finished {
        let handler = |ev: &CloudEvent<'_>, work: &mut Work| -> Result<(), String> {
            work.detail("seen", ev.event_type());
            match ev.event_type() {
                "fail" => Err("it failed".to_owned()),
                "panic" => panic!("handler bug"),
                _ => Ok(()),
            }
        };
        let mut decoder = Decoder::new(DecoderConfig::default()).unwrap();
        let (ds, finished) = deliveries(payloads);
        for d in ds {
            handle_sync(d, &mut decoder, &handler, shared, None);
        }
        finished
    }

    fn done(f: &Finished) -> Vec<i64> {
        let mut v: Vec<i64> = f
            .lock()
            .unwrap()
            .iter()
            .filter(|x| x.1)
            .map(|x| x.0)
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn offsets_finish_only_after_both_posts_are_acknowledged() {
        let sink = Arc::new(HeldSink::default());
        let sh = shared(
            Some(Arc::clone(&sink)),
            TypeFilter::any(),
            MalformedPolicy::Skip,
        );
        let finished = run_sync(vec![event("ok", "x"), event("fail", "x")], &sh);
        assert!(
            finished.lock().unwrap().is_empty(),
            "finished before any ack"
        );
        let held: Vec<_> = std::mem::take(&mut *sink.held.lock().unwrap());
        let statuses: Vec<_> = held.iter().map(|(r, _)| r.status).collect();
        assert_eq!(
            statuses,
            [
                Status::Started,
                Status::Completed,
                Status::Started,
                Status::Failed
            ]
        );
        assert_eq!(held[1].0.details, json!({"seen": "ok"}));
        assert_eq!(
            held[3].0.error,
            Some(("it failed".to_owned(), "handler_error".to_owned()))
        );
        let mut acks = held.into_iter().map(|(_, a)| a);
        // Ack the first event's completed before its started: order does not matter.
        let (a0, a1) = (acks.next().unwrap(), acks.next().unwrap());
        a1.send(Acked::Ok);
        assert!(finished.lock().unwrap().is_empty());
        a0.send(Acked::Ok);
        assert_eq!(*finished.lock().unwrap(), vec![(0, true)]);
        // A post that exhausted its retries holds its offset.
        acks.next().unwrap().send(Acked::Ok);
        acks.next().unwrap().send(Acked::Failed);
        assert_eq!(*finished.lock().unwrap(), vec![(0, true), (1, false)]);
        let m = sh.metrics.snapshot();
        assert_eq!(
            (m.handled, m.handler_failed, m.report_failed, m.finished),
            (2, 1, 1, 1)
        );
    }

    #[test]
    fn filtered_own_and_malformed_finish_at_once_and_panics_fail() {
        let sink = Arc::new(HeldSink::default());
        let filter = TypeFilter::any().prefix("deployment.").prefix("panic");
        let sh = shared(Some(Arc::clone(&sink)), filter, MalformedPolicy::Skip);
        let payloads = vec![
            event("deployment.x", "xzepr.event.receiver.OTHER"),
            event("other.type", "x"),
            event("deployment.y", "xzepr.event.receiver.ME"),
            b"{not json".to_vec(),
            event("panic", "x"),
        ];
        let finished = run_sync(payloads, &sh);
        assert_eq!(done(&finished), vec![1, 2, 3]);
        let m = sh.metrics.snapshot();
        assert_eq!(
            (m.filtered, m.own_skipped, m.malformed, m.handler_failed),
            (1, 1, 1, 1)
        );
        let held = std::mem::take(&mut *sink.held.lock().unwrap());
        assert_eq!(held.len(), 4);
        assert_eq!(held[3].0.error.as_ref().unwrap().1, "handler_panic");
        for (_, ack) in held {
            ack.send(Acked::Ok);
        }
        assert_eq!(done(&finished), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn an_earlier_assignments_retry_state_is_never_reused() {
        let sink = Arc::new(HeldSink::default());
        let sh = shared(
            Some(Arc::clone(&sink)),
            TypeFilter::any(),
            MalformedPolicy::Skip,
        );
        // Offset 0 of assignment 1 waits for its next attempt (its `started`
        // went out with that assignment).
        let table: RetryTable<TestDelivery> = Mutex::new(HashMap::new());
        let old = SyncRetry {
            attempts: 1,
            pending: None,
            mark: None,
        };
        table.lock().unwrap().insert((Arc::from("t"), 0, 0, 1), old);
        // The partition is revoked and assigned again: offset 0 comes back.
        let (mut ds, finished) = deliveries(vec![event("ok", "x")]);
        let mut again = ds.remove(0);
        again.epoch = 2;
        let handler = |_: &CloudEvent<'_>, _: &mut Work| -> Result<(), String> { Ok(()) };
        let mut decoder = Decoder::new(DecoderConfig::default()).unwrap();
        assert!(handle_sync(again, &mut decoder, &handler, &sh, Some(&table)).is_none());
        // A first attempt of its own: counted in, with its own `started`.
        let statuses: Vec<_> = sink.held.lock().unwrap().iter().map(|(r, _)| r.status).collect();
        assert_eq!(statuses, [Status::Started, Status::Completed]);
        assert_eq!(sh.metrics.snapshot().consumed, 1);
        for (_, ack) in std::mem::take(&mut *sink.held.lock().unwrap()) {
            ack.send(Acked::Ok);
        }
        assert_eq!(done(&finished), vec![0]);
    }

    #[test]
    fn the_hold_policy_holds_a_malformed_offset() {
        let sh = shared(None, TypeFilter::any(), MalformedPolicy::Hold);
        let finished = run_sync(vec![b"{broken".to_vec(), event("ok", "x")], &sh);
        assert_eq!(*finished.lock().unwrap(), vec![(0, false), (1, true)]);
        assert_eq!(sh.metrics.snapshot().malformed, 1);
    }

    /// Waits until exactly `offsets` finished (marks settle on the runtime).
    fn wait_done(f: &Finished, offsets: &[i64]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while done(f) != offsets {
            assert!(Instant::now() < deadline, "finished {:?}", done(f));
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn guarded(sh: &mut Shared, rt: &tokio::runtime::Runtime) -> crate::idempotency::MemoryStore {
        let store = crate::idempotency::MemoryStore::new();
        sh.idempotency = Some(Guard {
            store: Arc::new(store.clone()),
            key: super::super::IdempotencyKey::EventId,
            runtime: rt.handle().clone(),
        });
        store
    }

    fn begin_now(
        rt: &tokio::runtime::Runtime,
        store: &crate::idempotency::MemoryStore,
    ) -> crate::idempotency::Begin {
        use crate::idempotency::IdempotencyStore;
        rt.block_on(store.begin("e1")).unwrap()
    }

    #[test]
    fn a_guarded_key_runs_once_and_is_marked_only_after_its_posts() {
        use crate::idempotency::Begin;
        let rt = tokio::runtime::Runtime::new().unwrap();
        let sink = Arc::new(HeldSink::default());
        let mut sh = shared(
            Some(Arc::clone(&sink)),
            TypeFilter::any(),
            MalformedPolicy::Skip,
        );
        let store = guarded(&mut sh, &rt);
        // Every test event has the id `e1`: the first is handled; while its
        // posts are unacknowledged the key stays claimed, not processed.
        let finished = run_sync(vec![event("ok", "x")], &sh);
        assert!(matches!(begin_now(&rt, &store), Begin::Busy));
        for (_, ack) in std::mem::take(&mut *sink.held.lock().unwrap()) {
            ack.send(Acked::Ok);
        }
        // The mark is written on the runtime, then the offset finishes.
        wait_done(&finished, &[0]);
        assert!(matches!(begin_now(&rt, &store), Begin::AlreadyProcessed));
        // Replays finish at once: no handler, no posts.
        let replay = run_sync(vec![event("ok", "x"), event("fail", "x")], &sh);
        assert_eq!(done(&replay), vec![0, 1]);
        assert!(sink.held.lock().unwrap().is_empty());
        let m = sh.metrics.snapshot();
        assert_eq!((m.handled, m.duplicates), (1, 2));
    }

    #[test]
    fn a_failed_guarded_work_releases_its_key_for_the_replay() {
        use crate::idempotency::Begin;
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut sh = shared(None, TypeFilter::any(), MalformedPolicy::Skip);
        let store = guarded(&mut sh, &rt);
        let finished = run_sync(vec![event("fail", "x")], &sh);
        // Failed and (without a lifecycle) finished at once; the key is free.
        assert_eq!(done(&finished), vec![0]);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match begin_now(&rt, &store) {
                Begin::Run(claim) => {
                    drop(claim);
                    break;
                }
                other => {
                    assert!(Instant::now() < deadline, "key not released: {other:?}");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        let replay = run_sync(vec![event("ok", "x")], &sh);
        let m = sh.metrics.snapshot();
        assert_eq!((m.handled, m.handler_failed, m.duplicates), (2, 1, 0));
        wait_done(&replay, &[0]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_async_handler_past_its_timeout_fails_with_code_timeout_and_panics_fail() {
        let sink = Arc::new(HeldSink::default());
        let mut sh = shared(
            Some(Arc::clone(&sink)),
            TypeFilter::any(),
            MalformedPolicy::Skip,
        );
        sh.handler_timeout = Some(Duration::from_millis(100));
        let handler = |m: crate::decode::CloudEventMessage, _info: crate::handler::WorkInfo| async move {
            match m.event_type.as_str() {
                "slow" => tokio::time::sleep(Duration::from_secs(3600)).await,
                "panic" => panic!("async handler bug"),
                _ => {}
            }
            Ok::<_, String>(json!({"ok": true}))
        };
        let pool = DecoderPool::new(DecoderConfig::default());
        let (ds, finished) = deliveries(vec![
            event("slow", "x"),
            event("panic", "x"),
            event("fine", "x"),
        ]);
        for d in ds {
            handle_async(d, &handler, &sh, &pool).await;
        }
        let held = std::mem::take(&mut *sink.held.lock().unwrap());
        let terminal: Vec<_> = held
            .iter()
            .filter(|(r, _)| r.status != Status::Started)
            .map(|(r, _)| (r.status, r.error.as_ref().map(|e| e.1.clone())))
            .collect();
        assert_eq!(
            terminal,
            [
                (Status::Failed, Some("timeout".to_owned())),
                (Status::Failed, Some("handler_panic".to_owned())),
                (Status::Completed, None)
            ]
        );
        for (_, ack) in held {
            ack.send(Acked::Ok);
        }
        assert_eq!(done(&finished), vec![0, 1, 2]);
        assert_eq!(sh.metrics.snapshot().handler_timeouts, 1);
    }
}
