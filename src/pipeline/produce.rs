//! Producing an event's record elsewhere (its dead letter, its next delay
//! topic) and waiting for the broker: one record built from the event's key,
//! payload and headers, offered until the producer's queue takes it, then its
//! acknowledgement awaited without blocking a thread.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

use super::delivery::Delivery;

/// Where the broker put a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placed {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

impl Placed {
    /// For a terminal post's `details`.
    pub(crate) fn to_json(&self) -> Value {
        json!({ "topic": self.topic, "partition": self.partition, "offset": self.offset })
    }
}

/// How long to wait before offering a record again to a full producer queue.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// `d`'s headers but those starting with one of `strip` (an earlier hop's,
/// which describe an earlier failure), then `ours`.
pub(super) fn headers<D: Delivery>(d: &D, strip: &[&str], ours: &[(&str, &str)]) -> OwnedHeaders {
    let original = d.headers();
    let mut h = OwnedHeaders::new_with_capacity(original.len() + ours.len());
    for (key, value) in original
        .into_iter()
        .filter(|(k, _)| !strip.iter().any(|p| k.starts_with(p)))
    {
        h = h.insert(Header {
            key,
            value: Some(value),
        });
    }
    for (key, value) in ours {
        h = h.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    h
}

/// Produces `d`'s key and payload with `headers` to `topic` and waits for the
/// broker's acknowledgement. `what` names the producer in its error.
pub(super) async fn send<D: Delivery>(
    producer: &FutureProducer,
    topic: String,
    d: &D,
    headers: &OwnedHeaders,
    what: &str,
) -> Result<Placed, String> {
    let enqueue = || {
        let mut record = FutureRecord::<[u8], [u8]>::to(&topic).headers(headers.clone());
        if let Some(key) = d.key() {
            record = record.key(key);
        }
        if let Some(payload) = d.payload() {
            record = record.payload(payload);
        }
        producer.send_result(record).map_err(|(e, _)| e)
    };
    let delivery = loop {
        match enqueue() {
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                tokio::time::sleep(QUEUE_FULL_PAUSE).await;
            }
            other => break other,
        }
    };
    match delivery.map_err(|e| e.to_string())?.await {
        Ok(Ok(delivered)) => Ok(Placed {
            topic,
            partition: delivered.partition,
            offset: delivered.offset,
        }),
        Ok(Err((e, _))) => Err(e.to_string()),
        Err(_) => Err(format!("the {what} producer is gone")),
    }
}
