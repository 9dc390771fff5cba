//! kill -9 chaos: a consumer in a child process (this binary, re-run with
//! `CHAOS_CHILD` set) with an I/O-bound async handler and automatic lifecycle,
//! against the mock broker and the XZepr stand-in living in this process;
//! 50,000 events; the child is SIGKILLed at 5 random moments and restarted
//! each time. Run with the completion map and without.
//!
//! At the end: every event has a `started` and a terminal post, committed =
//! end offsets; the events handled more than once are printed beside their
//! bound: the events that some kill left to be read again — started so far,
//! and at or past the commit point the broker holds after the kill (in flight
//! at the kill, or finished after the last commit). Without the map each of
//! them is handled again (none is skipped); with it, those it recorded as done
//! are skipped.
//!
//! `cargo test --features dev-stack --test chaos_kill -- --nocapture`
#![cfg(feature = "dev-stack")]

mod chaos_support;
mod kafka_support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use xzepr_consumer::devstack::StandIn;
use xzepr_consumer::generate::xzepr_event;

use kafka_support::*;

const N: u64 = 50_000;
/// Enough partitions that 50,000 ~1 KB events stay under the mock broker's
/// 5 MB a partition.
const PARTITIONS: i32 = 16;
const KILLS: usize = 5;
const TOPIC: &str = "chaos";
const SERVICE: &str = "chaos";
const GROUP: &str = "xzepr-consumer-chaos";

fn main() {
    if std::env::var_os("CHAOS_CHILD").is_some() {
        child();
        return;
    }
    // Side by side: each on its own broker, stand-in and child.
    let (without, with) = std::thread::scope(|s| {
        let without = s.spawn(|| run(false));
        let with = s.spawn(|| run(true));
        (without.join().unwrap(), with.join().unwrap())
    });
    eprintln!(
        "kill -9 x{KILLS} over {N} events: handled more than once without the completion map \
         {} (bound {}), with it {} (bound {}, {} replays skipped as already done)",
        without.duplicates, without.bound, with.duplicates, with.bound, with.skipped
    );
    assert!(
        with.duplicates < without.duplicates,
        "the completion map cuts the replays"
    );
}

struct Figures {
    duplicates: usize,
    bound: usize,
    /// Events started once, before a kill, at or past the commit point the
    /// next consumer read from: it skipped them as done.
    skipped: usize,
}

/// One chaos run on a fresh broker and stand-in.
fn run(map: bool) -> Figures {
    let began = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cluster = cluster(TOPIC, PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    // Keyed by event id: every event its own lane, so they finish out of order.
    produce_keyed(
        &brokers,
        TOPIC,
        PARTITIONS,
        N,
        |i| xzepr_event(i, "01SOMEONEELSE").0,
        |i| xzepr_event(i, "01SOMEONEELSE").1,
    );
    let ends = end_offsets(&brokers, TOPIC, PARTITIONS);
    // One producer, round robin: event i is offset i / PARTITIONS of partition i % PARTITIONS.
    assert!(ends
        .values()
        .all(|&e| e == N as i64 / i64::from(PARTITIONS)));
    let offset_of: HashMap<String, (i32, i64)> = (0..N)
        .map(|i| {
            let at = (
                (i % PARTITIONS as u64) as i32,
                (i / PARTITIONS as u64) as i64,
            );
            (format!("work-{}", xzepr_event(i, "x").0), at)
        })
        .collect();
    let standin = rt
        .block_on(
            StandIn::builder("tok")
                .latency(Duration::from_millis(1))
                .start(),
        )
        .unwrap();
    let stats = standin.stats();
    let terminal = || {
        stats.completed.load(std::sync::atomic::Ordering::Relaxed)
            + stats.failed.load(std::sync::atomic::Ordering::Relaxed)
    };

    let mut rng = rand::rng();
    let mut moments: Vec<u64> = (0..KILLS)
        .map(|_| rng.random_range(N / 20..N * 9 / 10))
        .collect();
    moments.sort_unstable();
    let mut generation = 0;
    let mut child = spawn(&brokers, &standin.url(), map, generation);
    // After each kill: the commit points the next consumer starts from.
    let mut after_kill: Vec<HashMap<i32, i64>> = Vec::new();
    for &moment in &moments {
        chaos_support::wait_for(&mut [&mut child], "the next kill moment", || {
            terminal() >= moment
        });
        child.kill().unwrap();
        child.wait().unwrap();
        // What the dead child had sent reaches the broker and the stand-in.
        std::thread::sleep(Duration::from_millis(300));
        after_kill.push(committed(&brokers, GROUP, TOPIC, PARTITIONS));
        generation += 1;
        child = spawn(&brokers, &standin.url(), map, generation);
    }
    chaos_support::wait_for(&mut [&mut child], "every event, committed", || {
        terminal() >= N && committed(&brokers, GROUP, TOPIC, PARTITIONS) == ends
    });
    child.kill().unwrap();
    child.wait().unwrap();

    // Per work: the generations that started it, and its terminal posts.
    let mut started: HashMap<String, Vec<usize>> = HashMap::new();
    let mut terminals: HashMap<String, usize> = HashMap::new();
    for e in standin.recorded_events() {
        let work = e["payload"]["work_id"].as_str().unwrap().to_owned();
        let name = e["name"].as_str().unwrap();
        if name.ends_with(".started") {
            let generation = e["package"].as_str().unwrap()["chaos-gen".len()..]
                .parse()
                .unwrap();
            started.entry(work).or_default().push(generation);
        } else {
            *terminals.entry(work).or_default() += 1;
        }
    }
    let missing = offset_of
        .keys()
        .filter(|w| !started.contains_key(*w) || !terminals.contains_key(*w))
        .count();
    let duplicates = started.values().filter(|g| g.len() > 1).count();
    // Read again after kill k: every event started so far at or past the commit
    // point the next consumer starts from (in flight at the kill, or finished
    // after the last commit). An event handled twice is in one of these sets.
    let replayable = |work: &String, gens: &Vec<usize>| {
        let (p, o) = offset_of[work];
        after_kill
            .iter()
            .enumerate()
            .any(|(k, points)| gens.iter().any(|&g| g <= k) && o >= points[&p])
    };
    let bound = started.iter().filter(|(w, g)| replayable(w, g)).count();
    // Of those, the ones never started again: skipped as done.
    let skipped = started
        .iter()
        .filter(|(w, g)| g.len() == 1 && replayable(w, g))
        .count();
    eprintln!(
        "completion map {}: {} events, {missing} missing, {duplicates} handled more than once \
         (bound {bound}), {skipped} skipped as done, committed {} = end offsets, {:.0?}",
        if map { "on" } else { "off" },
        offset_of.len(),
        ends.values().sum::<i64>(),
        began.elapsed(),
    );
    assert_eq!(missing, 0, "every event has a started and a terminal post");
    assert!(
        started.keys().all(|w| offset_of.contains_key(w)),
        "only our events"
    );
    assert!(duplicates <= bound, "{duplicates} > {bound}");
    // Without the map nothing is skipped: every event past a commit point is
    // read again. With it, work done before a kill is skipped.
    if map {
        assert!(skipped > 0, "the map skipped work done before a kill");
    } else {
        assert_eq!(skipped, 0, "no offset skipped");
    }
    Figures {
        duplicates,
        bound,
        skipped,
    }
}

fn spawn(brokers: &str, xzepr: &str, map: bool, generation: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env("CHAOS_CHILD", "1")
        .env("CHAOS_BROKERS", brokers)
        .env("CHAOS_XZEPR", xzepr)
        .env("CHAOS_MAP", if map { "1" } else { "0" })
        .env("CHAOS_GENERATION", generation.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// The consumer: runs until killed.
fn child() {
    use xzepr_consumer::decode::CloudEventMessage;
    use xzepr_consumer::dispatch::Ordering;
    use xzepr_consumer::handler::WorkInfo;
    use xzepr_consumer::pipeline::{Pipeline, WorkTemplate};

    let var = |name: &str| std::env::var(name).unwrap();
    let chaos_support::ChildParts {
        rt,
        receiver,
        reporter,
        task: _task,
        kafka,
    } = chaos_support::child_parts(&var("CHAOS_BROKERS"), &var("CHAOS_XZEPR"), TOPIC, SERVICE);
    let package = format!("chaos-gen{}", var("CHAOS_GENERATION"));
    let _running = Pipeline::builder(kafka)
        .ordering(Ordering::PerKey)
        .max_in_flight(256)
        .commit_interval(Duration::from_millis(100))
        .drain_timeout(Duration::from_secs(1))
        .completion_map(var("CHAOS_MAP") == "1")
        .runtime(rt.handle().clone())
        .lifecycle(
            reporter,
            WorkTemplate::new(receiver, "chaos", "1.0.0", package),
        )
        .start_async(|_event: CloudEventMessage, info: WorkInfo| async move {
            // I/O-bound: it only waits. One event in 30 waits 1-2 s (a slow
            // dependency), the same one on every replay, so the commit points lag
            // behind work that finished.
            let h = xzepr_consumer::dispatch::fnv1a(info.work_id.as_bytes());
            let wait = if h % 30 == 0 {
                1_000 + h / 30 % 1_000
            } else {
                2 + h % 8
            };
            tokio::time::sleep(Duration::from_millis(wait)).await;
            Ok::<_, String>(serde_json::Value::Null)
        })
        .unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
