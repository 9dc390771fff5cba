//! Routing: a burst of polled messages copied once, tracked, and put in their
//! lanes.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};

use super::rebalance::Context;
use super::state::{Part, PartKey};
use crate::source::{Message, SourceOptions};

/// The header of a delay topic's message saying when it is due, in
/// milliseconds since the Unix epoch.
pub(crate) const NOT_BEFORE_HEADER: &str = "xzepr.retry.not_before";

/// Most messages taken from librdkafka per lock of the shared state.
const BURST: usize = 64;

/// Copies each message once, tracks its offset, puts it in its lane, hands
/// over what may run, and marks partitions to pause: over their tracking
/// limit (`to_pause`), or to pause and read again from an offset
/// (`to_rewind`): a delay topic's whose message is not due, and one whose
/// message does not fit in the buffer budget. False when the state is
/// poisoned.
pub(super) fn route(
    consumer: &BaseConsumer<Context>,
    o: &SourceOptions,
    topic_names: &mut HashMap<String, Arc<str>, crate::dispatch::TrustedState>,
    to_pause: &mut Vec<PartKey>,
    to_rewind: &mut Vec<(PartKey, i64)>,
    burst: Vec<BorrowedMessage<'_>>,
) -> bool {
    let ctx = consumer.context();
    let Ok(mut guard) = ctx.state.lock() else {
        return false;
    };
    let st = &mut *guard;
    // One clock read per burst: arrival ages are kept to 10 ms anyway.
    let now = Instant::now();
    let mut wall_ms = None;
    for m in burst {
        let topic = topic_arc(topic_names, m.topic());
        let Some(p) = st.parts.get_mut(&(Arc::clone(&topic), m.partition())) else {
            // A message for a partition we no longer own: the new owner reads it.
            continue;
        };
        let partition = m.partition();
        if p.delayed.is_some() {
            // Behind a message that is not due: read again after it, once due.
            continue;
        }
        if let Some(skip) = &mut p.skip {
            if skip.take(m.offset()) {
                // Finished by a previous owner: finished here, never dispatched.
                let _ = p.tracker.dispatched(m.offset());
                p.tracker.finished(m.offset());
                p.next = Some(m.offset() + 1);
                st.stats.skipped_done.fetch_add(1, Relaxed);
                continue;
            }
            if skip.ranges.is_empty() {
                p.skip = None;
            }
        }
        if p.delay {
            let wall = *wall_ms.get_or_insert_with(crate::source::age::wall_ms);
            if let Some(wait) = not_due(&m, wall) {
                p.delayed = Some(now + wait);
                st.delayed += 1;
                st.stats.delay_pauses.fetch_add(1, Relaxed);
                p.next = Some(m.offset());
                to_rewind.push(((topic, partition), m.offset()));
                continue;
            }
        }
        if p.held_back {
            // Behind a message that did not fit: read again from it.
            continue;
        }
        let cost = crate::source::message::cost_of(m.payload_len() + m.key_len());
        let p = if super::pause::plenty(&st.sched, o, cost) {
            p
        } else {
            // Past half the budget: each partition's own share counts.
            let (epoch, key) = (p.epoch, (Arc::clone(&topic), partition));
            let room = super::pause::fits(&st.sched, &st.parts, o, epoch, cost);
            let Some(p) = st.parts.get_mut(&key) else {
                continue;
            };
            if !room {
                // Left to librdkafka, never kept: its partition pauses and is
                // sought back to it, so the buffers never pass the budget.
                p.held_back = true;
                if !p.paused {
                    p.paused = true;
                    st.paused += 1;
                    st.stats.pauses.fetch_add(1, Relaxed);
                }
                p.next = Some(m.offset());
                to_rewind.push((key, m.offset()));
                continue;
            }
            p
        };
        let buf = st.recycle.take();
        let msg = copy_message(&m, Arc::clone(&topic), p, buf);
        drop(m);
        let _ = p.tracker.dispatched(msg.offset);
        p.next = Some(msg.offset + 1);
        p.arrivals.arrived(
            msg.offset,
            now,
            msg.timestamp.map(crate::source::Timestamp::millis),
        );
        st.sched.arrive(p.epoch, msg, &mut st.ready);
        // Past its tracking limit a partition pauses until its commit point
        // moves (the buffer budget is enforced between polls).
        if p.tracker.tracked() >= o.max_tracked && !p.paused {
            p.paused = true;
            st.paused += 1;
            to_pause.push((topic, partition));
        }
    }
    st.run_ready();
    st.publish_gauges();
    true
}

/// What librdkafka already holds, up to [`BURST`] messages (`poll(0)` after
/// the first does not wait), so the state lock is paid once per burst. The
/// first poll waits up to `wait`: nothing while jobs run (releases are waited
/// for on their channel instead).
pub(super) fn poll_burst(
    consumer: &BaseConsumer<Context>,
    wait: Duration,
) -> Vec<BorrowedMessage<'_>> {
    let mut burst = Vec::with_capacity(BURST);
    let mut wait = wait;
    while burst.len() < BURST {
        match consumer.poll(wait) {
            Some(Ok(m)) => burst.push(m),
            Some(Err(e)) => tracing::warn!(error = %e, "Poll error."),
            None => break,
        }
        wait = Duration::ZERO;
    }
    if !burst.is_empty() {
        consumer
            .context()
            .stats
            .polled
            .fetch_add(burst.len() as u64, Relaxed);
    }
    burst
}

/// How long until a delay topic's message is due, if it is not yet (no
/// not-before header, or one that does not read, is due now: it runs rather
/// than waits forever).
fn not_due(m: &BorrowedMessage<'_>, wall_ms: i64) -> Option<Duration> {
    let headers = m.headers()?;
    let due = headers
        .iter()
        .find(|h| h.key == NOT_BEFORE_HEADER)
        .and_then(|h| {
            std::str::from_utf8(h.value?)
                .ok()?
                .trim()
                .parse::<i64>()
                .ok()
        })?;
    let wait = due.checked_sub(wall_ms).filter(|w| *w > 0)?;
    Some(Duration::from_millis(u64::try_from(wait).ok()?))
}

/// The shared topic name for `name`, allocated once per topic.
fn topic_arc(
    names: &mut HashMap<String, Arc<str>, crate::dispatch::TrustedState>,
    name: &str,
) -> Arc<str> {
    match names.get(name) {
        Some(t) => Arc::clone(t),
        None => {
            let t: Arc<str> = Arc::from(name);
            names.insert(name.to_owned(), Arc::clone(&t));
            t
        }
    }
}

/// The one copy of a message out of librdkafka.
fn copy_message(m: &BorrowedMessage<'_>, topic: Arc<str>, p: &Part, mut data: Vec<u8>) -> Message {
    data.clear();
    let payload = m.payload();
    let key = m.key();
    data.extend_from_slice(payload.unwrap_or_default());
    data.extend_from_slice(key.unwrap_or_default());
    Message {
        data,
        payload_len: payload.map(<[u8]>::len),
        has_key: key.is_some(),
        headers: m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        topic,
        partition: m.partition(),
        offset: m.offset(),
        timestamp: crate::source::Timestamp::of(m.timestamp()),
        epoch: p.epoch,
        shared: Arc::clone(&p.shared),
        completed: false,
    }
}
