//! A throwaway PostgreSQL server, for the idempotency tests and `bench --postgres
//! local` (features `dev-stack` and `postgres`).
//!
//! Finds the server binaries (`$PG_BIN_DIR`, or Debian's
//! `/usr/lib/postgresql/<version>/bin`, newest first), runs `initdb` into a fresh
//! directory under the system's temporary directory, starts the server with
//! `pg_ctl` on a free port of 127.0.0.1 (its socket in that directory), and on drop
//! stops it with `pg_ctl stop -m immediate` and removes the directory.
//! PostgreSQL refuses to run as root, so as root both run as the `postgres`
//! system user (created by Debian's package) through `runuser`, and the directory
//! is handed to that user. Trust authentication: nothing but this machine can
//! reach it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Server settings with durability off (`fsync`, `synchronous_commit`,
/// `full_page_writes`): for tests, which never crash the machine.
pub const FAST: &[&str] = &[
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
];
/// The server's own defaults: durable commits, as in production.
pub const DURABLE: &[&str] = &[];

/// Times a server is tried on a fresh free port (another process may take the
/// port between our probe and the server's bind).
const PORT_TRIES: usize = 5;

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No `initdb` and `pg_ctl` in `$PG_BIN_DIR` or `/usr/lib/postgresql/*/bin`.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in $PG_BIN_DIR or \
         /usr/lib/postgresql/*/bin: install Debian's postgresql (`bash .ci/deps`)"
    )]
    NotInstalled,
    /// Running as root, with no `postgres` user to run the server as.
    #[error("running as root and no `postgres` user to run the server as")]
    NoServerUser,
    /// A step could not be run at all (directory, port, process).
    #[error("{what}")]
    Io {
        /// The step.
        what: &'static str,
        /// Why it could not run.
        #[source]
        source: std::io::Error,
    },
    /// A step ran and failed: its exit status and output (for `pg_ctl start`,
    /// with the server's log).
    #[error("{what} failed ({status}): {output}")]
    Failed {
        /// The step.
        what: &'static str,
        /// How it exited.
        status: std::process::ExitStatus,
        /// What it printed.
        output: String,
    },
}

/// A running server; stopped, and its directory removed, on drop.
#[derive(Debug)]
pub struct LocalPostgres {
    dir: PathBuf,
    bin: PathBuf,
    run_as: Option<String>,
    port: u16,
}

impl LocalPostgres {
    /// Starts a fresh server with `settings` (each `name=value`, passed as `-c`).
    pub fn start(settings: &[&str]) -> Result<LocalPostgres, Error> {
        let bin = find_bin_dir().ok_or(Error::NotInstalled)?;
        let run_as = if is_root() {
            if !user_exists("postgres") {
                return Err(Error::NoServerUser);
            }
            Some("postgres".to_owned())
        } else {
            None
        };
        let dir = fresh_dir().map_err(|source| Error::Io {
            what: "creating the server's directory",
            source,
        })?;
        // From here on the directory is removed on every way out.
        let mut server = LocalPostgres {
            dir,
            bin,
            run_as,
            port: 0,
        };
        if let Some(user) = &server.run_as {
            let mut chown = Command::new("chown");
            chown.arg(format!("{user}:")).arg(&server.dir);
            check(chown.output(), "chown")?;
        }
        let mut initdb = server.command("initdb");
        initdb
            .arg("-D")
            .arg(server.data())
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync");
        check(initdb.output(), "initdb")?;

        let mut last = None;
        for _ in 0..PORT_TRIES {
            let port = free_port().map_err(|source| Error::Io {
                what: "finding a free port",
                source,
            })?;
            let mut opts = format!(
                "-p {port} -c listen_addresses=127.0.0.1 -k {} -c max_connections=200",
                server.dir.display()
            );
            for s in settings {
                opts.push_str(" -c ");
                opts.push_str(s);
            }
            let mut pg_ctl = server.command("pg_ctl");
            pg_ctl
                .arg("-D")
                .arg(server.data())
                .arg("-l")
                .arg(server.log())
                .args(["-o", &opts, "-w", "-t", "60", "start"]);
            match check(pg_ctl.output(), "pg_ctl start") {
                Ok(()) => {
                    server.port = port;
                    return Ok(server);
                }
                Err(Error::Failed {
                    what,
                    status,
                    output,
                }) => {
                    let log = std::fs::read_to_string(server.log()).unwrap_or_default();
                    last = Some(Error::Failed {
                        what,
                        status,
                        output: format!("{output}\n{log}"),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("PORT_TRIES > 0"))
    }

    /// The port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` as the `postgres` superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// `tool` of the server's binaries, as the server's user, in its directory
    /// (that user may not be able to enter the caller's working directory, and
    /// the tools resolve it).
    fn command(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        let mut c = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        c.current_dir(&self.dir);
        c
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        if self.port != 0 {
            let mut stop = self.command("pg_ctl");
            stop.arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "stop"]);
            if let Err(e) = check(stop.output(), "pg_ctl stop") {
                tracing::warn!(error = %e, "stopping the local PostgreSQL server");
            }
        }
        // Best effort: a leftover directory under the temporary directory harms
        // nothing.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A new directory `xzepr-pg-<pid>-<n>` under the temporary directory.
fn fresh_dir() -> std::io::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let dir = std::env::temp_dir().join(format!(
            "xzepr-pg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Relaxed)
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            // Left by an earlier process of the same id.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

fn check(output: std::io::Result<Output>, what: &'static str) -> Result<(), Error> {
    let output = output.map_err(|source| Error::Io { what, source })?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::Failed {
        what,
        status: output.status,
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}

fn find_bin_dir() -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("PG_BIN_DIR").map(PathBuf::from) {
        return has_tools(&dir).then_some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_tools(&bin).then_some((version, bin))
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
