//! `bench --traces`: spans exported to a local OTLP endpoint.

use crate::baseline::anyhow_like::Result;

/// For `bench --traces`: a local OTLP endpoint answering at once (on a
/// runtime of its own, kept while the bench runs) and the export to it.
pub fn traces() -> Result<(tokio::runtime::Runtime, xzepr_consumer::trace::TraceGuard)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let url = super::forward::zero_ms_endpoint(&rt)?;
    // Before any thread reads the environment: the subscriber is not set yet.
    std::env::set_var(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        format!("{url}v1/traces"),
    );
    let guard = xzepr_consumer::trace::init_from_env()?.ok_or("traces are disabled by OTEL_*")?;
    Ok((rt, guard))
}
