//! CloudEvents 1.0 envelopes (structured JSON mode).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A typed event. `TYPE` is the CloudEvents `type` (reverse-DNS style, e.g.
/// `shop.order.placed`).
pub trait Event: Serialize + DeserializeOwned {
    const TYPE: &'static str;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub specversion: String,
    /// Unique per message; the inbox deduplicates on it.
    pub id: String,
    /// Who produced it (a URI-reference, e.g. `orders`).
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339.
    pub time: String,
    /// The ordering key: messages with the same subject are handled in order.
    pub subject: String,
    pub datacontenttype: String,
    /// W3C trace context of the operation that produced the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    pub data: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("expected a `{expected}` event, got `{got}`")]
    WrongType { expected: &'static str, got: String },
    #[error("event data does not match `{kind}`: {source}")]
    Data {
        kind: &'static str,
        source: serde_json::Error,
    },
}

impl Envelope {
    /// Wraps `event` with a fresh id (UUIDv7) and the current time.
    pub fn new<E: Event>(
        source: &str,
        subject: &str,
        event: &E,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            specversion: "1.0".into(),
            id: uuid::Uuid::now_v7().to_string(),
            source: source.into(),
            kind: E::TYPE.into(),
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            subject: subject.into(),
            datacontenttype: "application/json".into(),
            traceparent: None,
            data: serde_json::to_value(event)?,
        })
    }

    /// An event caused by `cause` (a reply, a next step): same trace.
    pub fn caused_by<E: Event>(
        source: &str,
        subject: &str,
        event: &E,
        cause: &Envelope,
    ) -> Result<Self, serde_json::Error> {
        // With span export on, the next message's parent is the span handling this one, so
        // the saga reads as one tree; otherwise the trace id is carried as it came.
        let tp = shopmesh_platform::otel::traceparent(&tracing::Span::current())
            .or_else(|| cause.traceparent.clone());
        Ok(Self::new(source, subject, event)?.with_traceparent(tp))
    }

    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }

    pub fn is<E: Event>(&self) -> bool {
        self.kind == E::TYPE
    }

    /// The typed event, if this envelope carries one of type `E`.
    pub fn decode<E: Event>(&self) -> Result<E, DecodeError> {
        if self.kind != E::TYPE {
            return Err(DecodeError::WrongType {
                expected: E::TYPE,
                got: self.kind.clone(),
            });
        }
        serde_json::from_value(self.data.clone()).map_err(|source| DecodeError::Data {
            kind: E::TYPE,
            source,
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        let env: Envelope = serde_json::from_str(s)?;
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Ping {
        n: u32,
    }
    impl Event for Ping {
        const TYPE: &'static str = "test.ping";
    }
    #[derive(Debug, Serialize, Deserialize)]
    struct Pong;
    impl Event for Pong {
        const TYPE: &'static str = "test.pong";
    }

    #[test]
    fn round_trip() {
        let e = Envelope::new("tests", "k1", &Ping { n: 7 }).unwrap();
        let back = Envelope::from_json(&e.to_json()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.specversion, "1.0");
        assert_eq!(back.decode::<Ping>().unwrap(), Ping { n: 7 });
        assert!(matches!(
            back.decode::<Pong>(),
            Err(DecodeError::WrongType { .. })
        ));
        let json: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(json["type"], "test.ping");
    }
}
