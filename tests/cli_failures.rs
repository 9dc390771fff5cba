//! `run --exec` and `run --forward` when the program or the endpoint misbehaves,
//! and `produce`'s ids and settings: the command runs as a child process against
//! the mock broker and the XZepr stand-in started in this process.
#![cfg(all(feature = "cli", target_os = "linux"))]

mod cli_support;
mod kafka_support;

use std::collections::HashSet;
use std::path::Path;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rdkafka::mocking::MockCluster;
use serde_json::Value;

use cli_support::*;

fn script(dir: &Path, body: &str) -> String {
    let path = dir.join("handler.sh");
    std::fs::write(&path, body).unwrap();
    path.to_string_lossy().into_owned()
}

/// Whether `pid` is a live process: it exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The pids written to `*.pid` files in `dir`.
fn pids(dir: &Path) -> Vec<u32> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            (path.extension()? == "pid").then(|| {
                let text = std::fs::read_to_string(&path).unwrap();
                text.trim().parse().unwrap()
            })
        })
        .collect()
}

/// Waits (bounded) until none of `pids` is alive; the live ones otherwise.
fn wait_all_gone(pids: &[u32], within: Duration) -> Vec<u32> {
    let t = Instant::now();
    loop {
        let live: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if live.is_empty() || t.elapsed() > within {
            return live;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_program_leaving_a_background_child_completes_and_the_child_is_killed() {
    const N: u64 = 6;
    let stack = Stack::start("fail.background", 2);
    let ids = stack.produce(N);
    let dir = tempfile::tempdir().unwrap();
    let pid_dir = dir.path().to_string_lossy().into_owned();
    // The background `sleep` inherits stdout and holds it open for 30 s; the
    // program itself is done at once. A timeout well under 30 s: waiting for
    // the pipe's end would time every event out.
    let handler = script(
        dir.path(),
        r#"cat > /dev/null
sleep 30 &
echo $! > "$PID_DIR/bg-$KAFKA_PARTITION-$KAFKA_OFFSET.pid"
echo '{"done":true}'
"#,
    );
    let mut cli = stack.spawn(
        &[
            "run",
            "--service-name",
            "fail-background",
            "--ordering",
            "none",
            "--timeout",
            "10s",
            "--exec",
            "sh",
            &handler,
        ],
        &[("PID_DIR", &pid_dir)],
    );
    let posts = stack.wait_reported(&ids, &mut cli);
    for id in &ids {
        let (status, details) = &posts[&format!("work-{id}")];
        assert_eq!(status, "completed", "{id}: {details}");
        assert_eq!(
            details["done"], true,
            "stdout became the details: {details}"
        );
    }
    // What the program left running went with its group when it exited.
    let left = pids(dir.path());
    assert_eq!(left.len() as u64, N);
    let live = wait_all_gone(&left, Duration::from_secs(10));
    assert!(live.is_empty(), "background children still alive: {live:?}");
    cli.stop_cleanly();
}

#[test]
fn a_timed_out_program_takes_its_children_with_it() {
    const N: u64 = 4;
    let stack = Stack::start("fail.timeout", 2);
    let ids = stack.produce(N);
    let dir = tempfile::tempdir().unwrap();
    let pid_dir = dir.path().to_string_lossy().into_owned();
    // A grandchild with a side effect due after the timeout; it writes its pid.
    let handler = script(
        dir.path(),
        r#"cat > /dev/null
sh -c 'echo $$ > "$PID_DIR/gc-$KAFKA_PARTITION-$KAFKA_OFFSET.pid"; sleep 30; touch "$PID_DIR/effect-$KAFKA_OFFSET"' &
sleep 30
"#,
    );
    let mut cli = stack.spawn(
        &[
            "run",
            "--service-name",
            "fail-timeout",
            "--ordering",
            "none",
            "--timeout",
            "1s",
            "--exec",
            "sh",
            &handler,
        ],
        &[("PID_DIR", &pid_dir)],
    );
    let posts = stack.wait_reported(&ids, &mut cli);
    for id in &ids {
        let (status, details) = &posts[&format!("work-{id}")];
        assert_eq!(status, "failed", "{id}: {details}");
        assert_eq!(details["error_code"], "timeout", "{details}");
    }
    cli.stop_cleanly();
    let grandchildren = pids(dir.path());
    assert_eq!(
        grandchildren.len() as u64,
        N,
        "every grandchild wrote its pid"
    );
    let live: Vec<u32> = grandchildren.into_iter().filter(|p| alive(*p)).collect();
    assert!(
        live.is_empty(),
        "grandchildren alive after run stopped: {live:?}"
    );
}

#[test]
fn a_program_gets_no_credential_in_its_environment() {
    let stack = Stack::start("fail.env", 1);
    stack.produce(1);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("env.txt");
    let handler = script(
        dir.path(),
        r#"cat > /dev/null; env > "$OUT.tmp"; mv "$OUT.tmp" "$OUT""#,
    );
    let url = format!("http://alice:{URL_PASSWORD}@127.0.0.1:9/");
    let mut cli = stack.spawn(
        &[
            "run",
            "--service-name",
            "fail-env",
            "--no-report",
            "--exec",
            "sh",
            &handler,
        ],
        &[
            ("OUT", out.to_str().unwrap()),
            ("XZEPR_API_URL", &url),
            ("XZEPR_KAFKA_SASL_USERNAME", "kafka-user"),
        ],
    );
    let t = Instant::now();
    while !out.exists() {
        cli.assert_running();
        assert!(t.elapsed() < DEADLINE, "{}", cli.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    cli.stop_cleanly();
    let env = std::fs::read_to_string(&out).unwrap();
    for secret in [TOKEN, SASL_PASSWORD, URL_PASSWORD] {
        assert!(
            !env.contains(secret),
            "{secret} reached the program:\n{env}"
        );
    }
    let names: HashSet<&str> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(n, _)| n)
        .collect();
    for name in [
        "XZEPR_API_TOKEN",
        "XZEPR_API_URL",
        "XZEPR_KAFKA_SASL_PASSWORD",
        "XZEPR_KAFKA_SASL_USERNAME",
        "XZEPR_KAFKA_BROKERS",
    ] {
        assert!(!names.contains(name), "{name} passed on:\n{env}");
    }
    assert!(names.contains("XZEPR_EVENT_ID") && names.contains("KAFKA_OFFSET"));
    assert!(
        names.contains("OUT"),
        "the rest of the environment is inherited"
    );
}

/// A body that sends `first`, then `chunk` forever when given, else nothing
/// more, never ending.
struct Endless {
    first: Option<Bytes>,
    chunk: Option<Bytes>,
}

fn endless(first: &'static [u8], chunk: Option<&'static [u8]>) -> Endless {
    Endless {
        first: Some(Bytes::from_static(first)),
        chunk: chunk.map(Bytes::from_static),
    }
}

impl hyper::body::Body for Endless {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match (this.first.take(), &this.chunk) {
            (Some(first), _) => Poll::Ready(Some(Ok(Frame::data(first)))),
            (None, Some(chunk)) => Poll::Ready(Some(Ok(Frame::data(chunk.clone())))),
            // Never woken: the body stays open until the client goes.
            (None, None) => Poll::Pending,
        }
    }
}

#[test]
fn an_endpoint_answering_an_endless_body_does_not_stall_the_event() {
    const N: u64 = 12;
    let stack = Stack::start("fail.forward", 2);
    let ids = stack.produce(N);
    let listener = stack
        .rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    stack.rt.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let ty = req
                        .headers()
                        .get("ce-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    // 422 and 200 bodies that stream forever, and a 200 whose
                    // body stops after its first bytes without ending.
                    let (status, body) = match ty.as_str() {
                        "scan.finished" => (422, endless(b"quota exceeded; ", Some(&[b'x'; 8192]))),
                        "deployment.started" => (200, endless(b"ok", Some(&[b'y'; 8192]))),
                        _ => (200, endless(b"ok", None)),
                    };
                    Ok::<_, hyper::Error>(Response::builder().status(status).body(body).unwrap())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let mut cli = stack.spawn(
        &[
            "run",
            "--service-name",
            "fail-forward",
            "--ordering",
            "none",
            "--retries",
            "0",
            "--timeout",
            "30s",
            "--forward",
            &url,
        ],
        &[],
    );
    let posts = stack.wait_reported(&ids, &mut cli);
    for (i, id) in ids.iter().enumerate() {
        let (status, details) = &posts[&format!("work-{id}")];
        // `xzepr_event`'s sixth kind is `scan.finished`.
        if i % 6 == 5 {
            assert_eq!(status, "failed", "{details}");
            assert_eq!(details["error_code"], "http_status", "{details}");
            let error = details["error"].as_str().unwrap();
            assert!(
                error.contains("422") && error.contains("quota exceeded"),
                "{error}"
            );
            assert!(error.len() < 1024, "only the start of the body: {error}");
        } else {
            assert_eq!(status, "completed", "{details}");
            assert_eq!(details["http_status"], 200, "{details}");
        }
    }
    cli.stop_cleanly();
}

/// The ids of every event in `topic`, read with `tail`.
fn ids_in(brokers: &str, topic: &str) -> Vec<String> {
    let out = Command::new(BIN)
        .args(["tail", "--from-beginning", "--to-end", "--format", "json"])
        .args(["--topic", topic])
        .env("XZEPR_KAFKA_BROKERS", brokers)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["event"]["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// `produce` with the brokers from the environment only.
fn produce(brokers: &str, topic: &str, extra: &[&str]) {
    let out = Command::new(BIN)
        .args(["produce", "--events", "20", "--topic", topic])
        .args(extra)
        .env("XZEPR_KAFKA_BROKERS", brokers)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "produce failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn produce_reads_the_brokers_variable_and_gives_each_run_fresh_ids() {
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    for topic in ["produce.fresh", "produce.seed"] {
        cluster.create_topic(topic, 2, 1).unwrap();
    }

    produce(&brokers, "produce.fresh", &[]);
    let first: HashSet<String> = ids_in(&brokers, "produce.fresh").into_iter().collect();
    assert_eq!(first.len(), 20);
    produce(&brokers, "produce.fresh", &[]);
    let all = ids_in(&brokers, "produce.fresh");
    let second: HashSet<String> = all
        .iter()
        .filter(|id| !first.contains(*id))
        .cloned()
        .collect();
    assert_eq!(all.len(), 40);
    assert_eq!(second.len(), 20, "the second run's ids are all new");

    produce(&brokers, "produce.seed", &["--seed", "42"]);
    let seeded: HashSet<String> = ids_in(&brokers, "produce.seed").into_iter().collect();
    assert_eq!(seeded.len(), 20);
    produce(&brokers, "produce.seed", &["--seed", "42"]);
    let again = ids_in(&brokers, "produce.seed");
    assert_eq!(again.len(), 40);
    assert_eq!(
        again.into_iter().collect::<HashSet<_>>(),
        seeded,
        "the same seed, the same ids"
    );
}
