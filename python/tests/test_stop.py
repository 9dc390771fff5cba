"""Graceful stop: SIGTERM and SIGINT to a consuming process, and a
KeyboardInterrupt raised inside a handler."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import committed

from xzepr_consumer import CloudEventMessage, KafkaConsumerConfig, XzeprConsumer
from xzepr_consumer.devstack import DevStack, generate_events, produce

CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from xzepr_consumer import KafkaConsumerConfig, XzeprConsumer

    async def main() -> None:
        brokers, topic, group = sys.argv[1:4]
        consumer = XzeprConsumer(
            KafkaConsumerConfig(brokers=brokers, topic=topic, service_name="sig", group_id=group),
            max_in_flight=8,
        )
        handled = 0

        async def handle(message):
            nonlocal handled
            handled += 1
            if handled == 1:
                print("ready", flush=True)
            await asyncio.sleep(0.01)

        await consumer.run_with_callback(handle)
        print(json.dumps({"handled": handled, **consumer.metrics().as_dict()}), flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_process_cleanly(
    stack: DevStack,
    kafka_config: Callable[[], KafkaConsumerConfig],
    sig: signal.Signals,
    tmp_path: Path,
) -> None:
    produce(stack.brokers, stack.topic, [(k, v) for k, v in generate_events(2000)])
    group = kafka_config().group_id
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, stack.brokers, stack.topic, group],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Not the source tree: the child imports the installed package.
        cwd=tmp_path,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(sig)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert 0 < summary["handled"] < 2000, "stopped mid-stream"
    assert summary["finished"] == summary["handled"]
    done, _ = committed(stack, group)
    assert done == summary["handled"], "what was handled is committed, nothing more"


def test_keyboard_interrupt_in_a_handler_stops_cleanly(
    stack: DevStack, kafka_config: Callable[[], KafkaConsumerConfig]
) -> None:
    produce(stack.brokers, stack.topic, [(k, v) for k, v in generate_events(100)], partition=0)
    config = kafka_config()
    handled: list[str] = []
    consumer = XzeprConsumer(config, drain_timeout=2)

    async def handle(message: CloudEventMessage) -> None:
        if len(handled) == 10:
            raise KeyboardInterrupt
        handled.append(message.id)

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(asyncio.wait_for(consumer.run_with_callback(handle), 60))
    # Per-partition order: the interrupted event is the 11th; it and all after
    # it are replayed by the next run, never committed.
    assert len(handled) == 10
    done, end = committed(stack, config.group_id)
    assert (done, end) == (10, 100)
