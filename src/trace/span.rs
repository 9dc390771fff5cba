//! The flow's spans, behind one type: empty without feature `otel`, a
//! `tracing::Span` with it (`Span::none()` while traces are off, so each step
//! costs a branch).

use std::future::Future;
use std::sync::Arc;

use super::TraceContext;

/// Traces are on: what each event's span carries besides its message.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) struct EventSpans {
    /// `messaging.consumer.group.name`.
    pub(crate) group: Arc<str>,
}

/// What the event's span says about its message.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) struct Consumed<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) message_id: &'a str,
}

/// One span of an event's flow, or none.
#[derive(Clone, Debug)]
pub(crate) struct Span {
    #[cfg(feature = "otel")]
    inner: tracing::Span,
}

#[cfg(not(feature = "otel"))]
#[allow(clippy::unused_self)]
impl Span {
    #[inline(always)]
    pub(crate) fn event(
        _spans: Option<&EventSpans>,
        _m: &Consumed<'_>,
        _parent: impl FnOnce() -> Option<TraceContext>,
    ) -> Self {
        Span {}
    }

    #[inline(always)]
    pub(crate) fn child(&self, _name: &'static str) -> Self {
        Span {}
    }

    /// Without spans the record's context goes on as it came.
    #[inline(always)]
    pub(crate) fn post(
        parent: Option<&TraceContext>,
        _status: &'static str,
    ) -> (Self, Option<TraceContext>) {
        (Span {}, parent.cloned())
    }

    #[inline(always)]
    pub(crate) fn context(&self) -> Option<TraceContext> {
        None
    }

    #[inline(always)]
    pub(crate) fn failed(&self, _message: &str) {}

    #[inline(always)]
    pub(crate) fn instrument<F: Future>(&self, f: F) -> F {
        f
    }
}

#[cfg(feature = "otel")]
impl Span {
    #[inline]
    pub(crate) fn none() -> Self {
        Span {
            inner: tracing::Span::none(),
        }
    }

    /// The event's span (`process {topic}`, kind consumer), child of the
    /// producer's context when the record carries one.
    pub(crate) fn event(
        spans: Option<&EventSpans>,
        m: &Consumed<'_>,
        parent: impl FnOnce() -> Option<TraceContext>,
    ) -> Self {
        let Some(spans) = spans else {
            return Self::none();
        };
        let inner = tracing::info_span!(
            target: super::otel::TARGET,
            "process",
            otel.name = %format_args!("process {}", m.topic),
            otel.kind = "consumer",
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = m.topic,
            messaging.destination.partition.id = %m.partition,
            messaging.kafka.offset = m.offset,
            messaging.consumer.group.name = &*spans.group,
            messaging.message.id = m.message_id,
        );
        if let Some(parent) = parent() {
            super::otel::set_parent(&inner, &parent);
        }
        Span { inner }
    }

    /// A step of the event (kind internal).
    #[inline]
    pub(crate) fn child(&self, name: &'static str) -> Self {
        if self.inner.is_none() {
            return Self::none();
        }
        let inner = tracing::info_span!(
            target: super::otel::TARGET,
            parent: &self.inner,
            "step",
            otel.name = name,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        Span { inner }
    }

    /// A lifecycle post's span (kind client), child of the event whose
    /// context the record carries, and the context to send with the request:
    /// the post's own, or the record's as it came when no span is recorded.
    pub(crate) fn post(
        parent: Option<&TraceContext>,
        status: &'static str,
    ) -> (Self, Option<TraceContext>) {
        let Some(parent) = parent else {
            return (Self::none(), None);
        };
        let inner = tracing::info_span!(
            target: super::otel::TARGET,
            "post",
            otel.name = %format_args!("lifecycle post {status}"),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
            http.request.method = "POST",
            xzepr.lifecycle.status = status,
        );
        if inner.is_none() {
            return (Self::none(), Some(parent.clone()));
        }
        super::otel::set_parent(&inner, parent);
        let span = Span { inner };
        let cx = span.context().or_else(|| Some(parent.clone()));
        (span, cx)
    }

    /// This span's context, to send on.
    #[inline]
    pub(crate) fn context(&self) -> Option<TraceContext> {
        if self.inner.is_none() {
            return None;
        }
        super::otel::context_of(&self.inner)
    }

    /// Marks the span's status as error.
    pub(crate) fn failed(&self, message: &str) {
        if self.inner.is_none() {
            return;
        }
        self.inner.record("otel.status_code", "error");
        self.inner.record("otel.status_description", message);
    }

    /// `f`, run inside this span at each poll.
    #[inline]
    pub(crate) fn instrument<F: Future>(&self, f: F) -> tracing::instrument::Instrumented<F> {
        tracing::Instrument::instrument(f, self.inner.clone())
    }
}
