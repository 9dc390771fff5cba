//! The completion map codec (commit metadata): what fits comes back exactly and
//! what does not is a prefix cut; a changed character is always rejected; and no
//! text, however corrupt, claims the commit point or anything below it.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use xzepr_consumer::offsets::progress::{decode, encode};

#[derive(Debug, Arbitrary)]
struct Input {
    base: u64,
    /// (gap before, length) of each finished run.
    runs: Vec<(u8, u16)>,
    cap: u16,
    /// One character changed: (position, new byte).
    change: (u16, u8),
    /// Several bytes overwritten.
    garble: Vec<(u16, u8)>,
    /// Any text at all.
    text: String,
}

fuzz_target!(|input: Input| {
    let base = (input.base % (1 << 50)) as i64;
    let mut finished = Vec::new();
    let mut at = base;
    for &(gap, len) in &input.runs {
        at += 1 + i64::from(gap);
        finished.extend(at..at + i64::from(len % 512));
        at += i64::from(len % 512);
    }
    let cap = usize::from(input.cap % 4097);

    // Round trip: never over the cap; the decoded set is the finished set, or
    // its smallest `encoded` offsets when the rest did not fit.
    let e = encode(base, finished.iter().copied(), cap);
    assert!(e.text.len() <= cap);
    assert_eq!(e.encoded + e.left_out, finished.len() as u64);
    let got: Vec<i64> = decode(base, &e.text).expect("own encoding").offsets().collect();
    assert_eq!(got.len() as u64, e.encoded);
    assert_eq!(got[..], finished[..got.len()]);

    if !e.text.is_empty() {
        // Read for another commit point (one bit apart): rejected.
        assert!(decode(base ^ 1, &e.text).is_err());
        // Any single changed character: rejected, never a different set.
        let mut bytes = e.text.clone().into_bytes();
        let i = usize::from(input.change.0) % bytes.len();
        let to = input.change.1 & 0x7f;
        if bytes[i] != to {
            bytes[i] = to;
            let changed = String::from_utf8(bytes).expect("ASCII");
            assert!(decode(base, &changed).is_err(), "{changed:?} accepted");
        }
        // Several changes: whatever decodes claims nothing at or below the base.
        let mut bytes = e.text.clone().into_bytes();
        for &(pos, b) in &input.garble {
            let i = usize::from(pos) % bytes.len();
            bytes[i] = b & 0x7f;
        }
        check_claims(base, &String::from_utf8(bytes).expect("ASCII"));
    }
    check_claims(base, &input.text);
});

/// Decodes without panicking; a map is sorted, disjoint, and above `base`.
fn check_claims(base: i64, text: &str) {
    if let Ok(map) = decode(base, text) {
        let ranges = map.ranges();
        assert!(ranges.iter().all(|r| r.start > base && r.start < r.end));
        assert!(ranges.windows(2).all(|w| w[0].end < w[1].start));
        assert!(map.is_empty() || text.starts_with("xz1"));
    }
}
