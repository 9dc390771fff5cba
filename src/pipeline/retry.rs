//! The retry policy: which failed handler calls run again, how often, and after
//! how long.

use std::time::Duration;

use crate::handler::HandlerError;

/// Error code of a handler call cancelled (or overrun) at `handler_timeout`.
pub(crate) const TIMEOUT_CODE: &str = "timeout";
/// Error code of a handler call that panicked.
pub(crate) const PANIC_CODE: &str = "handler_panic";

/// How a failed handler call is retried ([`PipelineBuilder::retry`](super::PipelineBuilder::retry)).
///
/// An event is handled up to `max_attempts` times. Between attempts it waits
/// `backoff_base × 2^(n-1)`, capped at `backoff_max`, with full jitter (a random
/// time up to that), so events failing together do not retry together. While
/// it waits only its own lane waits: the rest of its key (under
/// [`Ordering::PerKey`](crate::dispatch::Ordering::PerKey)) or of its partition (under
/// `PerPartition`), never other lanes or a worker thread (a sync handler's job waits on
/// a timer of its worker's runtime while the worker runs other jobs).
/// One `started` is posted before the first attempt, and the terminal post
/// after the last one carries `attempts` in its `details`.
///
/// **Long delays** go through delay topics instead ([`RetryPolicy::delay_topics`]):
/// once an event's attempts in its lane are spent on an error the policy
/// retries, it is produced to `<topic>.retry.<delay>` (the first delay, then
/// the next one on its next failure) and its offset finishes once the broker
/// acknowledged that record, so its partition moves on. The pipeline reads its
/// delay topics too: a delay topic's partition whose next event is not due is
/// paused until it is (nothing held in memory, no polling), then the event runs
/// again with its attempt count carried and no second `started`. After the
/// last delay it fails for good (dead-lettered if a dead-letter topic is set).
/// An event sent to a delay topic **leaves its key's order**: the events
/// behind it in its partition run before it.
///
/// ```
/// use std::time::Duration;
/// use xzepr_consumer::pipeline::RetryPolicy;
///
/// let policy = RetryPolicy::attempts(5)
///     .backoff(Duration::from_millis(100), Duration::from_secs(10))
///     .retry_panics(false);
/// assert_eq!(policy.max_attempts(), 5);
/// ```
///
/// In configuration: `{"max_attempts": 5, "backoff_base": "100ms",
/// "backoff_max": "10s", "retry_errors": true, "retry_timeouts": true,
/// "retry_panics": false, "delay_topics": ["1m", "10m", "1h"]}`, every field
/// optional.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    max_attempts: u32,
    #[serde(with = "crate::config::duration")]
    backoff_base: Duration,
    #[serde(with = "crate::config::duration")]
    backoff_max: Duration,
    retry_errors: bool,
    retry_timeouts: bool,
    retry_panics: bool,
    #[serde(with = "crate::config::duration::list")]
    delay_topics: Vec<Duration>,
}

/// A delay topic is named `<topic>` + this + the delay (`orders.retry.10m`).
pub const DELAY_TOPIC_INFIX: &str = ".retry.";

/// Most delay topics a policy may have: each is a topic to create and to read.
const MAX_DELAY_TOPICS: usize = 16;

impl Default for RetryPolicy {
    /// One attempt: no retries. A handler's work may not be idempotent, and a
    /// retry repeats its side effects, so retrying is the service's choice.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 1,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            retry_errors: true,
            retry_timeouts: true,
            retry_panics: false,
            delay_topics: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// No retries (the default).
    pub fn none() -> Self {
        Self::default()
    }

    /// Up to `n` attempts in all (the first included; 0 counts as 1), with the
    /// defaults: backoff from 200 ms doubling up to 30 s; handler errors and
    /// timeouts retried, panics not (a bug fails the same way again).
    pub fn attempts(n: u32) -> Self {
        RetryPolicy {
            max_attempts: n.max(1),
            ..Self::default()
        }
    }

    /// The same policy with up to `n` attempts in all (0 counts as 1).
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The first delay and the longest one (each at least 1 ms).
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base.max(Duration::from_millis(1));
        self.backoff_max = max.max(self.backoff_base);
        self
    }

    /// Whether errors the handler returns are retried (default yes; an error
    /// marked [`HandlerError::permanent`] never is).
    pub fn retry_errors(mut self, yes: bool) -> Self {
        self.retry_errors = yes;
        self
    }

    /// Whether calls past `handler_timeout` are retried (default yes).
    pub fn retry_timeouts(mut self, yes: bool) -> Self {
        self.retry_timeouts = yes;
        self
    }

    /// Whether panics are retried (default no).
    pub fn retry_panics(mut self, yes: bool) -> Self {
        self.retry_panics = yes;
        self
    }

    /// After its attempts in its lane, an event that failed on an error this
    /// policy retries goes to a delay topic per delay, in order
    /// (`<topic>.retry.1m`, `<topic>.retry.10m`, ...), and runs again from
    /// each once its delay passed (see the type's docs). The topics must exist
    /// (or the cluster create them); the delays must differ.
    pub fn delay_topics(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.delay_topics = delays.into_iter().collect();
        self
    }

    /// The delays of [`RetryPolicy::delay_topics`], in order.
    pub fn delays(&self) -> &[Duration] {
        &self.delay_topics
    }

    /// The delay topics of events from `topic`, in order.
    pub fn delay_topic_names(&self, topic: &str) -> Vec<String> {
        (1..=self.delay_topics.len())
            .filter_map(|stage| self.delay_topic(topic, stage))
            .collect()
    }

    /// The delay topic of events from `topic` at `stage` (1-based), if any.
    pub(crate) fn delay_topic(&self, topic: &str, stage: usize) -> Option<String> {
        let delay = self.delay_topics.get(stage.checked_sub(1)?)?;
        Some(format!(
            "{topic}{DELAY_TOPIC_INFIX}{}",
            crate::config::duration::format(*delay)
        ))
    }

    /// Attempts in all, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Whether a call that failed with `err` on attempt `attempt` runs again.
    /// Refuses what the setters cannot make but a configuration file can.
    pub(crate) fn validate(&self) -> Result<(), crate::config::ConfigError> {
        let bad = |name, value: String, expected| {
            Err(crate::config::ConfigError::Invalid {
                name,
                value,
                expected,
            })
        };
        if self.max_attempts == 0 {
            return bad(
                "retry.max_attempts",
                "0".to_owned(),
                "at least 1 (the first attempt)",
            );
        }
        if self.backoff_base.is_zero() {
            return bad(
                "retry.backoff_base",
                "0s".to_owned(),
                "more than zero, so a failing handler never retries in a hot loop",
            );
        }
        if self.backoff_max < self.backoff_base {
            return bad(
                "retry.backoff_max",
                crate::config::duration::format(self.backoff_max),
                "at least retry.backoff_base",
            );
        }
        if self.delay_topics.len() > MAX_DELAY_TOPICS {
            return bad(
                "retry.delay_topics",
                format!("{} delays", self.delay_topics.len()),
                "at most 16 delays (each is a topic to create and read)",
            );
        }
        for (i, d) in self.delay_topics.iter().enumerate() {
            if d.is_zero() {
                return bad(
                    "retry.delay_topics",
                    "0s".to_owned(),
                    "delays of more than zero",
                );
            }
            if self.delay_topics[..i].contains(d) {
                return bad(
                    "retry.delay_topics",
                    crate::config::duration::format(*d),
                    "different delays (each names its own topic)",
                );
            }
        }
        Ok(())
    }

    /// Refuses delay topics with a `^regex` subscription (their names derive
    /// from the named topics), or that the consumer already reads as sources.
    pub(crate) fn check_subscriptions(
        &self,
        subscriptions: &[String],
    ) -> Result<(), crate::config::ConfigError> {
        if self.delay_topics.is_empty() {
            return Ok(());
        }
        for s in subscriptions {
            let invalid = |value: String, expected| crate::config::ConfigError::Invalid {
                name: "retry.delay_topics",
                value,
                expected,
            };
            if s.starts_with('^') {
                return Err(invalid(
                    format!("with the subscription {s}"),
                    "named topics: each one's delay topics are `<topic>.retry.<delay>`",
                ));
            }
            if s.contains(DELAY_TOPIC_INFIX) {
                return Err(invalid(
                    format!("with the subscribed topic {s}"),
                    "source topics that are not themselves delay topics (the pipeline \
                     reads its delay topics by itself)",
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn retries(&self, err: &HandlerError, attempt: u32) -> bool {
        attempt < self.max_attempts && self.retryable(err)
    }

    /// Whether the policy retries this kind of error at all (the attempts left
    /// aside): in the lane, or through a delay topic.
    pub(crate) fn retryable(&self, err: &HandlerError) -> bool {
        if err.is_permanent() {
            return false;
        }
        match err.code() {
            Some(TIMEOUT_CODE) => self.retry_timeouts,
            Some(PANIC_CODE) => self.retry_panics,
            _ => self.retry_errors,
        }
    }

    /// The wait after failed attempt `attempt` (1-based): full jitter.
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        exp.min(self.backoff_max).mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_retries() {
        let p = RetryPolicy::attempts(3);
        let err = HandlerError::new("boom");
        assert!(p.retries(&err, 1) && p.retries(&err, 2));
        assert!(!p.retries(&err, 3), "the last attempt is the last");
        assert!(!p.retries(&err.clone().permanent(), 1));
        let panic = HandlerError::with_code("x", PANIC_CODE);
        assert!(!p.retries(&panic, 1));
        assert!(p.clone().retry_panics(true).retries(&panic, 1));
        let timeout = HandlerError::with_code("x", TIMEOUT_CODE);
        assert!(p.retries(&timeout, 1));
        assert!(!p.clone().retry_timeouts(false).retries(&timeout, 1));
        assert!(!p.retry_errors(false).retries(&err, 1));
        assert!(!RetryPolicy::none().retries(&err, 1));
        assert_eq!(RetryPolicy::attempts(0).max_attempts(), 1);
    }

    #[test]
    fn delay_topics_are_named_by_their_delays_and_checked() {
        let p = RetryPolicy::attempts(2).delay_topics([
            Duration::from_secs(60),
            Duration::from_secs(600),
            Duration::from_secs(3600),
        ]);
        assert_eq!(
            p.delay_topic_names("orders"),
            ["orders.retry.1m", "orders.retry.10m", "orders.retry.1h"]
        );
        assert_eq!(p.delay_topic("orders", 0), None);
        assert_eq!(p.delay_topic("orders", 4), None);
        p.validate().unwrap();
        p.check_subscriptions(&["orders".to_owned()]).unwrap();
        // The policy reads back from configuration as it was written.
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["delay_topics"], serde_json::json!(["1m", "10m", "1h"]));
        assert_eq!(serde_json::from_value::<RetryPolicy>(json).unwrap(), p);
        let many = RetryPolicy::none().delay_topics((1..=17).map(Duration::from_secs));
        assert!(many
            .validate()
            .unwrap_err()
            .to_string()
            .contains("retry.delay_topics"));
        assert!(p
            .check_subscriptions(&["^orders".to_owned()])
            .unwrap_err()
            .to_string()
            .contains("retry.delay_topics"));
    }

    #[test]
    fn delays_double_up_to_the_cap_with_jitter() {
        let p =
            RetryPolicy::attempts(10).backoff(Duration::from_millis(10), Duration::from_millis(50));
        for _ in 0..200 {
            assert!(p.delay(1) <= Duration::from_millis(10));
            assert!(p.delay(2) <= Duration::from_millis(20));
            assert!(p.delay(30) <= Duration::from_millis(50));
        }
        // Jitter: not always the cap.
        assert!((0..200).any(|_| p.delay(30) < Duration::from_millis(45)));
    }
}
