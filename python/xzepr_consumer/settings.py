"""The pipeline's settings: every field of the Rust library's ``PipelineConfig``.

``Settings`` is the typed way to write them; ``XzeprConsumer`` also takes a
mapping of ``PipelineConfig`` keys (what the CLI's ``--config`` file holds).
Either way the settings are sent to Rust as one JSON object and read there by
``PipelineConfig::from_json``, so Python accepts and refuses exactly what the
library and the CLI do; a refusal is a ``ConfigError`` naming the setting.

Durations are seconds (``int`` or ``float``), a ``datetime.timedelta``, or text
as in a configuration file (``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``).

The defaults are the library's (a test compares them); the reason for each is
on the setter of the same name of the Rust ``PipelineBuilder``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from . import _native

#: A duration: seconds, a ``timedelta``, or text such as ``"500ms"`` or ``"30s"``.
Duration = float | int | str | timedelta


class Ordering(str, Enum):
    """What may run at once (the Rust pipeline's ordering modes).

    The configuration file's names (``per_partition``, ``per_key``) are
    accepted too.
    """

    #: One event of a partition at a time, in offset order (the default).
    PER_PARTITION = "partition"
    #: One event per message key at a time, in offset order within the key.
    PER_KEY = "key"
    #: Any event as soon as there is room under ``max_in_flight``.
    UNORDERED = "unordered"

    @classmethod
    def _missing_(cls, value: object) -> Ordering | None:
        return {"per_partition": cls.PER_PARTITION, "per_key": cls.PER_KEY}.get(str(value))

    def _config(self) -> str:
        return {"partition": "per_partition", "key": "per_key"}.get(self.value, self.value)


class Assignment(str, Enum):
    """How a rebalance moves partitions between the group's members. Every
    member of a group must use the same."""

    #: Every rebalance revokes and drains every partition (the default).
    EAGER = "eager"
    #: Cooperative-sticky: only the partitions that move are revoked and
    #: drained; the others keep being handled through the rebalance.
    COOPERATIVE = "cooperative"


class MalformedPolicy(str, Enum):
    """What a message that does not decode does."""

    #: Finish its offset: one bad message must not stall its partition (default).
    SKIP = "skip"
    #: Hold its offset: nothing after it in its partition is committed.
    HOLD = "hold"
    #: Produce it unchanged to the dead-letter topic (which it needs).
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed handler call is retried; only the event's lane waits.

    ``max_attempts`` counts the first one (1: no retry, the default). The
    wait before attempt *n* is random up to ``backoff_base * 2**(n-2)``, at
    most ``backoff_max``. An exception is retried with ``retry_errors``, a
    ``handler_timeout`` with ``retry_timeouts``.

    ``delay_topics`` are long delays after those attempts (e.g.
    ``["1m", "10m", "1h"]``): the event is produced to
    ``<topic>.retry.<delay>`` for each in turn (the topics must exist), its
    offset finished once the broker took it, and runs again once due, with its
    attempts carried and no second ``started``; after the last one it fails for
    good. It leaves its key's order.
    """

    max_attempts: int = 1
    backoff_base: Duration = 0.2
    backoff_max: Duration = 30.0
    retry_errors: bool = True
    retry_timeouts: bool = True
    #: A Rust handler's panic; a Python handler's exceptions are errors.
    retry_panics: bool = False
    delay_topics: Sequence[Duration] = ()

    def _config(self) -> dict[str, Any]:
        return {
            "max_attempts": self.max_attempts,
            "backoff_base": _duration(self.backoff_base),
            "backoff_max": _duration(self.backoff_max),
            "retry_errors": self.retry_errors,
            "retry_timeouts": self.retry_timeouts,
            "retry_panics": self.retry_panics,
            "delay_topics": [_duration(d) for d in self.delay_topics],
        }


@dataclass(frozen=True)
class DeadLetter:
    """The dead-letter topic: an event whose last attempt failed (and a
    malformed message under ``MalformedPolicy.DEAD_LETTER``) is produced to it
    with its key, payload and headers, plus headers saying why; its offset
    finishes once the broker acknowledged that.

    ``topic`` defaults to ``<topic>.dlq``; ``properties`` are librdkafka
    producer properties (the consumer's connection settings are reused).
    """

    topic: str | None = None
    message_timeout: Duration = 30.0
    properties: Mapping[str, str] = field(default_factory=dict)

    def _config(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "message_timeout": _duration(self.message_timeout),
            "properties": dict(self.properties),
        }


@dataclass(frozen=True)
class DecoderLimits:
    """Limits of the CloudEvents decoder."""

    max_payload_bytes: int = 1 << 20
    max_depth: int = 128
    simd_min_bytes: int = 4096

    def _config(self) -> dict[str, Any]:
        return {
            "max_payload_bytes": self.max_payload_bytes,
            "max_depth": self.max_depth,
            "simd_min_bytes": self.simd_min_bytes,
        }


@dataclass(frozen=True)
class IdempotencyKey:
    """Where an event's idempotency key comes from (used with a store):
    the Kafka header ``header`` (falling back to the CloudEvent ``id``), or,
    with ``header=None``, always the CloudEvent ``id``."""

    header: str | None = "idempotency_key"

    @classmethod
    def event_id(cls) -> IdempotencyKey:
        """Always the CloudEvent ``id``."""
        return cls(header=None)

    def _config(self) -> Any:
        return "event_id" if self.header is None else {"header": self.header}


@dataclass(frozen=True)
class Adaptive:
    """An adaptive concurrency limit: starts at ``min``, grows while the
    service's latency stays near its lowest, and is cut on rising latency,
    timeouts and overload answers (a handler's ``overloaded`` error, 429/503),
    never past ``max``."""

    min: int = 1
    max: int = 256

    def _config(self) -> Any:
        return {"adaptive": {"min": self.min, "max": self.max}}


@dataclass(frozen=True)
class RateLimit:
    """At most ``per_second`` events a second reach the handler, with bursts
    of ``burst`` (default: a tenth of a second's worth); ``per_key``: one
    bucket per message key, at most ``max_keys`` kept. Events wait in their
    lanes for a token: none is dropped or failed."""

    per_second: float
    burst: int | None = None
    per_key: bool = False
    max_keys: int = 10_000

    def _config(self) -> Any:
        return {
            "per_second": self.per_second,
            "burst": self.burst,
            "per_key": self.per_key,
            "max_keys": self.max_keys,
        }


def _concurrency(c: int | Adaptive) -> Any:
    return c._config() if isinstance(c, Adaptive) else c


@dataclass(frozen=True)
class Settings:
    """Every data setting of the pipeline, with the library's defaults.

    ``workers`` is not here: Python handlers run on the asyncio loop, not on
    the pipeline's worker threads.
    """

    #: What may run at once.
    ordering: Ordering | str = Ordering.PER_PARTITION
    #: How a rebalance moves partitions (eager or cooperative).
    assignment: Assignment | str = Assignment.EAGER
    #: Most handlers running at once (a number, or ``Adaptive(min, max)``);
    #: past it, events wait in their lanes.
    max_in_flight: int | Adaptive = 1024
    #: Most waiting events of one lane handed over as one job.
    batch: int = 64
    #: Bytes of events buffered; over it, arriving partitions pause.
    buffer_budget: int = 16 << 20
    #: Events buffered; over it, arriving partitions pause.
    max_buffered: int = 50_000
    #: How long polling stops, the buffers full, before partitions pause.
    pause_after: Duration = 1.0
    #: How often finished offsets are committed.
    commit_interval: Duration = 1.0
    #: How long a stop or revoke waits for running handlers before cancelling them.
    drain_timeout: Duration = 10.0
    #: Longest single wait in ``poll`` while nothing runs.
    poll_interval: Duration = 0.05
    #: Offsets tracked per partition; at the limit the partition pauses.
    max_tracked: int = 100_000
    #: Whether commits carry the offsets finished above the commit point.
    completion_map: bool = True
    #: Most bytes of one partition's completion map.
    completion_map_max_bytes: int = 2048
    #: How long a commit point may stand still with work pending before health
    #: answers not alive; None turns detection off.
    stall_timeout: Duration | None = 300.0
    #: Where a partition the group has no committed offset for starts:
    #: ``"committed"`` (as ``auto_offset_reset`` says), ``"earliest"``,
    #: ``"latest"``, or a time (an aware ``datetime`` or RFC 3339 text) for the
    #: first event at or after it. A committed offset always wins.
    start_from: str | datetime = "committed"
    #: How long a handler may run before it is cancelled and its attempt fails
    #: with code ``timeout``; None: no limit.
    handler_timeout: Duration | None = None
    #: How failed handler calls are retried.
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: Event types that reach the handler: prefixes (``deployment.``) or globs
    #: (``*.failed``); empty: all. The rest are committed at once, unhandled.
    types: Sequence[str] = ()
    #: Skip events whose source is the service's own receiver.
    skip_own_events: bool = True
    #: The service's own receiver id, when the handler posts by itself (set by
    #: the pipeline when it reports).
    own_receiver_id: str | None = None
    #: What a message that does not decode does.
    malformed: MalformedPolicy | str = MalformedPolicy.SKIP
    #: Decoder limits.
    decoder: DecoderLimits = field(default_factory=DecoderLimits)
    #: The dead-letter topic; None: none.
    dead_letter: DeadLetter | None = None
    #: Where the idempotency key comes from (with an ``idempotency`` store).
    idempotency_key: IdempotencyKey = field(default_factory=IdempotencyKey)
    #: Where ``GET /metrics``, ``/health`` and ``/ready`` are served
    #: (``"host:port"``; port 0 picks a free one); None: not served.
    metrics_addr: str | None = None
    #: Events a second that reach the handler; None: no limit.
    rate_limit: RateLimit | None = None
    #: The lifecycle reporter's posts in flight (a number, or ``Adaptive``).
    report_concurrency: int | Adaptive = 128
    #: A span per event and per step. On by itself while ``init_tracing()``
    #: exports; needs a build with ``HAS_OTEL``.
    traces: bool = False

    def to_config(self) -> dict[str, Any]:
        """The ``PipelineConfig`` JSON object of these settings."""
        return {
            "ordering": Ordering(self.ordering)._config(),
            "assignment": Assignment(self.assignment).value,
            "max_in_flight": _concurrency(self.max_in_flight),
            "batch": self.batch,
            "buffer_budget": self.buffer_budget,
            "max_buffered": self.max_buffered,
            "pause_after": _duration(self.pause_after),
            "commit_interval": _duration(self.commit_interval),
            "drain_timeout": _duration(self.drain_timeout),
            "poll_interval": _duration(self.poll_interval),
            "max_tracked": self.max_tracked,
            "completion_map": self.completion_map,
            "completion_map_max_bytes": self.completion_map_max_bytes,
            "stall_timeout": _optional_duration(self.stall_timeout),
            "start_from": _start_from(self.start_from),
            "handler_timeout": _optional_duration(self.handler_timeout),
            "retry": self.retry._config(),
            "types": _types(self.types),
            "skip_own_events": self.skip_own_events,
            "own_receiver_id": self.own_receiver_id,
            "malformed": MalformedPolicy(self.malformed).value,
            "decoder": self.decoder._config(),
            "dead_letter": None if self.dead_letter is None else self.dead_letter._config(),
            "idempotency_key": self.idempotency_key._config(),
            "metrics_addr": self.metrics_addr,
            "rate_limit": None if self.rate_limit is None else self.rate_limit._config(),
            "report_concurrency": _concurrency(self.report_concurrency),
            "traces": self.traces,
        }


def resolve(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (``PipelineConfig`` keys) as the library reads it: every
    default filled in, durations as text, as the CLI's ``--print-config``.

    Raises:
        ConfigError: a setting the library refuses, named in the message.
    """
    resolved: dict[str, Any] = json.loads(_native.resolve_settings(json.dumps(dict(config))))
    return resolved


def _types(types: Sequence[str]) -> list[str]:
    if isinstance(types, str):
        # One pattern, not its characters.
        return [types]
    return list(types)


def _start_from(s: str | datetime) -> str:
    """``start_from`` as ``PipelineConfig`` reads it: a name, or RFC 3339."""
    if isinstance(s, datetime):
        if s.tzinfo is None:
            raise ValueError("start_from: a datetime needs a time zone (e.g. timezone.utc)")
        return s.isoformat()
    return s


def _duration(d: Duration) -> str | float | int:
    """A duration as ``PipelineConfig`` reads it: whole milliseconds as exact
    text, anything else as seconds (text and ints pass through)."""
    if isinstance(d, timedelta):
        d = d.total_seconds()
    if isinstance(d, bool) or not isinstance(d, (int, float, str)):
        raise TypeError(f"a duration is seconds, a timedelta or text like '30s', not {d!r}")
    if isinstance(d, float):
        ms = round(d * 1000)
        if abs(ms - d * 1000) < 1e-6 and ms >= 0:
            return f"{ms}ms"
    return d


def _optional_duration(d: Duration | None) -> str | float | int | None:
    return None if d is None else _duration(d)
