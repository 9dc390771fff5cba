"""Traces: the Rust pipeline's OpenTelemetry spans, exported over OTLP/HTTP.

``init_tracing()`` sets the export up from the standard ``OTEL_*`` variables
(``OTEL_EXPORTER_OTLP_ENDPOINT`` and the rest, read as the CLI reads them) and
returns a ``Tracing`` handle, or None when they ask for no export. While it
exports, every consumer turns its spans on: one ``process {topic}`` span per
event, child of the producer's ``traceparent``, with a child per idempotency
claim, handler attempt, dead letter and lifecycle post (whose context goes to
XZepr as the ``traceparent`` header).

A handler continues the trace from ``message.trace_context``: the handler
attempt span's ``TraceContext``, whose ``headers()`` are the ``traceparent`` /
``tracestate`` carrier for Python OpenTelemetry's propagator or an outgoing
request.

The export is process-wide: set up once, shut down at interpreter exit (or by
``Tracing.shutdown()``, after which this process exports no more spans).
"""

from __future__ import annotations

import atexit
from dataclasses import dataclass
from types import TracebackType

from . import _native

__all__ = ["HAS_OTEL", "TraceContext", "Tracing", "init_tracing"]

#: Whether this build can export spans (the bindings' ``otel`` feature; the
#: wheel has it).
HAS_OTEL: bool = _native.has_otel()


@dataclass(frozen=True)
class TraceContext:
    """A W3C trace context: ``traceparent`` (version 00) and ``tracestate``."""

    #: ``00-{trace id: 32 hex}-{span id: 16 hex}-{flags: 2 hex}``.
    traceparent: str
    #: The vendor state, if any.
    tracestate: str | None = None

    @property
    def trace_id(self) -> str:
        """The trace's id, 32 lowercase hex digits."""
        return self.traceparent[3:35]

    @property
    def span_id(self) -> str:
        """The parent span's id, 16 lowercase hex digits."""
        return self.traceparent[36:52]

    @property
    def sampled(self) -> bool:
        """Whether the ``sampled`` flag is set."""
        return int(self.traceparent[53:55], 16) & 1 == 1

    def headers(self) -> dict[str, str]:
        """``traceparent`` and, when there is one, ``tracestate``: a carrier
        for ``TraceContextTextMapPropagator().extract`` or an outgoing request."""
        out = {"traceparent": self.traceparent}
        if self.tracestate is not None:
            out["tracestate"] = self.tracestate
        return out


class Tracing:
    """The process's span export, as ``init_tracing()`` set it up. As a
    context manager, it shuts the export down on exit."""

    def flush(self) -> None:
        """Export every span ended so far, waiting for the collector's answers
        (each bounded by ``OTEL_EXPORTER_OTLP_TIMEOUT``, default 10 s)."""
        _native.flush_tracing()

    def shutdown(self) -> None:
        """Export what is left and end the export for this process."""
        _native.shutdown_tracing()

    @property
    def active(self) -> bool:
        """Whether spans are exported (not shut down)."""
        return _native.tracing_active()

    def __enter__(self) -> Tracing:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


_registered = False


def init_tracing() -> Tracing | None:
    """Set the span export up from the ``OTEL_*`` variables, unless it is
    already; None when they ask for none (no ``OTEL_EXPORTER_OTLP_ENDPOINT``
    nor ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_SDK_DISABLED=true``,
    ``OTEL_TRACES_EXPORTER=none``). Call it before the consumer runs; the
    export is shut down (the last spans exported) at interpreter exit.

    Raises:
        ConfigError: a protocol other than ``http/protobuf``, an endpoint that
            is no URL, or an endpoint set in a build without ``HAS_OTEL``.
        RuntimeError: the export was shut down already in this process.
    """
    global _registered
    if not _native.init_tracing():
        return None
    if not _registered:
        atexit.register(_native.shutdown_tracing)
        _registered = True
    return Tracing()
