//! What the membership tests share: a group member (a pipeline with a sync
//! handler) that logs every handling and every assign and revoke it sees, and
//! the checks on those logs (nothing missing, each partition's order kept).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEvent;
use xzepr_consumer::dispatch::Ordering;
use xzepr_consumer::handler::{Handler, HandlerError, Work};
use xzepr_consumer::pipeline::{Pipeline, RunningPipeline};
use xzepr_consumer::source::Assignment;

/// Generous bound for "eventually" on a loaded machine; never a timing assertion.
pub const PATIENCE: Duration = Duration::from_secs(300);

/// One handling, or one rebalance callback, as a member saw it.
#[derive(Debug, Clone)]
pub enum Seen {
    Handled {
        member: String,
        partition: i32,
        offset: i64,
        at: Instant,
    },
    Assigned {
        member: String,
        partitions: Vec<i32>,
        at: Instant,
    },
    Revoked {
        member: String,
        partitions: Vec<i32>,
        at: Instant,
    },
}

/// What every member of one test writes to.
pub type Log = Arc<Mutex<Vec<Seen>>>;

/// A sync handler that logs, then works for `work` per event.
struct Logging {
    member: String,
    log: Log,
    work: Duration,
}

impl Handler for Logging {
    fn handle(&self, _: &CloudEvent<'_>, work: &mut Work) -> Result<(), HandlerError> {
        self.log.lock().unwrap().push(Seen::Handled {
            member: self.member.clone(),
            partition: work.partition(),
            offset: work.offset(),
            at: Instant::now(),
        });
        std::thread::sleep(self.work);
        Ok(())
    }

    fn on_assign(&self, partitions: &[(String, i32)]) {
        self.log.lock().unwrap().push(Seen::Assigned {
            member: self.member.clone(),
            partitions: partitions.iter().map(|p| p.1).collect(),
            at: Instant::now(),
        });
    }

    fn on_revoke(&self, partitions: &[(String, i32)]) {
        self.log.lock().unwrap().push(Seen::Revoked {
            member: self.member.clone(),
            partitions: partitions.iter().map(|p| p.1).collect(),
            at: Instant::now(),
        });
    }
}

/// Starts member `name` of `kafka`'s group.
pub fn member(
    kafka: KafkaConsumerConfig,
    assignment: Assignment,
    name: &str,
    log: &Log,
    work: Duration,
) -> RunningPipeline {
    Pipeline::builder(kafka)
        .assignment(assignment)
        .ordering(Ordering::PerPartition)
        .workers(8)
        .max_in_flight(64)
        .batch(8)
        .commit_interval(Duration::from_millis(100))
        .drain_timeout(Duration::from_secs(2))
        .start(Logging {
            member: name.to_owned(),
            log: Arc::clone(log),
            work,
        })
        .unwrap()
}

/// Waits for `done`, failing if a member stopped by itself.
pub fn wait_for(members: &[&RunningPipeline], what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        for m in members {
            assert!(
                !m.source().is_finished(),
                "a member stopped while waiting for {what}: {:?}",
                m.source().join()
            );
        }
        assert!(start.elapsed() < PATIENCE, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Distinct offsets handled so far.
pub fn handled(log: &Log) -> usize {
    let log = log.lock().unwrap();
    let set: BTreeSet<(i32, i64)> = log
        .iter()
        .filter_map(|s| match s {
            Seen::Handled {
                partition, offset, ..
            } => Some((*partition, *offset)),
            _ => None,
        })
        .collect();
    set.len()
}

/// Offsets never handled, and offsets whose first handling came before a
/// lower offset's of the same partition.
pub fn missing_and_out_of_order(log: &[Seen], ends: &HashMap<i32, i64>) -> (usize, usize) {
    let mut first: BTreeMap<i32, BTreeMap<i64, Instant>> = BTreeMap::new();
    for s in log {
        if let Seen::Handled {
            partition,
            offset,
            at,
            ..
        } = s
        {
            first
                .entry(*partition)
                .or_default()
                .entry(*offset)
                .or_insert(*at);
        }
    }
    let mut missing = 0;
    let mut out_of_order = 0;
    for (p, end) in ends {
        let seen = first.get(p).cloned().unwrap_or_default();
        missing += (0..*end).filter(|o| !seen.contains_key(o)).count();
        let times: Vec<Instant> = seen.values().copied().collect();
        out_of_order += times.windows(2).filter(|w| w[0] > w[1]).count();
    }
    (missing, out_of_order)
}

/// Event `i` of a test, small enough for the mock broker's retention.
pub fn event(prefix: &str, i: u64) -> Vec<u8> {
    format!(
        r#"{{"id":"{prefix}{i:012}","source":"xzepr.event.receiver.01SOMEONEELSE","specversion":"1.0.1","type":"deployment.completed","data":{{}}}}"#
    )
    .into_bytes()
}
