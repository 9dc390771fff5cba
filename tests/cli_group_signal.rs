//! `run --exec` stopped by a signal sent to its whole process group, as Ctrl-C
//! in a terminal, `timeout` and a shell's job control send it.
//!
//! Each program runs in a process group of its own, but it is created in
//! `run`'s group and moves to its own just before it executes: a group signal
//! sent in that window reaches it too. Such a program never ran its work; it
//! must not be reported `failed` and committed as if it had.
#![cfg(all(feature = "cli", unix))]

mod cli_support;
mod kafka_support;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use cli_support::*;

/// Stops in the middle of a stream of programs that take no time, so many are
/// being started at the signal; a few rounds, as the window is short.
#[test]
fn a_stop_signal_to_the_whole_process_group_fails_no_program() {
    const N: u64 = 20_000;
    const ROUNDS: usize = 3;
    let stack = Stack::start("cli.group-signal", 4);
    stack.produce(N);
    for round in 0..ROUNDS {
        let service = format!("group-signal-{round}");
        let mut cmd = stack.command(&[
            "run",
            "--service-name",
            &service,
            "--concurrency",
            "16",
            "--exec",
            "/bin/true",
        ]);
        // Its own group, as a shell's job or `timeout` would make it.
        cmd.process_group(0);
        let mut run = Running::spawn(cmd);
        let completed = |stack: &Stack| {
            stack
                .standin
                .recorded_events()
                .iter()
                .filter(|e| e["payload"]["status"] == "completed")
                .count()
        };
        let before = completed(&stack);
        let t = Instant::now();
        while completed(&stack) < before + 300 {
            run.assert_running();
            assert!(t.elapsed() < DEADLINE, "no progress:\n{}", run.stderr());
            std::thread::sleep(Duration::from_millis(10));
        }
        let group = format!("-{}", run.child.id());
        let sent = Command::new("kill")
            .args(["-INT", "--", &group])
            .status()
            .unwrap()
            .success();
        assert!(sent, "kill -INT -- {group} failed");
        let status = run.wait();
        let stderr = run.stderr();
        assert!(status.success(), "round {round}: {status}:\n{stderr}");
        assert!(
            !stderr.contains("killed by signal"),
            "round {round}: a program was failed by the stop signal:\n{stderr}"
        );
        // Not asserted (the window may be missed): shows the path was taken.
        println!(
            "round {round}: {} program(s) caught by the signal and run again",
            stderr.matches("running it again").count()
        );
        let failed: Vec<_> = stack
            .standin
            .recorded_events()
            .into_iter()
            .filter(|e| e["payload"]["status"] == "failed")
            .map(|e| e["payload"]["details"].clone())
            .collect();
        assert!(failed.is_empty(), "round {round}: failed posts: {failed:?}");
    }
}
