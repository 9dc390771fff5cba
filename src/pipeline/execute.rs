//! The execution stage: how a handler's attempts run, and where the flows run.
//!
//! The event's flow itself is [`flow`](super::flow), written once; this module
//! holds its two boundaries and their executors:
//!
//! - **Sync handlers** ([`SyncAttempts`]) run on a pool of worker threads that
//!   all read one bounded channel of jobs. Each worker runs a job's flow in
//!   place, calling the handler there; a job that waits (a retry's backoff, a
//!   busy idempotency key, a full reporter queue) becomes a task on the
//!   worker's own runtime (one thread: itself) and the worker takes the next
//!   job, so no worker waits out a backoff.
//! - **Async handlers** ([`AsyncAttempts`]) run as tokio tasks, one per job: up
//!   to `max_in_flight` futures at once on the runtime, never a thread or a
//!   `block_on` per event. Under an adaptive `max_in_flight` each attempt
//!   first takes a permit from the handler's [`Limiter`] (a job waiting for
//!   one holds only its own lane), and gives it back with the attempt's
//!   latency and outcome.
//!
//! The scheduler in [`dispatch::lanes`](crate::dispatch::lanes) decides what may
//! run; this stage only runs it.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use serde_json::Value;

use super::complete::Delivery;
use super::flow::{one_by_one, run_job, Attempts, OneAttempt, Ready, Shared};
use super::retry::{PANIC_CODE, TIMEOUT_CODE};
use crate::decode::{CloudEvent, CloudEventMessage, Decoder};
use crate::flow_control::{Limiter, Outcome};
use crate::handler::{AsyncHandler, BoxFuture, Handler, HandlerError, Work};
use crate::metrics::Metrics;
use crate::source::{Batch, Executor};

fn panicked() -> HandlerError {
    HandlerError::with_code("handler panicked", PANIC_CODE)
}

/// A sync handler's attempts: called in place on the worker thread.
pub(crate) struct SyncAttempts<H: ?Sized> {
    pub(crate) handler: Arc<H>,
    /// This worker's jobs and dead letters not yet done (see [`run_sync_worker`]).
    pub(crate) live: Arc<AtomicUsize>,
}

impl<H: Handler + ?Sized> Attempts for SyncAttempts<H> {
    type Owned = ();

    fn prepare(&self, _: &CloudEvent<'_>) -> Result<(), crate::decode::Error> {
        Ok(())
    }

    fn round<'a, D: Delivery>(
        &'a self,
        events: &'a mut [Ready<'_, D, ()>],
        last: bool,
        shared: &'a Shared,
    ) -> impl Future<Output = ()> + Send + 'a {
        one_by_one(self, events, last, shared)
    }

    fn spawn_tail(&self, tail: impl Future<Output = ()> + Send + 'static) {
        spawn_counted(&self.live, tail);
    }
}

impl<H: Handler + ?Sized> OneAttempt for SyncAttempts<H> {
    fn attempt<'a>(
        &'a self,
        ev: &'a CloudEvent<'_>,
        _: &'a mut Option<()>,
        _last: bool,
        work: &'a mut Work<'_>,
        shared: &'a Shared,
    ) -> impl Future<Output = Result<Value, HandlerError>> + Send + 'a {
        // Runs now, on this thread; the flow awaits only the answer.
        let (ran, took) = call_sync(|| self.handler.handle(ev, work));
        let at = (work.topic(), work.partition(), work.offset());
        overran(shared, took, ran.is_ok(), at);
        std::future::ready(ran.map(|()| Value::Object(std::mem::take(&mut work.details))))
    }
}

/// Runs a tail on this worker's own runtime, counted in `live` so the worker
/// keeps driving it.
pub(crate) fn spawn_counted(live: &Arc<AtomicUsize>, tail: impl Future<Output = ()> + 'static) {
    let live = Arc::clone(live);
    live.fetch_add(1, Ordering::AcqRel);
    tokio::task::spawn_local(async move {
        tail.await;
        live.fetch_sub(1, Ordering::AcqRel);
    });
}

/// One call of a sync handler (or batch handler), panics caught, and how long
/// it took (for [`overran`]).
pub(crate) fn call_sync<T>(
    call: impl FnOnce() -> Result<T, HandlerError>,
) -> (Result<T, HandlerError>, Duration) {
    let began = Instant::now();
    // The handler is user code: a panic fails this event, never the worker.
    let result = catch_unwind(AssertUnwindSafe(call)).unwrap_or_else(|_| Err(panicked()));
    (result, began.elapsed())
}

/// Applies the timeout to a sync call after the fact: it cannot be
/// cancelled, so its outcome stands (a success did its work, and turning it
/// into a retryable timeout would run that work again); an overrun is
/// counted and logged at `at`, the (first) event's place.
pub(crate) fn overran(shared: &Shared, took: Duration, succeeded: bool, at: (&str, i32, i64)) {
    let Some(limit) = shared.handler_timeout.filter(|limit| took > *limit) else {
        return;
    };
    Metrics::add(&shared.metrics.handler_timeouts, 1);
    tracing::warn!(
        topic = at.0,
        partition = at.1,
        offset = at.2,
        took_ms = took.as_millis() as u64,
        limit_ms = limit.as_millis() as u64,
        succeeded,
        "Sync handler ran past its timeout; its outcome stands."
    );
}

/// An async handler's attempts: awaited, cancelled at the timeout; under an
/// adaptive `max_in_flight`, each takes a permit of `limit` first.
pub(crate) struct AsyncAttempts<H: ?Sized> {
    pub(crate) handler: Arc<H>,
    pub(crate) limit: Option<Limiter>,
}

impl<H: AsyncHandler + ?Sized> Attempts for AsyncAttempts<H> {
    type Owned = CloudEventMessage;

    fn prepare(&self, ev: &CloudEvent<'_>) -> Result<CloudEventMessage, crate::decode::Error> {
        ev.to_owned_message()
    }

    fn round<'a, D: Delivery>(
        &'a self,
        events: &'a mut [Ready<'_, D, CloudEventMessage>],
        last: bool,
        shared: &'a Shared,
    ) -> impl Future<Output = ()> + Send + 'a {
        one_by_one(self, events, last, shared)
    }

    fn spawn_tail(&self, tail: impl Future<Output = ()> + Send + 'static) {
        tokio::spawn(tail);
    }
}

impl<H: AsyncHandler + ?Sized> OneAttempt for AsyncAttempts<H> {
    fn attempt<'a>(
        &'a self,
        _: &'a CloudEvent<'_>,
        owned: &'a mut Option<CloudEventMessage>,
        last: bool,
        work: &'a mut Work<'_>,
        shared: &'a Shared,
    ) -> impl Future<Output = Result<Value, HandlerError>> + Send + 'a {
        // Every attempt but the last gets a copy; the last takes the message.
        let message = if last { owned.take() } else { owned.clone() };
        async move {
            let Some(message) = message else {
                return Err(panicked());
            };
            let call = || self.handler.handle(message, work.info());
            limited(
                self.limit.as_ref(),
                run_handler(call, shared),
                limit_outcome,
            )
            .await
        }
    }
}

/// `call` under `limit` (when adaptive): a permit first, given back with the
/// call's latency and what `outcome` makes of its answer.
pub(crate) async fn limited<T>(
    limit: Option<&Limiter>,
    call: impl Future<Output = T>,
    outcome: impl FnOnce(&T) -> Outcome,
) -> T {
    let Some(limit) = limit else {
        return call.await;
    };
    let permit = limit.acquire().await;
    let ran = call.await;
    permit.release(outcome(&ran));
    ran
}

/// What a handler call says about the service behind it: its timeouts and
/// its `overloaded` errors are congestion; any other answer's latency counts.
pub(crate) fn limit_outcome<T>(ran: &Result<T, HandlerError>) -> Outcome {
    match ran {
        Err(e) if e.code() == Some(TIMEOUT_CODE) => Outcome::Timeout,
        Err(e) if e.is_overloaded() => Outcome::Overloaded {
            retry_after: e.retry_after(),
        },
        _ => Outcome::Ok,
    }
}

/// A handler's (or batch handler's) future, with panics caught and the
/// timeout applied.
pub(crate) async fn run_handler<T>(
    call: impl FnOnce() -> BoxFuture<Result<T, HandlerError>>,
    shared: &Shared,
) -> Result<T, HandlerError> {
    // A panic while building the future fails the event too.
    let Ok(fut) = catch_unwind(AssertUnwindSafe(call)) else {
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

/// Async handlers (one event or a batch): a tokio task per job.
pub(crate) struct AsyncExecutor<A> {
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) attempts: Arc<A>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) decoder: Arc<Decoder>,
}

impl<A: Attempts + Send + Sync + 'static> Executor for AsyncExecutor<A> {
    fn execute(&self, batch: Batch) -> Result<(), Batch> {
        let (attempts, shared, decoder) = (
            Arc::clone(&self.attempts),
            Arc::clone(&self.shared),
            Arc::clone(&self.decoder),
        );
        // A runtime that is shutting down drops the task, and with it the batch:
        // its messages are held and its lane released.
        // Boxed: a task stores its future inline and copies it whole at every
        // change of stage; a box makes that a pointer (the job's future is
        // kilobytes: the event, its owned copy, the flow's steps).
        self.runtime.spawn(Box::pin(async move {
            run_job(batch, &*attempts, &shared, &decoder).await;
        }));
        Ok(())
    }
}

/// How often a worker with waiting jobs looks for a new one. Only then: an
/// idle worker blocks on the channel and takes a job the moment it comes, so
/// this delays a job only while every worker is busy or waiting.
const INTAKE_TICK: Duration = Duration::from_millis(2);

/// A worker thread: drives its jobs' flows on `runtime` (its own, one
/// thread) until the job channel closes and every job and dead letter of its
/// own is done.
///
/// `live` counts the worker's jobs and tails still waiting; `attempts`
/// counts its tails there too ([`spawn_counted`]).
pub(crate) fn run_sync_worker<A: Attempts + 'static>(
    jobs: Receiver<Batch>,
    runtime: tokio::runtime::Runtime,
    live: Arc<AtomicUsize>,
    attempts: A,
    shared: Arc<Shared>,
    decoder: Arc<Decoder>,
) {
    let attempts = Arc::new(attempts);
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        loop {
            let batch = if live.load(Ordering::Acquire) == 0 {
                // Nothing of this worker's waits: block for the next job.
                match jobs.recv() {
                    Ok(batch) => batch,
                    Err(_) => break,
                }
            } else {
                match jobs.try_recv() {
                    Ok(batch) => batch,
                    Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => {
                        // Let the waiting jobs run; then look again.
                        tokio::time::sleep(INTAKE_TICK).await;
                        continue;
                    }
                }
            };
            // Run the job now, in place (the handler is called here); only a
            // job that waits becomes a task of its own, and the worker moves on.
            let (a, sh, dec) = (
                Arc::clone(&attempts),
                Arc::clone(&shared),
                Arc::clone(&decoder),
            );
            let mut job = Box::pin(async move { run_job(batch, &*a, &sh, &dec).await });
            if std::future::poll_fn(|cx| Poll::Ready(job.as_mut().poll(cx).is_pending())).await {
                spawn_counted(&live, job);
            }
            if live.load(Ordering::Acquire) > 0 {
                // Let the waiting jobs that woke run before the next job.
                tokio::task::yield_now().await;
            }
        }
    });
}

mod batch;
pub(crate) use batch::{AsyncBatchAttempts, SyncBatchAttempts};

#[cfg(test)]
mod tests;
