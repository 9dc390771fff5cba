//! Unit tests of the poll thread's steps.

use super::maps::Skip;

fn skip(base: i64, ranges: &[std::ops::Range<i64>]) -> Skip {
    Skip {
        base,
        ranges: ranges.iter().cloned().collect(),
        started: false,
    }
}

#[test]
fn skips_exactly_the_recorded_offsets_as_they_arrive() {
    let mut s = skip(10, &[12..14, 20..21]);
    let taken: Vec<i64> = (10..25).filter(|&o| s.take(o)).collect();
    assert_eq!(taken, vec![12, 13, 20]);
    assert!(s.ranges.is_empty());
}

#[test]
fn reading_from_before_the_commit_point_ignores_the_map() {
    // An offset reset to an earlier position: the map is about other messages.
    let mut s = skip(10, &[12..14, 16..17]);
    assert!((0..20).all(|o| !s.take(o)));
}
