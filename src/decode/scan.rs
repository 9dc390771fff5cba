//! A validating, allocation-free JSON scanner for the CloudEvent envelope.
//!
//! Why not serde_json or simd-json for the envelope: measured on a ~1 KB XZepr
//! event, building a tape or a DOM of the whole document costs 1–2 µs, most of it
//! spent on `data`, which most handlers never read. This scanner walks the top-level
//! object, borrows attribute strings straight from the payload, and *skips* `data`
//! while still validating it (grammar, escapes, nesting depth), so a malformed
//! message is rejected at decode time with its byte offset, yet a valid one costs
//! about as much as a memchr over its strings. `data` is decoded later, on demand.
//!
//! The input is a `&str` (UTF-8 validated once, up front, by the standard library's
//! vectorised check), so every slice taken at an ASCII delimiter is valid UTF-8.

use std::borrow::Cow;

use super::error::{Error, JsonKind};

/// Hard ceiling for [`DecoderConfig::max_depth`](super::DecoderConfig::max_depth):
/// the container-kind stack is a fixed bitset of this many bits.
pub(crate) const MAX_DEPTH_CEILING: usize = 1024;

pub(crate) struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pub(crate) pos: usize,
    max_depth: usize,
}

impl<'a> Scanner<'a> {
    pub(crate) fn new(text: &'a str, max_depth: usize) -> Self {
        Scanner {
            text,
            bytes: text.as_bytes(),
            pos: 0,
            max_depth: max_depth.min(MAX_DEPTH_CEILING),
        }
    }

    #[cold]
    pub(crate) fn error(&self, reason: &str) -> Error {
        self.error_at(self.pos, reason)
    }

    #[cold]
    fn error_at(&self, offset: usize, reason: &str) -> Error {
        let offset = offset.min(self.bytes.len());
        let (line, column) = super::error::line_column(self.bytes, offset);
        Error::InvalidJson {
            offset,
            line,
            column,
            reason: reason.into(),
        }
    }

    #[inline]
    pub(crate) fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    #[inline]
    pub(crate) fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.pos += 1;
        }
    }

    /// Consumes `byte` (after whitespace) or fails naming what was expected.
    #[inline]
    pub(crate) fn expect(&mut self, byte: u8, what: &str) -> Result<(), Error> {
        self.skip_ws();
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected(what))
        }
    }

    #[cold]
    pub(crate) fn unexpected(&self, what: &str) -> Error {
        match self.peek() {
            None => self.error(&format!("unexpected end of input, expected {what}")),
            Some(_) => self.error(&format!("expected {what}")),
        }
    }

    /// After the top-level value: only whitespace may follow.
    pub(crate) fn finish(&mut self) -> Result<(), Error> {
        self.skip_ws();
        if self.pos == self.bytes.len() {
            Ok(())
        } else {
            Err(self.error("trailing characters after the JSON value"))
        }
    }

    /// The kind of the value starting at the cursor (after whitespace).
    pub(crate) fn peek_kind(&mut self) -> Result<JsonKind, Error> {
        self.skip_ws();
        Ok(match self.peek() {
            Some(b'"') => JsonKind::String,
            Some(b'{') => JsonKind::Object,
            Some(b'[') => JsonKind::Array,
            Some(b't' | b'f') => JsonKind::Bool,
            Some(b'n') => JsonKind::Null,
            Some(b'-' | b'0'..=b'9') => JsonKind::Number,
            _ => return Err(self.unexpected("a JSON value")),
        })
    }

    /// Parses a string at the cursor, borrowing it unless it holds escapes.
    pub(crate) fn parse_string(&mut self) -> Result<Cow<'a, str>, Error> {
        debug_assert_eq!(self.peek(), Some(b'"'));
        self.pos += 1;
        let start = self.pos;
        let end = self.scan_plain()?;
        if self.bytes[end] == b'"' {
            self.pos = end + 1;
            return Ok(Cow::Borrowed(&self.text[start..end]));
        }
        // Escapes: unescape into an owned string (the only allocation on this path).
        let mut out = String::with_capacity(end - start + 16);
        out.push_str(&self.text[start..end]);
        self.pos = end;
        loop {
            // At a backslash.
            self.pos += 1;
            let esc = self
                .peek()
                .ok_or_else(|| self.error("unexpected end of input in an escape"))?;
            self.pos += 1;
            match esc {
                b'"' => out.push('"'),
                b'\\' => out.push('\\'),
                b'/' => out.push('/'),
                b'b' => out.push('\u{8}'),
                b'f' => out.push('\u{c}'),
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'u' => out.push(self.unicode_escape()?),
                _ => return Err(self.error_at(self.pos - 1, "invalid escape")),
            }
            let chunk = self.pos;
            let end = self.scan_plain()?;
            out.push_str(&self.text[chunk..end]);
            self.pos = end;
            if self.bytes[end] == b'"' {
                self.pos = end + 1;
                return Ok(Cow::Owned(out));
            }
        }
    }

    /// From the cursor, finds the next `"` or `\`, rejecting raw control characters.
    /// Returns its index; the cursor is not moved.
    ///
    /// Eight bytes at a time (SWAR) for the first words: most strings in an
    /// event are short keys and ids, where a call into memchr costs more than
    /// the scan itself. Past them the string is long (a log line, a message):
    /// [`BLOCK`] bytes per step, tested in one go (a few vector compares once
    /// compiled), and the words again only in the block that stops.
    #[inline]
    fn scan_plain(&self) -> Result<usize, Error> {
        const LO: u64 = 0x0101_0101_0101_0101;
        const HI: u64 = 0x8080_8080_8080_8080;
        // Lowest set bit exact: a byte equal to zero (resp. below 0x20) sets its high bit.
        #[inline]
        fn zero_bytes(v: u64) -> u64 {
            v.wrapping_sub(LO) & !v & HI
        }
        #[inline]
        fn stops(x: u64) -> u64 {
            zero_bytes(x ^ (LO * u64::from(b'"')))
                | zero_bytes(x ^ (LO * u64::from(b'\\')))
                | (x.wrapping_sub(LO * 0x20) & !x & HI)
        }
        let bytes = self.bytes;
        let mut i = self.pos;
        let mut words = 0;
        while let Some(chunk) = bytes.get(i..i + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let hits = stops(u64::from_le_bytes(word));
            if hits != 0 {
                i += (hits.trailing_zeros() / 8) as usize;
                return self.stop_at(i);
            }
            i += 8;
            words += 1;
            if words == SHORT_WORDS {
                while bytes
                    .get(i..i + BLOCK)
                    .and_then(|b| <&[u8; BLOCK]>::try_from(b).ok())
                    .is_some_and(clean_block)
                {
                    i += BLOCK;
                }
            }
        }
        while let Some(&b) = bytes.get(i) {
            if b == b'"' || b == b'\\' || b < 0x20 {
                return self.stop_at(i);
            }
            i += 1;
        }
        Err(self.error_at(bytes.len(), "unterminated string"))
    }

    #[inline]
    fn stop_at(&self, i: usize) -> Result<usize, Error> {
        if self.bytes[i] < 0x20 {
            return Err(self.error_at(i, "control character in a string (must be escaped)"));
        }
        Ok(i)
    }

    fn hex4(&mut self) -> Result<u16, Error> {
        let digits = self.bytes.get(self.pos..self.pos + 4).ok_or_else(|| {
            self.error_at(self.bytes.len(), "unexpected end of input in \\u escape")
        })?;
        let mut v: u16 = 0;
        for (i, &d) in digits.iter().enumerate() {
            let n = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return Err(self.error_at(self.pos + i, "invalid \\u escape")),
            };
            v = (v << 4) | u16::from(n);
        }
        self.pos += 4;
        Ok(v)
    }

    /// Decodes the `XXXX` (and a following low surrogate) after `\u`.
    fn unicode_escape(&mut self) -> Result<char, Error> {
        let start = self.pos - 2;
        let hi = self.hex4()?;
        let code = match hi {
            0xD800..=0xDBFF => {
                if self.bytes.get(self.pos..self.pos + 2) != Some(b"\\u") {
                    return Err(self.error_at(start, "lone leading surrogate in \\u escape"));
                }
                self.pos += 2;
                let lo = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&lo) {
                    return Err(self.error_at(start, "invalid low surrogate in \\u escape"));
                }
                0x10000 + ((u32::from(hi) - 0xD800) << 10) + (u32::from(lo) - 0xDC00)
            }
            0xDC00..=0xDFFF => {
                return Err(self.error_at(start, "lone trailing surrogate in \\u escape"))
            }
            _ => u32::from(hi),
        };
        char::from_u32(code).ok_or_else(|| self.error_at(start, "invalid \\u escape"))
    }

    /// Skips a string without unescaping it, validating escapes.
    fn skip_string(&mut self) -> Result<(), Error> {
        self.pos += 1;
        loop {
            let end = self.scan_plain()?;
            self.pos = end + 1;
            if self.bytes[end] == b'"' {
                return Ok(());
            }
            match self.peek() {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.pos += 1,
                Some(b'u') => {
                    // Validated as serde_json validates skipped values: four hex digits.
                    self.pos += 1;
                    self.hex4()?;
                }
                Some(_) => return Err(self.error("invalid escape")),
                None => return Err(self.error("unexpected end of input in an escape")),
            }
        }
    }

    fn skip_literal(&mut self, lit: &'static [u8]) -> Result<(), Error> {
        if self.bytes.get(self.pos..self.pos + lit.len()) == Some(lit) {
            self.pos += lit.len();
            Ok(())
        } else {
            Err(self.error("invalid literal"))
        }
    }

    /// Parses `true`/`false` at the cursor.
    pub(crate) fn parse_bool(&mut self) -> Result<bool, Error> {
        if self.peek() == Some(b't') {
            self.skip_literal(b"true").map(|()| true)
        } else {
            self.skip_literal(b"false").map(|()| false)
        }
    }

    fn skip_digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    /// Skips a number, enforcing JSON's grammar (no leading zeros, no bare `.`).
    fn skip_number(&mut self) -> Result<(), Error> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.skip_digits();
            }
            _ => return Err(self.error("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.skip_digits() == 0 {
                return Err(self.error("invalid number: no digits after the decimal point"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.skip_digits() == 0 {
                return Err(self.error("invalid number: no digits in the exponent"));
            }
        }
        Ok(())
    }

    /// Skips one complete value at the cursor whose container sits at `depth`
    /// (the top-level object is depth 1), validating it fully.
    ///
    /// Iterative with a bitset of container kinds, so hostile nesting costs no
    /// stack and fails at `max_depth` with [`Error::TooDeep`].
    pub(crate) fn skip_value(&mut self, depth: usize) -> Result<(), Error> {
        let base = depth;
        let mut depth = depth;
        // Bit set = that level is an object; clear = an array.
        let mut kinds = [0u64; MAX_DEPTH_CEILING / 64];
        'value: loop {
            self.skip_ws();
            match self.peek() {
                Some(b'"') => self.skip_string()?,
                Some(open @ (b'{' | b'[')) => {
                    depth += 1;
                    if depth > self.max_depth {
                        return Err(Error::TooDeep {
                            max: self.max_depth,
                        });
                    }
                    let is_obj = open == b'{';
                    let (word, bit) = (depth / 64, depth % 64);
                    if is_obj {
                        kinds[word] |= 1 << bit;
                    } else {
                        kinds[word] &= !(1 << bit);
                    }
                    self.pos += 1;
                    self.skip_ws();
                    let close = if is_obj { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.pos += 1;
                        depth -= 1;
                    } else {
                        if is_obj {
                            self.object_key()?;
                        }
                        continue 'value;
                    }
                }
                Some(b't') => self.skip_literal(b"true")?,
                Some(b'f') => self.skip_literal(b"false")?,
                Some(b'n') => self.skip_literal(b"null")?,
                Some(b'-' | b'0'..=b'9') => self.skip_number()?,
                _ => return Err(self.unexpected("a JSON value")),
            }
            // A value is complete: close containers until one wants another element.
            loop {
                if depth == base {
                    return Ok(());
                }
                self.skip_ws();
                let is_obj = kinds[depth / 64] & (1 << (depth % 64)) != 0;
                match (self.peek(), is_obj) {
                    (Some(b','), _) => {
                        self.pos += 1;
                        if is_obj {
                            self.object_key()?;
                        }
                        continue 'value;
                    }
                    (Some(b'}'), true) | (Some(b']'), false) => {
                        self.pos += 1;
                        depth -= 1;
                    }
                    (_, true) => return Err(self.unexpected("`,` or `}`")),
                    (_, false) => return Err(self.unexpected("`,` or `]`")),
                }
            }
        }
    }

    /// Inside an object, before a member: skips `"key" :`.
    fn object_key(&mut self) -> Result<(), Error> {
        self.skip_ws();
        if self.peek() != Some(b'"') {
            return Err(self.unexpected("a string key"));
        }
        self.skip_string()?;
        self.expect(b':', "`:`")
    }

    /// The text of `start..self.pos`.
    pub(crate) fn slice(&self, start: usize) -> &'a str {
        &self.text[start..self.pos]
    }
}

/// Validates that `text` is exactly one JSON value no deeper than `max_depth`
/// (the value itself at depth `base`).
/// Words scanned one by one before a string counts as long.
const SHORT_WORDS: usize = 2;

/// Bytes of a long string tested at once.
const BLOCK: usize = 32;

/// Whether a block holds no `"`, `\` or control character. Written without
/// early exits, so the compiler tests every byte in parallel.
#[inline]
fn clean_block(block: &[u8; BLOCK]) -> bool {
    let mut stop = 0u8;
    for &b in block {
        stop |= u8::from(b == b'"') | u8::from(b == b'\\') | u8::from(b < 0x20);
    }
    stop == 0
}

pub(crate) fn validate(text: &str, base: usize, max_depth: usize) -> Result<(), Error> {
    let mut s = Scanner::new(text, max_depth);
    s.skip_value(base)?;
    s.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> bool {
        validate(text, 0, 128).is_ok()
    }

    #[test]
    fn accepts_what_serde_json_accepts() {
        for t in [
            "0",
            "-0.5e+10",
            "1E5",
            "\"a\\u00e9\\ud83d\\ude00\\n\"",
            "[1,[2,[3,{}]],{\"a\":[]}]",
            " { \"k\" : null , \"t\":true,\"f\":false } ",
            "\"\u{2028}\"",
        ] {
            assert!(ok(t), "{t}");
            assert!(
                serde_json::from_str::<serde::de::IgnoredAny>(t).is_ok(),
                "{t}"
            );
        }
    }

    #[test]
    fn rejects_what_serde_json_rejects() {
        for t in [
            "01",
            "1.",
            ".5",
            "-",
            "1e",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\"}",
            "[",
            "\"abc",
            "\"\\x\"",
            "\"\u{1}\"",
            "tru",
            "nul",
            "{1:2}",
            "[1 2]",
            "{} x",
            "\"\\u12g4\"",
        ] {
            assert!(!ok(t), "{t}");
            assert!(
                serde_json::from_str::<serde::de::IgnoredAny>(t).is_err(),
                "{t}"
            );
        }
    }

    #[test]
    fn long_strings_stop_where_a_byte_by_byte_scan_stops() {
        // Stops at every place in and around the word and block steps.
        for len in 0..200 {
            for stop in [b'"', b'\\', 0x01, 0x1f] {
                let mut text = vec![b'"'];
                text.extend(std::iter::repeat_n(b'a', len));
                text.push(stop);
                text.extend_from_slice(b"\"\"");
                let text = String::from_utf8(text).unwrap();
                let mut at = Scanner::new(&text, 8);
                at.pos = 1;
                match (stop, at.scan_plain()) {
                    (b'"' | b'\\', found) => assert_eq!(found.unwrap(), 1 + len, "len {len}"),
                    (_, Err(Error::InvalidJson { offset, .. })) => {
                        assert_eq!(offset, 1 + len, "len {len}")
                    }
                    (_, other) => panic!("len {len}: a control character passed: {other:?}"),
                }
            }
        }
        // Non-ASCII is plain text: only ASCII bytes stop a scan.
        let long = format!("\"{}\"", "日志→é".repeat(40));
        let mut at = Scanner::new(&long, 8);
        at.pos = 1;
        assert_eq!(at.scan_plain().unwrap(), long.len() - 1);
    }

    #[test]
    fn depth_is_bounded() {
        let deep = "[".repeat(10) + &"]".repeat(10);
        assert!(validate(&deep, 0, 10).is_ok());
        assert_eq!(validate(&deep, 0, 9), Err(Error::TooDeep { max: 9 }));
        let hostile = "[".repeat(100_000);
        assert_eq!(validate(&hostile, 0, 128), Err(Error::TooDeep { max: 128 }));
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        let mut s = Scanner::new("\"plain\"", 8);
        assert!(matches!(s.parse_string().unwrap(), Cow::Borrowed("plain")));
        let mut s = Scanner::new(r#""a\"b\u00e9\ud83d\ude00""#, 8);
        assert_eq!(s.parse_string().unwrap(), "a\"bé😀");
        let mut s = Scanner::new(r#""\ud83d""#, 8);
        assert!(s.parse_string().is_err());
    }

    #[test]
    fn errors_carry_positions() {
        let err = validate("[1,\n  x]", 0, 8).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidJson {
                    offset: 6,
                    line: 2,
                    column: 3,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
