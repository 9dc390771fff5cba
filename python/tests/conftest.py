"""Fixtures: the embedded dev stack (in-process broker + XZepr stand-in), and
an OTLP/HTTP traces receiver."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NoReturn

import pytest

from xzepr_consumer import CloudEventMessage, DeadLetter, KafkaConsumerConfig, XzeprConsumer
from xzepr_consumer.devstack import DevStack, committed_offsets
from xzepr_consumer.idempotency import HAS_POSTGRES

DATA = Path(__file__).resolve().parents[2] / "tests" / "data"
_groups = itertools.count()


def xzepr_event(
    seq: int, event_type: str, id_prefix: str, package: str, event_id: str | None = None
) -> tuple[bytes, bytes]:
    """An XZepr CloudEvent as ``(key, payload)``: key ``k{seq}``, id
    ``{id_prefix}{seq:025d}`` unless ``event_id``, version ``seq``."""
    body = {
        "id": event_id or f"{id_prefix}{seq:025d}",
        "specversion": "1.0.1",
        "type": event_type,
        "source": "xzepr.event.receiver.01M82X4ET7AYGAEYSHF5AKVAVW",
        "success": True,
        "platform_id": "linux",
        "package": package,
        "version": str(seq),
        "release": "1",
        "data": {"events": [], "event_receivers": [], "event_receiver_groups": []},
    }
    return f"k{seq}".encode(), json.dumps(body).encode()


@pytest.fixture
def stack() -> Iterator[DevStack]:
    s = DevStack(partitions=3, api_latency_ms=5, token="test-token")
    yield s
    s.close()


@pytest.fixture
def kafka_config(stack: DevStack) -> Callable[[], KafkaConsumerConfig]:
    """A config for a fresh consumer group on the stack (one per test)."""
    group = f"py-test-{next(_groups)}-{time.monotonic_ns()}"

    def make() -> KafkaConsumerConfig:
        return KafkaConsumerConfig(
            brokers=stack.brokers,
            topic=stack.topic,
            service_name="py-test",
            group_id=group,
        )

    return make


@pytest.fixture(scope="module")
def pg_dsn() -> Iterator[str]:
    """A throwaway PostgreSQL server's DSN (see ``pg_server``): skipped when the
    server or the build's ``postgres`` feature is missing, failed under CI."""
    from pg_server import PgServer

    def unavailable(reason: str) -> NoReturn:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {reason}")
        pytest.skip(reason)

    if not HAS_POSTGRES:
        unavailable("this build of xzepr_consumer has no `postgres` feature")
    try:
        server = PgServer()
    except RuntimeError as exc:
        unavailable(str(exc))
    try:
        yield server.dsn
    finally:
        server.stop()


def committed(stack: DevStack, group: str) -> tuple[int, int]:
    """(offsets committed, end offsets), summed over partitions."""
    offs = committed_offsets(stack.brokers, group, stack.topic)
    return sum(max(c, 0) for c, _ in offs.values()), sum(e for _, e in offs.values())


async def run_until(
    consumer: XzeprConsumer,
    run: Callable[[], object],
    done: Callable[[], bool],
    timeout: float = 120.0,
) -> None:
    """Runs the consumer until ``done()`` holds (checked while it runs), then stops
    it and waits for the drain. Fails if ``done()`` never holds."""
    task = asyncio.ensure_future(run())  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    try:
        while not done():
            if task.done():
                task.result()
                raise AssertionError("the consumer stopped on its own")
            if time.monotonic() > deadline:
                raise AssertionError(f"not done after {timeout} s: {consumer.metrics()}")
            await asyncio.sleep(0.05)
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 60)


def dead_letter(
    stack: DevStack, config: KafkaConsumerConfig, n: int, failing: tuple[str, ...]
) -> None:
    """Consumes the topic's ``n`` events in ``config``'s group with the default
    dead letter (``<topic>.dlq``), failing each event whose id ends with one
    of ``failing``, until all ``n`` are committed."""

    async def handle(message: CloudEventMessage) -> None:
        if message.id.endswith(failing):
            raise RuntimeError("downstream bug")

    async def main() -> None:
        consumer = XzeprConsumer(config, dead_letter=DeadLetter())
        await run_until(
            consumer,
            lambda: consumer.run_with_callback(handle),
            lambda: committed(stack, config.group_id) == (n, n),
        )

    asyncio.run(main())


class Receiver:
    """An OTLP/HTTP traces receiver on 127.0.0.1:0: keeps every
    ``POST /v1/traces`` body and answers an empty export response."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.paths: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                owner.paths.append(self.path)
                if self.path == "/v1/traces":
                    owner.bodies.append(body)
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()
