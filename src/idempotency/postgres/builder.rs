//! [`GuardBuilder`]: the guard's settings, their validation, and the
//! [`Settings`] the batcher runs with.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::PgPool;

use super::store::GuardInner;
use super::{IdempotencyGuard, Shared, MAX_BATCH_SIZE_LIMIT};
#[cfg(doc)]
use super::{
    DEFAULT_BATCH_DELAY, DEFAULT_CLEANUP_CHUNK_SIZE, DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_IN_FLIGHT_BATCHES, DEFAULT_QUEUE_CAPACITY, DEFAULT_RETENTION,
};
use crate::config::ConfigError;
use crate::idempotency::{nonzero, BusyWait, Counters};
#[cfg(doc)]
use crate::idempotency::{Error, DEFAULT_BUSY_POLL_INTERVAL, DEFAULT_LEASE};

#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub(super) retention: Duration,
    pub(super) lease: Duration,
    pub(super) max_batch_size: usize,
    pub(super) batch_delay: Duration,
    pub(super) max_in_flight_batches: usize,
    pub(super) queue_capacity: usize,
    pub(super) cleanup_chunk_size: u32,
    pub(super) wait: BusyWait,
}

/// Settings of an [`IdempotencyGuard`]; see each setter for its default and
/// [`build`](GuardBuilder::build) for the rules.
#[derive(Debug, Clone)]
#[must_use]
pub struct GuardBuilder {
    pub(super) pool: PgPool,
    pub(super) retention: Duration,
    pub(super) lease: Duration,
    pub(super) max_batch_size: usize,
    pub(super) batch_delay: Duration,
    pub(super) max_in_flight_batches: usize,
    pub(super) queue_capacity: usize,
    pub(super) cleanup_chunk_size: u32,
    pub(super) busy_poll_interval: Duration,
    pub(super) busy_timeout: Option<Duration>,
}

impl GuardBuilder {
    /// How long a processed key is remembered; cleanup deletes older rows.
    /// Default [`DEFAULT_RETENTION`] (7 days).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// How long a claim holds its key unsettled; after it another worker takes the key
    /// over. Set it above the handler's worst-case run time. Default [`DEFAULT_LEASE`].
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Most keys per claim or settle statement. Default [`DEFAULT_MAX_BATCH_SIZE`], at
    /// most [`MAX_BATCH_SIZE_LIMIT`]. A fuller queue waits for the next statement.
    pub fn max_batch_size(mut self, n: usize) -> Self {
        self.max_batch_size = n;
        self
    }

    /// How long the batcher waits for more requests before sending a statement while
    /// another is in flight (an idle guard sends at once); rounded up to whole
    /// milliseconds by Tokio's timer. Zero: never wait, batch what queued up while the
    /// previous statement ran. Default [`DEFAULT_BATCH_DELAY`] (zero).
    pub fn batch_delay(mut self, delay: Duration) -> Self {
        self.batch_delay = delay;
        self
    }

    /// Most statements (and pool connections) the batcher uses at once; more requests
    /// queue. Default [`DEFAULT_MAX_IN_FLIGHT_BATCHES`].
    pub fn max_in_flight_batches(mut self, n: usize) -> Self {
        self.max_in_flight_batches = n;
        self
    }

    /// Requests queued for the batcher; when full, `begin`/`complete`/`release` wait for
    /// room, and a dropped claim is left to its lease. Default [`DEFAULT_QUEUE_CAPACITY`].
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n;
        self
    }

    /// Rows per cleanup `DELETE`. Default [`DEFAULT_CLEANUP_CHUNK_SIZE`].
    pub fn cleanup_chunk_size(mut self, n: u32) -> Self {
        self.cleanup_chunk_size = n;
        self
    }

    /// First pause of `process_if_new` on a busy key, doubling up to 1 s.
    /// Default [`DEFAULT_BUSY_POLL_INTERVAL`].
    pub fn busy_poll_interval(mut self, interval: Duration) -> Self {
        self.busy_poll_interval = interval;
        self
    }

    /// How long `process_if_new` waits on a key another worker holds before failing
    /// with [`Error::Busy`]. Default: twice the lease, so a waiter outlives a crashed
    /// holder's lease and takes the key over itself.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = Some(timeout);
        self
    }

    /// Builds the guard. Spawns nothing yet: the batcher starts on first use, on the
    /// runtime of that call.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] when a duration other than `batch_delay` is zero, the
    /// lease is not shorter than the retention, a count is zero, or `max_batch_size`
    /// is above [`MAX_BATCH_SIZE_LIMIT`].
    pub fn build(self) -> Result<IdempotencyGuard, ConfigError> {
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
        if !(1..=MAX_BATCH_SIZE_LIMIT).contains(&self.max_batch_size) {
            return Err(ConfigError::Invalid {
                name: "max_batch_size",
                value: self.max_batch_size.to_string(),
                expected: "1 to 10000",
            });
        }
        for (name, n) in [
            ("max_in_flight_batches", self.max_in_flight_batches),
            ("queue_capacity", self.queue_capacity),
            ("cleanup_chunk_size", self.cleanup_chunk_size as usize),
        ] {
            if n == 0 {
                return Err(ConfigError::Invalid {
                    name,
                    value: "0".into(),
                    expected: "at least 1",
                });
            }
        }
        let settings = Settings {
            retention: self.retention,
            lease: self.lease,
            max_batch_size: self.max_batch_size,
            batch_delay: self.batch_delay,
            max_in_flight_batches: self.max_in_flight_batches,
            queue_capacity: self.queue_capacity,
            cleanup_chunk_size: self.cleanup_chunk_size,
            wait: BusyWait {
                first_poll: self.busy_poll_interval,
                timeout: self.busy_timeout.unwrap_or(self.lease * 2),
            },
        };
        Ok(IdempotencyGuard {
            inner: Arc::new(GuardInner {
                shared: Arc::new(Shared {
                    pool: self.pool,
                    settings,
                    counters: Counters::default(),
                }),
                batcher: OnceLock::new(),
            }),
        })
    }
}
