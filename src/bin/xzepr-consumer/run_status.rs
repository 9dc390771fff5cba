//! `run`'s status while it consumes: a live line on a terminal, else a log
//! line every [`LOG_EVERY`], and the wait for the signal that stops it.

use std::io::IsTerminal;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use xzepr_consumer::pipeline::RunningPipeline;

use crate::run::signal;

/// How often the status is redrawn on a terminal.
const STATUS_EVERY: Duration = Duration::from_millis(500);
/// How often a status line is logged when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Shows the status until a signal or until the consumer stops by itself;
/// returns why it stopped.
pub(crate) async fn watch(running: &RunningPipeline) -> &'static str {
    let mut status = Status::new(std::io::stderr().is_terminal());
    let signalled = signal();
    tokio::pin!(signalled);
    let mut tick = tokio::time::interval(STATUS_EVERY);
    let reason = loop {
        tokio::select! {
            s = &mut signalled => {
                raise_stop();
                break s.unwrap_or("no signal handler");
            }
            _ = tick.tick() => {
                if running.source().is_finished() {
                    break "the consumer stopped";
                }
                status.update(running);
            }
        }
    };
    status.finish();
    reason
}

/// Whether a stop signal came (set once, never cleared: `run` stops).
static STOPPING: AtomicBool = AtomicBool::new(false);
/// Wakes those waiting in [`stopping_within`].
static STOP: Notify = Notify::const_new();

fn raise_stop() {
    STOPPING.store(true, SeqCst);
    STOP.notify_waiters();
}

/// Whether `run` is stopping on a signal, or starts to within `within`: the
/// signal that killed a program may be seen by the program's reaper before
/// `run`'s own listener has run.
pub(crate) async fn stopping_within(within: Duration) -> bool {
    let notified = STOP.notified();
    tokio::pin!(notified);
    // Registered before the check, so a stop raised in between still wakes it.
    notified.as_mut().enable();
    if STOPPING.load(SeqCst) {
        return true;
    }
    tokio::time::timeout(within, notified).await.is_ok() || STOPPING.load(SeqCst)
}

/// The live line on a terminal, or a periodic log line otherwise.
struct Status {
    bar: Option<indicatif::ProgressBar>,
    rates: Rates,
}

impl Status {
    fn new(terminal: bool) -> Self {
        let bar = terminal.then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar
        });
        Status {
            bar,
            rates: Rates::new(Instant::now()),
        }
    }

    fn update(&mut self, running: &RunningPipeline) {
        let m = running.metrics();
        // Summed over the assigned partitions; unknown until each has one.
        let partitions = running.source().partitions();
        let lag = if partitions.is_empty() {
            None
        } else {
            partitions.iter().map(|p| p.lag).sum::<Option<i64>>()
        };
        let done = m.handled + m.filtered + m.own_skipped + m.malformed;
        let (live_rate, log_rate) = self.rates.sample(Instant::now(), done);
        let in_flight = running.source().stats().in_flight.load(Relaxed);
        if let Some(bar) = &self.bar {
            let lag = lag.map_or_else(|| "…".to_owned(), |l| l.to_string());
            bar.set_message(format!(
                "{live_rate:.0} events/s · {in_flight} in flight · {} handled · {} failed · {} skipped · lag {lag}",
                m.handled,
                m.handler_failed,
                m.filtered + m.own_skipped
            ));
            bar.tick();
        } else if let Some(rate) = log_rate {
            tracing::info!(
                events_per_s = rate.round(),
                in_flight,
                handled = m.handled,
                failed = m.handler_failed,
                skipped = m.filtered + m.own_skipped,
                malformed = m.malformed,
                lag,
                "Status."
            );
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The rates the status shows, from samples of the count of events done.
#[derive(Debug)]
struct Rates {
    /// Where the live line's rate was last computed.
    live: Window,
    live_rate: f64,
    /// Where the previous log line was (or the start).
    log: Window,
}

/// A count of events done, and when.
#[derive(Debug, Clone, Copy)]
struct Window {
    at: Instant,
    done: u64,
}

impl Window {
    /// Events per second from this sample to `now`, `done`.
    fn rate_to(&self, now: Instant, done: u64) -> f64 {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        if secs > 0.0 {
            done.saturating_sub(self.done) as f64 / secs
        } else {
            0.0
        }
    }
}

impl Rates {
    fn new(now: Instant) -> Self {
        let start = Window { at: now, done: 0 };
        Rates {
            live: start,
            live_rate: 0.0,
            log: start,
        }
    }

    /// Takes the count `done` at `now`: the live line's rate (over about the
    /// last second), and when a log line is due, the rate it shows.
    fn sample(&mut self, now: Instant, done: u64) -> (f64, Option<f64>) {
        if now.saturating_duration_since(self.live.at) >= Duration::from_secs(1) {
            self.live_rate = self.live.rate_to(now, done);
            self.live = Window { at: now, done };
        }
        // Over the whole log window: the last second's rate would say 0 for a
        // window whose burst of work came earlier.
        let log = (now.saturating_duration_since(self.log.at) >= LOG_EVERY).then(|| {
            let rate = self.log.rate_to(now, done);
            self.log = Window { at: now, done };
            rate
        });
        (self.live_rate, log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_line_shows_the_rate_over_its_whole_window() {
        let t0 = Instant::now();
        let mut rates = Rates::new(t0);
        let mut logged = Vec::new();
        // Sampled every 500 ms for 20 s: 4,000 events done in the first two
        // seconds, then nothing until 15 s, then 1,000 more by 16 s.
        for tick in 1..=40u64 {
            let done = match tick {
                ..=4 => tick * 1000,
                5..=30 => 4000,
                31..=32 => 4000 + (tick - 30) * 500,
                _ => 5000,
            };
            let now = t0 + Duration::from_millis(500 * tick);
            if let (_, Some(rate)) = rates.sample(now, done) {
                logged.push(rate);
            }
        }
        assert_eq!(logged, vec![400.0, 100.0], "events over each 10 s window");
    }

    #[test]
    fn the_live_rate_follows_the_last_second() {
        let t0 = Instant::now();
        let mut rates = Rates::new(t0);
        assert_eq!(rates.sample(t0 + Duration::from_millis(500), 300).0, 0.0);
        assert_eq!(rates.sample(t0 + Duration::from_secs(1), 600).0, 600.0);
        assert_eq!(rates.sample(t0 + Duration::from_secs(2), 600).0, 0.0);
    }
}
