//! Traces from Python: the core's `trace::init_from_env` behind the package's
//! `init_tracing()`, and the handler attempt's context for the handler.
//!
//! The export is process-wide, as the `tracing` dispatcher it hangs on: the
//! first `init_tracing()` that finds an `OTEL_*` endpoint sets the guard and a
//! global subscriber with its layer; later calls find it. Shutting it down
//! (the package does at interpreter exit) exports what is left and ends it
//! for the process: the global subscriber cannot be set a second time.

use pyo3::prelude::*;

/// Whether this build has feature `otel` (the package's `HAS_OTEL`).
#[pyfunction]
pub(crate) fn has_otel() -> bool {
    cfg!(feature = "otel")
}

#[cfg(feature = "otel")]
mod export {
    use std::sync::Mutex;

    use pyo3::exceptions::PyRuntimeError;
    use pyo3::prelude::*;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use xzepr_consumer::trace::TraceGuard;

    use crate::errors::{chain, config_error, poisoned};

    enum Export {
        /// Not set up (no endpoint was set at the last `init_tracing`).
        Off,
        On(TraceGuard),
        /// Shut down: spans are no longer exported in this process.
        Ended,
    }

    static EXPORT: Mutex<Export> = Mutex::new(Export::Off);

    /// Sets the export up from the `OTEL_*` variables unless it is already;
    /// whether spans are exported.
    #[pyfunction]
    pub(crate) fn init_tracing(py: Python<'_>) -> PyResult<bool> {
        let mut export = EXPORT.lock().map_err(|_| poisoned())?;
        match &*export {
            Export::On(_) => return Ok(true),
            Export::Ended => {
                return Err(PyRuntimeError::new_err(
                    "tracing was shut down; it is set up once per process",
                ))
            }
            Export::Off => {}
        }
        let Some(guard) =
            xzepr_consumer::trace::init_from_env().map_err(|e| config_error(py, chain(&e)))?
        else {
            return Ok(false);
        };
        tracing_subscriber::registry()
            .with(guard.layer())
            .try_init()
            .map_err(|e| {
                PyRuntimeError::new_err(format!("a tracing subscriber is already set: {e}"))
            })?;
        *export = Export::On(guard);
        Ok(true)
    }

    /// Whether spans are exported (the consumer then turns its spans on).
    #[pyfunction]
    pub(crate) fn tracing_active() -> PyResult<bool> {
        Ok(matches!(
            *EXPORT.lock().map_err(|_| poisoned())?,
            Export::On(_)
        ))
    }

    /// Exports every span ended so far; waits for the collector's answers
    /// (each bounded by the export timeout) without the GIL.
    #[pyfunction]
    pub(crate) fn flush_tracing(py: Python<'_>) -> PyResult<()> {
        let export = EXPORT.lock().map_err(|_| poisoned())?;
        if let Export::On(guard) = &*export {
            py.detach(|| guard.flush());
        }
        Ok(())
    }

    /// Exports what is left and ends the export for the process.
    #[pyfunction]
    pub(crate) fn shutdown_tracing(py: Python<'_>) -> PyResult<()> {
        let mut export = EXPORT.lock().map_err(|_| poisoned())?;
        if let Export::On(guard) = std::mem::replace(&mut *export, Export::Ended) {
            // The guard's drop shuts the provider down, exporting the rest.
            py.detach(|| drop(guard));
        }
        Ok(())
    }
}

#[cfg(not(feature = "otel"))]
mod export {
    use pyo3::prelude::*;

    use crate::errors::config_error;

    /// Without the feature: nothing to set up, unless the variables ask for
    /// an export, which this build cannot make (refused, never ignored).
    #[pyfunction]
    pub(crate) fn init_tracing(py: Python<'_>) -> PyResult<bool> {
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        let wanted = !var("OTEL_EXPORTER_OTLP_ENDPOINT").trim().is_empty()
            || !var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").trim().is_empty();
        // As the core's `init_from_env` reads them.
        let disabled = var("OTEL_SDK_DISABLED").trim().eq_ignore_ascii_case("true")
            || var("OTEL_TRACES_EXPORTER")
                .trim()
                .eq_ignore_ascii_case("none");
        if wanted && !disabled {
            return Err(config_error(
                py,
                "an OTLP endpoint is set, but this build of xzepr_consumer has no `otel` feature"
                    .to_owned(),
            ));
        }
        Ok(false)
    }

    #[pyfunction]
    pub(crate) fn tracing_active() -> bool {
        false
    }

    #[pyfunction]
    pub(crate) fn flush_tracing() {}

    #[pyfunction]
    pub(crate) fn shutdown_tracing() {}
}

pub(crate) use export::{flush_tracing, init_tracing, shutdown_tracing, tracing_active};
