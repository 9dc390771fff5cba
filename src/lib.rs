#![doc = include_str!("../README.md")]
//!
//! # Architecture
//!
//! ```text
//!            ┌──────────── poll thread (source) ─────────────┐
//!  Kafka ──> │ poll ─> copy once ─> lanes ─> jobs ────────────┼──> one event flow (pipeline::flow)
//!            │  ^        (borrowed   (order,   (max_in_flight)│      decode ─> filter ─> claim ─> started
//!            │  │         views)      budget share)           │      ─> attempts (retry) ─> dead letter
//!  commit <──┼─ offsets <─ completions <──────────────────────┼───── ─> terminal post (report) ─> finished
//!            └───────────────────────────────────────────────┘
//! ```
//!
//! The poll thread never blocks on a handler: jobs go out, completions come
//! back to it, and it alone moves each partition's commit point (the
//! contiguous run of finished offsets, plus a completion map of what finished
//! above it) and commits.
//!
//! | stage | module | what it does |
//! | --- | --- | --- |
//! | source | [`source`] | one OS thread owns the `BaseConsumer`, copies each payload once, pauses only the partitions over their share of the budget, takes completions back, drains and commits on revoke and shutdown, detects stalls |
//! | decode | [`decode`] | borrowed [`decode::CloudEvent`] views into that one copy; `data` decoded only on demand |
//! | dispatch | [`dispatch`] | type filter, the service's own receivers, and the lane scheduler: what may run next under the ordering mode, up to `max_in_flight` |
//! | flow | [`pipeline`] (`flow`, `execute`) | one per-event flow for every handler; the sync/async difference is how an attempt runs (worker thread or tokio task), with panics caught and timeouts applied |
//! | handler | [`handler`] | the user's work: [`handler::Handler`], [`handler::AsyncHandler`], [`handler::MessageHandler`]; a lane's run in one call: [`handler::BatchHandler`], [`handler::AsyncBatchHandler`] |
//! | lifecycle | [`pipeline`] (`delivery`, `complete`, `deadletter`, `guard`, `sink`) | a message with its offset's fate; acknowledgements gate each offset; malformed-message policy; dead letters; idempotency claims |
//! | report | [`client`], [`report`] | pooled XZepr REST client ([`client::HttpTransport`]) and receiver discovery; the lifecycle vocabulary ([`client::Status`], [`report::OwnedWork`]); bounded, coalescing, retrying lifecycle reporter with a breaker |
//! | idempotency | [`idempotency`] | which event keys were processed (PostgreSQL `processed_events` behind feature `postgres`, or in memory); claims with a lease, batched statements, retention cleanup |
//! | offsets | [`offsets`] | per-partition tracker; commits only the contiguous run of finished offsets, with the offsets finished above it as a completion map in the commit's metadata |
//! | replay | [`source::StartFrom`], [`offsets::admin`], [`pipeline::Redrive`] | after an incident: where a group without committed offsets starts (a time, via `offsets_for_times`); a stopped group's offsets shown and moved from outside it; dead letters produced back to their topics, committed only once acknowledged |
//! | trace | [`trace`] | the W3C context each event came with; with feature `otel`, a span per event and per step (claim, attempts, dead letter, lifecycle posts), exported over OTLP/HTTP |
//! | flow control | [`flow_control`] | one concurrency [`flow_control::Limiter`] (fixed, or adaptive: AIMD on latency, timeouts, 429/503 and `Retry-After`) for the reporter's posts, async handlers and `run --forward`; the token bucket ([`flow_control::RateLimit`]) the lanes take a token from per event |
//! | observe | [`observe`], [`metrics`] | counters the stages write; Prometheus text read from them at scrape time; health and readiness; the `/metrics`, `/health`, `/ready` endpoint |
//! | run | [`pipeline`] | [`pipeline::PipelineConfig`] (every setting, `serde`), [`pipeline::PipelineBuilder::build`], [`pipeline::Pipeline::run`] (receiver discovery, reporting, drain) |
//!
//! Configuration lives in [`config`] (Kafka, durations) and
//! [`pipeline::PipelineConfig`]; every module has its own error enum, gathered
//! in [`Error`]. With feature `dev-stack`, `devstack` embeds a mock Kafka
//! cluster and an XZepr stand-in and `generate` makes realistic events.
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
pub mod flow_control;
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
pub mod trace;

pub use error::{Error, ErrorChain, Result};

/// Every page under `docs/`, compiled and run as doctests so each Rust snippet
/// in them builds against this crate (`tests/docs.rs` fails on a page missing
/// here). Pages whose snippets need a feature are included only with it.
#[cfg(doctest)]
mod doc_pages {
    macro_rules! pages {
        ($($(#[$cfg:meta])* $name:ident = $path:literal;)*) => {$(
            $(#[$cfg])*
            #[doc = include_str!(concat!("../docs/", $path))]
            struct $name;
        )*};
    }
    pages! {
        ExplanationArchitecture = "explanation/architecture.md";
        ExplanationBackpressure = "explanation/backpressure.md";
        ExplanationCompletionMap = "explanation/completion-map.md";
        ExplanationDecoding = "explanation/decoding.md";
        ExplanationDeliverySemantics = "explanation/delivery-semantics.md";
        ExplanationFlowControl = "explanation/flow-control.md";
        #[cfg(feature = "postgres")]
        ExplanationIdempotency = "explanation/idempotency.md";
        ExplanationMembership = "explanation/membership.md";
        HowToBatchHandlers = "how-to/batch-handlers.md";
        HowToFailures = "how-to/failures.md";
        HowToIntegrateDownstreamService = "how-to/integrate_downstream_service.md";
        HowToKafkaAuthentication = "how-to/kafka-authentication.md";
        HowToKubernetes = "how-to/kubernetes.md";
        HowToLongDelayRetries = "how-to/long-delay-retries.md";
        HowToNonRustServices = "how-to/non-rust-services.md";
        HowToOperating = "how-to/operating.md";
        HowToPython = "how-to/python.md";
        HowToRedriveAfterAFix = "how-to/redrive-after-a-fix.md";
        HowToReplayAfterABadDeploy = "how-to/replay-after-a-bad-deploy.md";
        HowToReplayAndRedrive = "how-to/replay-and-redrive.md";
        #[cfg(feature = "otel")]
        HowToTracing = "how-to/tracing.md";
        HowToTroubleshooting = "how-to/troubleshooting.md";
        HowToTuning = "how-to/tuning.md";
        Performance = "performance.md";
        ReferenceCli = "reference/cli.md";
        ReferenceEnvironment = "reference/environment.md";
        ReferenceErrors = "reference/errors.md";
        ReferenceFailures = "reference/failures.md";
        ReferenceLifecycleEvents = "reference/lifecycle-events.md";
        ReferenceMetrics = "reference/metrics.md";
        ReferenceSettings = "reference/settings.md";
        TutorialsFirstConsumer = "tutorials/first-consumer.md";
    }
}
