//! The decode stage: Kafka payloads (and headers) into borrowed [`CloudEvent`] views.
//!
//! The poll thread copies each payload once out of librdkafka; everything here
//! borrows from that copy. The envelope is read by a validating scanner that
//! borrows attribute strings and skips over `data`; `data` is decoded only when a
//! handler asks, into borrowed entity views ([`CloudEvent::entities`]), any serde
//! type ([`Data::deserialize`]), or through a [`Decoder`]'s reusable simd-json
//! buffers for large payloads ([`Decoder::decode_data`]).
//!
//! ```
//! use xzepr_consumer::decode::{Decoder, DecoderConfig};
//!
//! let payload = br#"{"id":"01J","specversion":"1.0.1","type":"deployment.completed",
//!     "source":"xzepr.event.receiver.01R","success":true,"platform_id":"linux",
//!     "data":{"events":[],"event_receivers":[],"event_receiver_groups":[]}}"#;
//! let mut decoder = Decoder::new(DecoderConfig::default())?;
//! let event = decoder.decode(payload)?;
//! assert_eq!(event.event_type(), "deployment.completed");
//! assert_eq!(event.source_receiver_id(), Some("01R"));
//! assert!(event.entities()?.events.is_empty());
//! # Ok::<(), xzepr_consumer::decode::Error>(())
//! ```

mod entities;
mod error;
mod event;
mod owned;
mod scan;

pub use entities::{Entities, EventReceiverGroupRef, EventReceiverRef, EventRef, LegacyDataRef};
pub use error::{Error, JsonKind};
pub use event::{CloudEvent, Data};
pub use owned::{
    CloudEventData, CloudEventMessage, EventEntity, EventReceiverEntity, EventReceiverGroupEntity,
};

use serde::de::DeserializeOwned;

/// Limits and tuning for a [`Decoder`] (in configuration, every field is
/// optional).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct DecoderConfig {
    /// Largest payload accepted, in bytes. Default 1 MiB: Kafka's default
    /// `message.max.bytes` is about that, and XZepr's events are 0.7–50 KB.
    /// Larger payloads fail with [`Error::PayloadTooLarge`] before any parsing.
    pub max_payload_bytes: usize,
    /// Deepest JSON nesting accepted (the event object is depth 1). Default 128,
    /// the same guard serde_json uses; at most 1024. Deeper input fails with
    /// [`Error::TooDeep`], without using stack.
    pub max_depth: usize,
    /// From this size of `data` on, [`Decoder::decode_data`] uses simd-json with the
    /// decoder's reusable buffers instead of serde_json. Default 4096 bytes, where
    /// simd-json starts to win on this kind of machine (see `docs/performance.md`).
    pub simd_min_bytes: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        DecoderConfig {
            max_payload_bytes: 1 << 20,
            max_depth: 128,
            simd_min_bytes: 4096,
        }
    }
}

impl DecoderConfig {
    /// Sets [`DecoderConfig::max_payload_bytes`].
    #[must_use]
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes;
        self
    }

    /// Sets [`DecoderConfig::max_depth`].
    #[must_use]
    pub fn max_depth(mut self, depth: usize) -> Self {
        self.max_depth = depth;
        self
    }

    /// Sets [`DecoderConfig::simd_min_bytes`].
    #[must_use]
    pub fn simd_min_bytes(mut self, bytes: usize) -> Self {
        self.simd_min_bytes = bytes;
        self
    }
}

/// Decodes CloudEvents; one per worker thread, since it keeps reusable buffers.
///
/// Decoding the envelope allocates nothing (escaped attribute strings aside);
/// [`Decoder::decode_data`] reuses its scratch and simd-json buffers across calls.
pub struct Decoder {
    config: DecoderConfig,
    scratch: Vec<u8>,
    simd: simd_json::Buffers,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("config", &self.config)
            .field("scratch_capacity", &self.scratch.capacity())
            .finish_non_exhaustive()
    }
}

impl Decoder {
    /// Creates a decoder.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field: `max_depth` outside `1..=1024`,
    /// or `max_payload_bytes` of zero.
    pub fn new(config: DecoderConfig) -> Result<Self, Error> {
        if config.max_depth == 0 || config.max_depth > scan::MAX_DEPTH_CEILING {
            return Err(Error::InvalidConfig {
                field: "max_depth",
                reason: "must be in 1..=1024",
            });
        }
        if config.max_payload_bytes == 0 {
            return Err(Error::InvalidConfig {
                field: "max_payload_bytes",
                reason: "must be at least 1",
            });
        }
        Ok(Decoder {
            config,
            scratch: Vec::new(),
            simd: simd_json::Buffers::default(),
        })
    }

    /// This decoder's configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    fn check_size(&self, size: usize) -> Result<(), Error> {
        if size > self.config.max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                size,
                max: self.config.max_payload_bytes,
            });
        }
        Ok(())
    }

    /// Decodes a structured-mode CloudEvent (the whole event as one JSON object),
    /// which is what XZepr publishes.
    ///
    /// # Errors
    /// [`Error::PayloadTooLarge`], [`Error::InvalidJson`] (with byte offset),
    /// [`Error::NotAnObject`], [`Error::WrongType`], [`Error::MissingAttribute`],
    /// [`Error::UnsupportedSpecVersion`], [`Error::TooDeep`].
    pub fn decode<'a>(&self, payload: &'a [u8]) -> Result<CloudEvent<'a>, Error> {
        self.check_size(payload.len())?;
        let text = utf8(payload).map_err(|offset| {
            let (line, column) = error::line_column(payload, offset);
            Error::InvalidJson {
                offset,
                line,
                column,
                reason: "invalid UTF-8".into(),
            }
        })?;
        event::decode_structured(text, &self.config)
    }

    /// Decodes a binary-mode CloudEvent: attributes from `ce_`-prefixed headers,
    /// `datacontenttype` from `content-type`, the body as `data`.
    ///
    /// # Errors
    /// [`Error::PayloadTooLarge`], [`Error::InvalidHeader`] for a non-UTF-8 value,
    /// [`Error::WrongType`] for a `ce_success` that is not `true`/`false`,
    /// [`Error::MissingAttribute`], [`Error::UnsupportedSpecVersion`].
    pub fn decode_binary<'a, I>(
        &self,
        headers: I,
        body: Option<&'a [u8]>,
    ) -> Result<CloudEvent<'a>, Error>
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        self.check_size(body.map_or(0, <[u8]>::len))?;
        event::decode_binary(headers, body, &self.config)
    }

    /// Decodes a Kafka message in whichever CloudEvents mode it uses: binary when a
    /// `ce_specversion` header is present, structured otherwise (XZepr sets no
    /// headers).
    ///
    /// # Errors
    /// As [`Decoder::decode`] or [`Decoder::decode_binary`]; a structured message
    /// without a payload is [`Error::InvalidJson`] at offset 0.
    pub fn decode_message<'a, I>(
        &self,
        headers: I,
        payload: Option<&'a [u8]>,
    ) -> Result<CloudEvent<'a>, Error>
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])> + Clone,
    {
        let binary = headers
            .clone()
            .into_iter()
            .any(|(k, _)| k == "ce_specversion");
        if binary {
            self.decode_binary(headers, payload)
        } else {
            self.decode(payload.unwrap_or_default())
        }
    }

    /// Decodes an event's `data` into an owned type, with simd-json and this
    /// decoder's reusable buffers when `data` is at least
    /// [`DecoderConfig::simd_min_bytes`], with serde_json below that.
    ///
    /// # Errors
    /// [`Error::DataShape`] when `data` is absent or does not fit `T`;
    /// [`Error::InvalidJson`] for a binary body that is not JSON.
    pub fn decode_data<T: DeserializeOwned>(&mut self, data: &Data<'_>) -> Result<T, Error> {
        let text = data.json(self.config.max_depth)?;
        let shape = |e: &dyn std::fmt::Display| Error::DataShape {
            reason: e.to_string().into(),
        };
        if text.len() < self.config.simd_min_bytes {
            return serde_json::from_str(text).map_err(|e| shape(&e));
        }
        // simd-json parses in place, so it needs a mutable copy: reuse one.
        self.scratch.clear();
        self.scratch.extend_from_slice(text.as_bytes());
        simd_json::serde::from_slice_with_buffers(&mut self.scratch, &mut self.simd)
            .map_err(|e| shape(&e))
    }
}

/// `bytes` as text: SIMD validation (several times std's on non-ASCII
/// text), then std's for the offset of the first bad byte when it fails.
pub(crate) fn utf8(bytes: &[u8]) -> Result<&str, usize> {
    simdutf8::basic::from_utf8(bytes)
        .map_err(|_| std::str::from_utf8(bytes).map_or_else(|e| e.valid_up_to(), |_| 0))
}
