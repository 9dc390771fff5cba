//! Where the pipeline's handler futures hand events to the asyncio loop.
//!
//! The core runs an async handler per event as a tokio future (up to
//! `max_in_flight` at once, in the ordering mode's lanes). Here that future
//! ([`Bridge`]) only parks the event in the [`Inbox`] and awaits its
//! [`Token`]'s answer: it never touches Python. A park signals the inbox's
//! [`Wake`] socket, which the loop watches; the loop side
//! (`xzepr_consumer/consumer.py`) takes what is parked in one call under the
//! GIL ([`Inbox::take`], converting it to dataclasses there), runs each as an
//! asyncio task, and answers through the token, which is a plain channel
//! send. The inbox holds at most `max_in_flight` events: a lane has one event
//! in its handler at a time, and at most `max_in_flight` lanes run.
//!
//! A future the pipeline drops before its answer (at `handler_timeout`, at a
//! revoke's or the stop's drain deadline) gives its event up: still parked, it
//! is never handed over; already handed over, its key goes into the inbox's
//! `dropped` list and the loop cancels its task. A retried event (the
//! pipeline's retry policy) is parked again, as a new key, for each attempt.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};
use serde_json::Value;
use tokio::sync::oneshot;
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::handler::{
    AsyncBatchHandler, AsyncHandler, BatchOutcome, BoxFuture, HandlerError, WorkInfo,
};

use crate::bridge::Wake;
use xzepr_consumer::trace::TraceContext;

use crate::convert::{message_to_py, py_to_value, record_to_py, trace_to_py};
use crate::errors::poisoned;

type Reply = oneshot::Sender<Result<Value, HandlerError>>;

/// An event waiting for the loop to take it.
struct Parked {
    /// Names the event's asyncio task on the loop side.
    key: u64,
    /// The batch it came in (its events are parked and taken together).
    group: Option<u64>,
    message: CloudEventMessage,
    info: WorkInfo,
    /// The handler attempt span's context (traces on, one-event handlers).
    trace: Option<TraceContext>,
    reply: Reply,
}

/// Where the pipeline's futures park events for the loop.
pub(crate) struct Inbox {
    queue: Mutex<VecDeque<Parked>>,
    /// Signalled on every park and when the pipeline stops; the loop watches
    /// its descriptor.
    pub(crate) wake: Wake,
    /// No event will be parked any more: the pipeline stopped and drained.
    pub(crate) finished: AtomicBool,
    /// The consumer was asked to stop: an event left unanswered is held for a
    /// replay, not failed.
    pub(crate) stopping: AtomicBool,
    /// Keys of events whose future was dropped unanswered (the loop cancels
    /// their tasks).
    pub(crate) dropped: Mutex<Vec<u64>>,
    next_key: AtomicU64,
}

impl Inbox {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(Self {
            queue: Mutex::default(),
            wake: Wake::new()?,
            finished: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            dropped: Mutex::default(),
            next_key: AtomicU64::new(0),
        })
    }

    pub(crate) fn finish(&self) {
        self.finished.store(true, SeqCst);
        self.wake.signal();
    }

    /// Up to `max` parked events as `(key, CloudEventMessage, Token, group)`,
    /// without waiting; a batch is never split (it may take `max` past).
    /// Events the pipeline gave up on while they were parked are dropped
    /// here, unrun.
    pub(crate) fn take<'py>(&self, py: Python<'py>, max: usize) -> PyResult<Bound<'py, PyList>> {
        let parked: Vec<Parked> = {
            let mut q = self.queue.lock().map_err(|_| poisoned())?;
            let mut n = q.len().min(max);
            while n > 0 && n < q.len() && q[n].group.is_some() && q[n].group == q[n - 1].group {
                n += 1;
            }
            q.drain(..n).collect()
        };
        let out = PyList::empty(py);
        for p in parked {
            if p.reply.is_closed() {
                continue;
            }
            let key = p.key.into_pyobject(py)?.into_any();
            let message = message_to_py(py, &p.message)?;
            message.setattr("kafka", record_to_py(py, &p.info)?)?;
            if let Some(trace) = &p.trace {
                message.setattr("trace_context", trace_to_py(py, trace)?)?;
            }
            let token = Bound::new(
                py,
                Token {
                    reply: Mutex::new(Some(p.reply)),
                    info: p.info,
                },
            )?;
            let group = p.group.into_pyobject(py)?.into_any();
            out.append(PyTuple::new(py, [key, message, token.into_any(), group])?)?;
        }
        Ok(out)
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
pub(crate) struct Bridge(pub(crate) Arc<Inbox>);

impl AsyncHandler for Bridge {
    fn handle(
        &self,
        message: CloudEventMessage,
        info: WorkInfo,
    ) -> BoxFuture<Result<Value, HandlerError>> {
        let inbox = Arc::clone(&self.0);
        Box::pin(async move {
            // Polled inside the attempt's span: its context, for the handler
            // to continue the trace.
            let trace = xzepr_consumer::trace::current();
            let (parked, answer) = inbox.parked(None, message, info, trace);
            inbox.park(vec![parked])?;
            inbox.answer(answer).await
        })
    }
}

impl AsyncBatchHandler for Bridge {
    /// Parks the batch's events together (one group) and waits for each
    /// one's answer: a Python exception fails its own event only.
    fn handle_batch(
        &self,
        batch: Vec<(CloudEventMessage, WorkInfo)>,
    ) -> BoxFuture<Result<Vec<BatchOutcome>, HandlerError>> {
        let inbox = Arc::clone(&self.0);
        Box::pin(async move {
            let group = Some(inbox.next_key.fetch_add(1, SeqCst));
            let (parked, answers): (Vec<_>, Vec<_>) = batch
                .into_iter()
                // One call for many events runs in no event's span.
                .map(|(message, info)| inbox.parked(group, message, info, None))
                .unzip();
            inbox.park(parked)?;
            // In turn: the call ends with its last answer anyway, and every
            // guard is already made, so a drop (a timeout) tells of them all.
            let mut outcomes = Vec::with_capacity(answers.len());
            for a in answers {
                outcomes.push(match inbox.answer(a).await {
                    Ok(details) => BatchOutcome::Done(details),
                    Err(e) if e.is_permanent() => BatchOutcome::Failed(e),
                    Err(e) => BatchOutcome::Retry(e),
                });
            }
            Ok(outcomes)
        })
    }
}

/// Where an event's answer comes, with the guard that tells the loop when
/// it is given up.
struct Answer {
    guard: Unanswered,
    answer: oneshot::Receiver<Result<Value, HandlerError>>,
}

impl Inbox {
    fn parked(
        self: &Arc<Self>,
        group: Option<u64>,
        message: CloudEventMessage,
        info: WorkInfo,
        trace: Option<TraceContext>,
    ) -> (Parked, Answer) {
        let (reply, answer) = oneshot::channel();
        let key = self.next_key.fetch_add(1, SeqCst);
        let parked = Parked {
            key,
            group,
            message,
            info,
            trace,
            reply,
        };
        let guard = Unanswered {
            inbox: Arc::clone(self),
            key,
            answered: false,
        };
        (parked, Answer { guard, answer })
    }

    /// Parks events for the loop, together.
    fn park(&self, parked: Vec<Parked>) -> Result<(), HandlerError> {
        match self.queue.lock() {
            Ok(mut q) => q.extend(parked),
            Err(_) => return Err(HandlerError::with_code("inbox lock poisoned", "internal")),
        }
        self.wake.signal();
        Ok(())
    }

    /// Waits for the loop's answer to one parked event.
    async fn answer(&self, a: Answer) -> Result<Value, HandlerError> {
        let Answer { mut guard, answer } = a;
        let answer = answer.await;
        guard.answered = true;
        match answer {
            Ok(result) => result,
            // The loop dropped the token unanswered while stopping (a
            // KeyboardInterrupt, a broken executor, a task cancelled at the
            // stop): never report or finish it. Waiting lets the drain
            // cancel this future, which leaves the offset held, so a
            // restart replays the event.
            Err(_) if self.stopping.load(SeqCst) => std::future::pending().await,
            // Otherwise a bug on the loop side: failing the event keeps its
            // lane moving.
            Err(_) => Err(HandlerError::with_code(
                "the handler's task ended without an answer",
                "unanswered",
            )),
        }
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
    /// and `error_code` the exception's type name. A `permanent` failure is
    /// never retried.
    #[pyo3(signature = (error_type, message, permanent = false))]
    fn fail(&self, error_type: &str, message: &str, permanent: bool) -> PyResult<bool> {
        let text = if message.is_empty() {
            error_type.to_owned()
        } else {
            format!("{error_type}: {message}")
        };
        let e = HandlerError::with_code(text, error_type);
        self.answer(Err(if permanent { e.permanent() } else { e }))
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
