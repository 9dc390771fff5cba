//! `produce`: realistic XZepr events into any broker.

use std::time::{Duration, Instant};

use crate::args::kafka_env;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use xzepr_consumer::generate::xzepr_event;

/// `produce`'s flags.
#[derive(Debug, clap::Args)]
pub struct ProduceArgs {
    /// Bootstrap servers [default: $XZEPR_KAFKA_BROKERS, else localhost:9092].
    #[arg(long, value_name = "HOST:PORT,...")]
    pub brokers: Option<String>,
    /// Topic to write to [default: $XZEPR_KAFKA_TOPIC, else xzepr.dev.events].
    #[arg(long, value_name = "TOPIC")]
    pub topic: Option<String>,
    /// How many events.
    #[arg(long, default_value_t = 10_000)]
    pub events: u64,
    /// At most this many events per second (default: as fast as possible).
    #[arg(long)]
    pub rate: Option<u64>,
    /// The receiver id the events claim to come from.
    #[arg(long, default_value = "01M82X4ET7AYGAEYSHF5AKVAVW")]
    pub receiver_id: String,
    /// Number the events from N (below 2^40): the same N gives the same
    /// events (ids, keys, payloads) [default: a random start, so every run's
    /// ids are new and none is taken for a duplicate of an earlier run's].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(..1 << FIRST_BITS))]
    pub seed: Option<u64>,
}

/// Bits of a run's first sequence number, random or `--seed`: 40 keep two
/// runs' ranges apart (as likely to meet as events / 2^40) and leave room in
/// `xzepr_event`, whose payload fields multiply the number by up to ~10^5.
const FIRST_BITS: u32 = 40;

/// Runs `produce`: prints what it produced.
///
/// # Errors
/// The producer's, when it cannot be created or the broker refuses the events.
pub fn run(args: &ProduceArgs) -> Result<(), KafkaError> {
    let brokers = args
        .brokers
        .clone()
        .unwrap_or_else(|| kafka_env("XZEPR_KAFKA_BROKERS", "localhost:9092"));
    let topic = args
        .topic
        .clone()
        .unwrap_or_else(|| kafka_env("XZEPR_KAFKA_TOPIC", "xzepr.dev.events"));
    let first = args
        .seed
        .unwrap_or_else(|| rand::random::<u64>() >> (64 - FIRST_BITS));
    let start = Instant::now();
    let n = produce(
        &brokers,
        &topic,
        first,
        args.events,
        args.rate,
        &args.receiver_id,
    )?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "produced {n} events to {topic} in {secs:.2} s ({:.0}/s)",
        n as f64 / secs
    );
    Ok(())
}

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
