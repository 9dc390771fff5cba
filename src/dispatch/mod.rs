//! The dispatch stage: which events a pipeline handles ([`TypeFilter`], and
//! [`OwnReceivers`]: not the service's own lifecycle posts coming back), and
//! what may run next ([`Ordering`], enforced by the lane scheduler in `lanes`).

// The scheduler's internals are public only for the fuzz targets.
#[cfg(feature = "unstable-fuzzing")]
pub mod lanes;
#[cfg(not(feature = "unstable-fuzzing"))]
#[allow(unreachable_pub)] // public items of a crate-private module: the fuzz build's API
pub(crate) mod lanes;

use std::fmt;
use std::sync::{Arc, RwLock};

/// What order handlers keep, at any concurrency (see [`lanes`]).
/// In configuration: `per_partition`, `per_key` or `unordered`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Ordering {
    /// In order within a partition (the default): at most one event of a
    /// partition is in a handler at a time, in offset order.
    #[default]
    PerPartition,
    /// In order within a message key: at most one event per key (compared by its
    /// bytes, never by a hash) is in a handler at a time, in offset order within
    /// the key; different keys of one partition run concurrently, and a slow or
    /// failing key holds back only its own events. A message **without a key**
    /// keeps its partition's order among the other keyless messages of that
    /// partition (they share one lane).
    PerKey,
    /// No order: any event may run as soon as there is room under `max_in_flight`.
    Unordered,
}

/// A fast hasher for keys this crate assigns or the broker's assignment names
/// (topic and partition, partition ids): never for keys a peer chooses, such as
/// message keys, which keep the std hasher.
#[derive(Default, Clone, Copy)]
pub(crate) struct TrustedHasher(u64);

impl TrustedHasher {
    #[inline]
    fn mix(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for TrustedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.mix(u64::from(b));
        }
    }
    fn write_i32(&mut self, i: i32) {
        self.mix(u64::from(i as u32));
    }
    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }
}

/// `HashMap` state for [`TrustedHasher`].
pub(crate) type TrustedState = std::hash::BuildHasherDefault<TrustedHasher>;

/// FNV-1a, finalized: a fast, stable hash for short keys (XZepr keys are 26-byte ULIDs).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// A finalizer so consecutive partitions spread evenly over queue counts.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

/// Which event types a pipeline handles. Events that do not match finish at once,
/// without a handler, and are committed.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct TypeFilter {
    patterns: Vec<Pattern>,
}

#[derive(Clone, PartialEq, Eq)]
enum Pattern {
    Prefix(String),
    Glob(String),
}

impl fmt::Debug for TypeFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for p in &self.patterns {
            match p {
                Pattern::Prefix(s) => list.entry(&format_args!("prefix {s:?}")),
                Pattern::Glob(s) => list.entry(&format_args!("glob {s:?}")),
            };
        }
        list.finish()
    }
}

impl TypeFilter {
    /// A filter that accepts every type.
    pub fn any() -> Self {
        TypeFilter::default()
    }

    /// Adds a prefix: types starting with it are accepted (e.g. `deployment.`).
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.patterns.push(Pattern::Prefix(prefix.into()));
        self
    }

    /// Adds a glob: `*` matches any run of characters, `?` any one character
    /// (e.g. `deployment.*.completed`).
    #[must_use]
    pub fn glob(mut self, glob: impl Into<String>) -> Self {
        self.patterns.push(Pattern::Glob(glob.into()));
        self
    }

    /// True when no pattern was added (everything is accepted).
    pub fn is_any(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether an event of type `ty` is handled: no patterns, or any one matching.
    pub fn accepts(&self, ty: &str) -> bool {
        self.patterns.is_empty()
            || self.patterns.iter().any(|p| match p {
                Pattern::Prefix(prefix) => ty.starts_with(prefix.as_str()),
                Pattern::Glob(glob) => glob_match(glob.as_bytes(), ty.as_bytes()),
            })
    }
}

/// In configuration, a list of patterns: one with `*` or `?` is a glob
/// ([`TypeFilter::glob`]), any other a prefix ([`TypeFilter::prefix`]); the
/// empty list accepts every type.
impl serde::Serialize for TypeFilter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.patterns.iter().map(|p| match p {
            Pattern::Prefix(t) | Pattern::Glob(t) => t,
        }))
    }
}

impl<'de> serde::Deserialize<'de> for TypeFilter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let patterns = Vec::<String>::deserialize(d)?;
        Ok(patterns
            .into_iter()
            .fold(TypeFilter::any(), TypeFilter::pattern))
    }
}

impl TypeFilter {
    /// Adds `pattern` as a glob when it holds `*` or `?`, else as a prefix:
    /// how a configuration file or the command line's `--type` reads.
    #[must_use]
    pub fn pattern(self, pattern: impl Into<String>) -> Self {
        let p = pattern.into();
        if p.contains(['*', '?']) {
            self.glob(p)
        } else {
            self.prefix(p)
        }
    }
}

/// Iterative wildcard match with single backtracking point: O(len(p) * len(t))
/// worst case, no recursion, no allocation.
fn glob_match(p: &[u8], t: &[u8]) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The receiver ids this service reports under, for the own-event filter: the
/// ones it was seeded with and every id the reporter moved them to after XZepr lost them (a restart) and
/// they were discovered again. The pipeline's own-event guard asks it whether an
/// event's `source` is one of its own, so the guard follows the reporter.
///
/// Cheap to clone (clones share the set) and cheap to ask: a read lock and a
/// comparison with each id (one, or a few after restarts); no allocation.
#[derive(Debug, Clone, Default)]
pub struct OwnReceivers {
    ids: Arc<RwLock<Vec<Box<str>>>>,
}

impl OwnReceivers {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `receiver_id`; false if it was there already.
    pub fn insert(&self, receiver_id: &str) -> bool {
        let mut ids = self.ids.write().unwrap_or_else(|p| p.into_inner());
        if ids.iter().any(|id| **id == *receiver_id) {
            return false;
        }
        ids.push(receiver_id.into());
        true
    }

    /// Whether `receiver_id` is one of this service's receivers.
    pub fn contains(&self, receiver_id: &str) -> bool {
        self.ids
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|id| **id == *receiver_id)
    }

    /// The ids, oldest first.
    pub fn ids(&self) -> Vec<String> {
        self.ids
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|id| id.to_string())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_receivers_are_shared_and_cheap_to_ask() {
        let own = OwnReceivers::new();
        assert!(!own.contains("R1"));
        let seen_by_pipeline = own.clone();
        assert!(own.insert("R1"));
        assert!(!own.insert("R1"), "no duplicates");
        assert!(seen_by_pipeline.contains("R1"));
        assert!(!seen_by_pipeline.contains("R2"));
        own.insert("R2");
        assert!(seen_by_pipeline.contains("R2") && seen_by_pipeline.contains("R1"));
        assert!(!seen_by_pipeline.contains("R"), "whole ids only");
        assert_eq!(seen_by_pipeline.ids(), ["R1", "R2"]);
    }

    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(b"deployment.*", b"deployment.started"));
        assert!(glob_match(b"*.completed", b"build.completed"));
        assert!(glob_match(b"d*t.*d", b"deployment.started"));
        assert!(glob_match(b"a?c", b"abc"));
        assert!(glob_match(b"*", b""));
        assert!(!glob_match(b"a?c", b"ac"));
        assert!(!glob_match(b"*.failed", b"build.completed"));
        assert!(!glob_match(b"", b"x"));
    }

    #[test]
    fn filter_any_or_match() {
        assert!(TypeFilter::any().accepts("x"));
        let f = TypeFilter::any().prefix("deployment.").glob("*.failed");
        assert!(f.accepts("deployment.started"));
        assert!(f.accepts("build.failed"));
        assert!(!f.accepts("build.completed"));
    }
}
