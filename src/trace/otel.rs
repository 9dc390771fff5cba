//! Export over OTLP/HTTP (protobuf), configured by the standard `OTEL_*`
//! variables, through the crate's own pooled hyper client: no second HTTP
//! stack, no gRPC.

use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::Context;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use super::TraceContext;
use crate::client::{HttpTransport, TransportConfig};

/// The `tracing` target of the flow's spans.
pub(crate) const TARGET: &str = "xzepr_consumer::trace";

/// The service name when neither `OTEL_SERVICE_NAME` nor a `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES` gives one.
const DEFAULT_SERVICE_NAME: &str = "xzepr-consumer";

/// An export's bound when `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` /
/// `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds) say nothing: the SDK's default.
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// A collector's answer is read up to this size (it is a few bytes).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why traces could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` (or its traces variant) names a protocol
    /// this build does not speak (only `http/protobuf`).
    #[error("OTLP protocol `{protocol}` is not supported; use http/protobuf")]
    Protocol {
        /// The protocol asked for.
        protocol: String,
    },
    /// The exporter refused its configuration (an endpoint that is no URL, say).
    #[error("the OTLP exporter could not be built")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    /// The HTTP client could not be built.
    #[error("the OTLP HTTP client could not be built")]
    Transport(#[source] crate::client::ClientError),
    /// The exporter's runtime thread could not be started.
    #[error("the OTLP exporter's runtime could not be started")]
    Runtime(#[source] std::io::Error),
}

/// The tracer provider set up by [`init_from_env`]. Dropping it flushes the
/// spans not yet exported (bounded by the export timeout) and stops the export.
#[derive(Debug)]
pub struct TraceGuard {
    provider: SdkTracerProvider,
}

impl TraceGuard {
    /// The `tracing` layer that turns spans into OpenTelemetry spans exported
    /// by this guard's provider: add it to the service's subscriber.
    pub fn layer<S>(&self) -> impl Layer<S>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("xzepr-consumer"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    }

    /// The provider, for a service that makes its own tracers.
    pub fn provider(&self) -> &SdkTracerProvider {
        &self.provider
    }

    /// Exports every span ended so far, waiting for the collector's answers.
    pub fn flush(&self) {
        if let Err(e) = self.provider.force_flush() {
            tracing::debug!(error = %e, "Trace flush failed.");
        }
    }
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "Trace export shutdown failed.");
        }
    }
}

/// Sets up span export from the standard variables, or returns `None` when
/// they ask for none: no `OTEL_EXPORTER_OTLP_ENDPOINT` nor
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_SDK_DISABLED=true`, or
/// `OTEL_TRACES_EXPORTER=none`.
///
/// Read: the endpoints (`/v1/traces` appended to the general one),
/// `OTEL_EXPORTER_OTLP[_TRACES]_HEADERS`, `_TIMEOUT`, `_PROTOCOL`
/// (`http/protobuf` only), `OTEL_SERVICE_NAME` (default `xzepr-consumer`),
/// `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `_ARG`, and the
/// batch processor's `OTEL_BSP_*`. Spans go out in batches from the SDK's own
/// thread, over the crate's hyper client on a one-thread runtime of its own,
/// so an export never waits on the pipeline's runtime nor it on an export.
///
/// Then add [`TraceGuard::layer`] to the `tracing` subscriber and turn the
/// flow's spans on with
/// [`PipelineBuilder::traces`](crate::pipeline::PipelineBuilder::traces).
///
/// # Errors
/// [`Error::Protocol`] for `grpc` or `http/json`; [`Error::Exporter`] for a
/// bad endpoint; [`Error::Transport`] / [`Error::Runtime`] if the client or
/// its thread cannot be made.
pub fn init_from_env() -> Result<Option<TraceGuard>, Error> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let wanted = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    if !wanted || disabled {
        return Ok(None);
    }
    let protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".to_owned());
    if protocol != "http/protobuf" {
        return Err(Error::Protocol { protocol });
    }
    let timeout = var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
        .or_else(|| var("OTEL_EXPORTER_OTLP_TIMEOUT"))
        .and_then(|ms| ms.trim().parse().ok())
        .map_or(DEFAULT_EXPORT_TIMEOUT, Duration::from_millis);
    let client = OtlpClient::new(timeout)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(timeout)
        .build()
        .map_err(Error::Exporter)?;
    let named = var("OTEL_SERVICE_NAME").is_some()
        || var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    let mut resource = Resource::builder();
    if !named {
        resource = resource.with_service_name(DEFAULT_SERVICE_NAME);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    Ok(Some(TraceGuard { provider }))
}

/// Makes `parent` (a remote context) the parent of `span`.
pub(crate) fn set_parent(span: &tracing::Span, parent: &TraceContext) {
    let state = parent
        .state
        .as_deref()
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    let context = SpanContext::new(
        TraceId::from_bytes(parent.trace_id),
        SpanId::from_bytes(parent.span_id),
        TraceFlags::new(parent.flags),
        true,
        state,
    );
    // Refused only for a span no layer records: then there is nothing to parent.
    let _ = span.set_parent(Context::new().with_remote_span_context(context));
}

/// `span`'s OpenTelemetry context as a [`TraceContext`]; `None` for a span
/// no OpenTelemetry layer records.
pub(crate) fn context_of(span: &tracing::Span) -> Option<TraceContext> {
    if span.is_none() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return None;
    }
    let state = sc.trace_state().header();
    Some(TraceContext {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
        flags: sc.trace_flags().to_u8(),
        state: (!state.is_empty()).then_some(state),
    })
}

/// The exporter's HTTP client: the crate's pooled hyper transport, driven by
/// a one-thread runtime of its own (the SDK exports from its own thread,
/// outside any runtime).
#[derive(Debug)]
struct OtlpClient {
    http: HttpTransport,
    runtime: Option<tokio::runtime::Runtime>,
    timeout: Duration,
}

impl OtlpClient {
    fn new(timeout: Duration) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        // Few connections: one batch at a time goes out.
        let config = TransportConfig::default().with_pool_max_idle_per_host(2);
        let http = HttpTransport::new(&config).map_err(Error::Transport)?;
        Ok(OtlpClient {
            http,
            runtime: Some(runtime),
            timeout,
        })
    }
}

impl Drop for OtlpClient {
    /// The client may be dropped on any thread, a runtime's among them,
    /// where a blocking shutdown would panic.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let Some(runtime) = &self.runtime else {
            return Err("the OTLP client is shut down".into());
        };
        let (http, timeout) = (self.http.clone(), self.timeout);
        let exchange = async move {
            let answer = async {
                let response = http.send(request).await?;
                let (head, body) = response.into_parts();
                let body = http_body_util::Limited::new(body, MAX_ANSWER_BYTES)
                    .collect()
                    .await?
                    .to_bytes();
                Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(head, body))
            };
            match tokio::time::timeout(timeout, answer).await {
                Ok(answer) => answer,
                Err(_) => Err(format!("no answer within {timeout:?}").into()),
            }
        };
        // Awaited from the SDK's thread: the task runs on the client's runtime.
        runtime.spawn(exchange).await?
    }
}
