//! The offset tracker under arbitrary dispatch gaps and completion orders: the
//! commit point never passes an unfinished offset, and reaches the end when all finish.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use xzepr_consumer::offsets::PartitionTracker;

fuzz_target!(|input: (Vec<u8>, Vec<u16>)| {
    let (gaps, completions) = input;
    let mut t = PartitionTracker::new();
    let mut offsets = Vec::with_capacity(gaps.len());
    let mut next = 0i64;
    for g in gaps {
        next += 1 + i64::from(g % 4);
        assert!(t.dispatched(next).is_ok());
        offsets.push(next);
    }
    // Re-dispatching anything at or below the last is refused.
    if let Some(&last) = offsets.last() {
        assert!(t.dispatched(last).is_err());
    }
    let mut finished = BTreeSet::new();
    for c in completions {
        if offsets.is_empty() {
            break;
        }
        let o = offsets[usize::from(c) % offsets.len()];
        assert_eq!(t.finished(o), finished.insert(o));
        let point = t.commit_point().expect("dispatched");
        assert!(offsets.iter().take_while(|&&d| d < point).all(|d| finished.contains(d)));
        assert!(!finished.contains(&point));
    }
    for &o in &offsets {
        t.finished(o);
    }
    assert_eq!(t.commit_point(), offsets.last().map(|l| l + 1));
    assert_eq!(t.in_flight(), 0);
});
