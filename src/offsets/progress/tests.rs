//! Unit and property tests of the completion map's encodings.

use super::*;
use proptest::prelude::*;

fn set(map: &CompletionMap) -> Vec<i64> {
    map.offsets().collect()
}

#[test]
fn empty_and_nothing_fits() {
    let e = encode(10, [], DEFAULT_MAX_BYTES);
    assert_eq!(e, Encoded::default());
    assert!(decode(10, "").unwrap().is_empty());
    let e = encode(10, [12, 13], HEADER + 1);
    assert_eq!((e.text.as_str(), e.encoded, e.left_out), ("", 0, 2));
    let e = encode(10, [12, 13], HEADER + 2);
    assert_eq!((e.encoded, e.left_out), (2, 0));
}

#[test]
fn offsets_at_or_below_base_and_repeats_are_ignored() {
    let e = encode(10, [3, 10, 11, 11, 9, 12], DEFAULT_MAX_BYTES);
    assert_eq!(set(&decode(10, &e.text).unwrap()), vec![11, 12]);
}

#[test]
fn the_smaller_encoding_wins() {
    // Contiguous with a few stragglers: a handful of runs.
    let e = encode(1_000, (1_001..5_000).filter(|o| o % 997 != 0), 4096);
    assert_eq!(e.kind, Some(Kind::RunLength));
    // Alternating: one bit each beats two varints each.
    let e = encode(0, (1..2_000).step_by(2), 4096);
    assert_eq!(e.kind, Some(Kind::Bitset));
}

#[test]
fn a_big_map_is_cut_to_a_prefix_under_the_cap() {
    let all: Vec<i64> = (1..200_000).step_by(2).collect();
    let e = encode(0, all.iter().copied(), DEFAULT_MAX_BYTES);
    assert!(e.text.len() <= DEFAULT_MAX_BYTES);
    assert!(e.left_out > 0 && e.encoded > 5_000, "{e:?}");
    let got = set(&decode(0, &e.text).unwrap());
    assert_eq!(got[..], all[..got.len()]);
    assert_eq!(got.len() as u64, e.encoded);
}

#[test]
fn foreign_corrupt_and_misplaced_maps_are_rejected() {
    let e = encode(41, [43, 44, 50], DEFAULT_MAX_BYTES);
    assert_eq!(decode(41, "consumer-1 was here"), Err(Error::UnknownFormat));
    assert_eq!(decode(42, &e.text), Err(Error::Checksum));
    let mut bad = e.text.clone().into_bytes();
    *bad.last_mut().unwrap() ^= 0x01;
    let bad = String::from_utf8(bad).unwrap();
    assert!(decode(41, &bad).is_err(), "{bad}");
    assert!(matches!(
        decode(41, &format!("xz1q{}", &e.text[4..])),
        Err(Error::UnknownKind { kind: 'q' })
    ));
    assert!(matches!(
        decode(41, "xz1r!!!!!!"),
        Err(Error::Base64 { .. })
    ));
    assert_eq!(decode(41, "xz1r"), Err(Error::Truncated));
}

#[test]
fn error_is_small() {
    assert!(std::mem::size_of::<Error>() <= 16);
}

/// The sizes on typical completion patterns, printed for the docs
/// (`cargo test --lib progress -- --nocapture`).
#[test]
fn sizes_on_typical_patterns() {
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut coin = |p: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % 100 < p
    };
    let window = 1_000i64;
    let patterns: Vec<(&str, Vec<i64>)> = vec![
        (
            "contiguous, 1% stragglers",
            (1..window).filter(|_| !coin(1)).collect(),
        ),
        ("random 50%", (1..window).filter(|_| coin(50)).collect()),
        ("random 90%", (1..window).filter(|_| coin(90)).collect()),
        ("alternating", (1..window).step_by(2).collect()),
        (
            "8 finished, 8 not",
            (1..window).filter(|o| o % 16 < 8).collect(),
        ),
    ];
    eprintln!("pattern (1,000 offsets after the commit point) | run-length | bitset | kept");
    for (name, offsets) in patterns {
        let body = DEFAULT_MAX_BYTES * 3 / 4;
        let runs = runs(0, offsets.iter().map(|&o| o..o + 1));
        let r = plan_run_length(0, &runs, body);
        let b = plan_bitset(0, &runs, body);
        let e = encode(0, offsets.iter().copied(), DEFAULT_MAX_BYTES);
        let text = |p: &Plan| HEADER + b64_len(p.bytes);
        eprintln!(
            "{name} ({} finished) | {} B | {} B | {} B",
            offsets.len(),
            text(&r),
            text(&b),
            e.text.len()
        );
        assert_eq!(e.text.len(), text(&r).min(text(&b)));
        assert_eq!(set(&decode(0, &e.text).unwrap()), offsets);
    }
}

fn offsets() -> impl Strategy<Value = (i64, Vec<i64>)> {
    (
        0i64..1 << 50,
        proptest::collection::vec((1u64..40, 1u64..300), 0..200),
    )
        .prop_map(|(base, runs)| {
            let mut out = Vec::new();
            let mut at = base;
            for (gap, len) in runs {
                at += gap as i64;
                out.extend(at..at + len as i64);
                at += len as i64;
            }
            (base, out)
        })
}

proptest! {
    /// What fits comes back exactly; what does not is a prefix cut: every
    /// decoded offset is in the set, and every finished offset below the
    /// largest decoded one is decoded.
    #[test]
    fn decode_of_encode_is_the_set_or_a_prefix_of_it(
        (base, all) in offsets(),
        cap in 0usize..600,
    ) {
        let e = encode(base, all.iter().copied(), cap);
        prop_assert!(e.text.len() <= cap);
        let got = set(&decode(base, &e.text).unwrap());
        prop_assert_eq!(got.len() as u64, e.encoded);
        prop_assert_eq!(e.encoded + e.left_out, all.len() as u64);
        prop_assert_eq!(&got[..], &all[..got.len()]);
        // The cap fits it all: nothing left out.
        let whole = encode(base, all.iter().copied(), 1 << 20);
        prop_assert_eq!(set(&decode(base, &whole.text).unwrap()), all.clone());
        if whole.text.len() <= cap {
            prop_assert_eq!(e.left_out, 0);
        }
    }

    /// Any one changed character is detected: never a different set.
    #[test]
    fn a_changed_character_is_rejected(
        (base, all) in offsets(),
        at in any::<prop::sample::Index>(),
        to in 0x21u8..0x7f,
    ) {
        let e = encode(base, all.iter().copied(), 512);
        prop_assume!(!e.text.is_empty());
        let mut bytes = e.text.clone().into_bytes();
        let i = at.index(bytes.len());
        prop_assume!(bytes[i] != to);
        bytes[i] = to;
        let text = String::from_utf8(bytes).unwrap();
        prop_assert!(decode(base, &text).is_err(), "{} accepted", text);
    }

    /// Arbitrary text never panics, and never claims the commit point or below.
    #[test]
    fn arbitrary_text_claims_nothing_at_or_below_base(
        base in 0i64..i64::MAX,
        body in proptest::collection::vec(any::<u8>(), 0..64),
        text in "xz1[rbx][A-Za-z0-9_-]{0,40}",
    ) {
        // Past the checksum, as a collision would be: the body parsers alone.
        let maps = [
            decode_run_length(base, &body),
            decode_bitset(base, &body),
            decode(base, &text),
        ];
        for map in maps.into_iter().flatten() {
            prop_assert!(map.ranges().iter().all(|r| r.start > base && r.start < r.end));
            prop_assert!(map.ranges().windows(2).all(|w| w[0].end < w[1].start));
        }
    }
}
