//! The consumer's [`Context`]: rebalance callbacks (assign reads completion
//! maps, revoke drains and commits), commit answers, and client errors.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, TopicPartitionList};

use super::maps::read_completion_maps;
use super::state::{retire, Part, PartKey, State};
use super::RebalanceHooks;
use crate::offsets::PartitionTracker;
use crate::source::start::StartPositions;
use crate::source::{PartShared, SourceError, SourceStats};

fn owned_partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

/// Our `ConsumerContext`: rebalances drain and commit; errors are recorded.
pub(super) struct Context {
    pub(super) hooks: Option<Arc<dyn RebalanceHooks>>,
    /// Whether assigned partitions' completion maps are read.
    pub(super) read_maps: bool,
    /// Whether the consumer is a static member (`group.instance.id`): its
    /// shutdown must not leave the group.
    pub(super) static_member: bool,
    /// `start_from`'s time lookup for partitions without a committed offset.
    pub(super) start: StartPositions,
    pub(super) state: Mutex<State>,
    pub(super) drain_timeout: Duration,
    pub(super) fatal: Mutex<Option<SourceError>>,
    pub(super) stats: Arc<SourceStats>,
    /// Published from librdkafka's statistics (see `watch`).
    pub(super) progress: Arc<Mutex<Vec<crate::source::PartitionProgress>>>,
    /// Partitions of async commits that failed, for the poll loop to send
    /// again: the callback may run while the state is locked (inside a sync
    /// commit), so it never takes that lock. This rust-rdkafka delivers no
    /// answer of a manual async commit (fede1024/rust-rdkafka#856): until it
    /// does, a refused periodic commit stands until its point moves, and the
    /// revoke's and shutdown's commits (sent whole, and confirmed) cover it.
    pub(super) failed_commits: Mutex<Vec<PartKey>>,
}

impl ClientContext for Context {
    fn stats_raw(&self, statistics: &[u8]) {
        crate::source::watch::on_statistics(statistics, &self.stats, &self.progress);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
            crate::source::watch::all_brokers_down(&self.stats);
        }
        let auth = matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::Authentication)
                | Some(rdkafka::types::RDKafkaErrorCode::SaslAuthenticationFailed)
        ) || reason.contains("SASL authentication error")
            || reason.contains("Authentication failed");
        if auth {
            tracing::error!(%error, reason, "Kafka authentication failed.");
            if let Ok(mut f) = self.fatal.lock() {
                f.get_or_insert(SourceError::Authentication {
                    reason: reason.to_owned(),
                });
            }
        } else {
            tracing::warn!(%error, reason, "Kafka client error.");
        }
    }
}

impl ConsumerContext for Context {
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        let Err(e) = result else { return };
        tracing::debug!(error = %e, "Commit failed; retrying at the next interval.");
        if let Ok(mut failed) = self.failed_commits.lock() {
            failed.extend(
                offsets
                    .elements()
                    .iter()
                    .map(|el| (Arc::from(el.topic()), el.partition())),
            );
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // The offsets set here are where librdkafka starts the partitions.
            if let Err(e) = self.start.before_assign(consumer, tpl) {
                tracing::error!(error = %crate::ErrorChain(&e), "Partitions paused: no start position.");
                if let Ok(mut f) = self.fatal.lock() {
                    f.get_or_insert(e);
                }
            }
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: Vec<PartKey> = tpl
                .elements()
                .iter()
                .map(|e| (Arc::from(e.topic()), e.partition()))
                .collect();
            self.revoke(consumer, &revoked);
            if let Some(hooks) = &self.hooks {
                hooks.revoked(&owned_partitions(tpl));
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // librdkafka keeps a partition's pause through a rebalance that
            // gives it back, and its new state here starts unpaused: one paused
            // over its share (or a delay topic's, until due) when revoked would
            // never be read again. Before `after_assign`, which pauses those
            // without a start position.
            if tpl.count() > 0 {
                if let Err(e) = consumer.resume(tpl) {
                    tracing::warn!(error = %e, "Resume of assigned partitions failed.");
                }
            }
            self.start.after_assign(consumer);
            // Before any message of these partitions is routed (this runs
            // inside `poll`, on the poll thread), so none runs that the map skips.
            let mut maps = if self.read_maps && tpl.count() > 0 {
                read_completion_maps(consumer, tpl, &self.stats)
            } else {
                HashMap::new()
            };
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            for e in tpl.elements() {
                st.epochs += 1;
                let epoch = st.epochs;
                let key = (Arc::from(e.topic()), e.partition());
                let shared = Arc::new(PartShared {
                    current: AtomicU64::new(epoch),
                    done: st.done.clone(),
                    cancel: tokio_util::sync::CancellationToken::new(),
                    recycle: Arc::clone(&st.recycle),
                });
                let skip = maps.remove(&key);
                let delay = st.delay_topics.iter().any(|t| t == e.topic());
                // librdkafka resumes assigned partitions from the committed offsets.
                st.parts.insert(
                    key,
                    Part {
                        tracker: PartitionTracker::new(),
                        epoch,
                        shared,
                        paused: false,
                        committed: None,
                        committed_done: 0,
                        skip,
                        watch: crate::source::stall::StallWatch::new(Instant::now()),
                        arrivals: crate::source::age::Arrivals::default(),
                        delay,
                        delayed: None,
                        held_back: false,
                        next: None,
                    },
                );
            }
            self.stats.assigned.store(st.parts.len() as u64, Relaxed);
            self.stats.group_joined.store(true, Relaxed);
            drop(st);
            tracing::debug!(partitions = tpl.count(), "Partitions assigned.");
            if let Some(hooks) = &self.hooks {
                hooks.assigned(&owned_partitions(tpl));
            }
        }
    }
}

impl Context {
    /// Drops the revoked partitions' waiting messages, drains their running work
    /// (up to the deadline), commits their contiguous points synchronously,
    /// cancels what still runs and marks it stale.
    fn revoke(&self, consumer: &BaseConsumer<Self>, revoked: &[PartKey]) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let deadline = Instant::now() + self.drain_timeout;
        st.drop_waiting(|key| revoked.contains(key));
        st.drain_in_flight(deadline, |key| revoked.contains(key));
        if let Some(tpl) = st.commit_list(Some(revoked), true) {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                // librdkafka's mock broker refuses commits while the group prepares
                // a rebalance (a real broker accepts them from the current
                // generation): the last async commit stands, and more is replayed.
                self.stats.revoke_commit_failures.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "Commit on revoke failed.");
            } else {
                self.stats.commits.fetch_add(1, Relaxed);
            }
        }
        st.publish_committed();
        for key in revoked {
            if let Some(p) = st.parts.remove(key) {
                if p.paused {
                    st.paused -= 1;
                }
                if p.delayed.is_some() {
                    st.delayed -= 1;
                }
                retire(&p);
                let mut ready = std::mem::take(&mut st.ready);
                drop(st.sched.remove_part(p.epoch, &mut ready));
                st.ready = ready;
            }
        }
        st.run_ready();
        st.publish_gauges();
        let timeout = st.stall_timeout;
        st.watch_partitions(timeout);
        self.stats.assigned.store(st.parts.len() as u64, Relaxed);
        tracing::debug!(partitions = revoked.len(), "Partitions revoked.");
    }
}
