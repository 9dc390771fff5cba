//! Crash-safe progress: the offsets above a partition's commit point that already
//! finished, encoded into the offset commit's metadata string, so that a restart
//! or the next owner after a rebalance skips them instead of replaying them.
//!
//! The commit point is the first unfinished offset (`base`); the map lists
//! finished offsets above it, so it never says anything about `base` or below.
//! Two encodings are measured on every commit and the one that covers more (then
//! the shorter) is kept:
//!
//! - **run-length** (`r`): LEB128 varints of alternating gap and run lengths;
//!   a few bytes for mostly contiguous progress with a few stragglers;
//! - **bitset** (`b`): one bit per offset from `base + 1`; 1 bit an offset,
//!   whatever the pattern, so it wins on fragmented progress (random, alternating).
//!
//! Text: `xz1` (magic and version), the kind letter, a CRC-32 of
//! `base ‖ kind ‖ body` (6 base64url characters), then the body in base64url
//! without padding. The checksum covers `base`, so a map read next to another
//! offset than it was written for is rejected, and CRC-32 detects every change
//! confined to 4 consecutive bytes of the body (any single character).
//!
//! **Never stalls**: the text is at most `max_bytes` long. When the whole map
//! does not fit, the longest prefix that does is encoded (the smallest finished
//! offsets); the rest is not claimed, so it is replayed, which is correct.
//! **Never skips wrongly**: anything that does not decode (an unknown prefix,
//! another client's metadata, a corrupt string) is an error, and the caller
//! ignores the map and replays.
//!
//! ```
//! use xzepr_consumer::offsets::progress::{decode, encode, DEFAULT_MAX_BYTES};
//!
//! // Committed at 100 (still running); 101..=140 and 150 finished.
//! let done = (101..=140).chain([150]);
//! let e = encode(100, done.clone(), DEFAULT_MAX_BYTES);
//! assert!(e.text.len() <= DEFAULT_MAX_BYTES);
//! let map = decode(100, &e.text).unwrap();
//! assert!(map.offsets().eq(done));
//! assert!(!map.contains(100) && !map.contains(141));
//! // Read next to another commit point, it is rejected: replay, never skip.
//! assert!(decode(99, &e.text).is_err());
//! ```

#[cfg(test)]
mod tests;
mod text;

use std::ops::Range;

use text::{b64_decode, b64_encode, b64_len, checksum};

/// Default cap on the metadata text, in bytes: half the broker's default
/// `offset.metadata.max.bytes` ([`BROKER_DEFAULT_MAX_BYTES`]). Every commit
/// writes it once per partition to `__consumer_offsets` (replicated, kept until
/// compaction), so a full cap on 100 partitions each second is 200 KB/s of
/// offset log; and 2,048 characters already hold 12,000 offsets as a bitset,
/// or ~700 stragglers as runs: more than the default `max_in_flight` (1,024)
/// behind one slow event. Past the broker's limit the whole commit of the
/// partition is refused, so the cap must stay below it.
pub const DEFAULT_MAX_BYTES: usize = 2048;

/// The broker's default `offset.metadata.max.bytes`.
pub const BROKER_DEFAULT_MAX_BYTES: usize = 4096;

const MAGIC: &str = "xz1";
/// Base64 of the 4-byte CRC.
const CRC_CHARS: usize = 6;
/// Magic, kind, checksum.
const HEADER: usize = MAGIC.len() + 1 + CRC_CHARS;

/// Completion map errors: the map is ignored and its offsets replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Not one of our maps (another client's metadata, or a newer version).
    #[error("not a completion map of a known version")]
    UnknownFormat,
    /// Our magic, an unknown encoding.
    #[error("unknown completion map encoding `{kind}`")]
    UnknownKind {
        /// The kind character.
        kind: char,
    },
    /// A character outside base64url, or non-zero padding bits.
    #[error("completion map is not valid base64url at byte {position}")]
    Base64 {
        /// Byte position in the text.
        position: usize,
    },
    /// The checksum does not match: corrupt, or written for another commit point.
    #[error("completion map checksum mismatch")]
    Checksum,
    /// The body ends inside a varint or a gap without its run.
    #[error("completion map is truncated")]
    Truncated,
    /// Offsets past `i64::MAX`, or a negative commit point.
    #[error("completion map offsets out of range")]
    OutOfRange,
}

/// How a map was encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// Alternating gap and run lengths, as varints.
    RunLength,
    /// One bit per offset from the commit point on.
    Bitset,
}

impl Kind {
    fn tag(self) -> u8 {
        match self {
            Kind::RunLength => b'r',
            Kind::Bitset => b'b',
        }
    }
}

/// An encoded map and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Encoded {
    /// The metadata text (empty when there is nothing to encode or nothing fits).
    pub text: String,
    /// The encoding chosen; `None` with an empty text.
    pub kind: Option<Kind>,
    /// Finished offsets the text holds.
    pub encoded: u64,
    /// Finished offsets that did not fit (the largest ones): replayed.
    pub left_out: u64,
}

/// Decoded finished offsets: sorted, disjoint, non-adjacent ranges, all above
/// the commit point. Held as ranges, so a short text never expands into a
/// large allocation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompletionMap {
    ranges: Vec<Range<i64>>,
}

impl CompletionMap {
    /// The ranges, in order.
    pub fn ranges(&self) -> &[Range<i64>] {
        &self.ranges
    }

    /// Whether `offset` finished.
    pub fn contains(&self, offset: i64) -> bool {
        let i = self.ranges.partition_point(|r| r.end <= offset);
        self.ranges.get(i).is_some_and(|r| r.start <= offset)
    }

    /// How many offsets it holds.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| r.end.abs_diff(r.start)).sum()
    }

    /// True when it holds no offset.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The offsets, in order.
    pub fn offsets(&self) -> impl Iterator<Item = i64> + '_ {
        self.ranges.iter().flat_map(Clone::clone)
    }

    /// Converts into its ranges.
    pub fn into_ranges(self) -> Vec<Range<i64>> {
        self.ranges
    }

    fn push(&mut self, start: i64, end: i64) {
        match self.ranges.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => self.ranges.push(start..end),
        }
    }
}

/// Encodes the finished offsets above `base` (the commit point) in at most
/// `max_bytes` characters. `finished` must be increasing; offsets at or below
/// `base`, or not above the previous one, are ignored.
///
/// When the whole set does not fit, the longest prefix that does is encoded
/// ([`Encoded::left_out`] counts the rest); when not even one offset fits, or
/// the set is empty, the text is empty.
pub fn encode(base: i64, finished: impl IntoIterator<Item = i64>, max_bytes: usize) -> Encoded {
    encode_ranges(
        base,
        finished.into_iter().map(|o| o..o.saturating_add(1)),
        max_bytes,
    )
}

/// As [`encode`], from increasing ranges of finished offsets (work in the
/// number of ranges, not of offsets). Parts at or below `base` or below the
/// previous range's end are ignored; empty ranges too.
pub fn encode_ranges(
    base: i64,
    finished: impl IntoIterator<Item = Range<i64>>,
    max_bytes: usize,
) -> Encoded {
    let runs = runs(base, finished);
    let total: u64 = runs.iter().map(|r| r.1).sum();
    let body_max = max_bytes.saturating_sub(HEADER) * 3 / 4;
    let rle = plan_run_length(base, &runs, body_max);
    let bits = plan_bitset(base, &runs, body_max);
    // More offsets covered wins; then the shorter text.
    let pick = match rle.covered.cmp(&bits.covered) {
        std::cmp::Ordering::Greater => rle,
        std::cmp::Ordering::Less => bits,
        std::cmp::Ordering::Equal if rle.bytes <= bits.bytes => rle,
        std::cmp::Ordering::Equal => bits,
    };
    if pick.covered == 0 {
        return Encoded {
            left_out: total,
            ..Encoded::default()
        };
    }
    let body = match pick.kind {
        Kind::RunLength => run_length_body(base, &runs, pick.covered),
        Kind::Bitset => bitset_body(base, &runs, pick.covered),
    };
    debug_assert_eq!(body.len(), pick.bytes);
    let mut text = String::with_capacity(HEADER + b64_len(body.len()));
    text.push_str(MAGIC);
    text.push(char::from(pick.kind.tag()));
    b64_encode(&checksum(base, pick.kind, &body).to_be_bytes(), &mut text);
    b64_encode(&body, &mut text);
    debug_assert!(text.len() <= max_bytes);
    Encoded {
        text,
        kind: Some(pick.kind),
        encoded: pick.covered,
        left_out: total - pick.covered,
    }
}

/// Decodes a map written by [`encode`] for commit point `base`. An empty text
/// is an empty map.
///
/// # Errors
/// Any text that is not exactly such a map for this `base` (see [`Error`]);
/// the caller replays instead of skipping.
pub fn decode(base: i64, text: &str) -> Result<CompletionMap, Error> {
    if text.is_empty() {
        return Ok(CompletionMap::default());
    }
    let Some(rest) = text.strip_prefix(MAGIC) else {
        return Err(Error::UnknownFormat);
    };
    if base < 0 {
        return Err(Error::OutOfRange);
    }
    let bytes = rest.as_bytes();
    let kind = match bytes.first() {
        Some(b'r') => Kind::RunLength,
        Some(b'b') => Kind::Bitset,
        Some(_) => {
            return Err(Error::UnknownKind {
                kind: rest.chars().next().unwrap_or('?'),
            })
        }
        None => return Err(Error::Truncated),
    };
    if bytes.len() < 1 + CRC_CHARS {
        return Err(Error::Truncated);
    }
    let crc_bytes = b64_decode(&bytes[1..=CRC_CHARS], MAGIC.len() + 1)?;
    let crc = u32::from_be_bytes(crc_bytes.try_into().map_err(|_| Error::Truncated)?);
    let body = b64_decode(&bytes[1 + CRC_CHARS..], HEADER)?;
    if checksum(base, kind, &body) != crc {
        return Err(Error::Checksum);
    }
    match kind {
        Kind::RunLength => decode_run_length(base, &body),
        Kind::Bitset => decode_bitset(base, &body),
    }
}

/// Maximal runs `(start, len)` of the valid offsets.
fn runs(base: i64, finished: impl IntoIterator<Item = Range<i64>>) -> Vec<(i64, u64)> {
    let mut runs: Vec<(i64, u64)> = Vec::new();
    // One past the last offset taken.
    let mut next = base.saturating_add(1);
    for r in finished {
        let start = r.start.max(next);
        if start >= r.end {
            continue;
        }
        let len = r.end.abs_diff(start);
        match runs.last_mut() {
            Some((s, l)) if s.checked_add_unsigned(*l) == Some(start) => *l += len,
            _ => runs.push((start, len)),
        }
        next = r.end;
    }
    runs
}

struct Plan {
    kind: Kind,
    /// Offsets covered.
    covered: u64,
    /// Body bytes.
    bytes: usize,
}

/// The varints of run `i`: its gap (from `base + 1` for the first, minus one
/// after a run, since runs are maximal) and its length minus one.
fn run_values(base: i64, runs: &[(i64, u64)], i: usize) -> (u64, u64) {
    let (start, len) = runs[i];
    let gap = match i.checked_sub(1) {
        None => start.abs_diff(base) - 1,
        Some(p) => start.abs_diff(runs[p].0) - runs[p].1 - 1,
    };
    (gap, len - 1)
}

fn plan_run_length(base: i64, runs: &[(i64, u64)], body_max: usize) -> Plan {
    let (mut covered, mut bytes) = (0, 0);
    for i in 0..runs.len() {
        let (gap, len) = run_values(base, runs, i);
        let need = varint_len(gap) + varint_len(len);
        if bytes + need <= body_max {
            bytes += need;
            covered += len + 1;
            continue;
        }
        // Part of the run fits: as long a run as the bytes left can say.
        let room = body_max.saturating_sub(bytes + varint_len(gap));
        if room > 0 {
            let most = if room >= 9 {
                u64::MAX
            } else {
                (1u64 << (7 * room)) - 1
            };
            let part = len.min(most);
            bytes += varint_len(gap) + varint_len(part);
            covered += part + 1;
        }
        break;
    }
    Plan {
        kind: Kind::RunLength,
        covered,
        bytes,
    }
}

fn plan_bitset(base: i64, runs: &[(i64, u64)], body_max: usize) -> Plan {
    // Bit i is offset base + 1 + i: `body_max` bytes reach base + 8 * body_max.
    let reach = (body_max as u64).saturating_mul(8);
    let (mut covered, mut last) = (0, base);
    for &(start, len) in runs {
        let first = start.abs_diff(base);
        if first > reach {
            break;
        }
        let n = len.min(reach - first + 1);
        covered += n;
        last = start + n as i64 - 1;
    }
    Plan {
        kind: Kind::Bitset,
        covered,
        bytes: last.abs_diff(base).div_ceil(8) as usize,
    }
}

fn run_length_body(base: i64, runs: &[(i64, u64)], mut covered: u64) -> Vec<u8> {
    let mut body = Vec::new();
    for i in 0..runs.len() {
        if covered == 0 {
            break;
        }
        let (gap, len) = run_values(base, runs, i);
        let take = (len + 1).min(covered);
        put_varint(&mut body, gap);
        put_varint(&mut body, take - 1);
        covered -= take;
    }
    body
}

fn bitset_body(base: i64, runs: &[(i64, u64)], mut covered: u64) -> Vec<u8> {
    let mut body = Vec::new();
    for &(start, len) in runs {
        if covered == 0 {
            break;
        }
        let take = len.min(covered);
        for bit in start.abs_diff(base) - 1..start.abs_diff(base) - 1 + take {
            let (byte, shift) = ((bit / 8) as usize, bit % 8);
            if body.len() <= byte {
                body.resize(byte + 1, 0);
            }
            body[byte] |= 1 << shift;
        }
        covered -= take;
    }
    body
}

fn decode_run_length(base: i64, mut body: &[u8]) -> Result<CompletionMap, Error> {
    let mut map = CompletionMap::default();
    // One past the last offset described so far.
    let mut next = base.checked_add(1).ok_or(Error::OutOfRange)?;
    let mut first = true;
    while !body.is_empty() {
        let gap = take_varint(&mut body)?;
        if body.is_empty() {
            return Err(Error::Truncated);
        }
        let len = take_varint(&mut body)?;
        // Gaps after a run are at least one (runs are maximal).
        let gap = if first {
            gap
        } else {
            gap.checked_add(1).ok_or(Error::OutOfRange)?
        };
        first = false;
        let start = add(next, gap)?;
        let end = add(start, len.checked_add(1).ok_or(Error::OutOfRange)?)?;
        map.push(start, end);
        next = end;
    }
    Ok(map)
}

fn decode_bitset(base: i64, body: &[u8]) -> Result<CompletionMap, Error> {
    let first = base.checked_add(1).ok_or(Error::OutOfRange)?;
    add(first, body.len() as u64 * 8)?;
    let mut map = CompletionMap::default();
    for (i, &byte) in body.iter().enumerate() {
        for shift in 0..8 {
            if byte & (1 << shift) != 0 {
                let o = first + (i * 8 + shift) as i64;
                map.push(o, o + 1);
            }
        }
    }
    Ok(map)
}

fn add(at: i64, n: u64) -> Result<i64, Error> {
    i64::try_from(n)
        .ok()
        .and_then(|n| at.checked_add(n))
        .ok_or(Error::OutOfRange)
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take_varint(body: &mut &[u8]) -> Result<u64, Error> {
    let mut v = 0u64;
    for (i, &b) in body.iter().enumerate().take(10) {
        let bits = u64::from(b & 0x7f);
        if i == 9 && bits > 1 {
            return Err(Error::OutOfRange);
        }
        v |= bits << (7 * i);
        if b & 0x80 == 0 {
            *body = &body[i + 1..];
            return Ok(v);
        }
    }
    Err(Error::Truncated)
}
