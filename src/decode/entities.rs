//! Borrowed views of the XZepr entities inside `data`.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::Error;

/// An event entity, borrowed from `data` (`payload` left as raw JSON).
#[derive(Debug, Clone, Deserialize)]
#[non_exhaustive]
pub struct EventRef<'a> {
    /// Event id (ULID).
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// Event name.
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    /// Event version.
    #[serde(borrow)]
    pub version: Cow<'a, str>,
    /// Release.
    #[serde(borrow)]
    pub release: Cow<'a, str>,
    /// Platform id.
    #[serde(borrow)]
    pub platform_id: Cow<'a, str>,
    /// Package.
    #[serde(borrow)]
    pub package: Cow<'a, str>,
    /// Description.
    #[serde(borrow, default)]
    pub description: Cow<'a, str>,
    /// The payload, any JSON, undecoded.
    #[serde(borrow)]
    pub payload: &'a RawValue,
    /// Whether the event records a success.
    pub success: bool,
    /// The receiver the event was posted under.
    #[serde(borrow)]
    pub event_receiver_id: Cow<'a, str>,
    /// Owner (newer servers).
    #[serde(borrow, default)]
    pub owner_id: Option<Cow<'a, str>>,
    /// Resource version (newer servers).
    #[serde(default)]
    pub resource_version: Option<i64>,
    /// Creation time, RFC 3339.
    #[serde(borrow)]
    pub created_at: Cow<'a, str>,
}

/// An event receiver entity, borrowed from `data`.
#[derive(Debug, Clone, Deserialize)]
#[non_exhaustive]
pub struct EventReceiverRef<'a> {
    /// Receiver id.
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// Receiver name.
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    /// Receiver type (`receiver_type` on the wire; `type` accepted).
    #[serde(borrow, rename = "receiver_type", alias = "type")]
    pub receiver_type: Cow<'a, str>,
    /// Version.
    #[serde(borrow)]
    pub version: Cow<'a, str>,
    /// Description.
    #[serde(borrow, default)]
    pub description: Cow<'a, str>,
    /// JSON schema, undecoded.
    #[serde(borrow)]
    pub schema: &'a RawValue,
    /// Fingerprint.
    #[serde(borrow, default)]
    pub fingerprint: Cow<'a, str>,
    /// Owner (newer servers).
    #[serde(borrow, default)]
    pub owner_id: Option<Cow<'a, str>>,
    /// Resource version (newer servers).
    #[serde(default)]
    pub resource_version: Option<i64>,
    /// Creation time, RFC 3339.
    #[serde(borrow)]
    pub created_at: Cow<'a, str>,
}

/// An event receiver group entity, borrowed from `data`.
#[derive(Debug, Clone, Deserialize)]
#[non_exhaustive]
pub struct EventReceiverGroupRef<'a> {
    /// Group id.
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// Group name.
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    /// Group type (`group_type` on the wire; `type` accepted).
    #[serde(borrow, rename = "group_type", alias = "type")]
    pub group_type: Cow<'a, str>,
    /// Version.
    #[serde(borrow)]
    pub version: Cow<'a, str>,
    /// Description.
    #[serde(borrow, default)]
    pub description: Cow<'a, str>,
    /// Whether the group is enabled.
    pub enabled: bool,
    /// Member receivers.
    #[serde(borrow, default)]
    pub event_receiver_ids: Vec<Cow<'a, str>>,
    /// Owner (newer servers).
    #[serde(borrow, default)]
    pub owner_id: Option<Cow<'a, str>>,
    /// Resource version (newer servers).
    #[serde(default)]
    pub resource_version: Option<i64>,
    /// Creation time, RFC 3339.
    #[serde(borrow)]
    pub created_at: Cow<'a, str>,
    /// Last update, RFC 3339.
    #[serde(borrow)]
    pub updated_at: Cow<'a, str>,
}

/// `data` in the older publication shape: one event's fields, flattened.
#[derive(Debug, Clone, Deserialize)]
#[non_exhaustive]
pub struct LegacyDataRef<'a> {
    /// Description.
    #[serde(borrow, default)]
    pub description: Cow<'a, str>,
    /// The receiver the event was posted under.
    #[serde(borrow)]
    pub event_receiver_id: Cow<'a, str>,
    /// Creation time, RFC 3339.
    #[serde(borrow)]
    pub created_at: Cow<'a, str>,
    /// The payload, undecoded.
    #[serde(borrow)]
    pub payload: &'a RawValue,
}

/// The entities in an XZepr event's `data`, borrowed from the payload.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Entities<'a> {
    /// Events (current shape).
    pub events: Vec<EventRef<'a>>,
    /// Event receivers (current shape).
    pub event_receivers: Vec<EventReceiverRef<'a>>,
    /// Event receiver groups (current shape).
    pub event_receiver_groups: Vec<EventReceiverGroupRef<'a>>,
    /// Set when `data` has the older, flat shape instead.
    pub legacy: Option<LegacyDataRef<'a>>,
}

/// Every key of either shape, so one pass tells which shape it is.
#[derive(Deserialize)]
struct AnyShape<'a> {
    #[serde(borrow, default)]
    events: Option<Vec<EventRef<'a>>>,
    #[serde(borrow, default)]
    event_receivers: Option<Vec<EventReceiverRef<'a>>>,
    #[serde(borrow, default)]
    event_receiver_groups: Option<Vec<EventReceiverGroupRef<'a>>>,
    #[serde(borrow, default)]
    description: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event_receiver_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    created_at: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

impl<'a> Entities<'a> {
    /// Parses validated `data` JSON text.
    pub(crate) fn parse(text: &'a str) -> Result<Self, Error> {
        let any: AnyShape<'a> = serde_json::from_str(text).map_err(|e| Error::DataShape {
            reason: e.to_string().into(),
        })?;
        let current = any.events.is_some()
            || any.event_receivers.is_some()
            || any.event_receiver_groups.is_some();
        let legacy = if current {
            None
        } else {
            match (any.event_receiver_id, any.created_at, any.payload) {
                (Some(event_receiver_id), Some(created_at), Some(payload)) => Some(LegacyDataRef {
                    description: any.description.unwrap_or_default(),
                    event_receiver_id,
                    created_at,
                    payload,
                }),
                _ => {
                    return Err(Error::DataShape {
                        reason: "neither `events`/`event_receivers`/`event_receiver_groups` \
                                 nor `event_receiver_id`/`created_at`/`payload`"
                            .into(),
                    })
                }
            }
        };
        Ok(Entities {
            events: any.events.unwrap_or_default(),
            event_receivers: any.event_receivers.unwrap_or_default(),
            event_receiver_groups: any.event_receiver_groups.unwrap_or_default(),
            legacy,
        })
    }
}
