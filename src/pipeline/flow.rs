//! One event's flow, written once for sync and async handlers.
//!
//! ```text
//! stale? ─> decode ─> wanted? ─> claim ─> started ─> attempts ─┬─> terminal post ─> offset
//!             │                   (idempotency)    (retry policy)  ├─> dead letter ─> terminal post ─> offset
//!             │                                                    └─> delay topic ─> offset (runs again once due)
//!             └─> malformed policy (skip, hold, dead letter)
//! ```
//!
//! The only difference between a blocking closure and a future is how one
//! attempt runs ([`Attempts`]): a sync handler is called in place, on the
//! worker thread that polls the flow; an async one is awaited, cancelled at
//! its timeout. Every wait of the flow (a busy idempotency key, a full
//! reporter queue, a retry's backoff) is an `.await`, so it holds neither a
//! thread nor another lane. The dead letter, which may wait out a broker
//! outage, runs beside the lane ([`Attempts::spawn_tail`]): the lane goes on,
//! the offset waits for it.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::complete::{
    begin, complete, dead_letter, finish_now, malformed, malformed_dead_lettered, malformed_reason,
    moved, until_acked, Delivery, Destination, MalformedPolicy, Outcome, Pending, SharedSink,
    WorkStart,
};
use super::deadletter::{DeadLetters, Placed, Reason, Why};
use super::delay::{DelayTopics, Failure, Visit};
use super::guard::Guard;
use super::retry::{RetryPolicy, TIMEOUT_CODE};
use crate::decode::{CloudEvent, Decoder};
use crate::dispatch::TypeFilter;
use crate::handler::{HandlerError, Work};
use crate::metrics::Metrics;
use crate::source::{deferring, Batch};
use crate::trace::{Consumed, EventSpans, Span, TraceContext};

/// What the flow needs to handle any event of the pipeline.
pub(crate) struct Shared {
    pub(crate) filter: TypeFilter,
    /// Skip events whose source is one of these receivers (the service's own).
    pub(crate) own_receiver: Option<crate::dispatch::OwnReceivers>,
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
    /// Where events go to wait out a long delay (the retry policy's).
    pub(crate) delays: Option<Arc<DelayTopics>>,
    /// At most `max_in_flight` dead letters waiting on the broker at once;
    /// past it the lane waits for room (each holds its message, which no
    /// longer counts in the buffer budget).
    pub(crate) tail_room: Arc<tokio::sync::Semaphore>,
    /// Set when traces are on: each event gets its span.
    pub(crate) spans: Option<EventSpans>,
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

    pub(crate) fn timed_out(&self, after: Duration) -> HandlerError {
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
}

/// How one attempt of the handler runs: the one place where a sync handler
/// and an async one differ.
pub(crate) trait Attempts {
    /// What the attempts need besides the borrowed event (an async handler's
    /// owned copy, made once, before the first await).
    type Owned;

    /// Readies a wanted event for its attempts; an error makes it malformed.
    fn prepare(&self, ev: &CloudEvent<'_>) -> Result<Self::Owned, crate::decode::Error>;

    /// One attempt. `last` is the final one the retry policy allows (it may
    /// take `owned`). `Ok` carries the details for the terminal post; a
    /// handler's details on failure stay in `work`.
    fn attempt<'a>(
        &'a self,
        ev: &'a CloudEvent<'_>,
        owned: &'a mut Option<Self::Owned>,
        last: bool,
        work: &'a mut Work<'_>,
        shared: &'a Shared,
    ) -> impl Future<Output = Result<Value, HandlerError>> + Send + 'a;

    /// Runs a dead letter's wait beside the lane, where this kind of flow runs.
    fn spawn_tail(&self, tail: impl Future<Output = ()> + Send + 'static);
}

/// Runs a job's events in order, then drops the batch (releasing the lane).
/// Cancelled at its partition's drain deadline: what has not finished is held.
pub(crate) async fn run_job<A: Attempts>(
    mut batch: Batch,
    attempts: &A,
    shared: &Shared,
    decoder: &Decoder,
) {
    let Some(cancel) = batch.cancellation() else {
        return;
    };
    let deferral = batch.deferral();
    let run = std::pin::pin!(async {
        tokio::select! {
            biased;
            () = cancel.cancelled() => {}
            () = async {
                for message in batch.by_ref() {
                    run_event(message, attempts, shared, decoder).await;
                }
            } => {}
        }
    });
    deferring(deferral, run).await;
}

/// One event, from its hand-over to its offset.
pub(crate) async fn run_event<D: Delivery, A: Attempts>(
    delivery: D,
    attempts: &A,
    shared: &Shared,
    decoder: &Decoder,
) {
    let metrics = &shared.metrics;
    if !shared.take(&delivery) {
        return;
    }
    let headers = delivery.headers();
    // One decoder serves every flow: decoding the envelope reads only its
    // limits, and the event borrows the message's bytes, not the decoder.
    // Matched as a temporary, so the decode result is not kept beside the
    // event for the rest of the flow (a future's size is paid on every spawn).
    let (ev, owned) = match decoder
        .decode_message(headers.iter().copied(), delivery.payload())
        .and_then(|ev| {
            if !shared.wanted(&ev) {
                return Ok(None);
            }
            let owned = attempts.prepare(&ev)?;
            Ok(Some((ev, owned)))
        }) {
        Ok(Some(ready)) => ready,
        Ok(None) => {
            drop(headers);
            finish_now(delivery, metrics);
            return;
        }
        Err(e) => {
            drop(headers);
            if let Some(d) = malformed(delivery, &e, metrics, shared.malformed) {
                match shared.dead_letters.clone() {
                    Some(dlq) => {
                        let tail = malformed_tail(dlq, d, e.to_string(), metrics);
                        Box::pin(spawn_tail(attempts, shared, tail)).await;
                    }
                    None => malformed_dead_lettered(d, None, metrics),
                }
            }
            return;
        }
    };
    let span = Span::event(
        shared.spans.as_ref(),
        &Consumed {
            topic: delivery.topic(),
            partition: delivery.partition(),
            offset: delivery.offset(),
            message_id: ev.id(),
        },
        || TraceContext::of_record(&headers, ev.traceparent(), ev.tracestate()),
    );
    // The posts' parent, made once for both.
    let trace = span.context();
    let mark = match &shared.idempotency {
        Some(guard) => {
            let key = guard.key.of(&headers, ev.id());
            // Boxed, as are the dead-letter tails: an optional step's future
            // would otherwise widen every event's future, copied at each spawn.
            let claim = span.child("idempotency claim");
            match Box::pin(claim.instrument(guard.admit(key, &delivery, metrics))).await {
                Ok(mark) => Some(mark),
                Err(skip) => {
                    drop((ev, headers));
                    skip.apply(delivery, metrics);
                    return;
                }
            }
        }
        None => None,
    };
    let mut work = Work::new(
        format!("work-{}", ev.id()),
        delivery.topic_arc(),
        delivery.partition(),
        delivery.offset(),
    )
    .with_record(delivery.record());
    let platform_id = ev.platform_id().unwrap_or_default().to_owned();
    let sink = shared.lifecycle.as_ref();
    // Back from a delay topic: its attempts go on from where they were.
    let visit = match &shared.delays {
        Some(_) => Visit::of(&headers),
        None => Visit::default(),
    };
    // `started` goes to the reporter before the first attempt, once (on the
    // event's first visit).
    let pending = begin(
        sink,
        metrics,
        shared.dead_letters.as_ref(),
        &WorkStart {
            work_id: work.id(),
            platform_id: &platform_id,
            event_id: ev.id(),
            event_type: ev.event_type(),
            trace: trace.as_ref(),
        },
        visit.resumed(),
    )
    .await;
    let mut owned = Some(owned);
    let mut attempt = 1;
    let result = loop {
        let last = attempt >= shared.retry.max_attempts();
        let began = Instant::now();
        // The handler runs inside it: its `Span::current()`, for both kinds.
        let step = span.child("handler attempt");
        let ran = step
            .instrument(attempts.attempt(&ev, &mut owned, last, &mut work, shared))
            .await;
        metrics.handler_latency.observe(began.elapsed());
        if let Err(e) = &ran {
            step.failed(e.message());
        }
        match ran {
            Err(e) if shared.retries(&delivery, &e, attempt) => {
                // Only this event's lane waits: no thread, no other lane.
                tokio::time::sleep(shared.retry.delay(attempt)).await;
                if !delivery.is_current() {
                    // Revoked while it waited: the new owner runs it.
                    Metrics::add(&metrics.stale_dropped, 1);
                    return;
                }
                attempt += 1;
                work.details.clear();
            }
            ran => break ran,
        }
    };
    drop((ev, headers, owned));
    // Attempts made in every visit, this one's included.
    let attempt = visit.attempts.saturating_add(attempt);
    if let (Err(e), Some(delays)) = (&result, &shared.delays) {
        if let Some(stage) = delays.next(visit).filter(|_| shared.retry.retryable(e)) {
            let next = Visit {
                stage,
                attempts: attempt,
            };
            let tail = delay_tail(shared, Arc::clone(delays), delivery, pending, mark, next, e);
            Box::pin(spawn_tail(attempts, shared, tail)).await;
            return;
        }
    }
    let (result, details) = match result {
        Ok(details) => (Ok(()), details),
        Err(e) => (Err(e), Value::Object(std::mem::take(&mut work.details))),
    };
    if let Err(e) = &result {
        span.failed(e.message());
    }
    let outcome = Outcome {
        work_id: work.id,
        platform_id,
        result,
        details: Value::Null,
        mark,
        hold: false,
        trace,
    };
    let retries_on = shared.retry.max_attempts() > 1 || shared.delays.is_some();
    match shared
        .dead_letters
        .clone()
        .filter(|_| outcome.result.is_err())
    {
        Some(dlq) => {
            let tail = failure_tail(shared, dlq, delivery, pending, details, outcome, attempt);
            let tail = span.child("dead letter").instrument(tail);
            Box::pin(spawn_tail(attempts, shared, tail)).await;
        }
        None => {
            let mut outcome = outcome;
            let mut details = details;
            outcome.hold = annotate_terminal(&mut details, attempt, retries_on, None);
            outcome.details = details;
            complete(sink, metrics, pending, delivery, outcome).await;
        }
    }
}

/// Waits for room among the dead letters in flight, then starts `tail`.
async fn spawn_tail<A: Attempts>(
    attempts: &A,
    shared: &Shared,
    tail: impl Future<Output = ()> + Send + 'static,
) {
    let permit = Arc::clone(&shared.tail_room).acquire_owned().await.ok();
    attempts.spawn_tail(async move {
        let _permit = permit;
        tail.await;
    });
}

/// The end of a failed event's flow: its dead letter, tried until the broker
/// takes it (its offset waits, its lane goes on), then its terminal post and
/// its offset.
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
    let retries_on = shared.retry.max_attempts() > 1 || shared.delays.is_some();
    async move {
        let reason = Reason {
            why: Why::HandlerFailed,
            message: &message,
            code: &code,
            attempts: attempt,
        };
        let placed = dead_letter(&dlq, &delivery, &reason, &metrics).await;
        outcome.hold = annotate_terminal(&mut details, attempt, retries_on, Some(placed));
        outcome.details = details;
        complete(sink.as_ref(), &metrics, pending, delivery, outcome).await;
    }
}

/// A failed event's move to its next delay topic, tried until the broker
/// takes it (its offset waits, its lane goes on), then its offset.
fn delay_tail<D: Delivery>(
    shared: &Shared,
    delays: Arc<DelayTopics>,
    delivery: D,
    pending: Option<Arc<Pending<D>>>,
    mark: Option<super::complete::Mark>,
    next: Visit,
    err: &HandlerError,
) -> impl Future<Output = ()> + Send + 'static {
    let (message, code) = (
        err.message().to_owned(),
        err.code().unwrap_or("handler_error").to_owned(),
    );
    let metrics = Arc::clone(&shared.metrics);
    async move {
        let failure = Failure {
            message: &message,
            code: &code,
        };
        let placed = until_acked(&delivery, &metrics, Destination::Delay, || {
            delays.send(&delivery, next, &failure)
        })
        .await;
        moved(&metrics, pending, delivery, mark, placed.is_some());
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
