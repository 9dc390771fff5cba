"""The library's pipeline features, end to end from Python on the dev stack:
retries, the dead-letter topic, idempotency (in memory and PostgreSQL) and the
metrics and health endpoint. Each is the Rust pipeline's own, reached through
the settings; these tests check they arrive and act."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from conftest import committed, run_until, xzepr_event

from xzepr_consumer import (
    CloudEventMessage,
    DeadLetter,
    KafkaConsumerConfig,
    KafkaRecord,
    MemoryStore,
    PostgresStore,
    RetryPolicy,
    XzeprClient,
    XzeprClientConfig,
    XzeprConsumer,
    XzeprConsumerError,
)
from xzepr_consumer.devstack import DevStack, produce, read_topic

#: Retries that cost the tests little time.
QUICK_RETRY = RetryPolicy(max_attempts=3, backoff_base=0.01, backoff_max=0.05)


def _event(seq: int, event_type: str, event_id: str | None = None) -> tuple[bytes, bytes]:
    return xzepr_event(seq, event_type, "P", "features", event_id)


def test_a_handler_failing_once_is_retried_and_reported_completed(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig]
) -> None:
    n = 6
    produce(stack.brokers, stack.topic, [_event(i, "retry") for i in range(n)])
    attempts: Counter[str] = Counter()

    async def handle(message: CloudEventMessage) -> dict[str, int]:
        attempts[message.id] += 1
        if attempts[message.id] == 1:
            raise RuntimeError("flaky once")
        return {"attempt": attempts[message.id]}

    config = kafka_config()

    async def main() -> XzeprConsumer:
        client = XzeprClient(XzeprClientConfig(stack.api.url, stack.api.token))
        # No receiver id: the pipeline finds or creates it by name and type.
        consumer = XzeprConsumer(
            config, client=client, work_name="py-retry", type_prefixes=["retry"], retry=QUICK_RETRY
        )
        await run_until(
            consumer,
            lambda: consumer.run_with_callback(handle),
            lambda: (
                stack.api.stats()["completed"] >= n and committed(stack, config.group_id)[0] >= n
            ),
        )
        return consumer

    m = asyncio.run(main()).metrics()
    assert set(attempts.values()) == {2}, attempts
    # A failure the policy retried is no handler failure: only last attempts count.
    assert (m.retried, m.handler_failed, m.posted_completed, m.posted_failed) == (n, 0, n, 0)
    stats = stack.api.stats()
    assert (stats["started"], stats["completed"], stats["failed"]) == (n, n, 0)
    receivers = [r for r in stack.api.receivers() if r["name"] == config.service_name]
    assert len(receivers) == 1, "the pipeline created the service's receiver once"
    completed = [e for e in stack.api.recorded_events() if e["name"] == "py-retry.completed"]
    assert {e["payload"]["details"]["attempt"] for e in completed} == {2}


@pytest.fixture
def dlq_stack() -> Iterator[DevStack]:
    s = DevStack(partitions=1, token="test-token", extra_topics=["xzepr.dev.events.dlq"])
    yield s
    s.close()


def test_an_event_failing_every_attempt_is_dead_lettered_and_its_offset_committed(
    dlq_stack: DevStack,
) -> None:
    stack = dlq_stack
    n = 4
    produce(stack.brokers, stack.topic, [_event(i, "poison") for i in range(n)])
    config = KafkaConsumerConfig(
        brokers=stack.brokers,
        topic=stack.topic,
        service_name="py-dlq",
        group_id=f"py-dlq-{time.monotonic_ns()}",
    )
    calls: Counter[str] = Counter()

    async def handle(message: CloudEventMessage) -> None:
        calls[message.id] += 1
        raise ValueError(f"cannot handle {message.id}")

    async def main() -> XzeprConsumer:
        consumer = XzeprConsumer(config, retry=QUICK_RETRY, dead_letter=DeadLetter())
        await run_until(
            consumer,
            lambda: consumer.run_with_callback(handle),
            lambda: committed(stack, config.group_id) == (n, n),
        )
        return consumer

    m = asyncio.run(main()).metrics()
    assert set(calls.values()) == {3}, "every attempt the policy allows, then the dead letter"
    assert (m.dead_lettered, m.dead_letter_failed, m.retried) == (n, 0, 2 * n)
    letters = read_topic(stack.brokers, f"{stack.topic}.dlq", n)
    assert sorted(k for k, _, _ in letters if k is not None) == sorted(
        _event(i, "poison")[0] for i in range(n)
    )
    produced = {_event(i, "poison")[1] for i in range(n)}
    assert {p for _, p, _ in letters} == produced, "payloads unchanged"
    headers = dict(letters[0][2])
    assert headers["xzepr.dlq.reason"] == b"handler_failed"
    assert headers["xzepr.dlq.attempts"] == b"3"
    assert headers["xzepr.dlq.error"].startswith(b"ValueError: cannot handle")


@pytest.fixture
def delay_stack() -> Iterator[DevStack]:
    s = DevStack(partitions=1, token="test-token", extra_topics=["xzepr.dev.events.retry.1s"])
    yield s
    s.close()


def test_an_event_failing_its_first_visit_runs_again_from_its_delay_topic(
    delay_stack: DevStack,
) -> None:
    stack = delay_stack
    n = 3
    produce(stack.brokers, stack.topic, [_event(i, "later") for i in range(n)])
    config = KafkaConsumerConfig(
        brokers=stack.brokers,
        topic=stack.topic,
        service_name="py-delay",
        group_id=f"py-delay-{time.monotonic_ns()}",
    )
    visits: list[tuple[str, str]] = []

    async def handle(message: CloudEventMessage) -> None:
        visits.append((message.id, message.kafka.topic))
        if message.kafka.topic == stack.topic:
            raise RuntimeError("partner down")

    async def main() -> XzeprConsumer:
        client = XzeprClient(XzeprClientConfig(stack.api.url, stack.api.token))
        consumer = XzeprConsumer(
            config,
            client=client,
            work_name="py-delay",
            retry=RetryPolicy(delay_topics=["1s"]),
        )
        await run_until(
            consumer,
            lambda: consumer.run_with_callback(handle),
            lambda: stack.api.stats()["completed"] >= n,
        )
        return consumer

    m = asyncio.run(main()).metrics()
    delay_topic = f"{stack.topic}.retry.1s"
    assert Counter(t for _, t in visits) == {stack.topic: n, delay_topic: n}, visits
    assert (m.delayed, m.handler_failed, m.posted_started, m.posted_completed) == (n, 0, n, n)
    stats = stack.api.stats()
    assert (stats["started"], stats["completed"], stats["failed"]) == (n, n, 0)


def _same_event_twice(stack: DevStack) -> None:
    # One partition, so the second copy comes after the first one finished.
    twice = [_event(0, "dup", "D" * 26), _event(1, "dup", "D" * 26), _event(2, "dup")]
    produce(stack.brokers, stack.topic, twice, partition=0)


async def _run_idempotent(
    stack: DevStack,
    config: KafkaConsumerConfig,
    store: MemoryStore | PostgresStore,
    handled: Counter[str],
) -> XzeprConsumer:
    async def handle(message: CloudEventMessage) -> None:
        handled[message.id] += 1

    consumer = XzeprConsumer(config, idempotency=store)
    await run_until(
        consumer,
        lambda: consumer.run_with_callback(handle),
        lambda: committed(stack, config.group_id)[0] == 3,
    )
    return consumer


def _other_group(make: Callable[[], KafkaConsumerConfig]) -> KafkaConsumerConfig:
    c = make()
    return KafkaConsumerConfig(
        brokers=c.brokers,
        topic=c.topic,
        service_name=c.service_name,
        group_id=f"{c.group_id}-other",
    )


def test_the_same_event_twice_is_handled_once_with_a_memory_store(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig]
) -> None:
    _same_event_twice(stack)
    store = MemoryStore()
    handled: Counter[str] = Counter()
    consumer = asyncio.run(_run_idempotent(stack, kafka_config(), store, handled))
    assert handled == Counter({"D" * 26: 1, f"P{2:025d}": 1})
    assert consumer.metrics().duplicates == 1
    m = store.metrics()
    assert (m.events_processed_total, m.events_duplicates_total) == (2, 1)
    # A second group sharing the store: every key was processed already.
    again: Counter[str] = Counter()
    consumer = asyncio.run(_run_idempotent(stack, _other_group(kafka_config), store, again))
    assert again == Counter() and consumer.metrics().duplicates == 3


def test_the_same_event_twice_is_handled_once_with_a_postgres_store(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig], pg_dsn: str
) -> None:
    _same_event_twice(stack)
    handled: Counter[str] = Counter()

    async def main() -> tuple[XzeprConsumer, PostgresStore]:
        store = await PostgresStore.connect(pg_dsn, retention=3600, max_connections=4)
        return await _run_idempotent(stack, kafka_config(), store, handled), store

    consumer, store = asyncio.run(main())
    assert handled == Counter({"D" * 26: 1, f"P{2:025d}": 1})
    assert consumer.metrics().duplicates == 1
    m = store.metrics()
    assert (m.events_processed_total, m.events_duplicates_total) == (2, 1)
    assert m.statements_total > 0


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_metrics_and_health_endpoint_is_served(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig]
) -> None:
    n = 20
    produce(stack.brokers, stack.topic, [_event(i, "observed") for i in range(n)])
    config = kafka_config()

    async def main() -> None:
        consumer = XzeprConsumer(config, metrics_addr="127.0.0.1:0")
        assert consumer.metrics_addr is None and consumer.health() is None
        task = asyncio.ensure_future(consumer.run_with_callback(lambda _m: None))
        try:
            deadline = time.monotonic() + 60
            while consumer.metrics().finished < n:
                assert not task.done() and time.monotonic() < deadline, consumer.metrics()
                await asyncio.sleep(0.05)
            addr = consumer.metrics_addr
            assert addr is not None and not addr.endswith(":0")
            base = f"http://{addr}"
            status, body = await asyncio.to_thread(_get, f"{base}/metrics")
            assert status == 200
            handled = [
                line
                for line in body.splitlines()
                if line.startswith("xzepr_consumer_messages_handled_total")
            ]
            assert handled and float(handled[0].split()[-1]) == n, body[:2000]
            while (await asyncio.to_thread(_get, f"{base}/ready"))[0] != 200:
                assert time.monotonic() < deadline, await asyncio.to_thread(_get, f"{base}/ready")
                await asyncio.sleep(0.1)
            status, body = await asyncio.to_thread(_get, f"{base}/health")
            assert status == 200 and json.loads(body)["alive"] is True
            health = consumer.health()
            assert health is not None
            assert (health.alive, health.ready, health.stalled) == (True, True, False)
            assert health.assigned_partitions == stack.partitions
        finally:
            consumer.stop()
            await asyncio.wait_for(task, 60)
        assert consumer.metrics_addr is None, "the endpoint stops with the run"
        assert consumer.metrics().handled == n

    asyncio.run(main())


def test_an_unreachable_xzepr_fails_the_run_naming_the_receiver_and_the_cause(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig]
) -> None:
    produce(stack.brokers, stack.topic, [_event(0, "never")])
    config = kafka_config()
    handled: list[str] = []

    async def main() -> None:
        # Port 1 on loopback: nothing listens there.
        client = XzeprClient(XzeprClientConfig("http://127.0.0.1:1", "t", timeout=2))
        consumer = XzeprConsumer(config, client=client, receiver_name="py-unreachable")
        with pytest.raises(XzeprConsumerError, match=r'receiver "py-unreachable".*refused'):
            await asyncio.wait_for(consumer.run_with_callback(handled.append), 60)

    asyncio.run(main())
    assert handled == [], "nothing is consumed before the receiver is found"
    assert committed(stack, config.group_id)[0] == 0


def test_the_handler_sees_the_kafka_record_each_event_came_in(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig]
) -> None:
    n = 4
    headers = [("trace", b"abc"), ("bin", b"\x00\xff"), ("trace", b"again")]
    produce(
        stack.brokers,
        stack.topic,
        [_event(i, "record") for i in range(n)],
        headers=headers,
    )
    seen: dict[str, KafkaRecord] = {}

    async def handle(message: CloudEventMessage) -> None:
        assert message.kafka is not None
        seen[message.id] = message.kafka

    config = kafka_config()

    async def main() -> None:
        consumer = XzeprConsumer(config, type_prefixes=["record"])
        await run_until(
            consumer,
            lambda: consumer.run_with_callback(handle),
            lambda: len(seen) >= n,
        )

    asyncio.run(main())
    for i in range(n):
        record = seen[f"P{i:025d}"]
        assert record.key == f"k{i}".encode()
        assert record.headers == headers
        assert record.header("trace") == b"abc"
        assert record.header("missing") is None
        assert record.topic == stack.topic and record.offset >= 0
        assert record.timestamp is not None and record.timestamp > 0
        assert record.timestamp_type == "CreateTime"
