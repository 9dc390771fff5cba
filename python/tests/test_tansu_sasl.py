"""SASL/SCRAM-SHA-256 and -512 against a real Kafka-compatible broker (Tansu,
SQLite storage), as the Rust suite's tests/tansu_broker.rs does.

The broker is found through TANSU_BIN, ~/.cargo/bin/tansu or PATH (.ci/test
installs it). Without it the test is skipped, saying why; under CI it fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xzepr_consumer import (
    CloudEventMessage,
    KafkaConsumerConfig,
    SaslConfig,
    SaslMechanism,
    SecurityProtocol,
    XzeprConsumer,
    XzeprConsumerError,
)
from xzepr_consumer.devstack import committed_offsets, generate_events, produce

TOPIC = "secure"
EVENTS = 200


def tansu_binary() -> str | None:
    if os.environ.get("TANSU_BIN"):
        p = os.environ["TANSU_BIN"]
        return p if Path(p).exists() else None
    home = Path.home() / ".cargo" / "bin" / "tansu"
    if home.exists():
        return str(home)
    return shutil.which("tansu")


class Broker:
    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.dir = tempfile.TemporaryDirectory()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.brokers = f"127.0.0.1:{self.port}"
        self.child: subprocess.Popen[bytes] | None = None

    def start(self, authentication: bool) -> None:
        args = [self.binary, "broker", "--listener-url", self.url]
        args += ["--advertised-listener-url", self.url]
        # A relative SQLite path: absolute ones are mangled by the broker.
        args += ["--storage-engine", "sqlite://tansu.db"]
        if authentication:
            args.append("--authentication")
        self.child = subprocess.Popen(
            args, cwd=self.dir.name, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "tansu did not start"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.child is not None:
            self.child.kill()
            self.child.wait()
            self.child = None

    def tansu(self, *args: str) -> None:
        subprocess.run(
            [self.binary, *args], cwd=self.dir.name, check=True, stdout=subprocess.DEVNULL
        )


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    binary = tansu_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("the Tansu broker is not installed (CI must install it: .ci/tansu.sh)")
        pytest.skip("the Tansu broker is not installed (set TANSU_BIN or run .ci/tansu.sh)")
    b = Broker(binary)
    b.start(authentication=False)
    b.tansu("topic", "create", "--broker", b.url, "--partitions", "2", TOPIC)
    b.tansu("user", "create", "--broker", b.url, "--mechanism", "scram256", "alice", "alice-secret")
    b.tansu("user", "create", "--broker", b.url, "--mechanism", "scram512", "bob", "bob-secret")
    produce(b.brokers, TOPIC, [(k, v) for k, v in generate_events(EVENTS)])
    b.stop()
    b.start(authentication=True)
    yield b
    b.stop()
    b.dir.cleanup()


def sasl_config(
    broker: Broker, mechanism: SaslMechanism, user: str, password: str
) -> KafkaConsumerConfig:
    return KafkaConsumerConfig(
        brokers=broker.brokers,
        topic=TOPIC,
        service_name=f"py-{user}",
        group_id=f"py-sasl-{user}-{mechanism.name}",
        security_protocol=SecurityProtocol.SASL_PLAINTEXT,
        sasl_config=SaslConfig(mechanism, user, password),
    )


@pytest.mark.parametrize(
    ("mechanism", "user", "password"),
    [
        (SaslMechanism.SCRAM_SHA_256, "alice", "alice-secret"),
        (SaslMechanism.SCRAM_SHA_512, "bob", "bob-secret"),
    ],
)
def test_scram_consumes_and_commits(
    broker: Broker, mechanism: SaslMechanism, user: str, password: str
) -> None:
    config = sasl_config(broker, mechanism, user, password)
    seen: set[str] = set()
    props = list(config.to_confluent_config().items())

    def committed() -> int:
        offs = committed_offsets(broker.brokers, config.group_id, TOPIC, props)
        return sum(max(c, 0) for c, _ in offs.values())

    async def handle(message: CloudEventMessage) -> None:
        seen.add(message.id)

    async def main() -> None:
        consumer = XzeprConsumer(config, max_in_flight=64, commit_interval=0.2, drain_timeout=5)
        task = asyncio.ensure_future(consumer.run_with_callback(handle))
        deadline = time.monotonic() + 180
        while len(seen) < EVENTS:
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, f"consumed {len(seen)} of {EVENTS}"
            await asyncio.sleep(0.1)
        consumer.stop()
        await task

    asyncio.run(main())
    assert len(seen) == EVENTS
    assert committed() == EVENTS


def test_a_wrong_password_stops_the_consumer_with_an_error(broker: Broker) -> None:
    config = sasl_config(broker, SaslMechanism.SCRAM_SHA_256, "alice", "not-her-password")

    async def handle(message: CloudEventMessage) -> None:
        raise AssertionError("nothing may be consumed")

    async def main() -> None:
        consumer = XzeprConsumer(config, drain_timeout=5)
        with pytest.raises(XzeprConsumerError, match=r"(?i)auth"):
            await asyncio.wait_for(consumer.run_with_callback(handle), 120)

    asyncio.run(main())
