//! `xzepr_consumer._native`: the Python package's bindings to the Rust core.
//!
//! ```text
//!  Kafka ─> Rust pipeline (poll thread, decode, lanes, offsets, reporter)
//!              │ each event's future (tokio) ──push──> Inbox ──take()──> asyncio loop
//!              │                                                         (handler tasks)
//!              └──<── Token.done()/fail() (oneshot, no GIL wait) ──<────────┘
//! ```
//!
//! | module | what it binds |
//! | --- | --- |
//! | [`consumer`] | the pipeline with the asyncio bridge, `decode` |
//! | [`client`] | the XZepr REST client (awaitables on the shared tokio runtime) |
//! | [`config`] | `KafkaConsumerConfig` from the `XZEPR_KAFKA_*` environment |
//! | [`convert`] | owned messages into the package's dataclasses, JSON values both ways |
//! | [`errors`] | Rust errors into the package's exception classes |
//! | `devstack` | the embedded broker and XZepr stand-in (feature `dev-stack`) |
//!
//! The GIL is never held while waiting: every wait is a tokio future handed to
//! asyncio (`future_into_py`), or runs under `Python::detach`.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms, missing_debug_implementations)]
#![warn(clippy::unwrap_used)]

mod client;
mod config;
mod consumer;
mod convert;
#[cfg(feature = "dev-stack")]
mod devstack;
mod errors;

use pyo3::prelude::*;

/// The tokio runtime shared by the pipeline's async handlers, the reporter and
/// the client: pyo3-async-runtimes' global one, so its futures and ours agree.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    pyo3_async_runtimes::tokio::get_runtime()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Two worker threads: the runtime only waits on sockets and channels; the
    // CPU-bound parts run on the pipeline's own threads and on the asyncio loop.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(2)
        .thread_name("xzepr-py-tokio")
        .enable_all();
    pyo3_async_runtimes::tokio::init(builder);
    m.add_class::<client::Client>()?;
    m.add_class::<consumer::Consumer>()?;
    m.add_class::<consumer::Token>()?;
    m.add_function(wrap_pyfunction!(consumer::decode, m)?)?;
    m.add_function(wrap_pyfunction!(convert::parse_timestamp, m)?)?;
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
    }
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
