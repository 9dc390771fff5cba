//! Completion maps: the previous owner's map read on assignment ([`Skip`]),
//! and the map written into each commit's metadata.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::rebalance::Context;
use super::state::{Part, PartKey};
use crate::offsets::progress;
use crate::source::SourceStats;

/// Longest wait for the committed offsets and their completion maps when
/// partitions are assigned (the poll thread waits; heartbeats go on in
/// librdkafka's threads). The coordinator answers in milliseconds; past this,
/// the maps are ignored and their offsets replayed.
const COMMITTED_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The completion map read on assignment, consumed as offsets arrive.
pub(super) struct Skip {
    /// The committed offset the map was written for.
    pub(super) base: i64,
    pub(super) ranges: std::collections::VecDeque<std::ops::Range<i64>>,
    pub(super) started: bool,
}

impl Skip {
    /// Whether `offset` (arriving in increasing order) finished before.
    pub(super) fn take(&mut self, offset: i64) -> bool {
        if !self.started {
            self.started = true;
            // Reading from before the map's commit point (an offset reset, a
            // recreated topic): the map is about other messages.
            if offset < self.base {
                tracing::warn!(
                    offset,
                    base = self.base,
                    "Completion map ignored: reading before its commit point."
                );
                self.ranges.clear();
            }
        }
        while self.ranges.front().is_some_and(|r| r.end <= offset) {
            self.ranges.pop_front();
        }
        self.ranges.front().is_some_and(|r| r.start <= offset)
    }
}

/// The metadata text for committing `p` at `point`: its finished offsets
/// above the point, and what is left of a previous owner's map beyond them.
pub(super) fn completion_map(p: &Part, point: i64, cap: usize) -> String {
    let finished = p.tracker.finished_above().map(|o| o..o + 1);
    let inherited = p.skip.iter().flat_map(|s| s.ranges.iter().cloned());
    let e = progress::encode_ranges(point, finished.chain(inherited), cap);
    if e.left_out > 0 {
        tracing::debug!(
            point,
            encoded = e.encoded,
            left_out = e.left_out,
            "Completion map cut to its cap."
        );
    }
    e.text
}

/// Reads the committed offsets of `tpl`'s partitions and decodes their
/// completion maps. A map that does not decode is ignored with a warning
/// (replayed, never skipped); a failed fetch ignores them all.
pub(super) fn read_completion_maps(
    consumer: &BaseConsumer<Context>,
    tpl: &TopicPartitionList,
    stats: &SourceStats,
) -> HashMap<PartKey, Skip> {
    let mut ask = TopicPartitionList::with_capacity(tpl.count());
    for e in tpl.elements() {
        ask.add_partition(e.topic(), e.partition());
    }
    let got = match consumer.committed_offsets(ask, COMMITTED_FETCH_TIMEOUT) {
        Ok(got) => got,
        Err(e) => {
            tracing::warn!(error = %e, "Committed offsets not read: completion maps ignored, their offsets replayed.");
            return HashMap::new();
        }
    };
    let mut maps = HashMap::new();
    for e in got.elements() {
        let Offset::Offset(base) = e.offset() else {
            continue;
        };
        // rdkafka panics on metadata that is not UTF-8 (another client's bytes).
        let text =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.metadata().to_owned()));
        let (topic, partition) = (e.topic(), e.partition());
        match text
            .map_err(|_| None)
            .and_then(|t| progress::decode(base, &t).map_err(Some))
        {
            Ok(map) if map.is_empty() => {}
            Ok(map) => {
                tracing::debug!(
                    topic,
                    partition,
                    base,
                    finished = map.len(),
                    "Completion map read."
                );
                maps.insert(
                    (Arc::from(topic), partition),
                    Skip {
                        base,
                        ranges: map.into_ranges().into(),
                        started: false,
                    },
                );
            }
            Err(error) => {
                stats.completion_maps_ignored.fetch_add(1, Relaxed);
                let error = error.map_or_else(|| "not UTF-8".to_owned(), |e| e.to_string());
                tracing::warn!(topic, partition, base, %error, "Completion map ignored: its offsets are replayed.");
            }
        }
    }
    // The list goes before the consumer can: a live list makes its destroy hang.
    drop(got);
    maps
}
