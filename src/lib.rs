#![doc = include_str!("../README.md")]
//!
//! # Architecture
//!
//! ```text
//!  Kafka ──> source ──> decode ──> dispatch ──> handler ──> report ──> offsets ──> commit
//! ```
//!
//! | stage | module | what it does |
//! | --- | --- | --- |
//! | source | [`source`] | one OS thread owns the `BaseConsumer`, copies each payload once, stashes what a full queue cannot take and pauses partitions over the stash budget |
//! | decode | [`decode`] | borrowed [`decode::CloudEvent`] views into that one copy; `data` decoded only on demand |
//! | dispatch | [`dispatch`] | type filter; which worker queue an event goes to (ordering modes) |
//! | handler | [`handler`], [`pipeline`] | the user's work on worker threads; lifecycle acks gate each offset |
//! | report | [`client`], [`report`] | pooled XZepr REST client; bounded, coalescing, retrying lifecycle reporter |
//! | idempotency | [`idempotency`] | which event keys were processed (PostgreSQL `processed_events` behind feature `postgres`, or in memory); claims with a lease, batched statements, retention cleanup |
//! | offsets | [`offsets`] | per-partition tracker; commits only the contiguous run of finished offsets |
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
pub mod offsets;
pub mod pipeline;
pub mod report;
pub mod source;

pub use error::{Error, Result};
