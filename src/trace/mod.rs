//! Distributed traces: the W3C trace context each event arrives with, and the
//! spans of its flow.
//!
//! ```text
//!  producer span (Kafka `traceparent`, or the CloudEvent's `traceparent` extension)
//!   └─ process {topic}           one per event (consumer side of the messaging conventions)
//!       ├─ idempotency claim
//!       ├─ handler attempt       one per attempt; the handler runs inside it
//!       ├─ dead letter
//!       └─ lifecycle post        one per post of `started` / `completed` / `failed`,
//!                                its context sent to XZepr as the `traceparent` header
//! ```
//!
//! Always here: [`TraceContext`] (parse and format the `traceparent` and
//! `tracestate` headers) and [`current`], which `run --forward` and `run
//! --exec` use to pass the context on. The spans and their export need feature
//! `otel`: [`init_from_env`] reads the standard `OTEL_*` variables and returns
//! a [`TraceGuard`] whose [`TraceGuard::layer`] goes into the service's
//! `tracing` subscriber, and
//! [`PipelineBuilder::traces`](crate::pipeline::PipelineBuilder::traces)
//! turns the spans on in the flow. Without the feature the flow holds no span
//! at all (the type is empty and its methods do nothing); with it and traces
//! off, a span is `tracing::Span::none()`.
//!
//! # In a handler
//! The handler runs inside its attempt's span (a sync handler while it is
//! called, an async one at every poll of its future), so
//! `tracing::Span::current()` is that span, a handler's own `tracing` spans
//! are its children, and
//! `tracing_opentelemetry::OpenTelemetrySpanExt::context(&Span::current())`
//! is its OpenTelemetry context. [`current`] gives it as a [`TraceContext`],
//! ready for an outgoing request's `traceparent` header.

use std::fmt;

#[cfg(feature = "otel")]
mod otel;
mod span;

#[cfg(feature = "otel")]
pub use otel::{init_from_env, Error, TraceGuard};
pub(crate) use span::{Consumed, EventSpans, Span};

/// The Kafka header (and CloudEvents extension attribute) of the W3C parent.
pub const TRACEPARENT: &str = "traceparent";
/// The Kafka header (and CloudEvents extension attribute) of the vendor state.
pub const TRACESTATE: &str = "tracestate";

/// A W3C trace context: `traceparent` (version 00) and its `tracestate`.
#[derive(Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace's id (16 bytes, not all zero).
    pub trace_id: [u8; 16],
    /// The parent span's id (8 bytes, not all zero).
    pub span_id: [u8; 8],
    /// Trace flags; bit 0 is `sampled`.
    pub flags: u8,
    /// The `tracestate` header as received, if any.
    pub state: Option<String>,
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TraceContext")
            .field(&self.traceparent())
            .field(&self.state)
            .finish()
    }
}

impl TraceContext {
    /// Parses a `traceparent` value: `00-{32 hex}-{16 hex}-{2 hex}`. A later
    /// version is read by its first four fields, as the W3C spec asks.
    /// `None` for anything else, or an all-zero id.
    pub fn parse(traceparent: &[u8], tracestate: Option<&[u8]>) -> Option<Self> {
        let t = traceparent.trim_ascii();
        if t.len() < 55 || t[2] != b'-' || t[35] != b'-' || t[52] != b'-' {
            return None;
        }
        let version = hex_byte(t[0], t[1])?;
        // Version ff is invalid; 00 is exactly 55 bytes; later ones may extend.
        if version == 0xff || (version == 0 && t.len() != 55) || (t.len() > 55 && t[55] != b'-') {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        hex_into(&t[3..35], &mut trace_id)?;
        hex_into(&t[36..52], &mut span_id)?;
        let flags = hex_byte(t[53], t[54])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let state = tracestate
            .and_then(|s| std::str::from_utf8(s).ok())
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
            state,
        })
    }

    /// The producer's context of a Kafka record: the `traceparent` /
    /// `tracestate` headers, else the CloudEvent's distributed-tracing
    /// extension (binary mode `ce_traceparent`, or the structured envelope's
    /// `traceparent`). The Kafka header wins: it is the last hop's, set by an
    /// instrumented producer, where the extension is the event's creation.
    pub fn of_record(
        headers: &[(&str, &[u8])],
        ce_traceparent: Option<&str>,
        ce_tracestate: Option<&str>,
    ) -> Option<Self> {
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        };
        header(TRACEPARENT)
            .and_then(|tp| Self::parse(tp, header(TRACESTATE)))
            .or_else(|| Self::parse(ce_traceparent?.as_bytes(), ce_tracestate.map(str::as_bytes)))
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }

    /// Whether the `sampled` flag is set.
    pub fn is_sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The `traceparent` header's value (version 00).
    pub fn traceparent(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        s.push_str(&self.trace_id_hex());
        s.push('-');
        s.push_str(&self.span_id_hex());
        s.push('-');
        s.push_str(&hex(&[self.flags]));
        s
    }

    /// The `(name, value)` pairs to send on: `traceparent`, and `tracestate`
    /// when there is one.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, String)> + '_ {
        std::iter::once((TRACEPARENT, self.traceparent()))
            .chain(self.state.iter().map(|s| (TRACESTATE, s.clone())))
    }
}

/// The context of the current span (a handler's attempt, inside the flow),
/// to pass on to the next hop; `None` without feature `otel`, with traces off,
/// or outside any span.
pub fn current() -> Option<TraceContext> {
    #[cfg(feature = "otel")]
    {
        otel::context_of(&tracing::Span::current())
    }
    #[cfg(not(feature = "otel"))]
    {
        None
    }
}

fn hex_nibble(b: u8) -> Option<u8> {
    // Lowercase only: the W3C spec refuses uppercase hex.
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(hi: u8, lo: u8) -> Option<u8> {
    Some(hex_nibble(hi)? << 4 | hex_nibble(lo)?)
}

fn hex_into(text: &[u8], out: &mut [u8]) -> Option<()> {
    for (o, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *o = hex_byte(pair[0], pair[1])?;
    }
    Some(())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_w3c_example() {
        let c = TraceContext::parse(TP.as_bytes(), Some(b" congo=t61rcWkgMzE ")).unwrap();
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.span_id_hex(), "00f067aa0ba902b7");
        assert!(c.is_sampled());
        assert_eq!(c.traceparent(), TP);
        assert_eq!(c.state.as_deref(), Some("congo=t61rcWkgMzE"));
        let sent: Vec<_> = c.headers().collect();
        assert_eq!(sent.len(), 2);
    }

    #[test]
    fn refuses_what_the_spec_refuses() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad.as_bytes(), None), None, "{bad}");
        }
        // A later version may carry more fields after a dash.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what";
        let c = TraceContext::parse(later.as_bytes(), None).unwrap();
        assert!(!c.is_sampled());
    }

    #[test]
    fn the_kafka_header_wins_over_the_cloudevent_extension() {
        let other = "00-11111111111111111111111111111111-2222222222222222-01";
        let headers = [("TraceParent", TP.as_bytes())];
        let c = TraceContext::of_record(&headers, Some(other), None).unwrap();
        assert_eq!(c.traceparent(), TP);
        let c = TraceContext::of_record(&[], Some(other), Some("a=b")).unwrap();
        assert_eq!(c.traceparent(), other);
        assert_eq!(c.state.as_deref(), Some("a=b"));
        // A broken header falls back to the extension.
        let broken = [("traceparent", &b"junk"[..])];
        let c = TraceContext::of_record(&broken, Some(other), None).unwrap();
        assert_eq!(c.traceparent(), other);
        assert_eq!(TraceContext::of_record(&[], None, None), None);
    }
}
