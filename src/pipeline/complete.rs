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
    AtomicU8,
    Ordering::{AcqRel, Acquire, Release},
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::deadletter::{DeadLetters, Placed, Reason, Why};
pub(crate) use super::delivery::Delivery;
use crate::handler::{BoxFuture, HandlerError};
use crate::idempotency::Claim;
use crate::metrics::Metrics;
pub(crate) use crate::report::Status;

/// How a lifecycle post ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Acked {
    /// XZepr answered 2xx.
    Ok,
    /// It failed and will not be sent again (the reporter shut down).
    Failed,
    /// XZepr will never accept it; its response body.
    Rejected(String),
    /// Not sent: the event's other post was rejected, so this one is moot.
    Abandoned,
    /// Not sent, and not to be: `started` was posted on an earlier visit (the
    /// event is back from a delay topic), or the event went on to a delay
    /// topic and its terminal post is that visit's.
    Skipped,
}

/// Where a post's acknowledgement goes (the event's [`Pending`]).
trait AckTarget: Send + Sync {
    fn ack(&self, status: Status, acked: Acked);
    /// False once sending the event's posts again cannot help.
    fn wanted(&self) -> bool;
    /// False once the event's delivery is stale (its partition revoked, the
    /// pipeline stopped); true while its handler still runs.
    fn current(&self) -> bool;
}

/// The acknowledgement of one lifecycle post: [`AckFn::send`] once.
pub(crate) struct AckFn {
    target: Arc<dyn AckTarget>,
    status: Status,
}

impl AckFn {
    /// Reports how the post ended.
    pub(crate) fn send(self, acked: Acked) {
        self.target.ack(self.status, acked);
    }

    /// Whether a post that failed for now is still worth sending again: not
    /// once XZepr rejected the event's other post for good.
    pub(crate) fn wanted(&self) -> bool {
        self.target.wanted()
    }

    /// Whether the event is still this consumer's to report: false once its
    /// partition was revoked or the pipeline stopped (the offset will not be
    /// committed here, so sending its posts again is moot).
    pub(crate) fn current(&self) -> bool {
        self.target.current()
    }
}

/// Where lifecycle records go.
pub(crate) trait LifecycleSink: Send + Sync + 'static {
    /// Hands `record` to the reporter, waiting (without blocking a thread)
    /// while its queue is full.
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
    /// The event span's context: the post's parent.
    pub(crate) trace: Option<crate::trace::TraceContext>,
}

/// Finishes a delivery once the handler returned and both posts were acknowledged.
///
/// Three events count down `remaining`: the handler's return and the two acks, in
/// any order. The delivery is put in before the handler's count is released, so
/// whoever counts last finds it.
pub(crate) struct Pending<D: Delivery> {
    remaining: AtomicU8,
    /// Why the offset must be held ([`HOLD_NONE`] while it need not).
    hold: AtomicU8,
    delivery: Mutex<Option<D>>,
    /// The event's idempotency claim, marked processed only once everything
    /// was acknowledged (a crash before that replays the work and its posts).
    mark: Mutex<Option<Mark>>,
    /// XZepr's body when it refused a post for good.
    rejected: Mutex<Option<String>>,
    dead_letters: Option<Arc<DeadLetters>>,
    metrics: Arc<Metrics>,
}

const HOLD_NONE: u8 = 0;
/// A post failed and could not be submitted again (the reporter shut down).
const HOLD_REPORT: u8 = 1;
/// The event's dead letter was not acknowledged.
const HOLD_DEAD_LETTER: u8 = 2;

impl<D: Delivery> Pending<D> {
    fn new(metrics: Arc<Metrics>, dead_letters: Option<Arc<DeadLetters>>) -> Arc<Self> {
        Arc::new(Pending {
            remaining: AtomicU8::new(3),
            hold: AtomicU8::new(HOLD_NONE),
            delivery: Mutex::new(None),
            mark: Mutex::new(None),
            rejected: Mutex::new(None),
            dead_letters,
            metrics,
        })
    }

    /// The handler returned: hand over the delivery (and the claim to mark
    /// once the posts are acknowledged), and count down. `hold`: its dead
    /// letter failed, so the offset must not finish.
    fn handler_done(&self, delivery: D, mark: Option<Mark>, hold: bool) {
        if hold {
            self.hold.store(HOLD_DEAD_LETTER, Release);
        }
        if let (Some(mark), Ok(mut slot)) = (mark, self.mark.lock()) {
            *slot = Some(mark);
        }
        if let Ok(mut slot) = self.delivery.lock() {
            *slot = Some(delivery);
        }
        self.count_down();
    }

    fn on_ack(&self, status: Status, acked: Acked) {
        let m = &self.metrics;
        match acked {
            Acked::Ok => Metrics::add(
                match status {
                    Status::Started => &m.posted_started,
                    Status::Completed => &m.posted_completed,
                    Status::Failed => &m.posted_failed,
                },
                1,
            ),
            Acked::Failed => {
                Metrics::add(&m.report_failed, 1);
                Metrics::add(
                    match status {
                        Status::Started => &m.report_failed_started,
                        Status::Completed => &m.report_failed_completed,
                        Status::Failed => &m.report_failed_failed,
                    },
                    1,
                );
                let _ = self
                    .hold
                    .compare_exchange(HOLD_NONE, HOLD_REPORT, AcqRel, Acquire);
            }
            Acked::Rejected(body) => {
                Metrics::add(&m.report_rejected, 1);
                if let Ok(mut slot) = self.rejected.lock() {
                    slot.get_or_insert(body);
                }
            }
            Acked::Abandoned | Acked::Skipped => {}
        }
        self.count_down();
    }

    fn count_down(&self) {
        if self.remaining.fetch_sub(1, AcqRel) != 1 {
            return;
        }
        let Some(d) = self.delivery.lock().ok().and_then(|mut s| s.take()) else {
            return;
        };
        let mark = self.mark.lock().ok().and_then(|mut s| s.take());
        let hold = self.hold.load(Acquire);
        if hold != HOLD_NONE {
            // Held on purpose: the commit point stays before this offset and a
            // restart replays it. Never finish what was not reported (or not
            // dead-lettered when it had to be).
            tracing::error!(
                topic = d.topic(),
                partition = d.partition(),
                offset = d.offset(),
                "{}; offset held.",
                if hold == HOLD_REPORT {
                    "Lifecycle post failed and the reporter is gone"
                } else {
                    "Dead letter or delay-topic record not acknowledged"
                }
            );
            hold_unmarked(d, mark);
            return;
        }
        match self.rejected.lock().ok().and_then(|mut s| s.take()) {
            Some(body) => self.rejected(d, mark, body),
            None => finish_marked(d, mark, &self.metrics),
        }
    }

    /// XZepr will never accept this event's post: dead-letter it with reason
    /// `report_rejected` and XZepr's answer, then finish; without a dead-letter
    /// topic, log it loudly and finish (sending it again cannot help, and
    /// holding it would stop the partition for good).
    fn rejected(&self, d: D, mark: Option<Mark>, body: String) {
        let metrics = Arc::clone(&self.metrics);
        let runtime = tokio::runtime::Handle::try_current();
        let (Some(dlq), Ok(runtime)) = (self.dead_letters.clone(), runtime) else {
            tracing::error!(
                topic = d.topic(),
                partition = d.partition(),
                offset = d.offset(),
                response = %body,
                "XZepr rejected a lifecycle post for good; no dead-letter topic is set, offset finished."
            );
            finish_marked(d, mark, &metrics);
            return;
        };
        runtime.spawn(async move {
            let reason = Reason {
                why: Why::ReportRejected,
                message: &body,
                code: "report_rejected",
                attempts: 1,
            };
            match dead_letter(&dlq, &d, &reason, &metrics).await {
                Some(_) => finish_marked(d, mark, &metrics),
                None => hold_unmarked(d, mark),
            }
        });
    }

    fn acker(self: &Arc<Self>, status: Status) -> AckFn {
        AckFn {
            target: Arc::clone(self) as Arc<dyn AckTarget>,
            status,
        }
    }
}

impl<D: Delivery> AckTarget for Pending<D> {
    fn ack(&self, status: Status, acked: Acked) {
        self.on_ack(status, acked);
    }
    fn wanted(&self) -> bool {
        self.rejected.lock().map_or(true, |r| r.is_none())
    }
    fn current(&self) -> bool {
        self.delivery
            .lock()
            .map_or(true, |d| d.as_ref().is_none_or(Delivery::is_current))
    }
}

pub(crate) fn finish_now<D: Delivery>(d: D, metrics: &Metrics) {
    d.finish();
    Metrics::add(&metrics.finished, 1);
}

/// Holds `d`, releasing its claim: not done, so a replay runs it again.
fn hold_unmarked<D: Delivery>(d: D, mark: Option<Mark>) {
    if let Some(mark) = mark {
        mark.release();
    }
    d.hold();
}

/// First wait before a dead letter the broker did not acknowledge is produced
/// again; it doubles up to [`DEAD_LETTER_RETRY_MAX`].
const DEAD_LETTER_RETRY_FIRST: Duration = Duration::from_millis(500);

/// Longest wait between two tries of one dead letter: a dead-letter cluster
/// back from an outage is used within half a minute.
const DEAD_LETTER_RETRY_MAX: Duration = Duration::from_secs(30);

/// Where an event's record goes when it leaves its partition's flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Destination {
    /// Its dead-letter topic: it failed for good.
    DeadLetter,
    /// Its next delay topic: it runs again once due.
    Delay,
}

/// Produces `d` to the dead-letter topic, counting and logging each try, and
/// tries again with backoff (in its lane: its offset waits, and the commit
/// point with it) until the broker takes it. `None` once `d`'s partition is
/// no longer this consumer's (revoked, or the pipeline stopping): the caller
/// holds the offset and the next owner replays it.
pub(crate) async fn dead_letter<D: Delivery>(
    dlq: &DeadLetters,
    d: &D,
    reason: &Reason<'_>,
    metrics: &Metrics,
) -> Option<Placed> {
    until_acked(d, metrics, Destination::DeadLetter, || dlq.send(d, reason)).await
}

/// Runs `send` until the broker acknowledges the record, as [`dead_letter`]
/// does for any [`Destination`].
pub(crate) async fn until_acked<D: Delivery, F, Fut>(
    d: &D,
    metrics: &Metrics,
    to: Destination,
    mut send: F,
) -> Option<Placed>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Placed, String>>,
{
    let mut wait = DEAD_LETTER_RETRY_FIRST;
    let mut tries = 0u32;
    loop {
        tries += 1;
        match send().await {
            Ok(placed) => return Some(placed_at(d, placed, tries, metrics, to)),
            Err(e) => {
                let (counter, what) = match to {
                    Destination::DeadLetter => (&metrics.dead_letter_failed, "Dead-letter"),
                    Destination::Delay => (&metrics.delay_failed, "Delay-topic"),
                };
                Metrics::add(counter, 1);
                tracing::error!(
                    topic = d.topic(),
                    partition = d.partition(),
                    offset = d.offset(),
                    tries,
                    retry_in_ms = wait.as_millis() as u64,
                    error = %e,
                    "{what} produce failed: the offset waits, and the record is produced again."
                );
            }
        }
        // Short steps, so a revoke or a stop ends the wait at once.
        let until = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < until {
            if !d.is_current() {
                return None;
            }
            tokio::time::sleep_until(until.min(tokio::time::Instant::now() + RETRY_CHECK)).await;
        }
        if !d.is_current() {
            return None;
        }
        wait = (wait * 2).min(DEAD_LETTER_RETRY_MAX);
    }
}

/// How often a dead letter waiting for its next try checks that its partition
/// is still this consumer's.
const RETRY_CHECK: Duration = Duration::from_millis(100);

fn placed_at<D: Delivery>(
    d: &D,
    placed: Placed,
    tries: u32,
    metrics: &Metrics,
    to: Destination,
) -> Placed {
    let (counter, what) = match to {
        Destination::DeadLetter => (&metrics.dead_lettered, "Event dead-lettered."),
        Destination::Delay => (&metrics.delayed, "Event sent to a delay topic."),
    };
    Metrics::add(counter, 1);
    tracing::warn!(
        topic = d.topic(),
        partition = d.partition(),
        offset = d.offset(),
        to_topic = %placed.topic,
        to_partition = placed.partition,
        to_offset = placed.offset,
        tries,
        "{what}"
    );
    placed
}

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
/// (not a sync worker's own, which blocks while it waits for a job).
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
    pub(crate) trace: Option<&'a crate::trace::TraceContext>,
}

fn started(w: &WorkStart<'_>) -> Lifecycle {
    Lifecycle {
        work_id: w.work_id.to_owned(),
        status: Status::Started,
        platform_id: w.platform_id.to_owned(),
        details: json!({ "source_event_id": w.event_id, "source_event_type": w.event_type }),
        error: None,
        trace: w.trace.cloned(),
    }
}

/// Hands `started` to the sink (before the handler runs) and returns what
/// will finish the offset once everything is acknowledged. An event back from
/// a delay topic (`resumed`) had its `started` posted on its first visit.
pub(crate) async fn begin<D: Delivery>(
    sink: Option<&SharedSink>,
    metrics: &Arc<Metrics>,
    dead_letters: Option<&Arc<DeadLetters>>,
    w: &WorkStart<'_>,
    resumed: bool,
) -> Option<Arc<Pending<D>>> {
    let sink = sink?;
    let p = Pending::new(Arc::clone(metrics), dead_letters.cloned());
    if resumed {
        p.acker(Status::Started).send(Acked::Skipped);
    } else {
        sink.submit(started(w), p.acker(Status::Started)).await;
    }
    Some(p)
}

/// After the event went to a delay topic (`placed`) or could not (its
/// partition is no longer this consumer's): gives its claim back, for its
/// next visit, and finishes its offset once its `started` was acknowledged,
/// or holds it. No terminal post: the visit that ends it makes that one.
pub(crate) fn moved<D: Delivery>(
    metrics: &Arc<Metrics>,
    pending: Option<Arc<Pending<D>>>,
    d: D,
    mark: Option<Mark>,
    placed: bool,
) {
    if let Some(mark) = mark {
        mark.release();
    }
    match pending {
        Some(p) => {
            p.acker(Status::Completed).send(Acked::Skipped);
            p.handler_done(d, None, !placed);
        }
        None if placed => finish_now(d, metrics),
        None => d.hold(),
    }
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
    /// Its dead letter was not acknowledged: hold the offset.
    pub(crate) hold: bool,
    /// The event span's context, for the terminal post.
    pub(crate) trace: Option<crate::trace::TraceContext>,
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
            trace: self.trace,
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

/// Without a lifecycle: holds `d` (its dead letter failed) or finishes it
/// once its claim is marked.
fn settle_unreported<D: Delivery>(d: D, mark: Option<Mark>, hold: bool, metrics: &Arc<Metrics>) {
    if hold {
        hold_unmarked(d, mark);
    } else {
        finish_marked(d, mark, metrics);
    }
}

/// After the handler: posts the terminal record and finishes the offset
/// (now, or once the posts are acknowledged).
pub(crate) async fn complete<D: Delivery>(
    sink: Option<&SharedSink>,
    metrics: &Arc<Metrics>,
    pending: Option<Arc<Pending<D>>>,
    d: D,
    outcome: Outcome,
) {
    let hold = outcome.hold;
    let (record, mark) = account(metrics, &d, outcome, sink.is_some());
    match (sink, pending) {
        (Some(sink), Some(p)) => {
            let ack = p.acker(record.status);
            sink.submit(record, ack).await;
            p.handler_done(d, mark, hold);
        }
        _ => settle_unreported(d, mark, hold, metrics),
    }
}

/// What the pipeline does with a message that does not decode as a CloudEvent.
/// Either way it is counted and logged with topic, partition, offset and error.
/// In configuration: `skip`, `hold` or `dead_letter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum MalformedPolicy {
    /// Finish its offset (committed, never read again). The default: one bad
    /// message must not stall its partition.
    #[default]
    Skip,
    /// Hold its offset: nothing after it in its partition is committed, and a
    /// restart reads it again.
    Hold,
    /// Produce it, unchanged, to the dead-letter topic
    /// ([`PipelineBuilder::dead_letter`](super::PipelineBuilder::dead_letter), which
    /// this policy needs) with reason `malformed`; its offset finishes once the
    /// broker acknowledged that, and is held if it did not.
    DeadLetter,
}

/// Logs and counts a malformed message, then applies the configured policy;
/// under [`MalformedPolicy::DeadLetter`] hands the message back, for the caller
/// to dead-letter ([`malformed_dead_lettered`]).
#[must_use]
pub(crate) fn malformed<D: Delivery>(
    d: D,
    err: &crate::decode::Error,
    metrics: &Metrics,
    policy: MalformedPolicy,
) -> Option<D> {
    Metrics::add(&metrics.malformed, 1);
    match policy {
        MalformedPolicy::DeadLetter => return Some(d),
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
    None
}

/// The dead-letter reason of a malformed message.
pub(crate) fn malformed_reason(message: &str) -> Reason<'_> {
    Reason {
        why: Why::Malformed,
        message,
        code: "malformed",
        attempts: 0,
    }
}

/// Settles a malformed message by whether its dead letter was acknowledged.
pub(crate) fn malformed_dead_lettered<D: Delivery>(
    d: D,
    placed: Option<Placed>,
    metrics: &Metrics,
) {
    match placed {
        Some(_) => finish_now(d, metrics),
        None => d.hold(),
    }
}
