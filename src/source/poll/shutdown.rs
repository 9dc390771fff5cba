//! Shutdown: drain, commit a last time, unsubscribe, and the bounds on each
//! step.

use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;

use super::run::PollLoop;
use super::state::retire;

impl PollLoop {
    /// Stop fetching, drop what waits in lanes, let running work finish (up to
    /// the drain timeout), commit synchronously, cancel the rest, and leave the
    /// group.
    pub(super) fn shutdown(&self) {
        let consumer = &self.consumer;
        if let Ok(assignment) = consumer.assignment() {
            let _ = consumer.pause(&assignment);
        }
        let ctx = consumer.context();
        let deadline = Instant::now() + self.options.drain_timeout;
        // Poisoned only by a panic on this thread, caught in `run`: what the
        // tracker says finished is still finished, so commit it.
        let mut st = ctx.state.lock().unwrap_or_else(|p| p.into_inner());
        // No new jobs from here on; a sync executor's workers end once they have
        // run what they hold.
        st.executor = None;
        st.drop_waiting(|_| true);
        st.drain_in_flight(deadline, |_| true);
        let last = st.commit_list(None, true);
        st.publish_committed();
        drop(st);
        if let Some(tpl) = last {
            self.commit_within(&tpl, Instant::now() + FINAL_COMMIT_WAIT);
        }
        let mut st = ctx.state.lock().unwrap_or_else(|p| p.into_inner());
        st.publish_committed();
        for p in st.parts.values() {
            retire(p);
        }
        st.parts.clear();
        st.paused = 0;
        st.watch_partitions(None);
        st.publish_gauges();
        drop(st);
        if ctx.static_member {
            self.release_static();
            return;
        }
        consumer.unsubscribe();
        // Serve the revoke that unsubscribing queues while the group handler
        // still answers: left to the close in the consumer's `Drop`, its
        // `assign` can wait forever on a group already closing (librdkafka
        // #4884). Messages polled here are dropped unhandled, never committed.
        let until = Instant::now() + UNSUBSCRIBE_WAIT;
        while Instant::now() < until && consumer.assignment().is_ok_and(|a| a.count() > 0) {
            drop(consumer.poll(Duration::from_millis(20)));
        }
    }
}

impl PollLoop {
    /// A static member stops without leaving the group (KIP-345), so the
    /// broker keeps its partitions for it until the session timeout and a
    /// restart inside it takes them back with no rebalance. Unsubscribing
    /// would send a LeaveGroup (librdkafka skips it only on close), so the
    /// partitions are released locally instead; the close in the consumer's
    /// `Drop` then serves the revoke (the handler's `on_revoke`) with nothing
    /// left to drain.
    fn release_static(&self) {
        let consumer = &self.consumer;
        let Ok(assignment) = consumer.assignment() else {
            return;
        };
        let released = match self.options.assignment {
            crate::source::Assignment::Cooperative => consumer.incremental_unassign(&assignment),
            _ => consumer.unassign(),
        };
        if let Err(e) = released {
            tracing::warn!(error = %e, "Releasing the partitions on shutdown failed.");
        }
        drop(assignment);
        consumer
            .context()
            .stats
            .assigned
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Most time shutdown spends serving the revoke of its own unsubscribe.
const UNSUBSCRIBE_WAIT: Duration = Duration::from_secs(2);

/// Most time shutdown waits for the broker to answer its last commit (and
/// tries again while a rebalance refuses it). With the brokers unreachable a
/// synchronous commit would wait on librdkafka's request timeouts, a minute
/// or more; what is not committed by then is replayed by the next owner.
const FINAL_COMMIT_WAIT: Duration = Duration::from_secs(2);

/// What [`SourceHandle::join`](crate::source::SourceHandle::join) allows the poll
/// thread past the drain: the final commit, the unsubscribe, and a second for
/// librdkafka's close. Past it the thread is left to finish on its own.
pub(in crate::source) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
