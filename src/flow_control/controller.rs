//! The adaptive limit's arithmetic, apart from any clock or task: fed each
//! call's outcome and latency, it says what the limit is now. Pure, so its
//! rules are tested with made-up times.
//!
//! An AIMD limit over a latency gradient, in the manner of TCP congestion
//! avoidance, Vector's adaptive request concurrency and Netflix's
//! concurrency-limits:
//!
//! - **Baseline**: the lowest mean latency of any window seen (the service's
//!   latency unloaded). A window's mean, not a single call, so one lucky
//!   answer does not set it.
//! - **Windows**: the limit changes at most once per window, a window being
//!   one mean latency long (at least [`MIN_WINDOW`]): the effect of a change
//!   shows in the next window's answers, not in the ones already on their way.
//! - **Grow** (additive): a window whose calls filled the limit and whose mean
//!   stayed within [`GROW_BELOW`] × the baseline raises the limit by
//!   `max(1, √limit)`: fast from a low start, a few steps near the knee.
//!   Between that and [`TOLERANCE`] × the baseline the limit holds.
//! - **Cut on latency** (multiplicative): a window whose mean passed the
//!   tolerance multiplies the limit by [`LATENCY_CUT`].
//! - **Cut on overload** (multiplicative, at once): an answer that says the
//!   service is overloaded (429, 503, a handler's `overloaded`) or a timeout
//!   multiplies the limit by [`OVERLOAD_CUT`], once per window however many
//!   such answers come back in it (they were all sent at the old limit).
//! - **A moved floor**: a service whose unloaded latency rose for good (a
//!   slower dependency, not load) would keep the limit at `min` for ever; at
//!   `min` with the mean still too high to grow, the baseline moves a
//!   twentieth of the way toward the mean each window, so the limit can grow
//!   again from there.

use std::time::{Duration, Instant};

/// Mean latency over the baseline past which a window counts as congested.
/// 1.5: a service at its knee answers within that; one queueing answers later
/// by the length of its queue.
pub(crate) const TOLERANCE: f64 = 1.5;
/// Mean latency over the baseline under which a full window grows the limit;
/// between it and [`TOLERANCE`] the limit holds, so it settles in that band
/// instead of stepping past the tolerance and back.
pub(crate) const GROW_BELOW: f64 = 1.2;
/// The limit after a congested window, as a share of the limit before.
pub(crate) const LATENCY_CUT: f64 = 0.9;
/// The limit after an overload answer or a timeout, as a share of before: a
/// service that says it is overloaded is past its knee, not near it.
pub(crate) const OVERLOAD_CUT: f64 = 0.7;
/// Shortest window: below it latencies are scheduler noise.
pub(crate) const MIN_WINDOW: Duration = Duration::from_millis(5);
/// How far the baseline moves toward the mean per window at `min`.
const FLOOR_DRIFT: f64 = 0.05;

/// How a call under a limit ended, as far as the limit is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Answered (successfully, or with an error that says nothing about load):
    /// its latency counts.
    Ok,
    /// The service said it is overloaded (429, 503, a handler's
    /// [`HandlerError::overloaded`](crate::handler::HandlerError::overloaded)):
    /// the limit is cut, and with `retry_after`, nothing is sent until then.
    Overloaded {
        /// The service's `Retry-After`, if it gave one.
        retry_after: Option<Duration>,
    },
    /// The call timed out: taken as overload.
    Timeout,
    /// Neither: the call was cancelled or failed before reaching the service
    /// (its latency would say nothing).
    Ignored,
}

impl Outcome {
    /// An HTTP answer's outcome: 429 and 503 say the service is overloaded
    /// (with its `Retry-After`); any other answer's latency counts.
    pub fn of_status(status: u16, retry_after: Option<Duration>) -> Self {
        match status {
            429 | 503 => Outcome::Overloaded { retry_after },
            _ => Outcome::Ok,
        }
    }
}

/// The adaptive limit's state.
#[derive(Debug, Clone)]
pub(crate) struct Controller {
    min: usize,
    max: usize,
    limit: f64,
    /// Lowest window mean seen, in seconds.
    baseline: Option<f64>,
    window_start: Instant,
    /// Sum of the window's latencies (seconds) and how many.
    sum: f64,
    samples: u32,
    /// Whether the calls filled the limit at some point in the window.
    reached: bool,
    /// The last window's mean, the window's length.
    last_mean: Option<f64>,
    /// When the limit was last cut for an overload.
    last_cut: Option<Instant>,
}

impl Controller {
    /// A limit between `min` and `max` (`1 <= min <= max`, checked by the
    /// caller), starting at `min`: a service's capacity is found, never assumed.
    pub(crate) fn new(min: usize, max: usize, now: Instant) -> Self {
        Controller {
            min,
            max,
            limit: min as f64,
            baseline: None,
            window_start: now,
            sum: 0.0,
            samples: 0,
            reached: false,
            last_mean: None,
            last_cut: None,
        }
    }

    /// The limit, as a whole number of calls.
    pub(crate) fn limit(&self) -> usize {
        (self.limit as usize).clamp(self.min, self.max)
    }

    /// A call was let in with `in_flight` calls running (itself included).
    pub(crate) fn acquired(&mut self, in_flight: usize) {
        if in_flight >= self.limit() {
            self.reached = true;
        }
    }

    fn window(&self) -> Duration {
        self.last_mean
            .map_or(MIN_WINDOW, Duration::from_secs_f64)
            .max(MIN_WINDOW)
    }

    /// A call ended with `outcome` after `latency`, at `now`.
    pub(crate) fn record(&mut self, outcome: Outcome, latency: Duration, now: Instant) {
        match outcome {
            Outcome::Ignored => {}
            Outcome::Overloaded { .. } | Outcome::Timeout => {
                let fresh = self
                    .last_cut
                    .is_none_or(|at| now.saturating_duration_since(at) >= self.window());
                if fresh {
                    self.limit = (self.limit * OVERLOAD_CUT).max(self.min as f64);
                    self.last_cut = Some(now);
                    self.restart(now);
                }
            }
            Outcome::Ok => {
                self.sum += latency.as_secs_f64();
                self.samples += 1;
                if now.saturating_duration_since(self.window_start) >= self.window() {
                    self.close_window(now);
                }
            }
        }
    }

    fn restart(&mut self, now: Instant) {
        self.window_start = now;
        self.sum = 0.0;
        self.samples = 0;
        self.reached = false;
    }

    fn close_window(&mut self, now: Instant) {
        let mean = self.sum / f64::from(self.samples.max(1));
        let baseline = *self.baseline.get_or_insert(mean);
        let baseline = if mean < baseline {
            self.baseline = Some(mean);
            mean
        } else {
            baseline
        };
        let near = mean <= baseline * GROW_BELOW;
        if !near && self.limit() <= self.min {
            self.baseline = Some(baseline + (mean - baseline) * FLOOR_DRIFT);
        }
        if mean > baseline * TOLERANCE {
            self.limit = (self.limit * LATENCY_CUT).max(self.min as f64);
        } else if self.reached && near {
            self.limit = (self.limit + self.limit.sqrt().max(1.0)).min(self.max as f64);
        }
        self.last_mean = Some(mean);
        self.restart(now);
    }

    /// The baseline latency, once a window closed.
    #[cfg(test)]
    pub(crate) fn baseline(&self) -> Option<Duration> {
        self.baseline.map(Duration::from_secs_f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Runs `windows` windows of `per` calls, each taking `latency(limit)`,
    /// with the limit filled; returns the limit after each window.
    fn drive(
        c: &mut Controller,
        now: &mut Instant,
        windows: usize,
        latency: impl Fn(usize) -> Duration,
    ) -> Vec<usize> {
        let mut seen = Vec::new();
        for _ in 0..windows {
            let lat = latency(c.limit());
            let n = c.limit();
            for i in 0..n {
                c.acquired(i + 1);
            }
            // The window's answers all arrive one latency later.
            *now += lat.max(MIN_WINDOW);
            for _ in 0..n {
                c.record(Outcome::Ok, lat, *now);
            }
            seen.push(c.limit());
        }
        seen
    }

    #[test]
    fn it_grows_from_min_while_latency_stays_at_its_baseline() {
        let mut now = Instant::now();
        let mut c = Controller::new(1, 64, now);
        let limits = drive(&mut c, &mut now, 40, |_| 10 * MS);
        assert!(limits.windows(2).all(|w| w[1] >= w[0]), "{limits:?}");
        assert_eq!(*limits.last().unwrap(), 64, "up to max: {limits:?}");
        assert_eq!(c.baseline(), Some(10 * MS));
    }

    #[test]
    fn it_settles_near_a_knee_and_keeps_latency_within_the_tolerance() {
        // Flat 10 ms up to 20 calls, then rising linearly.
        let knee = |n: usize| MS.mul_f64(10.0 * (n as f64 / 20.0).max(1.0));
        let mut now = Instant::now();
        let mut c = Controller::new(1, 500, now);
        let limits = drive(&mut c, &mut now, 300, knee);
        let settled = &limits[100..];
        let (lo, hi) = (
            *settled.iter().min().unwrap(),
            *settled.iter().max().unwrap(),
        );
        assert!(lo >= 18, "stays at or near the knee: {settled:?}");
        assert!(
            knee(hi) <= MS.mul_f64(10.0 * TOLERANCE * 1.2),
            "latency near the tolerance at most: {hi} → {:?}",
            knee(hi)
        );
    }

    #[test]
    fn an_overload_cuts_once_per_window_and_not_below_min() {
        let mut now = Instant::now();
        let mut c = Controller::new(2, 100, now);
        drive(&mut c, &mut now, 30, |_| 10 * MS);
        let before = c.limit();
        assert!(before > 50, "{before}");
        // A burst of 503s sent at the old limit: one cut.
        for _ in 0..20 {
            c.record(Outcome::Overloaded { retry_after: None }, 10 * MS, now);
        }
        let once = c.limit();
        assert_eq!(once, (before as f64 * OVERLOAD_CUT) as usize);
        now += 20 * MS;
        c.record(Outcome::Timeout, 10 * MS, now);
        assert!(c.limit() < once);
        for _ in 0..100 {
            now += 20 * MS;
            c.record(Outcome::Timeout, 10 * MS, now);
        }
        assert_eq!(c.limit(), 2, "min holds");
    }

    #[test]
    fn rising_latency_cuts_and_the_limit_recovers_once_it_falls() {
        let mut now = Instant::now();
        let mut c = Controller::new(1, 64, now);
        drive(&mut c, &mut now, 30, |_| 10 * MS);
        assert_eq!(c.limit(), 64);
        let slow = drive(&mut c, &mut now, 10, |_| 40 * MS);
        assert!(*slow.last().unwrap() < 30, "{slow:?}");
        let healthy = drive(&mut c, &mut now, 30, |_| 10 * MS);
        assert_eq!(*healthy.last().unwrap(), 64, "{healthy:?}");
    }

    #[test]
    fn it_does_not_grow_while_demand_stays_under_the_limit() {
        let mut now = Instant::now();
        let mut c = Controller::new(4, 64, now);
        for _ in 0..50 {
            c.acquired(1);
            now += 10 * MS;
            c.record(Outcome::Ok, 10 * MS, now);
        }
        assert_eq!(c.limit(), 4);
    }

    #[test]
    fn a_floor_that_moved_for_good_is_learnt_at_min() {
        let mut now = Instant::now();
        let mut c = Controller::new(1, 16, now);
        drive(&mut c, &mut now, 30, |_| 10 * MS);
        // From now on the service takes 50 ms however loaded.
        drive(&mut c, &mut now, 400, |_| 50 * MS);
        assert!(c.baseline().unwrap() > 30 * MS, "{:?}", c.baseline());
        assert_eq!(c.limit(), 16, "grown back");
    }

    #[test]
    fn ignored_outcomes_change_nothing() {
        let now = Instant::now();
        let mut c = Controller::new(3, 9, now);
        c.record(Outcome::Ignored, Duration::from_secs(9), now + MS * 100);
        assert_eq!((c.limit(), c.baseline()), (3, None));
    }
}
