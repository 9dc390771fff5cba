//! The idempotency stores a consumer can run with (`PipelineBuilder::idempotency`):
//! the core's in-memory `MemoryStore`, and with feature `postgres` its
//! PostgreSQL `IdempotencyGuard` on a pool opened from a DSN. Each Python
//! object holds a clone of the store, so consumers given the same object
//! share its keys, and its counters stay readable after a run.

use std::time::Duration;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use xzepr_consumer::idempotency::{self, IdempotencyMetrics};
use xzepr_consumer::pipeline::PipelineBuilder;

#[cfg(feature = "postgres")]
use crate::errors::Failure;

/// Seconds as a duration; a negative or non-finite value is a `ConfigError`
/// naming the setting.
fn seconds(py: Python<'_>, name: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| crate::errors::config_error(py, format!("`{name}` must be >= 0 seconds: {s}")))
}

/// A store's counters, by the names of its Prometheus series.
fn counters(m: &IdempotencyMetrics) -> Vec<(&'static str, u64)> {
    vec![
        ("events_processed_total", m.events_processed_total),
        ("events_duplicates_total", m.events_duplicates_total),
        ("events_failed_total", m.events_failed_total),
        ("processed_events_table_size", m.processed_events_table_size),
        ("statements_total", m.statements_total),
    ]
}

/// Keys in this process's memory, bounded in count and time.
#[pyclass(frozen, module = "xzepr_consumer._native")]
pub(crate) struct MemoryStore {
    inner: idempotency::MemoryStore,
}

#[pymethods]
impl MemoryStore {
    /// Unset settings keep the core's defaults (100,000 keys, 1 h retention,
    /// 30 s lease).
    #[new]
    #[pyo3(signature = (*, capacity = None, retention = None, lease = None))]
    fn new(
        py: Python<'_>,
        capacity: Option<usize>,
        retention: Option<f64>,
        lease: Option<f64>,
    ) -> PyResult<Self> {
        let mut b = idempotency::MemoryStore::builder();
        if let Some(n) = capacity {
            b = b.capacity(n);
        }
        if let Some(s) = retention {
            b = b.retention(seconds(py, "retention", s)?);
        }
        if let Some(s) = lease {
            b = b.lease(seconds(py, "lease", s)?);
        }
        let inner = b
            .build()
            .map_err(|e| crate::errors::config_error(py, e.to_string()))?;
        Ok(MemoryStore { inner })
    }

    /// The store's counters, by name.
    fn metrics(&self) -> Vec<(&'static str, u64)> {
        counters(&self.inner.metrics())
    }
}

/// The `processed_events` table of a PostgreSQL database, shared by every
/// consumer that uses it.
#[cfg(feature = "postgres")]
#[pyclass(frozen, module = "xzepr_consumer._native")]
pub(crate) struct PostgresStore {
    inner: idempotency::IdempotencyGuard,
    /// The retention cleanup, stopped with the store.
    cleanup: Option<tokio::task::AbortHandle>,
}

#[cfg(feature = "postgres")]
impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Some(task) = self.cleanup.take() {
            task.abort();
        }
    }
}

#[cfg(feature = "postgres")]
#[pymethods]
impl PostgresStore {
    /// Opens a pool of at most `max_connections` on `dsn`, creates the table
    /// if `migrate` (under an advisory lock), and resolves to the store. With
    /// `cleanup_interval`, keys older than the retention are deleted that often.
    #[staticmethod]
    #[pyo3(signature = (
        dsn, *, retention = None, lease = None, max_connections = 8, migrate = true,
        cleanup_interval = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn connect<'py>(
        py: Python<'py>,
        dsn: String,
        retention: Option<f64>,
        lease: Option<f64>,
        max_connections: u32,
        migrate: bool,
        cleanup_interval: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let retention = retention.map(|s| seconds(py, "retention", s)).transpose()?;
        let lease = lease.map(|s| seconds(py, "lease", s)).transpose()?;
        let every = cleanup_interval
            .map(|s| seconds(py, "cleanup_interval", s))
            .transpose()?;
        crate::bridge::awaitable(py, async move {
            let failed = |what: &str, e: &dyn std::fmt::Display| {
                Failure::Consumer(format!("PostgreSQL {what}: {e}"))
            };
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(max_connections)
                .connect(&dsn)
                .await
                .map_err(|e| failed("connect", &e))?;
            if migrate {
                // The core's `migrate` future is not `Send` for every lifetime
                // (rustc cannot prove it through sqlx's executor bounds), so it
                // cannot be awaited in a spawned task: it runs to its end on a
                // blocking thread instead.
                let p = pool.clone();
                let rt = tokio::runtime::Handle::current();
                tokio::task::spawn_blocking(move || {
                    rt.block_on(idempotency::IdempotencyGuard::migrate(&p))
                })
                .await
                .map_err(|e| failed("migrate", &e))?
                .map_err(|e| failed("migrate", &e))?;
            }
            let mut b = idempotency::IdempotencyGuard::builder(pool);
            if let Some(r) = retention {
                b = b.retention(r);
            }
            if let Some(l) = lease {
                b = b.lease(l);
            }
            let inner = b.build().map_err(|e| Failure::Consumer(e.to_string()))?;
            let cleanup = every.map(|every| inner.spawn_cleanup(every).abort_handle());
            Ok::<_, Failure>(PostgresStore { inner, cleanup })
        })
    }

    /// The store's counters, by name.
    fn metrics(&self) -> Vec<(&'static str, u64)> {
        counters(&self.inner.metrics())
    }
}

/// A store given to a consumer.
pub(crate) enum Store {
    Memory(idempotency::MemoryStore),
    #[cfg(feature = "postgres")]
    Postgres(idempotency::IdempotencyGuard),
}

impl<'a, 'py> FromPyObject<'a, 'py> for Store {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(m) = obj.cast::<MemoryStore>() {
            return Ok(Store::Memory(m.get().inner.clone()));
        }
        #[cfg(feature = "postgres")]
        if let Ok(p) = obj.cast::<PostgresStore>() {
            return Ok(Store::Postgres(p.get().inner.clone()));
        }
        Err(PyTypeError::new_err(
            "idempotency: expected a MemoryStore or a PostgresStore",
        ))
    }
}

impl Store {
    pub(crate) fn apply(self, builder: PipelineBuilder) -> PipelineBuilder {
        match self {
            Store::Memory(s) => builder.idempotency(s),
            #[cfg(feature = "postgres")]
            Store::Postgres(s) => builder.idempotency(s),
        }
    }
}

/// Whether this build has the PostgreSQL store.
#[pyfunction]
pub(crate) fn has_postgres() -> bool {
    cfg!(feature = "postgres")
}
