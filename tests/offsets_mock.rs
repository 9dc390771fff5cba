//! Replay after a bad deploy, on librdkafka's mock cluster: a group's offsets
//! shown and moved from outside it (`offsets::admin`, behind `xzepr-consumer
//! offsets show|reset`), refused while a real consumer is a member, and
//! `start_from` for partitions without a committed offset.
//!
//! What the mock cannot show, and where it is shown instead:
//! - it answers every `offsets_for_times` lookup with "no such offset", so
//!   starting and resetting *to a time* run against Tansu
//!   (`tansu_broker.rs`); here only a failed lookup is shown;
//! - it lists no groups (no DescribeGroups), so the member check is the
//!   broker's own refusal of the commit, which is what a real broker does too
//!   with a group that has members; and it keeps a group for ever once it had
//!   a member, refusing outside commits even after the member left, so groups
//!   moved here are set up by outside commits and never joined before.
#![cfg(feature = "unstable-fuzzing")]

mod kafka_support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::types::RDKafkaApiKey;
use rdkafka::types::RDKafkaRespErr;
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::offsets::admin::{AdminError, GroupOffsets, MapSummary, ResetTo};
use xzepr_consumer::offsets::progress;
use xzepr_consumer::source::{Source, SourceError, SourceOptions, StartFrom};

use kafka_support::*;

/// Generous bound for "eventually" on a loaded machine; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(120);

fn options(start_from: StartFrom) -> SourceOptions {
    let mut o = SourceOptions::default();
    o.commit_interval = Duration::from_millis(100);
    o.drain_timeout = Duration::from_secs(5);
    o.start_from = start_from;
    o
}

type Seen = Arc<Mutex<BTreeSet<(i32, i64)>>>;

/// Starts a source on `group` that finishes every message, recording it.
fn consume(
    brokers: &str,
    topic: &str,
    group: &str,
    options: SourceOptions,
    reset: &str,
) -> (Source, Seen, std::thread::JoinHandle<()>) {
    let mut config = KafkaConsumerConfig::new(brokers, topic, "replay").with_group_id(group);
    config.auto_offset_reset = reset.to_owned();
    let mut source = Source::start(&config, options).unwrap();
    let seen: Seen = Arc::default();
    let rx = source.take_receiver().unwrap();
    let worker = {
        let seen = Arc::clone(&seen);
        std::thread::spawn(move || {
            for m in rx.iter().flatten() {
                seen.lock().unwrap().insert((m.partition, m.offset));
                m.finish();
            }
        })
    };
    (source, seen, worker)
}

fn stop(source: &Source, worker: std::thread::JoinHandle<()>) -> Result<(), SourceError> {
    let handle = source.handle();
    handle.shutdown();
    let result = handle.join();
    worker.join().unwrap();
    result
}

#[test]
fn reset_moves_offsets_clears_maps_and_a_dry_run_changes_nothing() {
    let topic = "replay-moves";
    let cluster = cluster(topic, 3);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, topic, 3, 300, |i| i.to_string().into_bytes());
    let group = "xzepr-consumer-moves";
    // Partition 0 committed at 50 with 52..60 finished above it; 1 at 80
    // with no map; 2 never committed.
    let map = progress::encode(50, 52..60, 2_048).text;
    commit_with_metadata(&brokers, group, topic, 0, 50, &map);
    commit_with_metadata(&brokers, group, topic, 1, 80, "");

    let kafka = KafkaConsumerConfig::new(&brokers, topic, "ops");
    let admin = GroupOffsets::connect(&kafka, group).unwrap();
    let shown = admin.show(topic).unwrap();
    let row = |p: i32| shown.iter().find(|r| r.partition == p).unwrap().clone();
    assert_eq!(
        (row(0).committed, row(0).map.clone(), row(0).lag),
        (Some(50), MapSummary::Finished(8), Some(50))
    );
    assert_eq!(
        (row(1).committed, row(1).map.clone(), row(1).lag),
        (Some(80), MapSummary::None, Some(20))
    );
    assert_eq!(
        (row(2).committed, row(2).lag, row(2).high),
        (None, None, 100)
    );

    // A dry run says where each partition would go and commits nothing.
    let plan = admin.reset(topic, ResetTo::Earliest, true).unwrap();
    assert!(plan.dry_run);
    let olds: Vec<_> = plan.partitions.iter().map(|m| (m.old, m.new)).collect();
    assert_eq!(olds, vec![(Some(50), 0), (Some(80), 0), (None, 0)]);
    assert!(plan.partitions[0].map_cleared && !plan.partitions[1].map_cleared);
    assert_eq!(
        committed_with_metadata(&brokers, group, topic, 0),
        (50, map.clone()),
        "a dry run leaves the offset and its map"
    );
    assert_eq!(
        committed_with_metadata(&brokers, group, topic, 1),
        (80, String::new())
    );
    assert_eq!(committed_with_metadata(&brokers, group, topic, 2).0, -1);

    // A shift needs a committed offset on every partition.
    let e = admin
        .reset(topic, ResetTo::ShiftBy(-10), false)
        .unwrap_err();
    assert!(
        matches!(e, AdminError::NoCommittedOffset { partition: 2, .. }),
        "{e}"
    );
    assert_eq!(committed_with_metadata(&brokers, group, topic, 0).0, 50);

    let done = admin.reset(topic, ResetTo::Earliest, false).unwrap();
    assert!(!done.dry_run && done.partitions.iter().all(|m| m.moves));
    assert_eq!(
        committed_with_metadata(&brokers, group, topic, 0),
        (0, String::new()),
        "moved, and its map cleared"
    );
    let moved = admin.reset(topic, ResetTo::ShiftBy(30), false).unwrap();
    assert!(moved.partitions.iter().all(|m| m.new == 30));
    let back = admin.reset(topic, ResetTo::ShiftBy(-1_000), false).unwrap();
    assert!(
        back.partitions.iter().all(|m| m.new == 0),
        "kept within the log"
    );
    let again = admin.reset(topic, ResetTo::ShiftBy(0), false).unwrap();
    assert!(again.partitions.iter().all(|m| !m.moves));
    admin.reset(topic, ResetTo::ShiftBy(70), false).unwrap();
    drop(admin);

    // The group's consumers now start where the reset put them.
    let (source, seen, worker) = consume(
        &brokers,
        topic,
        group,
        options(StartFrom::Committed),
        "earliest",
    );
    wait_for(PATIENCE, "the replay from offset 70", || {
        seen.lock().unwrap().len() >= 90
    });
    stop(&source, worker).unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 90);
    assert!(
        seen.iter().all(|&(_, o)| o >= 70),
        "nothing before the reset point"
    );
}

#[test]
fn reset_refuses_while_a_consumer_is_a_member() {
    let topic = "replay-active";
    let cluster = cluster(topic, 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, topic, 2, 40, |i| i.to_string().into_bytes());
    let group = "xzepr-consumer-active";
    let (source, seen, worker) = consume(
        &brokers,
        topic,
        group,
        options(StartFrom::Committed),
        "earliest",
    );
    wait_for(PATIENCE, "every message", || {
        seen.lock().unwrap().len() == 40
    });
    let end = end_offsets(&brokers, topic, 2);
    wait_for(PATIENCE, "the commit of everything", || {
        committed(&brokers, group, topic, 2) == end
    });

    let admin =
        GroupOffsets::connect(&KafkaConsumerConfig::new(&brokers, topic, "ops"), group).unwrap();
    let e = admin.reset(topic, ResetTo::Earliest, false).unwrap_err();
    assert!(
        matches!(
            e,
            AdminError::Refused { .. } | AdminError::ActiveMembers { .. }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("active members"), "{e}");
    assert_eq!(committed(&brokers, group, topic, 2), end, "nothing moved");
    // Only the member list could refuse a dry run, and the mock has none.
    let plan = admin.reset(topic, ResetTo::Earliest, true).unwrap();
    assert!(!plan.members_checked);
    drop(admin);
    stop(&source, worker).unwrap();
    assert_eq!(committed(&brokers, group, topic, 2), end);
}

#[test]
fn start_from_earliest_overrides_auto_offset_reset() {
    let topic = "replay-earliest";
    let cluster = cluster(topic, 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, topic, 2, 20, |i| i.to_string().into_bytes());
    let (source, seen, worker) = consume(
        &brokers,
        topic,
        "xzepr-consumer-earliest",
        options(StartFrom::Earliest),
        "latest",
    );
    wait_for(PATIENCE, "the existing messages", || {
        seen.lock().unwrap().len() == 20
    });
    stop(&source, worker).unwrap();
}

#[test]
fn a_time_that_cannot_be_looked_up_stops_the_source_with_nothing_run() {
    let topic = "replay-lookup";
    let cluster = cluster(topic, 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, topic, 2, 20, |i| i.to_string().into_bytes());
    // Every offset lookup is refused (not a retriable error), as a broker
    // refuses a client without rights to describe the topic.
    cluster.request_errors(
        RDKafkaApiKey::ListOffsets,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 64],
    );
    let at = StartFrom::parse("2026-01-01T00:00:00Z").unwrap();
    let (source, seen, worker) = consume(
        &brokers,
        topic,
        "xzepr-consumer-lookup",
        options(at),
        "earliest",
    );
    let handle = source.handle();
    wait_for(PATIENCE, "the source to stop", || handle.is_finished());
    let e = stop(&source, worker).unwrap_err();
    assert!(matches!(e, SourceError::StartFrom { .. }), "{e}");
    assert!(
        seen.lock().unwrap().is_empty(),
        "no partition started elsewhere"
    );
    cluster.clear_request_errors(RDKafkaApiKey::ListOffsets);
    assert_eq!(
        committed(&brokers, "xzepr-consumer-lookup", topic, 2)
            .values()
            .max(),
        Some(&-1),
        "nothing committed"
    );
}
