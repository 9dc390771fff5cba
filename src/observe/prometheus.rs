//! The pipeline as a `prometheus-client` [`Collector`]: every family is built at
//! scrape time from the stages' counters, so nothing is recorded twice.

use std::fmt::{self, Write as _};
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::Observed;

/// The exposition formats of `GET /metrics` and
/// [`RunningPipeline::encode_metrics`](crate::pipeline::RunningPipeline::encode_metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricsFormat {
    /// OpenMetrics 1.0 text (`# EOF`-terminated; counters' `TYPE` lines name
    /// the family without `_total`).
    OpenMetrics,
    /// The Prometheus text format 0.0.4, which every scraper reads; the
    /// endpoint's answer unless the request accepts OpenMetrics.
    PrometheusText,
}

impl MetricsFormat {
    /// The `Content-Type` of this format.
    pub fn content_type(self) -> &'static str {
        match self {
            MetricsFormat::OpenMetrics => {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            }
            MetricsFormat::PrometheusText => {
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE
            }
        }
    }
}

/// A running pipeline's metrics, for a `prometheus-client`
/// [`Registry`](prometheus_client::registry::Registry) the service owns
/// (`registry.register_collector(Box::new(collector))`). Reads the pipeline's
/// counters on each scrape; cheap to clone. The names, all prefixed
/// `xzepr_consumer_`, are listed in `docs/reference/metrics.md`.
#[derive(Debug, Clone)]
pub struct PipelineCollector {
    pub(crate) observed: Observed,
}

impl PipelineCollector {
    /// The metrics as text in `format`.
    pub fn encode(&self, format: MetricsFormat) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self.clone()));
        let mut out = String::with_capacity(8 << 10);
        // Writing to a `String` cannot fail, nor can the collector.
        let _ = match format {
            MetricsFormat::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &registry)
            }
            MetricsFormat::PrometheusText => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            }
        };
        out
    }
}

fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: i64,
) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, unit, g.metric_type())?)
}

impl Collector for PipelineCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        let o = &self.observed;
        let m = o.counters();
        let s = o.source.stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
        let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let e = &mut e;

        // Messages, stage by stage.
        counter(
            e,
            "xzepr_consumer_messages_polled",
            "Messages taken from librdkafka by the poll thread.",
            load(&s.polled),
        )?;
        counter(
            e,
            "xzepr_consumer_messages_consumed",
            "Messages taken up by the executors (decoded next).",
            m.consumed,
        )?;
        counter(
            e,
            "xzepr_consumer_messages_malformed",
            "Messages that did not decode as CloudEvents (handled per the malformed policy).",
            m.malformed,
        )?;
        counter(
            e,
            "xzepr_consumer_messages_filtered",
            "Events skipped by the type filter.",
            m.filtered,
        )?;
        counter(
            e,
            "xzepr_consumer_messages_own_skipped",
            "Events skipped because this service's own receiver posted them.",
            m.own_skipped,
        )?;
        counter(
            e,
            "xzepr_consumer_messages_duplicate",
            "Events finished without running: the idempotency store had their key processed.",
            m.duplicates,
        )?;
        counter(
            e,
            "xzepr_consumer_messages_handled",
            "Events given to the handler.",
            m.handled,
        )?;
        counter(
            e,
            "xzepr_consumer_messages_failed",
            "Handler calls that returned an error, panicked or timed out.",
            m.handler_failed,
        )?;
        counter(
            e,
            "xzepr_consumer_handler_timeouts",
            "Handler calls that ran past the handler timeout (also counted as failed).",
            m.handler_timeouts,
        )?;
        counter(
            e,
            "xzepr_consumer_messages_stale_dropped",
            "Messages dropped unhandled because their partition was revoked after hand-over.",
            m.stale_dropped,
        )?;
        counter(
            e,
            "xzepr_consumer_offsets_finished",
            "Offsets finished: handled and reported, or skipped.",
            m.finished,
        )?;
        counter(
            e,
            "xzepr_consumer_handler_retries",
            "Handler attempts after the first, per the retry policy.",
            m.retried,
        )?;
        counter(
            e,
            "xzepr_consumer_messages_dead_lettered",
            "Events produced to the dead-letter topic and acknowledged by the broker.",
            m.dead_lettered,
        )?;
        counter(
            e,
            "xzepr_consumer_dead_letter_failures",
            "Dead-letter produces that failed (their offsets are held).",
            m.dead_letter_failed,
        )?;
        counter(
            e,
            "xzepr_consumer_messages_delayed",
            "Events sent to a delay topic and acknowledged by the broker (they run again once due).",
            m.delayed,
        )?;
        counter(
            e,
            "xzepr_consumer_delay_topic_failures",
            "Delay-topic produces that failed (produced again; their offsets wait).",
            m.delay_failed,
        )?;
        counter(
            e,
            "xzepr_consumer_messages_skipped_done",
            "Messages finished without dispatch: a previous owner's completion map said they were done.",
            load(&s.skipped_done),
        )?;
        counter(
            e,
            "xzepr_consumer_completion_maps_ignored",
            "Committed completion maps ignored because they did not decode (their offsets are replayed).",
            load(&s.completion_maps_ignored),
        )?;
        counter(
            e,
            "xzepr_consumer_idempotency_errors",
            "Idempotency store calls that failed (retried; the event waited).",
            m.idempotency_errors,
        )?;

        let latency = o.latency();
        let mut h = e.encode_descriptor(
            "xzepr_consumer_handler_duration",
            "Time spent in handler calls (including the lifecycle posts' hand-over, not their acknowledgement).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        h.encode_histogram::<NoLabelSet>(
            latency.sum_seconds(),
            latency.count(),
            &latency.buckets(),
            None,
        )?;

        // Lifecycle posts, by status and outcome.
        {
            let mut f = e.encode_descriptor(
                "xzepr_consumer_lifecycle_posts",
                "Lifecycle posts by status and outcome: acknowledged by XZepr, or failed and not submitted again (their offsets stay uncommitted).",
                None,
                MetricType::Counter,
            )?;
            for (status, acked, failed) in [
                ("started", m.posted_started, m.report_failed_started),
                ("completed", m.posted_completed, m.report_failed_completed),
                ("failed", m.posted_failed, m.report_failed_failed),
            ] {
                for (outcome, v) in [("acknowledged", acked), ("failed", failed)] {
                    let labels = [("status", status), ("outcome", outcome)];
                    ConstCounter::new(v).encode(f.encode_family(&labels)?)?;
                }
            }
        }
        counter(
            e,
            "xzepr_consumer_lifecycle_posts_rejected",
            "Lifecycle posts XZepr refused for good (a 4xx other than 401, 403, 404, 429); their events are dead-lettered.",
            m.report_rejected,
        )?;
        if let Some(r) = &o.reporter {
            counter(
                e,
                "xzepr_consumer_reporter_retries",
                "Lifecycle post attempts retried by the reporter.",
                load(&r.retries),
            )?;
            counter(
                e,
                "xzepr_consumer_reporter_coalesced",
                "Lifecycle records acknowledged without a post (already acknowledged before).",
                load(&r.coalesced),
            )?;
            counter(
                e,
                "xzepr_consumer_reporter_resent_after_lost_response",
                "Posts re-sent after a lost response (XZepr may hold a duplicate).",
                load(&r.resent_after_lost_response),
            )?;
            counter(
                e,
                "xzepr_consumer_reporter_breaker_opened",
                "Times the reporter's circuit breaker opened.",
                load(&r.breaker_opened),
            )?;
            gauge(
                e,
                "xzepr_consumer_reporter_breaker_open",
                "1 while the reporter's circuit breaker is open (XZepr taken to be unreachable).",
                None,
                i64::from(r.breaker_open.load(Relaxed)),
            )?;
            gauge(
                e,
                "xzepr_consumer_reporter_unauthorized",
                "1 while XZepr refuses the reporter's credentials (401/403): posts are held and the pipeline is not ready.",
                None,
                i64::from(r.unauthorized.load(Relaxed)),
            )?;
            counter(
                e,
                "xzepr_consumer_reporter_unauthorized_answers",
                "Lifecycle posts XZepr answered 401 or 403.",
                load(&r.unauthorized_answers),
            )?;
        }

        counter(
            e,
            "xzepr_consumer_rate_limit_tokens_granted",
            "Events let through by the pipeline's rate limit (its tokens handed out; 0 without one).",
            load(&s.rate_tokens_granted),
        )?;
        // Concurrency limits, one gauge per limit.
        if !o.limits.is_empty() {
            let mut f = e.encode_descriptor(
                "xzepr_consumer_concurrency_limit",
                "Calls let run at once by a concurrency limit now (fixed, or adaptive: follows the service's latency and overload answers).",
                None,
                MetricType::Gauge,
            )?;
            for l in &o.limits {
                let v = i64::try_from(l.limit()).unwrap_or(i64::MAX);
                ConstGauge::new(v).encode(f.encode_family(&[("limit", l.name())])?)?;
            }
        }

        // The source: queues, lanes, pauses, commits.
        gauge(
            e,
            "xzepr_consumer_in_flight_jobs",
            "Jobs handed to the executor and not finished (at most max_in_flight).",
            None,
            signed(load(&s.in_flight)),
        )?;
        gauge(
            e,
            "xzepr_consumer_lanes",
            "Lanes alive (partitions or keys with waiting or running events).",
            None,
            signed(load(&s.lanes)),
        )?;
        gauge(
            e,
            "xzepr_consumer_buffered_messages",
            "Messages between arrival and their job's release (bounded by max_buffered).",
            None,
            signed(load(&s.buffered)),
        )?;
        gauge(
            e,
            "xzepr_consumer_buffered",
            "Bytes of messages between arrival and their job's release (bounded by buffer_budget).",
            Some(&Unit::Bytes),
            signed(load(&s.buffered_bytes)),
        )?;
        counter(
            e,
            "xzepr_consumer_jobs_dispatched",
            "Jobs (runs of one lane's events) handed to the executor.",
            load(&s.jobs),
        )?;
        counter(
            e,
            "xzepr_consumer_partition_pauses",
            "Times a partition was paused (buffers over budget, or the tracking limit).",
            load(&s.pauses),
        )?;
        counter(
            e,
            "xzepr_consumer_partition_resumes",
            "Times a paused partition was resumed.",
            load(&s.resumes),
        )?;
        counter(
            e,
            "xzepr_consumer_delay_pauses",
            "Times a delay topic's partition was paused until its next event was due.",
            load(&s.delay_pauses),
        )?;
        counter(
            e,
            "xzepr_consumer_commits",
            "Offset commits sent (asynchronous and synchronous).",
            load(&s.commits),
        )?;
        counter(
            e,
            "xzepr_consumer_revoke_commit_failures",
            "Synchronous commits on revoke that the broker refused.",
            load(&s.revoke_commit_failures),
        )?;

        // Health, as gauges.
        let health = o.health();
        gauge(
            e,
            "xzepr_consumer_assigned_partitions",
            "Partitions assigned to this consumer.",
            None,
            signed(health.assigned_partitions),
        )?;
        gauge(
            e,
            "xzepr_consumer_broker_reachable",
            "1 while a broker was reachable at librdkafka's last report.",
            None,
            i64::from(health.broker_reachable),
        )?;
        gauge(
            e,
            "xzepr_consumer_ready",
            "1 while GET /ready answers 200.",
            None,
            i64::from(health.ready),
        )?;
        gauge(
            e,
            "xzepr_consumer_stalled_partitions",
            "Partitions holding unfinished work whose commit point stood still for the stall timeout (GET /health answers 503 while any is).",
            None,
            signed(health.stalled_partitions.len() as u64),
        )?;

        // Per partition, from the poll thread.
        let states = o.source.partition_states();
        gauge(
            e,
            "xzepr_consumer_unfinished",
            "Offsets received and not finished, over every assigned partition: the work this consumer still owes (the gauge to scale on, unlike the lag).",
            None,
            signed(states.iter().map(|p| p.unfinished as u64).sum()),
        )?;
        for (name, help, value) in [
            (
                "xzepr_consumer_partition_unfinished",
                "Offsets of an assigned partition received and not finished (waiting, running or held).",
                (|p: &crate::source::PartitionState| Some(p.unfinished as f64))
                    as fn(&_) -> Option<f64>,
            ),
            (
                "xzepr_consumer_partition_held",
                "Offsets of an assigned partition held: they keep its commit point until it is replayed.",
                |p| Some(p.held as f64),
            ),
            (
                "xzepr_consumer_partition_stalled_seconds",
                "How long an assigned partition's commit point has stood still with unfinished work behind it.",
                |p| Some(p.stalled_for_ms as f64 / 1000.0),
            ),
            (
                "xzepr_consumer_partition_oldest_unfinished_seconds",
                "How long ago an assigned partition's oldest unfinished offset was received (0 when none is).",
                |p| Some(p.oldest_unfinished_ms as f64 / 1000.0),
            ),
            (
                "xzepr_consumer_partition_commit_point_age_seconds",
                "How long ago, by its Kafka timestamp, the message at an assigned partition's commit point was produced (0 when nothing is unfinished).",
                |p| p.commit_point_age_ms.map(|ms| ms as f64 / 1000.0),
            ),
            (
                "xzepr_consumer_partition_due_in_seconds",
                "A delay topic's partition paused until its next event is due: in how long (absent otherwise).",
                |p| p.due_in_ms.map(|ms| ms as f64 / 1000.0),
            ),
        ] {
            let mut f = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            let mut partition = String::new();
            for p in &states {
                let Some(v) = value(p) else { continue };
                partition.clear();
                let _ = write!(partition, "{}", p.partition);
                let labels = [("topic", p.topic.as_str()), ("partition", partition.as_str())];
                ConstGauge::new(v).encode(f.encode_family(&labels)?)?;
            }
        }

        // Per partition, from librdkafka's statistics.
        let parts = o.source.partitions();
        for (name, help, value) in [
            (
                "xzepr_consumer_partition_committed_offset",
                "The group's committed offset (next offset to read) of an assigned partition.",
                (|p: &crate::source::PartitionProgress| p.committed) as fn(&_) -> Option<i64>,
            ),
            (
                "xzepr_consumer_partition_high_watermark",
                "The high watermark (offset of the next message produced) of an assigned partition.",
                |p| p.high_watermark,
            ),
            (
                "xzepr_consumer_partition_lag",
                "Messages of an assigned partition not yet committed (last stable offset minus committed offset).",
                |p| p.lag,
            ),
        ] {
            let mut f = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            let mut partition = String::new();
            for p in &parts {
                let Some(v) = value(p) else { continue };
                partition.clear();
                let _ = write!(partition, "{}", p.partition);
                let labels = [("topic", &*p.topic), ("partition", partition.as_str())];
                ConstGauge::new(v).encode(f.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
