//! The command as a child process against the mock broker and the XZepr
//! stand-in started in the test's process: [`Stack`] starts them, [`Running`]
//! holds the child and what it printed on stderr.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use serde_json::Value;
use xzepr_consumer::devstack::StandIn;
use xzepr_consumer::generate::xzepr_event;

use crate::kafka_support::{self, produce_keyed};

pub const BIN: &str = env!("CARGO_BIN_EXE_xzepr-consumer");
pub const TOKEN: &str = "tok-77a1c0e5d2";
pub const SASL_PASSWORD: &str = "sasl-1b9e4c7f30";
/// A password in `XZEPR_API_URL`'s userinfo.
pub const URL_PASSWORD: &str = "url-pw-5e0d2a91c4";
pub const OTHER: &str = "01SOMEBODYELSE000000000000";
pub const DEADLINE: Duration = Duration::from_secs(120);

pub struct Stack {
    pub _cluster: MockCluster<'static, DefaultProducerContext>,
    pub brokers: String,
    pub topic: String,
    pub partitions: i32,
    pub rt: tokio::runtime::Runtime,
    pub standin: StandIn,
}

impl Stack {
    pub fn start(topic: &str, partitions: i32) -> Stack {
        let cluster = kafka_support::cluster(topic, partitions);
        let brokers = cluster.bootstrap_servers();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let standin = rt
            .block_on(
                StandIn::builder(TOKEN)
                    .latency(Duration::from_millis(1))
                    .start(),
            )
            .unwrap();
        Stack {
            _cluster: cluster,
            brokers,
            topic: topic.to_owned(),
            partitions,
            rt,
            standin,
        }
    }

    /// Produces events `0..n`; their ids.
    pub fn produce(&self, n: u64) -> Vec<String> {
        produce_keyed(
            &self.brokers,
            &self.topic,
            self.partitions,
            n,
            |i| xzepr_event(i, OTHER).0,
            |i| xzepr_event(i, OTHER).1,
        );
        (0..n).map(|i| xzepr_event(i, OTHER).0).collect()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("XZEPR_KAFKA_BROKERS", &self.brokers)
            .env("XZEPR_KAFKA_TOPIC", &self.topic)
            .env("XZEPR_API_URL", self.standin.url())
            .env("XZEPR_API_TOKEN", TOKEN)
            .env("XZEPR_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        cmd
    }

    pub fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> Running {
        let mut cmd = self.command(args);
        cmd.envs(env.iter().copied());
        Running::spawn(cmd)
    }

    /// Terminal posts recorded by the stand-in: work id → (status, details).
    pub fn terminal_posts(&self) -> HashMap<String, (String, Value)> {
        let mut by_work = HashMap::new();
        for e in self.standin.recorded_events() {
            let p = &e["payload"];
            if let (Some(work), Some(status)) = (p["work_id"].as_str(), p["status"].as_str()) {
                if status != "started" {
                    by_work.insert(work.to_owned(), (status.to_owned(), p["details"].clone()));
                }
            }
        }
        by_work
    }

    /// Waits until every one of `ids` has a terminal post.
    pub fn wait_reported(
        &self,
        ids: &[String],
        cli: &mut Running,
    ) -> HashMap<String, (String, Value)> {
        let t = Instant::now();
        loop {
            let posts = self.terminal_posts();
            if ids
                .iter()
                .all(|id| posts.contains_key(&format!("work-{id}")))
            {
                return posts;
            }
            cli.assert_running();
            assert!(
                t.elapsed() < DEADLINE,
                "not every event was reported: {posts:?}; stderr:\n{}",
                cli.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub struct Running {
    pub child: Child,
    pub stderr: Arc<Mutex<String>>,
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Running {
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

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(100));
            panic!("exited early ({status}):\n{}", self.stderr());
        }
    }

    pub fn wait(&mut self) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(t.elapsed() < DEADLINE, "did not exit:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then: exited 0.
    pub fn stop_cleanly(&mut self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
        let status = self.wait();
        assert!(status.success(), "{status}; stderr:\n{}", self.stderr());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address `run` logged for its metrics endpoint.
pub fn metrics_addr(stderr: &str) -> String {
    let line = stderr
        .lines()
        .find(|l| l.contains("Serving /metrics"))
        .unwrap_or_else(|| panic!("no metrics address logged:\n{stderr}"));
    let at = line.find("127.0.0.1:").expect("an address");
    let port: String = line[at + "127.0.0.1:".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    format!("127.0.0.1:{port}")
}

/// A plain HTTP/1.1 GET; the whole response as text.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}
