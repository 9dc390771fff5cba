//! Owned, serde-derived message types, field-compatible with the downstream-consumer
//! plan so handlers written against it keep working. Built from a [`CloudEvent`]
//! view with [`CloudEvent::to_owned_message`], or deserialized directly.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use super::entities::{EventReceiverGroupRef, EventReceiverRef, EventRef};
use super::error::Error;
use super::CloudEvent;

/// A CloudEvents 1.0.1 message from XZepr, owned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEventMessage {
    /// Whether the event represents a success (XZepr extension).
    #[serde(default)]
    pub success: bool,
    /// Event id (ULID).
    pub id: String,
    /// CloudEvents spec version.
    pub specversion: String,
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Event source (`xzepr.event.receiver.<id>`).
    pub source: String,
    /// XZepr API version.
    #[serde(default)]
    pub api_version: String,
    /// Event name.
    #[serde(default)]
    pub name: String,
    /// Event version.
    #[serde(default)]
    pub version: String,
    /// Release.
    #[serde(default)]
    pub release: String,
    /// Platform id.
    #[serde(default)]
    pub platform_id: String,
    /// Package.
    #[serde(default)]
    pub package: String,
    /// The entities carried in `data`.
    #[serde(default)]
    pub data: CloudEventData,
}

/// The entities in a message's `data`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CloudEventData {
    /// Events.
    #[serde(default)]
    pub events: Vec<EventEntity>,
    /// Event receivers.
    #[serde(default)]
    pub event_receivers: Vec<EventReceiverEntity>,
    /// Event receiver groups.
    #[serde(default)]
    pub event_receiver_groups: Vec<EventReceiverGroupEntity>,
}

/// An event recorded by XZepr.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEntity {
    /// Event id.
    pub id: String,
    /// Event name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Release.
    pub release: String,
    /// Platform id.
    pub platform_id: String,
    /// Package.
    pub package: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Payload, any JSON.
    pub payload: JsonValue,
    /// Success flag.
    pub success: bool,
    /// Receiver the event was posted under.
    pub event_receiver_id: String,
    /// Owner, when the server sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
    /// Resource version, when the server sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<i64>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// An event receiver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventReceiverEntity {
    /// Receiver id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Receiver type (serialized as `type`, as the plan's struct; `receiver_type` accepted).
    #[serde(rename = "type", alias = "receiver_type")]
    pub receiver_type: String,
    /// Version.
    pub version: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// JSON schema.
    pub schema: JsonValue,
    /// Fingerprint.
    #[serde(default)]
    pub fingerprint: String,
    /// Owner, when the server sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
    /// Resource version, when the server sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<i64>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// An event receiver group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventReceiverGroupEntity {
    /// Group id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Group type (serialized as `type`, as the plan's struct; `group_type` accepted).
    #[serde(rename = "type", alias = "group_type")]
    pub group_type: String,
    /// Version.
    pub version: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Enabled flag.
    pub enabled: bool,
    /// Member receivers.
    #[serde(default)]
    pub event_receiver_ids: Vec<String>,
    /// Owner, when the server sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
    /// Resource version, when the server sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<i64>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last update.
    pub updated_at: DateTime<Utc>,
}

fn timestamp(field: &str, text: &str) -> Result<DateTime<Utc>, Error> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| Error::DataShape {
            reason: format!("`{field}` is not an RFC 3339 timestamp: {e}").into(),
        })
}

fn json(raw: &serde_json::value::RawValue) -> Result<JsonValue, Error> {
    serde_json::from_str(raw.get()).map_err(|e| Error::DataShape {
        reason: e.to_string().into(),
    })
}

impl EventEntity {
    fn from_ref(e: &EventRef<'_>) -> Result<Self, Error> {
        Ok(EventEntity {
            id: e.id.to_string(),
            name: e.name.to_string(),
            version: e.version.to_string(),
            release: e.release.to_string(),
            platform_id: e.platform_id.to_string(),
            package: e.package.to_string(),
            description: e.description.to_string(),
            payload: json(e.payload)?,
            success: e.success,
            event_receiver_id: e.event_receiver_id.to_string(),
            owner_id: e.owner_id.as_deref().map(str::to_owned),
            resource_version: e.resource_version,
            created_at: timestamp("created_at", &e.created_at)?,
        })
    }
}

impl EventReceiverEntity {
    fn from_ref(r: &EventReceiverRef<'_>) -> Result<Self, Error> {
        Ok(EventReceiverEntity {
            id: r.id.to_string(),
            name: r.name.to_string(),
            receiver_type: r.receiver_type.to_string(),
            version: r.version.to_string(),
            description: r.description.to_string(),
            schema: json(r.schema)?,
            fingerprint: r.fingerprint.to_string(),
            owner_id: r.owner_id.as_deref().map(str::to_owned),
            resource_version: r.resource_version,
            created_at: timestamp("created_at", &r.created_at)?,
        })
    }
}

impl EventReceiverGroupEntity {
    fn from_ref(g: &EventReceiverGroupRef<'_>) -> Result<Self, Error> {
        Ok(EventReceiverGroupEntity {
            id: g.id.to_string(),
            name: g.name.to_string(),
            group_type: g.group_type.to_string(),
            version: g.version.to_string(),
            description: g.description.to_string(),
            enabled: g.enabled,
            event_receiver_ids: g.event_receiver_ids.iter().map(|s| s.to_string()).collect(),
            owner_id: g.owner_id.as_deref().map(str::to_owned),
            resource_version: g.resource_version,
            created_at: timestamp("created_at", &g.created_at)?,
            updated_at: timestamp("updated_at", &g.updated_at)?,
        })
    }
}

pub(super) fn from_view(ev: &CloudEvent<'_>) -> Result<CloudEventMessage, Error> {
    let own = |s: Option<&str>| s.unwrap_or_default().to_owned();
    let data = if ev.data().raw().is_none() {
        CloudEventData::default()
    } else {
        let ents = ev.entities()?;
        let mut data = CloudEventData {
            events: ents
                .events
                .iter()
                .map(EventEntity::from_ref)
                .collect::<Result<_, _>>()?,
            event_receivers: ents
                .event_receivers
                .iter()
                .map(EventReceiverEntity::from_ref)
                .collect::<Result<_, _>>()?,
            event_receiver_groups: ents
                .event_receiver_groups
                .iter()
                .map(EventReceiverGroupEntity::from_ref)
                .collect::<Result<_, _>>()?,
        };
        // The older flat shape describes the envelope's own event: present it as
        // that event, so plan-style handlers find it in `data.events`.
        if let Some(legacy) = &ents.legacy {
            data.events.push(EventEntity {
                id: ev.id().to_owned(),
                name: own(ev.name()),
                version: own(ev.version()),
                release: own(ev.release()),
                platform_id: own(ev.platform_id()),
                package: own(ev.package()),
                description: legacy.description.to_string(),
                payload: json(legacy.payload)?,
                success: ev.success().unwrap_or_default(),
                event_receiver_id: legacy.event_receiver_id.to_string(),
                owner_id: None,
                resource_version: None,
                created_at: timestamp("created_at", &legacy.created_at)?,
            });
        }
        data
    };
    Ok(CloudEventMessage {
        success: ev.success().unwrap_or_default(),
        id: ev.id().to_owned(),
        specversion: ev.specversion().to_owned(),
        event_type: ev.event_type().to_owned(),
        source: ev.source().to_owned(),
        api_version: own(ev.api_version()),
        name: own(ev.name()),
        version: own(ev.version()),
        release: own(ev.release()),
        platform_id: own(ev.platform_id()),
        package: own(ev.package()),
        data,
    })
}
