//! A member joining mid-stream, under eager and under cooperative assignment,
//! on librdkafka's mock cluster (it relays the members' own assignment, so
//! cooperative-sticky's two-step handover runs as against a real broker).
//!
//! Member `a` owns all 8 partitions and is an eighth through 32,000 events
//! when `b` joins. Under eager, the join revokes every partition of `a`, so
//! everything stops while the group rebalances; under cooperative, `a` gives
//! up only the partitions that move to `b`, and the ones it keeps go on being
//! handled. Both: 0 missing, each partition's order kept across owners,
//! committed = end offsets. Printed for each: what `a` handled on the
//! partitions it kept while `b` waited for its assignment, and the longest
//! pause of those partitions.
//!
//! `cargo test --all-features --test membership_mock -- --nocapture`
#![cfg(feature = "dev-stack")]

mod kafka_support;
mod membership_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::source::Assignment;

use kafka_support::*;
use membership_support::wait_for;
use membership_support::*;

const PARTITIONS: i32 = 8;
const N: u64 = 32_000;
/// Each event's work: long enough that the stream outlasts the rebalances.
const WORK: Duration = Duration::from_millis(2);
/// The mock waits this less a second for every member to join again before
/// it assigns, so it bounds each rebalance here.
const SESSION_TIMEOUT: Duration = Duration::from_secs(3);

struct Figures {
    /// The partitions `a` owned before and after `b` joined.
    kept: BTreeSet<i32>,
    /// What `a` revoked, callback by callback, after `b` joined.
    revokes: Vec<BTreeSet<i32>>,
    /// From `b`'s start to its first partitions.
    window: Duration,
    /// Handlings by `a` of the kept partitions inside the window.
    kept_handled: usize,
    /// Longest time inside the window with no handling of a kept partition.
    longest_pause: Duration,
    missing: usize,
    out_of_order: usize,
    duplicates: usize,
}

fn scenario(assignment: Assignment) -> Figures {
    let name = format!("{assignment:?}").to_lowercase();
    let topic = format!("join-{name}");
    let group = format!("join-{name}");
    let cluster = cluster(&topic, PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, &topic, PARTITIONS, N, |i| event("JOIN", i));
    let ends = end_offsets(&brokers, &topic, PARTITIONS);
    let kafka = || {
        let mut k = KafkaConsumerConfig::new(&brokers, &topic, "join")
            .with_group_id(&group)
            .set("heartbeat.interval.ms", "200");
        k.session_timeout = SESSION_TIMEOUT;
        k
    };
    let log = Log::default();
    let a = member(kafka(), assignment, "a", &log, WORK);
    wait_for(&[&a], "a to handle an eighth", || {
        handled(&log) >= N as usize / 8
    });
    let joined = Instant::now();
    let b = member(kafka(), assignment, "b", &log, WORK);
    let b_assigned = || {
        log.lock().unwrap().iter().find_map(|s| match s {
            Seen::Assigned {
                member,
                partitions,
                at,
            } if member == "b" && !partitions.is_empty() => Some(*at),
            _ => None,
        })
    };
    wait_for(&[&a, &b], "b's partitions", || b_assigned().is_some());
    let b_at = b_assigned().unwrap();
    wait_for(&[&a, &b], "every event, committed", || {
        handled(&log) >= N as usize && committed(&brokers, &group, &topic, PARTITIONS) == ends
    });
    // What the shutdown below revokes is no rebalance.
    let done = Instant::now();
    a.shutdown();
    b.shutdown();
    a.join().unwrap();
    b.join().unwrap();
    drop((a, b));

    let log = log.lock().unwrap().clone();
    // `a`'s ownership, replayed from its callbacks.
    let mut owned = BTreeSet::new();
    let mut revokes = Vec::new();
    for s in &log {
        match s {
            Seen::Assigned {
                member,
                partitions,
                at,
            } if member == "a" && *at < done => owned.extend(partitions.iter().copied()),
            Seen::Revoked {
                member,
                partitions,
                at,
            } if member == "a" && *at < done => {
                for p in partitions {
                    owned.remove(p);
                }
                if *at >= joined {
                    revokes.push(partitions.iter().copied().collect());
                }
            }
            _ => {}
        }
    }
    let kept = owned;
    let mut times: Vec<Instant> = log
        .iter()
        .filter_map(|s| match s {
            Seen::Handled {
                member,
                partition,
                at,
                ..
            } if member == "a" && kept.contains(partition) && *at >= joined && *at <= b_at => {
                Some(*at)
            }
            _ => None,
        })
        .collect();
    times.sort();
    let mut edges = vec![joined];
    edges.extend(times.iter().copied());
    edges.push(b_at);
    let longest_pause = edges
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap_or_default();
    let (missing, out_of_order) = missing_and_out_of_order(&log, &ends);
    let handlings = log
        .iter()
        .filter(|s| matches!(s, Seen::Handled { .. }))
        .count();
    Figures {
        kept,
        revokes,
        window: b_at - joined,
        kept_handled: times.len(),
        longest_pause,
        missing,
        out_of_order,
        duplicates: handlings - N as usize,
    }
}

#[test]
fn a_join_under_cooperative_assignment_stops_only_the_partitions_that_move() {
    let began = Instant::now();
    let eager = scenario(Assignment::Eager);
    let cooperative = scenario(Assignment::Cooperative);
    for (name, f) in [("eager", &eager), ("cooperative", &cooperative)] {
        eprintln!(
            "join mid-stream, {name}: a kept {:?}; revoked {:?}; b waited {:.0?} for its \
             partitions, during which a handled {} events of the partitions it kept (longest \
             pause {:.0?}); {} missing, {} out of order, {} handled twice",
            f.kept,
            f.revokes,
            f.window,
            f.kept_handled,
            f.longest_pause,
            f.missing,
            f.out_of_order,
            f.duplicates
        );
        assert_eq!(f.missing, 0, "{name}: every event handled");
        assert_eq!(f.out_of_order, 0, "{name}: each partition's order kept");
        assert!(!f.kept.is_empty(), "{name}: a kept partitions");
        assert!(f.kept.len() < PARTITIONS as usize, "{name}: b got some");
    }
    let all: BTreeSet<i32> = (0..PARTITIONS).collect();
    assert_eq!(
        eager.revokes.first(),
        Some(&all),
        "eager: the join revokes every partition of a"
    );
    for r in &cooperative.revokes {
        assert!(
            r.is_disjoint(&cooperative.kept),
            "cooperative: a revoked only partitions that moved: {r:?}, kept {:?}",
            cooperative.kept
        );
    }
    assert!(
        !cooperative.revokes.is_empty(),
        "cooperative: the moved partitions were revoked"
    );
    eprintln!("both scenarios in {:.0?}", began.elapsed());
}
