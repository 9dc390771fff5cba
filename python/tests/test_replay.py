"""The incident tools from Python: a group's offsets shown and moved, and
dead letters redriven, against the dev stack's broker (the library's own
calls, as the CLI makes them)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from conftest import dead_letter

from xzepr_consumer import (
    ConfigError,
    KafkaConsumerConfig,
)
from xzepr_consumer.devstack import DevStack, committed_offsets, produce
from xzepr_consumer.replay import offsets_reset, offsets_show, redrive


@pytest.fixture
def replay_stack() -> Iterator[DevStack]:
    s = DevStack(partitions=1, token="test-token", extra_topics=["xzepr.dev.events.dlq"])
    yield s
    s.close()


def _event(seq: int) -> tuple[bytes, bytes]:
    body = {
        "id": f"R{seq:025d}",
        "specversion": "1.0.1",
        "type": "replay",
        "source": "xzepr.event.receiver.01M82X4ET7AYGAEYSHF5AKVAVW",
        "success": True,
        "platform_id": "linux",
        "data": {"events": [], "event_receivers": [], "event_receiver_groups": []},
    }
    return f"k{seq}".encode(), json.dumps(body).encode()


def test_offsets_are_shown_and_moved_and_dead_letters_redriven(replay_stack: DevStack) -> None:
    stack = replay_stack
    n = 5
    produce(stack.brokers, stack.topic, [_event(i) for i in range(n)])
    group = f"py-replay-{time.monotonic_ns()}"
    config = KafkaConsumerConfig(
        brokers=stack.brokers, topic=stack.topic, service_name="py-replay", group_id=group
    )

    dead_letter(stack, config, n, ("1", "3"))

    # The mock broker takes a commit from outside a group only if the group
    # never had a member: the offsets are moved in a group of their own.
    other = f"{group}-admin"
    (row,) = offsets_show(config, other, stack.topic)
    assert (row.partition, row.committed, row.high, row.lag) == (0, None, n, None), row
    (row,) = offsets_show(config, group, stack.topic)
    assert (row.committed, row.lag) == (n, 0), row

    with pytest.raises(ConfigError):
        offsets_reset(config, other, stack.topic, to_earliest=True, to_latest=True)
    dry = offsets_reset(config, other, stack.topic, to_latest=True, dry_run=True)
    assert dry.dry_run and [(p.old, p.new, p.moves) for p in dry.partitions] == [(None, n, True)]
    assert offsets_show(config, other, stack.topic)[0].committed is None, "a dry run moves nothing"
    offsets_reset(config, other, stack.topic, to_latest=True)
    done = offsets_reset(config, other, stack.topic, shift_by=-2)
    assert [(p.old, p.new) for p in done.partitions] == [(n, n - 2)]
    assert offsets_show(config, other, stack.topic)[0].lag == 2

    counted = redrive(config, f"{stack.topic}.dlq", reasons=["handler"], dry_run=True)
    assert counted.moved == {"handler_failed": 2} and counted.dry_run, counted
    assert committed_offsets(stack.brokers, group, stack.topic)[0][1] == n
    moved = redrive(config, f"{stack.topic}.dlq", reasons=["handler"])
    assert (moved.moved, moved.to_topics) == ({"handler_failed": 2}, {stack.topic: 2}), moved
    assert committed_offsets(stack.brokers, group, stack.topic)[0][1] == n + 2
