//! Rust errors as the package's exception classes (defined in Python, in
//! `xzepr_consumer/errors.py`, so they keep the plan's constructors).

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;
use xzepr_consumer::client::ClientError;
use xzepr_consumer::decode::Error as DecodeError;
use xzepr_consumer::source::SourceError;

static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    let module =
        ERRORS.get_or_try_init(py, || py.import("xzepr_consumer.errors").map(Bound::unbind))?;
    module.bind(py).getattr(name)
}

/// An exception of class `name` from the errors module, built with `args`.
fn raise<'py, A>(py: Python<'py>, name: &str, args: A) -> PyErr
where
    A: pyo3::call::PyCallArgs<'py>,
{
    match class(py, name).and_then(|c| c.call1(args)) {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

/// The plan's client errors: 401/403 → `XzeprAuthError`, 404 →
/// `XzeprNotFoundError`, any other status → `XzeprApiError(status, message)`,
/// and no answer at all (timeout, connection, decoding) → `XzeprClientError`.
pub(crate) fn client_error(e: ClientError) -> PyErr {
    Python::attach(|py| {
        let text = e.to_string();
        match &e {
            ClientError::Unauthorized { status } => raise(py, "XzeprAuthError", (text, *status)),
            ClientError::NotFound { .. } => raise(py, "XzeprNotFoundError", (text, 404)),
            ClientError::Api(api) => {
                let message = if api.body.is_empty() {
                    text
                } else {
                    api.body.clone()
                };
                raise(py, "XzeprApiError", (api.status, message))
            }
            _ => raise(py, "XzeprClientError", (text,)),
        }
    })
}

/// A payload that does not decode: `DecodeError(message, kind, field, offset)`.
pub(crate) fn decode_error(py: Python<'_>, e: &DecodeError) -> PyErr {
    let (kind, field, offset): (&str, Option<String>, Option<usize>) = match e {
        DecodeError::InvalidJson { offset, .. } => ("invalid_json", None, Some(*offset)),
        DecodeError::NotAnObject { .. } => ("not_an_object", None, None),
        DecodeError::MissingAttribute { name } => ("missing_attribute", Some((*name).into()), None),
        DecodeError::WrongType { field, .. } => ("wrong_type", Some(field.to_string()), None),
        DecodeError::UnsupportedSpecVersion { .. } => ("unsupported_specversion", None, None),
        DecodeError::PayloadTooLarge { .. } => ("payload_too_large", None, None),
        DecodeError::TooDeep { .. } => ("too_deep", None, None),
        DecodeError::InvalidHeader { name } => ("invalid_header", Some(name.to_string()), None),
        DecodeError::InvalidConfig { field, .. } => ("invalid_config", Some((*field).into()), None),
        DecodeError::DataShape { .. } => ("data_shape", None, None),
        _ => ("other", None, None),
    };
    raise(py, "DecodeError", (e.to_string(), kind, field, offset))
}

/// A setting the core refused: `ConfigError` (a `ValueError`) naming it.
pub(crate) fn config_error(py: Python<'_>, message: String) -> PyErr {
    raise(py, "ConfigError", (message,))
}

/// Anything else the core stopped on.
pub(crate) fn consumer_error(e: &xzepr_consumer::Error) -> PyErr {
    Python::attach(|py| match e {
        xzepr_consumer::Error::Config(c) => config_error(py, c.to_string()),
        xzepr_consumer::Error::Source(s @ SourceError::InvalidOption { .. }) => {
            config_error(py, s.to_string())
        }
        other => raise(py, "XzeprConsumerError", (other.to_string(),)),
    })
}

/// A poisoned lock: a bug, surfaced rather than hidden.
pub(crate) fn poisoned() -> PyErr {
    PyRuntimeError::new_err("internal lock poisoned")
}
