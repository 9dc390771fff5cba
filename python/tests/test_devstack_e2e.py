"""End to end against the embedded dev stack: Rust pipeline, asyncio handlers,
automatic lifecycle to the XZepr stand-in (which republishes every post to the
topic, as XZepr does), commits checked on the broker."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import defaultdict
from collections.abc import Callable

import pytest
from conftest import committed, run_until

from xzepr_consumer import (
    CloudEventMessage,
    KafkaConsumerConfig,
    MessageHandler,
    XzeprClient,
    XzeprClientConfig,
    XzeprConsumer,
)
from xzepr_consumer.devstack import DevStack, generate_events, produce


async def lifecycle_consumer(
    stack: DevStack, config: KafkaConsumerConfig, **options: object
) -> tuple[XzeprClient, XzeprConsumer]:
    client = XzeprClient(XzeprClientConfig(stack.api.url, stack.api.token))
    receiver = await client.discover_or_create_event_receiver(
        "py-test", "worker", "1.0.0", "pytest", {"type": "object"}
    )
    consumer = XzeprConsumer(
        config,
        client=client,
        receiver_id=receiver,
        work_name="py-work",
        **options,  # type: ignore[arg-type]
    )
    return client, consumer


def test_every_event_handled_reported_and_committed(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig]
) -> None:
    n = 300
    produce(stack.brokers, stack.topic, [(k, v) for k, v in generate_events(n)])
    seen: set[str] = set()
    in_flight = 0
    most = 0

    class Handler(MessageHandler):
        async def handle(self, message: CloudEventMessage) -> None:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1
            seen.add(message.id)

    async def main() -> None:
        config = kafka_config()
        _, consumer = await lifecycle_consumer(
            stack, config, ordering="unordered", max_in_flight=64
        )

        def done() -> bool:
            m = consumer.metrics()
            # Each event: started and completed acknowledged; and every message on
            # the topic (the republished posts and the receiver's event too)
            # consumed and finished.
            stats = stack.api.stats()
            return (
                len(seen) >= n
                and stats["completed"] >= n
                and m.consumed >= n * 3 + 1
                and m.finished == m.consumed
            )

        await run_until(consumer, lambda: consumer.run(Handler()), done)
        m = consumer.metrics()
        assert m.handler_failed == 0
        assert m.posted_started == n and m.posted_completed == n
        stats = stack.api.stats()
        assert (stats["started"], stats["completed"], stats["failed"]) == (n, n, 0)
        done_, end = committed(stack, config.group_id)
        assert done_ == end, "every offset committed"
        assert most > 1, "handlers ran concurrently"

    asyncio.run(main())
    assert len(seen) == n, "0 lost"


def test_a_handler_exception_is_posted_failed_and_the_consumer_goes_on(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig]
) -> None:
    msgs = [
        (
            f"k{i}".encode(),
            json.dumps(_event(f"E{i:025d}", "bad" if i % 3 == 0 else "good")).encode(),
        )
        for i in range(30)
    ]
    produce(stack.brokers, stack.topic, msgs)
    handled: set[str] = set()

    async def handle(message: CloudEventMessage) -> None:
        handled.add(message.id)
        if message.event_type == "bad":
            raise ValueError(f"cannot handle {message.id}")

    async def main() -> None:
        config = kafka_config()
        _, consumer = await lifecycle_consumer(stack, config, type_prefixes=["bad", "good"])

        def done() -> bool:
            s, m = stack.api.stats(), consumer.metrics()
            # Then the republished posts and the receiver's event: consumed too.
            return (
                s["failed"] >= 10
                and s["completed"] >= 20
                and m.consumed >= 30 * 3 + 1
                and m.finished == m.consumed
            )

        await run_until(consumer, lambda: consumer.run_with_callback(handle), done)
        assert consumer.metrics().handler_failed == 10
        done_, end = committed(stack, config.group_id)
        assert done_ == end

    asyncio.run(main())
    assert len(handled) == 30
    failed = [e for e in stack.api.recorded_events() if e["name"] == "py-work.failed"]
    assert len(failed) == 10
    details = failed[0]["payload"]["details"]
    assert details["error_code"] == "ValueError", failed[0]
    assert details["error"].startswith("ValueError: cannot handle E"), failed[0]


def test_per_key_order_holds_with_many_in_flight(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig]
) -> None:
    keys, per_key = 8, 25
    msgs = []
    for seq in range(per_key):
        for k in range(keys):
            body = _event(f"K{k}S{seq:022d}", "ordered", seq=seq, key=k)
            msgs.append((f"key-{k}".encode(), json.dumps(body).encode()))
    # One partition: keys interleave in it, so only the lanes keep their order.
    produce(stack.brokers, stack.topic, msgs, partition=0)
    order: dict[int, list[int]] = defaultdict(list)
    running: dict[int, int] = defaultdict(int)
    overlap = 0
    in_flight = 0

    async def handle(message: CloudEventMessage) -> None:
        nonlocal overlap, in_flight
        key = int(message.package)
        running[key] += 1
        in_flight += 1
        overlap = max(overlap, in_flight)
        assert running[key] == 1, "two events of one key at once"
        await asyncio.sleep(0.002 * (message.release.count("x") + (key % 3)))
        order[key].append(int(message.version))
        running[key] -= 1
        in_flight -= 1

    async def main() -> None:
        consumer = XzeprConsumer(kafka_config(), ordering="key", max_in_flight=16)
        await run_until(
            consumer,
            lambda: consumer.run_with_callback(handle),
            lambda: sum(len(v) for v in order.values()) >= keys * per_key,
        )
        assert consumer.metrics().handler_failed == 0

    asyncio.run(main())
    for k in range(keys):
        assert order[k] == list(range(per_key)), f"key {k}: {order[k]}"
    assert overlap > 1, "different keys ran concurrently"


@pytest.mark.parametrize("stop_after", [40, 130])
def test_stop_mid_stream_then_restart_loses_nothing(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig], stop_after: int
) -> None:
    n = 200
    produce(stack.brokers, stack.topic, [(k, v) for k, v in generate_events(n)])
    seen: set[str] = set()

    async def handle(message: CloudEventMessage) -> None:
        await asyncio.sleep(0.005)
        seen.add(message.id)

    async def main() -> None:
        # A short session: the mock broker rebalances to the second consumer only
        # once the first one's session is over.
        config = dataclasses.replace(kafka_config(), session_timeout_ms=6000)
        first = XzeprConsumer(config, max_in_flight=32, drain_timeout=5)
        await run_until(
            first, lambda: first.run_with_callback(handle), lambda: len(seen) >= stop_after
        )
        partial, end = committed(stack, config.group_id)
        # Stopped mid-stream: what the first run handled is committed, not all.
        assert end == n
        assert stop_after <= partial < n, (partial, len(seen))
        second = XzeprConsumer(config, max_in_flight=32, drain_timeout=5)
        await run_until(
            second,
            lambda: second.run_with_callback(handle),
            lambda: committed(stack, config.group_id)[0] == n,
        )
        # The second run started at the first's commit point, not at zero.
        assert second.metrics().consumed <= n - partial + 1

    asyncio.run(main())
    assert len(seen) == n


def test_sync_callable_runs_on_the_loop(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig]
) -> None:
    produce(stack.brokers, stack.topic, [(k, v) for k, v in generate_events(50)])
    seen: list[str] = []

    def handle(message: CloudEventMessage) -> dict[str, str]:
        seen.append(message.id)
        return {"platform": message.platform_id}

    async def main() -> None:
        config = kafka_config()
        consumer = XzeprConsumer(config)
        await run_until(
            consumer,
            lambda: consumer.run_with_callback(handle),
            lambda: committed(stack, config.group_id)[0] == 50,
        )

    asyncio.run(main())
    assert len(set(seen)) == 50


def _event(event_id: str, event_type: str, seq: int = 0, key: int = 0) -> dict[str, object]:
    return {
        "id": event_id,
        "specversion": "1.0.1",
        "type": event_type,
        "source": "xzepr.event.receiver.01M82X4ET7AYGAEYSHF5AKVAVW",
        "success": True,
        "platform_id": "linux",
        "package": str(key),
        "version": str(seq),
        "release": "x" * (seq % 3),
        "data": {"events": [], "event_receivers": [], "event_receiver_groups": []},
    }
