//! The reporter's gate in front of every post: the circuit breaker (XZepr
//! unreachable) and the refusal hold (XZepr answers 401/403).
//!
//! Both hold the posts (they are not failed) and let one probe out at a time
//! once their wait is over; the probe's outcome decides what comes next. They
//! differ in what opens them and how long they wait:
//! - **unreachable** (connection errors, timeouts, 5xx, 429): after
//!   [`ReporterConfig::breaker_threshold`] consecutive failures, for
//!   [`ReporterConfig::breaker_cooldown`] each time;
//! - **refused** (401/403, which only the operator can fix): at the first
//!   one, for `breaker_cooldown` doubled with each refused probe (with jitter)
//!   up to [`ReporterConfig::unauthorized_hold_max`]. Once the reporter is
//!   closed (every handle dropped), the posts held by a refusal give up
//!   ([`ReportError::Closed`](super::ReportError::Closed)): waiting cannot help, and the drain must end.

use std::sync::atomic::{
    AtomicBool, AtomicU32,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{ReporterConfig, ReporterStats};

/// What a post's answer says about XZepr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// XZepr answered (2xx or a 4xx about the post itself): it is there and
    /// takes this client's credentials.
    Answered,
    /// No usable answer (connection error, timeout, 5xx, 429).
    Unreachable,
    /// 401 or 403: XZepr refuses this client's credentials.
    Refused { status: u16 },
}

/// The gate: closed, open until a deadline, or half-open with one probe out.
pub(super) struct Breaker {
    /// Mirrors `state == Closed`: the per-post fast path reads only this.
    closed: AtomicBool,
    state: Mutex<BreakerState>,
    /// Consecutive unreachable failures.
    failures: AtomicU32,
    /// Consecutive refusals that (re)opened the gate: the hold doubles with each.
    refusals: AtomicU32,
    /// Open because of a refusal (not an outage).
    refusing: AtomicBool,
    /// Wakes the posts waiting on a half-open gate when its probe ends.
    probe_done: tokio::sync::Notify,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    #[default]
    Closed,
    Open {
        until: tokio::time::Instant,
    },
    HalfOpen,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            closed: AtomicBool::new(true),
            state: Mutex::new(BreakerState::Closed),
            failures: AtomicU32::new(0),
            refusals: AtomicU32::new(0),
            refusing: AtomicBool::new(false),
            probe_done: tokio::sync::Notify::new(),
        }
    }
}

/// Whether a post is the half-open gate's probe.
#[derive(Debug, Clone, Copy)]
pub(super) struct Permit {
    pub(super) probe: bool,
}

impl Breaker {
    /// Waits until a post may go out. `None`: the gate holds it for a refusal
    /// and `closing` was cancelled (the reporter is closed), so it gives up.
    pub(super) async fn admit(
        &self,
        cfg: &ReporterConfig,
        closing: &CancellationToken,
    ) -> Option<Permit> {
        loop {
            if self.closed.load(Acquire) {
                return Some(Permit { probe: false });
            }
            let give_up = self.refusing.load(Acquire);
            if give_up && closing.is_cancelled() {
                return None;
            }
            let probe_done = self.probe_done.notified();
            tokio::pin!(probe_done);
            // Registered before the state is read, so a wake-up in between is kept.
            probe_done.as_mut().enable();
            let state = *self.state.lock().unwrap_or_else(|p| p.into_inner());
            match state {
                BreakerState::Closed => return Some(Permit { probe: false }),
                BreakerState::Open { until } => {
                    if until > tokio::time::Instant::now() {
                        tokio::select! {
                            () = tokio::time::sleep_until(until) => {}
                            () = probe_done => {}
                            () = closing.cancelled(), if give_up => return None,
                        }
                        continue;
                    }
                    let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    if *st == state {
                        *st = BreakerState::HalfOpen;
                        return Some(Permit { probe: true });
                    }
                }
                BreakerState::HalfOpen => {
                    // The cool-down bounds the wait should the probe's task vanish.
                    tokio::select! {
                        _ = tokio::time::timeout(cfg.breaker_cooldown, probe_done) => {}
                        () = closing.cancelled(), if give_up => return None,
                    }
                    let st = *self.state.lock().unwrap_or_else(|p| p.into_inner());
                    if st == BreakerState::HalfOpen {
                        // Nobody reported: let this post probe instead.
                        return Some(Permit { probe: true });
                    }
                }
            }
        }
    }

    /// Records a post's answer: an unreachable failure counts toward opening
    /// (and reopens a half-open gate); a refusal opens it at once; an answer
    /// closes it.
    pub(super) fn record(
        &self,
        permit: Permit,
        answer: Answer,
        cfg: &ReporterConfig,
        stats: &ReporterStats,
    ) {
        if answer == Answer::Answered && self.closed.load(Acquire) {
            // The common case, without the lock.
            if self.failures.load(Relaxed) != 0 {
                self.failures.store(0, Relaxed);
            }
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        match answer {
            Answer::Answered => {
                self.failures.store(0, Relaxed);
                self.refusals.store(0, Relaxed);
                if *st != BreakerState::Closed {
                    *st = BreakerState::Closed;
                    self.closed.store(true, Release);
                    self.refusing.store(false, Release);
                    if stats.breaker_open.swap(false, Relaxed) {
                        tracing::info!("XZepr breaker closed.");
                    }
                    if stats.unauthorized.swap(false, Relaxed) {
                        tracing::info!("XZepr accepts the reporter's credentials again.");
                    }
                    self.probe_done.notify_waiters();
                }
            }
            Answer::Unreachable => {
                let run = self.failures.fetch_add(1, Relaxed) + 1;
                let open = now.checked_add(cfg.breaker_cooldown).unwrap_or(now);
                if permit.probe || (*st == BreakerState::Closed && run >= cfg.breaker_threshold) {
                    if *st == BreakerState::Closed {
                        stats.breaker_opened.fetch_add(1, Relaxed);
                        tracing::warn!(failures = run, "XZepr breaker open.");
                    }
                    *st = BreakerState::Open { until: open };
                    self.closed.store(false, Release);
                    if !self.refusing.load(Relaxed) {
                        stats.breaker_open.store(true, Relaxed);
                    }
                    self.probe_done.notify_waiters();
                }
            }
            Answer::Refused { status } => {
                // Only the post that opened the gate, or its probe, moves the
                // hold on: the posts already in flight when it opened answer
                // the same, and must not push it to its longest at once.
                if !(permit.probe || *st == BreakerState::Closed) {
                    return;
                }
                let n = self.refusals.fetch_add(1, Relaxed);
                *st = BreakerState::Open {
                    until: now.checked_add(refusal_hold(cfg, n)).unwrap_or(now),
                };
                self.closed.store(false, Release);
                self.refusing.store(true, Release);
                stats.breaker_open.store(false, Relaxed);
                if !stats.unauthorized.swap(true, Relaxed) {
                    tracing::error!(
                        status,
                        "XZepr refuses the reporter (HTTP {status}): check XZEPR_API_TOKEN. \
                         Lifecycle posts are held, and one probes at growing intervals, \
                         until XZepr accepts them."
                    );
                }
                self.probe_done.notify_waiters();
            }
        }
    }
}

/// The hold after the `n`-th consecutive refusal (from 0): the cool-down
/// doubled `n` times, capped at `unauthorized_hold_max`, of which a random
/// half (so instances sharing a token do not probe in step).
fn refusal_hold(cfg: &ReporterConfig, n: u32) -> Duration {
    let cap = cfg
        .breaker_cooldown
        .saturating_mul(1u32 << n.min(16))
        .min(cfg.unauthorized_hold_max.max(cfg.breaker_cooldown));
    cap.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn config(threshold: u32) -> ReporterConfig {
        ReporterConfig {
            breaker_threshold: threshold,
            breaker_cooldown: Duration::from_secs(2),
            unauthorized_hold_max: Duration::from_secs(16),
            ..ReporterConfig::default()
        }
    }

    async fn admit(b: &Breaker, cfg: &ReporterConfig) -> Permit {
        b.admit(cfg, &CancellationToken::new()).await.unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_then_lets_one_probe_through() {
        let cfg = config(3);
        let stats = ReporterStats::default();
        let b = Arc::new(Breaker::default());
        for _ in 0..3 {
            let p = admit(&b, &cfg).await;
            assert!(!p.probe);
            b.record(p, Answer::Unreachable, &cfg, &stats);
        }
        assert_eq!(stats.breaker_opened.load(Relaxed), 1);
        assert!(stats.breaker_open.load(Relaxed));
        let t0 = tokio::time::Instant::now();
        let probe = admit(&b, &cfg).await;
        assert!(probe.probe, "the first post after the cool-down probes");
        assert!(t0.elapsed() >= cfg.breaker_cooldown);
        // While the probe is out, the others wait.
        let waiting = {
            let (b, cfg) = (Arc::clone(&b), cfg.clone());
            tokio::spawn(async move { admit(&b, &cfg).await.probe })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        // The probe fails: open again, for another cool-down.
        b.record(probe, Answer::Unreachable, &cfg, &stats);
        assert!(
            stats.breaker_open.load(Relaxed),
            "still open after a failed probe"
        );
        let reprobe = waiting.await.unwrap();
        assert!(reprobe, "after the second cool-down the waiter probes");
        // It succeeds: closed, and posts go straight out.
        b.record(Permit { probe: true }, Answer::Answered, &cfg, &stats);
        assert!(!admit(&b, &cfg).await.probe);
        assert_eq!(stats.breaker_opened.load(Relaxed), 1);
        assert!(!stats.breaker_open.load(Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_holds_posts_longer_each_probe_and_gives_up_on_close() {
        let cfg = config(20);
        let stats = ReporterStats::default();
        let b = Breaker::default();
        let logged: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let _log = tracing::subscriber::set_default(super::super::tests::CountMessages {
            needle: "XZepr refuses the reporter (HTTP 401)",
            hits: Arc::clone(&logged),
        });
        // The first 401 opens the gate at once; the others in flight then
        // answer the same without moving the hold on.
        let p = admit(&b, &cfg).await;
        b.record(p, Answer::Refused { status: 401 }, &cfg, &stats);
        for _ in 0..10 {
            b.record(
                Permit { probe: false },
                Answer::Refused { status: 401 },
                &cfg,
                &stats,
            );
        }
        assert!(stats.unauthorized.load(Relaxed));
        assert!(
            !stats.breaker_open.load(Relaxed),
            "refused, not unreachable"
        );
        assert_eq!(logged.load(Relaxed), 1, "logged once, not per answer");
        let mut waits = Vec::new();
        for _ in 0..6 {
            let t0 = tokio::time::Instant::now();
            let probe = admit(&b, &cfg).await;
            assert!(probe.probe);
            waits.push(t0.elapsed());
            b.record(probe, Answer::Refused { status: 403 }, &cfg, &stats);
        }
        // Half to all of 2 s, 4 s, 8 s, 16 s, then capped at 16 s.
        for (w, full) in waits.iter().zip([2u64, 4, 8, 16, 16, 16]) {
            let full = Duration::from_secs(full);
            assert!(*w >= full / 2 && *w <= full, "{waits:?}");
        }
        // A closed reporter's held posts give up instead of waiting.
        let closing = CancellationToken::new();
        closing.cancel();
        assert!(b.admit(&cfg, &closing).await.is_none());
        // An answer lifts it: posts go straight out, the state is cleared.
        b.record(Permit { probe: true }, Answer::Answered, &cfg, &stats);
        assert!(!stats.unauthorized.load(Relaxed));
        assert!(!b.admit(&cfg, &closing).await.unwrap().probe);
        // Refused again later: a new state, logged again.
        b.record(
            Permit { probe: false },
            Answer::Refused { status: 401 },
            &cfg,
            &stats,
        );
        assert_eq!(logged.load(Relaxed), 2);
    }
}
