//! What the poll thread learns about the cluster for health and metrics,
//! without a call of its own to the brokers: whether one is reachable, each
//! assigned partition's committed offset, high watermark and lag, and the bytes
//! librdkafka holds prefetched.
//!
//! Both come from librdkafka's statistics, which its own thread gathers from the
//! fetch and commit responses it already gets and hands to the poll thread's
//! `poll` every [`STATISTICS_INTERVAL_MS`]; the poll thread only parses the
//! fields below. An `ALL_BROKERS_DOWN` error event marks the brokers down at
//! once; the next statistics with a broker up clears it. (rdkafka has no binding
//! for librdkafka's cached `get_watermark_offsets`, and `fetch_watermarks` is a
//! request to the broker that would block the poll thread.)

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use super::SourceStats;

/// How often librdkafka hands over statistics, unless the configuration's
/// `extra` sets `statistics.interval.ms` itself. 1 s: lag and broker state are
/// never older than a scrape interval needs, and building and parsing them
/// costs a few tens of microseconds a second for a few partitions (roughly
/// 1 KB of JSON per partition).
pub(super) const STATISTICS_INTERVAL_MS: &str = "1000";

/// One assigned partition's progress, as of librdkafka's last statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionProgress {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: i32,
    /// The group's committed offset (the next offset to read), as librdkafka
    /// last learned it (at assignment, then from each commit's answer); `None`
    /// before it knows one.
    pub committed: Option<i64>,
    /// The partition's high watermark (the offset the next message produced
    /// gets) from the last fetch answer; `None` before the first.
    pub high_watermark: Option<i64>,
    /// Messages not yet committed: the end of what may be read (the last stable
    /// offset, since the consumer reads committed transactions only) minus the
    /// committed offset; `None` while either is unknown.
    pub lag: Option<i64>,
}

/// The fields of librdkafka's statistics JSON that are read; the rest is skipped.
#[derive(serde::Deserialize)]
struct Statistics {
    #[serde(default)]
    brokers: HashMap<String, Broker>,
    #[serde(default)]
    topics: HashMap<String, Topic>,
}

#[derive(serde::Deserialize)]
struct Broker {
    #[serde(default)]
    state: String,
}

#[derive(serde::Deserialize)]
struct Topic {
    #[serde(default)]
    partitions: HashMap<String, Partition>,
}

#[derive(serde::Deserialize)]
struct Partition {
    partition: i32,
    /// Assigned to this consumer.
    #[serde(default)]
    desired: bool,
    #[serde(default = "invalid")]
    hi_offset: i64,
    #[serde(default = "invalid")]
    committed_offset: i64,
    #[serde(default = "invalid")]
    consumer_lag: i64,
    /// Bytes in the queue this partition's fetches land in. The consumer
    /// forwards every partition's fetch queue to its one queue, and librdkafka
    /// reports the forwarded queue's size for each: the largest of them is
    /// that queue, not a share of it.
    #[serde(default)]
    fetchq_size: u64,
}

fn invalid() -> i64 {
    -1
}

/// An `ALL_BROKERS_DOWN` error event: no broker is reachable now.
pub(super) fn all_brokers_down(stats: &SourceStats) {
    stats.brokers_down.store(true, Relaxed);
}

/// Applies one statistics report: broker reachability, and the progress of
/// the partitions assigned to this consumer (sorted, so scrapes are stable).
pub(super) fn on_statistics(
    json: &[u8],
    stats: &SourceStats,
    progress: &Mutex<Vec<PartitionProgress>>,
) {
    let parsed: Statistics = match serde_json::from_slice(json) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "Unreadable librdkafka statistics; skipped.");
            return;
        }
    };
    let up = parsed.brokers.values().any(|b| b.state == "UP");
    stats.brokers_down.store(!up, Relaxed);
    let prefetched = parsed
        .topics
        .values()
        .flat_map(|t| t.partitions.values())
        .map(|p| p.fetchq_size)
        .max()
        .unwrap_or(0);
    stats.prefetched_bytes.store(prefetched, Relaxed);
    stats.peak_prefetched_bytes.fetch_max(prefetched, Relaxed);
    let known = |v: i64| (v >= 0).then_some(v);
    let mut parts: Vec<PartitionProgress> = parsed
        .topics
        .into_iter()
        .flat_map(|(name, t)| {
            let topic: Arc<str> = Arc::from(name);
            t.partitions
                .into_values()
                // -1 is librdkafka's "unassigned" placeholder partition.
                .filter(|p| p.desired && p.partition >= 0)
                .map(move |p| PartitionProgress {
                    topic: Arc::clone(&topic),
                    partition: p.partition,
                    committed: known(p.committed_offset),
                    high_watermark: known(p.hi_offset),
                    lag: known(p.consumer_lag),
                })
        })
        .collect();
    parts.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    if let Ok(mut p) = progress.lock() {
        *p = parts;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields read, shaped as in librdkafka 2.12's report (one broker, one topic).
    const REPORT: &str = r#"{
      "name": "c#consumer-1", "type": "consumer", "ts": 1,
      "brokers": {
        "127.0.0.1:9092/bootstrap": {"name": "127.0.0.1:9092/bootstrap", "nodeid": -1, "state": "INIT"},
        "127.0.0.1:9092/1": {"name": "127.0.0.1:9092/1", "nodeid": 1, "state": "UP"}
      },
      "topics": {
        "t": {"topic": "t", "partitions": {
          "0": {"partition": 0, "desired": true, "hi_offset": 10, "ls_offset": 10,
                "committed_offset": 7, "consumer_lag": 3, "fetchq_size": 4096},
          "1": {"partition": 1, "desired": false, "hi_offset": 5,
                "committed_offset": -1001, "consumer_lag": -1, "fetchq_size": 4096},
          "2": {"partition": 2, "desired": true, "hi_offset": -1,
                "committed_offset": -1001, "consumer_lag": -1},
          "-1": {"partition": -1, "desired": false, "hi_offset": -1,
                 "committed_offset": -1001, "consumer_lag": -1}
        }}
      }
    }"#;

    #[test]
    fn statistics_give_the_assigned_partitions_progress_and_broker_state() {
        let stats = SourceStats::default();
        let progress = Mutex::new(Vec::new());
        all_brokers_down(&stats);
        on_statistics(REPORT.as_bytes(), &stats, &progress);
        assert!(!stats.brokers_down.load(Relaxed), "a broker is UP");
        // Each partition reports the one forwarded queue: not summed.
        assert_eq!(stats.prefetched_bytes.load(Relaxed), 4096);
        let p = progress.lock().unwrap().clone();
        assert_eq!(p.len(), 2, "only the assigned partitions: {p:?}");
        assert_eq!(
            (
                p[0].partition,
                p[0].committed,
                p[0].high_watermark,
                p[0].lag
            ),
            (0, Some(7), Some(10), Some(3))
        );
        assert_eq!((p[1].partition, p[1].committed, p[1].lag), (2, None, None));

        let down = REPORT.replace(r#""state": "UP""#, r#""state": "DOWN""#);
        on_statistics(down.as_bytes(), &stats, &progress);
        assert!(stats.brokers_down.load(Relaxed));

        let drained = REPORT.replace(r#""fetchq_size": 4096"#, r#""fetchq_size": 0"#);
        on_statistics(drained.as_bytes(), &stats, &progress);
        assert_eq!(stats.prefetched_bytes.load(Relaxed), 0);
        assert_eq!(stats.peak_prefetched_bytes.load(Relaxed), 4096);
    }

    #[test]
    fn an_unreadable_report_changes_nothing() {
        let stats = SourceStats::default();
        let progress = Mutex::new(Vec::new());
        on_statistics(REPORT.as_bytes(), &stats, &progress);
        on_statistics(b"{not json", &stats, &progress);
        assert_eq!(progress.lock().unwrap().len(), 2);
        assert!(!stats.brokers_down.load(Relaxed));
    }
}
