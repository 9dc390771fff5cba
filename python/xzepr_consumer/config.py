"""Configuration for the XZepr Kafka consumer.

``KafkaConsumerConfig.from_env`` reads the contract's ``XZEPR_KAFKA_*`` variables
with the Rust core's own reader, so both languages accept and refuse the same
values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from . import _native
from .errors import ConfigError


class SecurityProtocol(Enum):
    """Kafka security protocol."""

    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class SaslMechanism(Enum):
    """SASL authentication mechanism."""

    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


@dataclass
class SaslConfig:
    """SASL authentication configuration."""

    mechanism: SaslMechanism
    username: str
    password: str = field(repr=False)


@dataclass
class SslConfig:
    """SSL/TLS configuration (PEM files)."""

    ca_location: str | None = None
    certificate_location: str | None = None
    key_location: str | None = None


@dataclass
class KafkaConsumerConfig:
    """Kafka consumer configuration.

    ``enable_auto_commit`` stays False: the consumer commits an offset only once
    its handler finished and its lifecycle posts were acknowledged; True is
    refused. ``extra`` holds any other librdkafka property (it wins over the
    library's defaults, except the ones the library owns, which are refused).
    """

    brokers: str
    topic: str
    service_name: str
    group_id: str = ""
    #: Static group membership (``XZEPR_KAFKA_GROUP_INSTANCE_ID``): this
    #: instance's own stable name, e.g. its pod name. A restart inside the
    #: session timeout takes its partitions back without a rebalance. None:
    #: dynamic membership.
    group_instance_id: str | None = None
    security_protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    sasl_config: SaslConfig | None = None
    ssl_config: SslConfig | None = None
    auto_offset_reset: str = "earliest"
    enable_auto_commit: bool = False
    session_timeout_ms: int = 30000
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Set the default group_id if not provided."""
        if not self.group_id:
            self.group_id = f"xzepr-consumer-{self.service_name}"

    @classmethod
    def from_env(cls, service_name: str) -> KafkaConsumerConfig:
        """Load the configuration from the ``XZEPR_KAFKA_*`` environment variables.

        Raises:
            ConfigError: a variable holds a value the consumer refuses.
        """
        env = {k: v for k, v in os.environ.items() if k.startswith("XZEPR_")}
        f: dict[str, Any] = _native.kafka_config_from_env(service_name, env)
        protocol = SecurityProtocol(f["security_protocol"])
        sasl = None
        if protocol in (SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL):
            if f["sasl_username"] is None or f["sasl_password"] is None:
                raise ConfigError(
                    "XZEPR_KAFKA_SASL_USERNAME and XZEPR_KAFKA_SASL_PASSWORD are required "
                    f"with XZEPR_KAFKA_SECURITY_PROTOCOL={protocol.value}"
                )
            sasl = SaslConfig(
                mechanism=SaslMechanism(f["sasl_mechanism"]),
                username=f["sasl_username"],
                password=f["sasl_password"],
            )
        ssl = None
        if any(f[k] for k in ("ssl_ca_location", "ssl_certificate_location", "ssl_key_location")):
            ssl = SslConfig(
                ca_location=f["ssl_ca_location"],
                certificate_location=f["ssl_certificate_location"],
                key_location=f["ssl_key_location"],
            )
        return cls(
            brokers=f["brokers"],
            topic=f["topic"],
            service_name=service_name,
            group_id=f["group_id"],
            group_instance_id=f["group_instance_id"],
            security_protocol=protocol,
            sasl_config=sasl,
            ssl_config=ssl,
            auto_offset_reset=f["auto_offset_reset"],
            session_timeout_ms=f["session_timeout_ms"],
        )

    def to_confluent_config(self) -> dict[str, str]:
        """The librdkafka properties the consumer uses (password included).

        Raises:
            ConfigError: a setting the consumer refuses, named in the message.
        """
        props = dict(_native.check_kafka_config(self._to_native()))
        if self.sasl_config is not None:
            props["sasl.password"] = self.sasl_config.password
        return props

    def _to_native(self) -> dict[str, Any]:
        if self.enable_auto_commit:
            raise ConfigError(
                "enable_auto_commit must stay False: the consumer commits only "
                "finished, acknowledged offsets (at-least-once)"
            )
        sasl, ssl = self.sasl_config, self.ssl_config or SslConfig()
        extra: list[tuple[str, str]] = list(self.extra.items())
        return {
            "brokers": self.brokers,
            "topic": self.topic,
            "service_name": self.service_name,
            "group_id": self.group_id,
            "group_instance_id": self.group_instance_id,
            "security_protocol": self.security_protocol.value,
            "sasl_mechanism": sasl.mechanism.value if sasl else None,
            "sasl_username": sasl.username if sasl else None,
            "sasl_password": sasl.password if sasl else None,
            "ssl_ca_location": ssl.ca_location,
            "ssl_certificate_location": ssl.certificate_location,
            "ssl_key_location": ssl.key_location,
            "auto_offset_reset": self.auto_offset_reset,
            "session_timeout_ms": self.session_timeout_ms,
            "extra": extra,
        }
