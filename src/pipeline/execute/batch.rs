//! Batch handlers' rounds: a job's open events in one call, sync (in place,
//! on the worker thread, against the borrowed events) or async (awaited, on
//! the owned messages, under the handler's limit).

use std::future::Future;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use super::{call_sync, limit_outcome, limited, overran, panicked, run_handler, spawn_counted};
use crate::decode::{CloudEvent, CloudEventMessage};
use crate::flow_control::Limiter;
use crate::handler::{batch_results, AsyncBatchHandler, BatchEntry, BatchHandler, HandlerError};
use crate::pipeline::complete::Delivery;
use crate::pipeline::flow::{Attempts, Ready, Shared};
use crate::trace::Span;

/// A sync batch handler's rounds: called in place on the worker thread.
pub(crate) struct SyncBatchAttempts<H: ?Sized> {
    pub(crate) handler: Arc<H>,
    /// This worker's jobs and dead letters not yet done.
    pub(crate) live: Arc<AtomicUsize>,
}

impl<H: BatchHandler + ?Sized> Attempts for SyncBatchAttempts<H> {
    type Owned = ();
    const BATCHED: bool = true;

    fn prepare(&self, _: &CloudEvent<'_>) -> Result<(), crate::decode::Error> {
        Ok(())
    }

    fn round<'a, D: Delivery>(
        &'a self,
        events: &'a mut [Ready<'_, D, ()>],
        _last: bool,
        shared: &'a Shared,
    ) -> impl Future<Output = ()> + Send + 'a {
        let mut open: Vec<_> = events.iter_mut().filter(|r| r.open).collect();
        if let Some(first) = open.first() {
            let d = first.delivery;
            let steps = steps(&open);
            let began = Instant::now();
            let mut entries: Vec<_> = open
                .iter_mut()
                .map(|r| {
                    let r = &mut **r;
                    BatchEntry::new(&r.ev, &mut r.work)
                })
                .collect();
            let (ran, took) = call_sync(|| self.handler.handle_batch(&mut entries));
            drop(entries);
            overran(
                shared,
                took,
                ran.is_ok(),
                (d.topic(), d.partition(), d.offset()),
            );
            let results = batch_results(open.len(), ran);
            settle(open, steps, results, began, shared, |r, details| {
                // No details of its own: the ones the handler added to its work.
                match details {
                    Value::Null => Value::Object(std::mem::take(&mut r.work.details)),
                    details => details,
                }
            });
        }
        std::future::ready(())
    }

    fn spawn_tail(&self, tail: impl Future<Output = ()> + Send + 'static) {
        spawn_counted(&self.live, tail);
    }
}

/// An async batch handler's rounds: one awaited call per round, cancelled at
/// the timeout; under an adaptive `max_in_flight`, each call takes a permit.
pub(crate) struct AsyncBatchAttempts<H: ?Sized> {
    pub(crate) handler: Arc<H>,
    pub(crate) limit: Option<Limiter>,
}

impl<H: AsyncBatchHandler + ?Sized> Attempts for AsyncBatchAttempts<H> {
    type Owned = CloudEventMessage;
    const BATCHED: bool = true;

    fn prepare(&self, ev: &CloudEvent<'_>) -> Result<CloudEventMessage, crate::decode::Error> {
        ev.to_owned_message()
    }

    async fn round<D: Delivery>(
        &self,
        events: &mut [Ready<'_, D, CloudEventMessage>],
        last: bool,
        shared: &Shared,
    ) {
        // Every round but the last gets copies; the last takes the messages.
        let mut batch = Vec::new();
        let mut open = Vec::new();
        for r in events.iter_mut().filter(|r| r.open) {
            let message = if last {
                r.owned.take()
            } else {
                r.owned.clone()
            };
            match message {
                Some(m) => {
                    batch.push((m, r.work.info()));
                    open.push(r);
                }
                // Taken by a last round already: not reached.
                None => r.ran = Some(Err(panicked())),
            }
        }
        if open.is_empty() {
            return;
        }
        let steps = steps(&open);
        let began = Instant::now();
        let n = batch.len();
        let call = run_handler(|| self.handler.handle_batch(batch), shared);
        let ran = limited(self.limit.as_ref(), call, limit_outcome).await;
        settle(open, steps, batch_results(n, ran), began, shared, |_, d| d);
    }

    fn spawn_tail(&self, tail: impl Future<Output = ()> + Send + 'static) {
        tokio::spawn(tail);
    }
}

/// Each event's attempt span, for the call that handles them together.
fn steps<D: Delivery, O>(open: &[&mut Ready<'_, D, O>]) -> Vec<Span> {
    open.iter()
        .map(|r| r.span.child("handler attempt"))
        .collect()
}

/// Gives each event of a call its answer (`details` makes a success's
/// details), its latency (the call's) and its span's failure.
fn settle<D: Delivery, O>(
    open: Vec<&mut Ready<'_, D, O>>,
    steps: Vec<Span>,
    results: Vec<Result<Value, HandlerError>>,
    began: Instant,
    shared: &Shared,
    details: impl Fn(&mut Ready<'_, D, O>, Value) -> Value,
) {
    let took = began.elapsed();
    for ((r, step), ran) in open.into_iter().zip(steps).zip(results) {
        shared.metrics.handler_latency.observe(took);
        let ran = match ran {
            Ok(d) => Ok(details(r, d)),
            Err(e) => {
                step.failed(e.message());
                Err(e)
            }
        };
        r.ran = Some(ran);
    }
}
