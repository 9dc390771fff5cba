"""Parity with the Rust library: every ``PipelineConfig`` setting is reachable
from Python (or listed here as deliberately not, with the reason), with the
library's defaults, and ``Metrics`` holds every counter of the pipeline."""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any

from xzepr_consumer import (
    DeadLetter,
    DecoderLimits,
    KafkaConsumerConfig,
    Metrics,
    RetryPolicy,
    Settings,
    XzeprConsumer,
    _native,
)
from xzepr_consumer.settings import resolve

#: Settings the library has that Python deliberately does not offer.
NOT_FROM_PYTHON = {
    "workers": (
        "the pipeline's worker threads run sync Rust handlers; a Python handler "
        "runs on the asyncio loop (the pipeline's async path), so the setting "
        "would be accepted and ignored"
    ),
}

#: ``XzeprConsumer`` keyword arguments named otherwise than their setting.
KWARG_ALIASES = {"type_prefixes": "types"}


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _rust_defaults() -> tuple[dict[str, Any], dict[str, Any]]:
    config, dead_letter = _native.default_settings()
    return json.loads(config), json.loads(dead_letter)


def test_every_setting_is_reachable_from_python_or_listed_with_a_reason() -> None:
    names = set(_native.setting_names())
    assert names, "the native module lists the settings"
    missing = names - _fields(Settings) - NOT_FROM_PYTHON.keys()
    assert not missing, f"settings not reachable from Python: {sorted(missing)}"
    stale = (NOT_FROM_PYTHON.keys() | _fields(Settings)) - names
    assert not stale, f"no such setting in the library: {sorted(stale)}"
    assert all(reason.strip() for reason in NOT_FROM_PYTHON.values())


def test_nested_settings_have_every_field_of_the_library() -> None:
    defaults, dead_letter = _rust_defaults()
    for name, cls, rust in [
        ("retry", RetryPolicy, defaults["retry"]),
        ("decoder", DecoderLimits, defaults["decoder"]),
        ("dead_letter", DeadLetter, dead_letter),
    ]:
        assert _fields(cls) == set(rust), f"{name}: {sorted(_fields(cls) ^ set(rust))}"


def test_the_python_defaults_are_the_librarys() -> None:
    defaults, dead_letter = _rust_defaults()
    for name in NOT_FROM_PYTHON:
        defaults.pop(name)
    ours = resolve(Settings().to_config())
    for name in NOT_FROM_PYTHON:
        ours.pop(name)
    assert ours == defaults
    with_dead_letter = resolve(Settings(dead_letter=DeadLetter()).to_config())
    assert with_dead_letter["dead_letter"] == dead_letter


def test_every_consumer_setting_kwarg_names_a_setting() -> None:
    params = inspect.signature(XzeprConsumer.__init__).parameters
    names = set(_native.setting_names())
    not_settings = {
        "self",
        "config",
        "settings",
        "client",
        "receiver_name",
        "receiver_type",
        "receiver_id",
        "work_name",
        "work_version",
        "idempotency",
        "executor",
    }
    for p in params:
        if p not in not_settings:
            assert KWARG_ALIASES.get(p, p) in names, f"XzeprConsumer({p}=...) is no setting"
    assert "poll_timeout" not in params
    for method in (XzeprConsumer.run, XzeprConsumer.run_with_callback):
        assert "poll_timeout" not in inspect.signature(method).parameters


def test_a_kwarg_reaches_its_setting() -> None:
    config = KafkaConsumerConfig(brokers="b:9092", topic="t", service_name="svc")
    consumer = XzeprConsumer(
        config,
        ordering="key",
        max_in_flight=8,
        handler_timeout=1.5,
        drain_timeout=2,
        commit_interval=0.25,
        type_prefixes=["deploy."],
        skip_own_events=False,
        retry=RetryPolicy(max_attempts=3),
        dead_letter=DeadLetter(topic="t.failed"),
        metrics_addr="127.0.0.1:0",
    )
    c = consumer.pipeline_config()
    assert (c["ordering"], c["max_in_flight"], c["handler_timeout"]) == ("per_key", 8, "1500ms")
    assert (c["drain_timeout"], c["commit_interval"]) == ("2s", "250ms")
    assert (c["types"], c["skip_own_events"]) == (["deploy."], False)
    assert c["retry"]["max_attempts"] == 3
    assert c["dead_letter"]["topic"] == "t.failed"
    assert c["metrics_addr"] == "127.0.0.1:0"


def test_metrics_holds_every_counter_of_the_pipeline() -> None:
    assert _fields(Metrics) == set(_native.metric_names())


def test_the_assignment_reaches_its_setting() -> None:
    assert resolve(Settings().to_config())["assignment"] == "eager"
    assert resolve(Settings(assignment="cooperative").to_config())["assignment"] == "cooperative"
