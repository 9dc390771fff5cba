//! The dispatch stage: which events a pipeline handles, and which worker queue
//! each goes to.

use std::fmt;

/// How events are spread over the worker queues, and so what order is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Ordering {
    /// In order within a partition (the default): a partition always maps to the
    /// same queue, so its events are handled one after another.
    #[default]
    PerPartition,
    /// In order within a message key: the same key always maps to the same queue;
    /// different keys of one partition run in parallel.
    PerKey,
    /// No order: events go round-robin to the queues.
    Unordered,
}

/// The worker queue, among `queues` (at least 1), for a message under `ordering`.
///
/// `topic_hash` is any stable hash of the topic name ([`fnv1a`] of it, say); `seq`
/// is a per-dispatcher counter, used for round-robin.
pub fn queue_index(
    ordering: Ordering,
    queues: usize,
    topic_hash: u64,
    partition: i32,
    key: Option<&[u8]>,
    seq: u64,
) -> usize {
    debug_assert!(queues > 0);
    let n = queues as u64;
    let h = match ordering {
        Ordering::PerPartition => mix(topic_hash ^ u64::from(partition as u32)),
        // A message without a key has no key order to keep: keep its partition's.
        Ordering::PerKey => match key {
            Some(k) => fnv1a(k),
            None => mix(topic_hash ^ u64::from(partition as u32)),
        },
        Ordering::Unordered => seq,
    };
    (h % n) as usize
}

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

#[cfg(test)]
mod tests {
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

    #[test]
    fn per_partition_is_stable_and_per_key_spreads() {
        for p in 0..64 {
            let a = queue_index(Ordering::PerPartition, 4, 7, p, Some(b"k1"), 0);
            let b = queue_index(Ordering::PerPartition, 4, 7, p, Some(b"k2"), 9);
            assert_eq!(a, b);
        }
        let mut used = [false; 4];
        for i in 0..64u32 {
            let key = i.to_string();
            used[queue_index(Ordering::PerKey, 4, 7, 0, Some(key.as_bytes()), 0)] = true;
        }
        assert!(used.iter().all(|&u| u));
        assert_eq!(queue_index(Ordering::Unordered, 4, 0, 0, None, 6), 2);
    }
}
