//! Reliable messaging for Rust services, with nothing shop-specific in it.
//!
//! - [`Envelope`]: a typed event in a CloudEvents 1.0 envelope (`id`, `source`, `type`,
//!   `time`, `subject` — the ordering key — and W3C `traceparent`).
//! - [`Broker`]: publish and durable subscriptions; [`embedded::EmbeddedBroker`] is a
//!   durable in-process broker on SQLite (no server; `kill -9` loses nothing). RabbitMQ and
//!   NATS adapters implement the same trait.
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
pub mod outbox;

pub use broker::{Backlog, Broker, BrokerError, Delivery, Subscription};
pub use consumer::{Consumer, ConsumerConfig, Handler, HandlerError};
pub use envelope::{Envelope, Event};
