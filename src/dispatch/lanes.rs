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
//! With a [`RateLimit`] ([`Scheduler::with_rate_limit`]) a job takes a token
//! per event: a lane gets as many of its waiting events as there are tokens
//! (under `per_key`, up to its first event whose key has none, so order
//! holds), and a lane that gets none waits, oldest first, for
//! [`Scheduler::refill`]. Its events stay counted in the buffers, so the
//! source pauses partitions as when handlers are slow; none is dropped.
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
use std::time::{Duration, Instant};

use super::Ordering;
use crate::flow_control::{RateLimit, RateLimiter};

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
    /// Events a second, if limited.
    rate: Option<RateLimiter>,
    /// Lanes with room but no token, oldest first (ahead of `runnable`).
    starved: VecDeque<LaneId>,
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
            rate: None,
            starved: VecDeque::new(),
            busy: 0,
            buffered: 0,
            buffered_bytes: 0,
            peak_busy: 0,
            peak_buffered_bytes: 0,
        }
    }

    /// The same scheduler handing out at most `limit`'s events a second.
    pub fn with_rate_limit(mut self, limit: Option<&RateLimit>) -> Self {
        self.rate = limit.map(|l| RateLimiter::new(l, Instant::now()));
        self
    }

    /// Whether lanes wait for tokens: call [`Scheduler::refill`] within
    /// [`Scheduler::next_token`].
    pub fn waiting_for_tokens(&self) -> bool {
        self.rate.is_some()
            && (!self.starved.is_empty()
                || (!self.runnable.is_empty() && self.busy < self.max_in_flight))
    }

    /// How long until the next token, when lanes wait for one.
    pub fn next_token(&self) -> Option<Duration> {
        self.rate
            .as_ref()
            .filter(|_| self.waiting_for_tokens())
            .map(RateLimiter::next_token)
    }

    /// Tokens handed out so far (0 without a rate limit).
    pub fn tokens_granted(&self) -> u64 {
        self.rate.as_ref().map_or(0, RateLimiter::granted)
    }

    /// Hands the tokens that came since to the lanes waiting for them, oldest
    /// first; what may run is pushed to `ready`.
    pub fn refill(&mut self, ready: &mut Vec<Job<T>>) {
        let Some(rate) = &mut self.rate else { return };
        rate.sweep(Instant::now());
        while let Some(id) = self.starved.pop_back() {
            self.runnable.push_front(id);
        }
        self.fill(ready);
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
        // Lanes already waiting for tokens get them first.
        if self.busy < self.max_in_flight && self.starved.is_empty() {
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

    /// Runs the lane's next batch, as far as tokens go; false when none was
    /// left (the lane then waits in `starved`).
    fn dispatch(&mut self, slot: u32, ready: &mut Vec<Job<T>>) -> bool {
        let l = &mut self.slots[slot as usize];
        let mut n = l.waiting.len().min(self.batch);
        if let Some(rate) = &mut self.rate {
            let now = Instant::now();
            n = if rate.per_key() {
                l.waiting
                    .iter()
                    .take(n)
                    .take_while(|item| rate.take_key(item.key(), now))
                    .count()
            } else {
                rate.take(n, now)
            };
            if n == 0 {
                l.queued = true;
                self.starved.push_back(LaneId { slot, gen: l.gen });
                return false;
            }
        }
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
        true
    }

    fn fill(&mut self, ready: &mut Vec<Job<T>>) {
        while self.busy < self.max_in_flight {
            let Some(id) = self.runnable.pop_front() else {
                return;
            };
            let l = &self.slots[id.slot as usize];
            if l.live && l.gen == id.gen && !l.busy && !l.waiting.is_empty() {
                let ran = self.dispatch(id.slot, ready);
                // One bucket for all: no lane behind this one has a token either.
                if !ran && self.rate.as_ref().is_some_and(|r| !r.per_key()) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
