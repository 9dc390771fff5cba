"""CloudEvents message types for XZepr, as dataclasses.

The consumer builds them in Rust from the one copy of each Kafka payload; they
are plain dataclasses all the same (attribute access, ``==``, ``repr``,
``dataclasses.asdict``). ``to_dict`` gives the wire shape (``type`` keys, RFC 3339
timestamps), which ``from_dict`` reads back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import _native
from .trace import TraceContext


def _time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    return _native.parse_timestamp(str(value))


def _rfc3339(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _extras(owner_id: str | None, resource_version: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if owner_id is not None:
        out["owner_id"] = owner_id
    if resource_version is not None:
        out["resource_version"] = resource_version
    return out


@dataclass
class EventEntity:
    """Event entity from XZepr."""

    id: str
    name: str
    version: str
    release: str
    platform_id: str
    package: str
    description: str
    payload: dict[str, Any]
    success: bool
    event_receiver_id: str
    created_at: datetime
    owner_id: str | None = None
    resource_version: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EventEntity:
        """Create from a dictionary in the wire shape."""
        return cls(
            id=data["id"],
            name=data["name"],
            version=data["version"],
            release=data["release"],
            platform_id=data["platform_id"],
            package=data["package"],
            description=data.get("description", ""),
            payload=data["payload"],
            success=data["success"],
            event_receiver_id=data["event_receiver_id"],
            created_at=_time(data["created_at"]),
            owner_id=data.get("owner_id"),
            resource_version=data.get("resource_version"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Convert to a JSON-ready dictionary in the wire shape."""
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "release": self.release,
            "platform_id": self.platform_id,
            "package": self.package,
            "description": self.description,
            "payload": self.payload,
            "success": self.success,
            "event_receiver_id": self.event_receiver_id,
            **_extras(self.owner_id, self.resource_version),
            "created_at": _rfc3339(self.created_at),
        }


@dataclass
class EventReceiverEntity:
    """Event receiver entity from XZepr."""

    id: str
    name: str
    receiver_type: str
    version: str
    description: str
    schema: dict[str, Any]
    fingerprint: str
    created_at: datetime
    owner_id: str | None = None
    resource_version: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EventReceiverEntity:
        """Create from a dictionary (``type`` or ``receiver_type``)."""
        return cls(
            id=data["id"],
            name=data["name"],
            receiver_type=data.get("type", data.get("receiver_type", "")),
            version=data["version"],
            description=data.get("description", ""),
            schema=data["schema"],
            fingerprint=data.get("fingerprint", ""),
            created_at=_time(data["created_at"]),
            owner_id=data.get("owner_id"),
            resource_version=data.get("resource_version"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Convert to a JSON-ready dictionary in the wire shape."""
        return {
            "id": self.id,
            "name": self.name,
            "type": self.receiver_type,
            "version": self.version,
            "description": self.description,
            "schema": self.schema,
            "fingerprint": self.fingerprint,
            **_extras(self.owner_id, self.resource_version),
            "created_at": _rfc3339(self.created_at),
        }


@dataclass
class EventReceiverGroupEntity:
    """Event receiver group entity from XZepr."""

    id: str
    name: str
    group_type: str
    version: str
    description: str
    enabled: bool
    event_receiver_ids: list[str]
    created_at: datetime
    updated_at: datetime
    owner_id: str | None = None
    resource_version: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EventReceiverGroupEntity:
        """Create from a dictionary (``type`` or ``group_type``)."""
        return cls(
            id=data["id"],
            name=data["name"],
            group_type=data.get("type", data.get("group_type", "")),
            version=data["version"],
            description=data.get("description", ""),
            enabled=data["enabled"],
            event_receiver_ids=list(data.get("event_receiver_ids", [])),
            created_at=_time(data["created_at"]),
            updated_at=_time(data["updated_at"]),
            owner_id=data.get("owner_id"),
            resource_version=data.get("resource_version"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Convert to a JSON-ready dictionary in the wire shape."""
        return {
            "id": self.id,
            "name": self.name,
            "type": self.group_type,
            "version": self.version,
            "description": self.description,
            "enabled": self.enabled,
            "event_receiver_ids": list(self.event_receiver_ids),
            **_extras(self.owner_id, self.resource_version),
            "created_at": _rfc3339(self.created_at),
            "updated_at": _rfc3339(self.updated_at),
        }


@dataclass
class CloudEventData:
    """Data payload for CloudEvents messages."""

    events: list[EventEntity] = field(default_factory=list)
    event_receivers: list[EventReceiverEntity] = field(default_factory=list)
    event_receiver_groups: list[EventReceiverGroupEntity] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CloudEventData:
        """Create from a dictionary in the wire shape."""
        return cls(
            events=[EventEntity.from_dict(e) for e in data.get("events", [])],
            event_receivers=[
                EventReceiverEntity.from_dict(r) for r in data.get("event_receivers", [])
            ],
            event_receiver_groups=[
                EventReceiverGroupEntity.from_dict(g) for g in data.get("event_receiver_groups", [])
            ],
        )

    def to_dict(self) -> dict[str, Any]:
        """Convert to a JSON-ready dictionary in the wire shape."""
        return {
            "events": [e.to_dict() for e in self.events],
            "event_receivers": [r.to_dict() for r in self.event_receivers],
            "event_receiver_groups": [g.to_dict() for g in self.event_receiver_groups],
        }


@dataclass(frozen=True)
class KafkaRecord:
    """The Kafka record an event came in (``CloudEventMessage.kafka``)."""

    topic: str
    partition: int
    offset: int
    #: The key; None when the record has none.
    key: bytes | None
    #: The headers in order, as ``(name, value)``; a name may repeat, and a
    #: null value is empty.
    headers: list[tuple[str, bytes]]
    #: Milliseconds since the epoch; None when the broker gave none.
    timestamp: int | None
    #: ``"CreateTime"`` (set by the producer) or ``"LogAppendTime"`` (by the
    #: broker); None with no timestamp.
    timestamp_type: str | None

    def header(self, name: str) -> bytes | None:
        """The value of the first header named ``name`` (names compare exactly)."""
        return next((v for k, v in self.headers if k == name), None)


@dataclass
class CloudEventMessage:
    """CloudEvents 1.0.1 message from XZepr.

    ``kafka`` is the record it came in, set on the messages a consumer hands
    to its handler (None on a message decoded by hand). ``trace_context`` is
    the handler attempt span's W3C context while spans are exported
    (``init_tracing()``), for the handler to continue the trace; None
    otherwise, and for a batch handler's messages (a call for many events runs
    in no one event's span). The producer's own context stays in
    ``kafka.header("traceparent")``.
    """

    success: bool
    id: str
    specversion: str
    event_type: str
    source: str
    api_version: str
    name: str
    version: str
    release: str
    platform_id: str
    package: str
    data: CloudEventData
    kafka: KafkaRecord | None = None
    trace_context: TraceContext | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CloudEventMessage:
        """Create from a dictionary in the wire shape (checked as the consumer checks)."""
        return cls.from_json(json.dumps(data))

    @classmethod
    def from_json(cls, json_str: str | bytes) -> CloudEventMessage:
        """Decode with the consumer's own decoder.

        Raises:
            DecodeError: the text is not an XZepr CloudEvent; says what is wrong.
        """
        payload = json_str.encode() if isinstance(json_str, str) else json_str
        return _native.decode(payload)

    def to_dict(self) -> dict[str, Any]:
        """Convert to a JSON-ready dictionary in the wire shape."""
        return {
            "success": self.success,
            "id": self.id,
            "specversion": self.specversion,
            "type": self.event_type,
            "source": self.source,
            "api_version": self.api_version,
            "name": self.name,
            "version": self.version,
            "release": self.release,
            "platform_id": self.platform_id,
            "package": self.package,
            "data": self.data.to_dict(),
        }
