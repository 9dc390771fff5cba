"""KafkaConsumerConfig: the same XZEPR_* variables as the Rust core, SASL/SSL."""

from __future__ import annotations

import pytest

from xzepr_consumer import (
    ConfigError,
    KafkaConsumerConfig,
    SaslConfig,
    SaslMechanism,
    SecurityProtocol,
    SslConfig,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("XZEPR_"):
            monkeypatch.delenv(name)


def test_defaults_from_an_empty_environment() -> None:
    c = KafkaConsumerConfig.from_env("svc")
    assert (c.brokers, c.topic, c.group_id) == (
        "localhost:9092",
        "xzepr.dev.events",
        "xzepr-consumer-svc",
    )
    assert c.security_protocol is SecurityProtocol.PLAINTEXT
    assert c.sasl_config is None and c.ssl_config is None


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "scram-sha-512"])
def test_sasl_ssl_from_the_environment(monkeypatch: pytest.MonkeyPatch, mechanism: str) -> None:
    monkeypatch.setenv("XZEPR_KAFKA_BROKERS", "b1:9093,b2:9093")
    monkeypatch.setenv("XZEPR_KAFKA_TOPIC", "events")
    monkeypatch.setenv("XZEPR_KAFKA_GROUP_ID", "grp")
    monkeypatch.setenv("XZEPR_KAFKA_SECURITY_PROTOCOL", "sasl_ssl")
    monkeypatch.setenv("XZEPR_KAFKA_SASL_MECHANISM", mechanism)
    monkeypatch.setenv("XZEPR_KAFKA_SASL_USERNAME", "alice")
    monkeypatch.setenv("XZEPR_KAFKA_SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("XZEPR_KAFKA_SSL_CA_LOCATION", "/etc/ca.pem")
    c = KafkaConsumerConfig.from_env("svc")
    assert (c.brokers, c.topic, c.group_id) == ("b1:9093,b2:9093", "events", "grp")
    assert c.security_protocol is SecurityProtocol.SASL_SSL
    assert c.sasl_config == SaslConfig(SaslMechanism(mechanism.upper()), "alice", "s3cret")
    assert c.ssl_config == SslConfig(ca_location="/etc/ca.pem")
    assert "s3cret" not in repr(c)


def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XZEPR_KAFKA_SECURITY_PROTOCOL", "carrier-pigeon")
    with pytest.raises(ConfigError, match="XZEPR_KAFKA_SECURITY_PROTOCOL"):
        KafkaConsumerConfig.from_env("svc")


def test_confluent_properties_carry_sasl_and_our_commit_discipline() -> None:
    c = KafkaConsumerConfig(
        brokers="b:9092",
        topic="t",
        service_name="svc",
        security_protocol=SecurityProtocol.SASL_PLAINTEXT,
        sasl_config=SaslConfig(SaslMechanism.SCRAM_SHA_512, "bob", "pw"),
    )
    props = c.to_confluent_config()
    assert props["security.protocol"] == "SASL_PLAINTEXT"
    assert props["sasl.mechanism"] == "SCRAM-SHA-512"
    assert (props["sasl.username"], props["sasl.password"]) == ("bob", "pw")
    assert props["enable.auto.commit"] == "false"
    assert props["group.id"] == "xzepr-consumer-svc"


def test_settings_that_would_break_at_least_once_are_refused() -> None:
    c = KafkaConsumerConfig(brokers="b", topic="t", service_name="s", enable_auto_commit=True)
    with pytest.raises(ConfigError, match="enable_auto_commit"):
        c.to_confluent_config()
    c = KafkaConsumerConfig(
        brokers="b", topic="t", service_name="s", extra={"enable.auto.commit": "true"}
    )
    with pytest.raises(ConfigError, match=r"enable\.auto\.commit"):
        c.to_confluent_config()
    c = KafkaConsumerConfig(
        brokers="b", topic="t", service_name="s", security_protocol=SecurityProtocol.SASL_SSL
    )
    with pytest.raises(ConfigError):
        c.to_confluent_config()


def test_static_membership_from_the_environment_and_checked_by_the_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert KafkaConsumerConfig.from_env("svc").group_instance_id is None
    monkeypatch.setenv("XZEPR_KAFKA_GROUP_INSTANCE_ID", "orders-7f9c-2")
    c = KafkaConsumerConfig.from_env("svc")
    assert c.group_instance_id == "orders-7f9c-2"
    assert c.to_confluent_config()["group.instance.id"] == "orders-7f9c-2"
    bad = KafkaConsumerConfig(brokers="b", topic="t", service_name="s", group_instance_id="a b")
    with pytest.raises(ConfigError, match="XZEPR_KAFKA_GROUP_INSTANCE_ID"):
        bad.to_confluent_config()
    c = KafkaConsumerConfig(
        brokers="b", topic="t", service_name="s", extra={"group.instance.id": "x"}
    )
    with pytest.raises(ConfigError, match=r"group\.instance\.id"):
        c.to_confluent_config()
