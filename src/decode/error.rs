//! Decode errors: each says exactly what is wrong with the message.

use std::fmt;

/// The JSON type found where another was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum JsonKind {
    /// `null`
    Null,
    /// `true` or `false`
    Bool,
    /// a number
    Number,
    /// a string
    String,
    /// an array
    Array,
    /// an object
    Object,
}

impl fmt::Display for JsonKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JsonKind::Null => "null",
            JsonKind::Bool => "a boolean",
            JsonKind::Number => "a number",
            JsonKind::String => "a string",
            JsonKind::Array => "an array",
            JsonKind::Object => "an object",
        })
    }
}

/// Why a message could not be decoded as a CloudEvent.
///
/// Kept small (a few words) because it travels on the hot path of every
/// malformed message; the constructors are `#[cold]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The payload is not valid JSON (or not valid UTF-8).
    #[error("invalid JSON at byte {offset} (line {line}, column {column}): {reason}")]
    InvalidJson {
        /// Byte offset into the payload where the parser stopped.
        offset: usize,
        /// 1-based line of that position.
        line: u32,
        /// 1-based column (in bytes) of that position.
        column: u32,
        /// The parser's own description.
        reason: Box<str>,
    },
    /// The payload is JSON, but not an object.
    #[error("a CloudEvent must be a JSON object, found {found}")]
    NotAnObject {
        /// What the top-level value was.
        found: JsonKind,
    },
    /// A required CloudEvents attribute is absent.
    #[error("missing required attribute `{name}`")]
    MissingAttribute {
        /// The attribute's name.
        name: &'static str,
    },
    /// An attribute or field has the wrong JSON type.
    #[error("`{field}` must be {expected}, found {found}")]
    WrongType {
        /// The attribute or field (a path for nested fields, e.g. `data.events[0].id`).
        field: Box<str>,
        /// What the contract requires.
        expected: &'static str,
        /// What the message had.
        found: JsonKind,
    },
    /// `specversion` is not one this crate understands (`1.0`, `1.0.1`).
    #[error("unsupported specversion `{found}` (supported: 1.0, 1.0.1)")]
    UnsupportedSpecVersion {
        /// The version the message declared.
        found: Box<str>,
    },
    /// The payload is larger than [`DecoderConfig::max_payload_bytes`](super::DecoderConfig::max_payload_bytes).
    #[error("payload of {size} bytes exceeds the maximum of {max}")]
    PayloadTooLarge {
        /// The payload's size.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// JSON nested deeper than [`DecoderConfig::max_depth`](super::DecoderConfig::max_depth).
    #[error("JSON nested deeper than the maximum of {max}")]
    TooDeep {
        /// The configured maximum.
        max: usize,
    },
    /// A binary-mode header value is not UTF-8.
    #[error("header `{name}` is not valid UTF-8")]
    InvalidHeader {
        /// The header's key.
        name: Box<str>,
    },
    /// A [`DecoderConfig`](super::DecoderConfig) value is out of range.
    #[error("invalid decoder setting `{field}`: {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// What is allowed.
        reason: &'static str,
    },
    /// `data` is present but does not have the shape the accessor asked for.
    #[error("`data` does not match the XZepr entity shape: {reason}")]
    DataShape {
        /// What did not match.
        reason: Box<str>,
    },
}

/// 1-based line and byte column of `offset` in `input` (error path only).
#[cold]
pub(crate) fn line_column(input: &[u8], offset: usize) -> (u32, u32) {
    let before = &input[..offset.min(input.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    (clamp(line), clamp(before.len() - start + 1))
}

impl Error {
    #[cold]
    pub(crate) fn missing(name: &'static str) -> Self {
        Error::MissingAttribute { name }
    }

    #[cold]
    pub(crate) fn wrong_type(field: &str, expected: &'static str, found: JsonKind) -> Self {
        Error::WrongType {
            field: field.into(),
            expected,
            found,
        }
    }

    /// True for errors about the message's bytes (as opposed to its meaning).
    pub fn is_syntax(&self) -> bool {
        matches!(
            self,
            Error::InvalidJson { .. } | Error::InvalidHeader { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_stays_small() {
        // Travels on the malformed-message path; keep it within five words.
        assert!(
            std::mem::size_of::<Error>() <= 40,
            "{}",
            std::mem::size_of::<Error>()
        );
    }
}
