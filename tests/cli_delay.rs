//! `run --exec --delay-topics`: a consumer killed with SIGKILL while its events
//! wait in a delay topic loses none of them. The source partitions committed
//! past them when they moved; the delay topic's partitions did not, so the
//! restarted consumer reads them again, pauses until they are due, and runs
//! them: one `started` (from the first visit) and one terminal post each.
#![cfg(all(feature = "cli", target_os = "linux"))]

mod cli_support;
mod kafka_support;

use std::collections::HashMap;
use std::time::Duration;

use cli_support::*;
use kafka_support::{committed, end_offsets};

const TOPIC: &str = "jobs";
const PARTITIONS: i32 = 2;
/// Long enough that the kill comes while every event waits; the restart then
/// waits out what is left of it (and the killed member's session).
const DELAY: &str = "15s";
const DELAY_TOPIC: &str = "jobs.retry.15s";
const N: u64 = 20;
const GROUP: &str = "xzepr-consumer-delay-kill";

/// `(started, terminal)` posts per work id, as the stand-in recorded them.
fn posts(stack: &Stack) -> HashMap<String, (usize, Vec<serde_json::Value>)> {
    let mut by_work: HashMap<String, (usize, Vec<serde_json::Value>)> = HashMap::new();
    for e in stack.standin.recorded_events() {
        let p = &e["payload"];
        let (Some(work), Some(status)) = (p["work_id"].as_str(), p["status"].as_str()) else {
            continue;
        };
        let entry = by_work.entry(work.to_owned()).or_default();
        match status {
            "started" => entry.0 += 1,
            _ => entry.1.push(p.clone()),
        }
    }
    by_work
}

#[test]
fn a_consumer_killed_while_its_events_wait_in_a_delay_topic_loses_none() {
    let stack = Stack::start(TOPIC, PARTITIONS);
    stack
        ._cluster
        .create_topic(DELAY_TOPIC, PARTITIONS, 1)
        .unwrap();
    let ids = stack.produce(N);
    let dir = tempfile::tempdir().unwrap();
    // Fails on its first visit, succeeds once back from the delay topic.
    let program = dir.path().join("flaky.sh");
    std::fs::write(
        &program,
        "#!/bin/sh\n[ -n \"$KAFKA_HEADER_XZEPR_RETRY_STAGE\" ] || { echo 'partner down' >&2; exit 3; }\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let program = program.to_str().unwrap().to_owned();
    let args = [
        "run",
        "--service-name",
        "delay-kill",
        "--delay-topics",
        DELAY,
        "--exec",
        &program,
    ];
    let brokers = stack.brokers.clone();
    let mut first = stack.spawn(&args, &[]);
    let source_ends = end_offsets(&brokers, TOPIC, PARTITIONS);
    let t = std::time::Instant::now();
    loop {
        first.assert_running();
        let moved: i64 = end_offsets(&brokers, DELAY_TOPIC, PARTITIONS)
            .values()
            .sum();
        let source = committed(&brokers, GROUP, TOPIC, PARTITIONS);
        if moved == N as i64 && source == source_ends {
            break;
        }
        assert!(
            t.elapsed() < DEADLINE,
            "every event moved to the delay topic and the source committed past it: \
             {moved} moved, committed {source:?} of {source_ends:?}\n{}",
            first.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = posts(&stack);
    assert!(
        before.values().all(|(_, terminal)| terminal.is_empty()),
        "the kill must come while the events wait: {before:?}"
    );
    assert!(before.values().all(|(started, _)| *started == 1));
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    let mut second = stack.spawn(&args, &[]);
    let reported = stack.wait_reported(&ids, &mut second);
    second.stop_cleanly();
    assert_eq!(reported.len() as u64, N);
    for (work, (status, details)) in &reported {
        assert_eq!(status, "completed", "{work}: {details}");
        assert_eq!(details["attempts"], 2, "{work}: {details}");
    }
    for (work, (started, terminal)) in posts(&stack) {
        assert_eq!(
            (started, terminal.len()),
            (1, 1),
            "{work}: one started, one terminal post"
        );
    }
    let got = committed(&brokers, GROUP, DELAY_TOPIC, PARTITIONS);
    for (p, end) in end_offsets(&brokers, DELAY_TOPIC, PARTITIONS) {
        assert_eq!(got[&p].max(0), end, "{DELAY_TOPIC} [{p}]: {got:?}");
    }
}
