//! Scale-out chaos: the way a service grows past one machine is more instances in
//! the same consumer group. Three consumer processes (this binary, re-run with
//! `SCALE_CHILD` set) in one group on 8 partitions, per-partition order,
//! automatic lifecycle to the XZepr stand-in, 50,000 events: a second and a
//! third instance join mid-stream, then the first leaves with SIGTERM and the
//! second is killed with SIGKILL.
//!
//! At the end: 0 missing (every event has a `started` and a terminal post),
//! committed = end offsets, each partition's events first handled in offset
//! order across owners, and the events handled more than once printed beside
//! their bound: those the killed instance had started at or past the commit
//! point it left, plus one in-flight window per graceful handover.
//!
//! `cargo test --features dev-stack --test chaos_scale -- --nocapture`
#![cfg(feature = "dev-stack")]

mod chaos_support;
mod kafka_support;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use xzepr_consumer::devstack::StandIn;

use chaos_support::{wait_for, HEARTBEAT};
use kafka_support::*;

const N: u64 = 50_000;
const PARTITIONS: i32 = 8;
const TOPIC: &str = "scale";
const SERVICE: &str = "scale";
const GROUP: &str = "xzepr-consumer-scale";
const MAX_IN_FLIGHT: usize = 64;
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// The work a handover may replay. The broker refuses commits from the moment
/// the group prepares a rebalance until the member, at its next heartbeat,
/// revokes (the mock also refuses the commit made on revoke): a heartbeat
/// interval, two commit intervals (the last accepted commit and its round
/// trip), and the slowest handler.
const REPLAY_WINDOW: Duration = Duration::from_millis(
    HEARTBEAT.as_millis() as u64 + 2 * COMMIT_INTERVAL.as_millis() as u64 + 100,
);

/// A small event (so 50,000 stay within the mock broker's 5 MB a partition).
fn event(i: u64) -> Vec<u8> {
    format!(
        r#"{{"id":"SCALE{i:021}","source":"xzepr.event.receiver.01SOMEONEELSE","specversion":"1.0.1","type":"deployment.completed","platform_id":"linux","data":{{"events":[]}}}}"#
    )
    .into_bytes()
}

fn work_of(i: u64) -> String {
    format!("work-SCALE{i:021}")
}

fn main() {
    if std::env::var_os("SCALE_CHILD").is_some() {
        child();
        return;
    }
    let began = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cluster = cluster(TOPIC, PARTITIONS);
    let brokers = cluster.bootstrap_servers();
    produce(&brokers, TOPIC, PARTITIONS, N, event);
    let ends = end_offsets(&brokers, TOPIC, PARTITIONS);
    assert!(ends
        .values()
        .all(|&e| e == N as i64 / i64::from(PARTITIONS)));
    // Round robin from one producer: event i is offset i / 8 of partition i % 8.
    let at = |i: u64| {
        (
            (i % PARTITIONS as u64) as i32,
            (i / PARTITIONS as u64) as i64,
        )
    };
    let standin = rt
        .block_on(
            StandIn::builder("tok")
                .latency(Duration::from_millis(1))
                .start(),
        )
        .unwrap();
    let stats = standin.stats();
    let terminal = || stats.completed.load(Relaxed) + stats.failed.load(Relaxed);
    let logs = tempfile::tempdir().unwrap();

    let mut a = spawn(&brokers, &standin.url(), logs.path(), "a");
    wait_for(&mut [&mut a], "a start", || terminal() >= 3_000);
    let mut b = spawn(&brokers, &standin.url(), logs.path(), "b");
    wait_for(&mut [&mut a, &mut b], "b to join", || terminal() >= 10_000);
    let mut c = spawn(&brokers, &standin.url(), logs.path(), "c");
    wait_for(&mut [&mut a, &mut b, &mut c], "c to join", || {
        terminal() >= 20_000
    });
    // `a` leaves gracefully: SIGTERM, it drains, commits and exits 0.
    signal(&a, "TERM");
    let status = a.wait().unwrap();
    assert!(status.success(), "a exits 0 after SIGTERM: {status}");
    wait_for(&mut [&mut b, &mut c], "b and c to go on", || {
        terminal() >= 30_000
    });
    signal(&b, "KILL");
    b.wait().unwrap();
    let killed_at = now_nanos();
    // What the dead instance sent reaches the broker and the stand-in.
    std::thread::sleep(Duration::from_millis(300));
    let after_kill = (committed(&brokers, GROUP, TOPIC, PARTITIONS), killed_at);
    wait_for(&mut [&mut c], "every event, committed", || {
        terminal() >= N && committed(&brokers, GROUP, TOPIC, PARTITIONS) == ends
    });
    signal(&c, "TERM");
    assert!(c.wait().unwrap().success());

    // Lifecycle: per work, the instances that started it, and its terminal posts.
    let mut started: HashMap<String, Vec<String>> = HashMap::new();
    let mut terminals: HashMap<String, usize> = HashMap::new();
    for e in standin.recorded_events() {
        let work = e["payload"]["work_id"].as_str().unwrap().to_owned();
        if e["name"].as_str().unwrap().ends_with(".started") {
            let who = e["package"].as_str().unwrap().to_owned();
            started.entry(work).or_default().push(who);
        } else {
            *terminals.entry(work).or_default() += 1;
        }
    }
    let missing = (0..N)
        .filter(|&i| !started.contains_key(&work_of(i)) || !terminals.contains_key(&work_of(i)))
        .count();
    let duplicates = (0..N)
        .filter(|&i| started.get(&work_of(i)).is_some_and(|s| s.len() > 1))
        .count();
    // Handlings from the instances' logs: per partition, (time, offset, owner).
    let mut handled: BTreeMap<i32, Vec<(u128, i64, String)>> = BTreeMap::new();
    for entry in std::fs::read_dir(logs.path()).unwrap() {
        let entry = entry.unwrap();
        let owner = entry.file_name().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(entry.path()).unwrap();
        for line in text.lines() {
            let mut f = line.split(' ');
            let (Some(p), Some(o), Some(t)) = (f.next(), f.next(), f.next()) else {
                continue; // the torn last line of a killed instance
            };
            let (Ok(p), Ok(o), Ok(t)) = (p.parse::<i32>(), o.parse::<i64>(), t.parse::<u128>())
            else {
                continue;
            };
            handled.entry(p).or_default().push((t, o, owner.clone()));
        }
    }
    // Bound: at each handover of a partition, what its old owner handled in the
    // last `REPLAY_WINDOW` before it let go (the in-flight events and those
    // finished after its last accepted commit: the mock broker refuses the
    // commit made on revoke while the group rebalances, so the periodic commit
    // before it stands), plus what the killed instance left past its commit points.
    let mut bound = killed_window(&started, &after_kill, at);
    let mut handovers = 0;
    let mut out_of_order = 0;
    for (p, records) in &mut handled {
        records.sort();
        for (i, w) in records.windows(2).enumerate() {
            if w[0].2 == w[1].2 || w[0].2 == "b" && w[1].0 > kill_time(&after_kill) {
                continue;
            }
            handovers += 1;
            let (last, owner) = (w[0].0, &w[0].2);
            bound += records[..=i]
                .iter()
                .rev()
                .take_while(|r| last - r.0 <= REPLAY_WINDOW.as_nanos())
                .filter(|r| &r.2 == owner)
                .count();
        }
        // Order: each offset's first handling comes after every lower offset's,
        // whichever instance did it.
        let mut first: HashMap<i64, u128> = HashMap::new();
        for (t, o, _) in records.iter() {
            first.entry(*o).or_insert(*t);
        }
        let mut by_offset: Vec<_> = first.into_iter().collect();
        by_offset.sort();
        out_of_order += by_offset.windows(2).filter(|w| w[0].1 > w[1].1).count();
        assert_eq!(
            by_offset.len() as i64,
            ends[p],
            "partition {p}: every offset handled"
        );
    }
    eprintln!(
        "scale-out: 3 instances on {PARTITIONS} partitions, {N} events, 2 joins, a SIGTERM and a \
         SIGKILL: {missing} missing, {duplicates} handled more than once (bound {bound}: what the \
         old owner handled in its last {REPLAY_WINDOW:?} at {handovers} handovers, and what the \
         killed one left past its commit points), {out_of_order} out of order, committed = end \
         offsets, {:.0?}",
        began.elapsed()
    );
    assert_eq!(missing, 0, "every event has a started and a terminal post");
    assert_eq!(out_of_order, 0, "per-partition order across owners");
    assert!(duplicates <= bound, "{duplicates} > {bound}");
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// When `b` was killed.
fn kill_time(after_kill: &(HashMap<i32, i64>, u128)) -> u128 {
    after_kill.1
}

/// What the killed instance had started at or past the commit points it left.
fn killed_window(
    started: &HashMap<String, Vec<String>>,
    after_kill: &(HashMap<i32, i64>, u128),
    at: impl Fn(u64) -> (i32, i64),
) -> usize {
    (0..N)
        .filter(|&i| {
            let (p, o) = at(i);
            started
                .get(&work_of(i))
                .is_some_and(|s| s.iter().any(|w| w == "scale-b"))
                && o >= after_kill.0[&p]
        })
        .count()
}

fn spawn(brokers: &str, xzepr: &str, logs: &Path, name: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env("SCALE_CHILD", "1")
        .env("SCALE_BROKERS", brokers)
        .env("SCALE_XZEPR", xzepr)
        .env("SCALE_LOG", logs.join(name))
        .env("SCALE_NAME", name)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig}");
}

/// One instance: runs until SIGTERM (drain, commit, exit 0) or SIGKILL.
fn child() {
    use std::sync::{Arc, Mutex};
    use xzepr_consumer::decode::CloudEventMessage;
    use xzepr_consumer::dispatch::Ordering;
    use xzepr_consumer::handler::WorkInfo;
    use xzepr_consumer::pipeline::{Pipeline, WorkTemplate};

    let var = |name: &str| std::env::var(name).unwrap();
    let chaos_support::ChildParts {
        rt,
        receiver,
        reporter,
        task,
        kafka,
    } = chaos_support::child_parts(&var("SCALE_BROKERS"), &var("SCALE_XZEPR"), TOPIC, SERVICE);
    let log = Arc::new(Mutex::new(
        std::fs::File::create(PathBuf::from(var("SCALE_LOG"))).unwrap(),
    ));
    let running = Pipeline::builder(kafka)
        .ordering(Ordering::PerPartition)
        .max_in_flight(MAX_IN_FLIGHT)
        .commit_interval(COMMIT_INTERVAL)
        .drain_timeout(Duration::from_secs(2))
        .runtime(rt.handle().clone())
        .lifecycle(
            reporter,
            WorkTemplate::new(
                receiver,
                "scale",
                "1.0.0",
                format!("scale-{}", var("SCALE_NAME")),
            ),
        )
        .start_async(move |_event: CloudEventMessage, info: WorkInfo| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            // One write per handling, unbuffered: a SIGKILL loses at most a torn line.
            let line = format!("{} {} {now}\n", info.partition, info.offset);
            let _ = log.lock().unwrap().write_all(line.as_bytes());
            async move {
                let h = xzepr_consumer::dispatch::fnv1a(info.work_id.as_bytes());
                tokio::time::sleep(Duration::from_millis(1 + h % 4)).await;
                Ok::<_, String>(serde_json::Value::Null)
            }
        })
        .unwrap();
    rt.block_on(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        term.recv().await;
    });
    running.shutdown();
    running.join().unwrap();
    drop(running);
    assert!(rt.block_on(task.drain(Duration::from_secs(30))));
    std::process::exit(0);
}
