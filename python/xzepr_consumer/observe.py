"""What a running consumer reports about itself: its counters (``Metrics``)
and its health (``Health``), the same values the Rust pipeline serves on
``GET /metrics``, ``/health`` and ``/ready``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Metrics:
    """The pipeline's counters since the consumer started (the Rust
    ``MetricsSnapshot``; a test checks both name the same counters)."""

    #: Messages taken from the source queues.
    consumed: int = 0
    #: Messages that failed to decode (handled per ``Settings.malformed``).
    malformed: int = 0
    #: Events skipped by the type filter.
    filtered: int = 0
    #: Events skipped because their source is this service's own receiver.
    own_skipped: int = 0
    #: Events given to the handler.
    handled: int = 0
    #: Handler attempts that raised (or timed out).
    handler_failed: int = 0
    #: Handler attempts that ran past ``handler_timeout`` (cancelled).
    handler_timeouts: int = 0
    #: ``started`` posts acknowledged by XZepr.
    posted_started: int = 0
    #: ``completed`` posts acknowledged by XZepr.
    posted_completed: int = 0
    #: ``failed`` posts acknowledged by XZepr.
    posted_failed: int = 0
    #: Lifecycle posts given up (their offsets stay uncommitted).
    report_failed: int = 0
    #: Of ``report_failed``: ``started`` posts.
    report_failed_started: int = 0
    #: Of ``report_failed``: ``completed`` posts.
    report_failed_completed: int = 0
    #: Of ``report_failed``: ``failed`` posts.
    report_failed_failed: int = 0
    #: Lifecycle posts XZepr refused for good (their events are dead-lettered).
    report_rejected: int = 0
    #: Handler attempts after the first (the retry policy's).
    retried: int = 0
    #: Events produced to the dead-letter topic and acknowledged.
    dead_lettered: int = 0
    #: Dead-letter produces that failed (their offsets are held).
    dead_letter_failed: int = 0
    #: Events sent to a delay topic and acknowledged (they run again once due).
    delayed: int = 0
    #: Delay-topic produces that failed (produced again; their offsets wait).
    delay_failed: int = 0
    #: Events finished without running: their idempotency key was processed.
    duplicates: int = 0
    #: Idempotency store calls that failed (retried; the event waited).
    idempotency_errors: int = 0
    #: Handed-over messages dropped unhandled because their partition was revoked.
    stale_dropped: int = 0
    #: Offsets finished (handled and reported, or skipped).
    finished: int = 0

    @classmethod
    def _from_native(cls, counters: Mapping[str, int]) -> Metrics:
        return cls(**counters)

    def as_dict(self) -> dict[str, int]:
        """The counters by name (for logging or JSON)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class PartitionState:
    """One assigned partition's progress (in ``Health.stalled_partitions``)."""

    topic: str
    partition: int
    #: The offset a commit would carry now; None before the first message.
    commit_point: int | None
    #: Offsets received and not finished.
    unfinished: int
    #: Of those, held (they will not finish in this assignment).
    held: int
    #: How long the commit point has stood still with work pending, in ms.
    stalled_for_ms: int
    #: How long ago the oldest unfinished offset was received, in ms (0: none).
    oldest_unfinished_ms: int
    #: How long ago, by its Kafka timestamp, the message at the commit point
    #: was produced, in ms (0: nothing unfinished; None: no timestamp).
    commit_point_age_ms: int | None
    stalled: bool
    paused: bool
    #: A delay topic's partition paused until its next event is due: in how
    #: many ms (None otherwise).
    due_in_ms: int | None = None


@dataclass(frozen=True)
class Health:
    """Whether the pipeline is alive and ready, with the facts behind it:
    ``GET /health`` answers 200 when ``alive``, ``GET /ready`` when ``ready``."""

    #: The poll thread runs and no partition is stalled.
    alive: bool
    #: A partition's commit point stood still for the stall timeout.
    stalled: bool
    stalled_partitions: list[PartitionState]
    #: Alive, not stopping, in the group, a broker reachable, XZepr answering.
    ready: bool
    #: A stop was asked for: draining, then gone.
    stopping: bool
    assigned_partitions: int
    group_joined: bool
    broker_reachable: bool
    #: The lifecycle reporter's circuit breaker is open.
    breaker_open: bool
    #: XZepr refuses the reporter's token.
    reporter_unauthorized: bool

    @classmethod
    def _from_native(cls, h: Mapping[str, Any]) -> Health:
        values = dict(h)
        values["stalled_partitions"] = [PartitionState(**p) for p in h["stalled_partitions"]]
        return cls(**values)
