//! `produce`: realistic XZepr events into any broker.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use xzepr_consumer::generate::xzepr_event;

/// Produces `events` generated events to `topic`, at most `rate` per second when
/// given, starting at sequence number `first`. Returns how many were produced.
pub fn produce(
    brokers: &str,
    topic: &str,
    first: u64,
    events: u64,
    rate: Option<u64>,
    receiver_id: &str,
) -> Result<u64, KafkaError> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000")
        .set("compression.type", "none")
        .create()?;
    let start = Instant::now();
    for i in 0..events {
        if let Some(rate) = rate.filter(|r| *r > 0) {
            // Pace against the schedule, not per message: sleeping per message
            // would cap the rate at the timer resolution.
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let (key, payload) = xzepr_event(first + i, receiver_id);
        let mut record = BaseRecord::to(topic).key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    // librdkafka's queue is full: let its thread drain it.
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(events)
}
