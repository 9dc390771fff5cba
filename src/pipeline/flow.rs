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
    moved, until_acked, Delivery, Destination, MalformedPolicy, Mark, Outcome, Pending, SharedSink,
    WorkStart,
};
use super::deadletter::{DeadLetters, Placed, Reason, Why};
use super::delay::{DelayTopics, Failure, Visit};
use super::guard::{Guard, Skip};
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

/// How the handler runs a round of attempts: the one place where the kinds of
/// handler (sync or async, one event or a batch) differ.
pub(crate) trait Attempts {
    /// What the attempts need besides the borrowed event (an async handler's
    /// owned copy, made once, before the first await).
    type Owned: Send;

    /// Whether the handler takes a job's events in one call ([`run_batch`]).
    const BATCHED: bool = false;

    /// Readies a wanted event for its attempts; an error makes it malformed.
    fn prepare(&self, ev: &CloudEvent<'_>) -> Result<Self::Owned, crate::decode::Error>;

    /// One attempt of each [`Ready::open`] event of `events` (in offset
    /// order), setting its answer. `last` is the final attempt the retry
    /// policy allows (it may take the owned copy).
    fn round<'a, D: Delivery>(
        &'a self,
        events: &'a mut [Ready<'_, D, Self::Owned>],
        last: bool,
        shared: &'a Shared,
    ) -> impl Future<Output = ()> + Send + 'a;

    /// Runs a dead letter's wait beside the lane, where this kind of flow runs.
    fn spawn_tail(&self, tail: impl Future<Output = ()> + Send + 'static);
}

/// A one-event handler's attempt; its rounds are [`one_by_one`].
pub(crate) trait OneAttempt: Attempts {
    /// One attempt. `Ok` carries the details for the terminal post; a
    /// handler's details on failure stay in `work`.
    fn attempt<'a>(
        &'a self,
        ev: &'a CloudEvent<'_>,
        owned: &'a mut Option<Self::Owned>,
        last: bool,
        work: &'a mut Work<'_>,
        shared: &'a Shared,
    ) -> impl Future<Output = Result<Value, HandlerError>> + Send + 'a;
}

/// A round of a one-event handler: each open event's attempt in turn, run
/// inside its span (the handler's `Span::current()`, for both kinds).
pub(crate) async fn one_by_one<A: OneAttempt, D: Delivery>(
    attempts: &A,
    events: &mut [Ready<'_, D, A::Owned>],
    last: bool,
    shared: &Shared,
) {
    for r in events.iter_mut().filter(|r| r.open) {
        let began = Instant::now();
        let step = r.span.child("handler attempt");
        let ran = step
            .instrument(attempts.attempt(&r.ev, &mut r.owned, last, &mut r.work, shared))
            .await;
        shared.metrics.handler_latency.observe(began.elapsed());
        if let Err(e) = &ran {
            step.failed(e.message());
        }
        r.ran = Some(ran);
    }
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
                if A::BATCHED {
                    run_batch(batch.by_ref().collect(), attempts, shared, decoder).await;
                } else {
                    for message in batch.by_ref() {
                        run_event(message, attempts, shared, decoder).await;
                    }
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
    if !shared.take(&delivery) {
        return;
    }
    let ready = match admit(&delivery, attempts, shared, decoder, None).await {
        Ok(ready) => ready,
        Err(turned) => return turned.apply(delivery, attempts, shared).await,
    };
    let mut events = [ready];
    run_attempts(&mut events, attempts, shared).await;
    let [ready] = events;
    match ready.settle() {
        Some(settled) => settled.finish(delivery, attempts, shared).await,
        // Revoked while it waited for a retry: dropped, it is held.
        None => drop(delivery),
    }
}

/// A job's events through a batch handler: admitted in order, their attempts
/// made in rounds of one call each (only the events that are retried run in
/// the next round), then each one's tail.
///
/// A run holds at most one claim per idempotency key, and waits on no key
/// while it holds claims: it ends before an event whose key it already holds,
/// or whose key another lane holds (the next run starts with that event and
/// waits there, holding nothing), so two lanes never wait on each other.
async fn run_batch<D: Delivery, A: Attempts>(
    deliveries: Vec<D>,
    attempts: &A,
    shared: &Shared,
    decoder: &Decoder,
) {
    let mut slots: Vec<Option<D>> = deliveries
        .into_iter()
        .filter(|d| shared.take(d))
        .map(Some)
        .collect();
    let mut next = 0;
    while next < slots.len() {
        let from = next;
        let mut keys = Vec::new();
        let mut fates = Vec::new();
        let mut ready = Vec::new();
        for d in slots[from..].iter().flatten() {
            match admit(d, attempts, shared, decoder, Some(&mut keys)).await {
                Ok(r) => {
                    fates.push(Ok(ready.len()));
                    ready.push(r);
                }
                // Never the run's first event (that one may wait): each run
                // makes progress.
                Err(Turned::Later) if !fates.is_empty() => break,
                Err(turned) => fates.push(Err(turned)),
            }
        }
        next = from + fates.len();
        run_attempts(&mut ready, attempts, shared).await;
        let mut settled: Vec<_> = ready.into_iter().map(|r| Some(r.settle())).collect();
        for (slot, fate) in slots[from..next].iter_mut().zip(fates) {
            let Some(d) = slot.take() else { continue };
            match fate {
                Ok(i) => match settled[i].take().flatten() {
                    Some(s) => s.finish(d, attempts, shared).await,
                    None => drop(d),
                },
                Err(turned) => turned.apply(d, attempts, shared).await,
            }
        }
    }
}

/// An event ready for its attempts: decoded, wanted, claimed, its `started`
/// handed to the reporter.
pub(crate) struct Ready<'d, D: Delivery, O> {
    pub(crate) delivery: &'d D,
    pub(crate) ev: CloudEvent<'d>,
    pub(crate) owned: Option<O>,
    pub(crate) work: Work<'d>,
    pub(crate) span: Span,
    trace: Option<TraceContext>,
    mark: Option<Mark>,
    platform_id: String,
    visit: Visit,
    pending: Option<Arc<Pending<D>>>,
    /// An attempt is due in the next round.
    pub(crate) open: bool,
    /// The last attempt's answer.
    pub(crate) ran: Option<Result<Value, HandlerError>>,
    /// Attempts made in this visit.
    attempts: u32,
    /// Its partition was revoked while it waited for a retry.
    stale: bool,
}

/// Why an event does not get to its attempts (owned: the caller settles the
/// delivery by value once nothing borrows it).
pub(crate) enum Turned {
    /// Filtered out, or one of the service's own events.
    Unwanted,
    Malformed(crate::decode::Error),
    Skip(Skip),
    /// Its idempotency key is busy and the batch run may not wait for it.
    Later,
}

impl Turned {
    async fn apply<D: Delivery, A: Attempts>(self, delivery: D, attempts: &A, shared: &Shared) {
        let metrics = &shared.metrics;
        match self {
            Turned::Unwanted => finish_now(delivery, metrics),
            Turned::Skip(skip) => skip.apply(delivery, metrics),
            // Not reached: a batch run takes it up again. Dropped, it is held.
            Turned::Later => drop(delivery),
            Turned::Malformed(e) => {
                if let Some(d) = malformed(delivery, &e, metrics, shared.malformed) {
                    match shared.dead_letters.clone() {
                        Some(dlq) => {
                            let tail = malformed_tail(dlq, d, e.to_string(), metrics);
                            Box::pin(spawn_tail(attempts, shared, tail)).await;
                        }
                        None => malformed_dead_lettered(d, None, metrics),
                    }
                }
            }
        }
    }
}

/// Decodes the event, decides whether it is wanted, claims its idempotency
/// key and hands its `started` to the reporter. A batch run passes the keys
/// it holds (`batch`): a key held there or busy elsewhere is [`Turned::Later`].
async fn admit<'d, D: Delivery, A: Attempts>(
    delivery: &'d D,
    attempts: &A,
    shared: &Shared,
    decoder: &Decoder,
    batch: Option<&mut Vec<String>>,
) -> Result<Ready<'d, D, A::Owned>, Turned> {
    let metrics = &shared.metrics;
    let headers = delivery.headers();
    // One decoder serves every flow: decoding the envelope reads only its
    // limits, and the event borrows the message's bytes, not the decoder.
    let ev = decoder
        .decode_message(headers.iter().copied(), delivery.payload())
        .map_err(Turned::Malformed)?;
    if !shared.wanted(&ev) {
        return Err(Turned::Unwanted);
    }
    let owned = attempts.prepare(&ev).map_err(Turned::Malformed)?;
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
            let wait = match batch {
                Some(held) if held.iter().any(|k| k == key) => return Err(Turned::Later),
                Some(held) => {
                    held.push(key.to_owned());
                    held.len() == 1
                }
                None => true,
            };
            // Boxed, as are the dead-letter tails: an optional step's future
            // would otherwise widen every event's future, copied at each spawn.
            let claim = span.child("idempotency claim");
            match Box::pin(claim.instrument(guard.admit(key, delivery, metrics, wait))).await {
                Ok(mark) => Some(mark),
                Err(Skip::Busy) => return Err(Turned::Later),
                Err(skip) => return Err(Turned::Skip(skip)),
            }
        }
        None => None,
    };
    let work = Work::new(
        format!("work-{}", ev.id()),
        delivery.topic_arc(),
        delivery.partition(),
        delivery.offset(),
    )
    .with_record(delivery.record());
    let platform_id = ev.platform_id().unwrap_or_default().to_owned();
    // Back from a delay topic: its attempts go on from where they were.
    let visit = match &shared.delays {
        Some(_) => Visit::of(&headers),
        None => Visit::default(),
    };
    // `started` goes to the reporter before the first attempt, once (on the
    // event's first visit).
    let pending = begin(
        shared.lifecycle.as_ref(),
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
    Ok(Ready {
        delivery,
        ev,
        owned: Some(owned),
        work,
        span,
        trace,
        mark,
        platform_id,
        visit,
        pending,
        open: true,
        ran: None,
        attempts: 0,
        stale: false,
    })
}

/// The events' attempts, in rounds: after a round, each failed event the
/// retry policy runs again waits out its backoff (only its own lane waits: no
/// thread, no other lane) and goes into the next round.
async fn run_attempts<D: Delivery, A: Attempts>(
    events: &mut [Ready<'_, D, A::Owned>],
    attempts: &A,
    shared: &Shared,
) {
    let mut attempt = 1;
    loop {
        let last = attempt >= shared.retry.max_attempts();
        attempts.round(events, last, shared).await;
        let mut again = false;
        for r in events.iter_mut().filter(|r| r.open) {
            r.attempts = attempt;
            match &r.ran {
                Some(Err(e)) if shared.retries(r.delivery, e, attempt) => {
                    again = true;
                    r.work.details.clear();
                }
                _ => r.open = false,
            }
        }
        if !again {
            return;
        }
        tokio::time::sleep(shared.retry.delay(attempt)).await;
        for r in events.iter_mut().filter(|r| r.open) {
            if !r.delivery.is_current() {
                // Revoked while it waited: the new owner runs it.
                Metrics::add(&shared.metrics.stale_dropped, 1);
                (r.open, r.stale) = (false, true);
            }
        }
        attempt += 1;
    }
}

impl<D: Delivery, O> Ready<'_, D, O> {
    /// What the event's tail needs, with every borrow of its message dropped.
    fn settle(self) -> Option<Settled<D>> {
        let Ready {
            work,
            span,
            trace,
            mark,
            platform_id,
            visit,
            pending,
            ran,
            attempts,
            stale,
            ..
        } = self;
        let result = ran.filter(|_| !stale)?;
        Some(Settled {
            result,
            // Attempts made in every visit, this one's included.
            attempt: visit.attempts.saturating_add(attempts),
            work_id: work.id,
            details: work.details,
            span,
            trace,
            mark,
            platform_id,
            visit,
            pending,
        })
    }
}

/// An event past its attempts.
struct Settled<D: Delivery> {
    result: Result<Value, HandlerError>,
    attempt: u32,
    work_id: String,
    details: serde_json::Map<String, Value>,
    span: Span,
    trace: Option<TraceContext>,
    mark: Option<Mark>,
    platform_id: String,
    visit: Visit,
    pending: Option<Arc<Pending<D>>>,
}

impl<D: Delivery> Settled<D> {
    /// Its tail: the next delay topic, or the dead letter and the terminal
    /// post, then its offset.
    async fn finish<A: Attempts>(self, delivery: D, attempts: &A, shared: &Shared) {
        let Settled {
            result,
            attempt,
            work_id,
            details,
            span,
            trace,
            mark,
            platform_id,
            visit,
            pending,
        } = self;
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
            Err(e) => (Err(e), Value::Object(details)),
        };
        if let Err(e) = &result {
            span.failed(e.message());
        }
        let outcome = Outcome {
            work_id,
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
                complete(
                    shared.lifecycle.as_ref(),
                    &shared.metrics,
                    pending,
                    delivery,
                    outcome,
                )
                .await;
            }
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
    mark: Option<Mark>,
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
