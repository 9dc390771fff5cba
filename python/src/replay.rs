//! The incident tools: a group's offsets shown and moved
//! (`offsets::admin::GroupOffsets`) and dead letters redriven
//! (`pipeline::Redrive`), the same calls the CLI's `offsets` and `redrive`
//! make. Each blocks on the brokers with the GIL released, and answers JSON
//! that `xzepr_consumer/replay.py` reads into its dataclasses.

use pyo3::prelude::*;
use serde_json::{json, Value};
use xzepr_consumer::offsets::admin::{GroupOffsets, MapSummary, ResetTo};
use xzepr_consumer::pipeline::Redrive;

use crate::config::KafkaArgs;

fn map_json(map: &MapSummary) -> Value {
    match map {
        MapSummary::Finished(n) => json!({"finished_above": n}),
        MapSummary::Unreadable(why) => json!({"ignored": why}),
        _ => Value::Null,
    }
}

/// `offsets show`: per partition of `topic`, the group's committed offset,
/// completion map and lag.
#[pyfunction]
pub(crate) fn offsets_show(
    py: Python<'_>,
    kafka: KafkaArgs,
    group: String,
    topic: String,
) -> PyResult<String> {
    let config = kafka.to_config(py)?;
    let shown = py
        .detach(|| GroupOffsets::connect(&config, &group)?.show(&topic))
        .map_err(|e| crate::errors::tool_error(py, &e))?;
    let rows: Vec<Value> = shown
        .iter()
        .map(|p| {
            json!({
                "partition": p.partition, "committed": p.committed, "map": map_json(&p.map),
                "low": p.low, "high": p.high, "lag": p.lag,
            })
        })
        .collect();
    Ok(Value::Array(rows).to_string())
}

/// `offsets reset`: refused while the group has members.
#[pyfunction]
#[pyo3(signature = (kafka, group, topic, to, value = None, dry_run = false))]
pub(crate) fn offsets_reset(
    py: Python<'_>,
    kafka: KafkaArgs,
    group: String,
    topic: String,
    to: &str,
    value: Option<&str>,
    dry_run: bool,
) -> PyResult<String> {
    let config = kafka.to_config(py)?;
    let bad = |what: &str| crate::errors::config_error(py, format!("offsets reset: {what}"));
    let to = match (to, value) {
        ("earliest", _) => ResetTo::Earliest,
        ("latest", _) => ResetTo::Latest,
        ("timestamp", Some(t)) => ResetTo::Timestamp(crate::convert::parse_timestamp(py, t)?),
        ("shift_by", Some(n)) => ResetTo::ShiftBy(
            n.parse()
                .map_err(|_| bad(&format!("shift_by {n:?} is not a whole number")))?,
        ),
        (other, _) => {
            return Err(bad(&format!(
                "{other:?}: expected earliest, latest, a timestamp or shift_by"
            )))
        }
    };
    let report = py
        .detach(|| GroupOffsets::connect(&config, &group)?.reset(&topic, to, dry_run))
        .map_err(|e| crate::errors::tool_error(py, &e))?;
    let partitions: Vec<Value> = report
        .partitions
        .iter()
        .map(|m| {
            json!({
                "partition": m.partition, "old": m.old, "new": m.new,
                "moves": m.moves, "map_cleared": m.map_cleared,
            })
        })
        .collect();
    Ok(json!({
        "topic": report.topic, "dry_run": report.dry_run,
        "members_checked": report.members_checked, "partitions": partitions,
    })
    .to_string())
}

/// `redrive`: the dead letters of `from_topic` produced again to their topics.
#[pyfunction]
#[pyo3(signature = (
    kafka, from_topic, to = None, reasons = Vec::new(), since = None, dry_run = false,
    max_redrives = None, group = None,
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn redrive(
    py: Python<'_>,
    kafka: KafkaArgs,
    from_topic: String,
    to: Option<String>,
    reasons: Vec<String>,
    since: Option<&str>,
    dry_run: bool,
    max_redrives: Option<u32>,
    group: Option<String>,
) -> PyResult<String> {
    let config = kafka.to_config(py)?;
    let mut r = Redrive::new(from_topic).dry_run(dry_run);
    if let Some(to) = to {
        r = r.to(to);
    }
    for reason in &reasons {
        r = r
            .reason(reason)
            .map_err(|e| crate::errors::config_error(py, e.to_string()))?;
    }
    if let Some(t) = since {
        r = r.since(crate::convert::parse_timestamp(py, t)?);
    }
    if let Some(n) = max_redrives {
        r = r.max_redrives(n);
    }
    if let Some(g) = group {
        r = r.group(g);
    }
    let report = py
        .detach(|| r.run(&config))
        .map_err(|e| crate::errors::tool_error(py, &e))?;
    Ok(json!({
        "group": report.group, "dry_run": report.dry_run, "moved": report.moved,
        "to_topics": report.to_topics, "refused": report.refused, "skipped": report.skipped,
    })
    .to_string())
}
