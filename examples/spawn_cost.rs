//! What `run --exec`'s contract with a program costs per spawn, apart from
//! the pipeline: a bare loop spawning `/bin/true` 16 at once (the bare side
//! of `bench`'s `exec_over_spawn`), then adding one by one what `run --exec`
//! gives each program: piped stdin, stdout and stderr (the event written, the
//! output read to its end), 25 variables, and a process group of its own.
//! Rounds interleaved, medians.
//!
//! `cargo run --release --features cli --example spawn_cost [-- SPAWNS [PROGRAM]]`

use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Programs at once, as `bench` runs both sides.
const CONCURRENCY: usize = 16;
const ROUNDS: usize = 3;

#[derive(Clone, Copy, Debug)]
struct Shape {
    pipes: bool,
    vars: bool,
    group: bool,
}

async fn spawn_one(program: &str, s: Shape, input: &[u8]) -> std::io::Result<()> {
    let mut cmd = tokio::process::Command::new(program);
    if s.pipes {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    } else {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    if s.vars {
        // About what `run --exec` sets: the event's attributes, the work id,
        // the Kafka record.
        for i in 0..25 {
            cmd.env(
                format!("XZEPR_EVENT_VAR_{i}"),
                "a value of some thirty bytes..",
            );
        }
    }
    #[cfg(unix)]
    if s.group {
        cmd.process_group(0);
    }
    let mut child = cmd.spawn()?;
    if !s.pipes {
        child.wait().await?;
        return Ok(());
    }
    let (mut stdin, mut stdout, mut stderr) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let write = async {
        if let Some(i) = stdin.as_mut() {
            let _ = i.write_all(input).await;
        }
        drop(stdin.take());
    };
    let read_out = async {
        if let Some(o) = stdout.as_mut() {
            let _ = o.read_to_end(&mut out).await;
        }
    };
    let read_err = async {
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_end(&mut err).await;
        }
    };
    let (_, _, _, status) = tokio::join!(write, read_out, read_err, child.wait());
    status.map(drop)
}

/// `n` spawns of `program` shaped `s`, [`CONCURRENCY`] at once: per second.
async fn rate(program: &Arc<str>, s: Shape, n: usize) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    // The size of a generated event's JSON line.
    let input: Arc<[u8]> = vec![b'x'; 1200].into();
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (next, input, program) = (next.clone(), input.clone(), program.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Relaxed) < n {
                    spawn_one(&program, s, &input).await.expect("spawn");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("spawner");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main(worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3000);
    let program: Arc<str> = args.next().unwrap_or_else(|| "/bin/true".into()).into();
    let shapes = [
        (
            "bare: null stdio",
            Shape {
                pipes: false,
                vars: false,
                group: false,
            },
        ),
        (
            "+ piped stdio, input written, output read",
            Shape {
                pipes: true,
                vars: false,
                group: false,
            },
        ),
        (
            "+ 25 variables",
            Shape {
                pipes: true,
                vars: true,
                group: false,
            },
        ),
        (
            "+ a process group of its own (run --exec's shape)",
            Shape {
                pipes: true,
                vars: true,
                group: true,
            },
        ),
    ];
    let mut rounds = vec![Vec::new(); shapes.len()];
    for round in 0..ROUNDS {
        // Each round in another order, so a drift of the machine is shared.
        for k in (0..shapes.len()).map(|k| (k + round) % shapes.len()) {
            rounds[k].push(rate(&program, shapes[k].1, n).await);
        }
    }
    let median = |r: &[f64]| {
        let mut r = r.to_vec();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    let bare = median(&rounds[0]);
    println!("{program}, {n} spawns per round, {CONCURRENCY} at once, {ROUNDS} rounds");
    println!("| shape | spawns/s (median) | of bare | rounds |");
    println!("| --- | ---: | ---: | --- |");
    for (k, (name, _)) in shapes.iter().enumerate() {
        let m = median(&rounds[k]);
        let all: Vec<String> = rounds[k].iter().map(|r| format!("{r:.0}")).collect();
        println!("| {name} | {m:.0} | {:.2} | {} |", m / bare, all.join(", "));
    }
}
