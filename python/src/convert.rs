//! Owned messages into the package's dataclasses, and JSON values both ways.
//!
//! The dataclasses are defined in Python (`xzepr_consumer/message.py`) so they are
//! real dataclasses; they are built here positionally, in their field order.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};
use xzepr_consumer::decode::{
    CloudEventMessage, EventEntity, EventReceiverEntity, EventReceiverGroupEntity,
};

/// The dataclasses, looked up once.
struct Classes {
    message: Py<PyAny>,
    data: Py<PyAny>,
    event: Py<PyAny>,
    receiver: Py<PyAny>,
    group: Py<PyAny>,
    record: Py<PyAny>,
    trace: Py<PyAny>,
}

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

fn classes(py: Python<'_>) -> PyResult<&Classes> {
    CLASSES.get_or_try_init(py, || {
        let m = py.import("xzepr_consumer.message")?;
        let get = |name: &str| m.getattr(name).map(Bound::unbind);
        Ok(Classes {
            message: get("CloudEventMessage")?,
            data: get("CloudEventData")?,
            event: get("EventEntity")?,
            receiver: get("EventReceiverEntity")?,
            group: get("EventReceiverGroupEntity")?,
            record: get("KafkaRecord")?,
            trace: get("TraceContext")?,
        })
    })
}

/// A JSON value as the Python value `json.loads` would give.
pub(crate) fn value_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(value_to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, item) in map {
                dict.set_item(k, value_to_py(py, item)?)?;
            }
            dict.into_any()
        }
    })
}

/// How deep [`py_to_value`] follows nested dicts, lists and tuples: 128, as
/// simd-json's `DEFAULT_MAX_DEPTH` and the decoder's default `max_depth`, so what
/// a handler returns is bounded as what it reads. Deeper is an error, not a
/// stack overflow: a cyclic value (a dict that holds itself) never ends.
pub(crate) const MAX_DEPTH: usize = 128;

/// A Python value made of dicts (string keys), lists, tuples, strings, numbers,
/// booleans and None, as JSON; a `ValueError` past [`MAX_DEPTH`] levels.
pub(crate) fn py_to_value(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    to_value(obj, 0)
}

fn to_value(obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<Value> {
    if obj.is_none() {
        return Ok(Value::Null);
    }
    // bool before int: Python's bool is an int.
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::from(i));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::from(u));
        }
        return Err(PyTypeError::new_err("integer out of JSON's 64-bit range"));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Number::from_f64(f.value())
            .map(Value::Number)
            .ok_or_else(|| PyTypeError::new_err("NaN and infinity are not JSON"));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Value::String(s.to_str()?.to_owned()));
    }
    let inner = depth + 1;
    let nested = obj.is_instance_of::<PyDict>()
        || obj.is_instance_of::<PyList>()
        || obj.is_instance_of::<PyTuple>();
    if nested && inner > MAX_DEPTH {
        return Err(PyValueError::new_err(format!(
            "the value nests deeper than {MAX_DEPTH} levels (the most JSON may nest here; \
             a value that contains itself never ends)"
        )));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut map = Map::with_capacity(d.len());
        for (k, v) in d.iter() {
            let key = k
                .cast::<PyString>()
                .map_err(|_| PyTypeError::new_err("JSON object keys must be strings"))?;
            map.insert(key.to_str()?.to_owned(), to_value(&v, inner)?);
        }
        return Ok(Value::Object(map));
    }
    if let Ok(l) = obj.cast::<PyList>() {
        return l.iter().map(|v| to_value(&v, inner)).collect();
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return t.iter().map(|v| to_value(&v, inner)).collect();
    }
    Err(PyTypeError::new_err(format!(
        "not JSON-serializable: {}",
        obj.get_type().name()?
    )))
}

/// A JSON value returned from a future: converted under the GIL on the loop.
#[derive(Debug)]
pub(crate) struct Json(pub(crate) Value);

impl<'py> IntoPyObject<'py> for Json {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Self::Output> {
        value_to_py(py, &self.0)
    }
}

fn event<'py>(py: Python<'py>, c: &Classes, e: &EventEntity) -> PyResult<Bound<'py, PyAny>> {
    let args = PyTuple::new(
        py,
        [
            e.id.as_str().into_pyobject(py)?.into_any(),
            e.name.as_str().into_pyobject(py)?.into_any(),
            e.version.as_str().into_pyobject(py)?.into_any(),
            e.release.as_str().into_pyobject(py)?.into_any(),
            e.platform_id.as_str().into_pyobject(py)?.into_any(),
            e.package.as_str().into_pyobject(py)?.into_any(),
            e.description.as_str().into_pyobject(py)?.into_any(),
            value_to_py(py, &e.payload)?,
            PyBool::new(py, e.success).to_owned().into_any(),
            e.event_receiver_id.as_str().into_pyobject(py)?.into_any(),
            e.created_at.into_pyobject(py)?.into_any(),
            e.owner_id.as_deref().into_pyobject(py)?.into_any(),
            e.resource_version.into_pyobject(py)?.into_any(),
        ],
    )?;
    c.event.bind(py).call1(args)
}

fn receiver<'py>(
    py: Python<'py>,
    c: &Classes,
    r: &EventReceiverEntity,
) -> PyResult<Bound<'py, PyAny>> {
    let args = PyTuple::new(
        py,
        [
            r.id.as_str().into_pyobject(py)?.into_any(),
            r.name.as_str().into_pyobject(py)?.into_any(),
            r.receiver_type.as_str().into_pyobject(py)?.into_any(),
            r.version.as_str().into_pyobject(py)?.into_any(),
            r.description.as_str().into_pyobject(py)?.into_any(),
            value_to_py(py, &r.schema)?,
            r.fingerprint.as_str().into_pyobject(py)?.into_any(),
            r.created_at.into_pyobject(py)?.into_any(),
            r.owner_id.as_deref().into_pyobject(py)?.into_any(),
            r.resource_version.into_pyobject(py)?.into_any(),
        ],
    )?;
    c.receiver.bind(py).call1(args)
}

fn group<'py>(
    py: Python<'py>,
    c: &Classes,
    g: &EventReceiverGroupEntity,
) -> PyResult<Bound<'py, PyAny>> {
    let args = PyTuple::new(
        py,
        [
            g.id.as_str().into_pyobject(py)?.into_any(),
            g.name.as_str().into_pyobject(py)?.into_any(),
            g.group_type.as_str().into_pyobject(py)?.into_any(),
            g.version.as_str().into_pyobject(py)?.into_any(),
            g.description.as_str().into_pyobject(py)?.into_any(),
            PyBool::new(py, g.enabled).to_owned().into_any(),
            PyList::new(py, &g.event_receiver_ids)?.into_any(),
            g.created_at.into_pyobject(py)?.into_any(),
            g.updated_at.into_pyobject(py)?.into_any(),
            g.owner_id.as_deref().into_pyobject(py)?.into_any(),
            g.resource_version.into_pyobject(py)?.into_any(),
        ],
    )?;
    c.group.bind(py).call1(args)
}

/// The message as a `CloudEventMessage` dataclass (entities, payloads and
/// timestamps converted: `datetime` in UTC, JSON as dicts and lists).
pub(crate) fn message_to_py<'py>(
    py: Python<'py>,
    m: &CloudEventMessage,
) -> PyResult<Bound<'py, PyAny>> {
    let c = classes(py)?;
    let list = |items: Vec<Bound<'py, PyAny>>| PyList::new(py, items);
    let events = list(
        m.data
            .events
            .iter()
            .map(|e| event(py, c, e))
            .collect::<PyResult<_>>()?,
    )?;
    let receivers = list(
        m.data
            .event_receivers
            .iter()
            .map(|r| receiver(py, c, r))
            .collect::<PyResult<_>>()?,
    )?;
    let groups = list(
        m.data
            .event_receiver_groups
            .iter()
            .map(|g| group(py, c, g))
            .collect::<PyResult<_>>()?,
    )?;
    let data = c.data.bind(py).call1((events, receivers, groups))?;
    c.message.bind(py).call1((
        m.success,
        m.id.as_str(),
        m.specversion.as_str(),
        m.event_type.as_str(),
        m.source.as_str(),
        m.api_version.as_str(),
        m.name.as_str(),
        m.version.as_str(),
        m.release.as_str(),
        m.platform_id.as_str(),
        m.package.as_str(),
        data,
    ))
}

/// Where an event came from as a `KafkaRecord` dataclass (key and header
/// values as `bytes`).
pub(crate) fn record_to_py<'py>(
    py: Python<'py>,
    info: &xzepr_consumer::handler::WorkInfo,
) -> PyResult<Bound<'py, PyAny>> {
    let c = classes(py)?;
    let key = info.key.as_deref().map(|k| PyBytes::new(py, k));
    let headers = PyList::new(
        py,
        info.headers
            .iter()
            .map(|(k, v)| (k.as_str(), PyBytes::new(py, v))),
    )?;
    c.record.bind(py).call1((
        info.topic.as_str(),
        info.partition,
        info.offset,
        key,
        headers,
        info.timestamp.map(|t| t.millis()),
        info.timestamp.map(|t| t.kind()),
    ))
}

/// A W3C trace context as the package's `TraceContext`.
pub(crate) fn trace_to_py<'py>(
    py: Python<'py>,
    t: &xzepr_consumer::trace::TraceContext,
) -> PyResult<Bound<'py, PyAny>> {
    classes(py)?
        .trace
        .bind(py)
        .call1((t.traceparent(), t.state.as_deref()))
}

/// An RFC 3339 timestamp as an aware `datetime` in UTC, parsed as the decoder
/// does (nanoseconds truncated to Python's microseconds).
#[pyfunction]
pub(crate) fn parse_timestamp(
    py: Python<'_>,
    text: &str,
) -> PyResult<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| {
            crate::errors::config_error(py, format!("not an RFC 3339 timestamp {text:?}: {e}"))
        })
}
