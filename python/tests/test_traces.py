"""Traces from Python: the consumer's spans exported over OTLP/HTTP to a real
receiver in the test, the producer's trace continued, and the handler given
its attempt span's context."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Receiver, xzepr_event

from xzepr_consumer import HAS_OTEL, ConfigError, KafkaConsumerConfig, TraceContext, init_tracing
from xzepr_consumer.devstack import DevStack, produce

TRACED_RUN = Path(__file__).with_name("traced_run.py")
OTEL_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def test_spans_reach_the_otlp_receiver_and_the_handler_continues_the_trace(
    stack: DevStack,
    kafka_config: Callable[[], KafkaConsumerConfig],
    receiver: Receiver,
) -> None:
    n = 3
    trace_id, producer_span = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = f"00-{trace_id}-{producer_span}-01"
    produce(
        stack.brokers,
        stack.topic,
        [xzepr_event(i, "traced", "T", "traces") for i in range(n)],
        headers=[("traceparent", traceparent.encode()), ("tracestate", b"vendor=1")],
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_SERVICE_NAME="py-traced")
    args = [stack.brokers, stack.topic, kafka_config().group_id, stack.api.url, stack.api.token]
    run = subprocess.run(
        [sys.executable, str(TRACED_RUN), *args, str(n)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr

    seen = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(seen) == n, run.stdout
    for s in seen:
        assert s["trace_context"] is not None, f"{s['id']}: no trace context"
        t = TraceContext(**s["trace_context"])
        # The handler's context is its attempt span's: the producer's trace,
        # a span of its own, the producer's state passed on.
        assert (t.trace_id, t.sampled, t.tracestate) == (trace_id, True, "vendor=1")
        assert t.span_id != producer_span
        # That span was exported (its 8 raw bytes in a protobuf body).
        assert any(bytes.fromhex(t.span_id) in b for b in receiver.bodies), t

    assert receiver.bodies, f"no export reached the receiver (paths {receiver.paths})"
    exported = b"".join(receiver.bodies)
    # Protobuf carries the ids as raw bytes: the trace's, and the producer's
    # span as the parent of the events' spans.
    assert bytes.fromhex(trace_id) in exported
    assert bytes.fromhex(producer_span) in exported
    for name in (b"process " + stack.topic.encode(), b"handler attempt", b"lifecycle post"):
        assert name in exported, name
    # Each event's started and completed posts told XZepr of the trace.
    posted = [TraceContext(tp) for tp in stack.api.recorded_traceparents()]
    assert sum(p.trace_id == trace_id for p in posted) >= 2 * n, posted


def test_no_endpoint_no_export(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    assert init_tracing() is None


def test_a_protocol_the_build_does_not_speak_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Refused before anything is set up: the process stays without an export.
    # (A build without the feature refuses any endpoint.)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ConfigError, match="grpc" if HAS_OTEL else "no `otel` feature"):
        init_tracing()


def test_trace_context_carrier() -> None:
    t = TraceContext("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "congo=t61")
    assert (t.trace_id, t.span_id, t.sampled) == (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00f067aa0ba902b7",
        True,
    )
    assert t.headers() == {"traceparent": t.traceparent, "tracestate": "congo=t61"}
    assert TraceContext(t.traceparent[:-2] + "00").headers() == {
        "traceparent": t.traceparent[:-2] + "00"
    }
