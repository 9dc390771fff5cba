"""The incident tools, as the CLI's ``offsets show|reset`` and ``redrive``.

``offsets_show`` prints nothing: it returns each partition's committed offset,
completion map and lag. ``offsets_reset`` moves a group's committed offsets
(refused while the group has members) and clears the completion maps of the
partitions it moves. ``redrive`` produces a dead-letter topic's letters again
to the topics they came from. Each blocks on the brokers (call it from a
thread, e.g. ``asyncio.to_thread``, inside a running loop) and raises
``XzeprConsumerError`` with the cause when the brokers refuse or fail, or
``ConfigError`` for an argument the library refuses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from . import _native
from .config import KafkaConsumerConfig


@dataclass(frozen=True)
class PartitionOffsets:
    """One partition of a group: what ``offsets_show`` returns."""

    partition: int
    #: The group's committed offset (the next to read); None if none.
    committed: int | None
    #: Offsets a completion map says finished above the commit point (None: no
    #: map), or why the map is ignored.
    finished_above: int | None
    map_ignored: str | None
    #: The first offset the broker keeps, and the end.
    low: int
    high: int
    #: From the committed offset to the end; None with nothing committed.
    lag: int | None


@dataclass(frozen=True)
class PartitionMove:
    partition: int
    old: int | None
    new: int
    #: False: already there, left alone (map and all).
    moves: bool
    map_cleared: bool


@dataclass(frozen=True)
class ResetReport:
    topic: str
    dry_run: bool
    #: Whether the broker listed the group's members (and it had none).
    members_checked: bool
    partitions: list[PartitionMove]


@dataclass(frozen=True)
class RedriveReport:
    #: The group the redrive committed in.
    group: str
    dry_run: bool
    #: Letters produced (and acknowledged), by reason.
    moved: dict[str, int]
    #: Letters produced, by the topic they went to.
    to_topics: dict[str, int]
    #: Letters refused as redriven too often: ``(partition, offset)``.
    refused: list[tuple[int, int]]
    #: Letters passed over by the filters.
    skipped: int


def _time(t: datetime | str | None) -> str | None:
    return t.isoformat() if isinstance(t, datetime) else t


def offsets_show(config: KafkaConsumerConfig, group: str, topic: str) -> list[PartitionOffsets]:
    """Per partition of ``topic``: ``group``'s committed offset, map and lag."""
    rows = json.loads(_native.offsets_show(config._to_native(), group, topic))
    return [
        PartitionOffsets(
            partition=r["partition"],
            committed=r["committed"],
            finished_above=(r["map"] or {}).get("finished_above"),
            map_ignored=(r["map"] or {}).get("ignored"),
            low=r["low"],
            high=r["high"],
            lag=r["lag"],
        )
        for r in rows
    ]


def offsets_reset(
    config: KafkaConsumerConfig,
    group: str,
    topic: str,
    *,
    to_earliest: bool = False,
    to_latest: bool = False,
    to_timestamp: datetime | str | None = None,
    shift_by: int | None = None,
    dry_run: bool = False,
) -> ResetReport:
    """Moves ``group``'s offsets of ``topic`` to exactly one of the targets;
    refused while the group has members. A dry run commits nothing."""
    targets = [
        ("earliest", None) if to_earliest else None,
        ("latest", None) if to_latest else None,
        ("timestamp", _time(to_timestamp)) if to_timestamp is not None else None,
        ("shift_by", str(shift_by)) if shift_by is not None else None,
    ]
    chosen = [t for t in targets if t is not None]
    if len(chosen) != 1:
        from .errors import ConfigError

        raise ConfigError(
            "offsets_reset: give exactly one of to_earliest, to_latest, to_timestamp, shift_by"
        )
    to, value = chosen[0]
    r = json.loads(_native.offsets_reset(config._to_native(), group, topic, to, value, dry_run))
    return ResetReport(
        topic=r["topic"],
        dry_run=r["dry_run"],
        members_checked=r["members_checked"],
        partitions=[PartitionMove(**p) for p in r["partitions"]],
    )


def redrive(
    config: KafkaConsumerConfig,
    from_topic: str,
    *,
    to: str | None = None,
    reasons: Sequence[str] = (),
    since: datetime | str | None = None,
    dry_run: bool = False,
    max_redrives: int | None = None,
    group: str | None = None,
) -> RedriveReport:
    """Produces the dead letters of ``from_topic`` again to the topics their
    provenance headers name (or ``to``), with key, payload and headers less
    the dead-letter ones. ``reasons``: ``handler``, ``malformed``,
    ``rejected_post`` (or the header's names); ``since``: only letters
    dead-lettered at or after it."""
    r = json.loads(
        _native.redrive(
            config._to_native(),
            from_topic,
            to,
            list(reasons),
            _time(since),
            dry_run,
            max_redrives,
            group,
        )
    )
    return RedriveReport(
        group=r["group"],
        dry_run=r["dry_run"],
        moved=dict(r["moved"]),
        to_topics=dict(r["to_topics"]),
        refused=[(p, o) for p, o in r["refused"]],
        skipped=r["skipped"],
    )


__all__ = [
    "PartitionMove",
    "PartitionOffsets",
    "RedriveReport",
    "ResetReport",
    "offsets_reset",
    "offsets_show",
    "redrive",
]
