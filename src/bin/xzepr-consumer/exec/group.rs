//! A program's process group: it runs as the leader of a group of its own, so
//! whatever it starts (and does not move elsewhere) can be killed with it.
//!
//! The whole group is killed (`SIGKILL`) when the program exits and when its
//! [`Group`] is dropped (the timeout or the drain deadline dropped the
//! handler's future). Then its members that are our children are reaped: when
//! `run` is PID 1 in a container, the orphans of its programs are reparented
//! to it, and unreaped they stay zombies. Processes that left the group
//! (`setsid`, a daemon) are out of reach of both; run under an init (`tini`,
//! `docker run --init`) if programs do that.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

/// How long the members of a killed group are waited for, to reap them (a
/// process in uninterruptible sleep dies only when it wakes).
const REAP_FOR: Duration = Duration::from_secs(10);

/// How often a killed group is checked for members to reap.
const REAP_EVERY: Duration = Duration::from_millis(20);

/// The running program, leader of its own process group.
pub(super) struct Group {
    /// `None` only once moved into the reaper by `drop`.
    child: Option<Child>,
    /// The group's id (the leader's pid); `None` if it could not be known.
    #[cfg(unix)]
    pgid: Option<rustix::process::Pid>,
    /// Whether the group was signalled: it is, once only.
    killed: bool,
}

impl Group {
    /// Starts `cmd` as the leader of a new process group.
    pub(super) fn spawn(cmd: &mut Command) -> std::io::Result<Group> {
        #[cfg(unix)]
        cmd.process_group(0);
        let child = cmd.spawn()?;
        Ok(Group {
            #[cfg(unix)]
            pgid: child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .and_then(rustix::process::Pid::from_raw),
            child: Some(child),
            killed: false,
        })
    }

    /// The program's stdin, stdout and stderr (each piped, once).
    pub(super) fn stdio(
        &mut self,
    ) -> (Option<ChildStdin>, Option<ChildStdout>, Option<ChildStderr>) {
        match &mut self.child {
            Some(c) => (c.stdin.take(), c.stdout.take(), c.stderr.take()),
            None => (None, None, None),
        }
    }

    /// Waits for the program (the leader) to exit, and reaps it.
    pub(super) async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match &mut self.child {
            Some(c) => c.wait().await,
            // Taken only by `drop`.
            None => Err(std::io::Error::other("the program was already dropped")),
        }
    }

    /// Kills the whole group, once.
    ///
    /// Called right after the leader was reaped, the group id could in theory
    /// be reused by then if no other member kept it; that needs the whole pid
    /// space to wrap around in the microseconds between, so it is accepted.
    pub(super) fn kill(&mut self) {
        if std::mem::replace(&mut self.killed, true) {
            return;
        }
        #[cfg(unix)]
        if let Some(pgid) = self.pgid {
            // ESRCH: the group is gone already.
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
        #[cfg(not(unix))]
        if let Some(c) = &mut self.child {
            let _ = c.start_kill();
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Unreaped, the leader still holds the group id: killing it is safe.
        self.kill();
        let Some(mut child) = self.child.take() else {
            return;
        };
        #[cfg(unix)]
        let pgid = self.pgid;
        // Without a runtime the child's `kill_on_drop` and tokio's orphan
        // queue see to the leader; its group is not reaped.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                // The leader first: tokio reaps it; reaping it by group here
                // would take its status from under tokio.
                let _ = child.wait().await;
                #[cfg(unix)]
                if let Some(pgid) = pgid {
                    reap(pgid).await;
                }
            });
        }
    }
}

/// Reaps the group's members that are this process's children (none, unless
/// `run` is PID 1 or a subreaper), until none is left or for [`REAP_FOR`].
#[cfg(unix)]
async fn reap(pgid: rustix::process::Pid) {
    use rustix::io::Errno;
    use rustix::process::{waitpgid, WaitOptions};
    let until = Instant::now() + REAP_FOR;
    loop {
        match waitpgid(pgid, WaitOptions::NOHANG) {
            Ok(Some(_)) => continue,
            // Members alive yet (dying of the SIGKILL).
            Ok(None) if Instant::now() < until => tokio::time::sleep(REAP_EVERY).await,
            Err(Errno::INTR) => continue,
            // ECHILD: no child of ours left in the group, so its id is free and
            // must not be waited on again.
            Ok(None) | Err(_) => return,
        }
    }
}
