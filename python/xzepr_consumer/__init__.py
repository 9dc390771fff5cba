"""XZepr Consumer: Kafka consumer for XZepr CloudEvents messages, on a Rust core.

Handlers are ``async def`` coroutines on your asyncio loop; Kafka, decoding,
ordering, offsets and lifecycle reporting run in Rust.
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
from .consumer import MessageHandler, Ordering, XzeprConsumer
from .errors import (
    ConfigError,
    DecodeError,
    XzeprApiError,
    XzeprAuthError,
    XzeprClientError,
    XzeprConsumerError,
    XzeprNotFoundError,
)
from .message import (
    CloudEventData,
    CloudEventMessage,
    EventEntity,
    EventReceiverEntity,
    EventReceiverGroupEntity,
)

__all__ = [
    "CloudEventData",
    "CloudEventMessage",
    "ConfigError",
    "DecodeError",
    "EventEntity",
    "EventReceiverEntity",
    "EventReceiverGroupEntity",
    "EventReceiverResponse",
    "KafkaConsumerConfig",
    "MessageHandler",
    "Ordering",
    "SaslConfig",
    "SaslMechanism",
    "SecurityProtocol",
    "SslConfig",
    "XzeprApiError",
    "XzeprAuthError",
    "XzeprClient",
    "XzeprClientConfig",
    "XzeprClientError",
    "XzeprConsumer",
    "XzeprConsumerError",
    "XzeprNotFoundError",
]

__version__ = "0.1.0"
