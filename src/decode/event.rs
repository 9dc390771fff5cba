//! The borrowed CloudEvent view and its lazily decoded `data`.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;

use super::error::{Error, JsonKind};
use super::scan::{self, Scanner};
use super::{entities::Entities, DecoderConfig};

/// A CloudEvent decoded in place: attributes borrow from the message's payload (or,
/// in binary mode, its headers); `data` is located and validated but not decoded.
///
/// Strings holding JSON escapes are unescaped into an owned string; nothing else
/// allocates. The XZepr extension attributes are `Option`s because other producers
/// on the same topic may omit them.
#[derive(Clone, PartialEq)]
pub struct CloudEvent<'a> {
    pub(crate) id: Cow<'a, str>,
    pub(crate) source: Cow<'a, str>,
    pub(crate) specversion: Cow<'a, str>,
    pub(crate) ty: Cow<'a, str>,
    pub(crate) subject: Option<Cow<'a, str>>,
    pub(crate) time: Option<Cow<'a, str>>,
    pub(crate) datacontenttype: Option<Cow<'a, str>>,
    pub(crate) dataschema: Option<Cow<'a, str>>,
    pub(crate) success: Option<bool>,
    pub(crate) api_version: Option<Cow<'a, str>>,
    pub(crate) name: Option<Cow<'a, str>>,
    pub(crate) version: Option<Cow<'a, str>>,
    pub(crate) release: Option<Cow<'a, str>>,
    pub(crate) platform_id: Option<Cow<'a, str>>,
    pub(crate) package: Option<Cow<'a, str>>,
    /// The distributed-tracing extension (`ce_traceparent` in binary mode).
    pub(crate) traceparent: Option<Cow<'a, str>>,
    pub(crate) tracestate: Option<Cow<'a, str>>,
    pub(crate) data: Data<'a>,
    pub(crate) max_depth: usize,
}

impl fmt::Debug for CloudEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `data` can be tens of KB: show its size, not its text.
        f.debug_struct("CloudEvent")
            .field("id", &self.id)
            .field("type", &self.ty)
            .field("source", &self.source)
            .field("specversion", &self.specversion)
            .field("name", &self.name)
            .field("platform_id", &self.platform_id)
            .field("data_len", &self.data.raw().map_or(0, <[u8]>::len))
            .finish_non_exhaustive()
    }
}

macro_rules! opt_accessors {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        #[inline]
        pub fn $name(&self) -> Option<&str> {
            self.$name.as_deref()
        }
    )*};
}

impl<'a> CloudEvent<'a> {
    /// The event id (for XZepr, a ULID).
    #[inline]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The `source` attribute (for XZepr, `xzepr.event.receiver.<receiver id>`).
    #[inline]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `specversion` attribute (`1.0` or `1.0.1`).
    #[inline]
    pub fn specversion(&self) -> &str {
        &self.specversion
    }

    /// The `type` attribute (for XZepr, equal to `name`).
    #[inline]
    pub fn event_type(&self) -> &str {
        &self.ty
    }

    /// XZepr's `success` extension.
    #[inline]
    pub fn success(&self) -> Option<bool> {
        self.success
    }

    /// The receiver id in an XZepr `source` (`xzepr.event.receiver.<id>`), if it has that form.
    pub fn source_receiver_id(&self) -> Option<&str> {
        self.source.strip_prefix("xzepr.event.receiver.")
    }

    opt_accessors! {
        /// The `subject` attribute.
        subject;
        /// The `time` attribute (XZepr does not send it).
        time;
        /// The `datacontenttype` attribute (binary mode: the `content-type` header).
        datacontenttype;
        /// The `dataschema` attribute.
        dataschema;
        /// XZepr's `api_version` extension (`v1`).
        api_version;
        /// XZepr's `name` extension.
        name;
        /// XZepr's `version` extension.
        version;
        /// XZepr's `release` extension.
        release;
        /// XZepr's `platform_id` extension.
        platform_id;
        /// XZepr's `package` extension.
        package;
        /// The CloudEvents distributed-tracing extension's `traceparent` (W3C
        /// trace context; binary mode: the `ce_traceparent` header).
        traceparent;
        /// The distributed-tracing extension's `tracestate`.
        tracestate;
    }

    /// The event's `data`, not yet decoded.
    #[inline]
    pub fn data(&self) -> &Data<'a> {
        &self.data
    }

    /// Decodes `data` into borrowed views of XZepr's entities (either `data` shape
    /// of the contract).
    ///
    /// # Errors
    /// [`Error::DataShape`] if `data` is absent or not an XZepr entity object,
    /// [`Error::InvalidJson`] if a binary-mode body is not JSON.
    pub fn entities(&self) -> Result<Entities<'_>, Error> {
        self.data.entities(self.max_depth)
    }

    /// Makes the owned, plan-compatible [`CloudEventMessage`](super::CloudEventMessage).
    ///
    /// # Errors
    /// As [`CloudEvent::entities`], plus [`Error::DataShape`] for timestamps that are not RFC 3339.
    pub fn to_owned_message(&self) -> Result<super::CloudEventMessage, Error> {
        super::owned::from_view(self)
    }
}

/// The `data` of a [`CloudEvent`], located and validated but not decoded.
#[derive(Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Data<'a> {
    /// The event has no `data`.
    Absent,
    /// Structured mode: the JSON text of the `data` member (validated).
    Json(&'a str),
    /// Binary mode: the Kafka message body, as is.
    Body(&'a [u8]),
}

impl fmt::Debug for Data<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Data::Absent => f.write_str("Absent"),
            Data::Json(s) => write!(f, "Json({} bytes)", s.len()),
            Data::Body(b) => write!(f, "Body({} bytes)", b.len()),
        }
    }
}

impl<'a> Data<'a> {
    /// The raw bytes of `data` (JSON text in structured mode, the body in binary mode).
    pub fn raw(&self) -> Option<&'a [u8]> {
        match *self {
            Data::Absent => None,
            Data::Json(s) => Some(s.as_bytes()),
            Data::Body(b) => Some(b),
        }
    }

    /// The JSON text of `data`, if it is JSON (a binary body is checked as UTF-8
    /// JSON here, on demand).
    ///
    /// # Errors
    /// [`Error::DataShape`] when absent; [`Error::InvalidJson`] for a non-JSON body.
    pub fn json(&self, max_depth: usize) -> Result<&'a str, Error> {
        match *self {
            Data::Absent => Err(Error::DataShape {
                reason: "the event has no data".into(),
            }),
            Data::Json(s) => Ok(s),
            Data::Body(b) => {
                let text = super::utf8(b).map_err(|offset| {
                    let (line, column) = super::error::line_column(b, offset);
                    Error::InvalidJson {
                        offset,
                        line,
                        column,
                        reason: "the body is not valid UTF-8".into(),
                    }
                })?;
                scan::validate(text, 1, max_depth)?;
                Ok(text)
            }
        }
    }

    /// Deserializes `data` into any type, borrowing strings where it can.
    ///
    /// # Errors
    /// As [`Data::json`], or [`Error::DataShape`] when `data` does not fit `T`.
    pub fn deserialize<T: Deserialize<'a>>(&self) -> Result<T, Error> {
        let text = self.json(scan::MAX_DEPTH_CEILING)?;
        serde_json::from_str(text).map_err(|e| Error::DataShape {
            reason: e.to_string().into(),
        })
    }

    /// Decodes `data` into an owned `serde_json::Value`.
    ///
    /// # Errors
    /// As [`Data::deserialize`].
    pub fn to_value(&self) -> Result<serde_json::Value, Error> {
        self.deserialize()
    }

    pub(crate) fn entities(&self, max_depth: usize) -> Result<Entities<'a>, Error> {
        let text = self.json(max_depth)?;
        Entities::parse(text)
    }
}

/// The attributes the decoder knows; anything else is skipped (the server adds
/// fields over time).
#[derive(Clone, Copy)]
enum Attr {
    Id,
    Source,
    SpecVersion,
    Type,
    Subject,
    Time,
    DataContentType,
    DataSchema,
    Success,
    ApiVersion,
    Name,
    Version,
    Release,
    PlatformId,
    Package,
    TraceParent,
    TraceState,
    Data,
}

impl Attr {
    #[inline]
    fn from_key(key: &str) -> Option<Attr> {
        Some(match key {
            "id" => Attr::Id,
            "source" => Attr::Source,
            "specversion" => Attr::SpecVersion,
            "type" => Attr::Type,
            "subject" => Attr::Subject,
            "time" => Attr::Time,
            "datacontenttype" => Attr::DataContentType,
            "dataschema" => Attr::DataSchema,
            "success" => Attr::Success,
            "api_version" => Attr::ApiVersion,
            "name" => Attr::Name,
            "version" => Attr::Version,
            "release" => Attr::Release,
            "platform_id" => Attr::PlatformId,
            "package" => Attr::Package,
            "traceparent" => Attr::TraceParent,
            "tracestate" => Attr::TraceState,
            "data" => Attr::Data,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Attr::Id => "id",
            Attr::Source => "source",
            Attr::SpecVersion => "specversion",
            Attr::Type => "type",
            Attr::Subject => "subject",
            Attr::Time => "time",
            Attr::DataContentType => "datacontenttype",
            Attr::DataSchema => "dataschema",
            Attr::Success => "success",
            Attr::ApiVersion => "api_version",
            Attr::Name => "name",
            Attr::Version => "version",
            Attr::Release => "release",
            Attr::PlatformId => "platform_id",
            Attr::Package => "package",
            Attr::TraceParent => "traceparent",
            Attr::TraceState => "tracestate",
            Attr::Data => "data",
        }
    }
}

/// Attributes gathered before the required ones are checked.
#[derive(Default)]
struct Builder<'a> {
    id: Option<Cow<'a, str>>,
    source: Option<Cow<'a, str>>,
    specversion: Option<Cow<'a, str>>,
    ty: Option<Cow<'a, str>>,
    subject: Option<Cow<'a, str>>,
    time: Option<Cow<'a, str>>,
    datacontenttype: Option<Cow<'a, str>>,
    dataschema: Option<Cow<'a, str>>,
    success: Option<bool>,
    api_version: Option<Cow<'a, str>>,
    name: Option<Cow<'a, str>>,
    version: Option<Cow<'a, str>>,
    release: Option<Cow<'a, str>>,
    platform_id: Option<Cow<'a, str>>,
    package: Option<Cow<'a, str>>,
    traceparent: Option<Cow<'a, str>>,
    tracestate: Option<Cow<'a, str>>,
}

impl<'a> Builder<'a> {
    /// The slot of a string attribute; `None` for `success` and `data`.
    fn slot(&mut self, attr: Attr) -> Option<&mut Option<Cow<'a, str>>> {
        Some(match attr {
            Attr::Id => &mut self.id,
            Attr::Source => &mut self.source,
            Attr::SpecVersion => &mut self.specversion,
            Attr::Type => &mut self.ty,
            Attr::Subject => &mut self.subject,
            Attr::Time => &mut self.time,
            Attr::DataContentType => &mut self.datacontenttype,
            Attr::DataSchema => &mut self.dataschema,
            Attr::ApiVersion => &mut self.api_version,
            Attr::Name => &mut self.name,
            Attr::Version => &mut self.version,
            Attr::Release => &mut self.release,
            Attr::PlatformId => &mut self.platform_id,
            Attr::Package => &mut self.package,
            Attr::TraceParent => &mut self.traceparent,
            Attr::TraceState => &mut self.tracestate,
            Attr::Success | Attr::Data => return None,
        })
    }

    fn build(self, data: Data<'a>, max_depth: usize) -> Result<CloudEvent<'a>, Error> {
        let specversion = self
            .specversion
            .ok_or_else(|| Error::missing("specversion"))?;
        if !matches!(&*specversion, "1.0" | "1.0.1") {
            return Err(Error::UnsupportedSpecVersion {
                found: (*specversion).into(),
            });
        }
        Ok(CloudEvent {
            id: self.id.ok_or_else(|| Error::missing("id"))?,
            source: self.source.ok_or_else(|| Error::missing("source"))?,
            ty: self.ty.ok_or_else(|| Error::missing("type"))?,
            specversion,
            subject: self.subject,
            time: self.time,
            datacontenttype: self.datacontenttype,
            dataschema: self.dataschema,
            success: self.success,
            api_version: self.api_version,
            name: self.name,
            version: self.version,
            release: self.release,
            platform_id: self.platform_id,
            package: self.package,
            traceparent: self.traceparent,
            tracestate: self.tracestate,
            data,
            max_depth,
        })
    }
}

/// Structured mode: decodes the envelope of `text`, skipping (and validating) `data`.
pub(crate) fn decode_structured<'a>(
    text: &'a str,
    config: &DecoderConfig,
) -> Result<CloudEvent<'a>, Error> {
    let mut s = Scanner::new(text, config.max_depth);
    let kind = s.peek_kind()?;
    if kind != JsonKind::Object {
        return Err(Error::NotAnObject { found: kind });
    }
    s.pos += 1;
    let mut b = Builder::default();
    let mut data = Data::Absent;
    s.skip_ws();
    if s.peek() == Some(b'}') {
        s.pos += 1;
    } else {
        loop {
            s.skip_ws();
            if s.peek() != Some(b'"') {
                return Err(s.unexpected("a string key"));
            }
            let key = s.parse_string()?;
            s.expect(b':', "`:`")?;
            let kind = s.peek_kind()?;
            match Attr::from_key(&key) {
                Some(Attr::Data) => {
                    let start = s.pos;
                    s.skip_value(1)?;
                    // CloudEvents: `"data": null` is the same as no data.
                    data = if kind == JsonKind::Null {
                        Data::Absent
                    } else {
                        Data::Json(s.slice(start))
                    };
                }
                Some(Attr::Success) => {
                    if kind != JsonKind::Bool {
                        return Err(Error::wrong_type("success", "a boolean", kind));
                    }
                    b.success = Some(s.parse_bool()?);
                }
                // Another hop's context, not this event's: a malformed one is
                // ignored (the trace starts here), never a reason to refuse it.
                Some(Attr::TraceParent | Attr::TraceState) if kind != JsonKind::String => {
                    s.skip_value(1)?;
                }
                Some(attr) => {
                    if kind != JsonKind::String {
                        return Err(Error::wrong_type(attr.name(), "a string", kind));
                    }
                    let value = s.parse_string()?;
                    if let Some(slot) = b.slot(attr) {
                        *slot = Some(value);
                    }
                }
                None => s.skip_value(1)?,
            }
            s.skip_ws();
            match s.peek() {
                Some(b',') => s.pos += 1,
                Some(b'}') => {
                    s.pos += 1;
                    break;
                }
                _ => return Err(s.unexpected("`,` or `}`")),
            }
        }
    }
    s.finish()?;
    b.build(data, config.max_depth)
}

/// Binary mode: attributes from `ce_`-prefixed headers, `data` = the body.
pub(crate) fn decode_binary<'a, I>(
    headers: I,
    body: Option<&'a [u8]>,
    config: &DecoderConfig,
) -> Result<CloudEvent<'a>, Error>
where
    I: IntoIterator<Item = (&'a str, &'a [u8])>,
{
    let mut b = Builder::default();
    for (key, value) in headers {
        let attr = if key.eq_ignore_ascii_case("content-type") {
            Attr::DataContentType
        } else if let Some(name) = key.strip_prefix("ce_") {
            match Attr::from_key(name) {
                // `ce_data` is not an attribute: data is the body.
                Some(Attr::Data) | None => continue,
                Some(attr) => attr,
            }
        } else {
            continue;
        };
        let text =
            std::str::from_utf8(value).map_err(|_| Error::InvalidHeader { name: key.into() })?;
        if let Attr::Success = attr {
            b.success = Some(match text {
                "true" => true,
                "false" => false,
                _ => {
                    return Err(Error::wrong_type(
                        "ce_success",
                        "`true` or `false`",
                        JsonKind::String,
                    ))
                }
            });
        } else if let Some(slot) = b.slot(attr) {
            *slot = Some(Cow::Borrowed(text));
        }
    }
    let data = match body {
        Some(body) if !body.is_empty() => Data::Body(body),
        _ => Data::Absent,
    };
    b.build(data, config.max_depth)
}
