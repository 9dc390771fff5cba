//! Flow control: how many calls to a slower service run at once
//! ([`Concurrency`], [`Limiter`]), and how many events a second start
//! ([`RateLimit`]).
//!
//! One [`Limiter`] serves every concurrency limit of the crate: the
//! reporter's posts to XZepr ([`ReporterConfig::concurrency`](crate::report::ReporterConfig::concurrency)),
//! async handlers' calls ([`SourceOptions::max_in_flight`](crate::source::SourceOptions::max_in_flight))
//! and `run --forward`'s requests. A call takes a [`Permit`] (waiting while
//! the limit is reached) and gives it back with how it went:
//!
//! ```text
//!  acquire ──(limit reached: wait, FIFO; Retry-After: wait until then)──> Permit
//!  call the service ...
//!  permit.release(Outcome::Ok | Overloaded { retry_after } | Timeout | Ignored)
//!        └─> the latency and the outcome feed the controller ─> the new limit
//! ```
//!
//! A [`Concurrency::Fixed`] limit never moves. A [`Concurrency::Adaptive`]
//! one starts at `min`, grows while latency stays near the lowest seen and
//! the calls fill it, and is cut on rising latency, timeouts and overload
//! answers (429, 503), honouring `Retry-After`; the rules are in
//! `controller.rs`. Each limit's current value is the gauge
//! `xzepr_consumer_concurrency_limit{limit="reporter"|"handler"|"forward"}`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::time::Duration;
//! use xzepr_consumer::flow_control::{Concurrency, Limiter, Outcome};
//!
//! let limiter = Limiter::new("forward", Concurrency::Adaptive { min: 1, max: 64 });
//! let permit = limiter.acquire().await;
//! // ... the call ...
//! permit.release(Outcome::Overloaded { retry_after: Some(Duration::from_millis(10)) });
//! assert_eq!(limiter.limit(), 1);
//! # }
//! ```

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

mod controller;
mod rate;

pub use controller::Outcome;
pub use rate::{RateLimit, RateLimiter};

use crate::config::ConfigError;
use controller::Controller;

/// Longest `Retry-After` honoured: a service asking for more is waited on a
/// minute at a time (as the reporter's retries do).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How many calls may run at once.
///
/// In configuration: a number (`8`) for a fixed limit, or
/// `{"adaptive": {"min": 1, "max": 256}}` (each bound optional: `min`
/// defaults to 1, `max` to 256). On the command line: `8`, `adaptive`, or
/// `adaptive:1-256`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Concurrency {
    /// Always this many.
    Fixed(usize),
    /// Between `min` and `max`, found from the service's answers.
    Adaptive {
        /// The least: the limit never goes below it, and starts there.
        min: usize,
        /// The most: the limit never grows past it. Also what the stage
        /// around the limit is sized for (tasks, queue slots).
        max: usize,
    },
}

/// Default bounds of `adaptive` without them: from 1 (a service's capacity is
/// found, not assumed) to 256 (the XZepr client's connection pool, twice the
/// reporter's fixed default).
pub const ADAPTIVE_MIN: usize = 1;
/// See [`ADAPTIVE_MIN`].
pub const ADAPTIVE_MAX: usize = 256;

impl Concurrency {
    /// The most calls it ever lets run.
    pub fn max(&self) -> usize {
        match *self {
            Concurrency::Fixed(n) => n,
            Concurrency::Adaptive { max, .. } => max,
        }
    }

    /// Whether it adapts.
    pub fn is_adaptive(&self) -> bool {
        matches!(self, Concurrency::Adaptive { .. })
    }

    /// What is wrong with the bounds, if anything.
    pub(crate) fn problem(&self) -> Option<&'static str> {
        match *self {
            Concurrency::Fixed(0) => Some("must be at least 1"),
            Concurrency::Adaptive { min: 0, .. } => Some("adaptive: min must be at least 1"),
            Concurrency::Adaptive { min, max } if max < min => {
                Some("adaptive: max must be at least min")
            }
            _ => None,
        }
    }

    /// Checks the bounds; `field` names the setting in the error.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for a limit of 0, a `min` of 0, or a `max`
    /// below `min`.
    pub fn validate(&self, field: &'static str) -> Result<(), ConfigError> {
        match self.problem() {
            Some(expected) => Err(ConfigError::Invalid {
                name: field,
                value: self.to_string(),
                expected,
            }),
            None => Ok(()),
        }
    }
}

impl From<usize> for Concurrency {
    fn from(n: usize) -> Self {
        Concurrency::Fixed(n)
    }
}

impl std::fmt::Display for Concurrency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Concurrency::Fixed(n) => write!(f, "{n}"),
            Concurrency::Adaptive { min, max } => write!(f, "adaptive:{min}-{max}"),
        }
    }
}

impl FromStr for Concurrency {
    type Err = String;

    /// `8`, `adaptive` or `adaptive:MIN-MAX`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let expected = || format!("{s:?}: expected N, `adaptive` or `adaptive:MIN-MAX`");
        if let Ok(n) = s.parse::<usize>() {
            return Ok(Concurrency::Fixed(n));
        }
        let rest = s.strip_prefix("adaptive").ok_or_else(expected)?;
        if rest.is_empty() {
            return Ok(Concurrency::Adaptive {
                min: ADAPTIVE_MIN,
                max: ADAPTIVE_MAX,
            });
        }
        let (min, max) = rest
            .strip_prefix(':')
            .and_then(|r| r.split_once('-'))
            .ok_or_else(expected)?;
        let num = |v: &str| v.trim().parse::<usize>().map_err(|_| expected());
        Ok(Concurrency::Adaptive {
            min: num(min)?,
            max: num(max)?,
        })
    }
}

/// The configuration form: a number, or `{"adaptive": {...}}`.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Repr {
    Fixed(usize),
    Adaptive { adaptive: Bounds },
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Bounds {
    #[serde(default = "adaptive_min")]
    min: usize,
    #[serde(default = "adaptive_max")]
    max: usize,
}

fn adaptive_min() -> usize {
    ADAPTIVE_MIN
}

fn adaptive_max() -> usize {
    ADAPTIVE_MAX
}

impl serde::Serialize for Concurrency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Concurrency::Fixed(n) => Repr::Fixed(n),
            Concurrency::Adaptive { min, max } => Repr::Adaptive {
                adaptive: Bounds { min, max },
            },
        }
        .serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Concurrency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Repr::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a number or {\"adaptive\": {\"min\": N, \"max\": N}}",
            )
        })? {
            Repr::Fixed(n) => Ok(Concurrency::Fixed(n)),
            Repr::Adaptive {
                adaptive: Bounds { min, max },
            } => Ok(Concurrency::Adaptive { min, max }),
        }
    }
}

/// A concurrency limit that calls take permits from; cheap to clone (clones
/// share the limit). See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: &'static str,
    concurrency: Concurrency,
    permits: Arc<Semaphore>,
    /// The limit as last applied to `permits`, for the gauge.
    limit: AtomicUsize,
    in_flight: AtomicUsize,
    /// Times the limit was cut.
    cuts: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// `None` for a fixed limit.
    controller: Option<Controller>,
    /// Permits still to take out of circulation after a cut: those in use
    /// when it came are forgotten as they come back.
    debt: usize,
    /// Nothing is let in before this (a `Retry-After`); tokio's clock, so a
    /// paused test clock holds it too.
    hold_until: Option<tokio::time::Instant>,
}

impl Limiter {
    /// A limit named `name` (the gauge's `limit` label). `concurrency` is
    /// expected to be valid ([`Concurrency::validate`]); a bound of 0 counts
    /// as 1.
    pub fn new(name: &'static str, concurrency: Concurrency) -> Self {
        let concurrency = match concurrency {
            Concurrency::Fixed(n) => Concurrency::Fixed(n.max(1)),
            Concurrency::Adaptive { min, max } => Concurrency::Adaptive {
                min: min.max(1),
                max: max.max(min.max(1)),
            },
        };
        let controller = match concurrency {
            Concurrency::Fixed(_) => None,
            Concurrency::Adaptive { min, max } => Some(Controller::new(min, max, Instant::now())),
        };
        let start = controller
            .as_ref()
            .map_or(concurrency.max(), Controller::limit);
        Limiter {
            inner: Arc::new(Inner {
                name,
                concurrency,
                permits: Arc::new(Semaphore::new(start)),
                limit: AtomicUsize::new(start),
                in_flight: AtomicUsize::new(0),
                cuts: AtomicU64::new(0),
                state: Mutex::new(State {
                    controller,
                    debt: 0,
                    hold_until: None,
                }),
            }),
        }
    }

    /// The name given at [`Limiter::new`].
    pub fn name(&self) -> &'static str {
        self.inner.name
    }

    /// The limit's configuration.
    pub fn concurrency(&self) -> Concurrency {
        self.inner.concurrency
    }

    /// How many calls may run at once now.
    pub fn limit(&self) -> usize {
        self.inner.limit.load(Relaxed)
    }

    /// Calls holding a permit now.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Relaxed)
    }

    /// Times the limit was cut (latency, overload or timeout).
    pub fn cuts(&self) -> u64 {
        self.inner.cuts.load(Relaxed)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for room under the limit (in arrival order), and past any
    /// `Retry-After` the service asked for.
    pub async fn acquire(&self) -> Permit {
        loop {
            let hold = self.state().hold_until;
            if let Some(until) = hold.filter(|u| *u > tokio::time::Instant::now()) {
                tokio::time::sleep_until(until).await;
            }
            // The semaphore is never closed.
            let Ok(permit) = Arc::clone(&self.inner.permits).acquire_owned().await else {
                continue;
            };
            let mut st = self.state();
            if st
                .hold_until
                .is_some_and(|u| u > tokio::time::Instant::now())
            {
                // A Retry-After came while this call waited: it waits too.
                continue;
            }
            let running = self.inner.in_flight.fetch_add(1, Relaxed) + 1;
            if let Some(c) = st.controller.as_mut() {
                c.acquired(running);
            }
            return Permit {
                limiter: self.clone(),
                permit: Some(permit),
                started: Instant::now(),
            };
        }
    }

    fn release(&self, permit: OwnedSemaphorePermit, outcome: Outcome, latency: Duration) {
        self.inner.in_flight.fetch_sub(1, Relaxed);
        let mut st = self.state();
        if st.debt > 0 {
            st.debt -= 1;
            permit.forget();
        } else {
            drop(permit);
        }
        let now = Instant::now();
        if let Outcome::Overloaded {
            retry_after: Some(after),
        } = outcome
        {
            let until = tokio::time::Instant::now() + after.min(MAX_RETRY_AFTER);
            st.hold_until = Some(st.hold_until.map_or(until, |u| u.max(until)));
        }
        let Some(c) = st.controller.as_mut() else {
            return;
        };
        let before = c.limit();
        c.record(outcome, latency, now);
        let after = c.limit();
        if after != before {
            self.apply(&mut st, before, after);
        }
    }

    /// Moves the semaphore from `old` to `new` permits.
    fn apply(&self, st: &mut State, old: usize, new: usize) {
        let sem = &self.inner.permits;
        if new > old {
            let owed = st.debt.min(new - old);
            st.debt -= owed;
            sem.add_permits(new - old - owed);
        } else {
            let cut = old - new;
            let forgotten = sem.forget_permits(cut);
            st.debt += cut - forgotten;
            self.inner.cuts.fetch_add(1, Relaxed);
        }
        self.inner.limit.store(new, Relaxed);
        tracing::debug!(
            limit = self.inner.name,
            old,
            new,
            "Concurrency limit moved."
        );
    }
}

/// Room for one call under a [`Limiter`]; give it back with
/// [`Permit::release`]. Dropped unreleased (the call was cancelled), it is
/// released as [`Outcome::Ignored`].
#[derive(Debug)]
#[must_use = "a permit is released with the call's outcome"]
pub struct Permit {
    limiter: Limiter,
    permit: Option<OwnedSemaphorePermit>,
    started: Instant,
}

impl Permit {
    /// The call ended with `outcome`; its latency is the time since the
    /// permit was acquired.
    pub fn release(mut self, outcome: Outcome) {
        if let Some(p) = self.permit.take() {
            self.limiter.release(p, outcome, self.started.elapsed());
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            self.limiter
                .release(p, Outcome::Ignored, self.started.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_reads_as_a_number_or_adaptive_and_round_trips() {
        let c: Concurrency = serde_json::from_str("8").unwrap();
        assert_eq!(c, Concurrency::Fixed(8));
        let c: Concurrency = serde_json::from_str(r#"{"adaptive": {"max": 64}}"#).unwrap();
        assert_eq!(c, Concurrency::Adaptive { min: 1, max: 64 });
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"adaptive":{"min":1,"max":64}}"#
        );
        let e = serde_json::from_str::<Concurrency>(r#"{"adaptive": {"mx": 4}}"#).unwrap_err();
        assert!(e.to_string().contains("adaptive"), "{e}");
        assert_eq!(
            "adaptive:2-9".parse(),
            Ok(Concurrency::Adaptive { min: 2, max: 9 })
        );
        assert_eq!(
            "adaptive".parse(),
            Ok(Concurrency::Adaptive {
                min: ADAPTIVE_MIN,
                max: ADAPTIVE_MAX
            })
        );
        assert_eq!("16".parse(), Ok(Concurrency::Fixed(16)));
        assert!("adaptive:9".parse::<Concurrency>().is_err());
        assert!("lots".parse::<Concurrency>().is_err());
    }

    #[test]
    fn bounds_are_checked_naming_the_field() {
        let e = Concurrency::Fixed(0).validate("max_in_flight").unwrap_err();
        assert!(e.to_string().contains("max_in_flight"), "{e}");
        let e = Concurrency::Adaptive { min: 8, max: 4 }
            .validate("concurrency")
            .unwrap_err();
        assert!(e.to_string().contains("max must be at least min"), "{e}");
        assert!(Concurrency::Adaptive { min: 0, max: 4 }
            .validate("x")
            .is_err());
        assert!(Concurrency::Adaptive { min: 4, max: 4 }
            .validate("x")
            .is_ok());
    }

    #[tokio::test]
    async fn a_fixed_limit_lets_in_that_many_and_the_next_waits() {
        let l = Limiter::new("t", Concurrency::Fixed(2));
        let a = l.acquire().await;
        let _b = l.acquire().await;
        assert_eq!(l.in_flight(), 2);
        let waiting = tokio::spawn({
            let l = l.clone();
            async move { l.acquire().await.release(Outcome::Ok) }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        a.release(Outcome::Overloaded { retry_after: None });
        waiting.await.unwrap();
        assert_eq!(l.limit(), 2, "fixed: never moves");
    }

    #[tokio::test]
    async fn a_cut_takes_permits_in_use_out_as_they_come_back() {
        let l = Limiter::new("t", Concurrency::Adaptive { min: 1, max: 8 });
        // Grow it to 8 by hand: every window full and fast.
        {
            let mut st = l.state();
            let c = st.controller.as_mut().unwrap();
            *c = Controller::new(1, 8, Instant::now());
            let mut now = Instant::now();
            while c.limit() < 8 {
                let n = c.limit();
                for i in 0..n {
                    c.acquired(i + 1);
                }
                now += Duration::from_millis(10);
                for _ in 0..n {
                    c.record(Outcome::Ok, Duration::from_millis(10), now);
                }
            }
            l.apply(&mut st, 1, 8);
        }
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(l.acquire().await);
        }
        held.pop()
            .unwrap()
            .release(Outcome::Overloaded { retry_after: None });
        assert_eq!(l.limit(), 5, "8 × 0.7");
        // Seven still out, five allowed: the next two returned are forgotten.
        for p in held.drain(..) {
            p.release(Outcome::Ignored);
        }
        assert_eq!(l.inner.permits.available_permits(), 5);
        assert_eq!(l.cuts(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_holds_every_call_until_then() {
        let l = Limiter::new("t", Concurrency::Adaptive { min: 2, max: 4 });
        let began = tokio::time::Instant::now();
        l.acquire().await.release(Outcome::Overloaded {
            retry_after: Some(Duration::from_secs(3)),
        });
        let p = l.acquire().await;
        assert!(began.elapsed() >= Duration::from_secs(3));
        p.release(Outcome::Ok);
    }
}
