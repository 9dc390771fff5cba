"""Batch handlers from Python: one call per lane's run, a result per message,
and everything else per message (retries of only the failed ones, the dead
letter, the terminal posts, offsets), through the library's one event flow."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from conftest import committed, run_until, xzepr_event

from xzepr_consumer import (
    BatchResult,
    CloudEventMessage,
    DeadLetter,
    KafkaConsumerConfig,
    PermanentError,
    RetryPolicy,
    Settings,
    XzeprClient,
    XzeprClientConfig,
    XzeprConsumer,
)
from xzepr_consumer.devstack import DevStack, produce, read_topic

QUICK_RETRY = RetryPolicy(max_attempts=3, backoff_base=0.01, backoff_max=0.05)


def _event(seq: int) -> tuple[bytes, bytes]:
    return xzepr_event(seq, "rows", "B", "batch")


@pytest.fixture
def batch_stack() -> Iterator[DevStack]:
    s = DevStack(partitions=1, token="test-token", extra_topics=["xzepr.dev.events.dlq"])
    yield s
    s.close()


def test_a_batch_handler_gets_runs_and_answers_each_message(batch_stack: DevStack) -> None:
    stack = batch_stack
    n = 60
    produce(stack.brokers, stack.topic, [_event(i) for i in range(n)])
    config = KafkaConsumerConfig(
        brokers=stack.brokers,
        topic=stack.topic,
        service_name="py-batch",
        group_id=f"py-batch-{time.monotonic_ns()}",
    )
    attempts: Counter[str] = Counter()
    calls: list[list[int]] = []

    async def handle(messages: list[CloudEventMessage]) -> list[BatchResult]:
        await asyncio.sleep(0)
        calls.append([m.kafka.offset for m in messages if m.kafka is not None])
        out: list[BatchResult] = []
        for m in messages:
            attempts[m.id] += 1
            seq = int(m.id[1:])
            if seq % 5 == 1 and attempts[m.id] == 1:
                out.append(RuntimeError("row locked"))
            elif seq % 5 == 3:
                out.append(PermanentError("bad row"))
            else:
                out.append({"rows": len(messages)})
        return out

    async def main() -> XzeprConsumer:
        client = XzeprClient(XzeprClientConfig(stack.api.url, stack.api.token))
        consumer = XzeprConsumer(
            config,
            client=client,
            work_name="py-batch",
            settings=Settings(batch=16),
            retry=QUICK_RETRY,
            dead_letter=DeadLetter(),
        )
        # The stand-in publishes each post to the topic: the consumer reads
        # its own posts too (and skips them), past the n events.
        await run_until(
            consumer,
            lambda: consumer.run_batch(handle),
            lambda: (
                stack.api.stats()["completed"] + stack.api.stats()["failed"] >= n
                and committed(stack, config.group_id)[0] >= n
            ),
        )
        return consumer

    m = asyncio.run(main()).metrics()
    assert any(len(c) > 1 for c in calls), f"never more than one message per call: {calls}"
    assert all(len(c) <= 16 for c in calls), calls
    assert all(c == sorted(c) for c in calls), f"a call out of offset order: {calls}"
    retried = {f"B{i:025d}" for i in range(n) if i % 5 == 1}
    permanent = {f"B{i:025d}" for i in range(n) if i % 5 == 3}
    assert {k for k, v in attempts.items() if v == 2} == retried
    assert all(attempts[k] == 1 for k in permanent), "a PermanentError was retried"
    assert (m.retried, m.dead_lettered) == (len(retried), len(permanent))
    stats = stack.api.stats()
    assert (stats["started"], stats["completed"], stats["failed"]) == (
        n,
        n - len(permanent),
        len(permanent),
    )
    letters = read_topic(stack.brokers, f"{stack.topic}.dlq", len(permanent))
    assert len(letters) == len(permanent)
    failed = [e for e in stack.api.recorded_events() if e["name"] == "py-batch.failed"]
    assert {e["payload"]["details"]["error_code"] for e in failed} == {"PermanentError"}


def test_a_batch_handler_that_raises_or_miscounts_fails_the_call_s_messages(
    batch_stack: DevStack,
) -> None:
    stack = batch_stack
    n = 20
    produce(stack.brokers, stack.topic, [_event(i) for i in range(n)])
    config = KafkaConsumerConfig(
        brokers=stack.brokers,
        topic=stack.topic,
        service_name="py-batch-err",
        group_id=f"py-batch-err-{time.monotonic_ns()}",
    )
    calls = 0

    def handle(messages: list[CloudEventMessage]) -> list[BatchResult]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database unavailable")
        if calls == 2:
            return [None] * (len(messages) + 1)
        return [None] * len(messages)

    async def main() -> XzeprConsumer:
        consumer = XzeprConsumer(config, retry=QUICK_RETRY)
        await run_until(
            consumer,
            lambda: consumer.run_batch(handle),
            lambda: committed(stack, config.group_id) == (n, n),
        )
        return consumer

    m = asyncio.run(main()).metrics()
    assert calls >= 3
    assert m.retried > 0, "the failed calls' messages were not retried"
    assert m.handler_failed == 0, m
