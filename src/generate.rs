//! Realistic XZepr CloudEvents for the dev stack, the CLI's `produce`, tests and
//! benchmarks: the real server's structured format, ~1 KB, with varied types,
//! non-ASCII text and nested payloads.

use std::fmt::Write as _;

/// Crockford base32, as ULIDs use.
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A 26-character ULID-shaped id from a millisecond timestamp and a sequence number.
/// Distinct for distinct `(millis, seq)`; sortable by time.
pub fn ulid_like(millis: u64, seq: u64) -> String {
    let mut out = String::with_capacity(26);
    // 10 chars of time (50 bits), 16 chars (80 bits) of sequence, high bits first.
    for i in (0..10).rev() {
        out.push(CROCKFORD[((millis >> (i * 5)) & 31) as usize] as char);
    }
    let seq = u128::from(seq);
    for i in (0..16).rev() {
        out.push(CROCKFORD[((seq >> (i * 5)) & 31) as usize] as char);
    }
    out
}

const KINDS: [(&str, &str, &str); 6] = [
    ("deployment.started", "kubernetes-prod-eu", "payments-api"),
    ("deployment.completed", "kubernetes-prod-eu", "payments-api"),
    ("build.completed", "linux-x86_64", "ci-runner"),
    ("test.suite.completed", "linux-x86_64", "ci-runner"),
    ("release.published", "github", "xzepr-cli"),
    ("scan.finished", "sbom-scanner", "image-scanner"),
];

/// Generates event number `seq`, recorded under receiver `receiver_id`: the exact
/// shape the real XZepr server publishes (see `tests/data/kafka-work.started.json`).
/// Returns `(key, payload)`; the key is the event id, as XZepr keys its messages.
pub fn xzepr_event(seq: u64, receiver_id: &str) -> (String, Vec<u8>) {
    let (name, platform, package) = KINDS[(seq % KINDS.len() as u64) as usize];
    let id = ulid_like(1_795_000_000_000 + seq / 1000, seq);
    let success = seq % 17 != 0;
    let minor = seq % 40;
    let mut payload = String::with_capacity(1100);
    // serde_json would do, but this runs in producer loops at 10^5–10^6 events/s.
    let _ = write!(
        payload,
        concat!(
            r#"{{"success":{success},"id":"{id}","specversion":"1.0.1","type":"{name}","#,
            r#""source":"xzepr.event.receiver.{rid}","api_version":"v1","name":"{name}","#,
            r#""version":"2.{minor}.0","release":"2026.11.{minor}","platform_id":"{platform}","#,
            r#""package":"{package}","data":{{"events":[{{"id":"{id}","name":"{name}","#,
            r#""version":"2.{minor}.0","release":"2026.11.{minor}","platform_id":"{platform}","#,
            r#""package":"{package}","description":"{package} {name} — run {seq} on {platform} ✓","#,
            r#""payload":{{"environment":"prod-eu","cluster":"k8s-eu-west-1","namespace":"payments","#,
            r#""replicas":6,"image":"registry.example.com/{package}@sha256:9f2c4b1e7a6d3c5f8e0b2a4d6c8e0f1a3b5c7d9e1f3a5b7c9d1e3f5a7b9c1d{m2:02}","#,
            r#""duration_ms":{dur},"strategy":"rolling","health":{{"ready":6,"failed":0}},"#,
            r#""tags":["release","eu",{minor},true,null,2.5],"commit":"4f1c2a9","note":"naïve café \u2028 ok"}},"#,
            r#""success":{success},"event_receiver_id":"{rid}","owner_id":"01JXZEPRDEV000000000000000","#,
            r#""resource_version":1,"created_at":"2026-11-23T00:{mm:02}:{ss:02}.{nanos:09}Z"}}],"#,
            r#""event_receivers":[],"event_receiver_groups":[]}}}}"#
        ),
        success = success,
        id = id,
        name = name,
        rid = receiver_id,
        minor = minor,
        platform = platform,
        package = package,
        seq = seq,
        m2 = seq % 100,
        dur = 1000 + (seq * 7919) % 90_000,
        mm = (seq / 60) % 60,
        ss = seq % 60,
        nanos = (seq * 104_729) % 1_000_000_000,
    );
    (id, payload.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Decoder, DecoderConfig};

    #[test]
    fn generated_events_decode_and_are_about_a_kilobyte() {
        let dec = Decoder::new(DecoderConfig::default()).unwrap();
        for seq in [0u64, 1, 5, 16, 17, 999_999] {
            let (key, bytes) = xzepr_event(seq, "01M82X4ET7AYGAEYSHF5AKVAVW");
            assert!((900..1300).contains(&bytes.len()), "{}", bytes.len());
            let ev = dec.decode(&bytes).unwrap();
            assert_eq!(ev.id(), key);
            assert_eq!(ev.source_receiver_id(), Some("01M82X4ET7AYGAEYSHF5AKVAVW"));
            assert_eq!(ev.success(), Some(seq % 17 != 0));
            let msg = ev.to_owned_message().unwrap();
            assert_eq!(msg.data.events[0].id, key);
            assert_eq!(msg.data.events[0].name, msg.event_type);
        }
    }

    #[test]
    fn ids_are_distinct_and_ulid_shaped() {
        let a = ulid_like(1_795_000_000_000, 1);
        let b = ulid_like(1_795_000_000_000, 2);
        assert_eq!(a.len(), 26);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| CROCKFORD.contains(&c)));
    }
}
