//! Structured-mode decoding never panics, agrees with serde_json on what is JSON,
//! and a successful decode survives owned -> JSON -> decode unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xzepr_consumer::decode::{Decoder, DecoderConfig, Error};

fuzz_target!(|bytes: &[u8]| {
    let dec = Decoder::new(DecoderConfig::default()).expect("default config is valid");
    let result = dec.decode(bytes);

    if let Ok(text) = std::str::from_utf8(bytes) {
        match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            // Not JSON to serde_json (its own depth guard aside) => not JSON to us.
            Err(e) if !e.to_string().starts_with("recursion limit") => {
                assert!(result.is_err(), "accepted what serde_json rejects: {e}");
            }
            _ => {}
        }
        if let Err(Error::InvalidJson { offset, .. }) = &result {
            assert!(*offset <= bytes.len());
            // Our syntax errors are serde_json's too (it checks every string fully).
            assert!(
                serde_json::from_str::<serde_json::Value>(text).is_err(),
                "rejected valid JSON: {result:?}"
            );
        }
    } else {
        assert!(matches!(result, Err(Error::InvalidJson { .. }) | Err(Error::PayloadTooLarge { .. })));
    }

    let Ok(event) = result else { return };
    // Accessors never panic; `data` is a slice of the input.
    let _ = (event.id(), event.event_type(), event.source_receiver_id(), event.success());
    if let Some(raw) = event.data().raw() {
        let range = bytes.as_ptr_range();
        assert!(range.contains(&raw.as_ptr()) || raw.is_empty());
    }
    let Ok(owned) = event.to_owned_message() else { return };
    let json = serde_json::to_vec(&owned).expect("owned messages serialize");
    let again = dec
        .decode(&json)
        .unwrap_or_else(|e| panic!("re-decode of our own output failed: {e}"))
        .to_owned_message()
        .unwrap_or_else(|e| panic!("owned conversion of our own output failed: {e}"));
    assert_eq!(again, owned);
});
