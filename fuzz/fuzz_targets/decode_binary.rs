//! Binary-mode decoding never panics, and what it returns is exactly what the
//! headers and body said.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use xzepr_consumer::decode::{Decoder, DecoderConfig};

#[derive(Arbitrary, Debug)]
struct Input {
    headers: Vec<(String, Vec<u8>)>,
    body: Option<Vec<u8>>,
}

fuzz_target!(|input: Input| {
    let dec = Decoder::new(DecoderConfig::default()).expect("default config is valid");
    let pairs = input.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
    let Ok(event) = dec.decode_binary(pairs, input.body.as_deref()) else {
        return;
    };
    // The last header of a name wins; every required attribute came from one.
    let last = |name: &str| {
        input
            .headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| std::str::from_utf8(v).expect("accepted headers are UTF-8"))
    };
    assert_eq!(Some(event.id()), last("ce_id"));
    assert_eq!(Some(event.source()), last("ce_source"));
    assert_eq!(Some(event.event_type()), last("ce_type"));
    assert_eq!(Some(event.specversion()), last("ce_specversion"));
    assert_eq!(event.platform_id(), last("ce_platform_id"));
    match input.body.as_deref() {
        Some(body) if !body.is_empty() => assert_eq!(event.data().raw(), Some(body)),
        _ => assert_eq!(event.data().raw(), None),
    }
    // Decoding the body never panics either.
    let _ = event.entities();
    let _ = event.to_owned_message();
});
