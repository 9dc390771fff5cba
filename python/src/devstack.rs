//! `xzepr_consumer.devstack`: the embedded dev stack for tests and local runs:
//! librdkafka's in-process mock broker and the core's XZepr stand-in (which
//! publishes every event it records back to the topic, as XZepr does), plus a
//! producer and an offsets reader for any broker. Blocking calls run without
//! the GIL.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use xzepr_consumer::devstack::{EventSink, KafkaSink, NoSink};
use xzepr_consumer::generate::xzepr_event;

use crate::convert::Json;
use crate::errors::poisoned;

fn runtime_error(e: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

/// The XZepr stand-in: receivers and events endpoints, bearer token, the
/// contract's errors, `latency_ms` per event post.
#[pyclass(frozen, module = "xzepr_consumer._native")]
pub(crate) struct StandIn {
    inner: Mutex<Option<xzepr_consumer::devstack::StandIn>>,
    url: String,
    token: String,
}

impl StandIn {
    fn start(
        py: Python<'_>,
        token: &str,
        latency_ms: u64,
        sink: Arc<dyn EventSink>,
    ) -> PyResult<StandIn> {
        let standin = py.detach(|| {
            crate::runtime().block_on(
                xzepr_consumer::devstack::StandIn::builder(token)
                    .latency(Duration::from_millis(latency_ms))
                    .sink(sink)
                    .start(),
            )
        });
        let standin = standin.map_err(runtime_error)?;
        Ok(StandIn {
            url: standin.url(),
            inner: Mutex::new(Some(standin)),
            token: token.to_owned(),
        })
    }

    fn with<R>(&self, f: impl FnOnce(&xzepr_consumer::devstack::StandIn) -> R) -> PyResult<R> {
        let guard = self.inner.lock().map_err(|_| poisoned())?;
        guard
            .as_ref()
            .map(f)
            .ok_or_else(|| PyRuntimeError::new_err("the stand-in was closed"))
    }
}

#[pymethods]
impl StandIn {
    /// A stand-in alone (publishing nowhere), on 127.0.0.1 at a free port.
    #[new]
    #[pyo3(signature = (token = "dev-token", latency_ms = 5))]
    fn new(py: Python<'_>, token: &str, latency_ms: u64) -> PyResult<Self> {
        StandIn::start(py, token, latency_ms, Arc::new(NoSink))
    }

    #[getter]
    fn url(&self) -> &str {
        &self.url
    }

    #[getter]
    fn token(&self) -> &str {
        &self.token
    }

    /// Counters: receivers, events, started, completed, failed, receiver_requests.
    fn stats(&self) -> PyResult<HashMap<&'static str, u64>> {
        use std::sync::atomic::Ordering::Relaxed;
        self.with(|s| {
            let st = s.stats();
            HashMap::from([
                ("receivers", st.receivers.load(Relaxed)),
                ("events", st.events.load(Relaxed)),
                ("started", st.started.load(Relaxed)),
                ("completed", st.completed.load(Relaxed)),
                ("failed", st.failed.load(Relaxed)),
                ("receiver_requests", st.receiver_requests.load(Relaxed)),
            ])
        })
    }

    /// Every event recorded (as XZepr stores them), in no particular order.
    fn recorded_events(&self) -> PyResult<Json> {
        self.with(|s| Json(serde_json::Value::Array(s.recorded_events())))
    }

    /// The `traceparent` header of every event post that carried one, in
    /// arrival order.
    fn recorded_traceparents(&self) -> PyResult<Vec<String>> {
        self.with(|s| s.recorded_traceparents())
    }

    /// Every receiver, in insertion order.
    fn receivers(&self) -> PyResult<Json> {
        self.with(|s| Json(serde_json::Value::Array(s.receivers())))
    }

    /// Adds a receiver with a chosen 26-character id, as if created earlier.
    fn insert_receiver(&self, id: &str, name: &str, receiver_type: &str) -> PyResult<()> {
        self.with(|s| s.insert_receiver(id, name, receiver_type))
    }

    /// Stops serving.
    fn close(&self) -> PyResult<()> {
        let standin = self.inner.lock().map_err(|_| poisoned())?.take();
        drop(standin);
        Ok(())
    }
}

/// The in-process broker (one node) with the topic, and a stand-in publishing
/// to it.
#[pyclass(frozen, module = "xzepr_consumer._native")]
pub(crate) struct DevStack {
    brokers: String,
    topic: String,
    partitions: i32,
    api: Py<StandIn>,
    /// Dropping it stops the broker's thread.
    stop: Mutex<Option<mpsc::Sender<()>>>,
    broker: Mutex<Option<JoinHandle<()>>>,
}

#[pymethods]
impl DevStack {
    /// `extra_topics` are created too, with one partition each (a dead-letter
    /// topic, say).
    #[new]
    #[pyo3(signature = (
        partitions = 3, api_latency_ms = 5, token = "dev-token", topic = "xzepr.dev.events",
        extra_topics = Vec::new(),
    ))]
    fn new(
        py: Python<'_>,
        partitions: i32,
        api_latency_ms: u64,
        token: &str,
        topic: &str,
        extra_topics: Vec<String>,
    ) -> PyResult<Self> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let t = topic.to_owned();
        // librdkafka's mock cluster lives on a thread of its own, until `close`.
        let broker = std::thread::Builder::new()
            .name("xzepr-py-mock-broker".into())
            .spawn(move || {
                let cluster = match rdkafka::mocking::MockCluster::new(1) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let topics = std::iter::once((t.as_str(), partitions))
                    .chain(extra_topics.iter().map(|x| (x.as_str(), 1)));
                for (name, n) in topics {
                    if let Err(e) = cluster.create_topic(name, n, 1) {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Until `close` (or the stack is dropped).
                let _ = stop_rx.recv();
                drop(cluster);
            })
            .map_err(runtime_error)?;
        let brokers = py
            .detach(move || ready_rx.recv())
            .map_err(runtime_error)?
            .map_err(runtime_error)?;
        let sink = Arc::new(KafkaSink::new(&brokers, topic).map_err(runtime_error)?);
        let api = Py::new(py, StandIn::start(py, token, api_latency_ms, sink)?)?;
        Ok(DevStack {
            brokers,
            topic: topic.to_owned(),
            partitions,
            api,
            stop: Mutex::new(Some(stop_tx)),
            broker: Mutex::new(Some(broker)),
        })
    }

    #[getter]
    fn brokers(&self) -> &str {
        &self.brokers
    }

    #[getter]
    fn topic(&self) -> &str {
        &self.topic
    }

    #[getter]
    fn partitions(&self) -> i32 {
        self.partitions
    }

    /// The XZepr stand-in.
    #[getter]
    fn api(&self, py: Python<'_>) -> Py<StandIn> {
        self.api.clone_ref(py)
    }

    /// The contract's variables pointing at this stack.
    fn env<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let api = self.api.get();
        let d = PyDict::new(py);
        d.set_item("XZEPR_KAFKA_BROKERS", &self.brokers)?;
        d.set_item("XZEPR_KAFKA_TOPIC", &self.topic)?;
        d.set_item("XZEPR_API_URL", &api.url)?;
        d.set_item("XZEPR_API_TOKEN", &api.token)?;
        Ok(d)
    }

    /// Stops the stand-in and the broker.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.api.get().close()?;
        drop(self.stop.lock().map_err(|_| poisoned())?.take());
        if let Some(t) = self.broker.lock().map_err(|_| poisoned())?.take() {
            py.detach(|| t.join())
                .map_err(|_| PyRuntimeError::new_err("the broker thread panicked"))?;
        }
        Ok(())
    }
}

impl Drop for DevStack {
    fn drop(&mut self) {
        if let Ok(mut stop) = self.stop.lock() {
            drop(stop.take());
        }
    }
}

fn client_config(brokers: &str, config: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in config {
        c.set(k, v);
    }
    c
}

/// Writes `messages` (`(key or None, payload)`) to `topic`, each to
/// `partition` or by key, each with `headers` (in order), and waits until all
/// are acknowledged.
#[pyfunction]
#[pyo3(signature = (brokers, topic, messages, partition = None, config = Vec::new(), headers = Vec::new()))]
pub(crate) fn produce(
    py: Python<'_>,
    brokers: &str,
    topic: &str,
    messages: Vec<(Option<Vec<u8>>, Vec<u8>)>,
    partition: Option<i32>,
    config: Vec<(String, String)>,
    headers: Vec<(String, Vec<u8>)>,
) -> PyResult<usize> {
    py.detach(|| {
        let producer: ThreadedProducer<DefaultProducerContext> = client_config(brokers, &config)
            .set("linger.ms", "5")
            .create()
            .map_err(runtime_error)?;
        for (key, payload) in &messages {
            let mut record = BaseRecord::<Vec<u8>, Vec<u8>>::to(topic).payload(payload);
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(p) = partition {
                record = record.partition(p);
            }
            if !headers.is_empty() {
                let mut h = rdkafka::message::OwnedHeaders::new_with_capacity(headers.len());
                for (name, value) in &headers {
                    h = h.insert(rdkafka::message::Header {
                        key: name,
                        value: Some(value),
                    });
                }
                record = record.headers(h);
            }
            // A full queue is waited out: a test's messages are never dropped.
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        r,
                    )) => {
                        record = r;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err((e, _)) => return Err(runtime_error(e)),
                }
            }
        }
        producer
            .flush(Duration::from_secs(60))
            .map_err(runtime_error)?;
        Ok(messages.len())
    })
}

/// Realistic XZepr events number `start`..`start + count` (the core's
/// generator), keyed by event id, recorded under `receiver_id`.
#[pyfunction]
#[pyo3(signature = (count, start = 0, receiver_id = "01M82X4ET7AYGAEYSHF5AKVAVW"))]
pub(crate) fn generate_events(
    count: u64,
    start: u64,
    receiver_id: &str,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    (start..start + count)
        .map(|seq| {
            let (key, payload) = xzepr_event(seq, receiver_id);
            (key.into_bytes(), payload)
        })
        .collect()
}

/// `{partition: (committed offset or -1, end offset)}` of `group_id` on `topic`.
#[pyfunction]
#[pyo3(signature = (brokers, group_id, topic, config = Vec::new()))]
pub(crate) fn committed_offsets(
    py: Python<'_>,
    brokers: &str,
    group_id: &str,
    topic: &str,
    config: Vec<(String, String)>,
) -> PyResult<HashMap<i32, (i64, i64)>> {
    py.detach(|| {
        let timeout = Duration::from_secs(20);
        let c: BaseConsumer = client_config(brokers, &config)
            .set("group.id", group_id)
            .create()
            .map_err(runtime_error)?;
        let metadata = c
            .fetch_metadata(Some(topic), timeout)
            .map_err(runtime_error)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition(topic, *p);
        }
        let committed = c.committed_offsets(tpl, timeout).map_err(runtime_error)?;
        let mut out = HashMap::new();
        for e in committed.elements() {
            let at = match e.offset() {
                Offset::Offset(o) => o,
                _ => -1,
            };
            let (_, high) = c
                .fetch_watermarks(topic, e.partition(), timeout)
                .map_err(runtime_error)?;
            out.insert(e.partition(), (at, high));
        }
        Ok(out)
    })
}

/// One record read back: key, payload and headers.
type Record = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, Vec<u8>)>);

/// Reads `topic` from its start (every partition) until `count` records came
/// or `timeout_s` passed, without committing: what a test checks was produced.
#[pyfunction]
#[pyo3(signature = (brokers, topic, count, timeout_s = 20.0, config = Vec::new()))]
pub(crate) fn read_topic(
    py: Python<'_>,
    brokers: &str,
    topic: &str,
    count: usize,
    timeout_s: f64,
    config: Vec<(String, String)>,
) -> PyResult<Vec<Record>> {
    use rdkafka::message::{Headers, Message};
    let timeout = Duration::try_from_secs_f64(timeout_s).map_err(runtime_error)?;
    py.detach(|| {
        let c: BaseConsumer = client_config(brokers, &config)
            .set("group.id", "xzepr-py-read-topic")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(runtime_error)?;
        let metadata = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(runtime_error)?;
        let mut tpl = TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                    .map_err(runtime_error)?;
            }
        }
        c.assign(&tpl).map_err(runtime_error)?;
        let deadline = std::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < count && std::time::Instant::now() < deadline {
            let Some(m) = c.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = m.map_err(runtime_error)?;
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| (x.key.to_owned(), x.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default();
            out.push((
                m.key().map(<[u8]>::to_vec),
                m.payload().map(<[u8]>::to_vec),
                headers,
            ));
        }
        Ok(out)
    })
}
