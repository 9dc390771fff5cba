//! Rust errors as the package's exception classes (defined in Python, in
//! `xzepr_consumer/errors.py`, so they keep the plan's constructors).

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;
use xzepr_consumer::client::ClientError;
use xzepr_consumer::decode::Error as DecodeError;
use xzepr_consumer::source::SourceError;

use crate::bridge::LoopError;

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

/// A setting the core refused is a `ConfigError`; anything else the core
/// stopped on an `XzeprConsumerError` whose text follows the error's chain of
/// causes (`finding or creating receiver …: connection refused`).
pub(crate) fn consumer_error(e: &xzepr_consumer::Error) -> PyErr {
    use xzepr_consumer::Error as E;
    Python::attach(|py| match e {
        E::Config(_)
        | E::Source(SourceError::InvalidOption { .. } | SourceError::Config(_))
        | E::Decode(DecodeError::InvalidConfig { .. }) => config_error(py, e.to_string()),
        other => raise(py, "XzeprConsumerError", (chain(other),)),
    })
}

/// An incident tool's failure (`offsets`, `redrive`): `XzeprConsumerError`
/// with the error's chain of causes.
pub(crate) fn tool_error(py: Python<'_>, e: &dyn std::error::Error) -> PyErr {
    raise(py, "XzeprConsumerError", (chain(e),))
}

/// An error's text, then each cause's that it does not already show.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// What a consumer's awaitables fail with, made an exception on the loop's
/// thread (see [`LoopError`]).
#[derive(Debug)]
pub(crate) enum Failure {
    /// The error the run stopped on.
    Run(xzepr_consumer::Error),
    /// `XzeprConsumerError` with this text (a store that cannot open, …).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Consumer(String),
    /// A bug of the bindings (a task that panicked).
    Internal(String),
}

impl LoopError for Failure {
    fn into_py_err(self, py: Python<'_>) -> PyErr {
        match self {
            Failure::Run(e) => consumer_error(&e),
            Failure::Consumer(text) => raise(py, "XzeprConsumerError", (text,)),
            Failure::Internal(text) => PyRuntimeError::new_err(text),
        }
    }
}

/// A poisoned lock: a bug, surfaced rather than hidden.
pub(crate) fn poisoned() -> PyErr {
    PyRuntimeError::new_err("internal lock poisoned")
}
