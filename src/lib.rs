#![doc = include_str!("../README.md")]
//!
//! # Architecture
//!
//! ```text
//!  Kafka ──> source ──> lanes ──> execute ──> handler ──> complete ──> report ──> offsets ──> commit
//!            (poll      (dispatch  (sync pool   (yours)    (acks gate   (XZepr    (contiguous
//!             thread)    ::lanes)   or tasks)               the offset)  posts)    finished run)
//! ```
//!
//! | stage | module | what it does |
//! | --- | --- | --- |
//! | source | [`source`] | one OS thread owns the `BaseConsumer`, copies each payload once, tracks offsets, pauses partitions while the buffers are over budget, drains and commits on revoke and shutdown |
//! | decode | [`decode`] | borrowed [`decode::CloudEvent`] views into that one copy; `data` decoded only on demand |
//! | dispatch | [`dispatch`], [`dispatch::lanes`] | type filter; the lane scheduler: what may run next under the ordering mode, up to `max_in_flight` |
//! | execute | [`pipeline`] (`execute`) | sync handlers on a worker pool, async handlers as tokio tasks; panics caught, timeouts applied |
//! | handler | [`handler`] | the user's work: [`handler::Handler`], [`handler::AsyncHandler`], [`handler::MessageHandler`] |
//! | complete | [`pipeline`] (`complete`) | lifecycle acks gate each offset; malformed-message policy |
//! | report | [`client`], [`report`] | pooled XZepr REST client; bounded, coalescing, retrying lifecycle reporter |
//! | idempotency | [`idempotency`] | which event keys were processed (PostgreSQL `processed_events` behind feature `postgres`, or in memory); claims with a lease, batched statements, retention cleanup |
//! | offsets | [`offsets`], [`offsets::progress`] | per-partition tracker; commits only the contiguous run of finished offsets, with the offsets finished above it as a completion map in the commit's metadata |
//! | observe | [`observe`] | Prometheus metrics read from the stages' counters at scrape time; health and readiness; the `/metrics`, `/health`, `/ready` endpoint |
//!
//! Configuration lives in [`config`]; every module has its own error enum, gathered in [`Error`].
#![deny(unsafe_code)]
#![deny(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub,
    rustdoc::broken_intra_doc_links
)]
#![warn(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod client;
pub mod config;
pub mod decode;
#[cfg(feature = "dev-stack")]
pub mod devstack;
pub mod dispatch;
mod error;
#[cfg(feature = "dev-stack")]
pub mod generate;
pub mod handler;
pub mod idempotency;
pub mod metrics;
pub mod observe;
pub mod offsets;
pub mod pipeline;
pub mod report;
pub mod source;

pub use error::{Error, Result};
