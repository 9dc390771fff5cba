"""XZepr API client for downstream services (async).

Requests run on the Rust core's pooled client (keep-alive, TLS, timeouts) on its
tokio runtime; awaiting one never blocks the event loop. The consumer's automatic
lifecycle posts go through the same client.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from . import _native
from .errors import XzeprClientError


@dataclass
class EventReceiverResponse:
    """Event receiver from an API response."""

    id: str
    name: str
    receiver_type: str
    version: str
    description: str
    schema: dict[str, Any]
    fingerprint: str
    created_at: str

    @classmethod
    def _from_wire(cls, r: dict[str, Any]) -> EventReceiverResponse:
        return cls(
            id=r["id"],
            name=r["name"],
            receiver_type=r.get("type", r.get("receiver_type", "")),
            version=r["version"],
            description=r.get("description", ""),
            schema=r.get("schema") or {},
            fingerprint=r.get("fingerprint", ""),
            created_at=r.get("created_at", ""),
        )


@dataclass
class XzeprClientConfig:
    """XZepr API client configuration (``timeout`` in seconds)."""

    base_url: str
    token: str = field(repr=False)
    timeout: float = 30

    @classmethod
    def from_env(cls) -> XzeprClientConfig:
        """``XZEPR_API_URL`` (default ``http://localhost:8042``) and ``XZEPR_API_TOKEN``.

        An absent or empty token sends no ``Authorization`` header (a server
        without authentication); a server that wants one answers
        ``XzeprAuthError``.
        """
        env = {k: v for k, v in os.environ.items() if k.startswith("XZEPR_")}
        f: dict[str, Any] = _native.client_config_from_env(env)
        return cls(base_url=f["base_url"], token=f["token"], timeout=f["timeout"])


class XzeprClient:
    """XZepr API client (async; ``async with`` closes it)."""

    def __init__(self, config: XzeprClientConfig) -> None:
        self.config = config
        self._native: _native.Client | None = _native.Client(
            config.base_url, config.token, float(config.timeout)
        )

    @classmethod
    def from_env(cls) -> XzeprClient:
        """Create a client from the environment (see ``XzeprClientConfig.from_env``)."""
        return cls(XzeprClientConfig.from_env())

    async def __aenter__(self) -> XzeprClient:
        self._client()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the client (its idle connections are dropped)."""
        self._native = None

    def _client(self) -> _native.Client:
        if self._native is None:
            raise XzeprClientError("the client is closed")
        return self._native

    async def create_event_receiver(
        self,
        name: str,
        receiver_type: str,
        version: str,
        description: str,
        schema: dict[str, Any],
    ) -> str:
        """Create an event receiver; returns its id.

        Raises:
            XzeprApiError: 400 when one with this name and type exists, or the
                fields are invalid.
        """
        return await self._client().create_event_receiver(
            name, receiver_type, version, description, schema
        )

    async def list_event_receivers(
        self,
        name: str | None = None,
        receiver_type: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[EventReceiverResponse]:
        """One page of event receivers (the server may ignore the filters)."""
        rows = await self._client().list_event_receivers(name, receiver_type, limit, offset)
        return [EventReceiverResponse._from_wire(r) for r in rows]

    async def get_event_receiver(self, receiver_id: str) -> EventReceiverResponse:
        """An event receiver by id.

        Raises:
            XzeprNotFoundError: no receiver has this id.
        """
        r = await self._client().get_event_receiver(receiver_id)
        return EventReceiverResponse._from_wire(r)

    async def discover_or_create_event_receiver(
        self,
        name: str,
        receiver_type: str,
        version: str,
        description: str,
        schema: dict[str, Any],
    ) -> str:
        """The id of the receiver with exactly this name and type, created if none.

        Every page is searched; instances creating it at once settle on one
        (earliest ``created_at``, then smallest id).
        """
        return await self._client().discover_or_create_event_receiver(
            name, receiver_type, version, description, schema
        )

    async def create_event(
        self,
        name: str,
        version: str,
        release: str,
        platform_id: str,
        package: str,
        description: str,
        payload: dict[str, Any],
        success: bool,
        event_receiver_id: str,
    ) -> str:
        """Record an event; returns its id."""
        return await self._client().create_event(
            name,
            version,
            release,
            platform_id,
            package,
            description,
            payload,
            success,
            event_receiver_id,
        )

    async def post_work_started(
        self,
        receiver_id: str,
        work_id: str,
        work_name: str,
        version: str,
        platform_id: str,
        package: str,
        payload: dict[str, Any] | None = None,
    ) -> str:
        """Post ``{work_name}.started``; returns the event id."""
        return await self._client().post_work_started(
            receiver_id, work_id, work_name, version, platform_id, package, payload
        )

    async def post_work_completed(
        self,
        receiver_id: str,
        work_id: str,
        work_name: str,
        version: str,
        platform_id: str,
        package: str,
        success: bool,
        payload: dict[str, Any] | None = None,
    ) -> str:
        """Post ``{work_name}.completed`` (or ``.failed`` when not ``success``)."""
        return await self._client().post_work_completed(
            receiver_id, work_id, work_name, version, platform_id, package, success, payload
        )

    async def post_work_failed(
        self,
        receiver_id: str,
        work_id: str,
        work_name: str,
        version: str,
        platform_id: str,
        package: str,
        error: str,
        error_code: str = "handler_error",
        payload: dict[str, Any] | None = None,
    ) -> str:
        """Post ``{work_name}.failed`` with the error and its code."""
        return await self._client().post_work_failed(
            receiver_id,
            work_id,
            work_name,
            version,
            platform_id,
            package,
            error,
            error_code,
            payload,
        )
