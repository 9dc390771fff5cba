//! The poll thread: [`start`] builds the consumer and spawns the loop (`run`),
//! whose steps each have a file (`route`, `pause`, `commit`, `shutdown`),
//! beside the rebalance callbacks (`rebalance`, `maps`) that share its `state`.

mod commit;
mod maps;
mod pause;
mod rebalance;
mod route;
mod run;
mod shutdown;
mod state;
#[cfg(test)]
mod tests;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rdkafka::consumer::{BaseConsumer, Consumer};

use super::start::StartPositions;
use super::{Executor, SourceError, SourceHandle, SourceOptions, SourceStats};
use crate::config::KafkaConsumerConfig;
use crate::dispatch::lanes::Scheduler;
use rebalance::Context;
use run::PollLoop;
use state::{PartMap, State};

pub(crate) use route::NOT_BEFORE_HEADER;
pub(super) use shutdown::SHUTDOWN_GRACE;

/// Called on the poll thread around rebalances (the handler's `on_assign` and
/// `on_revoke`).
pub(crate) trait RebalanceHooks: Send + Sync + 'static {
    /// After partitions were assigned.
    fn assigned(&self, partitions: &[(String, i32)]);
    /// Before partitions are revoked, after their running work drained (or the
    /// drain deadline passed) and their commit point was committed.
    fn revoked(&self, partitions: &[(String, i32)]);
}

/// Creates the consumer, subscribes, and starts the poll thread.
pub(super) fn start(
    config: &KafkaConsumerConfig,
    options: SourceOptions,
    hooks: Option<Arc<dyn RebalanceHooks>>,
    executor: Box<dyn Executor>,
) -> Result<SourceHandle, SourceError> {
    let mut client_config = config.to_client_config()?;
    // `to_client_config` refuses it among the extra properties: the revoke
    // below drains by the protocol this picks.
    client_config.set(
        "partition.assignment.strategy",
        options.assignment.strategy(),
    );
    if client_config.get("statistics.interval.ms").is_none() {
        client_config.set(
            "statistics.interval.ms",
            crate::source::watch::STATISTICS_INTERVAL_MS,
        );
    }
    if let Some(reset) = options.start_from.auto_offset_reset() {
        client_config.set("auto.offset.reset", reset);
    }
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    let stats = Arc::new(SourceStats::default());
    let committed = Arc::new(Mutex::new(Vec::new()));
    let progress = Arc::new(Mutex::new(Vec::new()));
    let states = Arc::new(Mutex::new(Vec::new()));
    let context = Context {
        hooks,
        state: Mutex::new(State {
            parts: PartMap::default(),
            sched: Scheduler::new(options.ordering, options.max_in_flight.max(), options.batch)
                .with_rate_limit(options.rate_limit.as_ref()),
            executor: Some(executor),
            executor_gone: false,
            ready: Vec::new(),
            completions: done_rx,
            done: done_tx,
            epochs: 0,
            stats: Arc::clone(&stats),
            committed: Arc::clone(&committed),
            recycle: Arc::new(crate::source::Recycler::new(options.buffer_budget)),
            last_progress: Instant::now(),
            map_cap: options
                .completion_map
                .then_some(options.completion_map_max_bytes),
            paused: 0,
            states: Arc::clone(&states),
            stall_timeout: options.stall_timeout,
            delay_topics: options.delay_topics.clone(),
            delayed: 0,
        }),
        read_maps: options.completion_map,
        static_member: config.group_instance_id.is_some(),
        start: StartPositions::new(options.start_from),
        drain_timeout: options.drain_timeout,
        fatal: Mutex::new(None),
        stats: Arc::clone(&stats),
        progress: Arc::clone(&progress),
        failed_commits: Mutex::new(Vec::new()),
    };
    let consumer: BaseConsumer<Context> = client_config.create_with_context(context)?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let stop = Arc::new(AtomicBool::new(false));
    let options_drain = options.drain_timeout;
    let thread = {
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("xzepr-poll".into())
            .spawn(move || PollLoop::new(consumer, options, stop).run())?
    };
    Ok(SourceHandle {
        stop,
        stop_at: Arc::new(Mutex::new(None)),
        drain_timeout: options_drain,
        stats,
        committed,
        thread: Arc::new(Mutex::new(Some(thread))),
        progress,
        states,
    })
}
