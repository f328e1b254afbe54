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
//! from the heartbeats); RabbitMQ's single-active-consumer rule keeps the order safe while
//! the split changes hands. A partition is handed over only when it has no unacknowledged
//! message.
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
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
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

async fn open_link(
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
    let mut quorum = FieldTable::default();
    let kind = if options.classic_queues {
        "classic"
    } else {
        "quorum"
    };
    quorum.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
    if let Some(e) = options.expires {
        let ms = i64::try_from(e.as_millis()).unwrap_or(i64::MAX);
        quorum.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
    }
    ch.queue_declare(
        names.dead_letter.as_str().into(),
        QueueDeclareOptions::durable(),
        quorum,
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
        let link = open_link(&options, &names, 1).await.map_err(unavailable)?;
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
            match c.await.map_err(unavailable)? {
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
            // Room for every partition's whole prefetch, and as much again for retries.
            let (tx, rx) = mpsc::channel(
                usize::from(self.shared.options.partitions)
                    * usize::from(self.shared.options.prefetch)
                    * 2,
            );
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
    for p in 0..shared.options.partitions {
        let mut args = FieldTable::default();
        let kind = if shared.options.classic_queues {
            "classic"
        } else {
            "quorum"
        };
        args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
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
        if let Some(e) = shared.options.expires {
            let ms = i64::try_from(e.as_millis()).unwrap_or(i64::MAX);
            args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
        }
        let q = shared.names.queue(group, p);
        ch.queue_declare(q.as_str().into(), QueueDeclareOptions::durable(), args)
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
    /// The message's subject (its ordering key); `None` for a message published without
    /// it, which is ordered against its whole partition.
    key: Option<String>,
    /// Handed to the consumer (otherwise waiting behind an earlier message of its key).
    offered: bool,
    delivery: Delivery,
}

/// What a subscription holds: every unacknowledged delivery, and per key the ones waiting
/// behind the key's message in progress.
#[derive(Default)]
struct Holding {
    held: HashMap<i64, Held>,
    waiting: HashMap<(u16, Option<String>), VecDeque<i64>>,
}

impl Holding {
    /// Takes delivery `tag` in; true when it may be handed to the consumer now (no earlier
    /// message of its key is in progress).
    fn admit(&mut self, tag: i64, h: Held) -> bool {
        let gate = (h.partition, h.key.clone());
        let busy = self
            .held
            .values()
            .any(|o| o.offered && o.partition == gate.0 && o.key == gate.1);
        let mut h = h;
        h.offered = !busy;
        self.held.insert(tag, h);
        if busy {
            self.waiting.entry(gate).or_default().push_back(tag);
        }
        !busy
    }

    /// Settles `tag`; returns the next delivery of its key, now offered, if one waits.
    fn settle(&mut self, tag: i64) -> Option<(Held, Option<Delivery>)> {
        let h = self.held.remove(&tag)?;
        let gate = (h.partition, h.key.clone());
        let mut next = None;
        if let Some(q) = self.waiting.get_mut(&gate) {
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
        Some((h, next))
    }

    /// Forgets what came on connection `generation` (RabbitMQ gives it again).
    fn forget(&mut self, generation: u64) {
        self.held.retain(|_, h| h.generation != generation);
        let held = &self.held;
        self.waiting.retain(|_, q| {
            q.retain(|t| held.contains_key(t));
            !q.is_empty()
        });
    }
}

struct SubState {
    /// The connection generation the queues were declared on at subscription.
    declared_on: u64,
    group: String,
    topics: Vec<String>,
    ready: mpsc::Sender<Delivery>,
    held: Mutex<Holding>,
    /// The connection generation the consume loop is on; deliveries of an older one are
    /// gone (RabbitMQ gives them again on the new connection).
    generation: AtomicU64,
    last_published: AtomicI64,
}

impl SubState {
    fn busy_partitions(&self) -> HashSet<u16> {
        self.lock().held.values().map(|h| h.partition).collect()
    }

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

type Tagged = futures::stream::BoxStream<'static, (u16, lapin::Result<lapin::message::Delivery>)>;

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
    let ch = link.conn.create_channel().await.map_err(unavailable)?;
    // A few unacknowledged messages per partition consumer; per-key order is kept by
    // handing out one message per key at a time (`Holding`).
    ch.basic_qos(shared.options.prefetch, BasicQosOptions::default())
        .await
        .map_err(unavailable)?;
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
    let mut members: HashMap<String, Instant> = HashMap::new();
    let mut owned: HashMap<u16, String> = HashMap::new();
    let mut releasing: HashSet<u16> = HashSet::new();
    let mut streams: SelectAll<Tagged> = SelectAll::new();
    let mut tick = tokio::time::interval(HEARTBEAT);
    let mut first = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = ch.close(200, "unsubscribed".into()).await;
                return Ok(());
            }
            hb = heartbeats.next() => match hb {
                Some(Ok(d)) => {
                    if let Ok(id) = String::from_utf8(d.data) {
                        members.insert(id, Instant::now());
                    }
                }
                Some(Err(e)) => return Err(unavailable(e)),
                None => return Err(unavailable("membership consumer cancelled")),
            },
            Some((p, d)) = streams.next(), if !streams.is_empty() => {
                let d = d.map_err(unavailable)?;
                if releasing.contains(&p) {
                    // Arrived after this instance let the partition go: back to the queue
                    // for its new owner.
                    ch.basic_reject(d.delivery_tag, BasicRejectOptions { requeue: true }).await.map_err(unavailable)?;
                    continue;
                }
                forward(shared, sub, &ch, link.generation, p, d).await;
            }
            _ = tick.tick() => {
                if !link.conn.status().connected() {
                    return Err(unavailable("connection lost"));
                }
                ch.basic_publish(
                    shared.names.members.as_str().into(),
                    sub.group.as_str().into(),
                    BasicPublishOptions::default(),
                    instance.as_bytes(),
                    BasicProperties::default(),
                ).await.map_err(unavailable)?;
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
                let busy = sub.busy_partitions();
                for p in 0..partitions {
                    let mine = usize::from(p) % n == rank;
                    match (mine, owned.contains_key(&p)) {
                        (true, false) => {
                            let tag = format!("{instance}.{p}");
                            let c = ch.basic_consume(
                                shared.names.queue(&sub.group, p).as_str().into(),
                                tag.as_str().into(),
                                BasicConsumeOptions::default(),
                                FieldTable::default(),
                            ).await.map_err(unavailable)?;
                            releasing.remove(&p);
                            owned.insert(p, tag);
                            streams.push(c.map(move |d| (p, d)).boxed());
                        }
                        (false, true) if !busy.contains(&p) => {
                            if let Some(tag) = owned.remove(&p) {
                                releasing.insert(p);
                                ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await.map_err(unavailable)?;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

async fn forward(
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
    let key = headers
        .and_then(|h| h.inner().get(SUBJECT))
        .and_then(|v| match v {
            AMQPValue::LongString(s) => Some(s.to_string()),
            _ => None,
        });
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
        payload: String::from_utf8_lossy(&d.data).into_owned(),
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
    // Bounded by the prefetch: the channel holds every partition's whole prefetch.
    if now {
        let _ = sub.ready.send(delivery).await;
    }
}

struct RabbitSubscription {
    sub: Arc<SubState>,
    shared: Arc<Shared>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Delivery>>,
    _stop: DropGuard,
    _broker: Arc<DropGuard>,
}

impl Subscription for RabbitSubscription {
    fn next(
        &self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, BrokerError>> {
        async move { Ok(crate::broker::take_ready(&mut *self.rx.lock().await, max, wait).await) }
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
                let _ = self.sub.ready.send(d).await;
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
        // The message stays unacknowledged (its partition waits behind it) and is offered
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
                let _ = sub.ready.send(d).await;
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
