"""Settings: what Python sends is what the library reads, and what the library
refuses is refused at construction, naming the setting."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from xzepr_consumer import (
    ConfigError,
    DeadLetter,
    IdempotencyKey,
    KafkaConsumerConfig,
    MalformedPolicy,
    MemoryStore,
    Ordering,
    RetryPolicy,
    Settings,
    XzeprConsumer,
)
from xzepr_consumer.settings import resolve


def _config() -> KafkaConsumerConfig:
    return KafkaConsumerConfig(brokers="b:9092", topic="orders", service_name="svc")


def test_durations_are_exact_in_any_form() -> None:
    s = Settings(
        commit_interval=0.25,
        drain_timeout=timedelta(seconds=3),
        pause_after="750ms",
        poll_interval=2,
        stall_timeout=None,
        handler_timeout=timedelta(milliseconds=1500),
        retry=RetryPolicy(
            max_attempts=4, backoff_base=0.01, backoff_max="2s", delay_topics=[60, "10m"]
        ),
    )
    c = resolve(s.to_config())
    assert c["retry"]["delay_topics"] == ["1m", "10m"]
    assert (c["commit_interval"], c["drain_timeout"], c["pause_after"]) == ("250ms", "3s", "750ms")
    assert (c["poll_interval"], c["stall_timeout"], c["handler_timeout"]) == ("2s", None, "1500ms")
    assert (c["retry"]["backoff_base"], c["retry"]["backoff_max"]) == ("10ms", "2s")


def test_enums_and_keys_map_to_the_librarys_names() -> None:
    c = resolve(
        Settings(
            ordering=Ordering.PER_KEY,
            malformed=MalformedPolicy.DEAD_LETTER,
            dead_letter=DeadLetter(properties={"linger.ms": "5"}),
            idempotency_key=IdempotencyKey.event_id(),
            types="deployment.",
        ).to_config()
    )
    assert (c["ordering"], c["malformed"], c["idempotency_key"]) == (
        "per_key",
        "dead_letter",
        "event_id",
    )
    assert c["dead_letter"]["properties"] == {"linger.ms": "5"}
    assert c["types"] == ["deployment."]
    assert Ordering("per_partition") is Ordering.PER_PARTITION
    assert resolve(Settings(idempotency_key=IdempotencyKey("k")).to_config())[
        "idempotency_key"
    ] == {"header": "k"}


def test_a_mapping_of_library_keys_with_kwargs_over_it() -> None:
    consumer = XzeprConsumer(
        _config(),
        settings={"ordering": "unordered", "batch": 7, "max_in_flight": 16},
        max_in_flight=32,
    )
    c = consumer.pipeline_config()
    assert (c["ordering"], c["batch"], c["max_in_flight"]) == ("unordered", 7, 32)
    # The package's names for an ordering are accepted in a mapping too.
    c = XzeprConsumer(_config(), settings={"ordering": "key"}).pipeline_config()
    assert c["ordering"] == "per_key"


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"max_inflight": 8}, "max_inflight"),
        ({"max_in_flight": "many"}, "max_in_flight"),
        ({"retry": {"max_attempts": 3, "backoff_base": "soon"}}, "retry.backoff_base"),
        ({"retry": {"attempts": 3}}, "retry.attempts"),
        ({"ordering": "sideways"}, "ordering"),
        (Settings(max_in_flight=0), "max_in_flight"),
        (Settings(retry=RetryPolicy(max_attempts=0)), "retry.max_attempts"),
        (Settings(handler_timeout=0), "handler_timeout"),
        (Settings(malformed=MalformedPolicy.DEAD_LETTER), "malformed"),
        (Settings(dead_letter=DeadLetter(topic="orders")), "dead_letter.topic"),
        (Settings(commit_interval=-1.0), "commit_interval"),
        ({"start_from": "yesterday"}, "start_from"),
    ],
)
def test_a_refused_setting_fails_at_construction_naming_it(settings: object, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        XzeprConsumer(_config(), settings=settings)  # type: ignore[arg-type]


def test_start_from_takes_a_name_or_an_aware_time() -> None:
    at = datetime(2026, 12, 5, 16, 0, tzinfo=timezone(timedelta(hours=2)))
    assert resolve(Settings(start_from=at).to_config())["start_from"] == "2026-12-05T14:00:00Z"
    assert resolve(Settings(start_from="latest").to_config())["start_from"] == "latest"
    assert resolve(Settings().to_config())["start_from"] == "committed"
    with pytest.raises(ValueError, match="time zone"):
        Settings(start_from=datetime(2026, 12, 5)).to_config()


def test_lifecycle_arguments_need_a_client() -> None:
    with pytest.raises(ValueError, match="client"):
        XzeprConsumer(_config(), work_name="w")


def test_memory_store_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="lease"):
        MemoryStore(retention=10, lease=20)
    m = MemoryStore(capacity=10).metrics()
    assert (m.events_processed_total, m.processed_events_table_size) == (0, 0)


def test_adaptive_concurrency_and_a_rate_limit_reach_the_library() -> None:
    from xzepr_consumer import Adaptive, RateLimit

    c = resolve(
        Settings(
            max_in_flight=Adaptive(2, 48),
            report_concurrency=Adaptive(max=64),
            rate_limit=RateLimit(2000, burst=100),
        ).to_config()
    )
    assert c["max_in_flight"] == {"adaptive": {"min": 2, "max": 48}}
    assert c["report_concurrency"] == {"adaptive": {"min": 1, "max": 64}}
    assert (c["rate_limit"]["per_second"], c["rate_limit"]["burst"]) == (2000.0, 100)
    assert resolve(Settings().to_config())["rate_limit"] is None
