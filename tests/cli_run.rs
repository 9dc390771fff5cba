//! The `run` and `tail` commands end to end: the embedded mock broker and XZepr
//! stand-in run in this process, the command runs as a child process pointed at
//! them through the `XZEPR_*` variables, and its handlers are a shell script or
//! a local HTTP server.
#![cfg(feature = "cli")]

mod cli_support;
mod kafka_support;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use serde_json::Value;
use xzepr_consumer::devstack::{KafkaSink, StandIn};
use xzepr_consumer::generate::xzepr_event;

use cli_support::{http_get, metrics_addr};
use kafka_support::{committed, end_offsets, produce_keyed};

const BIN: &str = env!("CARGO_BIN_EXE_xzepr-consumer");
/// Secrets given to every child: none may show up in its output.
const TOKEN: &str = "tok-3c1f9a0e7b";
const SASL_PASSWORD: &str = "sasl-8d2e6b4f0a";
/// The receiver the produced events claim to come from (not ours).
const OTHER: &str = "01SOMEBODYELSE000000000000";
const DEADLINE: Duration = Duration::from_secs(180);

/// The mock broker with one topic, and the XZepr stand-in (publishing what it
/// records back to the topic when `republish`, as XZepr does).
struct Stack {
    _cluster: MockCluster<'static, DefaultProducerContext>,
    brokers: String,
    topic: String,
    partitions: i32,
    rt: tokio::runtime::Runtime,
    standin: StandIn,
}

impl Stack {
    fn start(topic: &str, partitions: i32, republish: bool) -> Stack {
        let cluster = kafka_support::cluster(topic, partitions);
        let brokers = cluster.bootstrap_servers();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut builder = StandIn::builder(TOKEN).latency(Duration::from_millis(1));
        if republish {
            builder = builder.sink(Arc::new(KafkaSink::new(&brokers, topic).unwrap()));
        }
        let standin = rt.block_on(builder.start()).unwrap();
        Stack {
            _cluster: cluster,
            brokers,
            topic: topic.to_owned(),
            partitions,
            rt,
            standin,
        }
    }

    /// Produces events `0..n`, event `i` to partition `i % partitions`; their ids.
    fn produce(&self, n: u64) -> Vec<String> {
        let ids: Vec<String> = (0..n).map(|i| xzepr_event(i, OTHER).0).collect();
        produce_keyed(
            &self.brokers,
            &self.topic,
            self.partitions,
            n,
            |i| xzepr_event(i, OTHER).0,
            |i| xzepr_event(i, OTHER).1,
        );
        ids
    }

    /// The command with the stack's environment (and the secrets).
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("XZEPR_KAFKA_BROKERS", &self.brokers)
            .env("XZEPR_KAFKA_TOPIC", &self.topic)
            .env("XZEPR_API_URL", self.standin.url())
            .env("XZEPR_API_TOKEN", TOKEN)
            .env("XZEPR_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null());
        cmd
    }

    fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> Running {
        let mut cmd = self.command(args);
        cmd.envs(env.iter().copied());
        Running::spawn(cmd)
    }

    /// Lifecycle posts recorded by the stand-in: work id → (status, details).
    fn posts(&self) -> HashMap<String, Vec<(String, Value)>> {
        let mut by_work: HashMap<String, Vec<(String, Value)>> = HashMap::new();
        for e in self.standin.recorded_events() {
            let p = &e["payload"];
            if let (Some(work), Some(status)) = (p["work_id"].as_str(), p["status"].as_str()) {
                by_work
                    .entry(work.to_owned())
                    .or_default()
                    .push((status.to_owned(), p["details"].clone()));
            }
        }
        by_work
    }

    /// Waits until every one of `ids` has a `started` and a terminal post.
    fn wait_reported(
        &self,
        ids: &[String],
        cli: &mut Running,
    ) -> HashMap<String, Vec<(String, Value)>> {
        let t = Instant::now();
        loop {
            let posts = self.posts();
            let done = ids.iter().all(|id| {
                posts.get(&format!("work-{id}")).is_some_and(|p| {
                    p.iter().any(|(s, _)| s == "started")
                        && p.iter().any(|(s, _)| s == "completed" || s == "failed")
                })
            });
            if done {
                return posts;
            }
            cli.assert_running();
            assert!(
                t.elapsed() < DEADLINE,
                "not every event was reported; stderr:\n{}",
                cli.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn committed(&self, group: &str) -> HashMap<i32, i64> {
        committed(&self.brokers, group, &self.topic, self.partitions)
    }

    fn ends(&self) -> HashMap<i32, i64> {
        end_offsets(&self.brokers, &self.topic, self.partitions)
    }

    /// Waits until `group` has committed every partition's end offset.
    fn wait_committed_to_end(&self, group: &str, cli: &mut Running) {
        let t = Instant::now();
        while self.committed(group) != self.ends() {
            cli.assert_running();
            assert!(
                t.elapsed() < DEADLINE,
                "committed {:?}, ends {:?}; stderr:\n{}",
                self.committed(group),
                self.ends(),
                cli.stderr()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The command running as a child; its stderr collected by a thread.
struct Running {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Running { child, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Fails the test at once when the command exited early.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(100));
            panic!("exited early ({status}):\n{}", self.stderr());
        }
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    fn wait_for_log(&self, needle: &str) {
        let t = Instant::now();
        while !self.stderr().contains(needle) {
            assert!(
                t.elapsed() < DEADLINE,
                "no {needle:?} in:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait(&mut self) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            assert!(t.elapsed() < DEADLINE, "did not exit:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then: exited 0, and no secret in what it wrote.
    fn stop_cleanly(&mut self) {
        self.sigterm();
        let status = self.wait();
        let stderr = self.stderr();
        assert!(status.success(), "{status}; stderr:\n{stderr}");
        assert_no_secrets(&stderr);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_no_secrets(output: &str) {
    assert!(!output.contains(TOKEN), "the token leaked:\n{output}");
    assert!(
        !output.contains(SASL_PASSWORD),
        "the SASL password leaked:\n{output}"
    );
}

fn script(dir: &Path, body: &str) -> String {
    let path = dir.join("handler.sh");
    std::fs::write(&path, body).unwrap();
    path.to_string_lossy().into_owned()
}

fn is_scan(id_index: u64) -> bool {
    // `xzepr_event`'s sixth kind is `scan.finished`.
    id_index % 6 == 5
}

#[test]
fn run_exec_reports_every_event_and_a_failing_program_as_failed() {
    const N: u64 = 60;
    let stack = Stack::start("cli.exec", 3, true);
    let ids = stack.produce(N);
    let dir = tempfile::tempdir().unwrap();
    // Checks its stdin is the event, reports where the event came from and
    // whether any secret reached it; fails on `scan.finished`.
    let handler = script(
        dir.path(),
        r#"input=$(cat)
case "$input" in *"\"id\":\"$XZEPR_EVENT_ID\""*) stdin=yes ;; *) stdin=no ;; esac
if [ "$XZEPR_EVENT_TYPE" = scan.finished ]; then
  echo "noise that scrolls away" >&2
  echo "scan found $XZEPR_EVENT_ID" >&2
  exit 3
fi
printf '{"event":"%s","type":"%s","partition":%s,"offset":%s,"topic":"%s","work":"%s","stdin":"%s","secrets":"%s%s"}\n' \
  "$XZEPR_EVENT_ID" "$XZEPR_EVENT_TYPE" "$KAFKA_PARTITION" "$KAFKA_OFFSET" "$KAFKA_TOPIC" \
  "$XZEPR_WORK_ID" "$stdin" "$XZEPR_API_TOKEN" "$XZEPR_KAFKA_SASL_PASSWORD"
"#,
    );
    let mut cli = stack.spawn(
        &[
            "run",
            "--service-name",
            "cli-exec",
            "--concurrency",
            "4",
            "--ordering",
            "key",
            "--dead-letter-topic",
            "cli.exec.failed",
            "--exec",
            "sh",
            &handler,
        ],
        &[],
    );
    let posts = stack.wait_reported(&ids, &mut cli);

    // Only the produced events were handled: XZepr's republished posts and the
    // receiver's creation are this service's own, and skipped.
    let wanted: HashSet<String> = ids.iter().map(|id| format!("work-{id}")).collect();
    let handled: HashSet<String> = posts.keys().cloned().collect();
    assert_eq!(handled, wanted);
    for (i, id) in ids.iter().enumerate() {
        let i = i as u64;
        let p = &posts[&format!("work-{id}")];
        let completed: Vec<&Value> = p
            .iter()
            .filter(|(s, _)| s == "completed")
            .map(|(_, d)| d)
            .collect();
        let failed: Vec<&Value> = p
            .iter()
            .filter(|(s, _)| s == "failed")
            .map(|(_, d)| d)
            .collect();
        if is_scan(i) {
            assert!(completed.is_empty(), "{id}: {p:?}");
            let d = failed[0];
            assert_eq!(d["error_code"], "exit_status", "{d}");
            let error = d["error"].as_str().unwrap();
            assert!(error.contains("status 3"), "{error}");
            assert!(error.ends_with(&format!("scan found {id}")), "{error}");
            // Dead-lettered before it was reported, and the post says where.
            assert_eq!(d["dead_letter"]["topic"], "cli.exec.failed", "{d}");
        } else {
            assert!(failed.is_empty(), "{id}: {p:?}");
            let d = completed[0];
            assert_eq!(d["event"], id.as_str(), "stdout became the details: {d}");
            assert_eq!(d["stdin"], "yes", "the event JSON came on stdin");
            assert_eq!(d["secrets"], "", "no secret reaches the program");
            assert_eq!(d["work"], format!("work-{id}"));
            assert_eq!(d["topic"], "cli.exec");
            assert_eq!(d["partition"], (i % 3) as i64);
            assert!(d["offset"].as_i64().unwrap() >= 0);
        }
    }
    // Everything finished, the republished posts included, is committed.
    stack.wait_committed_to_end("xzepr-consumer-cli-exec", &mut cli);
    cli.stop_cleanly();
    assert_eq!(stack.committed("xzepr-consumer-cli-exec"), stack.ends());
}

/// A local endpoint: records every request; answers 422 to `scan.finished`,
/// 503 to the first post of `flaky_id`, 200 otherwise.
struct Endpoint {
    url: String,
    seen: Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>>,
}

fn endpoint(rt: &tokio::runtime::Runtime, flaky_id: Option<String>) -> Endpoint {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let seen: Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>> = Arc::default();
    let recorded = Arc::clone(&seen);
    rt.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (seen, flaky) = (Arc::clone(&recorded), flaky_id.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (seen, flaky) = (Arc::clone(&seen), flaky.clone());
                    async move {
                        let headers = req.headers().clone();
                        let body = req.into_body().collect().await?.to_bytes();
                        let ty = headers
                            .get("ce-type")
                            .map(|v| v.to_str().unwrap_or_default().to_owned())
                            .or_else(|| {
                                let v: Value = serde_json::from_slice(&body).ok()?;
                                v["type"].as_str().map(str::to_owned)
                            })
                            .unwrap_or_default();
                        let id = headers.get("ce-id").map(|v| v.to_str().unwrap().to_owned());
                        let first = {
                            let mut seen = seen.lock().unwrap();
                            let first = !seen
                                .iter()
                                .any(|(h, _)| h.get("ce-id") == headers.get("ce-id"));
                            seen.push((headers, body));
                            first
                        };
                        let status = if ty == "scan.finished" {
                            422
                        } else if first && id.is_some() && id == flaky {
                            503
                        } else {
                            200
                        };
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"no scans here")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Endpoint { url, seen }
}

#[test]
fn run_forward_posts_binary_cloudevents_and_a_failing_endpoint_gives_failed() {
    const N: u64 = 48;
    let stack = Stack::start("cli.forward", 2, true);
    let ids = stack.produce(N);
    let flaky = ids[1].clone();
    let server = endpoint(&stack.rt, Some(flaky.clone()));
    let mut cli = stack.spawn(
        &[
            "run",
            "--service-name",
            "cli-forward",
            "--forward",
            &server.url,
        ],
        &[],
    );
    let posts = stack.wait_reported(&ids, &mut cli);
    let wanted: HashSet<String> = ids.iter().map(|id| format!("work-{id}")).collect();
    assert_eq!(posts.keys().cloned().collect::<HashSet<_>>(), wanted);
    for (i, id) in ids.iter().enumerate() {
        let p = &posts[&format!("work-{id}")];
        let terminal: Vec<&(String, Value)> = p.iter().filter(|(s, _)| s != "started").collect();
        if is_scan(i as u64) {
            assert!(terminal.iter().all(|(s, _)| s == "failed"), "{p:?}");
            let d = &terminal[0].1;
            assert_eq!(d["error_code"], "http_status", "{d}");
            let error = d["error"].as_str().unwrap();
            assert!(
                error.contains("422") && error.contains("no scans here"),
                "{error}"
            );
        } else {
            assert!(terminal.iter().all(|(s, _)| s == "completed"), "{p:?}");
            assert_eq!(terminal[0].1["http_status"], 200);
        }
    }
    // Binary content mode: attributes in headers, `data` as the body.
    let seen = server.seen.lock().unwrap().clone();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for (headers, body) in &seen {
        let h = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(h("ce-specversion").as_deref(), Some("1.0"));
        assert_eq!(h("content-type").as_deref(), Some("application/json"));
        assert!(h("ce-source").unwrap().starts_with("xzepr.event.receiver."));
        assert!(h("ce-type").is_some() && h("ce-platformid").is_some());
        assert_eq!(h("kafka-topic").as_deref(), Some("cli.forward"));
        let id = h("ce-id").unwrap();
        let data: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(data["events"][0]["id"], id.as_str(), "the body is the data");
        assert_eq!(h("xzepr-work-id"), Some(format!("work-{id}")));
        *by_id.entry(id).or_default() += 1;
    }
    assert_eq!(
        by_id.keys().cloned().collect::<HashSet<_>>(),
        ids.iter().cloned().collect(),
        "every event, and nothing else, was forwarded"
    );
    assert_eq!(by_id[&flaky], 2, "the 503 was retried once");
    let flaky_done = posts[&format!("work-{flaky}")]
        .iter()
        .find(|(s, _)| s == "completed")
        .map(|(_, d)| d.clone())
        .expect("the retried event completed");
    assert_eq!(flaky_done["attempts"], 2, "{flaky_done}");
    for (i, id) in ids.iter().enumerate() {
        if is_scan(i as u64) {
            assert_eq!(by_id[id], 1, "a 422 is permanent: not retried");
        }
    }
    stack.wait_committed_to_end("xzepr-consumer-cli-forward", &mut cli);
    cli.stop_cleanly();
    assert_eq!(stack.committed("xzepr-consumer-cli-forward"), stack.ends());
}

#[test]
fn run_forward_structured_sends_the_whole_event() {
    const N: u64 = 12;
    let stack = Stack::start("cli.structured", 2, false);
    let ids = stack.produce(N);
    let server = endpoint(&stack.rt, None);
    let mut cli = stack.spawn(
        &[
            "run",
            "--service-name",
            "cli-structured",
            "--type",
            "deployment.",
            "--forward",
            &server.url,
            "--structured",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    // Events 0 and 1 of every six are deployment.started / .completed.
    let wanted: Vec<String> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 6 < 2)
        .map(|(_, id)| id.clone())
        .collect();
    stack.wait_reported(&wanted, &mut cli);
    stack.wait_committed_to_end("xzepr-consumer-cli-structured", &mut cli);
    // --metrics-addr reaches the pipeline: its endpoint serves the counters.
    let metrics = http_get(&metrics_addr(&cli.stderr()), "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("xzepr_consumer_"), "{metrics}");
    cli.stop_cleanly();
    let seen = server.seen.lock().unwrap().clone();
    let mut got = HashSet::new();
    for (headers, body) in &seen {
        assert_eq!(
            headers.get("content-type").unwrap(),
            "application/cloudevents+json; charset=utf-8"
        );
        assert!(headers.get("ce-id").is_none(), "no ce-* headers");
        let event: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(event["specversion"], "1.0");
        assert!(event["type"].as_str().unwrap().starts_with("deployment."));
        assert_eq!(event["data"]["events"][0]["id"], event["id"]);
        assert!(event["success"].is_boolean());
        got.insert(event["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(got, wanted.into_iter().collect(), "only the wanted types");
}

#[test]
fn sigterm_mid_stream_drains_the_work_in_flight_and_a_restart_loses_nothing() {
    const N: u64 = 40;
    const GROUP: &str = "xzepr-consumer-cli-drain";
    let stack = Stack::start("cli.drain", 2, false);
    let ids = stack.produce(N);
    let dir = tempfile::tempdir().unwrap();
    let gates = dir.path().to_string_lossy().into_owned();
    // From offset 3 on, unless OPEN is set, an event waits for its own gate
    // file, after saying it is in flight.
    let handler = script(
        dir.path(),
        r#"cat > /dev/null
if [ -z "$OPEN" ] && [ "$KAFKA_OFFSET" -ge 3 ]; then
  touch "$GATES/reached-$KAFKA_PARTITION-$KAFKA_OFFSET"
  while [ ! -e "$GATES/go-$KAFKA_PARTITION-$KAFKA_OFFSET" ]; do sleep 0.05; done
fi
printf '{"partition":%s,"offset":%s}\n' "$KAFKA_PARTITION" "$KAFKA_OFFSET"
"#,
    );
    let args = [
        "run",
        "--service-name",
        "cli-drain",
        "--ordering",
        "none",
        "--concurrency",
        "2",
        "--drain-timeout",
        "20s",
        "--exec",
        "sh",
        &handler,
    ];
    let mut first = stack.spawn(&args, &[("GATES", &gates)]);
    // Both slots held by events waiting at their gates.
    let reached = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                name.strip_prefix("reached-").map(str::to_owned)
            })
            .collect()
    };
    let t = Instant::now();
    while reached(dir.path()).len() < 2 {
        first.assert_running();
        assert!(t.elapsed() < DEADLINE, "{}", first.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let in_flight = reached(dir.path());
    first.sigterm();
    first.wait_for_log("Stopping");
    // Not a timing assertion: gives the stop a moment to reach the poll thread
    // before slots free up, so no new event starts (one that did would wait
    // out the drain timeout and be replayed: slower, still correct).
    std::thread::sleep(Duration::from_millis(500));
    for at in &in_flight {
        std::fs::write(dir.path().join(format!("go-{at}")), b"").unwrap();
    }
    let status = first.wait();
    assert!(status.success(), "{status}: {}", first.stderr());
    assert_no_secrets(&first.stderr());

    // The events in flight at the signal finished and were reported.
    let completed_at = |posts: &HashMap<String, Vec<(String, Value)>>| -> Vec<(i64, i64)> {
        posts
            .values()
            .flatten()
            .filter(|(s, _)| s == "completed")
            .map(|(_, d)| {
                (
                    d["partition"].as_i64().unwrap(),
                    d["offset"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    let done_first: HashSet<(i64, i64)> = completed_at(&stack.posts()).into_iter().collect();
    for at in &in_flight {
        let (p, o) = at.split_once('-').unwrap();
        let at = (p.parse().unwrap(), o.parse().unwrap());
        assert!(
            done_first.contains(&at),
            "{at:?} was drained: {done_first:?}"
        );
    }
    // Committed: exactly a prefix of finished work per partition, and short of
    // the end (the events behind the gates never ran).
    let committed = stack.committed(GROUP);
    let ends = stack.ends();
    for (p, c) in &committed {
        for o in 0..*c {
            assert!(
                done_first.contains(&(i64::from(*p), o)),
                "offset {o} of partition {p} committed unfinished"
            );
        }
    }
    let (sum_c, sum_e): (i64, i64) = (
        committed.values().map(|c| (*c).max(0)).sum(),
        ends.values().sum(),
    );
    assert!(
        sum_c < sum_e,
        "stopped mid-stream: {committed:?} of {ends:?}"
    );

    // A restart finishes the rest; nothing lost, the drained ones not rerun.
    let mut second = stack.spawn(&args, &[("GATES", &gates), ("OPEN", "1")]);
    let posts = stack.wait_reported(&ids, &mut second);
    stack.wait_committed_to_end(GROUP, &mut second);
    second.stop_cleanly();
    assert_eq!(stack.committed(GROUP), stack.ends());
    let all = completed_at(&posts);
    let unique: HashSet<(i64, i64)> = all.iter().copied().collect();
    assert_eq!(unique.len() as u64, N, "every event completed");
    for at in &in_flight {
        let (p, o) = at.split_once('-').unwrap();
        let at: (i64, i64) = (p.parse().unwrap(), o.parse().unwrap());
        assert_eq!(
            all.iter().filter(|x| **x == at).count(),
            1,
            "{at:?} drained and committed, so not run again"
        );
    }
}

#[test]
fn tail_prints_exactly_the_produced_events_and_commits_nothing() {
    const N: u64 = 50;
    let stack = Stack::start("cli.tail", 3, false);
    let ids = stack.produce(N);
    // Two malformed messages, at known places.
    produce_keyed(
        &stack.brokers,
        &stack.topic,
        3,
        2,
        |i| format!("bad-{i}"),
        |i| {
            if i == 0 {
                b"not json at all".to_vec()
            } else {
                br#"{"id":"x","specversion":"1.0"}"#.to_vec()
            }
        },
    );
    let tail = |args: &[&str]| -> Vec<Value> {
        let out = stack
            .command(&[&["tail", "--from-beginning"], args].concat())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert_no_secrets(&stderr);
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let lines = tail(&["--to-end"]);
    assert_eq!(lines.len() as u64, N + 2);
    let printed: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["event"]["id"].as_str())
        .collect();
    assert_eq!(printed.len() as u64, N);
    assert_eq!(
        printed
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<HashSet<_>>(),
        ids.iter().cloned().collect::<HashSet<_>>()
    );
    for l in &lines {
        if let Some(id) = l["event"]["id"].as_str() {
            assert_eq!(l["key"], id);
            assert_eq!(l["topic"], "cli.tail");
            // The payload as produced, member for member.
            let i = ids.iter().position(|x| x == id).unwrap() as u64;
            let produced: Value = serde_json::from_slice(&xzepr_event(i, OTHER).1).unwrap();
            assert_eq!(l["event"], produced);
            assert_eq!(l["partition"], (i % 3) as i64);
        }
    }
    let malformed: Vec<&Value> = lines.iter().filter(|l| l.get("error").is_some()).collect();
    assert_eq!(malformed.len(), 2, "malformed messages are shown");
    for m in &malformed {
        assert!(!m["error"].as_str().unwrap().is_empty());
        assert!(m["key"].as_str().unwrap().starts_with("bad-"));
    }

    // Filters: one partition, one type prefix, a count.
    // Partition 1 holds events 1, 4, 7, ...; every sixth from 4 is release.published.
    let releases: Vec<&String> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 == 1 && i % 6 == 4)
        .map(|(_, id)| id)
        .collect();
    assert!(releases.len() > 3);
    let lines = tail(&["--partition", "1", "--type", "release.", "--count", "3"]);
    assert_eq!(lines.len(), 3);
    for l in &lines {
        assert_eq!(l["partition"], 1);
        assert!(releases.iter().any(|id| l["event"]["id"] == id.as_str()));
    }

    // No group was joined, nothing committed.
    assert!(stack
        .committed("xzepr-consumer-tail")
        .values()
        .all(|o| *o < 0));
}

#[test]
fn secrets_stay_out_of_help_and_errors() {
    let stack = Stack::start("cli.secrets", 1, false);
    for args in [&["run", "--help"][..], &["tail", "--help"], &["--help"]] {
        let out = stack.command(args).output().unwrap();
        assert!(out.status.success());
        assert_no_secrets(&String::from_utf8_lossy(&out.stdout));
    }
    // A SASL setting without a user name: refused, naming the variable.
    let out = stack
        .command(&["run", "--service-name", "s", "--exec", "true"])
        .env("XZEPR_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("XZEPR_KAFKA_SASL_USERNAME"), "{stderr}");
    assert_no_secrets(&stderr);
    // XZepr unreachable, at a URL with credentials in it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = stack
        .command(&[
            "run",
            "--service-name",
            "s",
            "--api-url",
            &format!("http://carol:url-secret-55@127.0.0.1:{port}"),
            "--exec",
            "true",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("finding or creating receiver"), "{stderr}");
    assert!(!stderr.contains("url-secret-55"), "{stderr}");
    assert_no_secrets(&stderr);
}
