//! `run --forward`: each event is POSTed to an HTTP endpoint as a CloudEvent,
//! per the CloudEvents HTTP protocol binding, on the library's pooled
//! [`HttpTransport`] (the XZepr client's own: keep-alive connections, HTTP/1.1
//! and HTTP/2, rustls for `https`).
//!
//! - **Binary** content mode (the default): attributes in `ce-*` headers, `data`
//!   as the body with `Content-Type: application/json`.
//! - **Structured** (`--structured`): the whole event as the body, with
//!   `Content-Type: application/cloudevents+json; charset=utf-8`.
//!
//! CloudEvents attribute names are lower-case letters and digits only, so
//! XZepr's `api_version` and `platform_id` go out as `apiversion` and
//! `platformid` (in both modes); `specversion` is `1.0`, the version of the
//! spec this binding belongs to (XZepr writes its patch release, `1.0.1`). Each
//! request also carries `Kafka-Topic`, `Kafka-Partition`, `Kafka-Offset` and
//! `XZepr-Work-Id`, and the Kafka record:
//!
//! - `Kafka-Key`: the key, when there is one;
//! - `Kafka-Timestamp` (ms since the epoch) and `Kafka-Timestamp-Type`
//!   (`CreateTime` or `LogAppendTime`), when the broker gave one;
//! - `Kafka-Header-<name>` per Kafka header, in order (a repeated name is a
//!   repeated field). The name keeps the bytes HTTP allows in a field name
//!   but `%` (HTTP field names are case-insensitive: receivers see it in lower
//!   case); any other byte is `%XX`. A value encoded longer than
//!   [`MAX_HEADER_VALUE`] is left out.
//!
//! With traces on (feature `otel`, an `OTEL_*` endpoint set), `traceparent`
//! and `tracestate` carry the handler attempt span's W3C context.
//!
//! Values are percent-encoded as the CloudEvents HTTP binding does (printable
//! ASCII but `"` and `%` as is, every other byte `%XX`), so any bytes go
//! through.
//!
//! A 2xx answer is `completed` (details: `http_status`). Anything else fails
//! the attempt with code `http_status` (429 and 503: `overloaded`, which cuts
//! an adaptive `--concurrency` and honours `Retry-After`; the status and the
//! start of the body in the error) or `transport`; 408, 429, 5xx and transport errors are left to
//! the pipeline's retry policy (`--retries`), any other answer is marked
//! permanent: sending the same request again would get the same answer.
//!
//! The answer's status decides; of its body at most [`BODY_READ_MAX`] bytes
//! are read, for at most [`BODY_READ_FOR`], so an endpoint streaming a huge or
//! endless body holds neither memory nor the event.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http_body_util::BodyExt;
use serde_json::{Map, Value};
use xzepr_consumer::client::{HttpTransport, TransportConfig};
use xzepr_consumer::decode::CloudEventMessage;
use xzepr_consumer::handler::{AsyncHandler, BoxFuture, HandlerError, WorkInfo};
use xzepr_consumer::ErrorChain;

/// Most of a failed response's body kept for the error.
const ERROR_BODY_MAX: usize = 512;

/// Most of a response's body read. A body this small (most are) is read to its
/// end, so its connection goes back to the pool; a longer one is dropped
/// unread, which closes its connection.
const BODY_READ_MAX: usize = 64 * 1024;

/// Longest a response's body is read once its status came: one that trickles
/// or never ends is dropped (and its connection closed) after this.
const BODY_READ_FOR: Duration = Duration::from_secs(1);

/// Longest encoded Kafka header value forwarded: servers commonly refuse a
/// request whose header section passes 8 to 16 KiB (431).
const MAX_HEADER_VALUE: usize = 4 * 1024;

const KAFKA_TOPIC: HeaderName = HeaderName::from_static("kafka-topic");
const KAFKA_PARTITION: HeaderName = HeaderName::from_static("kafka-partition");
const KAFKA_OFFSET: HeaderName = HeaderName::from_static("kafka-offset");
const KAFKA_KEY: HeaderName = HeaderName::from_static("kafka-key");
const KAFKA_TIMESTAMP: HeaderName = HeaderName::from_static("kafka-timestamp");
const KAFKA_TIMESTAMP_TYPE: HeaderName = HeaderName::from_static("kafka-timestamp-type");
const XZEPR_WORK_ID: HeaderName = HeaderName::from_static("xzepr-work-id");

/// Posts each event to one URL.
#[derive(Clone)]
pub struct Forward {
    inner: Arc<Inner>,
}

struct Inner {
    http: HttpTransport,
    uri: http::Uri,
    structured: bool,
}

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forward")
            .field("uri", &crate::args::redact_url(&self.inner.uri.to_string()))
            .field("structured", &self.inner.structured)
            .finish_non_exhaustive()
    }
}

impl Forward {
    /// A forwarder to `url` (http or https) keeping up to `pool` idle
    /// connections.
    ///
    /// # Errors
    /// A message when `url` is not an http(s) URL.
    pub fn new(url: &str, structured: bool, pool: usize) -> Result<Self, String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| format!("--forward {}: not a URL", crate::args::redact_url(url)))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!(
                "--forward {}: must be an http:// or https:// URL",
                crate::args::redact_url(url)
            ));
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err("--forward: credentials in the URL are not supported".into());
        }
        let http = HttpTransport::new(
            &TransportConfig::default()
                .with_pool_max_idle_per_host(pool)
                .with_connect_timeout(Duration::from_secs(5)),
        )
        .map_err(|e| ErrorChain(&e).to_string())?;
        Ok(Forward {
            inner: Arc::new(Inner {
                http,
                uri,
                structured,
            }),
        })
    }

    /// The request for one event; its body is cheap to clone for retries.
    fn request(
        &self,
        message: &CloudEventMessage,
        info: &WorkInfo,
    ) -> Result<http::request::Builder, HandlerError> {
        let mut req = http::Request::post(self.inner.uri.clone());
        // Filled in place: the builder's `header` converts and checks each
        // name again, and ~15 of them per event showed in the profile.
        let Some(h) = req.headers_mut() else {
            return Err(encode_error("the request could not be built"));
        };
        h.reserve(16 + info.headers.len());
        h.insert(KAFKA_TOPIC, encode_header(&info.topic));
        h.insert(KAFKA_PARTITION, HeaderValue::from(info.partition));
        h.insert(KAFKA_OFFSET, HeaderValue::from(info.offset));
        h.insert(XZEPR_WORK_ID, encode_header(&info.work_id));
        if let Some(key) = &info.key {
            h.insert(KAFKA_KEY, encode_bytes(key));
        }
        if let Some(ts) = info.timestamp {
            h.insert(KAFKA_TIMESTAMP, HeaderValue::from(ts.millis()));
            h.insert(KAFKA_TIMESTAMP_TYPE, HeaderValue::from_static(ts.kind()));
        }
        // The attempt's span: the endpoint's work continues the event's trace.
        for (name, value) in xzepr_consumer::trace::current()
            .iter()
            .flat_map(|t| t.headers())
        {
            // A value that is no header value (a producer's bad `tracestate`)
            // is left out: the trace breaks there, the event does not fail.
            if let Ok(value) = HeaderValue::from_str(&value) {
                h.insert(HeaderName::from_static(name), value);
            }
        }
        for (name, value) in &info.headers {
            let value = encode_bytes(value);
            if value.len() <= MAX_HEADER_VALUE {
                h.append(kafka_header_name(name), value);
            }
        }
        if self.inner.structured {
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/cloudevents+json; charset=utf-8"),
            );
        } else {
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            for (a, value) in attributes(message) {
                h.insert(HeaderName::from_static(a.header), encode_header(value));
            }
        }
        Ok(req)
    }

    fn body(&self, message: &CloudEventMessage) -> Result<Bytes, HandlerError> {
        let bytes = if self.inner.structured {
            serde_json::to_vec(&structured(message)?).map_err(encode_error)?
        } else {
            serde_json::to_vec(&message.data).map_err(encode_error)?
        };
        Ok(Bytes::from(bytes))
    }

    /// The whole request for one event: headers and body.
    pub(crate) fn build(
        &self,
        message: &CloudEventMessage,
        info: &WorkInfo,
    ) -> Result<http::Request<Bytes>, HandlerError> {
        self.request(message, info)?
            .body(self.body(message)?)
            .map_err(encode_error)
    }

    /// The endpoint's URL.
    pub(crate) fn uri(&self) -> &http::Uri {
        &self.inner.uri
    }

    async fn post(
        &self,
        message: CloudEventMessage,
        info: WorkInfo,
    ) -> Result<Value, HandlerError> {
        let req = self.build(&message, &info)?;
        let (status, _) = self.exchange(req, ERROR_BODY_MAX).await?;
        Ok(serde_json::json!({ "http_status": status.as_u16() }))
    }

    /// Sends `req`: a 2xx answer's status and the first `keep` bytes of its
    /// body, or the attempt's error.
    pub(crate) async fn exchange(
        &self,
        req: http::Request<Bytes>,
        keep: usize,
    ) -> Result<(http::StatusCode, Vec<u8>), HandlerError> {
        let resp = self.inner.http.send(req).await.map_err(|e| {
            HandlerError::with_code(format!("request failed: {}", ErrorChain(&e)), "transport")
        })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.trim().parse().ok())
            .map(Duration::from_secs);
        let keep = if status.is_success() {
            keep
        } else {
            ERROR_BODY_MAX
        };
        let start = body_start(resp.into_body(), keep).await;
        if status.is_success() {
            return Ok((status, start));
        }
        let text = text_start(&start);
        let message = if text.is_empty() {
            format!("the endpoint answered {status}")
        } else {
            format!("the endpoint answered {status}: {text}")
        };
        if matches!(status.as_u16(), 429 | 503) {
            // The endpoint is overloaded: an adaptive --concurrency is cut,
            // and waits out its Retry-After (seconds).
            let mut err = HandlerError::overloaded(message);
            if let Some(after) = retry_after {
                err = err.with_retry_after(after);
            }
            return Err(err);
        }
        let err = HandlerError::with_code(message, "http_status");
        let transient = status.is_server_error()
            || status == http::StatusCode::TOO_MANY_REQUESTS
            || status == http::StatusCode::REQUEST_TIMEOUT;
        Err(if transient { err } else { err.permanent() })
    }
}

/// A request that cannot be encoded: sending it again cannot help.
pub(crate) fn encode_error(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::with_code(e.to_string(), "encode").permanent()
}

impl AsyncHandler for Forward {
    fn handle(
        &self,
        message: CloudEventMessage,
        info: WorkInfo,
    ) -> BoxFuture<Result<Value, HandlerError>> {
        let this = self.clone();
        Box::pin(async move { this.post(message, info).await })
    }
}

/// The event in the structured content mode: its attributes, `success`,
/// `datacontenttype` and `data`.
pub(crate) fn structured(message: &CloudEventMessage) -> Result<Map<String, Value>, HandlerError> {
    let mut event: Map<String, Value> = attributes(message)
        .into_iter()
        .map(|(a, v)| (a.name.to_owned(), Value::String(v.to_owned())))
        .collect();
    event.insert("success".into(), Value::Bool(message.success));
    event.insert("datacontenttype".into(), "application/json".into());
    let data = serde_json::to_value(&message.data).map_err(encode_error)?;
    event.insert("data".into(), data);
    Ok(event)
}

/// A CloudEvents attribute: its name, and its binary-mode header.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Attr {
    name: &'static str,
    header: &'static str,
}

const fn attr(name: &'static str, header: &'static str) -> Attr {
    Attr { name, header }
}

/// The event's attributes under their CloudEvents names, as header strings
/// (the structured body puts `success` back as a boolean).
fn attributes(m: &CloudEventMessage) -> Vec<(Attr, &str)> {
    let mut attrs = Vec::with_capacity(11);
    attrs.extend([
        (attr("specversion", "ce-specversion"), "1.0"),
        (attr("id", "ce-id"), m.id.as_str()),
        (attr("source", "ce-source"), m.source.as_str()),
        (attr("type", "ce-type"), m.event_type.as_str()),
    ]);
    for (a, value) in [
        (attr("apiversion", "ce-apiversion"), &m.api_version),
        (attr("name", "ce-name"), &m.name),
        (attr("version", "ce-version"), &m.version),
        (attr("release", "ce-release"), &m.release),
        (attr("platformid", "ce-platformid"), &m.platform_id),
        (attr("package", "ce-package"), &m.package),
    ] {
        if !value.is_empty() {
            attrs.push((a, value.as_str()));
        }
    }
    let success = if m.success { "true" } else { "false" };
    attrs.push((attr("success", "ce-success"), success));
    attrs
}

/// A header value per the HTTP binding: printable ASCII as is, except `"` and
/// `%`; everything else (space, non-ASCII as UTF-8 bytes) percent-encoded.
fn encode_header(value: &str) -> HeaderValue {
    encode_bytes(value.as_bytes())
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Appends `%XX` for `b`.
fn push_escape(out: &mut Vec<u8>, b: u8) {
    out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
}

/// `Kafka-Header-` and a Kafka header's name: the bytes of an HTTP token
/// (RFC 9110 `tchar`) but `%` as they are, any other `%XX`.
fn kafka_header_name(name: &str) -> HeaderName {
    let mut out = Vec::with_capacity(13 + name.len());
    out.extend_from_slice(b"kafka-header-");
    for b in name.bytes() {
        let tchar = b.is_ascii_alphanumeric() || b"!#$&'*+-.^_`|~".contains(&b);
        if tchar {
            out.push(b.to_ascii_lowercase());
        } else {
            push_escape(&mut out, b);
        }
    }
    // Only token bytes are left, which always make a valid name.
    HeaderName::from_bytes(&out).unwrap_or_else(|_| HeaderName::from_static("kafka-header-"))
}

/// Whether `b` goes into a header value as it is.
fn plain(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%'
}

/// Bytes as a header value, percent-encoded as [`encode_header`] says.
pub(crate) fn encode_bytes(value: &[u8]) -> HeaderValue {
    // Most values (ids, topics, numbers) need no escape: one copy.
    let encoded = if value.iter().all(|&b| plain(b)) {
        HeaderValue::from_bytes(value)
    } else {
        let mut out = Vec::with_capacity(value.len() + 16);
        for &b in value {
            if plain(b) {
                out.push(b);
            } else {
                push_escape(&mut out, b);
            }
        }
        HeaderValue::from_bytes(&out)
    };
    // Only printable ASCII is left, which is always a valid header value.
    encoded.unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The first `keep` bytes of a response body, reading at most
/// [`BODY_READ_MAX`] bytes of it (or `keep`, if more) for at most
/// [`BODY_READ_FOR`].
async fn body_start(mut body: hyper::body::Incoming, keep: usize) -> Vec<u8> {
    let mut start = Vec::new();
    let read = async {
        let mut read = 0;
        while read < BODY_READ_MAX.max(keep) {
            let Some(Ok(frame)) = body.frame().await else {
                break;
            };
            if let Ok(data) = frame.into_data() {
                read += data.len();
                let room = keep.saturating_sub(start.len());
                start.extend_from_slice(&data[..room.min(data.len())]);
            }
        }
    };
    // Past the bound the body is dropped: what was read is enough.
    let _ = tokio::time::timeout(BODY_READ_FOR, read).await;
    start
}

/// The start of a response body as text, for an error message.
fn text_start(body: &[u8]) -> String {
    // The cut may fall inside a character: drop its first bytes.
    let body = match std::str::from_utf8(body) {
        Err(e) if e.error_len().is_none() => &body[..e.valid_up_to()],
        _ => body,
    };
    String::from_utf8_lossy(body).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> CloudEventMessage {
        let (_, payload) = xzepr_consumer::generate::xzepr_event(5, "01M82X4ET7AYGAEYSHF5AKVAVW");
        serde_json::from_slice(&payload).unwrap()
    }

    #[test]
    fn the_start_of_a_body_is_cut_between_characters() {
        assert_eq!(text_start(b"  quota exceeded \n"), "quota exceeded");
        let cut = &"é".repeat(300).into_bytes()[..ERROR_BODY_MAX - 1];
        assert_eq!(text_start(cut), "é".repeat(255));
    }

    #[test]
    fn header_values_are_percent_encoded() {
        assert_eq!(encode_header("abc.DEF-1"), "abc.DEF-1");
        assert_eq!(encode_header("a b\"%"), "a%20b%22%25");
        assert_eq!(encode_header("café"), "caf%C3%A9");
    }

    #[test]
    fn the_kafka_record_goes_in_headers() {
        use xzepr_consumer::handler::{Record, Timestamp, Work};
        let headers = vec![
            ("ce_traceparent".to_owned(), b"00-ab-cd-01".to_vec()),
            ("Tenant Id".to_owned(), vec![0xff]),
            ("ce_traceparent".to_owned(), b"again".to_vec()),
            ("huge".to_owned(), vec![b' '; MAX_HEADER_VALUE]),
        ];
        let info = Work::new("w".into(), "t".into(), 3, 9)
            .with_record(Record::new(
                Some(b"k\x001"),
                &headers,
                Some(Timestamp::CreateTime(42)),
            ))
            .info();
        let f = Forward::new("http://127.0.0.1:9/", false, 1).unwrap();
        let req = f.request(&message(), &info).unwrap().body(()).unwrap();
        let h = req.headers();
        assert_eq!(h["kafka-key"], "k%001");
        assert_eq!(h["kafka-timestamp"], "42");
        assert_eq!(h["kafka-timestamp-type"], "CreateTime");
        let repeated: Vec<_> = h.get_all("kafka-header-ce_traceparent").iter().collect();
        assert_eq!(repeated, ["00-ab-cd-01", "again"]);
        assert_eq!(h["kafka-header-tenant%20id"], "%FF");
        assert!(h.get("kafka-header-huge").is_none(), "too long: left out");
    }

    #[test]
    fn attribute_names_follow_cloudevents() {
        let m = message();
        let attrs = attributes(&m);
        for (a, _) in &attrs {
            assert!(
                a.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
                "{a:?}"
            );
            assert_eq!(a.header, format!("ce-{}", a.name));
        }
        let get = |n: &str| attrs.iter().find(|(a, _)| a.name == n).map(|(_, v)| *v);
        assert_eq!(get("specversion"), Some("1.0"));
        assert_eq!(get("id"), Some(m.id.as_str()));
        assert_eq!(get("platformid"), Some(m.platform_id.as_str()));
        assert_eq!(get("success"), Some("true"));
    }

    #[test]
    fn structured_body_is_the_event_and_binary_body_is_data() {
        let m = message();
        let structured = Forward::new("http://127.0.0.1:9/", true, 1).unwrap();
        let v: Value = serde_json::from_slice(&structured.body(&m).unwrap()).unwrap();
        assert_eq!(v["id"], m.id.as_str());
        assert_eq!(v["type"], m.event_type.as_str());
        assert_eq!(v["success"], true);
        assert_eq!(v["data"]["events"][0]["id"], m.id.as_str());
        let binary = Forward::new("http://127.0.0.1:9/", false, 1).unwrap();
        let v: Value = serde_json::from_slice(&binary.body(&m).unwrap()).unwrap();
        assert_eq!(v["events"][0]["id"], m.id.as_str());
        assert!(v.get("id").is_none());
    }

    #[test]
    fn bad_urls_are_refused_without_their_credentials() {
        assert!(Forward::new("ftp://x/", false, 1).is_err());
        assert!(Forward::new("not a url", false, 1).is_err());
        let err = Forward::new("http://bob:hunter2@localhost/", false, 1).unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_fails_as_transport_and_may_be_retried() {
        // A port nothing listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let f = Forward::new(&format!("http://127.0.0.1:{port}/"), false, 1).unwrap();
        let info = xzepr_consumer::handler::Work::new("w".into(), "t".into(), 0, 0).info();
        let err = f.post(message(), info).await.unwrap_err();
        assert_eq!(err.code(), Some("transport"));
        assert!(!err.is_permanent());
    }
}
