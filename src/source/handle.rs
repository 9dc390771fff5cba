//! [`Source`] and [`SourceHandle`]: starting the poll thread, and stopping,
//! joining and reading it while it runs.

use std::sync::atomic::{
    AtomicBool,
    Ordering::{Acquire, Release},
};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Receiver;

use super::{
    poll, Batch, ChannelExecutor, Executor, PartitionProgress, PartitionState, RebalanceHooks,
    SourceError, SourceOptions, SourceStats,
};
use crate::config::KafkaConsumerConfig;

/// The running source: its executor's receiving end is handed out once.
#[derive(Debug)]
pub struct Source {
    receiver: Option<Receiver<Batch>>,
    handle: SourceHandle,
}

/// The last commit points sent: `(topic, partition, next offset to read)`.
pub(crate) type Committed = Arc<Mutex<Vec<(Arc<str>, i32, i64)>>>;

/// The poll thread, returning the error it stopped on.
type PollThread = JoinHandle<Result<(), SourceError>>;

/// Controls a running source: shutdown, stats, committed offsets.
#[derive(Debug, Clone)]
pub struct SourceHandle {
    pub(super) stop: Arc<AtomicBool>,
    /// When [`SourceHandle::shutdown`] was first called: `join`'s bound runs from it.
    pub(super) stop_at: Arc<Mutex<Option<std::time::Instant>>>,
    /// How long the poll thread drains (the bound's first part).
    pub(super) drain_timeout: Duration,
    pub(super) stats: Arc<SourceStats>,
    pub(super) committed: Committed,
    pub(super) thread: Arc<Mutex<Option<PollThread>>>,
    /// The assigned partitions' progress, from librdkafka's statistics.
    pub(super) progress: Arc<Mutex<Vec<PartitionProgress>>>,
    /// The assigned partitions' commit points and stalls, from the poll thread.
    pub(super) states: Arc<Mutex<Vec<PartitionState>>>,
}

impl Source {
    /// Creates the consumer, subscribes, and starts the poll thread. Jobs are
    /// read from [`Source::take_receiver`], by any number of threads.
    ///
    /// # Errors
    /// [`SourceError::Config`] for bad settings, [`SourceError::InvalidOption`],
    /// [`SourceError::Kafka`] if librdkafka refuses the configuration.
    pub fn start(
        config: &KafkaConsumerConfig,
        options: SourceOptions,
    ) -> Result<Source, SourceError> {
        let (tx, rx) = crossbeam_channel::bounded(options.max_in_flight.max().max(1));
        let handle = Self::start_with(config, options, None, Box::new(ChannelExecutor(tx)))?;
        Ok(Source {
            receiver: Some(rx),
            handle,
        })
    }

    /// Starts the poll thread handing jobs to `executor`, calling `hooks` around
    /// rebalances.
    pub(crate) fn start_with(
        config: &KafkaConsumerConfig,
        options: SourceOptions,
        hooks: Option<Arc<dyn RebalanceHooks>>,
        executor: Box<dyn Executor>,
    ) -> Result<SourceHandle, SourceError> {
        options.validate(config.session_timeout)?;
        poll::start(config, options, hooks, executor)
    }

    /// The jobs' receiving end, taken once (clone it for more reader threads).
    pub fn take_receiver(&mut self) -> Option<Receiver<Batch>> {
        self.receiver.take()
    }

    /// A handle to stop the source and read its stats.
    pub fn handle(&self) -> SourceHandle {
        self.handle.clone()
    }
}

impl SourceHandle {
    /// Asks the poll thread to stop: it stops fetching, drains running work up to
    /// the drain timeout, commits synchronously, and closes the consumer.
    pub fn shutdown(&self) {
        if let Ok(mut at) = self.stop_at.lock() {
            at.get_or_insert_with(std::time::Instant::now);
        }
        self.stop.store(true, Release);
    }

    /// True once the poll thread has exited.
    pub fn is_finished(&self) -> bool {
        self.thread
            .lock()
            .map(|t| t.as_ref().is_none_or(JoinHandle::is_finished))
            .unwrap_or(true)
    }

    /// Waits for the poll thread; returns its error, if it stopped on one
    /// (an authentication failure, say). Later calls return `Ok`.
    ///
    /// # Errors
    /// The [`SourceError`] the poll thread stopped with.
    pub fn join(&self) -> Result<(), SourceError> {
        // After a shutdown the wait is bounded: the drain, then the final
        // commit, the unsubscribe and the close within `SHUTDOWN_GRACE`,
        // whatever the brokers do. A thread still inside librdkafka's close
        // then is left to finish on its own; what it had not committed is
        // replayed by the next owner.
        let stopped_at = self.stop_at.lock().ok().and_then(|at| *at);
        if let Some(at) = stopped_at {
            let deadline = at + self.drain_timeout + poll::SHUTDOWN_GRACE;
            while !self.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !self.is_finished() {
                tracing::error!(
                    "The poll thread is still closing the consumer past the shutdown bound; left to finish on its own."
                );
                drop(self.thread.lock().ok().and_then(|mut t| t.take()));
                return Ok(());
            }
        }
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        match thread.map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(panic)) => Err(SourceError::Panicked(panic_message(&*panic))),
            None => Ok(()),
        }
    }

    /// The source's counters.
    pub fn stats(&self) -> &SourceStats {
        &self.stats
    }

    /// The offsets last committed (sent) per partition: `(topic, partition,
    /// next offset to read)`.
    pub fn committed(&self) -> Vec<(Arc<str>, i32, i64)> {
        self.committed.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// The assigned partitions' committed offsets, high watermarks and lag,
    /// sorted by topic and partition, as of librdkafka's last statistics (at
    /// most a second old while the poll thread runs).
    pub fn partitions(&self) -> Vec<PartitionProgress> {
        self.progress.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// The assigned partitions' commit points, unfinished and held offsets,
    /// and stalls (see [`SourceOptions::stall_timeout`]), sorted by topic and
    /// partition, as the poll thread last saw them (at most a second old).
    pub fn partition_states(&self) -> Vec<PartitionState> {
        self.states.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// The stalled partitions among [`SourceHandle::partition_states`].
    pub fn stalled_partitions(&self) -> Vec<PartitionState> {
        self.states
            .lock()
            .map(|p| p.iter().filter(|s| s.stalled).cloned().collect())
            .unwrap_or_default()
    }

    /// True once [`SourceHandle::shutdown`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stop.load(Acquire)
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned())
}
