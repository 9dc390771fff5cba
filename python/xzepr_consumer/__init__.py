"""XZepr Consumer: Kafka consumer for XZepr CloudEvents messages, on a Rust core.

Handlers are ``async def`` coroutines on your asyncio loop; Kafka, decoding,
ordering, retries, dead letters, idempotency, offsets, lifecycle reporting and
the metrics endpoint run in Rust.
"""

from .client import (
    EventReceiverResponse,
    XzeprClient,
    XzeprClientConfig,
)
from .config import (
    KafkaConsumerConfig,
    SaslConfig,
    SaslMechanism,
    SecurityProtocol,
    SslConfig,
)
from .consumer import BatchCallback, BatchResult, MessageHandler, XzeprConsumer
from .errors import (
    ConfigError,
    DecodeError,
    PermanentError,
    XzeprApiError,
    XzeprAuthError,
    XzeprClientError,
    XzeprConsumerError,
    XzeprNotFoundError,
)
from .idempotency import IdempotencyMetrics, MemoryStore, PostgresStore
from .message import (
    CloudEventData,
    CloudEventMessage,
    EventEntity,
    EventReceiverEntity,
    EventReceiverGroupEntity,
    KafkaRecord,
)
from .observe import Health, Metrics, PartitionState
from .settings import (
    Adaptive,
    Assignment,
    DeadLetter,
    DecoderLimits,
    Duration,
    IdempotencyKey,
    MalformedPolicy,
    Ordering,
    RateLimit,
    RetryPolicy,
    Settings,
)
from .trace import HAS_OTEL, TraceContext, Tracing, init_tracing

__all__ = [
    "HAS_OTEL",
    "Adaptive",
    "Assignment",
    "BatchCallback",
    "BatchResult",
    "CloudEventData",
    "CloudEventMessage",
    "ConfigError",
    "DeadLetter",
    "DecodeError",
    "DecoderLimits",
    "Duration",
    "EventEntity",
    "EventReceiverEntity",
    "EventReceiverGroupEntity",
    "EventReceiverResponse",
    "Health",
    "IdempotencyKey",
    "IdempotencyMetrics",
    "KafkaConsumerConfig",
    "KafkaRecord",
    "MalformedPolicy",
    "MemoryStore",
    "MessageHandler",
    "Metrics",
    "Ordering",
    "PartitionState",
    "PermanentError",
    "PostgresStore",
    "RateLimit",
    "RetryPolicy",
    "SaslConfig",
    "SaslMechanism",
    "SecurityProtocol",
    "Settings",
    "SslConfig",
    "TraceContext",
    "Tracing",
    "XzeprApiError",
    "XzeprAuthError",
    "XzeprClient",
    "XzeprClientConfig",
    "XzeprClientError",
    "XzeprConsumer",
    "XzeprConsumerError",
    "XzeprNotFoundError",
    "init_tracing",
]

__version__ = "0.1.0"
