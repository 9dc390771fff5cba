//! A throwaway PostgreSQL server for the idempotency tests and bench.
//!
//! Finds Debian's server binaries (`/usr/lib/postgresql/<version>/bin`, newest
//! version first, or `$PG_BIN_DIR`), runs `initdb` into a temporary directory, starts
//! the server with `pg_ctl` on a free port of 127.0.0.1 (its socket in the same
//! directory), and stops it with `pg_ctl stop -m immediate` on drop; the directory goes
//! with it. PostgreSQL refuses to run as root, so as root both run as the `postgres`
//! system user (created by Debian's package) through `runuser`, and the directory is
//! handed to that user.
//!
//! Without the binaries, [`PgServer::start`] prints `SKIPPED: <reason>` and returns
//! `None`; with `CI` set it panics instead (`.ci/deps` installs them, so CI must run
//! these tests).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sqlx::postgres::{PgPool, PgPoolOptions};

/// A running server; stopped on drop.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    run_as: Option<String>,
    port: u16,
}

/// Server settings for the tests: durability off (tests never crash the machine).
pub const FAST: &[&str] = &[
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
];
/// The server's defaults: durable commits, as in production (the bench uses these).
pub const DURABLE: &[&str] = &[];

impl PgServer {
    /// Starts a fresh server with `settings` (`name=value`), or explains why it cannot.
    pub fn start(test: &str, settings: &[&str]) -> Option<PgServer> {
        match Self::try_start(settings) {
            Ok(server) => Some(server),
            Err(reason) => {
                if std::env::var_os("CI").is_some() {
                    panic!("{test}: PostgreSQL is required in CI: {reason}");
                }
                println!("SKIPPED: {test}: {reason}");
                None
            }
        }
    }

    fn try_start(settings: &[&str]) -> Result<PgServer, String> {
        let bin = find_bin_dir().ok_or_else(|| {
            "PostgreSQL server binaries (initdb, pg_ctl) not found in $PG_BIN_DIR or \
             /usr/lib/postgresql/*/bin: run `bash .ci/deps` to install Debian's postgresql"
                .to_owned()
        })?;
        let run_as = if is_root() {
            // PostgreSQL will not run as root.
            if !user_exists("postgres") {
                return Err("running as root and no `postgres` user to run the server as".into());
            }
            Some("postgres".to_owned())
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("xzepr-pg-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        if let Some(user) = &run_as {
            check(
                Command::new("chown")
                    .arg(format!("{user}:"))
                    .arg(dir.path())
                    .output(),
                "chown",
            )?;
        }
        let data = dir.path().join("data");
        let mut initdb = command(&run_as, &bin.join("initdb"), dir.path());
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync");
        check(initdb.output(), "initdb")?;

        // A free port can be taken by someone else before the server binds it: retry.
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port().map_err(|e| format!("free port: {e}"))?;
            let mut opts = format!(
                "-p {port} -c listen_addresses=127.0.0.1 -k {} -c max_connections=200",
                dir.path().display()
            );
            for s in settings {
                opts.push_str(" -c ");
                opts.push_str(s);
            }
            let mut pg_ctl = command(&run_as, &bin.join("pg_ctl"), dir.path());
            pg_ctl
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.path().join("server.log"))
                .args(["-o", &opts, "-w", "-t", "60", "start"]);
            match check(pg_ctl.output(), "pg_ctl start") {
                Ok(()) => {
                    return Ok(PgServer {
                        dir,
                        bin,
                        run_as,
                        port,
                    })
                }
                Err(e) => {
                    let log =
                        std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
                    last = format!("{e}\n{log}");
                }
            }
        }
        Err(last)
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A pool on a fresh database with the guard's table migrated.
    pub async fn pool(&self, max_connections: u32) -> PgPool {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.url("postgres"))
            .await
            .expect("connect to the test server");
        sqlx::query("CREATE DATABASE test")
            .execute(&admin)
            .await
            .expect("create database");
        admin.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(&self.url("test"))
            .await
            .expect("connect to the test database");
        xzepr_consumer::idempotency::IdempotencyGuard::migrate(&pool)
            .await
            .expect("migrate");
        pool
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let mut stop = command(&self.run_as, &self.bin.join("pg_ctl"), self.dir.path());
        stop.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"]);
        if let Err(e) = check(stop.output(), "pg_ctl stop") {
            eprintln!("{e}");
        }
    }
}

/// `program`, as `run_as` if set, in `cwd` (the server's user may not be able to
/// enter the test's working directory, and the tools resolve it).
fn command(run_as: &Option<String>, program: &Path, cwd: &Path) -> Command {
    let mut c = match run_as {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    };
    c.current_dir(cwd);
    c
}

fn check(output: std::io::Result<Output>, what: &str) -> Result<(), String> {
    let output = output.map_err(|e| format!("{what}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

fn find_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR").map(PathBuf::from) {
        return dir.join("initdb").is_file().then_some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn user_exists(user: &str) -> bool {
    Command::new("id")
        .arg(user)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
