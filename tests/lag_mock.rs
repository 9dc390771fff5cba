//! Lag that counts unfinished work, on librdkafka's mock cluster: one event
//! that does not finish holds its partition's commit point while the 199
//! after it finish. The broker's lag counts all 200; the consumer's own
//! figures count the one it owes, how long it has waited, and how old (by
//! its Kafka timestamp) the commit point is; once it finishes, all reach 0.
#![cfg(feature = "dev-stack")]

mod kafka_support;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_parse::{Scrape, Value};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::decode::CloudEvent;
use xzepr_consumer::dispatch::Ordering;
use xzepr_consumer::generate::xzepr_event;
use xzepr_consumer::handler::Work;
use xzepr_consumer::observe::MetricsFormat;
use xzepr_consumer::pipeline::{Pipeline, RunningPipeline};

use kafka_support::*;

/// Generous bound for "eventually" on a loaded machine; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(240);
const N: i64 = 200;
const SLOW: i64 = 10;
/// How old the events' Kafka timestamps are.
const AGE: Duration = Duration::from_secs(3600);

fn scrape(running: &RunningPipeline) -> Scrape {
    let text = running.encode_metrics(MetricsFormat::PrometheusText);
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("valid exposition")
}

fn gauge(scrape: &Scrape, name: &str, partitioned: bool) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && (!partitioned || s.labels.get("partition") == Some("0")))
        .map(|s| match s.value {
            Value::Gauge(v) | Value::Untyped(v) => v,
            ref other => panic!("{name} is not a gauge: {other:?}"),
        })
}

/// Produces `N` events to partition 0, each stamped `AGE` ago (`CreateTime`).
fn produce_old(brokers: &str, topic: &str) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap() - AGE;
    let stamp = i64::try_from(stamp.as_millis()).unwrap();
    for i in 0..N as u64 {
        let body = xzepr_event(i, "01SOMEONEELSE").1;
        let key = i.to_string();
        let record = BaseRecord::to(topic)
            .key(&key)
            .payload(&body)
            .partition(0)
            .timestamp(stamp);
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

#[test]
fn one_slow_event_is_one_unit_of_work_owed_however_large_the_lag() {
    let cluster = cluster("lagged", 1);
    let brokers = cluster.bootstrap_servers();
    produce_old(&brokers, "lagged");
    assert_eq!(end_offsets(&brokers, "lagged", 1)[&0], N);

    // Offset SLOW waits for the gate; the rest finish at once, out of order.
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let done = Arc::new(AtomicU64::new(0));
    let (g, d) = (Arc::clone(&gate), Arc::clone(&done));
    let running = Pipeline::builder(KafkaConsumerConfig::new(&brokers, "lagged", "lag"))
        .ordering(Ordering::Unordered)
        .workers(4)
        .commit_interval(Duration::from_millis(50))
        .start(
            move |_: &CloudEvent<'_>, work: &mut Work| -> Result<(), String> {
                if work.offset() == SLOW {
                    let (open, cv) = &*g;
                    let mut open = open.lock().unwrap();
                    while !*open {
                        open = cv.wait(open).unwrap();
                    }
                }
                d.fetch_add(1, Relaxed);
                Ok(())
            },
        )
        .unwrap();

    wait_for(
        PATIENCE,
        "every event but the slow one, and the lag seen",
        || {
            let s = scrape(&running);
            done.load(Relaxed) == (N - 1) as u64
                && gauge(&s, "xzepr_consumer_partition_lag", true) == Some((N - SLOW) as f64)
        },
    );
    wait_for(PATIENCE, "its wait to show", || {
        gauge(
            &scrape(&running),
            "xzepr_consumer_partition_oldest_unfinished_seconds",
            true,
        )
        .is_some_and(|age| age > 0.0)
    });
    let s = scrape(&running);
    let lag = gauge(&s, "xzepr_consumer_partition_lag", true).unwrap();
    let owed = gauge(&s, "xzepr_consumer_unfinished", false).unwrap();
    let waited = gauge(
        &s,
        "xzepr_consumer_partition_oldest_unfinished_seconds",
        true,
    )
    .unwrap();
    let age = gauge(
        &s,
        "xzepr_consumer_partition_commit_point_age_seconds",
        true,
    )
    .unwrap();
    eprintln!(
        "one event held of {N}: broker lag {lag}, unfinished {owed}, oldest unfinished waited \
         {waited:.2} s, commit point {age:.0} s old (stamped {AGE:?} ago)"
    );
    assert_eq!(owed, 1.0, "one event owed, whatever the lag");
    assert_eq!(
        gauge(&s, "xzepr_consumer_partition_unfinished", true),
        Some(1.0)
    );
    assert!(
        age >= AGE.as_secs_f64() && age < (AGE + PATIENCE * 2).as_secs_f64(),
        "the commit point's age is its message's: {age}"
    );
    let states = running.source().partition_states();
    assert_eq!(states[0].commit_point, Some(SLOW));
    assert!(states[0].oldest_unfinished_ms > 0);

    // Released: nothing owed, the ages and the lag go back to 0.
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    wait_for(PATIENCE, "nothing owed, and lag 0", || {
        let s = scrape(&running);
        gauge(&s, "xzepr_consumer_unfinished", false) == Some(0.0)
            && gauge(
                &s,
                "xzepr_consumer_partition_oldest_unfinished_seconds",
                true,
            ) == Some(0.0)
            && gauge(
                &s,
                "xzepr_consumer_partition_commit_point_age_seconds",
                true,
            ) == Some(0.0)
            && gauge(&s, "xzepr_consumer_partition_lag", true) == Some(0.0)
    });
    running.shutdown();
    running.join().unwrap();
}
