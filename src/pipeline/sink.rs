//! The reporter as the flows' lifecycle sink: each `started`, `completed` and
//! `failed` of the pipeline becomes a reporter record, and a post that failed
//! for now is submitted again until it lands or becomes moot.

use std::sync::Arc;

use super::complete::{AckFn, Acked, Lifecycle, LifecycleSink, SharedSink};
use crate::handler::BoxFuture;
pub use crate::report::WorkTemplate;

/// `Debug` placeholder for the type-erased sink.
pub(super) struct SinkDebug(pub(super) SharedSink);

impl std::fmt::Debug for SinkDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LifecycleSink")
    }
}

/// The reporter as the workers' lifecycle sink.
pub(super) struct ReporterSink(pub(super) Arc<SinkInner>);

impl Drop for ReporterSink {
    /// The pipeline let go of its sink (its workers and executor are gone):
    /// the records waiting to be resubmitted give up, and with them the last
    /// handles of the reporter, so its drain can end.
    fn drop(&mut self) {
        self.0.stopped.cancel();
    }
}

pub(super) struct SinkInner {
    pub(super) reporter: crate::report::Reporter,
    pub(super) work: WorkTemplate,
    /// Cancelled when the pipeline drops the sink.
    pub(super) stopped: tokio_util::sync::CancellationToken,
}

impl SinkInner {
    fn record(self: &Arc<Self>, record: Lifecycle, ack: AckFn) -> crate::report::Record {
        self.record_round(record, ack, 0)
    }

    /// The reporter's record; `round`: how many times it was submitted before.
    fn record_round(
        self: &Arc<Self>,
        record: Lifecycle,
        ack: AckFn,
        round: u32,
    ) -> crate::report::Record {
        use crate::report::{OwnedWork, Record};
        let again = record.clone();
        // Weak: a queued record must not keep the reporter open (its handle
        // is in here) once the pipeline let go of the sink.
        let me = Arc::downgrade(self);
        Record {
            work: OwnedWork::of(&self.work, record.work_id, record.platform_id),
            status: record.status,
            details: record.details,
            error: record.error,
            trace: record.trace.map(Box::new),
            ack: crate::report::Ack::new(move |r| match me.upgrade() {
                Some(me) => me.acknowledged(r, again, ack, round),
                None if r.is_ok() => ack.send(Acked::Ok),
                None => ack.send(Acked::Failed),
            }),
        }
    }

    /// A post that failed for now (XZepr down past the reporter's retries, its
    /// breaker open, a 401, a receiver gone) is submitted again, for as long
    /// as it takes: its offset waits, and the commit point moves on as soon as
    /// XZepr answers, without a restart. The waits grow with each round
    /// ([`Reporter::resubmit_delay`](crate::report::Reporter::resubmit_delay)),
    /// and a waiting record holds a slot of the reporter's queue, so the
    /// submitters (and the handlers behind them) stop while the queue is full.
    /// It ends as failed, which holds the offset, once the reporter is gone,
    /// the event's partition is revoked, or the pipeline stops.
    fn acknowledged(
        self: Arc<Self>,
        result: Result<String, crate::report::ReportError>,
        record: Lifecycle,
        ack: AckFn,
        round: u32,
    ) {
        use crate::report::ReportError;
        match result {
            Ok(_) => ack.send(Acked::Ok),
            Err(ReportError::Rejected { body, .. }) => ack.send(Acked::Rejected(body.to_string())),
            // The event's other post was rejected: this one can never help.
            Err(ReportError::Failed { .. }) if !ack.wanted() => ack.send(Acked::Abandoned),
            Err(ReportError::Failed { .. }) if !ack.current() || self.stopped.is_cancelled() => {
                ack.send(Acked::Failed);
            }
            Err(ReportError::Failed { .. }) => match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(self.resubmit(record, ack, round));
                }
                Err(_) => ack.send(Acked::Failed),
            },
            Err(_) => ack.send(Acked::Failed),
        }
    }

    /// Takes a queue slot, waits out the round's delay, and submits the
    /// record again through the slot, unless it became moot meanwhile.
    async fn resubmit(self: Arc<Self>, record: Lifecycle, ack: AckFn, round: u32) {
        let delay = self.reporter.resubmit_delay(round);
        let slot = tokio::select! {
            slot = self.reporter.reserve() => slot,
            () = self.stopped.cancelled() => None,
        };
        let Some(slot) = slot else {
            return ack.send(Acked::Failed);
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = self.stopped.cancelled() => return ack.send(Acked::Failed),
        }
        if !ack.wanted() {
            return ack.send(Acked::Abandoned);
        }
        if !ack.current() {
            return ack.send(Acked::Failed);
        }
        slot.send(self.record_round(record, ack, round.saturating_add(1)));
    }
}

impl LifecycleSink for ReporterSink {
    fn submit(&self, record: Lifecycle, ack: AckFn) -> BoxFuture<()> {
        let record = self.0.record(record, ack);
        let reporter = self.0.reporter.clone();
        Box::pin(async move {
            // Waits while the reporter's queue is full: backpressure onto the
            // lane. A closed reporter hands the record back; dropping it
            // acknowledges `Closed`, so the offset is held.
            let _ = reporter.send(record).await;
        })
    }
}
