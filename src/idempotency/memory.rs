//! The in-memory store: [`IdempotencyStore`] semantics inside one process.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::{
    nonzero, Begin, BoxError, BoxFuture, BusyWait, Claim, Counters, Error, IdempotencyMetrics,
    IdempotencyStore, ProcessingResult, Settle, DEFAULT_BUSY_POLL_INTERVAL, DEFAULT_LEASE,
};
use crate::config::ConfigError;

/// Default [`MemoryStoreBuilder::capacity`]: 100,000 keys, about 10 MB with 36-byte UUID
/// keys; hours of a busy topic's redeliveries, which is what one process can replay.
pub const DEFAULT_MEMORY_CAPACITY: usize = 100_000;
/// Default [`MemoryStoreBuilder::retention`]: one hour. Replays within one process come
/// from retries and rebalances, minutes apart; a restart forgets everything anyway.
pub const DEFAULT_MEMORY_RETENTION: Duration = Duration::from_secs(3600);
/// An idempotency store in this process's memory, for tests and for services without
/// a database. Cheap to clone (shared state).
///
/// Bounded twice: a processed key is remembered for at most
/// [`retention`](MemoryStoreBuilder::retention), and at most
/// [`capacity`](MemoryStoreBuilder::capacity) keys (claims and processed) are held.
///
/// When a new key arrives at capacity, one slot is freed, in this order:
///
/// 1. a claim whose lease ran out (its holder leaked or outran it; any `begin` of
///    that key would take it over anyway), the one that ran out first;
/// 2. else the oldest processed key, by the time it was processed (a replay of it
///    would run its work again: at-least-once still holds, the dedup window
///    shrinks from the oldest end);
/// 3. else every slot is a live claim: [`begin`](IdempotencyStore::begin) fails with
///    [`Error::Full`]. A live claim is never evicted.
///
/// Each step costs O(log n) (claims are kept ordered by lease end, processed keys
/// by age). Nothing survives a restart: claims of a crashed process vanish with it.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    capacity: usize,
    retention: Duration,
    lease: Duration,
    wait: BusyWait,
    state: Mutex<State>,
    counters: Counters,
    next_token: AtomicI64,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Processed keys, oldest first: the eviction order. A key enters once per
    /// `processed` transition and leaves when evicted, so it always matches `entries`.
    processed: VecDeque<(Instant, String)>,
    /// Claims by the end of their lease (then token): the ones that ran out first are
    /// evicted first. Exactly the `Claimed` entries, kept in step with them.
    claims: BTreeMap<(Instant, i64), String>,
}

#[derive(Debug, Clone, Copy)]
enum Entry {
    Claimed { token: i64, until: Instant },
    Processed,
}

/// Settings of a [`MemoryStore`]; see each setter for its default.
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder {
    capacity: usize,
    retention: Duration,
    lease: Duration,
    busy_poll_interval: Duration,
    busy_timeout: Option<Duration>,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self {
            capacity: DEFAULT_MEMORY_CAPACITY,
            retention: DEFAULT_MEMORY_RETENTION,
            lease: DEFAULT_LEASE,
            busy_poll_interval: DEFAULT_BUSY_POLL_INTERVAL,
            busy_timeout: None,
        }
    }
}

impl MemoryStoreBuilder {
    /// Most keys held (claims and processed). Default [`DEFAULT_MEMORY_CAPACITY`].
    /// At capacity a claim whose lease ran out is dropped first, else the oldest
    /// processed key is forgotten; with only live claims left, `begin` fails with
    /// [`Error::Full`] (see [`MemoryStore`]).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// How long a processed key is remembered. Default [`DEFAULT_MEMORY_RETENTION`].
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// How long a claim holds its key without being settled. Default [`DEFAULT_LEASE`].
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// First pause of `process_if_new` on a busy key, doubling up to 1 s.
    /// Default [`DEFAULT_BUSY_POLL_INTERVAL`].
    pub fn busy_poll_interval(mut self, interval: Duration) -> Self {
        self.busy_poll_interval = interval;
        self
    }

    /// How long `process_if_new` waits on a busy key before failing with
    /// [`Error::Busy`]. Default: twice the lease, so a waiter outlives a crashed
    /// holder's lease and takes the key over itself.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = Some(timeout);
        self
    }

    /// Builds the store.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] when the capacity or a duration is zero, or the lease is
    /// not shorter than the retention.
    pub fn build(self) -> Result<MemoryStore, ConfigError> {
        if self.capacity == 0 {
            return Err(ConfigError::Invalid {
                name: "capacity",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        nonzero("retention", self.retention)?;
        nonzero("lease", self.lease)?;
        nonzero("busy_poll_interval", self.busy_poll_interval)?;
        if self.lease >= self.retention {
            return Err(ConfigError::Invalid {
                name: "lease",
                value: format!("{:?}", self.lease),
                expected: "shorter than the retention",
            });
        }
        Ok(MemoryStore {
            inner: Arc::new(Inner {
                capacity: self.capacity,
                retention: self.retention,
                lease: self.lease,
                wait: BusyWait {
                    first_poll: self.busy_poll_interval,
                    timeout: self.busy_timeout.unwrap_or(self.lease * 2),
                },
                state: Mutex::new(State::default()),
                counters: Counters::default(),
                next_token: AtomicI64::new(1),
            }),
        })
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with the default settings (see [`MemoryStoreBuilder`]).
    pub fn new() -> Self {
        Self {
            inner: MemoryStoreBuilder::default()
                .build()
                .expect("the default settings are valid")
                .inner,
        }
    }

    /// Settings for a store.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// Runs `work` unless `event_id` was processed before; the guide's call, as on
    /// [`IdempotencyGuard::process_if_new`](super::IdempotencyGuard::process_if_new).
    ///
    /// # Errors
    ///
    /// [`Error::Busy`] when another worker held the key for the whole busy timeout;
    /// [`Error::Full`]; [`Error::LeaseLost`] when the work outran the lease.
    pub async fn process_if_new<F>(
        &self,
        event_id: &str,
        work: F,
    ) -> Result<ProcessingResult, Error>
    where
        F: Future<Output = Result<(), BoxError>>,
    {
        super::process_if_new(self, event_id, self.inner.wait, work).await
    }

    /// The store's counters.
    pub fn metrics(&self) -> IdempotencyMetrics {
        self.inner.counters.snapshot()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps consistent (every mutation is
        // a single insert/remove), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_size(&self, state: &State) {
        self.counters
            .table_size
            .store(state.entries.len() as i64, Relaxed);
    }

    fn settle_now(&self, key: String, token: i64, done: bool) -> Result<(), Error> {
        let mut state = self.lock();
        let until = match state.entries.get(&key) {
            Some(Entry::Claimed { token: t, until }) if *t == token => *until,
            _ => return Err(Error::LeaseLost { key }),
        };
        state.claims.remove(&(until, token));
        if done {
            state.entries.insert(key.clone(), Entry::Processed);
            state.processed.push_back((Instant::now(), key));
            self.counters.processed.fetch_add(1, Relaxed);
        } else {
            state.entries.remove(&key);
            self.counters.failed.fetch_add(1, Relaxed);
        }
        self.set_size(&state);
        Ok(())
    }

    fn renew_now(&self, key: &str, token: i64) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        let Some(Entry::Claimed { token: t, until }) = state.entries.get_mut(key) else {
            return false;
        };
        // Ran out: a `begin` may already have been told it can take the key over.
        if *t != token || *until <= now {
            return false;
        }
        let old = std::mem::replace(until, now + self.lease);
        let new = *until;
        if let Some(key) = state.claims.remove(&(old, token)) {
            state.claims.insert((new, token), key);
        }
        true
    }
}

impl State {
    /// Forgets processed keys older than the retention.
    fn expire(&mut self, now: Instant, retention: Duration) {
        while let Some((at, _)) = self.processed.front() {
            if now.duration_since(*at) < retention {
                break;
            }
            if let Some((_, key)) = self.processed.pop_front() {
                self.entries.remove(&key);
            }
        }
    }

    /// Makes room for one key (the policy of [`MemoryStore`]): a claim whose lease
    /// ran out goes first, then the oldest processed key. False when every slot is a
    /// live claim.
    fn make_room(&mut self, now: Instant, capacity: usize) -> bool {
        if self.entries.len() < capacity {
            return true;
        }
        if let Some(entry) = self.claims.first_entry() {
            if entry.key().0 <= now {
                let key = entry.remove();
                self.entries.remove(&key);
                return true;
            }
        }
        if let Some((_, key)) = self.processed.pop_front() {
            self.entries.remove(&key);
            return true;
        }
        false
    }

    /// Records a new claim of `key` (taking over an expired one in place).
    fn claim(&mut self, key: &str, token: i64, until: Instant) {
        let old = self
            .entries
            .insert(key.to_owned(), Entry::Claimed { token, until });
        if let Some(Entry::Claimed { token, until }) = old {
            self.claims.remove(&(until, token));
        }
        self.claims.insert((until, token), key.to_owned());
    }
}

#[async_trait::async_trait]
impl IdempotencyStore for MemoryStore {
    async fn begin(&self, key: &str) -> Result<Begin, Error> {
        let inner = &self.inner;
        let now = Instant::now();
        let token = inner.next_token.fetch_add(1, Relaxed);
        {
            let mut state = self.lock();
            state.expire(now, inner.retention);
            match state.entries.get(key) {
                Some(Entry::Processed) => {
                    inner.counters.duplicates.fetch_add(1, Relaxed);
                    return Ok(Begin::AlreadyProcessed);
                }
                Some(Entry::Claimed { until, .. }) if *until > now => return Ok(Begin::Busy),
                // Expired claim: taken over in place (no room needed).
                Some(Entry::Claimed { .. }) => {}
                None => {
                    if !state.make_room(now, inner.capacity) {
                        return Err(Error::Full {
                            capacity: inner.capacity,
                        });
                    }
                }
            }
            state.claim(key, token, now + inner.lease);
            inner.set_size(&state);
        }
        Ok(Begin::Run(Claim::new(
            key.to_owned(),
            token,
            Arc::clone(&self.inner) as Arc<dyn Settle>,
        )))
    }

    fn lease(&self) -> Duration {
        self.inner.lease
    }

    fn metrics(&self) -> IdempotencyMetrics {
        self.inner.counters.snapshot()
    }
}

impl Settle for Inner {
    fn settle(&self, key: String, token: i64, done: bool) -> BoxFuture<'_, Result<(), Error>> {
        let result = self.settle_now(key, token, done);
        Box::pin(std::future::ready(result))
    }

    fn abandon(&self, key: String, token: i64) {
        // Lost already means someone else holds it: nothing to release.
        let _ = self.settle_now(key, token, false);
    }

    fn renew(&self, key: String, token: i64) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(std::future::ready(Ok(self.renew_now(&key, token))))
    }

    fn lease(&self) -> Duration {
        self.lease
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn store(capacity: usize, retention_s: u64, lease_s: u64) -> MemoryStore {
        MemoryStore::builder()
            .capacity(capacity)
            .retention(Duration::from_secs(retention_s))
            .lease(Duration::from_secs(lease_s))
            .build()
            .unwrap()
    }

    async fn run(s: &MemoryStore, key: &str) -> Claim {
        match s.begin(key).await.unwrap() {
            Begin::Run(c) => c,
            other => panic!("expected Run for {key}, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn guide_test_second_call_is_already_processed() {
        let s = MemoryStore::new();
        let calls = Arc::new(AtomicU32::new(0));
        for expected in [
            ProcessingResult::Success,
            ProcessingResult::AlreadyProcessed,
        ] {
            let c = calls.clone();
            let r = s
                .process_if_new("test-event-123", async move {
                    c.fetch_add(1, Relaxed);
                    Ok(())
                })
                .await
                .unwrap();
            assert_eq!(r, expected);
        }
        assert_eq!(calls.load(Relaxed), 1);
        let m = s.metrics();
        assert_eq!(
            (m.events_processed_total, m.events_duplicates_total),
            (1, 1)
        );
        assert_eq!(m.processed_events_table_size, 1);
    }

    #[tokio::test]
    async fn busy_while_claimed_then_processed() {
        let s = MemoryStore::new();
        let claim = run(&s, "k").await;
        assert!(matches!(s.begin("k").await.unwrap(), Begin::Busy));
        claim.complete().await.unwrap();
        assert!(matches!(
            s.begin("k").await.unwrap(),
            Begin::AlreadyProcessed
        ));
    }

    #[tokio::test]
    async fn failed_work_is_retried() {
        let s = MemoryStore::new();
        let r = s
            .process_if_new("k", async { Err("half-way".into()) })
            .await
            .unwrap();
        assert!(matches!(r, ProcessingResult::Failed(ref e) if e.to_string() == "half-way"));
        let r = s.process_if_new("k", async { Ok(()) }).await.unwrap();
        assert_eq!(r, ProcessingResult::Success);
        assert_eq!(s.metrics().events_failed_total, 1);
    }

    #[tokio::test]
    async fn dropped_claim_is_released() {
        let s = MemoryStore::new();
        drop(run(&s, "k").await);
        run(&s, "k").await.complete().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn expired_claim_is_taken_over_and_old_claim_is_lost() {
        let s = store(10, 3600, 30);
        let old = run(&s, "k").await;
        assert!(matches!(s.begin("k").await.unwrap(), Begin::Busy));
        tokio::time::advance(Duration::from_secs(31)).await;
        let new = run(&s, "k").await;
        assert!(old.complete().await.unwrap_err().is_lease_lost());
        new.complete().await.unwrap();
        assert!(matches!(
            s.begin("k").await.unwrap(),
            Begin::AlreadyProcessed
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn process_if_new_waits_out_a_crashed_holder() {
        let s = store(10, 3600, 30);
        std::mem::forget(run(&s, "k").await); // the holder "crashes"
        let r = s.process_if_new("k", async { Ok(()) }).await.unwrap();
        assert_eq!(r, ProcessingResult::Success);
    }

    #[tokio::test(start_paused = true)]
    async fn busy_timeout_is_an_error() {
        let s = MemoryStore::builder()
            .busy_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let _held = run(&s, "k").await;
        let err = s.process_if_new("k", async { Ok(()) }).await.unwrap_err();
        assert!(matches!(err, Error::Busy { .. }), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn retention_forgets_old_keys() {
        let s = store(10, 60, 1);
        run(&s, "old").await.complete().await.unwrap();
        tokio::time::advance(Duration::from_secs(40)).await;
        run(&s, "young").await.complete().await.unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        // "old" is 70 s old (forgotten), "young" 30 s (remembered).
        assert!(matches!(
            s.begin("young").await.unwrap(),
            Begin::AlreadyProcessed
        ));
        run(&s, "old").await.complete().await.unwrap();
    }

    #[tokio::test]
    async fn capacity_evicts_oldest_processed_then_fails_on_claims() {
        let s = store(3, 3600, 30);
        for k in ["a", "b", "c"] {
            run(&s, k).await.complete().await.unwrap();
        }
        // Full: "a" (oldest processed) makes room for "d".
        let d = run(&s, "d").await;
        assert_eq!(s.metrics().processed_events_table_size, 3);
        assert!(matches!(
            s.begin("b").await.unwrap(),
            Begin::AlreadyProcessed
        ));
        drop(run(&s, "a").await); // forgotten: runs again
        let e = run(&s, "e").await; // evicts "b"
        let f = run(&s, "f").await; // evicts "c"
                                    // Now three live claims: nothing to evict.
        assert!(matches!(
            s.begin("g").await,
            Err(Error::Full { capacity: 3 })
        ));
        drop((d, e, f));
        run(&s, "g").await.complete().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_sweeps_expired_claims() {
        let s = store(2, 3600, 5);
        std::mem::forget(run(&s, "a").await);
        std::mem::forget(run(&s, "b").await);
        assert!(matches!(s.begin("c").await, Err(Error::Full { .. })));
        tokio::time::advance(Duration::from_secs(6)).await;
        run(&s, "c").await.complete().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_evicts_expired_claims_before_processed_keys() {
        let s = store(3, 3600, 5);
        run(&s, "a").await.complete().await.unwrap();
        run(&s, "b").await.complete().await.unwrap();
        std::mem::forget(run(&s, "leaked").await); // its holder is gone
        tokio::time::advance(Duration::from_secs(6)).await;
        // Full: the claim that ran out makes room, not the oldest processed key.
        let c = run(&s, "c").await;
        for k in ["a", "b"] {
            assert!(
                matches!(s.begin(k).await.unwrap(), Begin::AlreadyProcessed),
                "{k} was evicted"
            );
        }
        // A live claim is never evicted: the oldest processed key goes next.
        let d = run(&s, "d").await;
        assert!(matches!(s.begin("c").await.unwrap(), Begin::Busy));
        assert!(matches!(
            s.begin("b").await.unwrap(),
            Begin::AlreadyProcessed
        ));
        drop(run(&s, "a").await); // "a" was the one forgotten
        c.complete().await.unwrap();
        d.complete().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_claim_outlives_its_lease_until_settled() {
        let s = store(10, 3600, 3);
        let mut claim = run(&s, "k").await;
        claim.keep_alive(&tokio::runtime::Handle::current());
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(matches!(s.begin("k").await.unwrap(), Begin::Busy));
        claim.complete().await.unwrap();
        assert!(matches!(
            s.begin("k").await.unwrap(),
            Begin::AlreadyProcessed
        ));

        // Dropped, it stops renewing and is released.
        let mut claim = run(&s, "dropped").await;
        claim.keep_alive(&tokio::runtime::Handle::current());
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(claim);
        run(&s, "dropped").await.complete().await.unwrap();

        // Released, a renewal already due does not revive it.
        let mut claim = run(&s, "released").await;
        claim.keep_alive(&tokio::runtime::Handle::current());
        claim.release().await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        run(&s, "released").await.complete().await.unwrap();
    }

    #[test]
    fn builder_validates() {
        assert!(MemoryStore::builder().capacity(0).build().is_err());
        assert!(MemoryStore::builder()
            .lease(Duration::from_secs(10))
            .retention(Duration::from_secs(10))
            .build()
            .is_err());
        assert!(MemoryStore::builder()
            .lease(Duration::ZERO)
            .build()
            .is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_run_each_key_once() {
        let s = MemoryStore::new();
        let runs: Arc<Vec<AtomicU32>> = Arc::new((0..200).map(|_| AtomicU32::new(0)).collect());
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..8 {
            for i in 0..200usize {
                let (s, runs) = (s.clone(), runs.clone());
                tasks.spawn(async move {
                    s.process_if_new(&format!("id-{i}"), async move {
                        runs[i].fetch_add(1, Relaxed);
                        tokio::task::yield_now().await;
                        Ok(())
                    })
                    .await
                    .unwrap()
                });
            }
        }
        let mut successes = 0;
        while let Some(r) = tasks.join_next().await {
            successes += (r.unwrap() == ProcessingResult::Success) as usize;
        }
        assert_eq!(successes, 200);
        assert!(runs.iter().all(|r| r.load(Relaxed) == 1));
    }
}
