//! The event envelope: a CloudEvents 1.0 event (JSON format) with the `correlationid` and
//! `causationid` extension attributes that the catalog's "Correlation Tracking" pattern needs.
//!
//! One envelope type travels through the whole system: it is what the outbox stores, what the
//! broker carries as the message payload (CloudEvents *structured* mode), and what a consumer's
//! handler receives. Unknown extension attributes of foreign events survive a round trip.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The CloudEvents specification version this crate produces and accepts.
pub const SPEC_VERSION: &str = "1.0";

/// Media type of a whole event in CloudEvents JSON structured mode.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// A CloudEvents 1.0 event with correlation and causation ids.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub specversion: String,
    /// Unique per source; this crate makes UUIDv7 ids, so ids sort by creation time.
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub ty: String,
    /// What the event is about (e.g. the case id); also the ordering key of the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// OPTIONAL in CloudEvents; always set on events this crate makes (RFC 3339, UTC, `Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    /// `None`: no `data` member; `Some(Null)`: `"data": null` (kept apart so events round-trip).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub data: Option<serde_json::Value>,
    /// Extension: the id shared by everything that one original request caused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlationid: Option<String>,
    /// Extension: the id of the request or event that directly caused this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causationid: Option<String>,
    /// Any other extension attributes, kept so foreign events round-trip unchanged.
    #[serde(flatten)]
    pub extensions: BTreeMap<String, serde_json::Value>,
}

/// Why a byte string is not an acceptable event.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("event is not valid CloudEvents JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported specversion {0:?} (expected \"1.0\")")]
    SpecVersion(String),
    #[error("required attribute `{0}` is empty")]
    Empty(&'static str),
}

impl Event {
    /// A new event with a fresh UUIDv7 id, the current time and JSON data.
    pub fn new(ty: impl Into<String>, source: impl Into<String>, data: serde_json::Value) -> Self {
        Event {
            specversion: SPEC_VERSION.to_owned(),
            id: Uuid::now_v7().to_string(),
            source: source.into(),
            ty: ty.into(),
            subject: None,
            time: Some(Utc::now()),
            datacontenttype: Some("application/json".to_owned()),
            data: Some(data),
            correlationid: None,
            causationid: None,
            extensions: BTreeMap::new(),
        }
    }

    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Stamp the correlation id and the causation id (the triggering request or event id).
    pub fn correlated(mut self, correlation_id: impl Into<String>, causation_id: Option<String>) -> Self {
        self.correlationid = Some(correlation_id.into());
        self.causationid = causation_id;
        self
    }

    /// Make this event a consequence of `parent`: same correlation id, `parent.id` as causation,
    /// and the parent's trace continued (`traceparent` with a new span id).
    /// A parent without a correlation id starts a new conversation named after itself.
    pub fn caused_by(mut self, parent: &Event) -> Self {
        self.correlationid = Some(parent.correlationid.clone().unwrap_or_else(|| parent.id.clone()));
        self.causationid = Some(parent.id.clone());
        let trace = parent
            .extensions
            .get("traceparent")
            .and_then(|v| v.as_str())
            .and_then(crate::http::correlation::TraceParent::parse);
        if let Some(t) = trace {
            self.extensions.insert(
                "traceparent".to_owned(),
                serde_json::Value::String(t.child().to_string()),
            );
        }
        self
    }

    /// Serialise in CloudEvents JSON format (structured mode).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an Event always serialises")
    }

    /// Parse and validate an event in CloudEvents JSON format.
    pub fn from_json(bytes: &[u8]) -> Result<Self, EventError> {
        let event: Event = serde_json::from_slice(bytes)?;
        event.validate()?;
        Ok(event)
    }

    /// Check the REQUIRED attributes of CloudEvents 1.0.
    pub fn validate(&self) -> Result<(), EventError> {
        if self.specversion != SPEC_VERSION {
            return Err(EventError::SpecVersion(self.specversion.clone()));
        }
        for (name, value) in [("id", &self.id), ("source", &self.source), ("type", &self.ty)] {
            if value.is_empty() {
                return Err(EventError::Empty(name));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_extensions_and_correlation() {
        let parent = Event::new("sea.cases.created", "/sea/cases", serde_json::json!({"id": "c1"}))
            .with_subject("c1")
            .correlated("corr-1", Some("req-1".into()));
        let mut child =
            Event::new("sea.notifications.queued", "/sea/notifications", serde_json::json!({})).caused_by(&parent);
        child.extensions.insert(
            "traceparent".into(),
            serde_json::json!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        for e in [&parent, &child] {
            let back = Event::from_json(&e.to_json()).unwrap();
            assert_eq!(&back, e);
        }
        assert_eq!(child.correlationid.as_deref(), Some("corr-1"));
        assert_eq!(child.causationid.as_deref(), Some(parent.id.as_str()));
        let v: serde_json::Value = serde_json::from_slice(&child.to_json()).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "sea.notifications.queued");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(
            v["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        // UUIDv7
        assert_eq!(Uuid::parse_str(&parent.id).unwrap().get_version_num(), 7);
    }

    #[test]
    fn rejects_invalid_events() {
        assert!(matches!(Event::from_json(b"{"), Err(EventError::Json(_))));
        let bad = br#"{"specversion":"0.3","id":"1","source":"s","type":"t","time":"2026-01-01T00:00:00Z"}"#;
        assert!(matches!(Event::from_json(bad), Err(EventError::SpecVersion(_))));
        let empty = br#"{"specversion":"1.0","id":"","source":"s","type":"t","time":"2026-01-01T00:00:00Z"}"#;
        assert!(matches!(Event::from_json(empty), Err(EventError::Empty("id"))));
        // `time` is optional in CloudEvents 1.0, a minimal foreign event is accepted.
        let minimal = br#"{"specversion":"1.0","id":"1","source":"s","type":"t"}"#;
        assert!(Event::from_json(minimal).unwrap().time.is_none());
        let bad_time = br#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"yesterday"}"#;
        assert!(Event::from_json(bad_time).is_err());
    }
}

/// A member that is present is `Some`, even when it is `null`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde::Deserialize::deserialize(d).map(Some)
}
