//! Static membership on a real broker (Tansu, SQLite storage): a rolling
//! restart of three static members (`group_instance_id`) over 8 partitions,
//! mid-stream, each restarted well inside the session timeout.
//!
//! Checked: no member sees a rebalance while another restarts (no revoke or
//! assign but the restarting member's own), the restarted member gets back the
//! very partitions it had, 0 missing, each partition's order kept, committed
//! = end offsets. Printed: for each restart, how long the member took to stop
//! and how long until it had its partitions again, beside the session timeout
//! it did not wait out. (The librdkafka mock cannot show this: it matches members by
//! member id only, so a restarted static member joins as a new one.)
//!
//! `cargo test --all-features --test membership_tansu -- --nocapture`
#![cfg(feature = "dev-stack")]

mod kafka_support;
mod membership_support;
#[macro_use]
mod tansu_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::source::Assignment;

use kafka_support::*;
use membership_support::wait_for;
use membership_support::*;
use tansu_support::Broker;

const TOPIC: &str = "rolling";
const GROUP: &str = "rolling";
const PARTITIONS: i32 = 8;
const N: u64 = 48_000;
/// With 8 lanes, about 30 s of stream: it outlasts the three restarts.
const WORK: Duration = Duration::from_millis(5);
/// Far longer than a restart here takes: a restart that waited it out shows.
const SESSION_TIMEOUT: Duration = Duration::from_secs(20);

/// The partitions `member` owns at the end of `log` (up to `until`).
fn owned_by(log: &[Seen], member: &str, until: Instant) -> BTreeSet<i32> {
    let mut owned = BTreeSet::new();
    for s in log {
        match s {
            Seen::Assigned {
                member: m,
                partitions,
                at,
            } if m == member && *at < until => owned.extend(partitions.iter().copied()),
            Seen::Revoked {
                member: m,
                partitions,
                at,
            } if m == member && *at < until => {
                for p in partitions {
                    owned.remove(p);
                }
            }
            _ => {}
        }
    }
    owned
}

#[test]
fn a_rolling_restart_of_static_members_rebalances_nothing_and_loses_nothing() {
    let bin = require_tansu!();
    let began = Instant::now();
    let broker = Broker::start(bin);
    broker.create_topic(TOPIC, PARTITIONS as u32);
    let brokers = broker.brokers();
    produce(&brokers, TOPIC, PARTITIONS, N, |i| event("ROLL", i));
    let ends = end_offsets(&brokers, TOPIC, PARTITIONS);
    assert_eq!(ends.values().sum::<i64>(), N as i64);
    let kafka = |name: &str| {
        let mut k = KafkaConsumerConfig::new(&brokers, TOPIC, "rolling")
            .with_group_id(GROUP)
            .with_group_instance_id(&format!("rolling-{name}"))
            .set("heartbeat.interval.ms", "500");
        k.session_timeout = SESSION_TIMEOUT;
        k
    };
    let log = Log::default();
    let names = ["a", "b", "c"];
    let mut members: Vec<_> = names
        .iter()
        .map(|n| member(kafka(n), Assignment::Eager, n, &log, WORK))
        .collect();
    let settled = |log: &Log| {
        let log = log.lock().unwrap();
        let now = Instant::now();
        let sets: Vec<_> = names.iter().map(|n| owned_by(&log, n, now)).collect();
        sets.iter().all(|s| !s.is_empty())
            && sets.iter().map(BTreeSet::len).sum::<usize>() == PARTITIONS as usize
    };
    wait_for(&members.iter().collect::<Vec<_>>(), "three members", || {
        settled(&log) && handled(&log) >= N as usize / 8
    });

    let mut figures = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let before = owned_by(&log.lock().unwrap(), name, Instant::now());
        let stopped = Instant::now();
        members[i].shutdown();
        members[i].join().unwrap();
        let away = stopped.elapsed();
        let restarted = Instant::now();
        members[i] = member(kafka(name), Assignment::Eager, name, &log, WORK);
        // Back: its partitions assigned again (the stream may have no event
        // left for them by then).
        let back = || {
            let log = log.lock().unwrap();
            log.iter().find_map(|s| match s {
                Seen::Assigned {
                    member,
                    partitions,
                    at,
                } if member == name && *at > restarted && !partitions.is_empty() => Some(*at),
                _ => None,
            })
        };
        wait_for(
            &members.iter().collect::<Vec<_>>(),
            "the restarted member",
            || back().is_some(),
        );
        let resumed = back().unwrap() - restarted;
        let log_now = log.lock().unwrap().clone();
        let after = owned_by(&log_now, name, Instant::now());
        // Any callback of another member from the stop on is a rebalance.
        let others: Vec<String> = log_now
            .iter()
            .filter_map(|s| match s {
                Seen::Assigned {
                    member,
                    at,
                    partitions,
                }
                | Seen::Revoked {
                    member,
                    at,
                    partitions,
                } if member != name && *at >= stopped => Some(format!("{member} {partitions:?}")),
                _ => None,
            })
            .collect();
        figures.push((
            name.to_string(),
            before.clone(),
            away,
            resumed,
            others.len(),
        ));
        assert_eq!(after, before, "{name} resumes its own partitions");
        assert!(others.is_empty(), "{name}'s restart rebalanced: {others:?}");
        let target = N as usize * (i + 2) / 5;
        wait_for(
            &members.iter().collect::<Vec<_>>(),
            "the stream to go on",
            || handled(&log) >= target,
        );
    }
    wait_for(
        &members.iter().collect::<Vec<_>>(),
        "every event, committed",
        || handled(&log) >= N as usize && committed(&brokers, GROUP, TOPIC, PARTITIONS) == ends,
    );
    for m in &members {
        m.shutdown();
    }
    for m in &members {
        m.join().unwrap();
    }
    drop(members);
    let log = log.lock().unwrap().clone();
    let (missing, out_of_order) = missing_and_out_of_order(&log, &ends);
    let handlings = log
        .iter()
        .filter(|s| matches!(s, Seen::Handled { .. }))
        .count();
    for (name, partitions, away, resumed, rebalances) in &figures {
        eprintln!(
            "rolling restart, static member {name} with {partitions:?}: stopped in {away:.0?}, \
             its partitions back {resumed:.0?} after its restart (session timeout {SESSION_TIMEOUT:?}), \
             {rebalances} rebalance callbacks at the other members"
        );
    }
    eprintln!(
        "rolling restart of 3 static members on {PARTITIONS} partitions, {N} events: {missing} \
         missing, {out_of_order} out of order, {} handled twice, committed = end offsets, {:.0?}",
        handlings - N as usize,
        began.elapsed()
    );
    assert_eq!(missing, 0, "every event handled");
    assert_eq!(out_of_order, 0, "each partition's order kept");
}
