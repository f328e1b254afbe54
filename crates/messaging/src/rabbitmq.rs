//! RabbitMQ adapter (AMQP 0-9-1, through `lapin`).
//!
//! Topology, declared by shopmesh at start-up and on every reconnection (idempotently), under
//! its namespace `{ns}` (`shopmesh` unless the URL says `?namespace=…`):
//!
//! | object | kind | what for |
//! |---|---|---|
//! | `{ns}.events` | durable direct exchange | every publish, routing key `{topic}.{partition}` |
//! | `{ns}.{group}.{p}` | durable quorum queue, single active consumer | one per subscription group and partition `p`, bound to `{topic}.{p}` for each of the group's topics |
//! | `{ns}.dead-letter` | durable fanout exchange and quorum queue | messages delivered more than 100 times (a message that crashes its consumer before it can be dead-lettered in the service's database) |
//! | `{ns}.members` | transient direct exchange | instances of a group announce themselves every second, to share the partitions |
//!
//! Ordering and sharing: a message's key (its `subject`) picks a partition
//! ([`crate::partition`]); each partition queue has a single active consumer, and of the
//! messages it holds unacknowledged (`prefetch`, 32 by default) the adapter hands the
//! consumer one per key at a time, in queue order: one key's messages are handled one at a
//! time, in order, while the partition's other keys proceed. Instances of the same
//! group (competing consumers) split the partitions between them (`p % instances == rank`,
//! from the heartbeats); each partition is consumed on a channel of its own. To let a
//! partition go, an instance stops offering its messages, waits until the consumer has
//! settled those it has, and closes the partition's channel: RabbitMQ takes back the rest,
//! in order, before the partition's next (single active) consumer starts. Prefetched
//! messages that went back this way count as deliveries in RabbitMQ's delivery count.
//!
//! Durability: persistent messages, publisher confirms (`publish` returns once RabbitMQ has
//! them), manual acks. A retry delay keeps the message unacknowledged in the consumer (so
//! the messages of its key behind it wait) and offers it again after the delay.
//! Connection loss: publishes fail (the outbox keeps the events), consumers stop, and a
//! supervisor reconnects with exponential backoff; unacknowledged messages come again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::SelectAll;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::broker::{Backlog, Broker, BrokerError, Delivery, Subscription};
use crate::{Envelope, partition};

/// Deliveries after which RabbitMQ itself dead-letters a message (the consumers give up,
/// into their database's dead letters, long before).
pub const DELIVERY_LIMIT: i32 = 100;
/// How long `publish` and `subscribe` wait for a connection before reporting the broker
/// unavailable.
const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// How long opening a connection (TCP, the AMQP handshake, the topology) may take: a server
/// (or anything between) that accepts the connection and then says nothing must not hold
/// the reconnection up for ever.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a batch's publisher confirms may take before the batch is reported failed (the
/// outbox sends it again; the consumers' inboxes absorb what had arrived).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
const HEARTBEAT: Duration = Duration::from_secs(1);
/// An instance not heard from for this long has left its group.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(4);
const PUBLISHED_MS: &str = "x-published-ms";
/// Header carrying the message's subject (its ordering key).
const SUBJECT: &str = "x-subject";

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// The names of what shopmesh declares, under its namespace (`shopmesh` by default).
#[derive(Debug, Clone)]
pub struct Names {
    pub exchange: String,
    pub dead_letter: String,
    pub members: String,
    namespace: String,
}

impl Names {
    pub fn new(namespace: &str) -> Self {
        Self {
            exchange: format!("{namespace}.events"),
            dead_letter: format!("{namespace}.dead-letter"),
            members: format!("{namespace}.members"),
            namespace: namespace.to_owned(),
        }
    }

    /// The queue of `group`'s partition `p`.
    pub fn queue(&self, group: &str, p: u16) -> String {
        format!("{}.{group}.{p}", self.namespace)
    }
}

fn routing_key(topic: &str, p: u16) -> String {
    format!("{topic}.{p}")
}

/// One connection and its publishing channel (in confirm mode).
#[derive(Clone)]
struct Link {
    conn: Arc<Connection>,
    publish: Channel,
    generation: u64,
}

struct Shared {
    options: crate::BrokerOptions,
    names: Names,
    link: watch::Sender<Option<Link>>,
    stop: CancellationToken,
    next_tag: AtomicI64,
}

impl Shared {
    /// The current connection, waiting up to [`CONNECT_WAIT`] for one.
    async fn current(&self) -> Result<Link, BrokerError> {
        let mut rx = self.link.subscribe();
        let wait = rx.wait_for(|l| l.is_some());
        match tokio::time::timeout(CONNECT_WAIT, wait).await {
            Ok(Ok(l)) => Ok(l.clone().expect("waited for Some")),
            Ok(Err(_)) => Err(BrokerError::Closed),
            Err(_) => Err(BrokerError::Unavailable("not connected to RabbitMQ".into())),
        }
    }
}

/// A RabbitMQ broker. Cheap to clone; the connection closes when the last clone (and the
/// last subscription) is gone.
#[derive(Clone)]
pub struct RabbitMqBroker {
    shared: Arc<Shared>,
    _guard: Arc<DropGuard>,
}

/// A new connection and its publishing channel, with the topology declared, within
/// [`OPEN_TIMEOUT`].
async fn open_link(
    options: &crate::BrokerOptions,
    names: &Names,
    generation: u64,
) -> Result<Link, BrokerError> {
    match tokio::time::timeout(
        OPEN_TIMEOUT,
        open_link_unbounded(options, names, generation),
    )
    .await
    {
        Ok(r) => r.map_err(unavailable),
        Err(_) => Err(BrokerError::Unavailable(format!(
            "RabbitMQ connection not open after {OPEN_TIMEOUT:?}"
        ))),
    }
}

async fn open_link_unbounded(
    options: &crate::BrokerOptions,
    names: &Names,
    generation: u64,
) -> Result<Link, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name("shopmesh".into());
    let conn = Connection::connect(&options.url, props).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        names.exchange.as_str().into(),
        ExchangeKind::Direct,
        durable,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        names.dead_letter.as_str().into(),
        ExchangeKind::Fanout,
        durable,
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        names.dead_letter.as_str().into(),
        QueueDeclareOptions::durable(),
        queue_args(options),
    )
    .await?;
    ch.queue_bind(
        names.dead_letter.as_str().into(),
        names.dead_letter.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        names.members.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(Link {
        conn: Arc::new(conn),
        publish: ch,
        generation,
    })
}

/// What every queue shopmesh declares has: its type, and its expiry when the URL asks.
fn queue_args(options: &crate::BrokerOptions) -> FieldTable {
    let mut args = FieldTable::default();
    let kind = if options.classic_queues {
        "classic"
    } else {
        "quorum"
    };
    args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
    if let Some(e) = options.expires {
        let ms = i64::try_from(e.as_millis()).unwrap_or(i64::MAX);
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
    }
    args
}

fn set_connected(up: bool) {
    metrics::gauge!("messaging_broker_connected", "broker" => "rabbitmq")
        .set(f64::from(u8::from(up)));
}

/// Watches the connection; when it drops, reconnects with exponential backoff.
async fn supervise(shared: Arc<Shared>, mut link: Link) {
    loop {
        // Wait for the connection to fail (or for the broker to be dropped).
        loop {
            tokio::select! {
                _ = shared.stop.cancelled() => {
                    let _ = link.conn.close(200, "shutting down".into()).await;
                    return;
                }
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            if !link.conn.status().connected() {
                break;
            }
        }
        tracing::warn!("RabbitMQ connection lost; reconnecting");
        set_connected(false);
        shared.link.send_replace(None);
        let mut backoff = Duration::from_millis(100);
        link = loop {
            tokio::select! {
                _ = shared.stop.cancelled() => return,
                r = open_link(&shared.options, &shared.names, link.generation + 1) => match r {
                    Ok(l) => break l,
                    Err(e) => tracing::debug!(error = %e, "RabbitMQ reconnection failed"),
                },
            }
            tokio::select! {
                _ = shared.stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        };
        tracing::info!(generation = link.generation, "RabbitMQ reconnected");
        set_connected(true);
        shared.link.send_replace(Some(link.clone()));
    }
}

impl RabbitMqBroker {
    /// Connects to `url` (`amqp://user:pass@host:port/vhost`, with shopmesh's
    /// [`crate::BrokerOptions`] in the query if wanted). Fails at once if RabbitMQ cannot be
    /// reached; after that, lost connections are re-established in the background.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let options = crate::BrokerOptions::parse(url)?;
        let names = Names::new(&options.namespace);
        let link = open_link(&options, &names, 1).await?;
        set_connected(true);
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            options,
            names,
            link: watch::Sender::new(Some(link.clone())),
            stop: stop.clone(),
            next_tag: AtomicI64::new(1),
        });
        tokio::spawn(supervise(shared.clone(), link));
        Ok(Self {
            shared,
            _guard: Arc::new(stop.drop_guard()),
        })
    }

    pub fn partitions(&self) -> u16 {
        self.shared.options.partitions
    }

    async fn send(
        &self,
        exchange: &str,
        route: impl Fn(&Envelope) -> String,
        batch: &[Envelope],
    ) -> Result<(), BrokerError> {
        let link = self.shared.current().await?;
        let started = Instant::now();
        let mut confirms = Vec::with_capacity(batch.len());
        for env in batch {
            let mut headers = FieldTable::default();
            headers.insert(
                PUBLISHED_MS.into(),
                AMQPValue::LongLongInt(shopmesh_platform::now_millis()),
            );
            headers.insert(
                SUBJECT.into(),
                AMQPValue::LongString(env.subject.as_str().into()),
            );
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(env.id.as_str().into())
                .with_content_type("application/cloudevents+json".into())
                .with_headers(headers);
            let c = link
                .publish
                .basic_publish(
                    exchange.into(),
                    route(env).as_str().into(),
                    BasicPublishOptions::default(),
                    env.to_json().as_bytes(),
                    props,
                )
                .await
                .map_err(unavailable)?;
            confirms.push(c);
        }
        for c in confirms {
            let confirmed = tokio::time::timeout(CONFIRM_TIMEOUT, c)
                .await
                .map_err(|_| {
                    BrokerError::Unavailable(format!(
                        "RabbitMQ did not confirm a message within {CONFIRM_TIMEOUT:?}"
                    ))
                })?;
            match confirmed.map_err(unavailable)? {
                Confirmation::Ack(_) => {}
                Confirmation::Nack(_) => {
                    return Err(BrokerError::Unavailable(
                        "RabbitMQ refused a message (nack)".into(),
                    ));
                }
                Confirmation::NotRequested => {
                    return Err(BrokerError::Unavailable(
                        "publisher confirms are off".into(),
                    ));
                }
            }
        }
        metrics::histogram!("messaging_publish_confirm_seconds", "broker" => "rabbitmq")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }
}

impl Broker for RabbitMqBroker {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        batch: &'a [Envelope],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            let n = self.shared.options.partitions;
            self.send(
                &self.shared.names.exchange,
                |e| routing_key(topic, partition::of(&e.subject, n)),
                batch,
            )
            .await?;
            metrics::counter!("messaging_published_total", "topic" => topic.to_owned())
                .increment(batch.len() as u64);
            Ok(())
        }
        .boxed()
    }

    fn deliver_to<'a>(
        &'a self,
        group: &'a str,
        _topic: &'a str,
        batch: &'a [Envelope],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        // The default exchange routes by queue name: straight to the group's partition.
        let n = self.shared.options.partitions;
        let names = &self.shared.names;
        self.send(
            "",
            move |e| names.queue(group, partition::of(&e.subject, n)),
            batch,
        )
        .boxed()
    }

    fn declare<'a>(
        &'a self,
        group: &'a str,
        topics: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            let link = self.shared.current().await?;
            let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
            declare_group(&link, &self.shared, group, &topics)
                .await
                .map_err(unavailable)
        }
        .boxed()
    }

    fn subscribe<'a>(
        &'a self,
        group: &'a str,
        topics: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, BrokerError>> {
        async move {
            let link = self.shared.current().await?;
            let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
            declare_group(&link, &self.shared, group, &topics)
                .await
                .map_err(unavailable)?;
            let (tx, rx) = mpsc::unbounded_channel();
            let stop = self.shared.stop.child_token();
            let sub = Arc::new(SubState {
                declared_on: link.generation,
                group: group.to_owned(),
                topics,
                ready: tx,
                held: Mutex::new(Holding::default()),
                generation: AtomicU64::new(0),
                last_published: AtomicI64::new(0),
            });
            tokio::spawn(consume(self.shared.clone(), sub.clone(), stop.clone()));
            Ok(Box::new(RabbitSubscription {
                sub,
                shared: self.shared.clone(),
                rx: tokio::sync::Mutex::new(rx),
                _stop: stop.drop_guard(),
                _broker: self._guard.clone(),
            }) as Box<dyn Subscription>)
        }
        .boxed()
    }
}

async fn declare_group(
    link: &Link,
    shared: &Shared,
    group: &str,
    topics: &[String],
) -> Result<(), lapin::Error> {
    let ch = link.conn.create_channel().await?;
    let mut args = queue_args(&shared.options);
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(shared.names.dead_letter.as_str().into()),
    );
    if !shared.options.classic_queues {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(DELIVERY_LIMIT),
        );
    }
    for p in 0..shared.options.partitions {
        let q = shared.names.queue(group, p);
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::durable(),
            args.clone(),
        )
        .await?;
        for t in topics {
            ch.queue_bind(
                q.as_str().into(),
                shared.names.exchange.as_str().into(),
                routing_key(t, p).as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
    }
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// A delivery the consumer has not settled yet.
struct Held {
    channel: Channel,
    tag: u64,
    generation: u64,
    partition: u16,
    /// The message's subject: its ordering key.
    key: String,
    /// Handed to the consumer (otherwise waiting behind an earlier message of its key).
    offered: bool,
    delivery: Delivery,
}

/// What a subscription holds: every unacknowledged delivery; per key, whether one of its
/// messages is in the consumer's hands and which wait behind it; and the partitions being
/// handed to another instance.
#[derive(Default)]
struct Holding {
    held: HashMap<i64, Held>,
    busy: HashSet<(u16, String)>,
    waiting: HashMap<(u16, String), VecDeque<i64>>,
    /// Partitions being let go: nothing more of theirs is offered, and their channel closes
    /// once the consumer has settled what it has of them.
    draining: HashSet<u16>,
}

impl Holding {
    /// Takes delivery `tag` in: `Some(true)` when it may be handed to the consumer now (no
    /// message of its key is in progress), `Some(false)` when it waits, `None` when its
    /// partition is draining (the delivery is not kept: RabbitMQ has it back when the
    /// partition's channel closes).
    fn admit(&mut self, tag: i64, mut h: Held) -> Option<bool> {
        if self.draining.contains(&h.partition) {
            return None;
        }
        let gate = (h.partition, h.key.clone());
        let free = self.busy.insert(gate.clone());
        h.offered = free;
        self.held.insert(tag, h);
        if !free {
            self.waiting.entry(gate).or_default().push_back(tag);
        }
        Some(free)
    }

    /// Settles `tag`; returns the next delivery of its key, now offered, if one waits (and
    /// its partition is not draining).
    fn settle(&mut self, tag: i64) -> Option<(Held, Option<Delivery>)> {
        let h = self.held.remove(&tag)?;
        let gate = (h.partition, h.key.clone());
        if !h.offered {
            if let Some(q) = self.waiting.get_mut(&gate) {
                q.retain(|t| *t != tag);
            }
            return Some((h, None));
        }
        let mut next = None;
        if !self.draining.contains(&gate.0)
            && let Some(q) = self.waiting.get_mut(&gate)
        {
            while let Some(t) = q.pop_front() {
                if let Some(w) = self.held.get_mut(&t) {
                    w.offered = true;
                    next = Some(w.delivery.clone());
                    break;
                }
            }
            if q.is_empty() {
                self.waiting.remove(&gate);
            }
        }
        if next.is_none() {
            self.busy.remove(&gate);
        }
        Some((h, next))
    }

    /// Partitions being let go whose offered deliveries are all settled.
    fn drained(&self) -> Vec<u16> {
        self.draining
            .iter()
            .copied()
            .filter(|p| !self.held.values().any(|h| h.partition == *p && h.offered))
            .collect()
    }

    /// Drops all that is held of partition `p`: its channel closes and RabbitMQ takes it
    /// back, in order.
    fn release(&mut self, p: u16) {
        self.held.retain(|_, h| h.partition != p);
        self.busy.retain(|g| g.0 != p);
        self.waiting.retain(|g, _| g.0 != p);
        self.draining.remove(&p);
    }

    /// Forgets what came on connection `generation` (RabbitMQ gives it again).
    fn forget(&mut self, generation: u64) {
        self.held.retain(|_, h| h.generation != generation);
        self.busy = self
            .held
            .values()
            .filter(|h| h.offered)
            .map(|h| (h.partition, h.key.clone()))
            .collect();
        let held = &self.held;
        self.waiting.retain(|_, q| {
            q.retain(|t| held.contains_key(t));
            !q.is_empty()
        });
        self.draining.clear();
    }
}

struct SubState {
    /// The connection generation the queues were declared on at subscription.
    declared_on: u64,
    group: String,
    topics: Vec<String>,
    /// Unbounded: what is in it is bounded by what is held (partitions × prefetch per
    /// connection), and the consume loop must never wait on it.
    ready: mpsc::UnboundedSender<Delivery>,
    held: Mutex<Holding>,
    /// The connection generation the consume loop is on; deliveries of an older one are
    /// gone (RabbitMQ gives them again on the new connection).
    generation: AtomicU64,
    last_published: AtomicI64,
}

impl SubState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Holding> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The consume loop: (re)connects, announces the instance, takes its share of the
/// partitions and forwards deliveries, until the subscription is dropped.
async fn consume(shared: Arc<Shared>, sub: Arc<SubState>, stop: CancellationToken) {
    let instance = uuid::Uuid::new_v4().simple().to_string();
    let mut backoff = Duration::from_millis(100);
    let mut rx = shared.link.subscribe();
    while !stop.is_cancelled() {
        let link = tokio::select! {
            _ = stop.cancelled() => return,
            l = rx.wait_for(|l| l.is_some()) => match l {
                Ok(l) => l.clone().expect("waited for Some"),
                Err(_) => return,
            },
        };
        sub.generation.store(link.generation, Ordering::SeqCst);
        match consume_on(&shared, &sub, &link, &instance, &stop).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(group = %sub.group, error = %e, "RabbitMQ consumer stopped; restarting");
                // Whatever was unacknowledged on that channel comes again.
                sub.lock().forget(link.generation);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A partition's deliveries, tagged with the partition and which acquisition of it.
type Tagged =
    futures::stream::BoxStream<'static, (u16, u64, lapin::Result<lapin::message::Delivery>)>;

async fn consume_on(
    shared: &Shared,
    sub: &SubState,
    link: &Link,
    instance: &str,
    stop: &CancellationToken,
) -> Result<(), BrokerError> {
    let partitions = shared.options.partitions;
    if link.generation != sub.declared_on {
        // A new connection: the broker may have restarted without them (declared at
        // subscription otherwise).
        declare_group(link, shared, &sub.group, &sub.topics)
            .await
            .map_err(unavailable)?;
    }
    // The control channel: membership. Each partition gets a channel of its own, so that
    // letting a partition go is closing its channel: RabbitMQ then takes back what the
    // channel held, in order, before the partition's next consumer starts.
    let ch = link.conn.create_channel().await.map_err(unavailable)?;
    // Membership: this instance's heartbeats and its view of the others'.
    let members_q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions::exclusive().auto_delete(),
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    ch.queue_bind(
        members_q.name().clone(),
        shared.names.members.as_str().into(),
        sub.group.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(unavailable)?;
    let mut heartbeats = ch
        .basic_consume(
            members_q.name().clone(),
            format!("{instance}.members").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    sub.lock().draining.clear();
    let mut members: HashMap<String, Instant> = HashMap::new();
    // Partition → (which acquisition of it, its channel).
    let mut owned: HashMap<u16, (u64, Channel)> = HashMap::new();
    let mut acquisitions: u64 = 0;
    let mut streams: SelectAll<Tagged> = SelectAll::new();
    let mut tick = tokio::time::interval(HEARTBEAT);
    let mut first = true;
    let result = loop {
        tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            hb = heartbeats.next() => match hb {
                Some(Ok(d)) => {
                    if let Ok(id) = String::from_utf8(d.data) {
                        members.insert(id, Instant::now());
                    }
                }
                Some(Err(e)) => break Err(unavailable(e)),
                None => break Err(unavailable("membership consumer cancelled")),
            },
            Some((p, acquisition, d)) = streams.next(), if !streams.is_empty() => {
                // A delivery of a channel since closed: RabbitMQ has it back.
                let Some((current, pch)) = owned.get(&p) else { continue };
                if *current != acquisition {
                    continue;
                }
                match d {
                    Ok(d) => forward(shared, sub, pch, link.generation, p, d),
                    Err(e) => break Err(unavailable(e)),
                }
            }
            _ = tick.tick() => {
                if !link.conn.status().connected() {
                    break Err(unavailable("connection lost"));
                }
                if let Err(e) = ch.basic_publish(
                    shared.names.members.as_str().into(),
                    sub.group.as_str().into(),
                    BasicPublishOptions::default(),
                    instance.as_bytes(),
                    BasicProperties::default(),
                ).await {
                    break Err(unavailable(e));
                }
                members.insert(instance.to_owned(), Instant::now());
                members.retain(|_, seen| seen.elapsed() < MEMBER_TIMEOUT);
                if first {
                    // Give the others' heartbeats a moment before taking partitions.
                    first = false;
                    continue;
                }
                let mut ids: Vec<&String> = members.keys().collect();
                ids.sort();
                let rank = ids.iter().position(|m| m.as_str() == instance).unwrap_or(0);
                let n = ids.len().max(1);
                let mut failed = None;
                for p in 0..partitions {
                    let mine = usize::from(p) % n == rank;
                    if mine && !owned.contains_key(&p) {
                        acquisitions += 1;
                        match acquire(link, shared, sub, p, instance).await {
                            Ok((pch, stream)) => {
                                let a = acquisitions;
                                owned.insert(p, (a, pch));
                                streams.push(stream.map(move |d| (p, a, d)).boxed());
                            }
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    } else if !mine && owned.contains_key(&p) {
                        // Let it go: nothing more of it is offered; the channel closes once
                        // the consumer has settled what it has.
                        sub.lock().draining.insert(p);
                    }
                }
                if let Some(e) = failed {
                    break Err(e);
                }
                let drained = sub.lock().drained();
                for p in drained {
                    if let Some((_, pch)) = owned.remove(&p) {
                        sub.lock().release(p);
                        let _ = pch.close(200, "partition handed over".into()).await;
                    }
                }
            }
        }
    };
    for (_, (_, pch)) in owned {
        let _ = pch.close(200, "unsubscribed".into()).await;
    }
    let _ = ch.close(200, "unsubscribed".into()).await;
    result
}

/// Opens partition `p`'s channel and consumes its queue, up to `prefetch` unacknowledged.
async fn acquire(
    link: &Link,
    shared: &Shared,
    sub: &SubState,
    p: u16,
    instance: &str,
) -> Result<(Channel, lapin::Consumer), BrokerError> {
    let pch = link.conn.create_channel().await.map_err(unavailable)?;
    pch.basic_qos(shared.options.prefetch, BasicQosOptions::default())
        .await
        .map_err(unavailable)?;
    let consumer = pch
        .basic_consume(
            shared.names.queue(&sub.group, p).as_str().into(),
            format!("{instance}.{p}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    Ok((pch, consumer))
}

fn forward(
    shared: &Shared,
    sub: &SubState,
    ch: &Channel,
    generation: u64,
    p: u16,
    d: lapin::message::Delivery,
) {
    let headers = d.properties.headers().as_ref();
    let int = |name: &str| {
        headers
            .and_then(|h| h.inner().get(name))
            .and_then(|v| match v {
                AMQPValue::LongLongInt(n) => Some(*n),
                AMQPValue::LongInt(n) => Some(i64::from(*n)),
                AMQPValue::LongUInt(n) => Some(i64::from(*n)),
                AMQPValue::ShortInt(n) => Some(i64::from(*n)),
                AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
                _ => None,
            })
    };
    let previous = int("x-delivery-count").unwrap_or(if d.redelivered { 1 } else { 0 });
    if let Some(ms) = int(PUBLISHED_MS) {
        sub.last_published.store(ms, Ordering::Relaxed);
    }
    let payload = String::from_utf8_lossy(&d.data).into_owned();
    // The subject travels in a header; a message without it (published by an earlier
    // version) is read for it. One that cannot be read is poison: key "" (the consumer
    // dead-letters it).
    let key = headers
        .and_then(|h| h.inner().get(SUBJECT))
        .and_then(|v| match v {
            AMQPValue::LongString(s) => Some(s.to_string()),
            _ => None,
        })
        .or_else(|| crate::Envelope::from_json(&payload).ok().map(|e| e.subject))
        .unwrap_or_default();
    let suffix = format!(".{p}");
    let topic = d
        .routing_key
        .as_str()
        .strip_suffix(&suffix)
        .unwrap_or(d.routing_key.as_str())
        .to_owned();
    let delivery = Delivery {
        tag: shared.next_tag.fetch_add(1, Ordering::Relaxed),
        topic,
        payload,
        attempt: u32::try_from(previous.max(0) + 1).unwrap_or(u32::MAX),
    };
    let now = sub.lock().admit(
        delivery.tag,
        Held {
            channel: ch.clone(),
            tag: d.delivery_tag,
            generation,
            partition: p,
            key,
            offered: false,
            delivery: delivery.clone(),
        },
    );
    if now == Some(true) {
        let _ = sub.ready.send(delivery);
    }
}

struct RabbitSubscription {
    sub: Arc<SubState>,
    shared: Arc<Shared>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Delivery>>,
    _stop: DropGuard,
    _broker: Arc<DropGuard>,
}

impl Subscription for RabbitSubscription {
    fn next(
        &self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, BrokerError>> {
        async move {
            let ds = crate::broker::take_ready(&mut *self.rx.lock().await, max, wait).await;
            // Deliveries of a lost connection, or of a partition let go, are RabbitMQ's again.
            let held = self.sub.lock();
            Ok(ds
                .into_iter()
                .filter(|d| held.held.contains_key(&d.tag))
                .collect())
        }
        .boxed()
    }

    fn ack<'a>(&'a self, ds: &'a [Delivery]) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            let (settled, next): (Vec<Held>, Vec<Option<Delivery>>) = {
                let mut held = self.sub.lock();
                ds.iter().filter_map(|d| held.settle(d.tag)).unzip()
            };
            let current = self.sub.generation.load(Ordering::SeqCst);
            // An ack on a lost channel cannot be sent; the message comes again and the
            // consumer's inbox recognizes it.
            let acks = settled
                .iter()
                .filter(|h| h.generation == current)
                .map(|h| h.channel.basic_ack(h.tag, BasicAckOptions::default()));
            let acked = futures::future::join_all(acks).await;
            // The next message of each settled key is the consumer's now.
            for d in next.into_iter().flatten() {
                let _ = self.sub.ready.send(d);
            }
            for a in acked {
                a.map_err(unavailable)?;
            }
            Ok(())
        }
        .boxed()
    }

    fn nack<'a>(
        &'a self,
        d: &'a Delivery,
        delay: Duration,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        // The message stays unacknowledged (its key's later messages wait behind it) and is offered
        // again after the delay.
        let sub = self.sub.clone();
        let tag = d.tag;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let again = {
                let mut held = sub.lock();
                let current = sub.generation.load(Ordering::SeqCst);
                match held.held.get_mut(&tag) {
                    Some(h) if h.generation == current => {
                        h.delivery.attempt += 1;
                        Some(h.delivery.clone())
                    }
                    _ => None,
                }
            };
            if let Some(d) = again {
                let _ = sub.ready.send(d);
            }
        });
        async { Ok(()) }.boxed()
    }

    fn backlog(&self) -> BoxFuture<'_, Result<Backlog, BrokerError>> {
        async move {
            let link = self.shared.current().await?;
            let ch = link.conn.create_channel().await.map_err(unavailable)?;
            let mut ready = 0u64;
            for p in 0..self.shared.options.partitions {
                let q = ch
                    .queue_declare(
                        self.shared.names.queue(&self.sub.group, p).as_str().into(),
                        QueueDeclareOptions::default().passive(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(unavailable)?;
                ready += u64::from(q.message_count());
            }
            let _ = ch.close(200, "backlog".into()).await;
            let messages = ready + self.sub.lock().held.len() as u64;
            Ok(Backlog::since_last_published(
                messages,
                self.sub.last_published.load(Ordering::Relaxed),
            ))
        }
        .boxed()
    }
}
