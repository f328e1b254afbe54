//! The broker abstraction every adapter (embedded, RabbitMQ, NATS) implements.

use std::time::Duration;

use futures::future::BoxFuture;

use crate::Envelope;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker storage: {0}")]
    Storage(#[from] sqlx::Error),
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker closed")]
    Closed,
}

/// One message handed to a subscriber. `attempt` counts deliveries, starting at 1.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Broker-specific handle used to ack/nack.
    pub tag: i64,
    pub topic: String,
    /// The raw message; a subscriber decodes it (a malformed one is a poison message).
    pub payload: String,
    pub attempt: u32,
}

/// The state of a subscription's queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub messages: u64,
    /// Age of the oldest message (zero when empty): the consumer's lag.
    pub oldest: Duration,
}

impl Backlog {
    /// For adapters that only know when the newest delivered message was published: its age
    /// stands for the lag while anything is waiting.
    pub(crate) fn since_last_published(messages: u64, last_published_ms: i64) -> Self {
        let oldest = if messages > 0 && last_published_ms > 0 {
            Duration::from_millis(
                (shopmesh_platform::now_millis() - last_published_ms).max(0) as u64
            )
        } else {
            Duration::ZERO
        };
        Backlog { messages, oldest }
    }
}

/// The receiving end of an adapter's ready deliveries (bounded or not).
pub(crate) trait Ready {
    fn recv(&mut self) -> impl std::future::Future<Output = Option<Delivery>> + Send;
    fn try_recv(&mut self) -> Option<Delivery>;
}

impl Ready for tokio::sync::mpsc::Receiver<Delivery> {
    fn recv(&mut self) -> impl std::future::Future<Output = Option<Delivery>> + Send {
        tokio::sync::mpsc::Receiver::recv(self)
    }
    fn try_recv(&mut self) -> Option<Delivery> {
        tokio::sync::mpsc::Receiver::try_recv(self).ok()
    }
}

impl Ready for tokio::sync::mpsc::UnboundedReceiver<Delivery> {
    fn recv(&mut self) -> impl std::future::Future<Output = Option<Delivery>> + Send {
        tokio::sync::mpsc::UnboundedReceiver::recv(self)
    }
    fn try_recv(&mut self) -> Option<Delivery> {
        tokio::sync::mpsc::UnboundedReceiver::try_recv(self).ok()
    }
}

/// Up to `max` deliveries an adapter's receive loop has queued, waiting up to `wait` for
/// the first.
pub(crate) async fn take_ready(rx: &mut impl Ready, max: usize, wait: Duration) -> Vec<Delivery> {
    let first = if wait.is_zero() {
        rx.try_recv()
    } else {
        tokio::time::timeout(wait, rx.recv()).await.ok().flatten()
    };
    let mut out: Vec<Delivery> = first.into_iter().collect();
    while out.len() < max {
        match rx.try_recv() {
            Some(d) => out.push(d),
            None => break,
        }
    }
    out
}

/// A durable subscription: messages published to its topics while the subscriber is away
/// wait for it.
pub trait Subscription: Send + Sync {
    /// Up to `max` deliveries, waiting until at least one is available or `wait` elapses.
    fn next(&self, max: usize, wait: Duration)
    -> BoxFuture<'_, Result<Vec<Delivery>, BrokerError>>;
    /// Done with these messages: they are never delivered again.
    fn ack<'a>(&'a self, ds: &'a [Delivery]) -> BoxFuture<'a, Result<(), BrokerError>>;
    /// Deliver the message again after `delay` (and keep later messages of its key waiting).
    fn nack<'a>(
        &'a self,
        d: &'a Delivery,
        delay: Duration,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;
    /// Messages waiting (or in flight) in this subscription, and how long the oldest has
    /// been deliverable.
    fn backlog(&self) -> BoxFuture<'_, Result<Backlog, BrokerError>>;
}

pub trait Broker: Send + Sync {
    /// Publishes a batch to `topic`; returns once the broker holds them durably.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        batch: &'a [Envelope],
    ) -> BoxFuture<'a, Result<(), BrokerError>>;
    /// Delivers messages to one subscription only (dead-letter replay: the consumer that
    /// gave up gets the message again; the others, which handled it, are not bothered).
    fn deliver_to<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        batch: &'a [Envelope],
    ) -> BoxFuture<'a, Result<(), BrokerError>>;
    /// Creates the durable subscription `group` to `topics` without consuming from it, so
    /// that messages published from now on wait for its consumer. Idempotent.
    fn declare<'a>(
        &'a self,
        group: &'a str,
        topics: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { self.subscribe(group, topics).await.map(drop) })
    }
    /// Opens the durable subscription `group` to `topics` (creating it if needed). One
    /// subscription per group per process.
    fn subscribe<'a>(
        &'a self,
        group: &'a str,
        topics: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, BrokerError>>;
}

/// Test mode: publishes every batch twice (same message ids), as a broker may deliver after
/// a failover or a lost acknowledgement. Consumers must apply each message once. (NATS
/// JetStream drops the second copy itself, by message id, within its duplicate window.)
pub struct Duplicating(pub std::sync::Arc<dyn Broker>);

impl Broker for Duplicating {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        batch: &'a [Envelope],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            self.0.publish(topic, batch).await?;
            self.0.publish(topic, batch).await
        })
    }

    fn deliver_to<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        batch: &'a [Envelope],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.0.deliver_to(group, topic, batch)
    }

    fn declare<'a>(
        &'a self,
        group: &'a str,
        topics: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.0.declare(group, topics)
    }

    fn subscribe<'a>(
        &'a self,
        group: &'a str,
        topics: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, BrokerError>> {
        self.0.subscribe(group, topics)
    }
}
