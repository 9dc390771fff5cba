//! Events per second: a token bucket per pipeline, or one per key, that the
//! lane scheduler takes a token from for each event it hands out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// At most `per_second` events a second start their handler, with bursts of
/// up to `burst` ([`SourceOptions::rate_limit`](crate::source::SourceOptions::rate_limit)).
///
/// An event waits in its lane for its token: nothing is dropped or failed for
/// the rate. While tokens are short, lanes hold their events, the buffers
/// fill, and the partitions pause as when the handlers are slow (the buffer
/// budget), so memory stays bounded.
///
/// In configuration: `{"per_second": 2000, "burst": 200, "per_key": false,
/// "max_keys": 10000}`, all but `per_second` optional.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RateLimit {
    /// Events a second, sustained (more than zero; fractions allowed).
    pub per_second: f64,
    /// Events that may start at once after a quiet spell. Default: a tenth of
    /// a second's worth (at least 1), so the rate holds over any second.
    #[serde(default)]
    pub burst: Option<u32>,
    /// One bucket per Kafka message key (each at the full rate) instead of one
    /// for the pipeline. Keyless events share one bucket. Default off.
    #[serde(default)]
    pub per_key: bool,
    /// With `per_key`: buckets kept. Default 10,000 (~100 bytes each plus the
    /// key). Full, a new key's events share one overflow bucket at the same
    /// rate until a sweep (every second) forgets the buckets that filled up
    /// again (a full bucket is what a new key starts with, so forgetting it
    /// changes nothing).
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

fn default_max_keys() -> usize {
    10_000
}

impl RateLimit {
    /// `per_second` events a second, with the default burst, for the whole
    /// pipeline.
    pub fn per_second(per_second: f64) -> Self {
        RateLimit {
            per_second,
            burst: None,
            per_key: false,
            max_keys: default_max_keys(),
        }
    }

    /// The same with a burst of `burst` events.
    pub fn with_burst(mut self, burst: u32) -> Self {
        self.burst = Some(burst);
        self
    }

    /// The same, one bucket per key, keeping at most `max_keys` buckets.
    pub fn per_key(mut self, max_keys: usize) -> Self {
        self.per_key = true;
        self.max_keys = max_keys;
        self
    }

    /// The burst in effect.
    pub fn burst_size(&self) -> f64 {
        match self.burst {
            Some(b) => f64::from(b),
            None => (self.per_second / 10.0).ceil().max(1.0),
        }
    }

    /// The setting at fault and why, if a value is out of range.
    pub(crate) fn problem(&self) -> Option<(&'static str, &'static str)> {
        if !(self.per_second.is_finite() && self.per_second > 0.0) {
            return Some(("rate_limit.per_second", "must be more than zero"));
        }
        if self.burst == Some(0) {
            return Some(("rate_limit.burst", "must be at least 1"));
        }
        if self.per_key && self.max_keys == 0 {
            return Some(("rate_limit.max_keys", "must be at least 1 with per_key"));
        }
        None
    }
}

/// One bucket: tokens refilled at `rate` a second up to `burst`.
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.at = now;
    }

    /// Takes up to `n` whole tokens; returns how many.
    fn take(&mut self, n: usize, rate: f64, burst: f64, now: Instant) -> usize {
        self.refill(rate, burst, now);
        let k = (self.tokens.floor().max(0.0) as usize).min(n);
        self.tokens -= k as f64;
        k
    }

    /// When the next whole token is there.
    fn next(&self, rate: f64) -> Duration {
        Duration::from_secs_f64(((1.0 - self.tokens).max(0.0) / rate).max(0.0))
    }
}

/// The buckets of a [`RateLimit`], and the count of tokens handed out.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    max_keys: usize,
    /// The pipeline's bucket, or (per key) the keyless events' one.
    shared: Bucket,
    /// Per key; `None` for one bucket for the pipeline.
    keys: Option<HashMap<Box<[u8]>, Bucket>>,
    /// Keys past `max_keys` share it.
    overflow: Bucket,
    last_sweep: Instant,
    granted: u64,
}

/// How often full buckets are forgotten from a full key table.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl RateLimiter {
    /// The buckets for `limit`, full, at `now`.
    pub fn new(limit: &RateLimit, now: Instant) -> Self {
        let burst = limit.burst_size();
        RateLimiter {
            rate: limit.per_second,
            burst,
            max_keys: limit.max_keys.max(1),
            shared: Bucket::full(burst, now),
            keys: limit.per_key.then(HashMap::new),
            overflow: Bucket::full(burst, now),
            last_sweep: now,
            granted: 0,
        }
    }

    /// Tokens handed out so far (never more than `burst + per_second ×
    /// elapsed` per bucket).
    pub fn granted(&self) -> u64 {
        self.granted
    }

    /// Whether buckets are per key.
    pub fn per_key(&self) -> bool {
        self.keys.is_some()
    }

    /// Up to `n` tokens from the pipeline's bucket (or, per key, the keyless
    /// one); returns how many were given.
    pub fn take(&mut self, n: usize, now: Instant) -> usize {
        let k = self.shared.take(n, self.rate, self.burst, now);
        self.granted += k as u64;
        k
    }

    /// One token for an event of `key` (per key; without per-key buckets,
    /// from the pipeline's). Returns whether it was given.
    pub fn take_key(&mut self, key: Option<&[u8]>, now: Instant) -> bool {
        let (rate, burst) = (self.rate, self.burst);
        let bucket = match (&mut self.keys, key) {
            (Some(keys), Some(k)) => {
                if !keys.contains_key(k) && keys.len() < self.max_keys {
                    keys.insert(k.into(), Bucket::full(burst, now));
                }
                match keys.get_mut(k) {
                    Some(b) => b,
                    None => &mut self.overflow,
                }
            }
            _ => &mut self.shared,
        };
        let given = bucket.take(1, rate, burst, now) == 1;
        self.granted += u64::from(given);
        given
    }

    /// How long until a token is there in the pipeline's bucket (per key: the
    /// soonest a refill may help, one token's time).
    pub fn next_token(&self) -> Duration {
        if self.keys.is_some() {
            return Duration::from_secs_f64(1.0 / self.rate);
        }
        self.shared.next(self.rate)
    }

    /// Forgets the key buckets that are full again, at most every second.
    pub fn sweep(&mut self, now: Instant) {
        let Some(keys) = &mut self.keys else { return };
        if now.saturating_duration_since(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        let (rate, burst) = (self.rate, self.burst);
        keys.retain(|_, b| {
            b.refill(rate, burst, now);
            b.tokens < burst
        });
    }

    /// Key buckets kept.
    pub fn keys(&self) -> usize {
        self.keys.as_ref().map_or(0, HashMap::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_bucket_gives_its_burst_then_the_rate_and_never_more() {
        let t0 = Instant::now();
        let limit = RateLimit::per_second(1000.0).with_burst(50);
        let mut r = RateLimiter::new(&limit, t0);
        assert_eq!(r.take(80, t0), 50, "the burst at once");
        assert_eq!(r.take(10, t0), 0);
        assert_eq!(r.take(10, t0 + 5 * MS), 5, "one a millisecond");
        // Asked for more than there is, every 3 ms for a second.
        let mut now = t0 + 5 * MS;
        for _ in 0..333 {
            now += 3 * MS;
            r.take(64, now);
            let bound = 50.0 + 1000.0 * (now - t0).as_secs_f64();
            assert!(
                r.granted() as f64 <= bound + 1e-6,
                "{} > {bound}",
                r.granted()
            );
        }
        assert!(r.granted() >= 1040, "{}", r.granted());
    }

    #[test]
    fn a_quiet_spell_refills_only_up_to_the_burst() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(&RateLimit::per_second(100.0).with_burst(5), t0);
        r.take(5, t0);
        assert_eq!(r.take(100, t0 + Duration::from_secs(60)), 5);
        assert_eq!(r.next_token(), Duration::from_millis(10));
    }

    #[test]
    fn per_key_buckets_are_apart_bounded_and_swept() {
        let t0 = Instant::now();
        let limit = RateLimit::per_second(10.0).with_burst(2).per_key(2);
        let mut r = RateLimiter::new(&limit, t0);
        assert!(r.take_key(Some(b"a"), t0) && r.take_key(Some(b"a"), t0));
        assert!(!r.take_key(Some(b"a"), t0), "a's burst spent");
        assert!(r.take_key(Some(b"b"), t0), "b has its own");
        // The table is full: c and d share the overflow bucket.
        assert!(r.take_key(Some(b"c"), t0) && r.take_key(Some(b"d"), t0));
        assert!(!r.take_key(Some(b"c"), t0));
        assert_eq!(r.keys(), 2);
        // After a second everyone's bucket is full again: swept.
        r.sweep(t0 + Duration::from_secs(2));
        assert_eq!(r.keys(), 0);
        assert!(r.take_key(None, t0), "keyless events share a bucket");
    }

    #[test]
    fn the_default_burst_is_a_tenth_of_a_second_and_bad_values_are_named() {
        assert_eq!(RateLimit::per_second(2000.0).burst_size(), 200.0);
        assert_eq!(RateLimit::per_second(0.5).burst_size(), 1.0);
        let field = |r: RateLimit| r.problem().map(|(f, _)| f);
        assert_eq!(
            field(RateLimit::per_second(0.0)),
            Some("rate_limit.per_second")
        );
        assert_eq!(
            field(RateLimit::per_second(f64::NAN)),
            Some("rate_limit.per_second")
        );
        assert_eq!(
            field(RateLimit::per_second(1.0).with_burst(0)),
            Some("rate_limit.burst")
        );
        assert_eq!(
            field(RateLimit::per_second(1.0).per_key(0)),
            Some("rate_limit.max_keys")
        );
        assert_eq!(field(RateLimit::per_second(1.0)), None);
        let r: RateLimit = serde_json::from_str(r#"{"per_second": 5}"#).unwrap();
        assert_eq!(r, RateLimit::per_second(5.0));
        assert!(serde_json::from_str::<RateLimit>(r#"{"per_second": 5, "brust": 1}"#).is_err());
    }
}
