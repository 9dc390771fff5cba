//! [`PipelineConfig`]: every setting of a pipeline that is data, in one
//! value with its defaults, readable from a configuration file. The CLI's
//! `--config`, the Python package and a service's own file all construct
//! this same value; [`PipelineBuilder`](super::PipelineBuilder)'s setters write
//! into it, and [`PipelineBuilder::build`](super::PipelineBuilder::build)
//! checks it once.
//!
//! What is not data stays with the builder: the handler, the runtime, the
//! idempotency store, the reporter and the XZepr client.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::complete::MalformedPolicy;
use super::deadletter::DeadLetterConfig;
use super::guard::IdempotencyKey;
use super::retry::RetryPolicy;
use crate::config::ConfigError;
use crate::decode::DecoderConfig;
use crate::dispatch::TypeFilter;
use crate::flow_control::Concurrency;
use crate::source::SourceOptions;

/// Every data setting of a pipeline, each with its default (and the
/// reason for it, on the setter of the same name on
/// [`PipelineBuilder`](super::PipelineBuilder)).
///
/// As a configuration file (JSON here; any `serde` format reads it), every
/// field is optional and durations read as `500ms`, `30s`, `5m` or `1h`:
///
/// ```
/// use xzepr_consumer::flow_control::Concurrency;
/// use xzepr_consumer::pipeline::PipelineConfig;
///
/// let config: PipelineConfig = serde_json::from_str(r#"{
///     "ordering": "per_key",
///     "max_in_flight": 256,
///     "handler_timeout": "30s",
///     "retry": {"max_attempts": 5, "backoff_base": "100ms"},
///     "dead_letter": {"topic": "orders.dlq"},
///     "types": ["deployment.", "build.*.completed"]
/// }"#).unwrap();
/// assert_eq!(config.source.max_in_flight, Concurrency::Fixed(256));
/// ```
///
/// The source's settings ([`SourceOptions`]) sit at the top level beside the
/// others. A name the crate does not know is kept and refused by
/// [`PipelineBuilder::build`](super::PipelineBuilder::build), naming it, so a
/// misspelt setting never passes for its default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct PipelineConfig {
    /// Ordering, limits, budgets and timings of the source stage.
    #[serde(flatten)]
    pub source: SourceOptions,
    /// Worker threads for a sync handler (default: the number of CPUs).
    pub workers: usize,
    /// How long a handler call may take (default: no limit).
    #[serde(with = "crate::config::duration::option")]
    pub handler_timeout: Option<Duration>,
    /// How failed handler calls are retried (default: not at all).
    pub retry: RetryPolicy,
    /// Which event types reach the handler (default: all).
    pub types: TypeFilter,
    /// Whether the service's own lifecycle events are skipped (default on).
    pub skip_own_events: bool,
    /// The service's own receiver id, when the handler posts by itself.
    pub own_receiver_id: Option<String>,
    /// What a message that does not decode does (default: skip).
    pub malformed: MalformedPolicy,
    /// Decoder limits.
    pub decoder: DecoderConfig,
    /// The dead-letter topic, if any (default: none).
    pub dead_letter: Option<DeadLetterConfig>,
    /// Where the idempotency key comes from (used with a store).
    pub idempotency_key: IdempotencyKey,
    /// Where `/metrics`, `/health` and `/ready` are served (default: not).
    pub metrics_addr: Option<SocketAddr>,
    /// A span per event and per step (default off; needs feature `otel`).
    pub traces: bool,
    /// The lifecycle reporter's posts in flight, when the pipeline starts its
    /// own reporter ([`PipelineBuilder::report_to`](super::PipelineBuilder::report_to)):
    /// default fixed 128, or adaptive (see
    /// [`ReporterConfig::concurrency`](crate::report::ReporterConfig::concurrency)).
    /// It replaces the concurrency of the [`ReporterConfig`](crate::report::ReporterConfig)
    /// given to [`Reporting::reporter`](super::Reporting::reporter); a reporter
    /// handed to [`PipelineBuilder::lifecycle`](super::PipelineBuilder::lifecycle)
    /// keeps its own.
    pub report_concurrency: Concurrency,
    /// Names read from a file that are no setting, refused by `build()`.
    #[serde(flatten, skip_serializing)]
    unknown: BTreeMap<String, serde::de::IgnoredAny>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            source: SourceOptions::default(),
            workers: std::thread::available_parallelism().map_or(2, usize::from),
            handler_timeout: None,
            retry: RetryPolicy::default(),
            types: TypeFilter::any(),
            skip_own_events: true,
            own_receiver_id: None,
            malformed: MalformedPolicy::Skip,
            decoder: DecoderConfig::default(),
            dead_letter: None,
            idempotency_key: IdempotencyKey::default(),
            metrics_addr: None,
            traces: false,
            report_concurrency: crate::report::ReporterConfig::default().concurrency,
            unknown: BTreeMap::new(),
        }
    }
}

impl PipelineConfig {
    /// Reads a configuration from JSON text (e.g. a file's contents).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the setting at fault, with serde's
    /// line and column; an unknown setting is refused here too.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let mut json = serde_json::Deserializer::from_str(text);
        let config: PipelineConfig = serde_path_to_error::deserialize(&mut json).map_err(|e| {
            // The path names the setting (`retry.max_attempts`); serde's
            // message alone says only what was expected and where.
            let mut path = e.path().to_string();
            let inner = e.into_inner();
            if matches!(path.as_str(), "." | "") {
                // Flattened settings are read through a buffer that loses
                // the path: find the setting by reading each on its own.
                path = Self::culprit(text).unwrap_or_default();
            }
            ConfigError::Invalid {
                name: "config",
                value: match path.as_str() {
                    "." | "" => inner.to_string(),
                    _ => format!("{path}: {inner}"),
                },
                expected: "a pipeline configuration (see PipelineConfig)",
            }
        })?;
        json.end().map_err(|e| ConfigError::Invalid {
            name: "config",
            value: e.to_string(),
            expected: "one JSON object and nothing after it",
        })?;
        config.check_known()?;
        Ok(config)
    }

    /// The top-level setting whose value alone fails to read, if one does.
    fn culprit(text: &str) -> Option<String> {
        let serde_json::Value::Object(map) = serde_json::from_str(text).ok()? else {
            return None;
        };
        map.into_iter()
            .find(|(name, value)| {
                let one = serde_json::Value::Object(
                    [(name.clone(), value.clone())].into_iter().collect(),
                );
                serde_json::from_value::<PipelineConfig>(one).is_err()
            })
            .map(|(name, _)| name)
    }

    /// The names of every setting, in order: what a front end must reach.
    pub fn setting_names() -> Vec<String> {
        match serde_json::to_value(PipelineConfig::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Refuses names read from a file that are no setting.
    pub(super) fn check_known(&self) -> Result<(), ConfigError> {
        match self.unknown.keys().next() {
            Some(name) => Err(ConfigError::Invalid {
                name: "config",
                value: name.clone(),
                expected: "a known setting (see PipelineConfig; names are snake_case)",
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_round_trip_and_every_setting_has_a_name() {
        let d = PipelineConfig::default();
        let text = serde_json::to_string(&d).unwrap();
        assert_eq!(PipelineConfig::from_json(&text).unwrap(), d);
        let names = PipelineConfig::setting_names();
        for n in [
            "max_in_flight",
            "stall_timeout",
            "retry",
            "dead_letter",
            "types",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
        }
        assert!(!names.iter().any(|x| x == "source" || x == "unknown"));
    }

    #[test]
    fn a_misspelt_or_mistyped_setting_is_refused_by_name() {
        let e = PipelineConfig::from_json(r#"{"max_inflight": 8}"#).unwrap_err();
        assert!(e.to_string().contains("max_inflight"), "{e}");
        let e = PipelineConfig::from_json(r#"{"retry": {"attempts": 3}}"#).unwrap_err();
        assert!(e.to_string().contains("attempts"), "{e}");
        let e = PipelineConfig::from_json(r#"{"commit_interval": "soon"}"#).unwrap_err();
        assert!(e.to_string().contains("soon"), "{e}");
        let e = PipelineConfig::from_json(r#"{"ordering": "sideways"}"#).unwrap_err();
        assert!(e.to_string().contains("sideways"), "{e}");
        // A value of the wrong type names its setting, however deep.
        let e = PipelineConfig::from_json(r#"{"max_in_flight": "many"}"#).unwrap_err();
        assert!(
            e.to_string().contains("max_in_flight: expected a number"),
            "{e}"
        );
        let c = PipelineConfig::from_json(
            r#"{"max_in_flight": {"adaptive": {"min": 2, "max": 64}}, "report_concurrency": "bad"}"#,
        )
        .unwrap_err();
        assert!(c.to_string().contains("report_concurrency"), "{c}");
        let e = PipelineConfig::from_json(r#"{"retry": {"max_attempts": -1}}"#).unwrap_err();
        assert!(e.to_string().contains("retry.max_attempts"), "{e}");
        let e = PipelineConfig::from_json(r#"{"workers": 2} {"workers": 3}"#).unwrap_err();
        assert!(e.to_string().contains("nothing after it"), "{e}");
    }

    #[test]
    fn a_file_sets_nested_and_flattened_settings() {
        let c = PipelineConfig::from_json(
            r#"{"ordering": "unordered", "commit_interval": "250ms",
                "stall_timeout": null, "malformed": "dead_letter",
                "dead_letter": {"properties": {"linger.ms": "5"}},
                "idempotency_key": "event_id", "types": ["a.", "b.*"]}"#,
        )
        .unwrap();
        assert_eq!(c.source.ordering, crate::dispatch::Ordering::Unordered);
        assert_eq!(c.source.commit_interval, Duration::from_millis(250));
        assert_eq!(c.source.stall_timeout, None);
        assert_eq!(c.malformed, MalformedPolicy::DeadLetter);
        assert_eq!(c.idempotency_key, IdempotencyKey::EventId);
        assert!(c.types.accepts("a.x") && c.types.accepts("b.y") && !c.types.accepts("c"));
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["dead_letter"]["properties"]["linger.ms"], "5");
    }
}
