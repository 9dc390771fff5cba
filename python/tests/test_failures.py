"""Handlers that fail in unusual ways, and infrastructure that fails under them:
every event is answered (or held for a replay when the consumer stops), a lane
never stalls, a dropped native future cancels its handler, and the process
survives any value a handler returns."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import committed, run_until, xzepr_event

from xzepr_consumer import (
    CloudEventMessage,
    KafkaConsumerConfig,
    XzeprConsumer,
    XzeprConsumerError,
    _native,
)
from xzepr_consumer.devstack import DevStack, committed_offsets, produce


def _event(seq: int, event_type: str = "failures") -> tuple[bytes, bytes]:
    return xzepr_event(seq, event_type, "F", "failures")


def _produce(stack: DevStack, n: int, event_type: str = "failures") -> None:
    # One partition: one lane, so a stalled event stalls everything after it.
    produce(stack.brokers, stack.topic, [_event(i, event_type) for i in range(n)], partition=0)


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def _lane_moves_on_past(
    stack: DevStack,
    kafka_config: Callable[[], KafkaConsumerConfig],
    first: Callable[[], BaseException],
    sync: bool,
) -> None:
    n = 10
    _produce(stack, n)
    config = kafka_config()
    handled: list[int] = []

    def handle_sync(message: CloudEventMessage) -> None:
        seq = int(message.version)
        if seq == 0:
            raise first()
        handled.append(seq)

    async def handle(message: CloudEventMessage) -> None:
        handle_sync(message)

    async def main() -> None:
        consumer = XzeprConsumer(config, drain_timeout=1)
        await run_until(
            consumer,
            lambda: consumer.run_with_callback(handle_sync if sync else handle),
            lambda: len(handled) == n - 1 and committed(stack, config.group_id)[0] == n,
            timeout=20,
        )
        assert consumer.metrics().handler_failed == 1

    asyncio.run(main())
    assert handled == list(range(1, n))


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_a_handler_raising_cancelled_error_fails_its_event_and_the_lane_moves_on(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig], sync: bool
) -> None:
    _lane_moves_on_past(stack, kafka_config, asyncio.CancelledError, sync)


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_a_handler_exception_whose_str_raises_fails_its_event_and_the_lane_moves_on(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig], sync: bool
) -> None:
    _lane_moves_on_past(stack, kafka_config, Unprintable, sync)


def test_handler_timeout_cancels_the_handler_task(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig]
) -> None:
    n = 5
    _produce(stack, n)
    config = kafka_config()
    cancelled: set[int] = set()
    finished: set[int] = set()

    async def handle(message: CloudEventMessage) -> None:
        seq = int(message.version)
        try:
            # Held: only a cancel ends it.
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.add(seq)
            raise
        finished.add(seq)

    async def main() -> None:
        consumer = XzeprConsumer(config, ordering="unordered", handler_timeout=0.2, drain_timeout=1)
        # Checked while the consumer runs: the stop's own cancels do not count.
        await run_until(
            consumer,
            lambda: consumer.run_with_callback(handle),
            lambda: len(cancelled) == n and committed(stack, config.group_id)[0] == n,
            timeout=30,
        )
        assert consumer.metrics().handler_timeouts == n

    asyncio.run(main())
    assert finished == set()


def test_an_event_whose_native_future_was_dropped_while_parked_never_runs(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig]
) -> None:
    n = 8
    _produce(stack, n)
    config = kafka_config()
    ran: list[int] = []
    consumer = XzeprConsumer(config, ordering="unordered", handler_timeout=0.2, drain_timeout=1)

    def handle(message: CloudEventMessage) -> None:
        # A sync handler on the loop's thread: while the first one blocks the
        # loop, the others wait parked and their native futures time out.
        ran.append(int(message.version))
        if len(ran) == 1:
            deadline = time.monotonic() + 20
            while consumer.metrics().handler_timeouts < n:
                assert time.monotonic() < deadline, consumer.metrics()
                time.sleep(0.01)

    async def main() -> None:
        await run_until(
            consumer,
            lambda: consumer.run_with_callback(handle),
            lambda: committed(stack, config.group_id)[0] == n,
            timeout=30,
        )

    asyncio.run(main())
    assert len(ran) == 1, f"events already given up on ran: {ran}"


def test_a_token_dropped_unanswered_fails_its_event_and_the_lane_moves_on(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig]
) -> None:
    # The native side's own guard, below the package's loop (which answers
    # every token): a token the loop loses must not stall its lane.
    n = 3
    _produce(stack, n)
    config = kafka_config()

    async def main() -> None:
        native = _native.Consumer(config._to_native(), json.dumps({"drain_timeout": "1s"}))
        joined = native.join()
        deadline = time.monotonic() + 30
        taken = 0
        try:
            while taken < n or native.metrics()["finished"] < n:
                assert time.monotonic() < deadline, (taken, native.metrics())
                # Taken and dropped at once, unanswered.
                taken += len(native.take(16))
                await asyncio.sleep(0.01)
            assert native.metrics()["handler_failed"] == n
        finally:
            native.shutdown()
            while not native.finished:
                assert time.monotonic() < deadline + 30, native.metrics()
                native.take(16)
                await asyncio.sleep(0.01)
            await joined

    asyncio.run(main())
    assert committed(stack, config.group_id) == (n, n)


def _failing_initializer() -> None:
    raise OSError("no worker can start")


@pytest.mark.parametrize("broken", ["shut_down", "broken_pool"])
def test_a_broken_executor_stops_the_consumer_with_the_offsets_unfinished(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig], broken: str
) -> None:
    n = 20
    _produce(stack, n)
    config = kafka_config()
    if broken == "shut_down":
        executor = concurrent.futures.ThreadPoolExecutor(2)
        executor.shutdown()
    else:
        # Its worker's initializer fails: the pool breaks (BrokenThreadPool, a
        # BrokenExecutor as BrokenProcessPool is).
        executor = concurrent.futures.ThreadPoolExecutor(2, initializer=_failing_initializer)
    ran: list[str] = []

    def handle(message: CloudEventMessage) -> None:
        ran.append(message.id)

    consumer = XzeprConsumer(config, executor=executor, drain_timeout=1)
    with pytest.raises(XzeprConsumerError, match="executor") as raised:
        asyncio.run(asyncio.wait_for(consumer.run_with_callback(handle), 30))
    assert isinstance(raised.value.__cause__, (RuntimeError, concurrent.futures.BrokenExecutor))
    assert ran == []
    assert committed(stack, config.group_id) == (0, n), "nothing committed unprocessed"
    assert consumer.metrics().handler_failed == 0


DEEP_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from xzepr_consumer import (
        KafkaConsumerConfig, XzeprClient, XzeprClientConfig, XzeprConsumer,
    )

    async def main() -> None:
        brokers, topic, group, url, token, n = sys.argv[1:7]
        n = int(n)
        client = XzeprClient(XzeprClientConfig(url, token))
        receiver = await client.discover_or_create_event_receiver(
            "py-deep", "worker", "1.0.0", "pytest", {"type": "object"}
        )
        consumer = XzeprConsumer(
            KafkaConsumerConfig(brokers=brokers, topic=topic, service_name="deep", group_id=group),
            client=client, receiver_id=receiver, work_name="py-work", type_prefixes=["deep"],
        )

        async def handle(message):
            seq = int(message.version)
            if seq == 0:
                cyclic = {}
                cyclic["self"] = cyclic
                return cyclic
            if seq == 1:
                deep = {}
                for _ in range(100_000):
                    deep = {"d": deep}
                return deep
            if seq == 2:
                loop = []
                loop.append(loop)
                return {"list": loop}
            return {"seq": seq}

        task = asyncio.ensure_future(consumer.run_with_callback(handle))
        deadline = time.monotonic() + 60
        while True:
            m = consumer.metrics()
            done = m.posted_failed + m.posted_completed
            if done >= n and m.finished == m.consumed:
                break
            if task.done():
                task.result()
            assert time.monotonic() < deadline, m
            await asyncio.sleep(0.05)
        consumer.stop()
        await asyncio.wait_for(task, 60)
        print(json.dumps(consumer.metrics().as_dict()), flush=True)

    asyncio.run(main())
    """
)


def test_cyclic_or_too_deep_details_fail_the_event_with_an_error_naming_the_depth(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig], tmp_path: Path
) -> None:
    n = 6
    _produce(stack, n, event_type="deep")
    group = kafka_config().group_id
    # A child process: today's failure mode is the process dying.
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            DEEP_CHILD,
            stack.brokers,
            stack.topic,
            group,
            stack.api.url,
            stack.api.token,
            str(n),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-2000:]}"
    summary = json.loads(child.stdout.strip().splitlines()[-1])
    assert (summary["posted_failed"], summary["posted_completed"]) == (3, n - 3)
    failed = [e for e in stack.api.recorded_events() if e["name"] == "py-work.failed"]
    assert len(failed) == 3
    for event in failed:
        error = event["payload"]["details"]["error"]
        assert "128" in error and "deep" in error, error
    # Finished, not replayed: the same event cannot kill the next run. (Our
    # events are partition 0's first n; the republished posts come after.)
    assert committed_offsets(stack.brokers, group, stack.topic)[0][0] >= n
