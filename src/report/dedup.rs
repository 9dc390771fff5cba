//! Coalescing and ordering per work id: which records are posted now, which
//! wait for their `started`, and which are answered from an earlier post.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::{Ack, Record, ReportError, ReporterConfig, Status};

/// A (work id, status) pair.
type Key = (String, Status);

#[derive(Default)]
pub(super) struct DedupState {
    /// Acknowledged keys with the event id XZepr gave them, oldest first in `order`.
    acked: HashMap<Key, Arc<str>>,
    order: VecDeque<Key>,
    /// Keys being posted, with the acks of duplicates that arrived meanwhile.
    pub(super) in_flight: HashMap<Key, Vec<Ack>>,
    /// Terminal records waiting for their work's `started`, which is in flight.
    pub(super) waiting: HashMap<String, Vec<Record>>,
    /// Work ids whose `started` failed for good, oldest first in `failed_order`.
    pub(super) failed_starts: std::collections::HashSet<String>,
    failed_order: VecDeque<String>,
}

/// What admission decided for a record.
pub(super) enum Admission {
    /// Post it.
    Post(Record),
    /// Acknowledge at once with this result (already acknowledged before).
    Done(Ack, Result<String, ReportError>),
    /// Parked: behind its `started`, or behind the same key in flight.
    Parked,
    /// A terminal record whose `started` failed for good: failed unsent.
    WithoutStarted(Ack),
}

impl DedupState {
    pub(super) fn admit(&mut self, record: Record) -> Admission {
        let key = (record.work.work_id.clone(), record.status);
        if let Some(id) = self.acked.get(&key) {
            return Admission::Done(record.ack, Ok(id.to_string()));
        }
        if let Some(followers) = self.in_flight.get_mut(&key) {
            followers.push(record.ack);
            return Admission::Parked;
        }
        if record.status != Status::Started
            && self
                .in_flight
                .contains_key(&(record.work.work_id.clone(), Status::Started))
        {
            self.waiting
                .entry(record.work.work_id.clone())
                .or_default()
                .push(record);
            return Admission::Parked;
        }
        if record.status != Status::Started && self.failed_starts.contains(&record.work.work_id) {
            return Admission::WithoutStarted(record.ack);
        }
        self.in_flight.insert(key, Vec::new());
        Admission::Post(record)
    }

    /// Records how a `started` ended, for the terminal records still to come.
    pub(super) fn started_ended(
        &mut self,
        config: &ReporterConfig,
        work_id: &str,
        acknowledged: bool,
    ) {
        if acknowledged {
            if self.failed_starts.remove(work_id) {
                self.failed_order.retain(|w| w != work_id);
            }
            return;
        }
        if config.failed_starts_capacity == 0 || !self.failed_starts.insert(work_id.to_owned()) {
            return;
        }
        self.failed_order.push_back(work_id.to_owned());
        while self.failed_order.len() > config.failed_starts_capacity {
            if let Some(old) = self.failed_order.pop_front() {
                self.failed_starts.remove(&old);
            }
        }
    }

    pub(super) fn remember(&mut self, config: &ReporterConfig, key: Key, id: &str) {
        if config.dedup_capacity == 0 {
            return;
        }
        if self.acked.insert(key.clone(), id.into()).is_none() {
            self.order.push_back(key);
            while self.order.len() > config.dedup_capacity {
                if let Some(old) = self.order.pop_front() {
                    self.acked.remove(&old);
                }
            }
        }
    }
}
