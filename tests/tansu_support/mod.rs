//! A Tansu broker for the real-broker tests: found through `TANSU_BIN`,
//! `~/.cargo/bin/tansu` or `PATH` (`.ci/test` installs it), started on
//! 127.0.0.1 with SQLite storage, killed on drop.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn tansu_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TANSU_BIN").map(PathBuf::from) {
        return p.exists().then_some(p);
    }
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin/tansu"));
    if let Some(p) = home.filter(|p| p.exists()) {
        return Some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("tansu"))
            .find(|p| p.exists())
    })
}

/// The broker binary, or return from the test saying why; with `CI` set, fail
/// instead (`.ci/test` installs the broker, so CI must run these tests).
macro_rules! require_tansu {
    () => {
        match crate::tansu_support::tansu_binary() {
            Some(bin) => bin,
            None => {
                let reason = "the Tansu broker is not installed (set TANSU_BIN or run .ci/test, \
                              which installs it)";
                if std::env::var_os("CI").is_some() {
                    panic!("Tansu is required in CI: {reason}");
                }
                eprintln!("SKIPPED: {reason}");
                return;
            }
        }
    };
}

/// A Tansu broker on 127.0.0.1, killed on drop.
pub struct Broker {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    pub fn start(bin: PathBuf) -> Broker {
        let mut b = Broker {
            bin,
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            child: None,
        };
        b.spawn(false);
        b
    }

    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn spawn(&mut self, authentication: bool) {
        let url = self.url();
        let mut cmd = Command::new(&self.bin);
        cmd.current_dir(self.dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            // A relative SQLite path: absolute ones are mangled by the broker.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if authentication {
            cmd.arg("--authentication");
        }
        self.child = Some(cmd.spawn().expect("start tansu"));
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "tansu did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn restart(&mut self, authentication: bool) {
        self.stop();
        self.spawn(authentication);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let url = self.url();
        let partitions = partitions.to_string();
        self.tansu(&[
            "topic",
            "create",
            "--broker",
            &url,
            "--partitions",
            &partitions,
            name,
        ]);
    }

    pub fn tansu(&self, args: &[&str]) {
        let status = Command::new(&self.bin)
            .current_dir(self.dir.path())
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("run tansu");
        assert!(status.success(), "tansu {args:?} failed");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
