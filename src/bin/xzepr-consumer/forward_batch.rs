//! `run --forward URL --forward-batch`: each lane's run of events (up to
//! `--batch`) is one POST, answered with an outcome per event.
//!
//! The request (`Content-Type: application/json`, `XZepr-Batch-Size: <n>`):
//!
//! ```text
//! {"events": [{"work_id": "work-…", "topic": "…", "partition": 0, "offset": 42,
//!              "key": "…" | null, "timestamp": 1700000000000 | null,
//!              "timestamp_type": "CreateTime" | "LogAppendTime" | null,
//!              "headers": [["name", "value"], …],
//!              "event": { the structured CloudEvent, as --structured sends it }}, …]}
//! ```
//!
//! in offset order within the partition (or key, under `--ordering key`). Key
//! and header values are percent-encoded as in the one-event headers
//! (printable ASCII but `"` and `%` as is, every other byte `%XX`).
//!
//! A 2xx answer carries one result per event, in the same order:
//!
//! ```text
//! {"results": [{"status": "done", "details": {…}},
//!              {"status": "retry", "error": "row locked"},
//!              {"status": "failed", "error": "bad row", "code": "E7"}, …]}
//! ```
//!
//! `done` is `completed` (with `details`, if any); `retry` fails the attempt,
//! left to the retry policy (`--retries`; only the events answered `retry`
//! are sent again, together); `failed` fails the event for good (dead letter,
//! `failed`). Any other answer fails every event of the request as a
//! one-event request's would (429/503 `overloaded`, 408/5xx retried, other
//! statuses permanent); so does a 2xx whose body is not such a list
//! (`bad_response`, retried) or has a different number of results
//! (`batch_outcomes`).

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::handler::{AsyncBatchHandler, BatchOutcome, BoxFuture, HandlerError, WorkInfo};

use crate::forward::{encode_bytes, encode_error, structured, Forward};

/// Most of a batch answer read: the results of a full batch with their
/// details.
const RESULTS_MAX: usize = 4 * 1024 * 1024;

/// One event's answer.
#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    details: Value,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    code: Option<String>,
}

#[derive(Deserialize)]
struct Answers {
    results: Vec<Answer>,
}

impl Answer {
    fn outcome(self) -> BatchOutcome {
        let error = || {
            let message = self
                .error
                .clone()
                .unwrap_or_else(|| "no error given".into());
            HandlerError::with_code(message, self.code.as_deref().unwrap_or("endpoint"))
        };
        match self.status.as_str() {
            "done" => BatchOutcome::Done(self.details),
            "failed" => BatchOutcome::Failed(error()),
            "retry" => BatchOutcome::Retry(error()),
            other => BatchOutcome::Retry(HandlerError::with_code(
                format!("the endpoint answered status {other:?}: not done, retry or failed"),
                "bad_response",
            )),
        }
    }
}

/// One event of the request.
fn entry(message: &CloudEventMessage, info: &WorkInfo) -> Result<Value, HandlerError> {
    let text = |v: &[u8]| encode_bytes(v).to_str().unwrap_or_default().to_owned();
    let headers: Vec<Value> = info
        .headers
        .iter()
        .map(|(name, value)| json!([text(name.as_bytes()), text(value)]))
        .collect();
    Ok(json!({
        "work_id": info.work_id,
        "topic": info.topic,
        "partition": info.partition,
        "offset": info.offset,
        "key": info.key.as_deref().map(text),
        "timestamp": info.timestamp.map(|t| t.millis()),
        "timestamp_type": info.timestamp.map(|t| t.kind()),
        "headers": headers,
        "event": Value::Object(structured(message)?),
    }))
}

impl Forward {
    async fn post_batch(
        &self,
        batch: Vec<(CloudEventMessage, WorkInfo)>,
    ) -> Result<Vec<BatchOutcome>, HandlerError> {
        let events = batch
            .iter()
            .map(|(m, info)| entry(m, info))
            .collect::<Result<Vec<_>, _>>()?;
        let mut body = Map::new();
        body.insert("events".into(), Value::Array(events));
        let body = serde_json::to_vec(&body).map_err(encode_error)?;
        let req = http::Request::post(self.uri().clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header("xzepr-batch-size", batch.len())
            .body(Bytes::from(body))
            .map_err(encode_error)?;
        let (_, answer) = self.exchange(req, RESULTS_MAX).await?;
        let answers: Answers = serde_json::from_slice(&answer).map_err(|e| {
            HandlerError::with_code(
                format!("the endpoint's answer is not a list of results: {e}"),
                "bad_response",
            )
        })?;
        Ok(answers.results.into_iter().map(Answer::outcome).collect())
    }
}

impl AsyncBatchHandler for Forward {
    fn handle_batch(
        &self,
        batch: Vec<(CloudEventMessage, WorkInfo)>,
    ) -> BoxFuture<Result<Vec<BatchOutcome>, HandlerError>> {
        let this = self.clone();
        Box::pin(async move { this.post_batch(batch).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_become_outcomes() {
        let answers: Answers = serde_json::from_str(
            r#"{"results": [{"status": "done", "details": {"rows": 1}},
                {"status": "retry", "error": "locked"},
                {"status": "failed", "error": "bad", "code": "E7"},
                {"status": "maybe"}]}"#,
        )
        .unwrap();
        let out: Vec<_> = answers.results.into_iter().map(Answer::outcome).collect();
        assert_eq!(out[0], BatchOutcome::Done(json!({"rows": 1})));
        assert_eq!(
            out[1],
            BatchOutcome::Retry(HandlerError::with_code("locked", "endpoint"))
        );
        assert_eq!(
            out[2],
            BatchOutcome::Failed(HandlerError::with_code("bad", "E7"))
        );
        assert!(matches!(&out[3], BatchOutcome::Retry(e) if e.code() == Some("bad_response")));
    }
}
