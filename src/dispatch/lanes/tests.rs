//! The scheduler's order, bounds and rate rules.

use super::*;
use crate::flow_control::RateLimit;
use crate::offsets::PartitionTracker;
use proptest::prelude::*;
use std::collections::{BTreeSet, HashSet};

#[derive(Debug, Clone, PartialEq)]
struct Ev {
    part: u64,
    key: Option<u8>,
    offset: i64,
}

impl Item for Ev {
    fn key(&self) -> Option<&[u8]> {
        self.key.as_ref().map(std::slice::from_ref)
    }
    fn cost(&self) -> usize {
        10
    }
}

fn ev(part: u64, key: Option<u8>, offset: i64) -> Ev {
    Ev { part, key, offset }
}

#[test]
fn keys_that_collide_in_any_hash_still_run_apart() {
    let mut s = Scheduler::new(Ordering::PerKey, 8, 4);
    let mut ready = Vec::new();
    for (i, k) in [1u8, 2, 1, 2].into_iter().enumerate() {
        s.arrive(0, ev(0, Some(k), i as i64), &mut ready);
    }
    // One job per key; each key's second event waits for its own lane only.
    assert_eq!(ready.len(), 2);
    assert_eq!(s.buffered(), 4);
    let first = ready.remove(0);
    assert_eq!(first.items, vec![ev(0, Some(1), 0)]);
    assert!(s.release(first.lane, &mut ready));
    assert!(!s.release(first.lane, &mut ready), "released twice");
    assert_eq!(ready.last().unwrap().items, vec![ev(0, Some(1), 2)]);
}

#[test]
fn a_busy_lane_batches_what_waits_and_room_is_shared_fairly() {
    let mut s = Scheduler::new(Ordering::PerPartition, 1, 3);
    let mut ready = Vec::new();
    for o in 0..5 {
        s.arrive(7, ev(7, None, o), &mut ready);
    }
    s.arrive(8, ev(8, None, 0), &mut ready);
    assert_eq!(ready.len(), 1, "max_in_flight 1");
    let j = ready.pop().unwrap();
    assert_eq!(j.items.len(), 1);
    s.release(j.lane, &mut ready);
    // Partition 8 waited first: it runs before partition 7's next batch.
    let j = ready.pop().unwrap();
    assert_eq!(j.items, vec![ev(8, None, 0)]);
    s.release(j.lane, &mut ready);
    let j = ready.pop().unwrap();
    assert_eq!(
        j.items.iter().map(|e| e.offset).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(s.peak_in_flight(), 1);
}

#[test]
fn removing_a_partition_returns_its_waiting_events_and_counts_its_running_job_until_released() {
    let mut s = Scheduler::new(Ordering::PerKey, 1, 1);
    let mut ready = Vec::new();
    s.arrive(1, ev(1, Some(0), 0), &mut ready);
    s.arrive(1, ev(1, Some(0), 1), &mut ready);
    s.arrive(2, ev(2, None, 0), &mut ready);
    let running = ready.pop().unwrap();
    let dropped = s.remove_part(1, &mut ready);
    assert_eq!(dropped, vec![ev(1, Some(0), 1)]);
    // The running job may still sit in an executor's queue: its room is
    // not handed out until it is released.
    assert!(ready.is_empty());
    assert_eq!((s.in_flight(), s.buffered()), (1, 2));
    assert!(s.release(running.lane, &mut ready));
    assert_eq!(ready.pop().unwrap().items, vec![ev(2, None, 0)]);
    // Released once: a second release of the stale job is ignored.
    assert!(!s.release(running.lane, &mut ready));
    assert_eq!((s.in_flight(), s.buffered()), (1, 1));
}

#[test]
fn a_rate_limit_hands_out_only_its_tokens_and_the_rest_waits_in_order() {
    // Three tokens and (for the test's length) no refill.
    let rate = RateLimit::per_second(0.001).with_burst(3);
    let mut s = Scheduler::new(Ordering::Unordered, 100, 8).with_rate_limit(Some(&rate));
    let mut ready = Vec::new();
    for o in 0..10 {
        s.arrive(0, ev(0, None, o), &mut ready);
    }
    let ran: Vec<i64> = ready
        .iter()
        .flat_map(|j| j.items.iter().map(|e| e.offset))
        .collect();
    assert_eq!(ran, [0, 1, 2]);
    assert!(s.waiting_for_tokens());
    assert_eq!((s.buffered(), s.tokens_granted()), (10, 3));
    for j in std::mem::take(&mut ready) {
        s.release(j.lane, &mut ready);
    }
    s.refill(&mut ready);
    assert!(
        ready.is_empty(),
        "no token came: nothing runs, nothing is lost"
    );
    assert_eq!(s.buffered(), 7);
}

#[test]
fn per_key_tokens_stop_a_lane_at_its_first_key_without_one() {
    let rate = RateLimit::per_second(0.001).with_burst(1).per_key(16);
    let mut s = Scheduler::new(Ordering::PerPartition, 4, 8).with_rate_limit(Some(&rate));
    let mut ready = Vec::new();
    // One partition lane: a, a, b. The second `a` has no token, so `b`
    // (behind it in offset order) waits too.
    s.arrive(0, ev(0, Some(1), 0), &mut ready);
    let first = ready.pop().unwrap();
    s.arrive(0, ev(0, Some(1), 1), &mut ready);
    s.arrive(0, ev(0, Some(2), 2), &mut ready);
    s.release(first.lane, &mut ready);
    assert!(ready.is_empty());
    assert!(s.waiting_for_tokens());
    // Another partition's key still has its own token.
    s.arrive(1, ev(1, Some(2), 0), &mut ready);
    assert!(ready.is_empty(), "behind the lane waiting for tokens");
    s.refill(&mut ready);
    assert_eq!(ready.pop().unwrap().items, vec![ev(1, Some(2), 0)]);
    assert_eq!(s.tokens_granted(), 2);
}

#[derive(Debug, Clone)]
enum Op {
    Arrive {
        part: u64,
        key: Option<u8>,
    },
    /// Release the n-th running job (modulo how many run).
    Release(usize),
    Revoke(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..3, proptest::option::weighted(0.8, 0u8..6))
            .prop_map(|(part, key)| Op::Arrive { part, key }),
        3 => any::<usize>().prop_map(Op::Release),
        1 => (0u64..3).prop_map(Op::Revoke),
    ]
}

fn ordering() -> impl Strategy<Value = Ordering> {
    prop_oneof![
        Just(Ordering::PerPartition),
        Just(Ordering::PerKey),
        Just(Ordering::Unordered)
    ]
}

/// The lane an event must be serialised in, or None when unordered.
fn order_key(o: Ordering, e: &Ev) -> Option<(u64, Option<u8>)> {
    match o {
        Ordering::PerPartition => Some((e.part, None)),
        Ordering::PerKey => Some((e.part, e.key)),
        Ordering::Unordered => None,
    }
}

proptest! {
    /// For any interleaving of arrivals, completions and revokes: handler
    /// starts keep offset order within a key (partition), never two jobs of
    /// one key (partition) run at once, never more than `max_in_flight`, every
    /// event runs once (or is handed back on revoke), and a tracker fed the
    /// same arrivals and completions never commits past an unfinished offset.
    #[test]
    fn lanes_keep_order_bounds_and_commit_safety(
        ord in ordering(),
        max in 1usize..6,
        batch in 1usize..4,
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let mut s = Scheduler::new(ord, max, batch);
        let mut running: Vec<Job<Ev>> = Vec::new();
        // Jobs of revoked partitions, still counted until released.
        let mut stale: Vec<Job<Ev>> = Vec::new();
        let mut ready = Vec::new();
        let mut next_offset = [0i64; 3];
        let mut trackers: Vec<PartitionTracker> = (0..3).map(|_| PartitionTracker::new()).collect();
        let mut last_started: HashMap<(u64, Option<u8>), i64> = HashMap::new();
        let mut unfinished: [BTreeSet<i64>; 3] = Default::default();
        let mut seen = HashSet::new();
        let check_ready = |ready: &mut Vec<Job<Ev>>, running: &mut Vec<Job<Ev>>,
                           last: &mut HashMap<(u64, Option<u8>), i64>,
                           seen: &mut HashSet<(u64, i64)>| -> Result<(), TestCaseError> {
            for job in ready.drain(..) {
                prop_assert!(!job.items.is_empty());
                for e in &job.items {
                    prop_assert!(seen.insert((e.part, e.offset)), "ran twice");
                    if let Some(k) = order_key(ord, e) {
                        if let Some(&prev) = last.get(&k) {
                            prop_assert!(prev < e.offset, "out of order in {:?}", k);
                        }
                        last.insert(k, e.offset);
                        // Never two jobs of one lane key at once.
                        for r in running.iter() {
                            prop_assert!(r.items.iter().all(|x| order_key(ord, x) != Some(k)));
                        }
                    }
                }
                running.push(job);
            }
            Ok(())
        };
        for op in ops {
            match op {
                Op::Arrive { part, key } => {
                    let o = next_offset[part as usize];
                    next_offset[part as usize] += 1;
                    trackers[part as usize].dispatched(o).unwrap();
                    unfinished[part as usize].insert(o);
                    s.arrive(part, ev(part, key, o), &mut ready);
                }
                Op::Release(n) if n % 4 == 3 && !stale.is_empty() => {
                    // A revoked partition's job ends: its room comes back.
                    let job = stale.remove(n % stale.len());
                    prop_assert!(s.release(job.lane, &mut ready));
                }
                Op::Release(n) if !running.is_empty() => {
                    let job = running.remove(n % running.len());
                    for e in &job.items {
                        trackers[e.part as usize].finished(e.offset);
                        unfinished[e.part as usize].remove(&e.offset);
                    }
                    s.release(job.lane, &mut ready);
                }
                Op::Release(_) => {}
                Op::Revoke(part) => {
                    let (gone, kept) = running.drain(..).partition(|j| j.items[0].part == part);
                    running = kept;
                    stale.extend(gone);
                    let _ = s.remove_part(part, &mut ready);
                    // A new assignment: fresh tracker, offsets go on.
                    trackers[part as usize] = PartitionTracker::new();
                    unfinished[part as usize].clear();
                    last_started.retain(|k, _| k.0 != part);
                    let _ = seen.len();
                }
            }
            check_ready(&mut ready, &mut running, &mut last_started, &mut seen)?;
            prop_assert!(s.in_flight() <= max);
            prop_assert_eq!(s.in_flight(), running.len() + stale.len());
            for p in 0..3 {
                if let (Some(point), Some(&first)) = (trackers[p].commit_point(), unfinished[p].iter().next()) {
                    prop_assert!(point <= first, "commit {} past unfinished {}", point, first);
                }
            }
        }
        // Drain: everything that arrived and was not revoked runs.
        for job in std::mem::take(&mut stale) {
            prop_assert!(s.release(job.lane, &mut ready));
            check_ready(&mut ready, &mut running, &mut last_started, &mut seen)?;
        }
        while let Some(job) = running.pop() {
            s.release(job.lane, &mut ready);
            check_ready(&mut ready, &mut running, &mut last_started, &mut seen)?;
        }
        prop_assert_eq!(s.in_flight(), 0);
        prop_assert_eq!(s.buffered(), 0);
        prop_assert_eq!(s.buffered_bytes(), 0);
        // Only partitions' own lanes stay, idle, until their partition goes.
        prop_assert!(s.lanes() <= 3);
    }
}
