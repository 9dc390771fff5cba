"""The crate's shared vectors (tests/data/): the package decodes each to the same
fields the Rust tests (tests/decode.rs) expect."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from typing import Any

import pytest
from conftest import DATA

from xzepr_consumer import CloudEventMessage, DecodeError
from xzepr_consumer._native import decode

ENVELOPES = [
    "kafka-work.started.json",
    "kafka-receiver.created.json",
    "kafka-group.created.json",
    "system-small.json",
    "deployment-1k.json",
    "large-8k.json",
    "unicode-escapes.json",
    "aliases-unknown-fields.json",
]


def _time(text: str) -> datetime:
    # Python keeps microseconds: the oracle truncates nanoseconds the same way.
    date, _, rest = text.rstrip("Z").partition("T")
    clock, _, frac = rest.partition(".")
    micros = (frac + "000000")[:6] if frac else "000000"
    return datetime.fromisoformat(f"{date}T{clock}.{micros}+00:00").astimezone(timezone.utc)


def _entity(e: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(e).items() if v is not None}


@pytest.mark.parametrize("name", ENVELOPES)
def test_envelope_and_entities_match_the_json(name: str) -> None:
    raw = (DATA / name).read_bytes()
    oracle = json.loads(raw)
    msg = CloudEventMessage.from_json(raw)
    assert msg.id == oracle["id"]
    assert msg.source == oracle["source"]
    assert msg.specversion == oracle["specversion"]
    assert msg.event_type == oracle["type"]
    for attr in ("api_version", "name", "version", "release", "platform_id", "package"):
        assert getattr(msg, attr) == oracle.get(attr, ""), attr
    assert msg.success == oracle.get("success", False)
    data = oracle["data"]
    assert len(msg.data.events) == len(data.get("events", []))
    for got, want in zip(msg.data.events, data.get("events", []), strict=False):
        assert got.id == want["id"] and got.name == want["name"]
        assert got.payload == want["payload"]
        assert got.success == want["success"]
        assert got.event_receiver_id == want["event_receiver_id"]
        assert got.created_at == _time(want["created_at"])
    for got_r, want_r in zip(
        msg.data.event_receivers, data.get("event_receivers", []), strict=False
    ):
        assert got_r.receiver_type == want_r.get("type", want_r.get("receiver_type"))
        assert got_r.schema == want_r["schema"]
    assert len(msg.data.event_receiver_groups) == len(data.get("event_receiver_groups", []))


def test_receiver_sample_fields() -> None:
    msg = CloudEventMessage.from_json((DATA / "kafka-receiver.created.json").read_bytes())
    assert (len(msg.data.events), len(msg.data.event_receivers)) == (1, 1)
    assert msg.data.event_receiver_groups == []
    r = msg.data.event_receivers[0]
    assert r.id == "01M82X4ET7AYGAEYSHF5AKVAVW"
    assert r.name == "downstream-worker-2"
    assert r.receiver_type == "worker.lifecycle"
    assert r.schema == {}
    assert r.resource_version == 1
    e = msg.data.events[0]
    assert e.event_receiver_id == "01M82X4ET7AYGAEYSHF5AKVAVW"
    assert e.created_at == datetime(2026, 11, 23, 0, 33, 13, 543978, tzinfo=timezone.utc)
    assert e.success


def test_group_sample_and_type_aliases() -> None:
    msg = CloudEventMessage.from_json((DATA / "kafka-group.created.json").read_bytes())
    g = msg.data.event_receiver_groups[0]
    assert g.group_type == "worker.pool"
    assert g.enabled
    assert g.event_receiver_ids == ["01M82X4ET7AYGAEYSHF5AKVAVW"]
    msg = CloudEventMessage.from_json((DATA / "aliases-unknown-fields.json").read_bytes())
    assert msg.data.event_receivers[0].receiver_type == "worker.lifecycle"


def test_unicode_escapes_are_unescaped() -> None:
    msg = CloudEventMessage.from_json((DATA / "unicode-escapes.json").read_bytes())
    assert msg.event_type == "déploiement.terminé"
    assert msg.platform_id == "plateforme-✓"
    description = msg.data.events[0].description
    assert "\u2028" in description and "🚀" in description and "\u0001" in description


def test_legacy_shape_becomes_one_event() -> None:
    msg = CloudEventMessage.from_json((DATA / "legacy-shape.json").read_bytes())
    assert len(msg.data.events) == 1
    e = msg.data.events[0]
    assert e.id == "01M83E3333333333333333333D"
    assert e.name == "build.started"
    assert e.description == "Build started"
    assert e.payload == {"branch": "main"}
    assert e.created_at == datetime(2026, 11, 23, 0, 41, tzinfo=timezone.utc)


def test_binary_mode_from_headers() -> None:
    vector = json.loads((DATA / "binary" / "deployment-started.json").read_text())
    headers = [(k, v.encode()) for k, v in vector["headers"].items()]
    msg = decode(json.dumps(vector["body"]).encode(), headers)
    assert msg.id == "01M83F4444444444444444444E"
    assert msg.event_type == "deployment.started"
    assert msg.specversion == "1.0"
    assert msg.success is True
    assert (msg.platform_id, msg.package, msg.version) == ("linux", "deployer", "3.1.0")
    assert msg.data.events == []


@pytest.mark.parametrize("name", [*ENVELOPES, "legacy-shape.json"])
def test_to_dict_round_trips(name: str) -> None:
    msg = CloudEventMessage.from_json((DATA / name).read_bytes())
    again = CloudEventMessage.from_dict(msg.to_dict())
    assert again == msg
    assert repr(again) == repr(msg)
    json.dumps(msg.to_dict())  # JSON-ready
    for e in msg.data.events:
        assert type(e).from_dict(e.to_dict()) == e
        assert _entity(e)["id"] == e.id


MALFORMED = {
    "truncated.json": ("invalid_json", None),
    "empty.json": ("invalid_json", None),
    "not-object.json": ("not_an_object", None),
    "missing-id.json": ("missing_attribute", "id"),
    "missing-source.json": ("missing_attribute", "source"),
    "missing-specversion.json": ("missing_attribute", "specversion"),
    "missing-type.json": ("missing_attribute", "type"),
    "wrong-type-success.json": ("wrong_type", "success"),
    "wrong-type-id.json": ("wrong_type", "id"),
    "wrong-type-platform_id.json": ("wrong_type", "platform_id"),
    "unsupported-specversion.json": ("unsupported_specversion", None),
    "too-deep.json": ("too_deep", None),
    "invalid-utf8.json": ("invalid_json", None),
    "bad-escape.json": ("invalid_json", None),
    "trailing-garbage.json": ("invalid_json", None),
    "control-char.json": ("invalid_json", None),
    "lone-surrogate.json": ("invalid_json", None),
    "bad-number-in-data.json": ("invalid_json", None),
}


def test_every_malformed_vector_is_listed() -> None:
    assert {p.name for p in (DATA / "malformed").iterdir()} == set(MALFORMED)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_vectors_name_what_is_wrong(name: str) -> None:
    kind, field = MALFORMED[name]
    with pytest.raises(DecodeError) as info:
        CloudEventMessage.from_json((DATA / "malformed" / name).read_bytes())
    assert info.value.kind == kind, str(info.value)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_invalid_json_reports_the_byte() -> None:
    raw = (DATA / "malformed" / "bad-escape.json").read_bytes()
    with pytest.raises(DecodeError) as info:
        CloudEventMessage.from_json(raw)
    assert info.value.offset is not None
    assert raw[info.value.offset : info.value.offset + 1] == b"q"
    with pytest.raises(DecodeError) as info:
        CloudEventMessage.from_json((DATA / "malformed" / "invalid-utf8.json").read_bytes())
    assert info.value.offset == 50
