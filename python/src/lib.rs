//! `xzepr_consumer._native`: the Python package's bindings to the Rust core.
//!
//! ```text
//!  Kafka ─> Pipeline::run (poll thread, decode, lanes, retry, dead letters,
//!           idempotency, offsets, reporter, metrics endpoint)
//!              │ each event's future (tokio) ──push──> Inbox ──take()──> asyncio loop
//!              │                                                         (handler tasks)
//!              └──<── Token.done()/fail() (oneshot, no GIL wait) ──<────────┘
//! ```
//!
//! | module | what it binds |
//! | --- | --- |
//! | [`bridge`] | asyncio futures completed from tokio without taking the GIL there |
//! | [`consumer`] | `Pipeline::run` with its handler on the asyncio loop, `decode` |
//! | [`inbox`] | the handler's futures parking events for the loop, and their answers |
//! | [`settings`] | the pipeline's settings: JSON read by `PipelineConfig::from_json` |
//! | [`idempotency`] | the in-memory and PostgreSQL idempotency stores |
//! | [`replay`] | `offsets show`/`reset` and `redrive`, the incident tools |
//! | [`client`] | the XZepr REST client (awaitables on the shared tokio runtime) |
//! | [`config`] | `KafkaConsumerConfig` from the `XZEPR_KAFKA_*` environment |
//! | [`trace`] | `init_tracing()`: the core's OTLP export from the `OTEL_*` variables (feature `otel`) |
//! | [`convert`] | owned messages into the package's dataclasses, JSON values both ways |
//! | [`errors`] | Rust errors into the package's exception classes |
//! | `devstack` | the embedded broker and XZepr stand-in (feature `dev-stack`) |
//!
//! The GIL is never held while waiting: every wait is a tokio future handed to
//! asyncio ([`bridge::awaitable`]), or runs under `Python::detach`. And no tokio
//! thread ever takes the GIL: interpreter shutdown would end such a thread with
//! `pthread_exit`, which aborts a Rust process (see [`bridge`]).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms, missing_debug_implementations)]
#![warn(clippy::unwrap_used)]

mod bridge;
mod client;
mod config;
mod consumer;
mod convert;
#[cfg(feature = "dev-stack")]
mod devstack;
mod errors;
mod idempotency;
mod inbox;
mod replay;
mod settings;
mod trace;

use std::sync::OnceLock;

use pyo3::prelude::*;

/// The tokio runtime shared by the pipeline's async handlers, the reporter and
/// the client. Two worker threads: it only waits on sockets and channels; the
/// CPU-bound parts run on the pipeline's own threads and on the asyncio loop.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("xzepr-py-tokio")
            .enable_all()
            .build()
            // Only fails when the OS refuses threads or an epoll descriptor:
            // nothing can run then.
            .expect("cannot start the tokio runtime")
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<bridge::Completions>()?;
    m.add_class::<client::Client>()?;
    m.add_class::<consumer::Consumer>()?;
    m.add_class::<inbox::Token>()?;
    m.add_class::<idempotency::MemoryStore>()?;
    #[cfg(feature = "postgres")]
    m.add_class::<idempotency::PostgresStore>()?;
    m.add_function(wrap_pyfunction!(idempotency::has_postgres, m)?)?;
    m.add_function(wrap_pyfunction!(settings::setting_names, m)?)?;
    m.add_function(wrap_pyfunction!(settings::default_settings, m)?)?;
    m.add_function(wrap_pyfunction!(settings::resolve_settings, m)?)?;
    m.add_function(wrap_pyfunction!(consumer::decode, m)?)?;
    m.add_function(wrap_pyfunction!(replay::offsets_show, m)?)?;
    m.add_function(wrap_pyfunction!(replay::offsets_reset, m)?)?;
    m.add_function(wrap_pyfunction!(replay::redrive, m)?)?;
    m.add_function(wrap_pyfunction!(consumer::metric_names, m)?)?;
    m.add_function(wrap_pyfunction!(convert::parse_timestamp, m)?)?;
    m.add_function(wrap_pyfunction!(trace::has_otel, m)?)?;
    m.add_function(wrap_pyfunction!(trace::init_tracing, m)?)?;
    m.add_function(wrap_pyfunction!(trace::tracing_active, m)?)?;
    m.add_function(wrap_pyfunction!(trace::flush_tracing, m)?)?;
    m.add_function(wrap_pyfunction!(trace::shutdown_tracing, m)?)?;
    m.add_function(wrap_pyfunction!(config::kafka_config_from_env, m)?)?;
    m.add_function(wrap_pyfunction!(config::check_kafka_config, m)?)?;
    m.add_function(wrap_pyfunction!(client::client_config_from_env, m)?)?;
    #[cfg(feature = "dev-stack")]
    {
        m.add_class::<devstack::DevStack>()?;
        m.add_class::<devstack::StandIn>()?;
        m.add_function(wrap_pyfunction!(devstack::produce, m)?)?;
        m.add_function(wrap_pyfunction!(devstack::generate_events, m)?)?;
        m.add_function(wrap_pyfunction!(devstack::committed_offsets, m)?)?;
        m.add_function(wrap_pyfunction!(devstack::read_topic, m)?)?;
    }
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
