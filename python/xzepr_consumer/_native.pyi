"""Type stubs of the native module (the Rust core's bindings)."""

from collections.abc import Awaitable
from datetime import datetime
from typing import Any

from .message import CloudEventMessage

__version__: str

def decode(payload: bytes, headers: list[tuple[str, bytes]] | None = None) -> CloudEventMessage: ...
def parse_timestamp(text: str) -> datetime: ...
def kafka_config_from_env(service_name: str, env: dict[str, str]) -> dict[str, Any]: ...
def check_kafka_config(config: dict[str, Any]) -> list[tuple[str, str]]: ...
def offsets_show(kafka: dict[str, Any], group: str, topic: str) -> str: ...
def offsets_reset(
    kafka: dict[str, Any],
    group: str,
    topic: str,
    to: str,
    value: str | None = None,
    dry_run: bool = False,
) -> str: ...
def redrive(
    kafka: dict[str, Any],
    from_topic: str,
    to: str | None = None,
    reasons: list[str] = ...,
    since: str | None = None,
    dry_run: bool = False,
    max_redrives: int | None = None,
    group: str | None = None,
) -> str: ...
def client_config_from_env(env: dict[str, str]) -> dict[str, Any]: ...

class Client:
    def __init__(self, base_url: str, token: str, timeout_s: float = 30.0) -> None: ...
    def create_event_receiver(
        self,
        name: str,
        receiver_type: str,
        version: str,
        description: str,
        schema: dict[str, Any] | None,
    ) -> Awaitable[str]: ...
    def list_event_receivers(
        self,
        name: str | None = None,
        receiver_type: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Awaitable[list[dict[str, Any]]]: ...
    def get_event_receiver(self, receiver_id: str) -> Awaitable[dict[str, Any]]: ...
    def discover_or_create_event_receiver(
        self,
        name: str,
        receiver_type: str,
        version: str,
        description: str,
        schema: dict[str, Any] | None,
    ) -> Awaitable[str]: ...
    def create_event(
        self,
        name: str,
        version: str,
        release: str,
        platform_id: str,
        package: str,
        description: str,
        payload: dict[str, Any] | None,
        success: bool,
        event_receiver_id: str,
    ) -> Awaitable[str]: ...
    def post_work_started(
        self,
        receiver_id: str,
        work_id: str,
        work_name: str,
        version: str,
        platform_id: str,
        package: str,
        payload: dict[str, Any] | None = None,
    ) -> Awaitable[str]: ...
    def post_work_completed(
        self,
        receiver_id: str,
        work_id: str,
        work_name: str,
        version: str,
        platform_id: str,
        package: str,
        success: bool,
        payload: dict[str, Any] | None = None,
    ) -> Awaitable[str]: ...
    def post_work_failed(
        self,
        receiver_id: str,
        work_id: str,
        work_name: str,
        version: str,
        platform_id: str,
        package: str,
        error: str,
        error_code: str,
        payload: dict[str, Any] | None = None,
    ) -> Awaitable[str]: ...

class Token:
    @property
    def abandoned(self) -> bool: ...
    @property
    def work_id(self) -> str: ...
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    def done(self, details: dict[str, Any] | None = None) -> bool: ...
    def fail(self, error_type: str, message: str, permanent: bool = False) -> bool: ...

class Completions:
    def __init__(self) -> None: ...
    def fileno(self) -> int: ...
    def drain(self) -> list[tuple[int, bool, Any]]: ...
    def cancel(self, id: int) -> None: ...
    def __len__(self) -> int: ...

class Consumer:
    def __init__(
        self,
        config: dict[str, Any],
        settings: str,
        *,
        client: Client | None = None,
        reporting: dict[str, str] | None = None,
        idempotency: MemoryStore | PostgresStore | None = None,
        batch: bool = False,
    ) -> None: ...
    def take(self, max: int) -> list[tuple[int, CloudEventMessage, Token, int | None]]: ...
    def dropped(self) -> list[int]: ...
    def fileno(self) -> int: ...
    def clear_wake(self) -> None: ...
    def shutdown(self) -> None: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def finished(self) -> bool: ...
    def join(self) -> Awaitable[bool]: ...
    def metrics(self) -> dict[str, int]: ...
    def health(self) -> dict[str, Any] | None: ...
    @property
    def metrics_addr(self) -> str | None: ...

class MemoryStore:
    def __init__(
        self,
        *,
        capacity: int | None = None,
        retention: float | None = None,
        lease: float | None = None,
    ) -> None: ...
    def metrics(self) -> list[tuple[str, int]]: ...

class PostgresStore:
    @staticmethod
    def connect(
        dsn: str,
        *,
        retention: float | None = None,
        lease: float | None = None,
        max_connections: int = 8,
        migrate: bool = True,
        cleanup_interval: float | None = None,
    ) -> Awaitable[PostgresStore]: ...
    def metrics(self) -> list[tuple[str, int]]: ...

def has_postgres() -> bool: ...
def setting_names() -> list[str]: ...
def metric_names() -> list[str]: ...
def default_settings() -> tuple[str, str]: ...
def resolve_settings(text: str, kafka: dict[str, Any] | None = None) -> str: ...

class StandIn:
    def __init__(self, token: str = "dev-token", latency_ms: int = 5) -> None: ...
    @property
    def url(self) -> str: ...
    @property
    def token(self) -> str: ...
    def stats(self) -> dict[str, int]: ...
    def recorded_events(self) -> list[dict[str, Any]]: ...
    def receivers(self) -> list[dict[str, Any]]: ...
    def insert_receiver(self, id: str, name: str, receiver_type: str) -> None: ...
    def close(self) -> None: ...

class DevStack:
    def __init__(
        self,
        partitions: int = 3,
        api_latency_ms: int = 5,
        token: str = "dev-token",
        topic: str = "xzepr.dev.events",
        extra_topics: list[str] = ...,
    ) -> None: ...
    @property
    def brokers(self) -> str: ...
    @property
    def topic(self) -> str: ...
    @property
    def partitions(self) -> int: ...
    @property
    def api(self) -> StandIn: ...
    def env(self) -> dict[str, str]: ...
    def close(self) -> None: ...

def produce(
    brokers: str,
    topic: str,
    messages: list[tuple[bytes | None, bytes]],
    partition: int | None = None,
    config: list[tuple[str, str]] = ...,
    headers: list[tuple[str, bytes]] = ...,
) -> int: ...
def generate_events(
    count: int, start: int = 0, receiver_id: str = "01M82X4ET7AYGAEYSHF5AKVAVW"
) -> list[tuple[bytes, bytes]]: ...
def committed_offsets(
    brokers: str, group_id: str, topic: str, config: list[tuple[str, str]] = ...
) -> dict[int, tuple[int, int]]: ...
def read_topic(
    brokers: str,
    topic: str,
    count: int,
    timeout_s: float = 20.0,
    config: list[tuple[str, str]] = ...,
) -> list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]: ...
