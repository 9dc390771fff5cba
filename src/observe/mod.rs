//! Observing a running pipeline from outside: Prometheus metrics, health and
//! readiness, and the HTTP endpoint that serves them.
//!
//! ```text
//!  Metrics (per worker) ─┐
//!  SourceStats ──────────┼──> PipelineCollector ──> GET /metrics  (OpenMetrics or Prometheus text)
//!  partition progress ───┤       (read at scrape)
//!  ReporterStats ────────┘──> Health ─────────────> GET /health, GET /ready
//! ```
//!
//! Nothing here runs on the message path: every figure is read, at scrape
//! time, from the counters the stages keep anyway ([`crate::metrics`],
//! [`crate::source::SourceStats`], [`crate::report::ReporterStats`]); the
//! handler-duration histogram is the one thing recorded per call (two relaxed
//! atomic adds). The per-partition figures come from librdkafka's statistics
//! (see [`crate::source::PartitionProgress`]), so the poll thread never asks a
//! broker for them.
//!
//! A service with its own HTTP server leaves the endpoint off and uses
//! [`RunningPipeline::health`](crate::pipeline::RunningPipeline::health) and
//! [`RunningPipeline::prometheus_collector`](crate::pipeline::RunningPipeline::prometheus_collector)
//! (or [`RunningPipeline::encode_metrics`](crate::pipeline::RunningPipeline::encode_metrics)):
//!
//! ```no_run
//! use prometheus_client::registry::Registry;
//! # fn f(running: &xzepr_consumer::pipeline::RunningPipeline) {
//! let mut registry = Registry::default();
//! registry.register_collector(Box::new(running.prometheus_collector()));
//! // ... the service's own metrics, then encode `registry` on its own route.
//! if !running.health().ready {
//!     // answer 503 on the service's readiness route
//! }
//! # }
//! ```
//!
//! Every metric is listed, with its type, labels and meaning, in
//! `docs/reference/metrics.md`.

mod prometheus;
mod server;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::metrics::{LatencySnapshot, Metrics, MetricsSnapshot};
use crate::report::ReporterStats;
use crate::source::SourceHandle;

pub use prometheus::{MetricsFormat, PipelineCollector};
pub(crate) use server::Server;

/// Whether the pipeline is alive and ready to do its work, with the facts
/// behind the answer. `GET /health` answers 200 when `alive`, `GET /ready`
/// when `ready`, 503 otherwise, with this as the JSON body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Health {
    /// The poll thread runs (also while it drains after a shutdown) and no
    /// partition is stalled. False once it has stopped, on a shutdown or a
    /// fatal error (an authentication failure, the workers gone), and while a
    /// partition is stalled: the process should be restarted.
    pub alive: bool,
    /// A partition held unfinished work while its commit point stood still
    /// for the stall timeout (see
    /// [`SourceOptions::stall_timeout`](crate::source::SourceOptions::stall_timeout));
    /// which ones, with their oldest unfinished offsets, is in
    /// `stalled_partitions`. Clears once their commit points move.
    pub stalled: bool,
    /// The stalled partitions.
    pub stalled_partitions: Vec<crate::source::PartitionState>,
    /// Alive, not stopping, in the group (`group_joined`), a broker
    /// reachable, the XZepr breaker not open, and XZepr not refusing the
    /// reporter's credentials.
    pub ready: bool,
    /// [`RunningPipeline::shutdown`](crate::pipeline::RunningPipeline::shutdown)
    /// was called: draining, then gone.
    pub stopping: bool,
    /// Partitions assigned to this consumer now.
    pub assigned_partitions: u64,
    /// The consumer joined its group: an assignment came, even an empty one
    /// (a member beyond the partition count is ready with none).
    pub group_joined: bool,
    /// A broker was reachable at librdkafka's last report (see
    /// [`crate::source::SourceStats::brokers_down`]).
    pub broker_reachable: bool,
    /// The lifecycle reporter's circuit breaker is open: XZepr failed a run of
    /// posts, and none has been answered since. False without a reporter.
    /// It closes on the first post answered after the cool-down, so it is
    /// only re-checked while events come.
    pub breaker_open: bool,
    /// XZepr answered the lifecycle reporter 401 or 403, and nothing else
    /// since: its token is refused, lifecycle posts are held (one probes now
    /// and then) and offsets do not move. False without a reporter.
    pub reporter_unauthorized: bool,
}

/// What the observers read: shared handles to the stages' counters.
#[derive(Debug, Clone)]
pub(crate) struct Observed {
    pub(crate) source: SourceHandle,
    pub(crate) metrics: Vec<Arc<Metrics>>,
    pub(crate) reporter: Option<Arc<ReporterStats>>,
    /// The concurrency limits, each a gauge.
    pub(crate) limits: Vec<crate::flow_control::Limiter>,
}

impl Observed {
    pub(crate) fn health(&self) -> Health {
        let stats = self.source.stats();
        let stalled_partitions = self.source.stalled_partitions();
        let stalled = !stalled_partitions.is_empty();
        let alive = !self.source.is_finished() && !stalled;
        let stopping = self.source.is_stopping();
        let assigned_partitions = stats.assigned.load(Relaxed);
        let group_joined = stats.group_joined.load(Relaxed);
        let broker_reachable = !stats.brokers_down.load(Relaxed);
        let breaker_open = self
            .reporter
            .as_ref()
            .is_some_and(|r| r.breaker_open.load(Relaxed));
        let reporter_unauthorized = self
            .reporter
            .as_ref()
            .is_some_and(|r| r.unauthorized.load(Relaxed));
        Health {
            alive,
            stalled,
            stalled_partitions,
            ready: alive
                && !stopping
                && (group_joined || assigned_partitions > 0)
                && broker_reachable
                && !breaker_open
                && !reporter_unauthorized,
            stopping,
            assigned_partitions,
            group_joined,
            broker_reachable,
            breaker_open,
            reporter_unauthorized,
        }
    }

    /// The pipeline's counters, summed over workers.
    pub(crate) fn counters(&self) -> MetricsSnapshot {
        let mut total = MetricsSnapshot::default();
        for m in &self.metrics {
            total += m.snapshot();
        }
        total
    }

    /// Handler durations, summed over workers.
    pub(crate) fn latency(&self) -> LatencySnapshot {
        let mut total = LatencySnapshot::default();
        for m in &self.metrics {
            m.handler_latency.add_to(&mut total);
        }
        total
    }
}
