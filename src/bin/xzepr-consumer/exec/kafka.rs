//! The Kafka record in a `run --exec` program's environment: its key, its
//! headers and its timestamp (listed in `run --help`, [`super::HELP`]).
//!
//! An environment variable cannot hold a NUL byte, and POSIX names are
//! `[A-Z0-9_]`, so names are escaped the way CGI escapes HTTP headers, and a
//! value that is not UTF-8 text without NUL is given in base64 instead. One
//! variable, `KAFKA_HEADERS`, carries every header exactly, for the cases the
//! per-header variables cannot tell apart.

use serde_json::{json, Value};
use xzepr_consumer::handler::WorkInfo;

/// Longest value passed: Linux refuses a single variable over 128 KiB
/// (`MAX_ARG_STRLEN`), which would fail the program's start; well under it,
/// so many headers still fit in the whole environment's limit.
pub const MAX_VALUE: usize = 32 * 1024;

/// The record's variables, in order, none longer than [`MAX_VALUE`].
pub fn vars(info: &WorkInfo) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut put = |name: String, value: String| {
        if value.len() <= MAX_VALUE {
            out.push((name, value));
        }
    };
    if let Some(key) = &info.key {
        match text(key) {
            Some(t) => put("KAFKA_KEY".into(), t.to_owned()),
            None => put("KAFKA_KEY_BASE64".into(), base64(key)),
        }
    }
    if let Some(ts) = info.timestamp {
        put("KAFKA_TIMESTAMP".into(), ts.millis().to_string());
        put("KAFKA_TIMESTAMP_TYPE".into(), ts.kind().into());
    }
    let mut seen = std::collections::HashSet::new();
    for (name, value) in &info.headers {
        let var = var_name(name);
        if !seen.insert(var.clone()) {
            continue;
        }
        match text(value) {
            Some(t) => put(var, t.to_owned()),
            None => put(format!("{var}_BASE64"), base64(value)),
        }
    }
    if !info.headers.is_empty() {
        let all: Vec<Value> = info
            .headers
            .iter()
            .map(|(name, value)| match text(value) {
                Some(t) => json!([name, t]),
                None => json!([name, {"base64": base64(value)}]),
            })
            .collect();
        put("KAFKA_HEADERS".into(), Value::Array(all).to_string());
    }
    out
}

/// `KAFKA_HEADER_` and the header's name: ASCII letters upper-cased, digits
/// kept, every other byte `_` (as CGI names `HTTP_*` variables).
pub fn var_name(header: &str) -> String {
    let mut var = String::with_capacity(13 + header.len());
    var.push_str("KAFKA_HEADER_");
    for b in header.bytes() {
        var.push(if b.is_ascii_alphanumeric() {
            char::from(b.to_ascii_uppercase())
        } else {
            '_'
        });
    }
    var
}

/// The bytes as text, when an environment variable can hold them as such.
fn text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes)
        .ok()
        .filter(|t| !t.contains('\0'))
}

/// Standard base64 (RFC 4648, with padding).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use xzepr_consumer::handler::{Record, Timestamp, Work};

    fn info(key: Option<&[u8]>, headers: &[(String, Vec<u8>)]) -> WorkInfo {
        Work::new("w".into(), "t".into(), 0, 0)
            .with_record(Record::new(
                key,
                headers,
                Some(Timestamp::LogAppendTime(1_700_000_000_123)),
            ))
            .info()
    }

    fn get<'a>(vars: &'a [(String, String)], name: &str) -> Option<&'a str> {
        vars.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn names_are_escaped_and_binary_values_are_base64() {
        let headers = vec![
            ("ce_type".to_owned(), b"deployment.completed".to_vec()),
            ("ce-type".to_owned(), b"shadowed".to_vec()),
            ("trace.id".to_owned(), vec![0xff, 0x00, 0x01]),
            ("empty".to_owned(), Vec::new()),
        ];
        let vars = vars(&info(Some(b"order-7"), &headers));
        assert_eq!(get(&vars, "KAFKA_KEY"), Some("order-7"));
        assert_eq!(get(&vars, "KAFKA_TIMESTAMP"), Some("1700000000123"));
        assert_eq!(get(&vars, "KAFKA_TIMESTAMP_TYPE"), Some("LogAppendTime"));
        assert_eq!(
            get(&vars, "KAFKA_HEADER_CE_TYPE"),
            Some("deployment.completed"),
            "the first header wins"
        );
        assert_eq!(get(&vars, "KAFKA_HEADER_TRACE_ID"), None);
        assert_eq!(get(&vars, "KAFKA_HEADER_TRACE_ID_BASE64"), Some("/wAB"));
        assert_eq!(get(&vars, "KAFKA_HEADER_EMPTY"), Some(""));
        let all: Value = serde_json::from_str(get(&vars, "KAFKA_HEADERS").unwrap()).unwrap();
        assert_eq!(all[1], json!(["ce-type", "shadowed"]));
        assert_eq!(all[2], json!(["trace.id", {"base64": "/wAB"}]));
        assert_eq!(all.as_array().unwrap().len(), 4);

        let vars = super::vars(&info(Some(b"a\0b"), &[]));
        assert_eq!(get(&vars, "KAFKA_KEY"), None);
        assert_eq!(get(&vars, "KAFKA_KEY_BASE64"), Some("YQBi"));
        assert_eq!(get(&vars, "KAFKA_HEADERS"), None, "no headers, no variable");
        let keyless = super::vars(&Work::new("w".into(), "t".into(), 0, 0).info());
        assert!(keyless.is_empty());
    }

    #[test]
    fn base64_pads_and_long_values_are_left_out() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        let big = vec![("big".to_owned(), vec![b'x'; MAX_VALUE + 1])];
        let vars = vars(&info(None, &big));
        assert_eq!(get(&vars, "KAFKA_HEADER_BIG"), None);
        assert_eq!(get(&vars, "KAFKA_HEADERS"), None);
    }
}
