//! The handler workers: decode, filter, run the handler, report, finish.
//!
//! A worker owns one queue and one [`Decoder`] (with its reusable buffers). For each
//! message it decodes in place, drops what the filter or the own-source rule
//! skips, runs the handler, and hands `started` and `completed`/`failed` to the
//! reporter. The message's offset finishes only when the handler returned *and*
//! both posts were acknowledged; a post that exhausts its retries leaves the
//! offset unfinished, so the commit point stays before it and a restart replays it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{
    AtomicBool, AtomicU8,
    Ordering::{AcqRel, Acquire, Release},
};
use std::sync::{Arc, Mutex};

use crossbeam_channel::Receiver;
use serde_json::{json, Value};

use crate::decode::{CloudEvent, Decoder};
use crate::dispatch::TypeFilter;
use crate::handler::{AsyncHandler, Handler, HandlerError, Work};
use crate::metrics::Metrics;

/// A message delivered by the source, as the workers see it.
pub(crate) trait Delivery: Send + 'static {
    fn topic(&self) -> &str;
    /// The topic, shared (no allocation per message).
    fn topic_arc(&self) -> Arc<str>;
    fn partition(&self) -> i32;
    fn offset(&self) -> i64;
    fn payload(&self) -> Option<&[u8]>;
    /// Kafka headers as `(key, value)` pairs (binary-mode CloudEvents).
    fn headers(&self) -> Vec<(&str, &[u8])>;
    /// False when the partition was revoked after this was queued: drop it unhandled.
    fn is_current(&self) -> bool {
        true
    }
    /// Marks the offset finished (handled and reported, or skipped).
    fn finish(self);
    /// Marks the offset held: never finished in this assignment, the commit
    /// point stays before it, but drains do not wait for it.
    fn hold(self)
    where
        Self: Sized,
    {
        drop(self);
    }
}

/// Where lifecycle records go; `ack` is called once, with `true` after a 2xx.
pub(crate) trait LifecycleSink: Send + Sync + 'static {
    fn submit(&self, record: Lifecycle, ack: Box<dyn FnOnce(bool) + Send>);
}

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

/// What the worker does with each event; shared by all workers.
pub(crate) struct WorkerShared<S> {
    pub(crate) filter: TypeFilter,
    /// `Some(receiver id)`: skip events whose source is that receiver.
    pub(crate) own_receiver: Option<String>,
    pub(crate) lifecycle: Option<S>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) malformed: super::MalformedPolicy,
}

/// Whether a decoded event goes to the handler; counts the reason when not.
fn wanted<S>(shared: &WorkerShared<S>, ev: &CloudEvent<'_>) -> bool {
    if !shared.filter.accepts(ev.event_type()) {
        Metrics::add(&shared.metrics.filtered, 1);
        return false;
    }
    if let (Some(own), Some(src)) = (&shared.own_receiver, ev.source_receiver_id()) {
        if own == src {
            Metrics::add(&shared.metrics.own_skipped, 1);
            return false;
        }
    }
    true
}

/// Finishes a delivery once the handler returned and both posts were acknowledged.
///
/// Three events count down `remaining`: the handler's return and the two acks, in
/// any order. The delivery is put in before the handler's count is released, so
/// whoever counts last finds it.
struct Pending<D: Delivery> {
    remaining: AtomicU8,
    failed: AtomicBool,
    delivery: Mutex<Option<D>>,
    metrics: Arc<Metrics>,
}

impl<D: Delivery> Pending<D> {
    fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Pending {
            remaining: AtomicU8::new(3),
            failed: AtomicBool::new(false),
            delivery: Mutex::new(None),
            metrics,
        })
    }

    /// The handler returned: hand over the delivery and count down.
    fn handler_done(self: &Arc<Self>, delivery: D) {
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
        if self.failed.load(Acquire) {
            // Left unfinished on purpose: the commit point stays before this
            // offset and a restart replays it. Never finish what was not reported.
            tracing::error!(
                topic = d.topic(),
                partition = d.partition(),
                offset = d.offset(),
                "Lifecycle post failed after retries; offset left uncommitted."
            );
            d.hold();
        } else {
            finish_now(d, &self.metrics);
        }
    }
}

fn submit<D: Delivery, S: LifecycleSink>(sink: &S, pending: &Arc<Pending<D>>, record: Lifecycle) {
    let status = record.status;
    let p = Arc::clone(pending);
    sink.submit(record, Box::new(move |ok| p.ack(status, ok)));
}

fn finish_now<D: Delivery>(d: D, metrics: &Metrics) {
    d.finish();
    Metrics::add(&metrics.finished, 1);
}

/// Logs and counts a malformed message, then applies the configured policy.
fn malformed<D: Delivery>(
    d: D,
    err: &crate::decode::Error,
    metrics: &Metrics,
    policy: super::MalformedPolicy,
) {
    Metrics::add(&metrics.malformed, 1);
    match policy {
        super::MalformedPolicy::Skip => {
            tracing::warn!(
                topic = d.topic(),
                partition = d.partition(),
                offset = d.offset(),
                error = %err,
                "Malformed message skipped."
            );
            finish_now(d, metrics);
        }
        super::MalformedPolicy::Hold => {
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

fn terminal(
    work_id: String,
    platform_id: String,
    result: Result<(), HandlerError>,
    details: Value,
) -> Lifecycle {
    match result {
        Ok(()) => Lifecycle {
            work_id,
            status: Status::Completed,
            platform_id,
            details,
            error: None,
        },
        Err(e) => Lifecycle {
            work_id,
            status: Status::Failed,
            platform_id,
            details,
            error: Some((
                e.message().to_owned(),
                e.code().unwrap_or("handler_error").to_owned(),
            )),
        },
    }
}

fn started(work_id: &str, platform_id: &str, event_id: &str, event_type: &str) -> Lifecycle {
    Lifecycle {
        work_id: work_id.to_owned(),
        status: Status::Started,
        platform_id: platform_id.to_owned(),
        details: json!({ "source_event_id": event_id, "source_event_type": event_type }),
        error: None,
    }
}

/// Counts a delivery in, or drops it unhandled when its partition was revoked
/// after it was queued (the new owner has it).
fn take<D: Delivery>(delivery: &D, metrics: &Metrics) -> bool {
    if !delivery.is_current() {
        Metrics::add(&metrics.stale_dropped, 1);
        return false;
    }
    Metrics::add(&metrics.consumed, 1);
    true
}

/// With a lifecycle, hands `started` to the reporter (before the handler runs)
/// and returns what will finish the offset once everything is acknowledged.
fn begin<D: Delivery, S: LifecycleSink>(
    shared: &WorkerShared<S>,
    work_id: &str,
    platform_id: &str,
    event_id: &str,
    event_type: &str,
) -> Option<Arc<Pending<D>>> {
    shared.lifecycle.as_ref().map(|sink| {
        let p = Pending::new(Arc::clone(&shared.metrics));
        submit(
            sink,
            &p,
            started(work_id, platform_id, event_id, event_type),
        );
        p
    })
}

/// Runs a sync handler over one queue until the queue is closed and drained.
pub(crate) fn run_sync<D, H, S>(
    rx: Receiver<D>,
    mut decoder: Decoder,
    handler: Arc<H>,
    shared: Arc<WorkerShared<S>>,
) where
    D: Delivery,
    H: Handler + ?Sized,
    S: LifecycleSink,
{
    let metrics = &shared.metrics;
    for delivery in rx {
        if !take(&delivery, metrics) {
            continue;
        }
        let headers = delivery.headers();
        let decoded = decoder.decode_message(headers.iter().copied(), delivery.payload());
        let ev = match decoded {
            Ok(ev) => ev,
            Err(e) => {
                drop(headers);
                malformed(delivery, &e, metrics, shared.malformed);
                continue;
            }
        };
        if !wanted(&shared, &ev) {
            drop((ev, headers));
            finish_now(delivery, metrics);
            continue;
        }
        let mut work = Work::new(
            format!("work-{}", ev.id()),
            delivery.topic_arc(),
            delivery.partition(),
            delivery.offset(),
        );
        let platform_id = ev.platform_id().unwrap_or_default().to_owned();
        // `started` goes to the reporter before the handler runs.
        let pending = begin(&shared, work.id(), &platform_id, ev.id(), ev.event_type());
        // The handler is user code: a panic fails this event, never the worker.
        let result = catch_unwind(AssertUnwindSafe(|| handler.handle(&ev, &mut work)))
            .unwrap_or_else(|_| Err(HandlerError::with_code("handler panicked", "handler_panic")));
        drop((ev, headers));
        let details = Value::Object(std::mem::take(&mut work.details));
        complete(
            &shared,
            pending,
            delivery,
            work.id,
            platform_id,
            result,
            details,
        );
    }
}

/// After the handler: counts, posts the terminal record, finishes or hands over.
fn complete<D: Delivery, S: LifecycleSink>(
    shared: &WorkerShared<S>,
    pending: Option<Arc<Pending<D>>>,
    delivery: D,
    work_id: String,
    platform_id: String,
    result: Result<(), HandlerError>,
    details: Value,
) {
    let metrics = &shared.metrics;
    Metrics::add(&metrics.handled, 1);
    if let Err(e) = &result {
        Metrics::add(&metrics.handler_failed, 1);
        tracing::warn!(
            topic = delivery.topic(),
            partition = delivery.partition(),
            offset = delivery.offset(),
            error = %e,
            reported = shared.lifecycle.is_some(),
            "Handler failed; the offset finishes once its outcome is reported."
        );
    }
    match (&shared.lifecycle, pending) {
        (Some(sink), Some(p)) => {
            submit(sink, &p, terminal(work_id, platform_id, result, details));
            p.handler_done(delivery);
        }
        _ => finish_now(delivery, metrics),
    }
}

/// Runs an async handler over one queue, one event at a time (so the queue's
/// order holds), driving each future on `runtime`.
pub(crate) fn run_async<D, H, S>(
    rx: Receiver<D>,
    mut decoder: Decoder,
    handler: Arc<H>,
    shared: Arc<WorkerShared<S>>,
    runtime: tokio::runtime::Handle,
) where
    D: Delivery,
    H: AsyncHandler + ?Sized,
    S: LifecycleSink,
{
    let metrics = &shared.metrics;
    for delivery in rx {
        if !take(&delivery, metrics) {
            continue;
        }
        let headers = delivery.headers();
        let decoded = decoder
            .decode_message(headers.iter().copied(), delivery.payload())
            .and_then(|ev| {
                if wanted(&shared, &ev) {
                    ev.to_owned_message().map(Some)
                } else {
                    Ok(None)
                }
            });
        drop(headers);
        let message = match decoded {
            Ok(Some(m)) => m,
            Ok(None) => {
                finish_now(delivery, metrics);
                continue;
            }
            Err(e) => {
                malformed(delivery, &e, metrics, shared.malformed);
                continue;
            }
        };
        let work = Work::new(
            format!("work-{}", message.id),
            delivery.topic_arc(),
            delivery.partition(),
            delivery.offset(),
        );
        let platform_id = message.platform_id.clone();
        let pending = begin(
            &shared,
            work.id(),
            &platform_id,
            &message.id,
            &message.event_type,
        );
        // User code: a panic while building the future or while polling it (the
        // task is spawned so that surfaces as a JoinError) fails this event, never
        // the worker.
        let ran = catch_unwind(AssertUnwindSafe(|| handler.handle(message, work.info())))
            .map(|fut| runtime.block_on(runtime.spawn(fut)));
        let result = match ran {
            Ok(Ok(result)) => result,
            Ok(Err(join)) if join.is_cancelled() => {
                // The runtime is shutting down: the handler did not run to its
                // end, so the offset stays unfinished and is read again.
                tracing::warn!(
                    topic = delivery.topic(),
                    partition = delivery.partition(),
                    offset = delivery.offset(),
                    "Handler cancelled (runtime shut down); offset left unfinished."
                );
                continue;
            }
            Ok(Err(_)) | Err(_) => {
                Err(HandlerError::with_code("handler panicked", "handler_panic"))
            }
        };
        let (result, details) = match result {
            Ok(details) => (Ok(()), details),
            Err(e) => (Err(e), Value::Object(Default::default())),
        };
        complete(
            &shared,
            pending,
            delivery,
            work.id,
            platform_id,
            result,
            details,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    struct TestDelivery {
        offset: i64,
        payload: Vec<u8>,
        finished: Arc<StdMutex<Vec<i64>>>,
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
        fn payload(&self) -> Option<&[u8]> {
            Some(&self.payload)
        }
        fn headers(&self) -> Vec<(&str, &[u8])> {
            Vec::new()
        }
        fn finish(self) {
            self.finished.lock().unwrap().push(self.offset);
        }
    }

    type Ack = Box<dyn FnOnce(bool) + Send>;

    /// Holds acks until released, to prove an offset waits for its posts.
    #[derive(Default)]
    struct HeldSink {
        held: StdMutex<Vec<(Lifecycle, Ack)>>,
    }

    impl LifecycleSink for Arc<HeldSink> {
        fn submit(&self, record: Lifecycle, ack: Box<dyn FnOnce(bool) + Send>) {
            self.held.lock().unwrap().push((record, ack));
        }
    }

    fn event(ty: &str, source: &str) -> Vec<u8> {
        format!(r#"{{"id":"e1","source":"{source}","specversion":"1.0.1","type":"{ty}","platform_id":"linux"}}"#)
            .into_bytes()
    }

    fn run(
        payloads: Vec<Vec<u8>>,
        sink: Option<Arc<HeldSink>>,
        filter: TypeFilter,
    ) -> (Arc<StdMutex<Vec<i64>>>, Arc<Metrics>) {
        let finished = Arc::new(StdMutex::new(Vec::new()));
        let (tx, rx) = crossbeam_channel::bounded(16);
        for (i, payload) in payloads.into_iter().enumerate() {
            tx.send(TestDelivery {
                offset: i as i64,
                payload,
                finished: Arc::clone(&finished),
            })
            .unwrap();
        }
        drop(tx);
        let metrics = Arc::new(Metrics::default());
        let shared = Arc::new(WorkerShared {
            filter,
            own_receiver: Some("ME".to_owned()),
            lifecycle: sink,
            metrics: Arc::clone(&metrics),
            malformed: super::super::MalformedPolicy::Skip,
        });
        let handler = Arc::new(
            |ev: &CloudEvent<'_>, work: &mut Work| -> Result<(), String> {
                work.detail("seen", ev.event_type());
                match ev.event_type() {
                    "fail" => Err("it failed".to_owned()),
                    "panic" => panic!("handler bug"),
                    _ => Ok(()),
                }
            },
        );
        let decoder = Decoder::new(crate::decode::DecoderConfig::default()).unwrap();
        run_sync(rx, decoder, handler, shared);
        (finished, metrics)
    }

    #[test]
    fn offsets_finish_only_after_both_posts_are_acknowledged() {
        let sink = Arc::new(HeldSink::default());
        let (finished, metrics) = run(
            vec![event("ok", "x"), event("fail", "x")],
            Some(Arc::clone(&sink)),
            TypeFilter::any(),
        );
        assert!(
            finished.lock().unwrap().is_empty(),
            "finished before any ack"
        );
        let held: Vec<_> = std::mem::take(&mut *sink.held.lock().unwrap());
        let statuses: Vec<_> = held
            .iter()
            .map(|(r, _)| (r.work_id.clone(), r.status))
            .collect();
        assert_eq!(
            statuses,
            vec![
                ("work-e1".to_owned(), Status::Started),
                ("work-e1".to_owned(), Status::Completed),
                ("work-e1".to_owned(), Status::Started),
                ("work-e1".to_owned(), Status::Failed),
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
        a1(true);
        assert!(finished.lock().unwrap().is_empty());
        a0(true);
        assert_eq!(*finished.lock().unwrap(), vec![0]);
        // A post that exhausted its retries leaves its offset unfinished.
        acks.next().unwrap()(true);
        acks.next().unwrap()(false);
        assert_eq!(*finished.lock().unwrap(), vec![0]);
        let m = metrics.snapshot();
        assert_eq!(
            (m.handled, m.handler_failed, m.report_failed, m.finished),
            (2, 1, 1, 1)
        );
        assert_eq!(
            (m.posted_started, m.posted_completed, m.posted_failed),
            (2, 1, 0)
        );
    }

    #[test]
    fn filtered_own_and_malformed_finish_at_once_and_panics_fail() {
        let sink = Arc::new(HeldSink::default());
        let payloads = vec![
            event("deployment.x", "xzepr.event.receiver.OTHER"),
            event("other.type", "x"),
            event("deployment.y", "xzepr.event.receiver.ME"),
            b"{not json".to_vec(),
            event("panic", "x"),
        ];
        let filter = TypeFilter::any().prefix("deployment.").prefix("panic");
        let (finished, metrics) = run(payloads, Some(Arc::clone(&sink)), filter);
        assert_eq!(*finished.lock().unwrap(), vec![1, 2, 3]);
        let m = metrics.snapshot();
        assert_eq!(
            (m.filtered, m.own_skipped, m.malformed, m.handler_failed),
            (1, 1, 1, 1)
        );
        let held = std::mem::take(&mut *sink.held.lock().unwrap());
        assert_eq!(held.len(), 4);
        assert_eq!(held[3].0.error.as_ref().unwrap().1, "handler_panic");
        for (_, ack) in held {
            ack(true);
        }
        let mut done = finished.lock().unwrap().clone();
        done.sort_unstable();
        assert_eq!(done, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn without_lifecycle_offsets_finish_when_the_handler_returns() {
        let (finished, _) = run(
            vec![event("ok", "x"), event("fail", "x")],
            None,
            TypeFilter::any(),
        );
        assert_eq!(*finished.lock().unwrap(), vec![0, 1]);
    }

    #[test]
    fn the_hold_policy_leaves_a_malformed_offset_unfinished() {
        let finished = Arc::new(StdMutex::new(Vec::new()));
        let (tx, rx) = crossbeam_channel::bounded(4);
        for (i, payload) in [b"{broken".to_vec(), event("ok", "x")]
            .into_iter()
            .enumerate()
        {
            tx.send(TestDelivery {
                offset: i as i64,
                payload,
                finished: Arc::clone(&finished),
            })
            .unwrap();
        }
        drop(tx);
        let metrics = Arc::new(Metrics::default());
        let shared: Arc<WorkerShared<Arc<HeldSink>>> = Arc::new(WorkerShared {
            filter: TypeFilter::any(),
            own_receiver: None,
            lifecycle: None,
            metrics: Arc::clone(&metrics),
            malformed: super::super::MalformedPolicy::Hold,
        });
        let handler = Arc::new(|_: &CloudEvent<'_>, _: &mut Work| -> Result<(), String> { Ok(()) });
        let decoder = Decoder::new(crate::decode::DecoderConfig::default()).unwrap();
        run_sync(rx, decoder, handler, shared);
        assert_eq!(*finished.lock().unwrap(), vec![1]);
        assert_eq!(metrics.snapshot().malformed, 1);
    }
}
