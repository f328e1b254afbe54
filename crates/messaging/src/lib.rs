//! Reliable messaging for Rust services, with nothing shop-specific in it.
//!
//! - [`Envelope`]: a typed event in a CloudEvents 1.0 envelope (`id`, `source`, `type`,
//!   `time`, `subject` — the ordering key — and W3C `traceparent`).
//! - [`Broker`]: publish and durable subscriptions; [`embedded::EmbeddedBroker`] is a
//!   durable in-process broker on SQLite (no server; `kill -9` loses nothing);
//!   [`rabbitmq::RabbitMqBroker`], [`nats::NatsBroker`] and [`kafka::KafkaBroker`] implement
//!   the same trait on RabbitMQ, NATS JetStream and Kafka. [`connect`] picks one by URL.
//! - [`outbox`]: the business write and its events commit in one database transaction; a
//!   relay publishes them in batches and removes them only after the broker has them, so a
//!   crash anywhere means at-least-once, never zero.
//! - [`consumer`]: idempotent consumers. The message id goes into an inbox table in the same
//!   transaction as the handler's effect, so a redelivered message has no second effect.
//!   Failures are retried with exponential backoff and jitter up to a limit, then go to a
//!   dead-letter table with the reason and attempt count ([`dlq`]); malformed or unknown
//!   messages go there at once and never block the messages behind them.
//!
//! Delivery is at-least-once; effects are exactly-once through the inbox. Messages with the
//! same `subject` are handled in order (the embedded broker hands out only the head message
//! of each key of a subscription).
//!
//! ```no_run
//! # async fn demo(db: shopmesh_platform::db::Db) -> Result<(), Box<dyn std::error::Error>> {
//! use shopmesh_messaging::{Envelope, Event, outbox};
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct OrderPlaced { order_id: String }
//! impl Event for OrderPlaced { const TYPE: &'static str = "shop.order.placed"; }
//!
//! outbox::install(&db).await?;
//! let mut tx = db.pool.begin().await?;
//! // ... the business write on `tx` ...
//! let ev = Envelope::new("orders", "order-1", &OrderPlaced { order_id: "order-1".into() })?;
//! outbox::stage(&mut tx, "orders", &ev).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```

pub mod broker;
pub mod consumer;
pub mod dlq;
pub mod embedded;
pub mod envelope;
pub mod failpoint;
pub mod kafka;
pub mod nats;
pub mod outbox;
pub mod partition;
pub mod rabbitmq;

pub use broker::{Backlog, Broker, BrokerError, Delivery, Subscription};
pub use consumer::{Consumer, ConsumerConfig, Handler, HandlerError};
pub use envelope::{Envelope, Event};

use std::path::Path;
use std::sync::Arc;

/// Which broker a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerUrl {
    /// The embedded broker, in a file (`embedded`, the default, keeps it in the data directory).
    Embedded,
    /// `amqp://user:pass@host:port/vhost` (`amqps://` is not built in).
    RabbitMq(String),
    /// `nats://host:port`.
    Nats(String),
    /// `kafka://host:port[,host:port…]`.
    Kafka(String),
}

impl std::str::FromStr for BrokerUrl {
    type Err = BrokerError;
    fn from_str(s: &str) -> Result<Self, BrokerError> {
        let s = s.trim();
        if s.is_empty() || s == "embedded" {
            Ok(BrokerUrl::Embedded)
        } else if s.starts_with("amqp://") {
            Ok(BrokerUrl::RabbitMq(s.to_owned()))
        } else if s.starts_with("nats://") {
            Ok(BrokerUrl::Nats(s.to_owned()))
        } else if s.starts_with("kafka://") {
            Ok(BrokerUrl::Kafka(s.to_owned()))
        } else {
            Err(BrokerError::Unavailable(format!(
                "unknown broker `{s}`: expected `embedded`, `amqp://…`, `nats://…` or `kafka://…`"
            )))
        }
    }
}

impl BrokerUrl {
    /// A name for logs and benchmark lines, without credentials.
    pub fn kind(&self) -> &'static str {
        match self {
            BrokerUrl::Embedded => "embedded",
            BrokerUrl::RabbitMq(_) => "rabbitmq",
            BrokerUrl::Nats(_) => "nats",
            BrokerUrl::Kafka(_) => "kafka",
        }
    }
}

/// Connects to the broker `url` names; the embedded one lives in the file `embedded_path`.
pub async fn connect(
    url: &BrokerUrl,
    embedded_path: &Path,
) -> Result<Arc<dyn Broker>, BrokerError> {
    Ok(match url {
        BrokerUrl::Embedded => Arc::new(embedded::EmbeddedBroker::open(embedded_path).await?),
        BrokerUrl::RabbitMq(u) => Arc::new(rabbitmq::RabbitMqBroker::connect(u).await?),
        BrokerUrl::Nats(u) => Arc::new(nats::NatsBroker::connect(u).await?),
        BrokerUrl::Kafka(u) => Arc::new(kafka::KafkaBroker::connect(u).await?),
    })
}

/// shopmesh's own settings in a broker URL's query (`?partitions=8&namespace=staging`),
/// taken out before the URL goes to the client library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerOptions {
    /// The URL without shopmesh's settings.
    pub url: String,
    /// Partitions per subscription ([`partition::DEFAULT_PARTITIONS`]).
    pub partitions: u16,
    /// Prefix of everything shopmesh creates on the broker (`shopmesh`): several shops (or
    /// environments) can share one broker under different namespaces.
    pub namespace: String,
    /// Temporary topology (`expires=SECONDS`): queues and consumers nobody used for this
    /// long are deleted by the broker, with their messages. For tests and throwaway
    /// environments only.
    pub expires: Option<std::time::Duration>,
    /// RabbitMQ only (`queue_type=classic`): classic queues instead of quorum queues. Lighter
    /// on the broker, but not replicated and without a delivery count that survives a
    /// consumer's restart.
    pub classic_queues: bool,
    /// RabbitMQ and Kafka (`prefetch=N`, default 32): messages each partition's consumer may hold
    /// unacknowledged. The adapter still hands out one message per key at a time; more
    /// prefetch lets the other keys of a partition proceed meanwhile.
    pub prefetch: u16,
    /// Kafka only (`delivery_limit=N`, 1 to 10,000, default [`kafka::DELIVERY_LIMIT`], 100):
    /// deliveries of a message that is never settled (it crashes its consumer process, say)
    /// before the adapter parks it on the dead-letter topic instead. RabbitMQ's and NATS's
    /// limit (100) is set on their queues and consumers when they are created and stays.
    pub delivery_limit: u16,
}

impl BrokerOptions {
    pub fn parse(url: &str) -> Result<Self, BrokerError> {
        let bad = |what: &str| BrokerError::Unavailable(format!("broker URL: {what}"));
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut o = BrokerOptions {
            url: base.to_owned(),
            partitions: partition::DEFAULT_PARTITIONS,
            namespace: "shopmesh".into(),
            expires: None,
            classic_queues: false,
            prefetch: 32,
            delivery_limit: kafka::DELIVERY_LIMIT,
        };
        // A whole number within `range`, for setting `name`.
        let ranged = |name: &str, n: &str, range: std::ops::RangeInclusive<u16>| {
            n.parse().ok().filter(|n| range.contains(n)).ok_or_else(|| {
                bad(&format!(
                    "{name} must be {} to {}, not `{n}`",
                    range.start(),
                    range.end()
                ))
            })
        };
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("partitions", n)) => o.partitions = ranged("partitions", n, 1..=1024)?,
                Some(("namespace", n)) => {
                    let ok = !n.is_empty()
                        && n.len() <= 64
                        && n.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                    if !ok {
                        return Err(bad(&format!(
                            "namespace must be 1 to 64 letters, digits, `-` or `_`, not `{n}`"
                        )));
                    }
                    o.namespace = n.to_owned();
                }
                Some(("expires", n)) => {
                    let secs: u64 = n
                        .parse()
                        .ok()
                        .filter(|s| *s > 0)
                        .ok_or_else(|| bad(&format!("expires must be seconds, not `{n}`")))?;
                    o.expires = Some(std::time::Duration::from_secs(secs));
                }
                Some(("prefetch", n)) => o.prefetch = ranged("prefetch", n, 1..=1000)?,
                Some(("delivery_limit", n)) => {
                    o.delivery_limit = ranged("delivery_limit", n, 1..=10_000)?
                }
                Some(("queue_type", "classic")) => o.classic_queues = true,
                Some(("queue_type", "quorum")) => o.classic_queues = false,
                Some(("queue_type", t)) => {
                    return Err(bad(&format!("queue_type is quorum or classic, not `{t}`")));
                }
                _ => rest.push(pair),
            }
        }
        if !rest.is_empty() {
            o.url = format!("{base}?{}", rest.join("&"));
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            "embedded".parse::<BrokerUrl>().unwrap(),
            BrokerUrl::Embedded
        );
        assert_eq!("nats://h:4222".parse::<BrokerUrl>().unwrap().kind(), "nats");
        assert_eq!(
            "amqp://g:g@h:5672".parse::<BrokerUrl>().unwrap().kind(),
            "rabbitmq"
        );
        assert_eq!(
            "kafka://h:9092".parse::<BrokerUrl>().unwrap().kind(),
            "kafka"
        );
        assert!("kafka:h".parse::<BrokerUrl>().is_err());
        let o = BrokerOptions::parse("amqp://h?heartbeat=10&partitions=8&namespace=t1&expires=60")
            .unwrap();
        assert_eq!(o.url, "amqp://h?heartbeat=10");
        assert_eq!((o.partitions, o.namespace.as_str()), (8, "t1"));
        assert_eq!(o.expires, Some(std::time::Duration::from_secs(60)));
        let o = BrokerOptions::parse("nats://h").unwrap();
        assert_eq!(
            (o.url.as_str(), o.partitions, o.namespace.as_str()),
            ("nats://h", 32, "shopmesh")
        );
        assert!(BrokerOptions::parse("nats://h?partitions=0").is_err());
        assert_eq!(o.delivery_limit, 100);
        let o = BrokerOptions::parse("kafka://h:9092?delivery_limit=3&linger.ms=5").unwrap();
        assert_eq!(
            (o.url.as_str(), o.delivery_limit),
            ("kafka://h:9092?linger.ms=5", 3)
        );
        assert!(BrokerOptions::parse("kafka://h?delivery_limit=0").is_err());
        assert!(BrokerOptions::parse("kafka://h?delivery_limit=many").is_err());
        assert!(BrokerOptions::parse("nats://h?namespace=a.b").is_err());
    }
}
