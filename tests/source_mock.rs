//! The source stage and offset commits against librdkafka's mock cluster (the real
//! Kafka protocol, in process).

mod kafka_support;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::Rng;
use xzepr_consumer::config::KafkaConsumerConfig;
use xzepr_consumer::source::{Message, Source, SourceOptions};

use kafka_support::*;

/// Generous bound for "eventually" in a loaded CI machine; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(240);

fn options(max_in_flight: usize) -> SourceOptions {
    let mut o = SourceOptions::default();
    o.max_in_flight = max_in_flight.into();
    o.commit_interval = Duration::from_millis(100);
    o.drain_timeout = Duration::from_secs(5);
    o
}

type Seen = Arc<Mutex<HashMap<i32, BTreeSet<i64>>>>;

/// Worker threads that finish messages in a random order, after random delays.
/// The offsets in `skip` are never finished.
fn shuffling_workers(
    source: &mut Source,
    seen: Seen,
    skip: &'static [(i32, i64)],
) -> Vec<std::thread::JoinHandle<()>> {
    paced_shuffling_workers(source, seen, skip, Duration::ZERO)
}

/// As [`shuffling_workers`], each message taking at least `pace` of work.
fn paced_shuffling_workers(
    source: &mut Source,
    seen: Seen,
    skip: &'static [(i32, i64)],
    pace: Duration,
) -> Vec<std::thread::JoinHandle<()>> {
    let rx = source.take_receiver().unwrap();
    (0..2)
        .map(|_| {
            let (seen, rx) = (Arc::clone(&seen), rx.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rng();
                let mut held: Vec<Message> = Vec::new();
                let mut kept: Vec<Message> = Vec::new();
                loop {
                    let got = rx.recv_timeout(Duration::from_millis(20));
                    let closed =
                        matches!(got, Err(crossbeam_channel::RecvTimeoutError::Disconnected));
                    let idle = got.is_err();
                    // Messages outlive their batch: the lane is released when the
                    // batch is dropped, and they finish later, in any order.
                    for m in got.into_iter().flatten() {
                        seen.lock()
                            .unwrap()
                            .entry(m.partition)
                            .or_default()
                            .insert(m.offset);
                        held.push(m);
                    }
                    if held.len() >= rng.random_range(1..64) || idle {
                        held.shuffle(&mut rng);
                        for m in held.drain(..) {
                            if rng.random_ratio(1, 500) {
                                std::thread::sleep(Duration::from_micros(
                                    rng.random_range(0..2000),
                                ));
                            }
                            if !pace.is_zero() {
                                std::thread::sleep(pace);
                            }
                            if skip.contains(&(m.partition, m.offset)) {
                                // Kept unfinished (not dropped, which would hold
                                // it) until the worker ends.
                                kept.push(m);
                                continue;
                            }
                            m.finish();
                        }
                    }
                    if closed {
                        return;
                    }
                }
            })
        })
        .collect()
}

/// Shuts the source down and joins its poll thread, then its workers.
fn stop(
    source: &Source,
    workers: Vec<std::thread::JoinHandle<()>>,
) -> xzepr_consumer::source::SourceHandle {
    let handle = source.handle();
    handle.shutdown();
    handle.join().unwrap();
    for w in workers {
        w.join().unwrap();
    }
    handle
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < PATIENCE, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn total(seen: &Seen) -> usize {
    seen.lock().unwrap().values().map(BTreeSet::len).sum()
}

#[test]
fn random_completion_order_commits_to_the_end() {
    let cluster = cluster("events", 4);
    let brokers = cluster.bootstrap_servers();
    const N: u64 = 100_000;
    produce(&brokers, "events", 4, N, |i| {
        format!("{{\"n\":{i}}}").into_bytes()
    });
    let ends = end_offsets(&brokers, "events", 4);

    let config = KafkaConsumerConfig::new(&brokers, "events", "order-test");
    let mut source = Source::start(&config, options(512)).unwrap();
    let seen: Seen = Arc::default();
    let workers = shuffling_workers(&mut source, Arc::clone(&seen), &[]);
    wait_for("every message", || total(&seen) as u64 >= N);
    stop(&source, workers);
    let seen = seen.lock().unwrap();
    for p in 0..4 {
        let offsets = &seen[&p];
        assert_eq!(
            offsets.len() as i64,
            ends[&p],
            "partition {p}: every offset handled"
        );
        assert_eq!(*offsets.iter().next_back().unwrap(), ends[&p] - 1);
    }
    assert_eq!(
        committed(&brokers, "xzepr-consumer-order-test", "events", 4),
        ends
    );
}

#[test]
fn an_unfinished_offset_holds_the_commit_point_and_is_redelivered() {
    let cluster = cluster("poison", 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "poison", 2, 2_000, |i| {
        format!("{i}").into_bytes()
    });
    const POISON: (i32, i64) = (1, 300);
    let poison = POISON;
    // Without the completion map: the whole tail after the gap is replayed.
    let mut opts = options(64);
    opts.completion_map = false;

    let config = KafkaConsumerConfig::new(&brokers, "poison", "poison-test");
    let mut source = Source::start(&config, opts.clone()).unwrap();
    let seen: Seen = Arc::default();
    let workers = shuffling_workers(&mut source, Arc::clone(&seen), &[POISON]);
    wait_for("every message", || total(&seen) >= 2_000);
    // Later offsets finished; the commit point must still be the poison offset.
    let handle = source.handle();
    wait_for("partition 0 committed to its end", || {
        handle
            .committed()
            .iter()
            .any(|(_, p, o)| (*p, *o) == (0, 1_000))
    });
    stop(&source, workers);
    let committed_now = committed(&brokers, "xzepr-consumer-poison-test", "poison", 2);
    assert_eq!(committed_now[&0], 1_000);
    assert_eq!(committed_now[&1], poison.1);

    // A new consumer in the group gets the poison offset and everything after it.
    let mut again = Source::start(&config, opts).unwrap();
    let seen2: Seen = Arc::default();
    let workers = shuffling_workers(&mut again, Arc::clone(&seen2), &[]);
    wait_for("the replay", || total(&seen2) >= 700);
    stop(&again, workers);
    let seen2 = seen2.lock().unwrap();
    let replayed: Vec<i64> = seen2[&1].iter().copied().collect();
    assert_eq!(replayed, (300..1_000).collect::<Vec<_>>());
    assert!(!seen2.contains_key(&0), "partition 0 was fully committed");
}

#[test]
fn a_second_consumer_joining_mid_stream_loses_nothing() {
    let cluster = cluster("rebalance", 4);
    let brokers = cluster.bootstrap_servers();
    const N: u64 = 40_000;
    produce(&brokers, "rebalance", 4, N, |i| format!("{i}").into_bytes());
    // The mock broker refuses every commit from the moment a member joins until the
    // group has rebalanced (a real broker accepts the current generation's), and a
    // member learns of the rebalance at its next heartbeat: heartbeats every 100 ms
    // keep that window short.
    let config = KafkaConsumerConfig::new(&brokers, "rebalance", "rebalance-test")
        .set("heartbeat.interval.ms", "100");
    // Paced work (two workers, at least 100 µs a message) keeps the stream going
    // while the second member joins: the first cannot race through the whole
    // backlog inside the window in which its commits are refused.
    let pace = Duration::from_micros(100);

    let seen: Seen = Arc::default();
    let mut first = Source::start(&config, options(128)).unwrap();
    let w1 = paced_shuffling_workers(&mut first, Arc::clone(&seen), &[], pace);
    wait_for(
        "a commit on every partition before the second member joins",
        || {
            let c = committed(&brokers, "xzepr-consumer-rebalance-test", "rebalance", 4);
            (0..4).all(|p| c.get(&p).is_some_and(|&o| o > 0))
        },
    );
    let handled_before_join = total(&seen);
    let seen_b: Seen = Arc::default();
    let mut second = Source::start(&config, options(128)).unwrap();
    let w2 = paced_shuffling_workers(&mut second, Arc::clone(&seen_b), &[], pace);
    wait_for("the second consumer to be assigned", || {
        second
            .handle()
            .stats()
            .assigned
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    });
    wait_for("every offset handled at least once", || {
        let a = seen.lock().unwrap();
        let b = seen_b.lock().unwrap();
        let distinct: usize = (0..4)
            .map(|p| {
                let mut s = a.get(&p).cloned().unwrap_or_default();
                s.extend(b.get(&p).into_iter().flatten());
                s.len()
            })
            .sum();
        distinct as u64 >= N
    });
    // One after the other: a member leaving triggers a rebalance, and the mock
    // broker refuses the other's commits while it is in progress.
    for s in [&second, &first] {
        s.handle().shutdown();
        s.handle().join().unwrap();
    }
    for w in w1.into_iter().chain(w2) {
        w.join().unwrap();
    }
    let a = seen.lock().unwrap();
    let b = seen_b.lock().unwrap();
    let both: usize = (0..4)
        .map(|p| match (a.get(&p), b.get(&p)) {
            (Some(x), Some(y)) => x.intersection(y).count(),
            _ => 0,
        })
        .sum();
    let refused = first
        .handle()
        .stats()
        .revoke_commit_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "rebalance: {handled_before_join} handled before the join, {both} duplicates, \
         {refused} revoke commits refused by the broker"
    );
    assert!(
        handled_before_join < N as usize,
        "the second member joined mid-stream"
    );
    assert!(
        !b.is_empty(),
        "the second member handled partitions of its own"
    );
    // Duplicates come only from work the first member finished after its last
    // commit the broker accepted (in flight at the revoke, or finished while the
    // broker refused commits): never a whole partition replayed from the start.
    for p in 0..4 {
        if let (Some(x), Some(y)) = (a.get(&p), b.get(&p)) {
            let dup: Vec<i64> = x.intersection(y).copied().collect();
            assert!(
                dup.first().is_none_or(|&o| o > 0),
                "partition {p} was replayed from its start"
            );
        }
    }
    assert!((both as u64) < N / 2, "{both} duplicates");
    // Never committed past the end, and every partition has a commit.
    let ends = end_offsets(&brokers, "rebalance", 4);
    let committed = committed(&brokers, "xzepr-consumer-rebalance-test", "rebalance", 4);
    for p in 0..4 {
        assert!(
            committed[&p] <= ends[&p],
            "partition {p}: {committed:?} past {ends:?}"
        );
        assert!(committed[&p] > 0, "partition {p}: nothing committed");
    }
}

#[test]
fn a_slow_handler_pauses_partitions_and_memory_stays_bounded() {
    // The mock broker keeps at most ~100,000 messages (or 5 MB) per partition:
    // a large backlog needs many partitions of small messages.
    const PARTITIONS: i32 = 32;
    const N: u64 = 300_000;
    let cluster = cluster("backlog", PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "backlog", PARTITIONS, N, |i| {
        format!("{{\"n\":{i}}}").into_bytes()
    });
    let config = KafkaConsumerConfig::new(&brokers, "backlog", "slow-test");
    const BUDGET: usize = 1 << 20;
    let mut opts = options(1024);
    opts.buffer_budget = BUDGET;
    let mut source = Source::start(&config, opts).unwrap();
    let handle = source.handle();
    let rss_start = rss_kib();
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let rx = source.take_receiver().unwrap();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (rx, done, handle) = (rx.clone(), Arc::clone(&done), handle.clone());
            std::thread::spawn(move || {
                for batch in rx {
                    // The gate: no work is done until the source has paused a
                    // partition, so the pause never depends on relative speeds.
                    while handle
                        .stats()
                        .pauses
                        .load(std::sync::atomic::Ordering::Relaxed)
                        == 0
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    for m in batch {
                        m.finish();
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    drop(rx);
    let mut rss_peak = rss_start;
    let mut ticks = 0u32;
    wait_for("the backlog", || {
        rss_peak = rss_peak.max(rss_kib());
        ticks += 1;
        let n = done.load(std::sync::atomic::Ordering::Relaxed);
        if ticks % 200 == 0 {
            eprintln!("backlog progress: {n} of {N}, {:?}", handle.stats());
        }
        n >= N
    });
    handle.shutdown();
    handle.join().unwrap();
    for w in workers {
        w.join().unwrap();
    }
    let stats = handle.stats();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let (pauses, resumes) = (load(&stats.pauses), load(&stats.resumes));
    let peak = load(&stats.peak_buffered_bytes) as usize;
    eprintln!(
        "backlog of {N}: pauses={pauses} resumes={resumes} peak_in_flight={} peak_buffered_bytes={peak} rss start={rss_start} KiB peak={rss_peak} KiB",
        load(&stats.peak_in_flight),
    );
    assert!(load(&stats.peak_in_flight) <= 1024);
    assert!(
        pauses > 0,
        "buffers over their budget pause their partitions"
    );
    assert!(resumes > 0, "drained buffers resume them");
    // Never over the budget: a message that does not fit is left to
    // librdkafka (its partition paused and sought back to it), not kept.
    assert!(peak <= BUDGET, "{peak} bytes buffered, budget {BUDGET}");
    // Never evicted: had the group dropped us, the commit would fail and the
    // committed offsets would stop short of the end.
    let ends = end_offsets(&brokers, "backlog", PARTITIONS);
    assert_eq!(
        committed(&brokers, "xzepr-consumer-slow-test", "backlog", PARTITIONS),
        ends
    );
}

#[test]
fn configuration_errors_name_the_field() {
    let mut o = options(0);
    let config = KafkaConsumerConfig::new("127.0.0.1:1", "t", "s");
    let err = Source::start(&config, o.clone()).unwrap_err().to_string();
    assert!(err.contains("max_in_flight"), "{err}");
    o.max_in_flight = 1.into();
    o.batch = 0;
    let err = Source::start(&config, o.clone()).unwrap_err().to_string();
    assert!(err.contains("batch"), "{err}");
    o.batch = 4;
    o.drain_timeout = Duration::from_secs(60);
    let err = Source::start(&config, o.clone()).unwrap_err().to_string();
    assert!(err.contains("drain_timeout"), "{err}");
    o.drain_timeout = Duration::from_secs(1);
    o.buffer_budget = 0;
    let err = Source::start(&config, o.clone()).unwrap_err().to_string();
    assert!(err.contains("buffer_budget"), "{err}");
    o.buffer_budget = 1 << 20;
    o.completion_map_max_bytes = 4_097;
    let err = Source::start(&config, o.clone()).unwrap_err().to_string();
    assert!(err.contains("completion_map_max_bytes"), "{err}");
    o.completion_map_max_bytes = 4_096;
    let sasl = KafkaConsumerConfig::from_env_with("s", |k| {
        (k == "XZEPR_KAFKA_SECURITY_PROTOCOL").then(|| "SASL_PLAINTEXT".to_owned())
    })
    .unwrap();
    let err = Source::start(&sasl, o).unwrap_err().to_string();
    assert!(err.contains("XZEPR_KAFKA_SASL_USERNAME"), "{err}");
}

#[test]
fn a_held_offset_stops_its_partition_at_the_tracking_limit() {
    let cluster = cluster("held", 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "held", 2, 20_000, |i| format!("{i}").into_bytes());
    let config = KafkaConsumerConfig::new(&brokers, "held", "held-test");
    const MAX_TRACKED: usize = 1_000;
    let mut opts = options(64);
    opts.max_tracked = MAX_TRACKED;
    let mut source = Source::start(&config, opts).unwrap();
    let seen: Seen = Arc::default();
    let rx = source.take_receiver().unwrap();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (seen, rx) = (Arc::clone(&seen), rx.clone());
            std::thread::spawn(move || {
                for m in rx.iter().flatten() {
                    seen.lock()
                        .unwrap()
                        .entry(m.partition)
                        .or_default()
                        .insert(m.offset);
                    if (m.partition, m.offset) == (0, 0) {
                        m.hold();
                    } else {
                        m.finish();
                    }
                }
            })
        })
        .collect();
    wait_for("partition 1 to the end", || {
        seen.lock().unwrap().get(&1).map_or(0, BTreeSet::len) == 10_000
    });
    // Partition 0 runs into its tracking limit and pauses, its held offset
    // first.
    let held = source.handle();
    wait_for("partition 0 paused at its limit", || {
        held.partition_states()
            .iter()
            .any(|p| p.partition == 0 && p.paused && p.held == 1 && p.commit_point == Some(0))
    });
    let handle = stop(&source, workers);
    let seen = seen.lock().unwrap();
    let dispatched0 = seen[&0].len();
    eprintln!(
        "held: partition 0 dispatched {dispatched0}, pauses {}",
        handle
            .stats()
            .pauses
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    // At the limit the partition is paused; past it only what librdkafka had
    // already handed over (at most one poll burst of 64).
    assert!(
        dispatched0 <= MAX_TRACKED + 64,
        "{dispatched0} offsets tracked behind the held one"
    );
    let committed = committed(&brokers, "xzepr-consumer-held-test", "held", 2);
    assert_eq!(
        committed[&0], 0,
        "committed at the held offset 0, never past it: {committed:?}"
    );
    assert_eq!(committed[&1], 10_000);
}

/// Offsets of partition 1 the first consumer never finishes (gaps behind which
/// the rest of the partition finishes, out of order).
const GAPS: &[(i32, i64)] = &[(1, 300), (1, 450), (1, 451), (1, 777)];

/// A first consumer finishes all of `gaps_topic` except [`GAPS`] and stops. Returns
/// what it handled, and the brokers.
fn stop_with_gaps(
    cluster: &rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    topic: &str,
    group: &str,
) -> (Seen, KafkaConsumerConfig) {
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, topic, 2, 2_000, |i| format!("{i}").into_bytes());
    let config = KafkaConsumerConfig::new(&brokers, topic, group);
    let mut source = Source::start(&config, options(64)).unwrap();
    let seen: Seen = Arc::default();
    let workers = shuffling_workers(&mut source, Arc::clone(&seen), GAPS);
    wait_for("every message", || total(&seen) >= 2_000);
    stop(&source, workers);
    (seen, config)
}

#[test]
fn the_next_consumer_skips_exactly_what_finished_behind_a_gap() {
    let cluster = cluster("gaps", 2);
    let brokers = cluster.bootstrap_servers();
    let (_, config) = stop_with_gaps(&cluster, "gaps", "gaps-test");
    let group = "xzepr-consumer-gaps-test";
    let (point, metadata) = committed_with_metadata(&brokers, group, "gaps", 1);
    assert_eq!(point, 300, "the commit point stops at the first gap");
    assert!(metadata.starts_with("xz1"), "{metadata:?}");
    assert_eq!(committed(&brokers, group, "gaps", 2)[&0], 1_000);
    // More arrives while nobody consumes: handled by the next consumer.
    produce(&brokers, "gaps", 2, 200, |i| {
        format!("new {i}").into_bytes()
    });

    let mut again = Source::start(&config, options(64)).unwrap();
    let seen: Seen = Arc::default();
    let workers = shuffling_workers(&mut again, Arc::clone(&seen), &[]);
    let stats = again.handle();
    wait_for("the gaps and the new messages", || total(&seen) >= 4 + 200);
    wait_for("the skipped offsets", || {
        stats
            .stats()
            .skipped_done
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 700 - 4
    });
    let handle = stop(&again, workers);
    let seen = seen.lock().unwrap();
    let handled1: Vec<i64> = seen[&1].iter().copied().collect();
    let expected1: Vec<i64> = [300, 450, 451, 777]
        .into_iter()
        .chain(1_000..1_100)
        .collect();
    assert_eq!(handled1, expected1, "only the gaps and the new messages");
    let handled0: Vec<i64> = seen[&0].iter().copied().collect();
    assert_eq!(handled0, (1_000..1_100).collect::<Vec<_>>());
    let s = handle.stats();
    assert_eq!(
        s.skipped_done.load(std::sync::atomic::Ordering::Relaxed),
        700 - 4
    );
    assert_eq!(
        s.completion_maps_ignored
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(
        committed(&brokers, group, "gaps", 2),
        end_offsets(&brokers, "gaps", 2)
    );
}

#[test]
fn a_corrupt_completion_map_means_a_full_replay() {
    let cluster = cluster("corrupt", 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "corrupt", 2, 2_000, |i| {
        format!("{i}").into_bytes()
    });
    let group = "xzepr-consumer-corrupt-test";
    // A valid map of partition 1 (301..1000 finished at commit point 300), with
    // one character changed: the checksum no longer matches.
    let valid = xzepr_consumer::offsets::progress::encode(300, 301..1_000, 2_048).text;
    let mut bytes = valid.into_bytes();
    let last = bytes.len() - 1;
    bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
    let corrupt = String::from_utf8(bytes).unwrap();
    commit_with_metadata(&brokers, group, "corrupt", 1, 300, &corrupt);
    assert_eq!(
        committed_with_metadata(&brokers, group, "corrupt", 1),
        (300, corrupt)
    );

    let config = KafkaConsumerConfig::new(&brokers, "corrupt", "corrupt-test");
    let mut source = Source::start(&config, options(64)).unwrap();
    let seen: Seen = Arc::default();
    let workers = shuffling_workers(&mut source, Arc::clone(&seen), &[]);
    wait_for("the replay", || total(&seen) >= 1_000 + 700);
    let handle = stop(&source, workers);
    let replayed: Vec<i64> = seen.lock().unwrap()[&1].iter().copied().collect();
    assert_eq!(
        replayed,
        (300..1_000).collect::<Vec<_>>(),
        "everything from the commit point"
    );
    let s = handle.stats();
    assert_eq!(s.skipped_done.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(
        s.completion_maps_ignored
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// The last commit at shutdown is confirmed, not assumed: the answer of a
/// manual async commit never reaches the context in this rust-rdkafka
/// (fede1024/rust-rdkafka#856), so waiting on it alone spent the whole bound
/// and took a refused commit for a lost answer.
#[test]
fn the_final_commit_at_shutdown_is_confirmed() {
    use std::sync::atomic::Ordering::Relaxed;
    let cluster = cluster("final", 2);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, "final", 2, 500, |i| format!("{i}").into_bytes());
    let config = KafkaConsumerConfig::new(&brokers, "final", "final-test");
    let mut o = options(64);
    // No periodic commit: only the final one can move the group's offsets.
    o.commit_interval = Duration::from_secs(3600);
    let mut source = Source::start(&config, o).unwrap();
    let seen: Seen = Arc::default();
    let workers = shuffling_workers(&mut source, Arc::clone(&seen), &[]);
    wait_for("every message", || total(&seen) >= 500);
    let handle = stop(&source, workers);
    let s = handle.stats();
    assert_eq!(
        s.final_commits_confirmed.load(Relaxed),
        1,
        "the final commit was not confirmed"
    );
    assert_eq!(
        committed(&brokers, "xzepr-consumer-final-test", "final", 2),
        end_offsets(&brokers, "final", 2)
    );
}
