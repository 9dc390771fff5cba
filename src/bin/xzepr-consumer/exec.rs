//! `run --exec`: each event runs a program, as a child process awaited on the
//! runtime (no thread per event).
//!
//! The child gets the event as one line of JSON on stdin (the owned message the
//! pipeline decodes, [`CloudEventMessage`]) and its main attributes in
//! the variables listed in [`HELP`]. Exit 0 is `completed`, with stdout as the `details` when it is
//! a JSON object; any other exit is `failed` (`error_code` `exit_status`, or
//! `signal`), with the tail of stderr in the error. Past `--timeout` the
//! pipeline drops the handler's future, which kills the child's process group
//! (`SIGKILL`), and the event is `failed` with code `timeout`.
//!
//! The program is done when it exits, not when its pipes close: a process it
//! left in the background may hold them open for as long as it runs. Its
//! process group is killed then (see [`group`]) and the pipes are read for at
//! most [`PIPE_GRACE`] more. A group of its own also keeps a Ctrl-C at the
//! terminal from reaching the programs: it reaches `run` alone, which then
//! drains, and the programs in flight finish their events. A program is
//! created in `run`'s group and moves to its own just before it executes; one
//! caught by the group signal in that instant (killed by SIGINT or SIGTERM
//! while `run` stops) never ran, and is started once more.
//!
//! No `XZEPR_*` variable of `run`'s own environment reaches the child: they
//! hold its credentials (`XZEPR_API_TOKEN`, `XZEPR_KAFKA_SASL_PASSWORD`, and
//! `XZEPR_API_URL` may carry a `user:password@`). The child gets the rest of
//! the environment, and the event's variables, with the Kafka record's key,
//! headers and timestamp escaped as [`kafka`] says. With traces on, the
//! child gets `TRACEPARENT` and `TRACESTATE`: the attempt span's context.

mod group;
mod kafka;

use std::ffi::OsString;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::handler::{AsyncHandler, BoxFuture, HandlerError, WorkInfo};

use crate::run_status;

/// `run --help`'s summary of the child's contract (the variables set in
/// [`Exec::command`]).
pub const HELP: &str = "\
With --exec, each event runs the program with the event as one line of JSON on stdin and:
  XZEPR_EVENT_ID, XZEPR_EVENT_TYPE, XZEPR_EVENT_SOURCE, XZEPR_EVENT_SPECVERSION,
  XZEPR_EVENT_SUCCESS (true/false), XZEPR_EVENT_NAME, XZEPR_EVENT_VERSION,
  XZEPR_EVENT_RELEASE, XZEPR_EVENT_PLATFORM_ID, XZEPR_EVENT_PACKAGE,
  XZEPR_WORK_ID, KAFKA_TOPIC, KAFKA_PARTITION, KAFKA_OFFSET;
the Kafka record: KAFKA_KEY (the key, when UTF-8 text without NUL; else KAFKA_KEY_BASE64),
  KAFKA_TIMESTAMP (ms since the epoch), KAFKA_TIMESTAMP_TYPE (CreateTime or LogAppendTime),
  KAFKA_HEADER_<NAME> per header: NAME is the header's name with ASCII letters upper-cased and
  every other byte but a digit replaced by _ (ce_type and ce-type are both KAFKA_HEADER_CE_TYPE;
  the first header wins), the value as text, or in base64 as KAFKA_HEADER_<NAME>_BASE64 when it
  is not UTF-8 without NUL; KAFKA_HEADERS, every header in order as JSON [[name, value], ...]
  (a value that is not UTF-8 is {\"base64\": ...}); a variable over 32 KiB is left out;
the trace context (built with feature otel, OTEL_* endpoint set): TRACEPARENT and TRACESTATE,
  the W3C context of the handler's attempt span, so the program's spans are its children;
and the rest of run's environment less every XZEPR_* variable (they hold its credentials).
It runs in a process group of its own, killed when it exits or times out. Exit 0 is completed, with
stdout as the details when it is a JSON object; any other exit is failed, with the end
of stderr as the error.";

/// The prefix of `run`'s own variables, none of which is passed on to a child:
/// the credentials are among them, and so may be future ones.
const OWN_VARS: &str = "XZEPR_";

/// Whether `name` is one of the record's variables: one in `run`'s own
/// environment must not pass for the record's (a record without a key has no
/// `KAFKA_KEY`), nor `run`'s own trace context for the event's.
fn record_var(name: &str) -> bool {
    [
        "KAFKA_KEY",
        "KAFKA_HEADER",
        "KAFKA_TIMESTAMP",
        "TRACEPARENT",
        "TRACESTATE",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// After the program exited, how long its pipes may take to reach their end.
/// Its group is killed first, so this bounds only what a process outside the
/// group holds open; what was read by then is used.
const PIPE_GRACE: Duration = Duration::from_millis(250);

/// How long a program killed by SIGINT or SIGTERM waits for `run` to see the
/// same signal, before it counts as a failure of its own: `run`'s listener
/// and the program's reaper are two tasks, in either order, milliseconds
/// apart.
const STOP_SEEN_WITHIN: Duration = Duration::from_secs(1);

/// Most stdout kept for `details` (a larger output is not used as details).
const STDOUT_MAX: usize = 1 << 20;

/// Most of stderr's end kept for the `failed` post's error.
const STDERR_TAIL: usize = 1024;

/// Runs one program per event.
#[derive(Debug, Clone)]
pub struct Exec {
    program: OsString,
    args: Vec<OsString>,
    /// The `XZEPR_*` variables of `run`'s environment, and any named like the
    /// record's, removed from the child's.
    removed: Arc<[OsString]>,
}

impl Exec {
    /// `command[0]` with the rest as its arguments; `None` when `command` is empty.
    pub fn new(command: &[String]) -> Option<Self> {
        let (program, args) = command.split_first()?;
        let removed = std::env::vars_os()
            .map(|(name, _)| name)
            .filter(|name| {
                name.to_str()
                    .is_some_and(|n| n.starts_with(OWN_VARS) || record_var(n))
            })
            .collect();
        Some(Exec {
            program: program.into(),
            args: args.iter().map(OsString::from).collect(),
            removed,
        })
    }

    /// The program, for logs (its arguments may hold anything: not logged).
    pub fn program(&self) -> String {
        self.program.to_string_lossy().into_owned()
    }

    fn command(&self, message: &CloudEventMessage, info: &WorkInfo) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Dropped on timeout or at the drain deadline: the child must go
            // too (its `Group` kills the rest; this covers a drop off the runtime).
            .kill_on_drop(true);
        for var in self.removed.iter() {
            cmd.env_remove(var);
        }
        let success = if message.success { "true" } else { "false" };
        cmd.env("XZEPR_EVENT_ID", &message.id)
            .env("XZEPR_EVENT_TYPE", &message.event_type)
            .env("XZEPR_EVENT_SOURCE", &message.source)
            .env("XZEPR_EVENT_SPECVERSION", &message.specversion)
            .env("XZEPR_EVENT_SUCCESS", success)
            .env("XZEPR_EVENT_NAME", &message.name)
            .env("XZEPR_EVENT_VERSION", &message.version)
            .env("XZEPR_EVENT_RELEASE", &message.release)
            .env("XZEPR_EVENT_PLATFORM_ID", &message.platform_id)
            .env("XZEPR_EVENT_PACKAGE", &message.package)
            .env("XZEPR_WORK_ID", &info.work_id)
            .env("KAFKA_TOPIC", &info.topic)
            .env("KAFKA_PARTITION", info.partition.to_string())
            .env("KAFKA_OFFSET", info.offset.to_string());
        cmd.envs(kafka::vars(info));
        // The attempt's span: the program's work continues the event's trace.
        for (name, value) in xzepr_consumer::trace::current()
            .iter()
            .flat_map(|t| t.headers())
        {
            cmd.env(name.to_ascii_uppercase(), value);
        }
        cmd
    }

    async fn run(&self, message: CloudEventMessage, info: WorkInfo) -> Result<Value, HandlerError> {
        let mut input = serde_json::to_vec(&message).map_err(|e| {
            HandlerError::with_code(format!("event to JSON: {e}"), "encode").permanent()
        })?;
        input.push(b'\n');
        let mut command = self.command(&message, &info);
        let (mut status, mut out, mut err) = self.run_once(&mut command, &input).await?;
        if status.as_ref().is_ok_and(stop_signal)
            && run_status::stopping_within(STOP_SEEN_WITHIN).await
        {
            // Killed by the stop signal sent to `run`'s whole process group, in
            // the moment it was still a member (before its own group): it never
            // ran. The drain waits for this second start.
            tracing::info!(
                topic = %info.topic,
                partition = info.partition,
                offset = info.offset,
                "Program caught by the stop signal before it started; running it again."
            );
            (status, out, err) = self.run_once(&mut command, &input).await?;
        }
        let (out, err) = (out.into_bytes(), err.into_bytes());
        let status = status.map_err(|e| {
            HandlerError::with_code(format!("waiting for {}: {e}", self.program()), "wait")
        })?;
        if status.success() {
            return Ok(details(&out));
        }
        let tail = String::from_utf8_lossy(&err);
        let tail = tail.trim();
        let (what, code) = match status.code() {
            Some(code) => (format!("exited with status {code}"), "exit_status"),
            None => (describe_signal(&status), "signal"),
        };
        let message = if tail.is_empty() {
            format!("{} {what}", self.program())
        } else {
            format!("{} {what}: {tail}", self.program())
        };
        Err(HandlerError::with_code(message, code))
    }

    /// Starts `command` with `input` on its stdin and waits for it: its exit
    /// status, the head of its stdout and the tail of its stderr.
    async fn run_once(
        &self,
        command: &mut tokio::process::Command,
        input: &[u8],
    ) -> Result<(std::io::Result<std::process::ExitStatus>, Capture, Capture), HandlerError> {
        // A program that cannot be started will not start on a retry either.
        let mut group = group::Group::spawn(command).map_err(|e| {
            HandlerError::with_code(format!("cannot start {}: {e}", self.program()), "spawn")
                .permanent()
        })?;
        let (stdin, stdout, stderr) = group.stdio();
        let write = async move {
            if let Some(mut stdin) = stdin {
                // A program that exits without reading its input is not an error.
                let _ = stdin.write_all(input).await;
            }
        };
        let mut out = Capture::new(Keep::Head(STDOUT_MAX));
        let mut err = Capture::new(Keep::Tail(STDERR_TAIL));
        let status = {
            let io = async {
                tokio::join!(write, out.read(stdout), err.read(stderr));
            };
            tokio::pin!(io);
            let mut io_done = false;
            let status = loop {
                tokio::select! {
                    status = group.wait() => break status,
                    () = &mut io, if !io_done => io_done = true,
                }
            };
            // What it left running goes with it, and lets go of the pipes.
            group.kill();
            if !io_done {
                let _ = tokio::time::timeout(PIPE_GRACE, &mut io).await;
            }
            status
        };
        // The group's members are reaped in the background.
        drop(group);
        Ok((status, out, err))
    }
}

impl AsyncHandler for Exec {
    fn handle(
        &self,
        message: CloudEventMessage,
        info: WorkInfo,
    ) -> BoxFuture<Result<Value, HandlerError>> {
        let this = self.clone();
        Box::pin(async move { this.run(message, info).await })
    }
}

#[cfg(unix)]
fn describe_signal(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(sig) => format!("was killed by signal {sig}"),
        None => format!("ended with {status}"),
    }
}

/// Killed by a signal that stops `run` (SIGINT, SIGTERM).
#[cfg(unix)]
fn stop_signal(status: &std::process::ExitStatus) -> bool {
    use rustix::process::Signal;
    use std::os::unix::process::ExitStatusExt;
    status
        .signal()
        .is_some_and(|s| s == Signal::INT.as_raw() || s == Signal::TERM.as_raw())
}

#[cfg(not(unix))]
fn stop_signal(_: &std::process::ExitStatus) -> bool {
    false
}

#[cfg(not(unix))]
fn describe_signal(status: &std::process::ExitStatus) -> String {
    format!("ended with {status}")
}

/// stdout as `details`: a JSON object is used as is; anything else gives none.
fn details(stdout: &[u8]) -> Value {
    match serde_json::from_slice::<Value>(stdout) {
        Ok(v @ Value::Object(_)) => v,
        _ => Value::Object(Default::default()),
    }
}

/// Which part of a stream to keep.
#[derive(Clone, Copy)]
enum Keep {
    /// The first bytes; past the limit, nothing (the output is not used).
    Head(usize),
    /// The last bytes.
    Tail(usize),
}

/// What is kept of one of the child's output streams.
struct Capture {
    keep: Keep,
    kept: Vec<u8>,
    overflowed: bool,
}

impl Capture {
    fn new(keep: Keep) -> Self {
        Capture {
            keep,
            kept: Vec::new(),
            overflowed: false,
        }
    }

    /// Reads `stream` to its end (so the child never blocks on a full pipe),
    /// keeping what `keep` says; cancelled, what was read so far is kept.
    async fn read(&mut self, stream: Option<impl AsyncRead + Unpin>) {
        let Some(mut stream) = stream else {
            return;
        };
        let mut chunk = vec![0u8; 8192];
        loop {
            let n = match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            match self.keep {
                Keep::Head(max) => {
                    if self.kept.len() + n > max {
                        self.overflowed = true;
                        self.kept.clear();
                    } else if !self.overflowed {
                        self.kept.extend_from_slice(&chunk[..n]);
                    }
                }
                Keep::Tail(max) => {
                    self.kept.extend_from_slice(&chunk[..n]);
                    if self.kept.len() > 2 * max {
                        self.kept.drain(..self.kept.len() - max);
                    }
                }
            }
        }
    }

    fn into_bytes(mut self) -> Vec<u8> {
        if let Keep::Tail(max) = self.keep {
            if self.kept.len() > max {
                self.kept.drain(..self.kept.len() - max);
            }
        }
        self.kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> CloudEventMessage {
        let (_, payload) = xzepr_consumer::generate::xzepr_event(3, "01M82X4ET7AYGAEYSHF5AKVAVW");
        serde_json::from_slice(&payload).unwrap()
    }

    fn info() -> WorkInfo {
        xzepr_consumer::handler::Work::new("work-x".into(), "t".into(), 2, 41).info()
    }

    fn sh(script: &str) -> Exec {
        Exec::new(&["sh".into(), "-c".into(), script.into()]).unwrap()
    }

    #[tokio::test]
    async fn stdout_object_becomes_details_and_env_is_set() {
        let exec = sh(
            r#"read -r line; case "$line" in *"\"id\":\"$XZEPR_EVENT_ID\""*) ;; *) exit 7;; esac
            printf '{"type":"%s","offset":%s,"partition":%s,"topic":"%s","work":"%s"}' \
              "$XZEPR_EVENT_TYPE" "$KAFKA_OFFSET" "$KAFKA_PARTITION" "$KAFKA_TOPIC" "$XZEPR_WORK_ID""#,
        );
        let m = message();
        let ty = m.event_type.clone();
        let details = exec.run(m, info()).await.unwrap();
        assert_eq!(details["type"], ty.as_str());
        assert_eq!(details["offset"], 41);
        assert_eq!(details["partition"], 2);
        assert_eq!(details["topic"], "t");
        assert_eq!(details["work"], "work-x");
    }

    #[tokio::test]
    async fn the_kafka_record_reaches_the_program() {
        use xzepr_consumer::handler::{Record, Timestamp, Work};
        let headers = vec![
            ("ce-type".to_owned(), b"deployment.completed".to_vec()),
            ("bin".to_owned(), vec![0]),
        ];
        let info = Work::new("w".into(), "t".into(), 0, 1)
            .with_record(Record::new(
                Some(b"order 7"),
                &headers,
                Some(Timestamp::CreateTime(5)),
            ))
            .info();
        let exec = sh(
            r#"printf '{"key":"%s","ts":"%s %s","type":"%s","bin":"%s"}' "$KAFKA_KEY" \
              "$KAFKA_TIMESTAMP" "$KAFKA_TIMESTAMP_TYPE" "$KAFKA_HEADER_CE_TYPE" "$KAFKA_HEADER_BIN_BASE64""#,
        );
        let details = exec.run(message(), info).await.unwrap();
        assert_eq!(details["key"], "order 7");
        assert_eq!(details["ts"], "5 CreateTime");
        assert_eq!(details["type"], "deployment.completed");
        assert_eq!(details["bin"], "AA==");
    }

    #[tokio::test]
    async fn non_json_stdout_gives_empty_details() {
        let details = sh("echo hello").run(message(), info()).await.unwrap();
        assert_eq!(details, serde_json::json!({}));
    }

    #[tokio::test]
    async fn failure_carries_the_status_and_the_stderr_tail() {
        let err = sh("head -c 5000 /dev/zero | tr '\\0' x >&2; echo ' the end' >&2; exit 3")
            .run(message(), info())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("exit_status"));
        assert!(err.message().contains("status 3"), "{}", err.message());
        assert!(err.message().ends_with("the end"), "{}", err.message());
        assert!(err.message().len() < STDERR_TAIL + 100, "only the tail");
    }

    #[tokio::test]
    async fn killed_and_missing_programs_fail() {
        let err = sh("kill -9 $$").run(message(), info()).await.unwrap_err();
        assert_eq!(err.code(), Some("signal"));
        let err = Exec::new(&["/nonexistent/program".into()])
            .unwrap()
            .run(message(), info())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("spawn"));
        assert!(err.is_permanent());
    }

    #[tokio::test]
    async fn a_large_event_and_a_program_ignoring_stdin_do_not_deadlock() {
        // An event larger than a pipe holds, never read, while the program
        // writes more than a pipe holds to stderr.
        let mut big = message();
        big.data.events[0].payload = Value::from("x".repeat(300_000));
        let details = sh("head -c 300000 /dev/zero >&2; echo '{}'")
            .run(big, info())
            .await
            .unwrap();
        assert_eq!(details, serde_json::json!({}));
    }

    /// Whether `pid` is a live process (a zombie is not).
    #[cfg(target_os = "linux")]
    fn alive(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
    }

    /// Waits, bounded, until `pid` is gone.
    #[cfg(target_os = "linux")]
    async fn gone(pid: &str) -> bool {
        let t = std::time::Instant::now();
        while alive(pid) {
            if t.elapsed() > Duration::from_secs(10) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_background_child_holding_stdout_neither_holds_the_event_nor_outlives_it() {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("bg.pid");
        let exec = sh(&format!(
            r#"sleep 30 & echo $! > {}; echo '{{"done":true}}'"#,
            pid.display()
        ));
        // The bound only keeps a regression from hanging the test.
        let details = tokio::time::timeout(Duration::from_secs(20), exec.run(message(), info()))
            .await
            .expect("done when the program exits, not when its pipes close")
            .unwrap();
        assert_eq!(details, serde_json::json!({"done": true}));
        let pid = std::fs::read_to_string(&pid).unwrap();
        let pid = pid.trim();
        assert!(gone(pid).await, "the background child {pid} was killed");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_dropped_program_takes_its_children_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("gc.pid");
        let exec = sh(&format!(
            r#"sh -c 'echo $$ > {}.tmp; mv {0}.tmp {0}; sleep 30' & sleep 30"#,
            pid.display()
        ));
        let mut run = Box::pin(exec.run(message(), info()));
        let t = std::time::Instant::now();
        while !pid.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "no grandchild started"
            );
            tokio::select! {
                r = &mut run => panic!("ended before it was dropped: {r:?}"),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        // What the pipeline does on a timeout or at the drain deadline.
        drop(run);
        let pid = std::fs::read_to_string(&pid).unwrap();
        let pid = pid.trim();
        assert!(gone(pid).await, "the grandchild {pid} was killed");
    }
}
