//! The pipeline's data settings as the Python package sends them: a JSON
//! object of `PipelineConfig` keys, read by the core's own
//! `PipelineConfig::from_json`, so Python accepts and refuses exactly what a
//! configuration file for the CLI does.
//!
//! serde's messages say what is wrong but not where (`invalid type: string
//! "x", expected usize`): on a refusal the object is read again one key at a
//! time (and, for a nested object, one sub-key at a time) to name the setting.

use pyo3::prelude::*;
use serde_json::{Map, Value};
use xzepr_consumer::pipeline::{DeadLetterConfig, Pipeline, PipelineConfig};

use crate::config::KafkaArgs;

/// Reads `text` (a JSON object) as a `PipelineConfig`; a refusal is a
/// `ConfigError` naming the setting (`retry.max_attempts`, `ordering`, …).
pub(crate) fn parse(py: Python<'_>, text: &str) -> PyResult<PipelineConfig> {
    PipelineConfig::from_json(text).map_err(|e| {
        let at = serde_json::from_str::<Map<String, Value>>(text)
            .ok()
            .and_then(|map| culprit(&map));
        let message = match at {
            Some(name) => format!("setting `{name}`: {e}"),
            None => e.to_string(),
        };
        crate::errors::config_error(py, message)
    })
}

/// The first setting of `map` that is refused on its own, as `key` or
/// `key.sub_key`.
fn culprit(map: &Map<String, Value>) -> Option<String> {
    let refused = |value: Value| PipelineConfig::from_json(&value.to_string()).is_err();
    for (key, value) in map {
        let alone = Value::Object(Map::from_iter([(key.clone(), value.clone())]));
        if !refused(alone) {
            continue;
        }
        if let Value::Object(inner) = value {
            for (sub, v) in inner {
                let one = Map::from_iter([(sub.clone(), v.clone())]);
                let nested = Map::from_iter([(key.clone(), Value::Object(one))]);
                if refused(Value::Object(nested)) {
                    return Some(format!("{key}.{sub}"));
                }
            }
        }
        return Some(key.clone());
    }
    None
}

/// Every setting's name, as `PipelineConfig::setting_names` gives them: what
/// the package must reach (its parity test compares them).
#[pyfunction]
pub(crate) fn setting_names() -> Vec<String> {
    PipelineConfig::setting_names()
}

/// The defaults as JSON text (`PipelineConfig::default()`), with the dead
/// letter's defaults (off by default, so absent from the first) as a second.
#[pyfunction]
pub(crate) fn default_settings() -> PyResult<(String, String)> {
    let text = |v: serde_json::Result<String>| {
        v.map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))
    };
    Ok((
        text(serde_json::to_string(&PipelineConfig::default()))?,
        text(serde_json::to_string(&DeadLetterConfig::default()))?,
    ))
}

/// Reads `text` as the consumer will, and gives the settings back in full, as
/// the CLI's `--print-config` shows them (durations as `30s`, every default
/// filled in). With `kafka`, the pipeline is also built (every rule between
/// settings checked, nothing started), so what a run would refuse is refused
/// here.
#[pyfunction]
#[pyo3(signature = (text, kafka = None))]
pub(crate) fn resolve_settings(
    py: Python<'_>,
    text: &str,
    kafka: Option<KafkaArgs>,
) -> PyResult<String> {
    let config = parse(py, text)?;
    let resolved = serde_json::to_string(&config)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
    if let Some(kafka) = kafka {
        let built = Pipeline::builder(kafka.to_config(py)?)
            .config(config)
            .build()
            .map_err(|e| crate::errors::consumer_error(&e))?;
        // Checked, never started.
        drop(built);
    }
    Ok(resolved)
}
