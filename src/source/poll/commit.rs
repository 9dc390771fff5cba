//! Committing: which commit points to send, sending them on schedule
//! (asynchronously), and the final commit that waits for the broker's answer.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::maps::completion_map;
use super::run::PollLoop;
use super::state::{PartKey, State};
#[cfg(doc)]
use crate::source::SourceHandle;

impl State {
    /// Commit points as a TPL: those that moved since the last commit, or with
    /// `force` every one (revoke and shutdown must not trust an async commit that
    /// may still be in flight or may have failed).
    pub(super) fn commit_list(
        &mut self,
        only: Option<&[PartKey]>,
        force: bool,
    ) -> Option<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), p) in &mut self.parts {
            if only.is_some_and(|o| !o.iter().any(|(t, q)| t == topic && q == partition)) {
                continue;
            }
            let Some(point) = p.tracker.commit_point() else {
                continue;
            };
            let done = p.tracker.finished_count();
            // A straggler holds the point while work behind it finishes: the
            // map changes, and is worth committing, though the point did not move.
            let map_moved = self.map_cap.is_some() && p.committed_done != done;
            if force || p.committed != Some(point) || map_moved {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(point));
                if let Some(cap) = self.map_cap {
                    let map = completion_map(p, point, cap);
                    if let Some(mut el) = tpl.find_partition(topic, *partition) {
                        el.set_metadata(map);
                    }
                }
                p.committed = Some(point);
                p.committed_done = done;
            }
        }
        (tpl.count() > 0).then_some(tpl)
    }

    /// Publishes the committed points for [`SourceHandle::committed`].
    pub(super) fn publish_committed(&self) {
        if let Ok(mut c) = self.committed.lock() {
            c.clear();
            c.extend(
                self.parts
                    .iter()
                    .filter_map(|((t, p), part)| part.committed.map(|o| (Arc::clone(t), *p, o))),
            );
        }
    }

    /// Forgets the commit points of `tpl` (an async commit not sent or refused),
    /// so the next round sends them again even if they have not moved.
    fn forget_committed(&mut self, tpl: &TopicPartitionList) {
        for el in tpl.elements() {
            self.forget_committed_part(&(Arc::from(el.topic()), el.partition()));
        }
    }

    pub(super) fn forget_committed_part(&mut self, key: &PartKey) {
        if let Some(p) = self.parts.get_mut(key) {
            p.committed = None;
        }
    }
}

impl PollLoop {
    pub(super) fn commit_async(&self, st: &mut State) {
        let Some(tpl) = st.commit_list(None, false) else {
            return;
        };
        match self.consumer.commit(&tpl, CommitMode::Async) {
            Ok(()) => {
                st.stats.commits.fetch_add(1, Relaxed);
                st.publish_committed();
            }
            Err(e) => {
                tracing::warn!(error = %e, "Async commit failed.");
                st.forget_committed(&tpl);
            }
        }
    }

    /// Commits `tpl` and waits for the broker's answer until `deadline`
    /// (messages polled meanwhile are dropped, never handled: every partition
    /// is paused). A refusal (a rebalance in progress) is tried again while
    /// there is time.
    ///
    /// The answer is the group's offsets read back, not the commit callback:
    /// this rust-rdkafka never delivers the answer of a manual async commit
    /// (fede1024/rust-rdkafka#856). The coordinator handles the read after the
    /// commit sent before it on the same connection, so one read decides.
    pub(super) fn commit_within(&self, tpl: &TopicPartitionList, deadline: Instant) {
        let ctx = self.consumer.context();
        loop {
            let failed_before = ctx.failed_commits.lock().map_or(0, |f| f.len());
            if let Err(e) = self.consumer.commit(tpl, CommitMode::Async) {
                tracing::warn!(error = %e, "Final commit not sent.");
                return;
            }
            let mut answer = self.read_back(tpl, deadline);
            // A refusal the callback did report (should a version deliver it).
            drop(self.consumer.poll(Duration::ZERO));
            if ctx.failed_commits.lock().map_or(0, |f| f.len()) > failed_before {
                answer = Answer::Refused;
            }
            match answer {
                Answer::Confirmed => {
                    ctx.stats.commits.fetch_add(1, Relaxed);
                    ctx.stats.final_commits_confirmed.fetch_add(1, Relaxed);
                    return;
                }
                Answer::Refused if Instant::now() + REFUSED_PAUSE < deadline => {
                    tracing::debug!("Final commit refused; retrying.");
                    std::thread::sleep(REFUSED_PAUSE);
                }
                answer => {
                    tracing::warn!(
                        ?answer,
                        "Final commit not confirmed in time: what finished since the last commit is replayed."
                    );
                    return;
                }
            }
        }
    }

    /// Reads the group's committed offsets of `sent`'s partitions (until
    /// `deadline`) and compares them with `sent`.
    fn read_back(&self, sent: &TopicPartitionList, deadline: Instant) -> Answer {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.consumer.committed_offsets(sent.clone(), left) {
            Ok(got) => {
                let same = sent.elements().iter().all(|el| {
                    got.find_partition(el.topic(), el.partition())
                        .is_some_and(|g| g.offset() == el.offset())
                });
                if same {
                    Answer::Confirmed
                } else {
                    Answer::Refused
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "Reading the committed offsets back failed.");
                Answer::Unknown
            }
        }
    }
}

/// What became of the final commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// The group's offsets are those sent.
    Confirmed,
    /// They are not (the coordinator refused the commit).
    Refused,
    /// No answer in time (the coordinator is unreachable).
    Unknown,
}

/// Pause before a refused final commit is sent again: a rebalance in
/// progress settles in a few hundred ms.
const REFUSED_PAUSE: Duration = Duration::from_millis(200);
