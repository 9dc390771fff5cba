//! Answers from tokio to the asyncio loop, without a tokio thread ever taking
//! the GIL.
//!
//! A thread that calls into Python from Rust (as `call_soon_threadsafe` from a
//! tokio worker does) can be caught by interpreter shutdown while it waits for
//! the GIL: CPython then ends the thread with `pthread_exit`, and that forced
//! unwind through Rust frames aborts the whole process. A program that exits
//! right after its last await hits it. So tokio threads here only push plain
//! Rust values into a queue and write a byte to a socket; the loop watches the
//! socket (`add_reader`, in `xzepr_consumer/_bridge.py`) and turns the values
//! into Python objects on its own thread.
//!
//! ```text
//!  tokio task ──(id, outcome)──> Completions queue ──byte──> socket
//!                                                              │ add_reader
//!  asyncio loop: drain() ──> outcome(py) ──> future.set_result / set_exception
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::IntoPyObjectExt;
use tokio::task::AbortHandle;

use crate::errors::poisoned;

/// A wake-up socket: [`Wake::signal`] from any thread, watched by the loop.
///
/// At most one byte is in flight per wake-up the loop has not cleared, so a
/// burst of signals costs one write and one wake.
#[derive(Debug)]
pub(crate) struct Wake {
    tx: UnixStream,
    rx: UnixStream,
    signalled: AtomicBool,
}

impl Wake {
    pub(crate) fn new() -> std::io::Result<Self> {
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok(Self {
            tx,
            rx,
            signalled: AtomicBool::new(false),
        })
    }

    /// Wakes the loop unless a wake-up is already pending. Never blocks.
    pub(crate) fn signal(&self) {
        if !self.signalled.swap(true, SeqCst) {
            // A full socket (WouldBlock) already holds unread bytes: the loop
            // wakes anyway.
            let _ = (&self.tx).write_all(&[1]);
        }
    }

    /// Consumes the pending wake-ups. Whatever was signalled before this call
    /// must be looked at after it; what is signalled after wakes the loop again.
    pub(crate) fn clear(&self) {
        let mut buf = [0u8; 64];
        loop {
            match (&self.rx).read(&mut buf) {
                Ok(n) if n == buf.len() => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                _ => break,
            }
        }
        self.signalled.store(false, SeqCst);
    }

    /// The descriptor the loop watches for reading.
    pub(crate) fn fileno(&self) -> i32 {
        self.rx.as_raw_fd()
    }
}

/// Builds the Python value of a finished future, on the loop's thread.
type Outcome = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

struct Shared {
    wake: Wake,
    done: Mutex<Vec<(u64, Outcome)>>,
    /// Futures still running, so a cancelled awaitable can abort its task.
    running: Mutex<HashMap<u64, AbortHandle>>,
}

impl Shared {
    fn finish(&self, id: u64, outcome: Outcome) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&id);
        }
        if let Ok(mut done) = self.done.lock() {
            done.push((id, outcome));
        }
        self.wake.signal();
    }
}

/// The finished futures of one event loop (one per loop, made by
/// `xzepr_consumer._bridge`).
#[pyclass(frozen, module = "xzepr_consumer._native")]
pub(crate) struct Completions {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Completions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completions")
            .field("wake", &self.shared.wake)
            .finish_non_exhaustive()
    }
}

#[pymethods]
impl Completions {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(Self {
            shared: Arc::new(Shared {
                wake: Wake::new()?,
                done: Mutex::default(),
                running: Mutex::default(),
            }),
        })
    }

    /// The descriptor that becomes readable when futures finished.
    fn fileno(&self) -> i32 {
        self.shared.wake.fileno()
    }

    /// The futures finished since the last call, as `(id, ok, value)`: the
    /// result when `ok`, else the exception to raise.
    fn drain(&self, py: Python<'_>) -> PyResult<Vec<(u64, bool, Py<PyAny>)>> {
        self.shared.wake.clear();
        let done = std::mem::take(&mut *self.shared.done.lock().map_err(|_| poisoned())?);
        Ok(done
            .into_iter()
            .map(|(id, outcome)| match outcome(py) {
                Ok(value) => (id, true, value),
                Err(e) => (id, false, e.into_value(py).into_any()),
            })
            .collect())
    }

    /// Aborts the future of a cancelled awaitable.
    fn cancel(&self, id: u64) -> PyResult<()> {
        if let Some(task) = self
            .shared
            .running
            .lock()
            .map_err(|_| poisoned())?
            .remove(&id)
        {
            task.abort();
        }
        Ok(())
    }

    /// How many futures are still running (for tests).
    fn __len__(&self) -> PyResult<usize> {
        Ok(self.shared.running.lock().map_err(|_| poisoned())?.len())
    }
}

/// Answers an awaitable whose task ended without an answer: a panic raises
/// instead of leaving the awaitable pending for ever. (An aborted task's
/// awaitable is already cancelled; the answer is dropped.)
struct Finisher {
    shared: Arc<Shared>,
    id: u64,
    answered: bool,
}

impl Drop for Finisher {
    fn drop(&mut self) {
        if !self.answered {
            self.shared.finish(
                self.id,
                Box::new(|_| {
                    Err(PyRuntimeError::new_err(
                        "the native task ended without an answer (it panicked)",
                    ))
                }),
            );
        }
    }
}

/// An error turned into its Python exception on the loop's thread (where the
/// outcome is built), so making an exception of a class defined in Python
/// never takes the GIL on a tokio thread.
pub(crate) trait LoopError: Send + 'static {
    fn into_py_err(self, py: Python<'_>) -> PyErr;
}

impl LoopError for PyErr {
    fn into_py_err(self, _py: Python<'_>) -> PyErr {
        self
    }
}

/// Runs `future` on the shared tokio runtime and returns an asyncio future of
/// the running loop that resolves to its output (or raises its error).
/// Cancelling the asyncio future aborts the task.
pub(crate) fn awaitable<'py, F, T, E>(py: Python<'py>, future: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
    E: LoopError,
{
    static PENDING: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let pending = PENDING.get_or_try_init(py, || {
        Ok::<_, PyErr>(
            py.import("xzepr_consumer._bridge")?
                .getattr("pending")?
                .unbind(),
        )
    })?;
    let (id, asyncio_future, completions): (u64, Bound<'py, PyAny>, Bound<'py, Completions>) =
        pending.bind(py).call0()?.extract()?;
    let shared = Arc::clone(&completions.get().shared);
    // Held while spawning: a task that finishes at once removes its entry only
    // after it was inserted.
    let mut running = shared.running.lock().map_err(|_| poisoned())?;
    let mut finisher = Finisher {
        shared: Arc::clone(&shared),
        id,
        answered: false,
    };
    let task = crate::runtime().spawn(async move {
        let output = future.await;
        finisher.answered = true;
        finisher.shared.finish(
            id,
            Box::new(move |py| {
                output
                    .map_err(|e| e.into_py_err(py))
                    .and_then(|value| value.into_py_any(py))
            }),
        );
    });
    running.insert(id, task.abort_handle());
    Ok(asyncio_future)
}
