//! The lane scheduler: the one piece of code that decides what may run next.
//!
//! Every event that arrives from Kafka joins a **lane**, chosen by the
//! [`Ordering`]: its partition's lane (`PerPartition`), its key's lane within its
//! partition (`PerKey`, keys compared by their bytes; keyless events share their
//! partition's keyless lane), or a lane of its own (`Unordered`). A lane runs at
//! most one [`Job`] at a time, so events of a lane are handled one after another
//! in offset order, while different lanes run concurrently, up to
//! `max_in_flight` jobs at once. A job is a batch of up to `batch` of the lane's
//! waiting events, run in order by one executor: a busy lane costs one round trip
//! per batch, not per event.
//!
//! ```text
//!  arrive ──> lane (partition | key | own) ──┬─ lane idle, room ──> Job ──> executor
//!                                            └─ lane busy or no room: waits in the lane
//!  release(lane) ──> next batch of that lane, or the next lane waiting for room (FIFO)
//! ```
//!
//! Nothing here blocks or allocates per event beyond the lane's `VecDeque` growth
//! and a new lane's key copy. Memory is bounded by the caller: every event counts
//! against [`Scheduler::buffered_bytes`] from its arrival until its job's lane is
//! released, and the source pauses the partitions that keep arriving while that
//! is over its budget.
//!
//! ```
//! use xzepr_consumer::dispatch::lanes::{Item, Scheduler};
//! use xzepr_consumer::dispatch::Ordering;
//!
//! struct Ev(&'static str, i64);
//! impl Item for Ev {
//!     fn key(&self) -> Option<&[u8]> { Some(self.0.as_bytes()) }
//!     fn cost(&self) -> usize { 1 }
//! }
//!
//! let mut s = Scheduler::new(Ordering::PerKey, 2, 8);
//! let mut ready = Vec::new();
//! s.arrive(0, Ev("a", 0), &mut ready);
//! s.arrive(0, Ev("a", 1), &mut ready);   // waits: key "a" is busy
//! s.arrive(0, Ev("b", 2), &mut ready);   // another key runs at once
//! assert_eq!(ready.len(), 2);
//! let a = ready.remove(0);
//! s.release(a.lane, &mut ready);          // "a" done: its next event may run
//! assert_eq!(ready.last().unwrap().items[0].1, 1);
//! ```

use std::collections::{HashMap, VecDeque};

use super::Ordering;

/// What the scheduler needs to know of an event.
pub trait Item {
    /// The Kafka message key (used under [`Ordering::PerKey`]).
    fn key(&self) -> Option<&[u8]>;
    /// What the event counts against the buffer budget, in bytes.
    fn cost(&self) -> usize;
}

/// A lane's running job, as named in a [`Job`]; releasing it lets the lane's
/// next batch run. Stale ids (an earlier job, a lane removed with its
/// partition) are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LaneId {
    slot: u32,
    gen: u32,
}

/// Events of one lane to run now, in order, then [`Scheduler::release`] the lane.
#[derive(Debug)]
pub struct Job<T> {
    /// The lane to release when every item has been handled.
    pub lane: LaneId,
    /// The events, in offset order.
    pub items: Vec<T>,
}

#[derive(Debug)]
struct Lane<T> {
    gen: u32,
    live: bool,
    part: u64,
    key: LaneKey,
    busy: bool,
    /// Its partition was removed while its job ran: the job still counts (in
    /// flight and buffered) until its release, then the lane goes.
    orphan: bool,
    /// In `runnable`, waiting for room under `max_in_flight`.
    queued: bool,
    /// What the running job's items count (released with the lane).
    busy_cost: usize,
    busy_items: usize,
    waiting: VecDeque<T>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LaneKey {
    /// The partition's lane (`PerPartition`), or its keyless lane (`PerKey`).
    Whole,
    Key(Box<[u8]>),
    /// `Unordered`: a lane of one event.
    Own,
}

/// Partition ids are the source's own: hashed fast.
type PartMap = HashMap<u64, PartLanes, super::TrustedState>;

/// Spare job vectors kept for reuse (see [`Scheduler::recycle`]).
const SPARE_JOBS: usize = 1024;

#[derive(Debug, Default)]
struct PartLanes {
    whole: Option<u32>,
    by_key: HashMap<Box<[u8]>, u32>,
    buffered: usize,
    buffered_bytes: usize,
}

/// Lanes, the jobs running, and what waits; see the [module docs](self).
#[derive(Debug)]
pub struct Scheduler<T> {
    ordering: Ordering,
    max_in_flight: usize,
    batch: usize,
    slots: Vec<Lane<T>>,
    free: Vec<u32>,
    parts: PartMap,
    /// Emptied job vectors, handed back with their releases.
    spare: Vec<Vec<T>>,
    /// Lanes with waiting events and no room to run, oldest first.
    runnable: VecDeque<LaneId>,
    busy: usize,
    buffered: usize,
    buffered_bytes: usize,
    peak_busy: usize,
    peak_buffered_bytes: usize,
}

impl<T: Item> Scheduler<T> {
    /// A scheduler running at most `max_in_flight` jobs at once, each of at most
    /// `batch` events (both at least 1).
    pub fn new(ordering: Ordering, max_in_flight: usize, batch: usize) -> Self {
        Scheduler {
            ordering,
            max_in_flight: max_in_flight.max(1),
            batch: batch.max(1),
            slots: Vec::new(),
            free: Vec::new(),
            parts: PartMap::default(),
            spare: Vec::new(),
            runnable: VecDeque::new(),
            busy: 0,
            buffered: 0,
            buffered_bytes: 0,
            peak_busy: 0,
            peak_buffered_bytes: 0,
        }
    }

    /// An event of partition `part` (any id the caller keeps unique per
    /// assignment) arrives. Jobs that may run now are pushed to `ready`.
    pub fn arrive(&mut self, part: u64, item: T, ready: &mut Vec<Job<T>>) {
        let cost = item.cost();
        self.buffered += 1;
        self.buffered_bytes += cost;
        self.peak_buffered_bytes = self.peak_buffered_bytes.max(self.buffered_bytes);
        let slot = self.lane_for(part, item.key());
        let p = self.parts.entry(part).or_default();
        p.buffered += 1;
        p.buffered_bytes += cost;
        let lane = &mut self.slots[slot as usize];
        lane.waiting.push_back(item);
        if lane.busy || lane.queued {
            return;
        }
        let id = LaneId {
            slot,
            gen: lane.gen,
        };
        if self.busy < self.max_in_flight {
            self.dispatch(slot, ready);
        } else {
            lane.queued = true;
            self.runnable.push_back(id);
        }
    }

    /// The job of `lane` finished: its events stop counting, and what may run
    /// next is pushed to `ready`. Returns false (and changes nothing) for a lane
    /// that is not running (stale, or released twice).
    pub fn release(&mut self, lane: LaneId, ready: &mut Vec<Job<T>>) -> bool {
        let Some(l) = self.slots.get_mut(lane.slot as usize) else {
            return false;
        };
        if !l.live || l.gen != lane.gen || !l.busy {
            return false;
        }
        l.busy = false;
        self.busy -= 1;
        let (cost, items, part, orphan) = (l.busy_cost, l.busy_items, l.part, l.orphan);
        l.busy_cost = 0;
        l.busy_items = 0;
        self.buffered -= items;
        self.buffered_bytes -= cost;
        // An orphan's partition already stopped counting it (and its id may
        // name a later assignment).
        if !orphan {
            if let Some(p) = self.parts.get_mut(&part) {
                p.buffered -= items;
                p.buffered_bytes -= cost;
            }
        }
        if orphan {
            self.free_lane(lane.slot);
        } else if l.waiting.is_empty() {
            // A partition's own lane stays (it is about to be used again, and
            // there is one per partition); a key's goes, so many keys cost
            // memory only while they have events.
            if l.key != LaneKey::Whole {
                self.free_lane(lane.slot);
            }
        } else {
            // Behind the lanes already waiting for room: no lane starves another.
            l.queued = true;
            self.runnable.push_back(lane);
        }
        self.fill(ready);
        true
    }

    /// Forgets partition `part` (revoked): its lanes go and its waiting events
    /// are returned, never to run here. Its running jobs keep counting (in
    /// flight and buffered) until they are released: an executor may still hold
    /// them (a sync worker's queue), and freeing their room early would hand
    /// out more jobs than `max_in_flight`. Room freed by the waiting events is
    /// given to other lanes, pushed to `ready`.
    pub fn remove_part(&mut self, part: u64, ready: &mut Vec<Job<T>>) -> Vec<T> {
        let mut dropped = Vec::new();
        let Some(p) = self.parts.remove(&part) else {
            return dropped;
        };
        let (mut running_items, mut running_cost) = (0, 0);
        for slot in 0..self.slots.len() {
            let l = &mut self.slots[slot];
            if !l.live || l.part != part || l.orphan {
                continue;
            }
            dropped.extend(l.waiting.drain(..));
            if l.busy {
                l.orphan = true;
                l.queued = false;
                // Its partition's map is gone: freeing it later must not touch
                // a later assignment's lanes.
                l.key = LaneKey::Own;
                running_items += l.busy_items;
                running_cost += l.busy_cost;
            } else {
                self.free_lane(slot as u32);
            }
        }
        self.buffered -= p.buffered - running_items;
        self.buffered_bytes -= p.buffered_bytes - running_cost;
        self.fill(ready);
        dropped
    }

    /// Takes partition `part`'s waiting events out (its partition is being
    /// revoked or the source is stopping): they will not run here. Its running
    /// jobs stay counted until released or [`Scheduler::remove_part`].
    pub fn take_waiting(&mut self, part: u64) -> Vec<T> {
        let mut taken = Vec::new();
        for slot in 0..self.slots.len() {
            let l = &mut self.slots[slot];
            if !l.live || l.part != part {
                continue;
            }
            let cost: usize = l.waiting.iter().map(Item::cost).sum();
            let n = l.waiting.len();
            taken.extend(l.waiting.drain(..));
            let busy = l.busy;
            self.buffered -= n;
            self.buffered_bytes -= cost;
            if let Some(p) = self.parts.get_mut(&part) {
                p.buffered -= n;
                p.buffered_bytes -= cost;
            }
            if !busy {
                self.free_lane(slot as u32);
            }
        }
        taken
    }

    /// Gives back a job's vector (emptied) for the next job to reuse, so job
    /// vectors are allocated and freed on the scheduler's thread.
    pub fn recycle(&mut self, mut items: Vec<T>) {
        items.clear();
        if self.spare.len() < SPARE_JOBS && items.capacity() <= self.batch.max(16) * 2 {
            self.spare.push(items);
        }
    }

    /// Jobs running (each a lane with one handler call in progress).
    pub fn in_flight(&self) -> usize {
        self.busy
    }

    /// The most jobs that have run at once.
    pub fn peak_in_flight(&self) -> usize {
        self.peak_busy
    }

    /// Events from arrival until their job's lane was released.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// What those events cost, by [`Item::cost`].
    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    /// The most [`Scheduler::buffered_bytes`] has been.
    pub fn peak_buffered_bytes(&self) -> usize {
        self.peak_buffered_bytes
    }

    /// Events of partition `part` counted in [`Scheduler::buffered`].
    pub fn part_buffered(&self, part: u64) -> usize {
        self.parts.get(&part).map_or(0, |p| p.buffered)
    }

    /// What partition `part`'s events count in [`Scheduler::buffered_bytes`].
    pub fn part_buffered_bytes(&self, part: u64) -> usize {
        self.parts.get(&part).map_or(0, |p| p.buffered_bytes)
    }

    /// Lanes alive (running or with waiting events).
    pub fn lanes(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn lane_for(&mut self, part: u64, key: Option<&[u8]>) -> u32 {
        let key = match (self.ordering, key) {
            (Ordering::Unordered, _) => return self.new_lane(part, LaneKey::Own),
            (Ordering::PerKey, Some(k)) => Some(k),
            _ => None,
        };
        let p = self.parts.entry(part).or_default();
        let existing = match key {
            Some(k) => p.by_key.get(k).copied(),
            None => p.whole,
        };
        if let Some(slot) = existing {
            return slot;
        }
        let lane_key = key.map_or(LaneKey::Whole, |k| LaneKey::Key(k.into()));
        let slot = self.new_lane(part, lane_key.clone());
        let p = self.parts.entry(part).or_default();
        match lane_key {
            LaneKey::Key(k) => {
                p.by_key.insert(k, slot);
            }
            _ => p.whole = Some(slot),
        }
        slot
    }

    fn new_lane(&mut self, part: u64, key: LaneKey) -> u32 {
        if let Some(slot) = self.free.pop() {
            let l = &mut self.slots[slot as usize];
            l.live = true;
            l.part = part;
            l.key = key;
            return slot;
        }
        let slot = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        self.slots.push(Lane {
            gen: 0,
            live: true,
            part,
            key,
            busy: false,
            orphan: false,
            queued: false,
            busy_cost: 0,
            busy_items: 0,
            waiting: VecDeque::new(),
        });
        slot
    }

    fn free_lane(&mut self, slot: u32) {
        let l = &mut self.slots[slot as usize];
        if let Some(p) = self.parts.get_mut(&l.part) {
            match &l.key {
                LaneKey::Whole => p.whole = None,
                LaneKey::Key(k) => {
                    p.by_key.remove(k);
                }
                LaneKey::Own => {}
            }
        }
        l.gen = l.gen.wrapping_add(1);
        l.live = false;
        l.busy = false;
        l.orphan = false;
        l.queued = false;
        l.busy_cost = 0;
        l.busy_items = 0;
        l.key = LaneKey::Own;
        // A lane that held a burst keeps no large buffer once freed.
        if l.waiting.capacity() > 64 {
            l.waiting = VecDeque::new();
        }
        self.free.push(slot);
    }

    fn dispatch(&mut self, slot: u32, ready: &mut Vec<Job<T>>) {
        let l = &mut self.slots[slot as usize];
        let n = l.waiting.len().min(self.batch);
        let mut items = self.spare.pop().unwrap_or_default();
        items.extend(l.waiting.drain(..n));
        l.busy_cost = items.iter().map(Item::cost).sum();
        l.busy_items = n;
        l.busy = true;
        l.queued = false;
        // A new id per job: a late or repeated release of an earlier job of this
        // lane is ignored instead of releasing this one.
        l.gen = l.gen.wrapping_add(1);
        self.busy += 1;
        self.peak_busy = self.peak_busy.max(self.busy);
        ready.push(Job {
            lane: LaneId { slot, gen: l.gen },
            items,
        });
    }

    fn fill(&mut self, ready: &mut Vec<Job<T>>) {
        while self.busy < self.max_in_flight {
            let Some(id) = self.runnable.pop_front() else {
                return;
            };
            let l = &self.slots[id.slot as usize];
            if l.live && l.gen == id.gen && !l.busy && !l.waiting.is_empty() {
                self.dispatch(id.slot, ready);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
