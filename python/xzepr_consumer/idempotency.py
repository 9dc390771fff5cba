"""Idempotency stores: each event's work runs at most once per idempotency
key (the ``idempotency_key`` header, else the CloudEvent ``id``; see
``Settings.idempotency_key``), across replays, rebalances and consumers that
share the store.

Before the handler, the event's key is claimed in the store: processed
before, the event finishes at once, without the handler and without
lifecycle posts (counted in ``Metrics.duplicates``); claimed, the handler
runs, and after a success the key is marked processed once the lifecycle
posts were acknowledged; after a failure the claim is released, so a replay
runs it again.

Give the same store object to several consumers to share its keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from . import _native
from .errors import ConfigError


@dataclass(frozen=True)
class IdempotencyMetrics:
    """A store's counters."""

    #: Works that ran and were marked processed by this store.
    events_processed_total: int
    #: Keys found already processed (their work skipped).
    events_duplicates_total: int
    #: Works that failed (their claims released).
    events_failed_total: int
    #: Keys in the store.
    processed_events_table_size: int
    #: Claim and settle statements run (PostgreSQL; 0 in memory).
    statements_total: int


def _seconds(d: float | timedelta | None) -> float | None:
    return d.total_seconds() if isinstance(d, timedelta) else d


class MemoryStore:
    """Keys in this process's memory, bounded in count (``capacity``, default
    100,000) and time (``retention``, default 1 h); a claim holds its key for
    at most ``lease`` (default 30 s) unless the pipeline renews it. For tests
    and for services without a database: a restart forgets every key.

    Raises:
        ConfigError: a zero capacity or duration, or a lease not shorter than
            the retention.
    """

    def __init__(
        self,
        *,
        capacity: int | None = None,
        retention: float | timedelta | None = None,
        lease: float | timedelta | None = None,
    ) -> None:
        self._native = _native.MemoryStore(
            capacity=capacity, retention=_seconds(retention), lease=_seconds(lease)
        )

    def metrics(self) -> IdempotencyMetrics:
        """The store's counters."""
        return IdempotencyMetrics(**dict(self._native.metrics()))


class PostgresStore:
    """The ``processed_events`` table of a PostgreSQL database, shared by
    every consumer that uses it (the Rust ``IdempotencyGuard``). Open it with
    ``await PostgresStore.connect(dsn)``.

    Only in a build with the ``postgres`` feature (``HAS_POSTGRES``).
    """

    def __init__(self, native: _native.PostgresStore) -> None:
        self._native = native

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        retention: float | timedelta | None = None,
        lease: float | timedelta | None = None,
        max_connections: int = 8,
        migrate: bool = True,
        cleanup_interval: float | timedelta | None = None,
    ) -> PostgresStore:
        """Opens a pool of at most ``max_connections`` on ``dsn``
        (``postgres://user:password@host:port/db``), creates the table if
        ``migrate``, and returns the store. Keys are remembered for
        ``retention`` (default 7 days); with ``cleanup_interval``, older ones
        are deleted that often.

        Raises:
            XzeprConsumerError: the database cannot be reached, or the table
                cannot be created.
            ConfigError: this build has no PostgreSQL store, or a setting is
                refused.
        """
        if not HAS_POSTGRES:
            raise ConfigError(
                "this build of xzepr_consumer has no PostgreSQL store "
                "(build it with the `postgres` feature)"
            )
        native = await _native.PostgresStore.connect(
            dsn,
            retention=_seconds(retention),
            lease=_seconds(lease),
            max_connections=max_connections,
            migrate=migrate,
            cleanup_interval=_seconds(cleanup_interval),
        )
        return cls(native)

    def metrics(self) -> IdempotencyMetrics:
        """The store's counters."""
        return IdempotencyMetrics(**dict(self._native.metrics()))


#: Whether this build has ``PostgresStore``.
HAS_POSTGRES: bool = _native.has_postgres()

#: A store a consumer takes.
IdempotencyStore = MemoryStore | PostgresStore
