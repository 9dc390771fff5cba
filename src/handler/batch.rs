//! Batch handlers: one call for a lane's run of events, one outcome per event.
//!
//! A service that writes to a database or an API taking many records at once
//! handles a lane's run together ([`BatchHandler`] for blocking work,
//! [`AsyncBatchHandler`] for futures) and says per event how it went
//! ([`BatchOutcome`]). Everything else stays per event, through the same flow
//! as a one-event handler: the claim, `started`, the retry policy (only the
//! events that asked for a retry run again, together, after the backoff), the
//! dead letter, the terminal post and the offset.
//!
//! What a batch keeps:
//! - **One lane, in offset order.** A call gets one lane's run, up to the
//!   pipeline's [`batch`](crate::pipeline::PipelineBuilder::batch) (64 by
//!   default): under [`Ordering::PerPartition`](crate::dispatch::Ordering::PerPartition)
//!   events of one partition, under `PerKey` of one key, in offset order (under
//!   `Unordered`, any events). The lane's next run starts once every event of
//!   this one has had its last attempt.
//! - **Retries leave the order.** The events that failed with a retry run
//!   again together, in the next call after the backoff, while the others of
//!   their run are already done: a retried event runs after later events of its
//!   batch (a one-event handler retries an event before the next one starts).
//!   Without retries the order is exactly the lane's.
//! - **One event per idempotency key.** A run ends before an event whose key
//!   it already holds, or whose key another lane holds; that event starts the
//!   next run (and waits there for the key, holding no other claim), so two
//!   lanes never wait on each other.
//! - **Limits per call.** `handler_timeout` bounds a whole call (an async one
//!   is cancelled, failing its events with code `timeout`); under an adaptive
//!   `max_in_flight` a call takes one permit.

use std::fmt;
use std::future::Future;

use serde_json::Value;

use super::{to_handler_error, BoxFuture, HandlerError, Work, WorkInfo};
use crate::decode::{CloudEvent, CloudEventMessage};

/// How one event of a batch went.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchOutcome {
    /// Handled: `completed` is posted with these details (`Value::Null`: the
    /// ones added with [`Work::detail`], if any).
    Done(Value),
    /// Failed: the retry policy decides, as for a one-event handler's error
    /// (run again with the batch's other retries, then the dead letter and
    /// `failed`). A [`HandlerError::permanent`] error is never retried.
    Retry(HandlerError),
    /// Failed for good: no retry; straight to the dead letter (if one is set)
    /// and `failed`.
    Failed(HandlerError),
}

impl BatchOutcome {
    /// Handled, with no details of its own.
    pub fn done() -> Self {
        BatchOutcome::Done(Value::Null)
    }

    /// The event's result, as the flow takes it.
    pub(crate) fn into_result(self) -> Result<Value, HandlerError> {
        match self {
            BatchOutcome::Done(details) => Ok(details),
            BatchOutcome::Retry(e) => Err(e),
            BatchOutcome::Failed(e) => Err(e.permanent()),
        }
    }
}

/// Error code of every event of a batch call that returned a different number
/// of outcomes than it was given events.
pub const BATCH_MISMATCH_CODE: &str = "batch_outcomes";

/// The results of one batch call of `n` events: its outcomes, or its error
/// (or a miscount) for every event.
pub(crate) fn results(
    n: usize,
    ran: Result<Vec<BatchOutcome>, HandlerError>,
) -> Vec<Result<Value, HandlerError>> {
    match ran {
        Ok(outcomes) if outcomes.len() == n => outcomes
            .into_iter()
            .map(BatchOutcome::into_result)
            .collect(),
        Ok(outcomes) => {
            let e = HandlerError::with_code(
                format!(
                    "batch handler returned {} outcomes for {n} events",
                    outcomes.len()
                ),
                BATCH_MISMATCH_CODE,
            );
            vec![Err(e); n]
        }
        Err(e) => vec![Err(e); n],
    }
}

/// One event of a sync batch: the borrowed event and its work record.
#[derive(Debug)]
pub struct BatchEntry<'b, 'e> {
    event: &'b CloudEvent<'e>,
    work: &'b mut Work<'e>,
}

impl<'b, 'e> BatchEntry<'b, 'e> {
    pub(crate) fn new(event: &'b CloudEvent<'e>, work: &'b mut Work<'e>) -> Self {
        BatchEntry { event, work }
    }

    /// The event, borrowed from its message.
    pub fn event(&self) -> &CloudEvent<'e> {
        self.event
    }

    /// Its work: id, where it came from, and the details of its terminal post.
    pub fn work(&mut self) -> &mut Work<'e> {
        self.work
    }
}

/// Blocking work on a lane's run of events (up to the pipeline's `batch`), on
/// a worker thread, against the borrowed events: one outcome per entry, in
/// the entries' order.
///
/// A sync closure `Fn(&mut [BatchEntry<'_, '_>]) -> Result<Vec<BatchOutcome>, E>`
/// with `E: Display` is a `BatchHandler`; an `Err` fails every entry of the
/// call with it (retried per the policy unless it is
/// [`HandlerError::permanent`]).
///
/// ```no_run
/// use xzepr_consumer::config::KafkaConsumerConfig;
/// use xzepr_consumer::handler::{BatchEntry, BatchOutcome, HandlerError};
/// use xzepr_consumer::pipeline::{Pipeline, RetryPolicy};
///
/// let kafka = KafkaConsumerConfig::from_env("loader")?;
/// let running = Pipeline::builder(kafka)
///     .batch(128)
///     .retry(RetryPolicy::attempts(3))
///     .start_batch(|batch: &mut [BatchEntry<'_, '_>]| -> Result<_, HandlerError> {
///         // One INSERT for the whole run; then an outcome per row.
///         Ok(batch
///             .iter_mut()
///             .map(|entry| match entry.event().event_type() {
///                 "deployment.completed" => BatchOutcome::done(),
///                 other => BatchOutcome::Failed(HandlerError::new(format!("unknown type {other}"))),
///             })
///             .collect())
///     })?;
/// running.shutdown();
/// running.join()?;
/// # Ok::<(), xzepr_consumer::Error>(())
/// ```
pub trait BatchHandler: Send + Sync + 'static {
    /// Handles one batch.
    ///
    /// # Errors
    /// A [`HandlerError`] for every entry of the call.
    fn handle_batch(
        &self,
        batch: &mut [BatchEntry<'_, '_>],
    ) -> Result<Vec<BatchOutcome>, HandlerError>;
}

impl<F, E> BatchHandler for F
where
    F: Fn(&mut [BatchEntry<'_, '_>]) -> Result<Vec<BatchOutcome>, E> + Send + Sync + 'static,
    E: fmt::Display + 'static,
{
    fn handle_batch(
        &self,
        batch: &mut [BatchEntry<'_, '_>],
    ) -> Result<Vec<BatchOutcome>, HandlerError> {
        self(batch).map_err(|e| to_handler_error(e, None))
    }
}

/// I/O-bound work on a lane's run of events (up to the pipeline's `batch`),
/// given the owned messages: one outcome per event, in the given order.
///
/// An async closure `Fn(Vec<(CloudEventMessage, WorkInfo)>) -> impl
/// Future<Output = Result<Vec<BatchOutcome>, E>>` with `E: Display` is an
/// `AsyncBatchHandler`; an `Err` fails every event of the call with it.
pub trait AsyncBatchHandler: Send + Sync + 'static {
    /// Handles one batch.
    fn handle_batch(
        &self,
        batch: Vec<(CloudEventMessage, WorkInfo)>,
    ) -> BoxFuture<Result<Vec<BatchOutcome>, HandlerError>>;
}

impl<F, Fut, E> AsyncBatchHandler for F
where
    F: Fn(Vec<(CloudEventMessage, WorkInfo)>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<BatchOutcome>, E>> + Send + 'static,
    E: fmt::Display + 'static,
{
    fn handle_batch(
        &self,
        batch: Vec<(CloudEventMessage, WorkInfo)>,
    ) -> BoxFuture<Result<Vec<BatchOutcome>, HandlerError>> {
        let fut = self(batch);
        Box::pin(async move { fut.await.map_err(|e| to_handler_error(e, None)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_map_to_results_and_a_miscount_fails_every_event() {
        let ran = results(
            3,
            Ok(vec![
                BatchOutcome::done(),
                BatchOutcome::Retry(HandlerError::new("again")),
                BatchOutcome::Failed(HandlerError::new("never")),
            ]),
        );
        assert_eq!(ran[0], Ok(Value::Null));
        assert!(matches!(&ran[1], Err(e) if !e.is_permanent()));
        assert!(matches!(&ran[2], Err(e) if e.is_permanent()));
        let short = results(2, Ok(vec![BatchOutcome::done()]));
        assert!(short
            .iter()
            .all(|r| matches!(r, Err(e) if e.code() == Some(BATCH_MISMATCH_CODE))));
        let failed = results(2, Err(HandlerError::new("db down")));
        assert_eq!(failed.len(), 2);
        assert!(failed.iter().all(|r| r.is_err()));
    }
}
