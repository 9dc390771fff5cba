//! The completion stage: what finishes an event's offset.
//!
//! Without a lifecycle an offset finishes when its handler returns. With one,
//! `started` is handed to the reporter before the handler runs and
//! `completed`/`failed` after it, and the offset finishes only when the handler
//! returned *and* both posts were acknowledged ([`Pending`]). A post that
//! exhausted its retries holds the offset: the commit point stays before it and
//! a restart replays it. Releasing the event's lane does not wait for the posts:
//! the next event of its key may start while XZepr acknowledges the last one.

use std::sync::atomic::{
    AtomicBool, AtomicU8,
    Ordering::{AcqRel, Acquire, Release},
};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::handler::{BoxFuture, HandlerError};
use crate::idempotency::Claim;
use crate::metrics::Metrics;

/// A message as the execution and completion stages see it (the source's
/// [`Message`](crate::source::Message), or a test double).
pub(crate) trait Delivery: Send + 'static {
    fn topic(&self) -> &str;
    /// The topic, shared (no allocation per message).
    fn topic_arc(&self) -> Arc<str>;
    fn partition(&self) -> i32;
    fn offset(&self) -> i64;
    fn payload(&self) -> Option<&[u8]>;
    /// Kafka headers as `(key, value)` pairs (binary-mode CloudEvents).
    fn headers(&self) -> Vec<(&str, &[u8])>;
    /// False when the partition was revoked after this was handed over: drop it
    /// unhandled.
    fn is_current(&self) -> bool {
        true
    }
    /// Marks the offset finished (handled and reported, or skipped).
    fn finish(self);
    /// Marks the offset held: never finished in this assignment, the commit
    /// point stays before it, but drains do not wait for it.
    fn hold(self);
}

/// Called once with `true` after a 2xx, `false` when the post failed for good.
pub(crate) type AckFn = Box<dyn FnOnce(bool) + Send>;

/// Where lifecycle records go.
pub(crate) trait LifecycleSink: Send + Sync + 'static {
    /// From a worker thread: blocks while the reporter's queue is full.
    fn submit_blocking(&self, record: Lifecycle, ack: AckFn);
    /// From a task: waits (without blocking a thread) while the queue is full.
    fn submit(&self, record: Lifecycle, ack: AckFn) -> BoxFuture<()>;
}

/// A lifecycle sink shared by every executor.
pub(crate) type SharedSink = Arc<dyn LifecycleSink>;

/// One lifecycle post to make.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Lifecycle {
    pub(crate) work_id: String,
    pub(crate) status: Status,
    pub(crate) platform_id: String,
    pub(crate) details: Value,
    /// For `failed`: the error message and code.
    pub(crate) error: Option<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Started,
    Completed,
    Failed,
}

/// Finishes a delivery once the handler returned and both posts were acknowledged.
///
/// Three events count down `remaining`: the handler's return and the two acks, in
/// any order. The delivery is put in before the handler's count is released, so
/// whoever counts last finds it.
pub(crate) struct Pending<D: Delivery> {
    remaining: AtomicU8,
    failed: AtomicBool,
    delivery: Mutex<Option<D>>,
    /// The event's idempotency claim, marked processed only once everything
    /// was acknowledged (a crash before that replays the work and its posts).
    mark: Mutex<Option<Mark>>,
    metrics: Arc<Metrics>,
}

impl<D: Delivery> Pending<D> {
    fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Pending {
            remaining: AtomicU8::new(3),
            failed: AtomicBool::new(false),
            delivery: Mutex::new(None),
            mark: Mutex::new(None),
            metrics,
        })
    }

    /// The handler returned: hand over the delivery (and the claim to mark
    /// once the posts are acknowledged), and count down.
    fn handler_done(self: &Arc<Self>, delivery: D, mark: Option<Mark>) {
        if let (Some(mark), Ok(mut slot)) = (mark, self.mark.lock()) {
            *slot = Some(mark);
        }
        if let Ok(mut slot) = self.delivery.lock() {
            *slot = Some(delivery);
        }
        self.count_down();
    }

    fn ack(self: &Arc<Self>, status: Status, ok: bool) {
        let m = &self.metrics;
        if ok {
            Metrics::add(
                match status {
                    Status::Started => &m.posted_started,
                    Status::Completed => &m.posted_completed,
                    Status::Failed => &m.posted_failed,
                },
                1,
            );
        } else {
            Metrics::add(&m.report_failed, 1);
            Metrics::add(
                match status {
                    Status::Started => &m.report_failed_started,
                    Status::Completed => &m.report_failed_completed,
                    Status::Failed => &m.report_failed_failed,
                },
                1,
            );
            self.failed.store(true, Release);
        }
        self.count_down();
    }

    fn count_down(self: &Arc<Self>) {
        if self.remaining.fetch_sub(1, AcqRel) != 1 {
            return;
        }
        let Some(d) = self.delivery.lock().ok().and_then(|mut s| s.take()) else {
            return;
        };
        let mark = self.mark.lock().ok().and_then(|mut s| s.take());
        if self.failed.load(Acquire) {
            // Not reported, so not processed: the replay runs the work again.
            if let Some(mark) = mark {
                mark.release();
            }
            // Held on purpose: the commit point stays before this offset and a
            // restart replays it. Never finish what was not reported.
            tracing::error!(
                topic = d.topic(),
                partition = d.partition(),
                offset = d.offset(),
                "Lifecycle post failed after retries; offset held."
            );
            d.hold();
        } else {
            finish_marked(d, mark, &self.metrics);
        }
    }

    fn acker(self: &Arc<Self>, status: Status) -> AckFn {
        let p = Arc::clone(self);
        Box::new(move |ok| p.ack(status, ok))
    }
}

pub(crate) fn finish_now<D: Delivery>(d: D, metrics: &Metrics) {
    d.finish();
    Metrics::add(&metrics.finished, 1);
}

/// Finishes `d` once its idempotency claim (if any) is marked processed.
fn finish_marked<D: Delivery>(d: D, mark: Option<Mark>, metrics: &Arc<Metrics>) {
    match mark {
        Some(mark) => {
            let metrics = Arc::clone(metrics);
            mark.complete_then(move || finish_now(d, &metrics));
        }
        None => finish_now(d, metrics),
    }
}

/// An event's idempotency claim, settled on the runtime that drives the store
/// (sync workers have none of their own).
pub(crate) struct Mark {
    pub(crate) claim: Claim,
    pub(crate) runtime: tokio::runtime::Handle,
}

impl Mark {
    /// Marks the key processed, then runs `then` (which finishes the offset).
    ///
    /// A mark that cannot be written still finishes the offset: the work ran and
    /// was reported, and committing past it is right; only a later replay of the
    /// same key (another group, an old offset) would run it again.
    fn complete_then(self, then: impl FnOnce() + Send + 'static) {
        let Mark { claim, runtime } = self;
        // A runtime shutting down drops the task and with it the delivery,
        // which then holds its offset: a replay, never a skip.
        runtime.spawn(async move {
            let key = claim.key().to_owned();
            if let Err(e) = claim.complete().await {
                tracing::warn!(key, error = %e, "Could not mark an event processed.");
            }
            then();
        });
    }

    /// Gives the key back (the work failed or was not reported): a retry or a
    /// replay runs it. Without a runtime the claim's lease frees it.
    pub(crate) fn release(self) {
        let Mark { claim, runtime } = self;
        runtime.spawn(async move {
            let key = claim.key().to_owned();
            if let Err(e) = claim.release().await {
                tracing::warn!(key, error = %e, "Could not release a failed event's claim.");
            }
        });
    }
}

/// What the work is, for its lifecycle posts.
pub(crate) struct WorkStart<'a> {
    pub(crate) work_id: &'a str,
    pub(crate) platform_id: &'a str,
    pub(crate) event_id: &'a str,
    pub(crate) event_type: &'a str,
}

fn started(w: &WorkStart<'_>) -> Lifecycle {
    Lifecycle {
        work_id: w.work_id.to_owned(),
        status: Status::Started,
        platform_id: w.platform_id.to_owned(),
        details: json!({ "source_event_id": w.event_id, "source_event_type": w.event_type }),
        error: None,
    }
}

/// From a worker thread: hands `started` to the sink (before the handler runs)
/// and returns what will finish the offset once everything is acknowledged.
pub(crate) fn begin_blocking<D: Delivery>(
    sink: Option<&SharedSink>,
    metrics: &Arc<Metrics>,
    w: &WorkStart<'_>,
) -> Option<Arc<Pending<D>>> {
    let sink = sink?;
    let p = Pending::new(Arc::clone(metrics));
    sink.submit_blocking(started(w), p.acker(Status::Started));
    Some(p)
}

/// [`begin_blocking`] from a task.
pub(crate) async fn begin<D: Delivery>(
    sink: Option<&SharedSink>,
    metrics: &Arc<Metrics>,
    w: &WorkStart<'_>,
) -> Option<Arc<Pending<D>>> {
    let sink = sink?;
    let p = Pending::new(Arc::clone(metrics));
    sink.submit(started(w), p.acker(Status::Started)).await;
    Some(p)
}

/// The handler's outcome, ready to be counted and reported.
pub(crate) struct Outcome {
    pub(crate) work_id: String,
    pub(crate) platform_id: String,
    pub(crate) result: Result<(), HandlerError>,
    pub(crate) details: Value,
    /// The event's idempotency claim: marked processed after a success (and its
    /// posts), released after a failure.
    pub(crate) mark: Option<Mark>,
}

impl Outcome {
    fn terminal(self) -> Lifecycle {
        let (status, error) = match self.result {
            Ok(()) => (Status::Completed, None),
            Err(e) => (
                Status::Failed,
                Some((
                    e.message().to_owned(),
                    e.code().unwrap_or("handler_error").to_owned(),
                )),
            ),
        };
        Lifecycle {
            work_id: self.work_id,
            status,
            platform_id: self.platform_id,
            details: self.details,
            error,
        }
    }
}

/// Counts the outcome and logs a failure; returns the terminal record to post
/// and the claim still to mark (a failure's claim is released at once).
fn account<D: Delivery>(
    metrics: &Metrics,
    d: &D,
    mut outcome: Outcome,
    reported: bool,
) -> (Lifecycle, Option<Mark>) {
    Metrics::add(&metrics.handled, 1);
    let mut mark = outcome.mark.take();
    if let Err(e) = &outcome.result {
        if let Some(m) = mark.take() {
            m.release();
        }
        Metrics::add(&metrics.handler_failed, 1);
        tracing::warn!(
            topic = d.topic(),
            partition = d.partition(),
            offset = d.offset(),
            error = %e,
            reported,
            "Handler failed; the offset finishes once its outcome is reported."
        );
    }
    (outcome.terminal(), mark)
}

/// From a worker thread, after the handler: posts the terminal record and
/// finishes the offset (now, or once the posts are acknowledged).
pub(crate) fn complete_blocking<D: Delivery>(
    sink: Option<&SharedSink>,
    metrics: &Arc<Metrics>,
    pending: Option<Arc<Pending<D>>>,
    d: D,
    outcome: Outcome,
) {
    let (record, mark) = account(metrics, &d, outcome, sink.is_some());
    match (sink, pending) {
        (Some(sink), Some(p)) => {
            let ack = p.acker(record.status);
            sink.submit_blocking(record, ack);
            p.handler_done(d, mark);
        }
        _ => finish_marked(d, mark, metrics),
    }
}

/// [`complete_blocking`] from a task.
pub(crate) async fn complete<D: Delivery>(
    sink: Option<&SharedSink>,
    metrics: &Arc<Metrics>,
    pending: Option<Arc<Pending<D>>>,
    d: D,
    outcome: Outcome,
) {
    let (record, mark) = account(metrics, &d, outcome, sink.is_some());
    match (sink, pending) {
        (Some(sink), Some(p)) => {
            let ack = p.acker(record.status);
            sink.submit(record, ack).await;
            p.handler_done(d, mark);
        }
        _ => finish_marked(d, mark, metrics),
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
    /// Hold its offset: nothing after it in its partition is committed, and a
    /// restart reads it again.
    Hold,
}

/// Logs and counts a malformed message, then applies the configured policy.
pub(crate) fn malformed<D: Delivery>(
    d: D,
    err: &crate::decode::Error,
    metrics: &Metrics,
    policy: MalformedPolicy,
) {
    Metrics::add(&metrics.malformed, 1);
    match policy {
        MalformedPolicy::Skip => {
            tracing::warn!(
                topic = d.topic(),
                partition = d.partition(),
                offset = d.offset(),
                error = %err,
                "Malformed message skipped."
            );
            finish_now(d, metrics);
        }
        MalformedPolicy::Hold => {
            // Never finished: the partition's commit point stays here, so the
            // message is read again after a restart, once someone has looked.
            tracing::error!(
                topic = d.topic(),
                partition = d.partition(),
                offset = d.offset(),
                error = %err,
                "Malformed message held: its partition will not commit past it."
            );
            d.hold();
        }
    }
}
