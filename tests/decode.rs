//! Decode-stage tests on the vectors in `tests/data/`: the messages the real XZepr
//! server published, realistic ones of both `data` shapes, binary-mode header sets,
//! and one file per malformed case.

use std::path::PathBuf;

use xzepr_consumer::decode::{
    CloudEventData, CloudEventMessage, Data, Decoder, DecoderConfig, Error, JsonKind,
};

fn data_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(data_path(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn decoder() -> Decoder {
    Decoder::new(DecoderConfig::default()).unwrap()
}

/// The oracle: serde_json into a `Value`, read field by field.
fn oracle(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

fn check_envelope_against_oracle(name: &str) {
    let bytes = read(name);
    let v = oracle(&bytes);
    let dec = decoder();
    let ev = dec.decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    let s = |k: &str| v[k].as_str().map(str::to_owned);
    assert_eq!(Some(ev.id().to_owned()), s("id"), "{name}: id");
    assert_eq!(Some(ev.source().to_owned()), s("source"), "{name}: source");
    assert_eq!(Some(ev.specversion().to_owned()), s("specversion"));
    assert_eq!(Some(ev.event_type().to_owned()), s("type"), "{name}: type");
    assert_eq!(ev.api_version().map(str::to_owned), s("api_version"));
    assert_eq!(ev.name().map(str::to_owned), s("name"));
    assert_eq!(ev.version().map(str::to_owned), s("version"));
    assert_eq!(ev.release().map(str::to_owned), s("release"));
    assert_eq!(ev.platform_id().map(str::to_owned), s("platform_id"));
    assert_eq!(ev.package().map(str::to_owned), s("package"));
    assert_eq!(ev.success(), v["success"].as_bool());
    assert_eq!(ev.time(), None);
    // `data` is the exact JSON text of the member, and decodes to the same value.
    let data: serde_json::Value = ev.data().to_value().unwrap();
    assert_eq!(data, v["data"], "{name}: data");
}

#[test]
fn real_server_samples_decode_field_by_field() {
    for name in [
        "kafka-work.started.json",
        "kafka-receiver.created.json",
        "kafka-group.created.json",
    ] {
        check_envelope_against_oracle(name);
    }
}

#[test]
fn realistic_vectors_decode_field_by_field() {
    for name in [
        "system-small.json",
        "deployment-1k.json",
        "large-8k.json",
        "unicode-escapes.json",
        "legacy-shape.json",
        "aliases-unknown-fields.json",
    ] {
        check_envelope_against_oracle(name);
    }
}

#[test]
fn plain_attributes_borrow_from_the_payload() {
    let bytes = read("kafka-work.started.json");
    let dec = decoder();
    let ev = dec.decode(&bytes).unwrap();
    let range = bytes.as_ptr_range();
    for s in [
        ev.id(),
        ev.source(),
        ev.event_type(),
        ev.platform_id().unwrap(),
    ] {
        assert!(range.contains(&s.as_ptr()), "{s} was copied");
    }
    let Data::Json(text) = *ev.data() else {
        panic!("structured data expected")
    };
    assert!(range.contains(&text.as_ptr()));
}

#[test]
fn escaped_and_unicode_strings_are_unescaped() {
    let bytes = read("unicode-escapes.json");
    let ev = decoder()
        .decode(&bytes)
        .map(|e| e.event_type().to_owned())
        .unwrap();
    assert_eq!(ev, "déploiement.terminé");
    let dec = decoder();
    let ev = dec.decode(&bytes).unwrap();
    assert_eq!(ev.platform_id(), Some("plateforme-✓"));
    let ents = ev.entities().unwrap();
    assert!(ents.events[0].description.contains('\u{2028}'));
    assert!(ents.events[0].description.contains("🚀"));
    assert!(ents.events[0].description.contains('\u{1}'));
}

#[test]
fn entities_of_the_receiver_sample() {
    let bytes = read("kafka-receiver.created.json");
    let dec = decoder();
    let ev = dec.decode(&bytes).unwrap();
    let ents = ev.entities().unwrap();
    assert_eq!(ents.events.len(), 1);
    assert_eq!(ents.event_receivers.len(), 1);
    assert!(ents.event_receiver_groups.is_empty());
    assert!(ents.legacy.is_none());
    let r = &ents.event_receivers[0];
    assert_eq!(r.id, "01M82X4ET7AYGAEYSHF5AKVAVW");
    assert_eq!(r.name, "downstream-worker-2");
    assert_eq!(r.receiver_type, "worker.lifecycle");
    assert_eq!(r.schema.get(), "{}");
    assert_eq!(r.resource_version, Some(1));
    let e = &ents.events[0];
    assert_eq!(e.event_receiver_id, "01M82X4ET7AYGAEYSHF5AKVAVW");
    assert_eq!(e.created_at, "2026-11-23T00:33:13.543978907Z");
    assert!(e.success);
    assert_eq!(ev.source_receiver_id(), Some("01M82X4ET7AYGAEYSHF5AKVAVW"));
}

#[test]
fn group_sample_and_type_aliases() {
    let bytes = read("kafka-group.created.json");
    let dec = decoder();
    let msg = dec.decode(&bytes).unwrap().to_owned_message().unwrap();
    let g = &msg.data.event_receiver_groups[0];
    assert_eq!(g.group_type, "worker.pool");
    assert!(g.enabled);
    assert_eq!(
        g.event_receiver_ids,
        vec!["01M82X4ET7AYGAEYSHF5AKVAVW".to_owned()]
    );

    // The plan's `type` spelling and unknown fields are accepted.
    let bytes = read("aliases-unknown-fields.json");
    let msg = dec.decode(&bytes).unwrap().to_owned_message().unwrap();
    assert_eq!(
        msg.data.event_receivers[0].receiver_type,
        "worker.lifecycle"
    );
}

#[test]
fn owned_message_matches_plan_style_serde_decode() {
    // The plan's way (serde_json straight into the owned structs) and ours agree.
    for name in [
        "kafka-work.started.json",
        "kafka-receiver.created.json",
        "kafka-group.created.json",
        "deployment-1k.json",
        "large-8k.json",
        "unicode-escapes.json",
    ] {
        let bytes = read(name);
        let plan: CloudEventMessage = serde_json::from_slice(&bytes).unwrap();
        let ours = decoder()
            .decode(&bytes)
            .unwrap()
            .to_owned_message()
            .unwrap();
        assert_eq!(ours, plan, "{name}");
        // Round trip: owned -> JSON -> decode -> owned.
        let again = serde_json::to_vec(&ours).unwrap();
        let back = decoder()
            .decode(&again)
            .unwrap()
            .to_owned_message()
            .unwrap();
        assert_eq!(back, ours, "{name} round trip");
    }
}

#[test]
fn legacy_data_shape_becomes_one_event() {
    let bytes = read("legacy-shape.json");
    let msg = decoder()
        .decode(&bytes)
        .unwrap()
        .to_owned_message()
        .unwrap();
    assert_eq!(msg.data.events.len(), 1);
    let e = &msg.data.events[0];
    assert_eq!(e.id, "01M83E3333333333333333333D");
    assert_eq!(e.name, "build.started");
    assert_eq!(e.description, "Build started");
    assert_eq!(e.payload, serde_json::json!({"branch": "main"}));
    assert_eq!(e.created_at.to_rfc3339(), "2026-11-23T00:41:00+00:00");
}

#[test]
fn decode_data_agrees_between_serde_json_and_simd_json() {
    for name in [
        "large-8k.json",
        "deployment-1k.json",
        "unicode-escapes.json",
    ] {
        let bytes = read(name);
        let mut small = Decoder::new(DecoderConfig::default().simd_min_bytes(usize::MAX)).unwrap();
        let mut simd = Decoder::new(DecoderConfig::default().simd_min_bytes(0)).unwrap();
        let a: CloudEventData = {
            let ev = small.decode(&bytes).unwrap();
            let data = *ev.data();
            small.decode_data(&data).unwrap()
        };
        let b: CloudEventData = {
            let ev = simd.decode(&bytes).unwrap();
            let data = *ev.data();
            simd.decode_data(&data).unwrap()
        };
        assert_eq!(a, b, "{name}");
        assert!(!a.events.is_empty());
    }
}

#[derive(serde::Deserialize)]
struct BinaryVector {
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    body: Option<serde_json::Value>,
    #[serde(default)]
    body_text: Option<String>,
}

fn binary_vector(name: &str) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
    let v: BinaryVector = serde_json::from_slice(&read(name)).unwrap();
    let headers = v
        .headers
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    let body = match (v.body, v.body_text) {
        (Some(json), _) => serde_json::to_vec(&json).unwrap(),
        (None, Some(text)) => text.into_bytes(),
        (None, None) => Vec::new(),
    };
    (headers, body)
}

#[test]
fn binary_mode_from_headers() {
    let (headers, body) = binary_vector("binary/deployment-started.json");
    let dec = decoder();
    let pairs = headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
    let ev = dec.decode_message(pairs, Some(&body)).unwrap();
    assert_eq!(ev.id(), "01M83F4444444444444444444E");
    assert_eq!(ev.event_type(), "deployment.started");
    assert_eq!(ev.specversion(), "1.0");
    assert_eq!(ev.success(), Some(true));
    assert_eq!(ev.platform_id(), Some("linux"));
    assert_eq!(ev.package(), Some("deployer"));
    assert_eq!(ev.version(), Some("3.1.0"));
    assert_eq!(ev.time(), Some("2026-11-23T00:42:00Z"));
    assert_eq!(ev.datacontenttype(), Some("application/json"));
    assert_eq!(ev.data().raw(), Some(body.as_slice()));
    assert!(ev.entities().unwrap().events.is_empty());
    let msg = ev.to_owned_message().unwrap();
    assert_eq!(msg.event_type, "deployment.started");
}

#[test]
fn binary_mode_with_a_non_json_body() {
    let (headers, body) = binary_vector("binary/foreign-text.json");
    let dec = decoder();
    let ev = dec
        .decode_binary(
            headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
            Some(&body),
        )
        .unwrap();
    assert_eq!(ev.source(), "urn:other-producer");
    assert_eq!(ev.success(), None);
    assert_eq!(ev.data().raw(), Some(&b"hello, not json"[..]));
    assert!(matches!(
        ev.data().to_value(),
        Err(Error::InvalidJson { .. })
    ));
}

#[test]
fn binary_mode_errors() {
    let dec = decoder();
    let missing = [
        ("ce_id", &b"1"[..]),
        ("ce_specversion", b"1.0"),
        ("ce_source", b"s"),
    ];
    assert_eq!(
        dec.decode_message(missing.iter().copied(), None)
            .unwrap_err(),
        Error::MissingAttribute { name: "type" }
    );
    let bad = [
        ("ce_id", &b"1"[..]),
        ("ce_specversion", b"1.0"),
        ("ce_source", b"s"),
        ("ce_type", b"\xff"),
    ];
    assert_eq!(
        dec.decode_message(bad.iter().copied(), None).unwrap_err(),
        Error::InvalidHeader {
            name: "ce_type".into()
        }
    );
    let success = [
        ("ce_id", &b"1"[..]),
        ("ce_specversion", b"1.0"),
        ("ce_source", b"s"),
        ("ce_type", b"t"),
        ("ce_success", b"yes"),
    ];
    assert!(matches!(
        dec.decode_message(success.iter().copied(), None).unwrap_err(),
        Error::WrongType { field, .. } if &*field == "ce_success"
    ));
}

fn malformed(name: &str) -> Error {
    let bytes = read(&format!("malformed/{name}"));
    decoder()
        .decode(&bytes)
        .map(|ev| format!("{ev:?}"))
        .expect_err(name)
}

#[test]
fn every_malformed_vector_has_its_specific_error() {
    use Error::*;
    assert!(matches!(malformed("truncated.json"), InvalidJson { .. }));
    assert!(matches!(
        malformed("empty.json"),
        InvalidJson { offset: 0, .. }
    ));
    assert_eq!(
        malformed("not-object.json"),
        NotAnObject {
            found: JsonKind::Array
        }
    );
    for attr in ["id", "source", "specversion", "type"] {
        assert_eq!(
            malformed(&format!("missing-{attr}.json")),
            MissingAttribute { name: attr },
            "{attr}"
        );
    }
    assert_eq!(
        malformed("wrong-type-success.json"),
        WrongType {
            field: "success".into(),
            expected: "a boolean",
            found: JsonKind::String
        }
    );
    assert_eq!(
        malformed("wrong-type-id.json"),
        WrongType {
            field: "id".into(),
            expected: "a string",
            found: JsonKind::Number
        }
    );
    assert_eq!(
        malformed("wrong-type-platform_id.json"),
        WrongType {
            field: "platform_id".into(),
            expected: "a string",
            found: JsonKind::Object
        }
    );
    assert_eq!(
        malformed("unsupported-specversion.json"),
        UnsupportedSpecVersion {
            found: "0.3".into()
        }
    );
    assert_eq!(malformed("too-deep.json"), TooDeep { max: 128 });
    assert!(matches!(
        malformed("invalid-utf8.json"),
        InvalidJson { offset: 50, .. }
    ));
    for name in [
        "bad-escape.json",
        "trailing-garbage.json",
        "control-char.json",
        "lone-surrogate.json",
        "bad-number-in-data.json",
    ] {
        let err = malformed(name);
        assert!(matches!(err, InvalidJson { .. }), "{name}: {err:?}");
        // serde_json agrees that these are not JSON.
        let bytes = read(&format!("malformed/{name}"));
        assert!(
            serde_json::from_slice::<serde_json::Value>(&bytes).is_err(),
            "{name}"
        );
    }
}

#[test]
fn invalid_json_reports_the_byte_position() {
    let bytes = read("malformed/bad-escape.json");
    let Error::InvalidJson {
        offset,
        line,
        column,
        ..
    } = malformed("bad-escape.json")
    else {
        panic!("InvalidJson expected")
    };
    assert_eq!(line, 1);
    assert_eq!(column as usize, offset + 1);
    assert_eq!(bytes[offset], b'q');
}

#[test]
fn payload_over_the_maximum_is_rejected_before_parsing() {
    let bytes = read("large-8k.json");
    let dec = Decoder::new(DecoderConfig::default().max_payload_bytes(4096)).unwrap();
    assert_eq!(
        dec.decode(&bytes).unwrap_err(),
        Error::PayloadTooLarge {
            size: bytes.len(),
            max: 4096
        }
    );
}

#[test]
fn configured_depth_limit_applies() {
    let bytes = read("deployment-1k.json");
    // envelope(1) > data(2) > events(3) > event(4) > payload(5) > tags/health(6)
    let dec = Decoder::new(DecoderConfig::default().max_depth(6)).unwrap();
    assert!(dec.decode(&bytes).is_ok());
    let dec = Decoder::new(DecoderConfig::default().max_depth(5)).unwrap();
    assert_eq!(dec.decode(&bytes).unwrap_err(), Error::TooDeep { max: 5 });
}

#[test]
fn bad_decoder_config_names_the_field() {
    let err = Decoder::new(DecoderConfig::default().max_depth(0)).unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidConfig {
            field: "max_depth",
            ..
        }
    ));
    let err = Decoder::new(DecoderConfig::default().max_payload_bytes(0)).unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidConfig {
            field: "max_payload_bytes",
            ..
        }
    ));
}

#[test]
fn data_null_is_no_data() {
    let text = br#"{"id":"1","source":"s","specversion":"1.0","type":"t","data":null}"#;
    let dec = decoder();
    let ev = dec.decode(text).unwrap();
    assert_eq!(*ev.data(), Data::Absent);
    assert!(matches!(ev.entities(), Err(Error::DataShape { .. })));
}
