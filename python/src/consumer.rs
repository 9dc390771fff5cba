//! The consumer: the library's `Pipeline::run`, with the handler on the
//! caller's asyncio loop (through the [`Inbox`]).
//!
//! This module adds no run cycle of its own. It builds one `PipelineConfig`
//! from the settings the package sends ([`crate::settings`]), hands it to
//! `Pipeline::builder(kafka).config(..)` with the reporting
//! (`report_to`: the pipeline finds or creates the receiver, reports, drains
//! the reporter) and the idempotency store, and spawns `run_watching` on the
//! shared runtime. The watch future holds the running pipeline until the
//! package asks to stop; the package reads metrics and health through a weak
//! reference, so the run's own drop of the pipeline (which closes the
//! reporter's queue) is never held up by Python.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex, Weak};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use xzepr_consumer::decode::{Decoder, DecoderConfig};
use xzepr_consumer::metrics::MetricsSnapshot;
use xzepr_consumer::pipeline::{Pipeline, Reporting, RunningPipeline, Summary};

use crate::bridge::awaitable;
use crate::client::Client;
use crate::config::KafkaArgs;
use crate::convert::{message_to_py, Json};
use crate::errors::{consumer_error, poisoned, Failure};
use crate::idempotency::Store;
use crate::inbox::{Bridge, Inbox};

type Run = JoinHandle<Result<Summary, xzepr_consumer::Error>>;

/// What the package and the run share.
#[derive(Default)]
struct State {
    /// The running pipeline, while the run holds it.
    running: Weak<RunningPipeline>,
    /// The counters last read, and the final ones once the run ended.
    last: Option<MetricsSnapshot>,
}

/// A pipeline run whose handler runs on the asyncio loop.
#[pyclass(frozen, module = "xzepr_consumer._native")]
pub(crate) struct Consumer {
    inbox: Arc<Inbox>,
    state: Arc<Mutex<State>>,
    stop: watch::Sender<bool>,
    run: Mutex<Option<Run>>,
}

/// The reporting's receiver and work, as the package names them.
#[derive(Debug, FromPyObject)]
#[pyo3(from_item_all)]
pub(crate) struct ReportingArgs {
    receiver_name: String,
    receiver_type: String,
    receiver_version: String,
    receiver_description: String,
    work_name: String,
    work_version: String,
}

impl ReportingArgs {
    fn to_reporting(&self, client: &Client, service: &str) -> Reporting {
        Reporting::new(client.inner.clone(), service)
            .receiver(&*self.receiver_name, &*self.receiver_type)
            .receiver_details(
                &*self.receiver_version,
                &*self.receiver_description,
                json!({"type": "object"}),
            )
            .work(&*self.work_name, &*self.work_version)
    }
}

impl Consumer {
    fn running(&self) -> PyResult<Option<Arc<RunningPipeline>>> {
        Ok(self.state.lock().map_err(|_| poisoned())?.running.upgrade())
    }
}

#[pymethods]
impl Consumer {
    /// Checks everything (`build`), then starts the run: with `client` and
    /// `reporting`, the pipeline first finds or creates the receiver.
    /// Start-up failures (XZepr unreachable, the metrics address taken, a
    /// consumer librdkafka refuses) come from `join`.
    #[new]
    ///
    /// With `batch`, the handler takes a lane's run at once: its events are
    /// parked together, under one group key (see `take`).
    #[pyo3(signature = (config, settings, *, client = None, reporting = None, idempotency = None, batch = false))]
    fn new(
        py: Python<'_>,
        config: KafkaArgs,
        settings: &str,
        client: Option<PyRef<'_, Client>>,
        reporting: Option<ReportingArgs>,
        idempotency: Option<Store>,
        batch: bool,
    ) -> PyResult<Self> {
        let kafka = config.to_config(py)?;
        let service = kafka.service_name.clone();
        let settings = crate::settings::parse(py, settings)?;
        let rt = crate::runtime();
        let mut builder = Pipeline::builder(kafka)
            .config(settings)
            .runtime(rt.handle().clone());
        match (client, reporting) {
            (Some(client), Some(r)) => {
                builder = builder.report_to(r.to_reporting(&client, &service))
            }
            (None, None) => {}
            _ => {
                return Err(crate::errors::config_error(
                    py,
                    "reporting needs both the client and the receiver and work".to_owned(),
                ))
            }
        }
        if let Some(store) = idempotency {
            builder = store.apply(builder);
        }
        let pipeline = builder.build().map_err(|e| consumer_error(&e))?;

        let inbox = Arc::new(Inbox::new()?);
        let state = Arc::new(Mutex::new(State::default()));
        let (stop, mut stopped) = watch::channel(false);
        let bridge = Bridge(Arc::clone(&inbox));
        let shared = Arc::clone(&state);
        let watched = Arc::clone(&state);
        let run = rt.spawn(async move {
            let watch = move |running: Arc<RunningPipeline>| async move {
                if let Ok(mut s) = watched.lock() {
                    s.running = Arc::downgrade(&running);
                }
                // A stop asked for before the pipeline ran stops it now.
                if !*stopped.borrow_and_update() {
                    let _ = stopped.changed().await;
                }
            };
            let ended = match batch {
                true => pipeline.run_batch_watching(bridge, watch).await,
                false => pipeline.run_watching(bridge, watch).await,
            };
            if let (Ok(summary), Ok(mut s)) = (&ended, shared.lock()) {
                s.last = Some(summary.metrics);
            }
            ended
        });
        Ok(Consumer {
            inbox,
            state,
            stop,
            run: Mutex::new(Some(run)),
        })
    }

    /// Up to `max` parked events as `(key, CloudEventMessage, Token, group)`,
    /// without waiting; `group` is the batch's key (never split), or None.
    fn take<'py>(&self, py: Python<'py>, max: usize) -> PyResult<Bound<'py, PyList>> {
        self.inbox.take(py, max)
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
    fn shutdown(&self) -> PyResult<()> {
        self.inbox.stopping.store(true, SeqCst);
        self.stop.send_replace(true);
        // At once, not when the run's task next runs.
        if let Some(running) = self.running()? {
            running.shutdown();
        }
        Ok(())
    }

    /// Whether `shutdown` was called: an event left unanswered from now on is
    /// held for a replay, not failed.
    #[getter]
    fn stopping(&self) -> bool {
        self.inbox.stopping.load(SeqCst)
    }

    /// Whether the run ended (asked to, or on an error): nothing more will be
    /// parked.
    #[getter]
    fn finished(&self) -> bool {
        self.inbox.finished.load(SeqCst)
    }

    /// Waits until the run ended (the pipeline stopped, drained and committed,
    /// the reporter's last posts sent or its deadline passed), then marks the
    /// inbox finished. Resolves to whether every lifecycle post was sent;
    /// raises the error the run stopped on, if any. Call it once, when the
    /// consumer starts: the loop keeps serving the inbox until it is finished.
    fn join<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let run = self
            .run
            .lock()
            .map_err(|_| poisoned())?
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("join was called already"))?;
        let inbox = Arc::clone(&self.inbox);
        awaitable(py, async move {
            let ended = run.await;
            inbox.finish();
            match ended {
                Ok(Ok(summary)) => Ok(summary.reports_sent),
                Ok(Err(e)) => Err(Failure::Run(e)),
                Err(e) => Err(Failure::Internal(format!("the run's task failed: {e}"))),
            }
        })
    }

    /// The pipeline's counters as a dict (the package makes them a
    /// `Metrics`): live while it runs, the final ones after.
    fn metrics(&self) -> PyResult<Json> {
        let running = self.running()?;
        let mut state = self.state.lock().map_err(|_| poisoned())?;
        // Kept: read again after the run dropped the pipeline and before it
        // ended (the reporter's drain), the counters do not fall back to zero.
        if let Some(running) = running {
            state.last = Some(running.metrics());
        }
        let snapshot = state.last.unwrap_or_default();
        drop(state);
        serde_json::to_value(snapshot)
            .map(Json)
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    /// Whether the pipeline is alive and ready, as `GET /health` and `GET
    /// /ready` answer (a dict; the package makes it a `Health`); None unless
    /// it runs.
    fn health(&self) -> PyResult<Option<Json>> {
        self.running()?
            .map(|r| serde_json::to_value(r.health()).map(Json))
            .transpose()
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    /// The address the metrics endpoint listens on (`host:port`), while it
    /// runs.
    #[getter]
    fn metrics_addr(&self) -> PyResult<Option<String>> {
        Ok(self
            .running()?
            .and_then(|r| r.metrics_addr())
            .map(|a| a.to_string()))
    }
}

/// The names of the pipeline's counters (`MetricsSnapshot`'s fields): what
/// the package's `Metrics` must hold (its parity test compares them).
#[pyfunction]
pub(crate) fn metric_names() -> Vec<String> {
    match serde_json::to_value(MetricsSnapshot::default()) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
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
    let decoder =
        Decoder::new(DecoderConfig::default()).map_err(|e| crate::errors::decode_error(py, &e))?;
    let headers = headers.unwrap_or_default();
    let pairs = headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
    let message = decoder
        .decode_message(pairs, Some(payload.as_bytes()))
        .and_then(|ev| ev.to_owned_message())
        .map_err(|e| crate::errors::decode_error(py, &e))?;
    message_to_py(py, &message)
}
