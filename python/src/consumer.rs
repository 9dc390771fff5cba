//! The pipeline with its handler on the caller's asyncio loop.
//!
//! The core runs an async handler per event as a tokio future (up to
//! `max_in_flight` at once, in the ordering mode's lanes). Here that future only
//! parks the event in the [`Inbox`] and awaits its [`Token`]'s answer: it never
//! touches Python. A park signals the inbox's [`Wake`] socket, which the loop
//! watches; the loop side (`xzepr_consumer/consumer.py`) takes what is parked
//! in one call under the GIL (converting it to dataclasses there), runs
//! each as an asyncio task, and answers through the token, which is a plain
//! channel send. The inbox holds at most `max_in_flight` events: a lane has one
//! event in its handler at a time, and at most `max_in_flight` lanes run.
//!
//! A future the pipeline drops before its answer (at `handler_timeout`, at a
//! revoke's or the stop's drain deadline) gives its event up: still parked, it
//! is never handed over; already handed over, its key goes into the inbox's
//! `dropped` list and the loop cancels its task.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use serde_json::Value;
use tokio::sync::oneshot;
use xzepr_consumer::decode::{CloudEventMessage, Decoder, DecoderConfig};
use xzepr_consumer::dispatch::{Ordering, TypeFilter};
use xzepr_consumer::handler::{AsyncHandler, BoxFuture, HandlerError, WorkInfo};
use xzepr_consumer::pipeline::{Pipeline, RunningPipeline, WorkTemplate};
use xzepr_consumer::report::{Reporter, ReporterConfig, ReporterTask};

use crate::bridge::{awaitable, Wake};
use crate::client::Client;
use crate::config::KafkaArgs;
use crate::convert::{message_to_py, py_to_value, Json};
use crate::errors::{consumer_error, poisoned};

type Reply = oneshot::Sender<Result<Value, HandlerError>>;

/// An event waiting for the loop to take it.
struct Parked {
    /// Names the event's asyncio task on the loop side.
    key: u64,
    message: CloudEventMessage,
    info: WorkInfo,
    reply: Reply,
}

/// Where the pipeline's futures park events for the loop.
struct Inbox {
    queue: Mutex<VecDeque<Parked>>,
    /// Signalled on every park and when the pipeline stops; the loop watches
    /// its descriptor.
    wake: Wake,
    /// No event will be parked any more: the pipeline stopped and drained.
    finished: AtomicBool,
    /// The consumer was asked to stop: an event left unanswered is held for a
    /// replay, not failed.
    stopping: AtomicBool,
    /// Keys of events whose future was dropped unanswered (the loop cancels
    /// their tasks).
    dropped: Mutex<Vec<u64>>,
    next_key: AtomicU64,
}

impl Inbox {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            queue: Mutex::default(),
            wake: Wake::new()?,
            finished: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            dropped: Mutex::default(),
            next_key: AtomicU64::new(0),
        })
    }

    fn finish(&self) {
        self.finished.store(true, SeqCst);
        self.wake.signal();
    }
}

/// Tells the loop that an event's future ended without its answer, so that
/// its task (if it has one) is cancelled: dropped at a timeout or a drain
/// deadline, the handler must not go on with work whose outcome was decided.
struct Unanswered {
    inbox: Arc<Inbox>,
    key: u64,
    answered: bool,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.answered {
            if let Ok(mut dropped) = self.inbox.dropped.lock() {
                dropped.push(self.key);
            }
            self.inbox.wake.signal();
        }
    }
}

/// The core's async handler: parks the event and waits for the loop's answer.
struct Bridge(Arc<Inbox>);

impl AsyncHandler for Bridge {
    fn handle(
        &self,
        message: CloudEventMessage,
        info: WorkInfo,
    ) -> BoxFuture<Result<Value, HandlerError>> {
        let (reply, answer) = oneshot::channel();
        let inbox = Arc::clone(&self.0);
        let key = inbox.next_key.fetch_add(1, SeqCst);
        let parked = Parked {
            key,
            message,
            info,
            reply,
        };
        Box::pin(async move {
            match inbox.queue.lock() {
                Ok(mut q) => q.push_back(parked),
                Err(_) => return Err(HandlerError::with_code("inbox lock poisoned", "internal")),
            }
            inbox.wake.signal();
            let mut guard = Unanswered {
                inbox,
                key,
                answered: false,
            };
            let answer = answer.await;
            guard.answered = true;
            match answer {
                Ok(result) => result,
                // The loop dropped the token unanswered while stopping (a
                // KeyboardInterrupt, a broken executor, a task cancelled at the
                // stop): never report or finish it. Waiting lets the drain
                // cancel this future, which leaves the offset held, so a
                // restart replays the event.
                Err(_) if guard.inbox.stopping.load(SeqCst) => std::future::pending().await,
                // Otherwise a bug on the loop side: failing the event keeps its
                // lane moving.
                Err(_) => Err(HandlerError::with_code(
                    "the handler's task ended without an answer",
                    "unanswered",
                )),
            }
        })
    }
}

/// The answer slot of one event, handed to Python with it.
#[pyclass(frozen, module = "xzepr_consumer._native")]
pub(crate) struct Token {
    reply: Mutex<Option<Reply>>,
    info: WorkInfo,
}

impl Token {
    fn answer(&self, result: Result<Value, HandlerError>) -> PyResult<bool> {
        let reply = self.reply.lock().map_err(|_| poisoned())?.take();
        // A closed channel means the pipeline gave up on the event (cancelled
        // at its drain deadline): the answer no longer matters.
        Ok(reply.is_some_and(|r| r.send(result).is_ok()))
    }
}

#[pymethods]
impl Token {
    /// The handler succeeded; `details` (a JSON-able dict, or None) go into the
    /// `completed` post. Returns False when the event was already answered or
    /// abandoned by the pipeline.
    #[pyo3(signature = (details = None))]
    fn done(&self, details: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        let details = match details {
            Some(d) if !d.is_none() => py_to_value(d)?,
            _ => Value::Null,
        };
        self.answer(Ok(details))
    }

    /// The handler raised: posted as `failed` with `error` "{error_type}: {message}"
    /// and `error_code` the exception's type name.
    fn fail(&self, error_type: &str, message: &str) -> PyResult<bool> {
        let text = if message.is_empty() {
            error_type.to_owned()
        } else {
            format!("{error_type}: {message}")
        };
        self.answer(Err(HandlerError::with_code(text, error_type)))
    }

    /// Whether the answer can no longer matter: already given, or the pipeline
    /// gave the event up (its future was dropped at a timeout or a drain
    /// deadline). Such an event must not run.
    #[getter]
    fn abandoned(&self) -> PyResult<bool> {
        Ok(self
            .reply
            .lock()
            .map_err(|_| poisoned())?
            .as_ref()
            .is_none_or(oneshot::Sender::is_closed))
    }

    #[getter]
    fn work_id(&self) -> &str {
        &self.info.work_id
    }

    #[getter]
    fn topic(&self) -> &str {
        &self.info.topic
    }

    #[getter]
    fn partition(&self) -> i32 {
        self.info.partition
    }

    #[getter]
    fn offset(&self) -> i64 {
        self.info.offset
    }

    fn __repr__(&self) -> String {
        format!(
            "Token(work_id={:?}, topic={:?}, partition={}, offset={})",
            self.info.work_id, self.info.topic, self.info.partition, self.info.offset
        )
    }
}

fn ordering(py: Python<'_>, name: &str) -> PyResult<Ordering> {
    match name {
        "partition" => Ok(Ordering::PerPartition),
        "key" => Ok(Ordering::PerKey),
        "unordered" => Ok(Ordering::Unordered),
        other => Err(crate::errors::config_error(
            py,
            format!("invalid ordering {other:?}: expected partition, key or unordered"),
        )),
    }
}

fn seconds(py: Python<'_>, name: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| crate::errors::config_error(py, format!("`{name}` must be >= 0: {s}")))
}

/// A running pipeline whose handler runs on the asyncio loop.
#[pyclass(frozen, module = "xzepr_consumer._native")]
pub(crate) struct Consumer {
    inbox: Arc<Inbox>,
    running: Arc<RunningPipeline>,
    reporter: Mutex<Option<ReporterTask>>,
    drain_timeout: Duration,
}

#[pymethods]
impl Consumer {
    /// Starts consuming. Lifecycle posts are on when `client`, `receiver_id`
    /// and `work_name` are all given.
    #[new]
    #[pyo3(signature = (
        config, *, client = None, receiver_id = None, work_name = None,
        work_version = "1.0.0".to_owned(), ordering = "partition", max_in_flight = 1024,
        handler_timeout = None, drain_timeout = 10.0, commit_interval = 1.0,
        type_prefixes = Vec::new(), skip_own_events = true,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        config: KafkaArgs,
        client: Option<PyRef<'_, Client>>,
        receiver_id: Option<String>,
        work_name: Option<String>,
        work_version: String,
        ordering: &str,
        max_in_flight: usize,
        handler_timeout: Option<f64>,
        drain_timeout: f64,
        commit_interval: f64,
        type_prefixes: Vec<String>,
        skip_own_events: bool,
    ) -> PyResult<Self> {
        let kafka = config.to_config(py)?;
        let service = kafka.service_name.clone();
        let drain = seconds(py, "drain_timeout", drain_timeout)?;
        let mut filter = TypeFilter::any();
        for p in type_prefixes {
            filter = filter.prefix(p);
        }
        let rt = crate::runtime();
        let mut builder = Pipeline::builder(kafka)
            .runtime(rt.handle().clone())
            .ordering(self::ordering(py, ordering)?)
            .max_in_flight(max_in_flight)
            .drain_timeout(drain)
            .commit_interval(seconds(py, "commit_interval", commit_interval)?)
            .type_filter(filter)
            .skip_own_events(skip_own_events);
        if let Some(t) = handler_timeout {
            builder = builder.handler_timeout(seconds(py, "handler_timeout", t)?);
        }
        let mut reporter_task = None;
        match (client, receiver_id, work_name) {
            (Some(client), Some(receiver), Some(work)) => {
                // The reporter's tasks are spawned on the runtime.
                let _rt = rt.enter();
                let (reporter, task) =
                    Reporter::start(client.inner.clone(), ReporterConfig::default());
                reporter_task = Some(task);
                builder = builder.lifecycle(
                    reporter,
                    WorkTemplate::new(receiver, work, work_version, service),
                );
            }
            (None, None, None) => {}
            _ => {
                return Err(PyValueError::new_err(
                    "automatic lifecycle needs client, receiver_id and work_name together",
                ))
            }
        }
        let inbox = Arc::new(Inbox::new()?);
        let bridge = Bridge(Arc::clone(&inbox));
        // Creating the Kafka consumer may resolve names: not under the GIL.
        let running = py
            .detach(move || builder.start_async(bridge))
            .map_err(|e| consumer_error(&e))?;
        let running = Arc::new(running);
        Ok(Consumer {
            inbox,
            running,
            reporter: Mutex::new(reporter_task),
            drain_timeout: drain,
        })
    }

    /// Up to `max` parked events as `(key, CloudEventMessage, Token)`, without
    /// waiting. Events the pipeline gave up on while they were parked are
    /// dropped here, unrun.
    fn take<'py>(&self, py: Python<'py>, max: usize) -> PyResult<Bound<'py, PyList>> {
        let parked: Vec<Parked> = {
            let mut q = self.inbox.queue.lock().map_err(|_| poisoned())?;
            let n = q.len().min(max);
            q.drain(..n).collect()
        };
        let out = PyList::empty(py);
        for p in parked {
            if p.reply.is_closed() {
                continue;
            }
            let key = p.key.into_pyobject(py)?.into_any();
            let message = message_to_py(py, &p.message)?;
            let token = Bound::new(
                py,
                Token {
                    reply: Mutex::new(Some(p.reply)),
                    info: p.info,
                },
            )?;
            out.append(PyTuple::new(py, [key, message, token.into_any()])?)?;
        }
        Ok(out)
    }

    /// The descriptor that becomes readable when events were parked or the
    /// pipeline finished (the loop watches it with `add_reader`).
    fn fileno(&self) -> i32 {
        self.inbox.wake.fileno()
    }

    /// Consumes the pending wake-ups: call it before `take` and `finished`.
    fn clear_wake(&self) {
        self.inbox.wake.clear();
    }

    /// The keys of handed-over events whose future was dropped unanswered
    /// since the last call: their tasks are to be cancelled.
    fn dropped(&self) -> PyResult<Vec<u64>> {
        Ok(std::mem::take(
            &mut *self.inbox.dropped.lock().map_err(|_| poisoned())?,
        ))
    }

    /// Stops fetching; running handlers drain (see `join`). Never blocks.
    fn shutdown(&self) {
        self.inbox.stopping.store(true, SeqCst);
        self.running.shutdown();
    }

    /// Whether `shutdown` was called: an event left unanswered from now on is
    /// held for a replay, not failed.
    #[getter]
    fn stopping(&self) -> bool {
        self.inbox.stopping.load(SeqCst)
    }

    /// Whether the pipeline stopped and drained (asked to, or on an error):
    /// nothing more will be parked.
    #[getter]
    fn finished(&self) -> bool {
        self.inbox.finished.load(SeqCst)
    }

    /// Waits, off the loop, until the pipeline stopped (on `shutdown` or on an
    /// error) and drained, then marks the inbox finished and waits for the
    /// reporter's last posts; raises the error the pipeline stopped on, if any.
    /// Call it once, when the consumer starts: the loop keeps serving the
    /// inbox until it is finished.
    fn join<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let running = Arc::clone(&self.running);
        let inbox = Arc::clone(&self.inbox);
        let reporter = self.reporter.lock().map_err(|_| poisoned())?.take();
        let drain = self.drain_timeout;
        awaitable(py, async move {
            let joined = tokio::task::spawn_blocking(move || running.join()).await;
            inbox.finish();
            if let Some(task) = reporter {
                task.drain(drain).await;
            }
            match joined {
                Ok(r) => r.map_err(|e| consumer_error(&e)),
                Err(e) => Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
                    "the drain task failed: {e}"
                ))),
            }
        })
    }

    /// The pipeline's counters (consumed, handled, posted_started, finished, ...).
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let snapshot = serde_json::to_value(self.running.metrics())
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Json(snapshot).into_pyobject(py)
    }
}

/// Decodes one payload (structured mode, or binary mode with `ce_*` headers)
/// into a `CloudEventMessage`, exactly as the consumer does.
#[pyfunction]
#[pyo3(signature = (payload, headers = None))]
pub(crate) fn decode<'py>(
    py: Python<'py>,
    payload: &Bound<'py, PyBytes>,
    headers: Option<Vec<(String, Vec<u8>)>>,
) -> PyResult<Bound<'py, PyAny>> {
    let mut decoder =
        Decoder::new(DecoderConfig::default()).map_err(|e| crate::errors::decode_error(py, &e))?;
    let headers = headers.unwrap_or_default();
    let pairs = headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
    let message = decoder
        .decode_message(pairs, Some(payload.as_bytes()))
        .and_then(|ev| ev.to_owned_message())
        .map_err(|e| crate::errors::decode_error(py, &e))?;
    message_to_py(py, &message)
}
