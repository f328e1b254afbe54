//! Kafka adapter (through `rdkafka`, the bundled librdkafka). Tested on Tansu, a Kafka-wire
//! broker; nothing in it is Tansu-specific.
//!
//! Topology, created by shopmesh (idempotently, through the admin API, since Tansu has no
//! automatic topic creation worth relying on) under its namespace `{ns}` (`shopmesh` unless
//! the URL says `?namespace=…`):
//!
//! | object | what for |
//! |---|---|
//! | topic `{ns}.{topic}`, `partitions` partitions | every publish to `topic`; the record's key is the message's subject, its partition [`crate::partition::of`] the subject (the same in every process and adapter) |
//! | topic `{ns}._replay.{group}`, same partitions | dead-letter replay to one subscription only ([`Broker::deliver_to`]) |
//! | consumer group `{ns}.{group}` | one per subscription; its instances (competing consumers) share the partitions through the group protocol (eager `roundrobin` assignment) |
//! | consumer group `{ns}.{group}._fetched` | no members; its offsets record how far `{ns}.{group}` fetched (delivery counts) |
//!
//! Ordering: a key's records are in one partition of a topic, in publish order. Of what an
//! instance has fetched, the adapter hands the consumer one message per key at a time, in
//! partition order (the others of that key wait in the adapter, like the RabbitMQ adapter's
//! prefetch), so one key's messages are handled in order while the partition's other keys
//! proceed.
//!
//! Offsets: committed only for messages the consumer has settled (acked after its
//! transaction committed). Messages of a partition settle out of order (different keys), so
//! the committed offset of a partition is its oldest unsettled message (or the next one to
//! fetch): a crash or a rebalance means redelivery from there, which the inbox absorbs.
//! What an instance fetched but had not handed to the consumer when a rebalance takes its
//! partitions goes back to Kafka: the commit stops at the oldest such message, so the next
//! owner fetches it (with any later one already settled: at least once).
//! Commits are asynchronous, batched every [`COMMIT_EVERY`], and synchronous when partitions
//! are given up. Before giving partitions up in a rebalance, an instance waits (up to
//! [`DRAIN_WAIT`]) until the consumer has settled what it holds of them, so the next owner
//! does not hand a key's message out while the previous one still works on the one before.
//!
//! Delivery counts: Kafka has none, and Tansu drops a commit's metadata. So each group has
//! a second, member-less group `{ns}.{group}._fetched` whose committed offsets say how far the
//! group had fetched each partition: a message fetched before a crash or a rebalance says
//! `attempt >= 2` when it comes again. (A message that crashes its consumer process every time
//! therefore comes again with attempt 2 after every restart: there is no broker-side delivery
//! limit as on RabbitMQ and NATS; handler failures are counted and dead-lettered by the
//! consumer as everywhere.)
//!
//! Retries: a retry delay keeps the message in the adapter (its key's later messages wait
//! behind it, the partition's other keys do not) and offers it again after the delay; the
//! partition's committed offset stays at it meanwhile. No retry topic: it would reorder a
//! key's messages (the retried one behind its successors) unless every later message of the
//! key were diverted too.
//!
//! Backpressure: at most `prefetch` (32 by default) unsettled messages per partition; a
//! partition that has that many is paused until it has fewer. librdkafka's own fetch queue is
//! bounded too (`queued.max.messages.kbytes`).
//!
//! Reconnection: librdkafka reconnects by itself; publishes fail meanwhile (the outbox keeps
//! the events); the consumer rejoins its group and resumes from the committed offsets.
//! Topics that went missing (a broker that lost its storage) are created again.
//!
//! Records: the value is the CloudEvents JSON (structured mode,
//! `content-type: application/cloudevents+json`); the headers also carry the CloudEvents
//! attributes (`ce_id`, `ce_source`, `ce_type`, `ce_subject`, `ce_time`, `ce_specversion`)
//! and the W3C `traceparent`, so tools can route and trace without parsing the value.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::broker::{Backlog, Broker, BrokerError, Delivery, Subscription};
use crate::{Envelope, partition};

/// How often settled offsets are committed.
pub const COMMIT_EVERY: Duration = Duration::from_millis(100);
/// How often partitions are paused or resumed for backpressure.
const FLOW_EVERY: Duration = Duration::from_millis(10);
/// How long a subscription dropped before its group gave it partitions waits for them, so
/// that it leaves the group as a member rather than in the middle of joining.
const JOIN_WAIT: Duration = Duration::from_secs(15);
/// How long an instance giving partitions up waits for the consumer to settle what it has.
pub const DRAIN_WAIT: Duration = Duration::from_secs(20);
const TIMEOUT: Duration = Duration::from_secs(5);
const PUBLISHED_MS: &str = "x-published-ms";
/// Header naming the topic a replayed message was published to.
const ORIGINAL_TOPIC: &str = "x-topic";

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

fn set_connected(up: bool) {
    metrics::gauge!("messaging_broker_connected", "broker" => "kafka").set(f64::from(u8::from(up)));
}

/// The names of what shopmesh creates, under its namespace (`shopmesh` by default).
#[derive(Debug, Clone)]
pub struct Names {
    namespace: String,
}

impl Names {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
        }
    }
    /// The Kafka topic of shopmesh topic `topic`.
    pub fn topic(&self, topic: &str) -> String {
        format!("{}.{topic}", self.namespace)
    }
    /// The topic that replays reach `group` only through.
    pub fn replay(&self, group: &str) -> String {
        format!("{}._replay.{group}", self.namespace)
    }
    /// The consumer group of subscription `group`.
    pub fn group(&self, group: &str) -> String {
        format!("{}.{group}", self.namespace)
    }
    /// The member-less group recording how far `group` fetched.
    pub fn fetched(&self, group: &str) -> String {
        format!("{}.{group}._fetched", self.namespace)
    }
}

/// librdkafka's logs and errors into `tracing`; errors also say whether the broker is there.
struct Ctx;

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                tracing::debug!(target: "librdkafka", fac, "{message}")
            }
            _ => tracing::trace!(target: "librdkafka", fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            set_connected(false);
            tracing::warn!(%error, reason, "Kafka unreachable; librdkafka reconnects");
        } else {
            tracing::debug!(%error, reason, "librdkafka");
        }
    }
}

struct Shared {
    options: crate::BrokerOptions,
    names: Names,
    /// A plain client's configuration (metadata, admin).
    config: ClientConfig,
    /// `bootstrap.servers` and the URL's own librdkafka settings.
    settings: Vec<(String, String)>,
    producer: FutureProducer<Ctx>,
    admin: AdminClient<DefaultClientContext>,
    /// Topics known to exist with the right number of partitions.
    created: Mutex<HashSet<String>>,
    next_tag: AtomicI64,
}

/// A Kafka broker. Cheap to clone.
#[derive(Clone)]
pub struct KafkaBroker {
    shared: Arc<Shared>,
}

/// `kafka://host:port[,host:port…]` with shopmesh's settings in the query; any other
/// `name=value` of the query is a librdkafka setting (`?linger.ms=5`), which wins over
/// shopmesh's own choice for that setting.
fn settings(options: &crate::BrokerOptions) -> Result<Vec<(String, String)>, BrokerError> {
    let rest = options
        .url
        .strip_prefix("kafka://")
        .ok_or_else(|| unavailable("a Kafka URL starts with kafka://"))?;
    let (servers, query) = rest.split_once('?').unwrap_or((rest, ""));
    let servers = servers.trim_end_matches('/');
    if servers.is_empty() {
        return Err(unavailable(
            "a Kafka URL names its brokers: kafka://host:port",
        ));
    }
    let mut out = vec![("bootstrap.servers".to_owned(), servers.to_owned())];
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| unavailable(format!("broker URL: `{pair}` is not name=value")))?;
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

/// A client's configuration: shopmesh's `defaults`, then the URL's settings.
fn client_config(user: &[(String, String)], defaults: &[(&str, &str)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("client.id", "shopmesh")
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "2000")
        .set("socket.keepalive.enable", "true")
        .set_log_level(RDKafkaLogLevel::Warning);
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    for (k, v) in user {
        c.set(k, v);
    }
    c
}

impl KafkaBroker {
    /// Connects to `url` (`kafka://host:port`, with shopmesh's [`crate::BrokerOptions`] in the
    /// query if wanted). Fails at once if no broker answers; after that librdkafka reconnects
    /// by itself.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let options = crate::BrokerOptions::parse(url)?;
        let settings = settings(&options)?;
        let producer: FutureProducer<Ctx> = client_config(
            &settings,
            &[
                // No idempotent producer: on Tansu it costs about 50 ms per produce request.
                // One request in flight per connection keeps a partition's order across
                // retries instead, and a retry's duplicate is absorbed by the inbox.
                ("enable.idempotence", "false"),
                ("max.in.flight.requests.per.connection", "1"),
                ("acks", "all"),
                ("linger.ms", "1"),
                ("message.timeout.ms", "10000"),
                ("request.timeout.ms", "5000"),
            ],
        )
        .create_with_context(Ctx)
        .map_err(unavailable)?;
        let config = client_config(&settings, &[]);
        let admin: AdminClient<DefaultClientContext> =
            config.clone().create().map_err(unavailable)?;
        // Fail now rather than at the first publish if nothing answers.
        let probe = config.clone();
        tokio::task::spawn_blocking(move || -> Result<(), BrokerError> {
            let c: BaseConsumer = probe.create().map_err(unavailable)?;
            c.fetch_metadata(None, TIMEOUT).map_err(unavailable)?;
            Ok(())
        })
        .await
        .map_err(unavailable)?
        .map_err(|e| unavailable(format!("Kafka at {}: {e}", options.url)))?;
        set_connected(true);
        Ok(Self {
            shared: Arc::new(Shared {
                names: Names::new(&options.namespace),
                options,
                config,
                settings,
                producer,
                admin,
                created: Mutex::new(HashSet::new()),
                next_tag: AtomicI64::new(1),
            }),
        })
    }

    pub fn partitions(&self) -> u16 {
        self.shared.options.partitions
    }
}

impl Shared {
    /// Creates the topics that are not known to exist yet, with shopmesh's partition count,
    /// and checks that those that existed have it.
    async fn ensure(&self, topics: &[String]) -> Result<(), BrokerError> {
        let missing: Vec<String> = {
            let created = self.created.lock().unwrap_or_else(|p| p.into_inner());
            topics
                .iter()
                .filter(|t| !created.contains(*t))
                .cloned()
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let n = i32::from(self.options.partitions);
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| NewTopic::new(t, n, TopicReplication::Fixed(1)))
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT));
        let results = self
            .admin
            .create_topics(&new, &opts)
            .await
            .map_err(unavailable)?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, e)) => return Err(unavailable(format!("creating topic {t}: {e}"))),
            }
        }
        // Each topic must have the partitions the subjects are hashed over (none can be
        // added on Tansu: CreatePartitions is not there).
        let client = self.config.clone();
        let check = missing.clone();
        tokio::task::spawn_blocking(move || -> Result<(), BrokerError> {
            let c: BaseConsumer = client.create().map_err(unavailable)?;
            for t in &check {
                let deadline = Instant::now() + TIMEOUT;
                loop {
                    let md = c.fetch_metadata(Some(t), TIMEOUT).map_err(unavailable)?;
                    let got = md
                        .topics()
                        .first()
                        .filter(|mt| mt.error().is_none())
                        .map(|mt| mt.partitions().len())
                        .unwrap_or(0);
                    if got == n as usize {
                        break;
                    }
                    if got > 0 || Instant::now() > deadline {
                        return Err(unavailable(format!(
                            "topic {t} has {got} partitions, shopmesh expects {n} \
                             (the URL's partitions=, the same for every process)"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Ok(())
        })
        .await
        .map_err(unavailable)??;
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(missing);
        Ok(())
    }

    fn forget(&self, topic: &str) {
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(topic);
    }

    /// Publishes `batch` to Kafka topic `topic`; returns once every record is acknowledged
    /// (`acks=all`).
    async fn send(
        &self,
        topic: &str,
        original_topic: Option<&str>,
        batch: &[Envelope],
    ) -> Result<(), BrokerError> {
        self.ensure(&[topic.to_owned()]).await?;
        let started = Instant::now();
        let n = self.options.partitions;
        let mut pending = Vec::with_capacity(batch.len());
        for env in batch {
            let payload = env.to_json();
            let published = shopmesh_platform::now_millis().to_string();
            let mut headers = OwnedHeaders::new_with_capacity(10)
                .insert(Header {
                    key: "content-type",
                    value: Some("application/cloudevents+json"),
                })
                .insert(Header {
                    key: "ce_specversion",
                    value: Some(env.specversion.as_str()),
                })
                .insert(Header {
                    key: "ce_id",
                    value: Some(env.id.as_str()),
                })
                .insert(Header {
                    key: "ce_source",
                    value: Some(env.source.as_str()),
                })
                .insert(Header {
                    key: "ce_type",
                    value: Some(env.kind.as_str()),
                })
                .insert(Header {
                    key: "ce_subject",
                    value: Some(env.subject.as_str()),
                })
                .insert(Header {
                    key: "ce_time",
                    value: Some(env.time.as_str()),
                })
                .insert(Header {
                    key: PUBLISHED_MS,
                    value: Some(published.as_str()),
                });
            if let Some(tp) = &env.traceparent {
                headers = headers.insert(Header {
                    key: "traceparent",
                    value: Some(tp.as_str()),
                });
            }
            if let Some(t) = original_topic {
                headers = headers.insert(Header {
                    key: ORIGINAL_TOPIC,
                    value: Some(t),
                });
            }
            let mut record = FutureRecord::to(topic)
                .partition(i32::from(partition::of(&env.subject, n)))
                .key(env.subject.as_str())
                .payload(payload.as_str())
                .headers(headers);
            // A full local queue (a burst while the broker is slow) waits a little.
            let deadline = Instant::now() + TIMEOUT;
            let future = loop {
                match self.producer.send_result(record) {
                    Ok(f) => break f,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                        if Instant::now() < deadline =>
                    {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(unavailable(e)),
                }
            };
            pending.push(future);
        }
        for f in pending {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition) {
                        // The broker lost it (a restart without storage): create it again.
                        self.forget(topic);
                    }
                    return Err(unavailable(e));
                }
                Err(_) => return Err(BrokerError::Closed),
            }
        }
        set_connected(true);
        metrics::histogram!("messaging_publish_confirm_seconds", "broker" => "kafka")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The Kafka topics of `group`'s subscription to `topics`: theirs and its replay topic.
    fn group_topics(&self, group: &str, topics: &[&str]) -> Vec<String> {
        let mut all: Vec<String> = topics.iter().map(|t| self.names.topic(t)).collect();
        all.push(self.names.replay(group));
        all
    }
}

impl Broker for KafkaBroker {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        batch: &'a [Envelope],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            self.shared
                .send(&self.shared.names.topic(topic), None, batch)
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
        topic: &'a str,
        batch: &'a [Envelope],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            self.shared
                .send(&self.shared.names.replay(group), Some(topic), batch)
                .await
        }
        .boxed()
    }

    fn declare<'a>(
        &'a self,
        group: &'a str,
        topics: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            let all = self.shared.group_topics(group, topics);
            self.shared.ensure(&all).await
        }
        .boxed()
    }

    fn subscribe<'a>(
        &'a self,
        group: &'a str,
        topics: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, BrokerError>> {
        async move {
            let all = self.shared.group_topics(group, topics);
            self.shared.ensure(&all).await?;
            let (tx, rx) = mpsc::unbounded_channel();
            let stop = CancellationToken::new();
            let sub = Arc::new(SubState {
                ready: tx,
                held: Mutex::new(Holding::default()),
                settled: Condvar::new(),
                stopping: AtomicBool::new(false),
                joined: AtomicBool::new(false),
                last_published: AtomicI64::new(0),
                prefetch: usize::from(self.shared.options.prefetch),
            });
            let group_id = self.shared.names.group(group);
            let tracker: Arc<BaseConsumer> = Arc::new(
                client_config(
                    &self.shared.settings,
                    &[
                        ("group.id", self.shared.names.fetched(group).as_str()),
                        ("enable.auto.commit", "false"),
                    ],
                )
                .create()
                .map_err(unavailable)?,
            );
            let consumer: BaseConsumer<SubCtx> = client_config(
                &self.shared.settings,
                &[
                    ("group.id", group_id.as_str()),
                    ("enable.auto.commit", "false"),
                    ("enable.auto.offset.store", "false"),
                    ("auto.offset.reset", "earliest"),
                    ("partition.assignment.strategy", "roundrobin"),
                    // Kafka's lowest allowed by default; Tansu answers a JoinGroup after half
                    // of it, so a rebalance takes about 3 s.
                    ("session.timeout.ms", "6000"),
                    ("heartbeat.interval.ms", "1000"),
                    ("fetch.wait.max.ms", "50"),
                    ("queued.min.messages", "1000"),
                    ("queued.max.messages.kbytes", "8192"),
                    ("topic.metadata.refresh.interval.ms", "10000"),
                ],
            )
            .create_with_context(SubCtx {
                sub: sub.clone(),
                tracker: tracker.clone(),
            })
            .map_err(unavailable)?;
            let names: Vec<&str> = all.iter().map(String::as_str).collect();
            consumer.subscribe(&names).map_err(unavailable)?;
            let poller = Poller {
                consumer,
                tracker,
                sub: sub.clone(),
                shared: self.shared.clone(),
                topics: all,
                replay: self.shared.names.replay(group),
                runtime: tokio::runtime::Handle::current(),
                stop: stop.clone(),
            };
            std::thread::Builder::new()
                .name(format!("kafka-{group}"))
                .spawn(move || poll_loop(poller))
                .map_err(unavailable)?;
            Ok(Box::new(KafkaSubscription {
                sub,
                rx: tokio::sync::Mutex::new(rx),
                _stop: stop.drop_guard(),
            }) as Box<dyn Subscription>)
        }
        .boxed()
    }
}

/// Where a held message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Behind an earlier message of its key.
    Waiting,
    /// In the ready channel, not yet taken by the consumer.
    Ready,
    /// In the consumer's hands.
    Taken,
    /// Retried: offered again after its delay.
    Delayed,
}

type Tp = (Arc<str>, i32);

/// A fetched message the consumer has not settled yet.
struct Held {
    tp: Tp,
    offset: i64,
    key: String,
    state: State,
    delivery: Delivery,
}

/// A partition assigned to this instance.
struct Part {
    /// Offsets fetched and not settled.
    outstanding: BTreeSet<i64>,
    /// The offset after the last one fetched (`None` before the first fetch, when the
    /// committed offset stands).
    next: Option<i64>,
    /// The committed offset found at assignment.
    start: Option<i64>,
    /// The furthest offset the group had fetched before this assignment.
    prior_seen: i64,
    /// The furthest offset fetched (this instance or before).
    seen: i64,
    /// What was last committed.
    committed: Option<i64>,
    /// What was last recorded as fetched.
    recorded: i64,
    /// The oldest message given back to Kafka unsettled (a revocation): the committed
    /// offset must not pass it, or nobody would ever handle it.
    returned: Option<i64>,
    paused: bool,
}

impl Default for Part {
    fn default() -> Self {
        Part {
            outstanding: BTreeSet::new(),
            next: None,
            start: None,
            prior_seen: -1,
            seen: -1,
            committed: None,
            recorded: -1,
            returned: None,
            paused: false,
        }
    }
}

impl Part {
    /// The offset to commit: the oldest message unsettled or given back, or the next to
    /// fetch.
    fn position(&self) -> Option<i64> {
        let oldest = match (self.outstanding.first().copied(), self.returned) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        oldest.or(self.next).or(self.start)
    }
}

#[derive(Default)]
struct Holding {
    held: HashMap<i64, Held>,
    /// Keys with a message offered (Ready, Taken or Delayed).
    busy: HashSet<String>,
    waiting: HashMap<String, VecDeque<i64>>,
    parts: HashMap<Tp, Part>,
}

impl Holding {
    /// Removes `tag`; returns it and the next message of its key, now offered, if one waits.
    fn remove(&mut self, tag: i64) -> Option<(Held, Option<Delivery>)> {
        let h = self.held.remove(&tag)?;
        if let Some(p) = self.parts.get_mut(&h.tp) {
            p.outstanding.remove(&h.offset);
        }
        if h.state == State::Waiting {
            if let Some(q) = self.waiting.get_mut(&h.key) {
                q.retain(|t| *t != tag);
                if q.is_empty() {
                    self.waiting.remove(&h.key);
                }
            }
            return Some((h, None));
        }
        let mut next = None;
        if let Some(q) = self.waiting.get_mut(&h.key) {
            while let Some(t) = q.pop_front() {
                if let Some(w) = self.held.get_mut(&t) {
                    w.state = State::Ready;
                    next = Some(w.delivery.clone());
                    break;
                }
            }
            if q.is_empty() {
                self.waiting.remove(&h.key);
            }
        }
        if next.is_none() {
            self.busy.remove(&h.key);
        }
        Some((h, next))
    }

    /// Gives `tag` back to Kafka unsettled (its partition is revoked): the partition's commit
    /// stops at it. Returns the next message of its key, now offered, if one waits (it may be
    /// of a partition that stays).
    fn give_back(&mut self, tag: i64) -> Option<Delivery> {
        let (h, next) = self.remove(tag)?;
        if let Some(p) = self.parts.get_mut(&h.tp) {
            p.returned = Some(p.returned.map_or(h.offset, |r| r.min(h.offset)));
        }
        next
    }

    /// Offsets to commit that changed since the last commit (all of them with `all`: an
    /// asynchronous commit may have failed unseen); with `only`, for those partitions alone.
    fn commits(&mut self, only: Option<&HashSet<Tp>>, all: bool) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (tp, part) in &mut self.parts {
            if only.is_some_and(|o| !o.contains(tp)) {
                continue;
            }
            let Some(pos) = part.position() else { continue };
            if part.committed == Some(pos) && !all {
                continue;
            }
            if tpl
                .add_partition_offset(&tp.0, tp.1, Offset::Offset(pos))
                .is_ok()
            {
                part.committed = Some(pos);
            }
        }
        tpl
    }

    /// How far each partition was fetched, for the `_fetched` group, where it changed (or
    /// wherever known, with `all`).
    fn fetched(&mut self, only: Option<&HashSet<Tp>>, all: bool) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (tp, part) in &mut self.parts {
            if only.is_some_and(|o| !o.contains(tp))
                || part.seen < 0
                || (part.seen <= part.recorded && !all)
            {
                continue;
            }
            if tpl
                .add_partition_offset(&tp.0, tp.1, Offset::Offset(part.seen + 1))
                .is_ok()
            {
                part.recorded = part.seen;
            }
        }
        tpl
    }
}

struct SubState {
    /// Unbounded: what is in it is bounded by what is held (`prefetch` per partition), and
    /// the poll thread must never wait on it.
    ready: mpsc::UnboundedSender<Delivery>,
    held: Mutex<Holding>,
    /// Signalled whenever a message is settled or put back (a rebalance waits on it).
    settled: Condvar,
    stopping: AtomicBool,
    /// The group gave this instance its partitions at least once.
    joined: AtomicBool,
    last_published: AtomicI64,
    prefetch: usize,
}

impl SubState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Holding> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The rebalance callbacks: they run on the poll thread, inside `poll`.
struct SubCtx {
    sub: Arc<SubState>,
    /// A member-less consumer of the `_fetched` group (it only commits and reads offsets).
    tracker: Arc<BaseConsumer>,
}

impl ClientContext for SubCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        Ctx.log(level, fac, message)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        Ctx.error(error, reason)
    }
}

impl ConsumerContext for SubCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let revoked: HashSet<Tp> = tpl
            .elements()
            .iter()
            .map(|e| (Arc::from(e.topic()), e.partition()))
            .collect();
        let mut held = self.sub.lock();
        // What the consumer has not taken goes back to Kafka (the next owner fetches it from
        // the committed offset).
        let giving_up: Vec<i64> = held
            .held
            .iter()
            .filter(|(_, h)| revoked.contains(&h.tp) && h.state != State::Taken)
            .map(|(t, _)| *t)
            .collect();
        for t in giving_up {
            if let Some(next) = held.give_back(t) {
                let _ = self.sub.ready.send(next);
            }
        }
        // What it has taken, it settles first (unless this instance is closing).
        let deadline = Instant::now() + DRAIN_WAIT;
        while !self.sub.stopping.load(Ordering::SeqCst) {
            let busy = held
                .held
                .values()
                .any(|h| revoked.contains(&h.tp) && h.state == State::Taken);
            let left = deadline.saturating_duration_since(Instant::now());
            if !busy || left.is_zero() {
                break;
            }
            held = self
                .sub
                .settled
                .wait_timeout(held, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            // Put back meanwhile (a retry delay): no longer the consumer's.
            let back: Vec<i64> = held
                .held
                .iter()
                .filter(|(_, h)| revoked.contains(&h.tp) && h.state != State::Taken)
                .map(|(t, _)| *t)
                .collect();
            for t in back {
                if let Some(next) = held.give_back(t) {
                    let _ = self.sub.ready.send(next);
                }
            }
        }
        // Whatever is still taken (the wait ran out) stays uncommitted: it comes again.
        let left: Vec<i64> = held
            .held
            .iter()
            .filter(|(_, h)| revoked.contains(&h.tp))
            .map(|(t, _)| *t)
            .collect();
        for t in left {
            if let Some(next) = held.give_back(t) {
                let _ = self.sub.ready.send(next);
            }
        }
        // Up to the oldest message given back: what the next owner fetches from.
        let commits = held.commits(Some(&revoked), true);
        let fetched = held.fetched(Some(&revoked), true);
        held.parts.retain(|tp, _| !revoked.contains(tp));
        drop(held);
        if commits.count() > 0
            && let Err(e) = consumer.commit(&commits, CommitMode::Sync)
        {
            tracing::warn!(error = %e, "Kafka commit on revocation failed; those messages come again");
        }
        if fetched.count() > 0 {
            let _ = self.tracker.commit(&fetched, CommitMode::Sync);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // Where each partition starts, and how far the group had fetched it.
                let committed = consumer.committed_offsets((*tpl).clone(), TIMEOUT);
                let fetched = self.tracker.committed_offsets((*tpl).clone(), TIMEOUT);
                let mut held = self.sub.lock();
                for e in tpl.elements() {
                    held.parts
                        .entry((Arc::from(e.topic()), e.partition()))
                        .or_default();
                }
                match committed {
                    Ok(c) => {
                        for e in c.elements() {
                            let part = held
                                .parts
                                .entry((Arc::from(e.topic()), e.partition()))
                                .or_default();
                            part.start = e.offset().to_raw().filter(|o| *o >= 0);
                            part.committed = part.start;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "Kafka committed offsets unavailable"),
                }
                match fetched {
                    Ok(c) => {
                        for e in c.elements() {
                            let part = held
                                .parts
                                .entry((Arc::from(e.topic()), e.partition()))
                                .or_default();
                            if let Some(o) = e.offset().to_raw().filter(|o| *o > 0) {
                                part.prior_seen = o - 1;
                                part.seen = o - 1;
                                part.recorded = o - 1;
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "Kafka fetched offsets unavailable"),
                }
                drop(held);
                // Assigned afresh: not paused, whatever an earlier assignment left.
                let _ = consumer.resume(tpl);
                self.sub.joined.store(true, Ordering::SeqCst);
                tracing::debug!(partitions = tpl.count(), "Kafka partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "Kafka rebalance failed"),
        }
    }
}

/// What a subscription's poll thread works with.
struct Poller {
    consumer: BaseConsumer<SubCtx>,
    tracker: Arc<BaseConsumer>,
    sub: Arc<SubState>,
    shared: Arc<Shared>,
    /// The subscription's Kafka topics.
    topics: Vec<String>,
    /// Its replay topic.
    replay: String,
    runtime: tokio::runtime::Handle,
    stop: CancellationToken,
}

/// Takes what Kafka delivers in, commits what was settled, pauses and resumes partitions;
/// until the subscription is dropped.
fn poll_loop(p: Poller) {
    let Poller {
        consumer,
        tracker,
        sub,
        shared,
        topics,
        replay,
        runtime,
        stop,
    } = p;
    let mut last_commit = Instant::now();
    let mut last_flow = Instant::now();
    let mut topic_names: HashMap<String, Arc<str>> = HashMap::new();
    while !stop.is_cancelled() {
        match consumer.poll(Duration::from_millis(20)) {
            Some(Ok(m)) => {
                set_connected(true);
                let topic = topic_names
                    .entry(m.topic().to_owned())
                    .or_insert_with(|| Arc::from(m.topic()))
                    .clone();
                admit(&sub, &shared, &replay, &topic, &m);
            }
            Some(Err(e)) => {
                let code = e.rdkafka_error_code();
                if matches!(
                    code,
                    Some(
                        RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
                    )
                ) {
                    // The broker lost them (a restart without storage): create them again.
                    for t in &topics {
                        shared.forget(t);
                    }
                    if let Err(e) = runtime.block_on(shared.ensure(&topics)) {
                        tracing::debug!(error = %e, "Kafka topics not re-created yet");
                    }
                    std::thread::sleep(Duration::from_millis(200));
                } else {
                    tracing::debug!(error = %e, "Kafka consumer");
                }
            }
            None => {}
        }
        // Backpressure: a partition holding `prefetch` unsettled messages is paused (librdkafka
        // drops what it prefetched of it and fetches again from the position on resumption).
        if last_flow.elapsed() >= FLOW_EVERY {
            last_flow = Instant::now();
            let (pause, resume) = {
                let mut held = sub.lock();
                let mut pause = TopicPartitionList::new();
                let mut resume = TopicPartitionList::new();
                for (tp, part) in &mut held.parts {
                    let full = part.outstanding.len() >= sub.prefetch;
                    if full && !part.paused {
                        pause.add_partition(&tp.0, tp.1);
                        part.paused = true;
                    } else if !full && part.paused {
                        resume.add_partition(&tp.0, tp.1);
                        part.paused = false;
                    }
                }
                (pause, resume)
            };
            if pause.count() > 0 {
                let _ = consumer.pause(&pause);
            }
            if resume.count() > 0 {
                let _ = consumer.resume(&resume);
            }
        }
        if last_commit.elapsed() >= COMMIT_EVERY {
            last_commit = Instant::now();
            let (commits, fetched) = {
                let mut held = sub.lock();
                (held.commits(None, false), held.fetched(None, false))
            };
            if fetched.count() > 0 && tracker.commit(&fetched, CommitMode::Async).is_err() {
                let mut held = sub.lock();
                for e in fetched.elements() {
                    if let Some(p) = held.parts.get_mut(&(Arc::from(e.topic()), e.partition())) {
                        p.recorded = -1;
                    }
                }
            }
            if commits.count() > 0
                && let Err(e) = consumer.commit(&commits, CommitMode::Async)
            {
                tracing::debug!(error = %e, "Kafka commit failed; retried with the next");
                let mut held = sub.lock();
                for e in commits.elements() {
                    if let Some(p) = held.parts.get_mut(&(Arc::from(e.topic()), e.partition())) {
                        p.committed = None;
                    }
                }
            }
        }
    }
    // An instance that leaves in the middle of its first join stalls the group on Tansu
    // (its next members wait for it for good), so the join completes first; what comes
    // meanwhile is not taken (the next owner fetches it from the committed offset).
    let deadline = Instant::now() + JOIN_WAIT;
    while !sub.joined.load(Ordering::SeqCst) && Instant::now() < deadline {
        let _ = consumer.poll(Duration::from_millis(50));
    }
    // Closing: what was settled is committed (with how far this instance fetched, so the
    // next owner counts redeliveries), then the group is left (the revocation runs without
    // waiting, `stopping`).
    sub.stopping.store(true, Ordering::SeqCst);
    let (commits, fetched) = {
        let mut held = sub.lock();
        (held.commits(None, true), held.fetched(None, true))
    };
    if fetched.count() > 0 {
        let _ = tracker.commit(&fetched, CommitMode::Sync);
    }
    if commits.count() > 0 {
        let _ = consumer.commit(&commits, CommitMode::Sync);
    }
    consumer.unsubscribe();
    drop(consumer);
}

fn header<'m>(m: &'m rdkafka::message::BorrowedMessage<'_>, name: &str) -> Option<&'m str> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Takes one fetched message in: offered now if no message of its key is in progress,
/// otherwise queued behind it.
fn admit(
    sub: &SubState,
    shared: &Arc<Shared>,
    replay: &str,
    topic: &Arc<str>,
    m: &rdkafka::message::BorrowedMessage<'_>,
) {
    let payload = m
        .payload()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    if let Some(ms) = header(m, PUBLISHED_MS).and_then(|v| v.parse::<i64>().ok()) {
        sub.last_published.store(ms, Ordering::Relaxed);
    }
    // The key is the subject; a record without one (not shopmesh's) is read for it, and one
    // that cannot be read has key "" (the consumer dead-letters it).
    let key = m
        .key()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .or_else(|| Envelope::from_json(&payload).ok().map(|e| e.subject))
        .unwrap_or_default();
    let shop_topic = if &**topic == replay {
        header(m, ORIGINAL_TOPIC).unwrap_or_default().to_owned()
    } else {
        topic
            .strip_prefix(&format!("{}.", shared.options.namespace))
            .unwrap_or(topic)
            .to_owned()
    };
    let tp: Tp = (topic.clone(), m.partition());
    let offset = m.offset();
    let mut held = sub.lock();
    let Some(part) = held.parts.get_mut(&tp) else {
        // Not (or no longer) assigned here.
        return;
    };
    // Already fetched in this assignment (a fetch again after a pause starts at the
    // position, but a message handed out twice could break its key's order).
    if part.next.is_some_and(|n| offset < n) {
        return;
    }
    part.next = Some(offset + 1);
    let attempt = if offset <= part.prior_seen { 2 } else { 1 };
    part.seen = part.seen.max(offset);
    part.outstanding.insert(offset);
    let delivery = Delivery {
        tag: shared.next_tag.fetch_add(1, Ordering::Relaxed),
        topic: shop_topic,
        payload,
        attempt,
    };
    let free = held.busy.insert(key.clone());
    if !free {
        held.waiting
            .entry(key.clone())
            .or_default()
            .push_back(delivery.tag);
    }
    held.held.insert(
        delivery.tag,
        Held {
            tp,
            offset,
            key,
            state: if free { State::Ready } else { State::Waiting },
            delivery: delivery.clone(),
        },
    );
    drop(held);
    if free {
        let _ = sub.ready.send(delivery);
    }
}

struct KafkaSubscription {
    sub: Arc<SubState>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Delivery>>,
    _stop: DropGuard,
}

impl Subscription for KafkaSubscription {
    fn next(
        &self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, BrokerError>> {
        async move {
            let ds = crate::broker::take_ready(&mut *self.rx.lock().await, max, wait).await;
            // Deliveries of partitions given up meanwhile are Kafka's again.
            let mut held = self.sub.lock();
            Ok(ds
                .into_iter()
                .filter(|d| match held.held.get_mut(&d.tag) {
                    Some(h) if h.state == State::Ready => {
                        h.state = State::Taken;
                        true
                    }
                    _ => false,
                })
                .collect())
        }
        .boxed()
    }

    fn ack<'a>(&'a self, ds: &'a [Delivery]) -> BoxFuture<'a, Result<(), BrokerError>> {
        let next: Vec<Delivery> = {
            let mut held = self.sub.lock();
            ds.iter()
                .filter_map(|d| held.remove(d.tag).and_then(|(_, n)| n))
                .collect()
        };
        self.sub.settled.notify_all();
        // The next message of each settled key is the consumer's now.
        for d in next {
            let _ = self.sub.ready.send(d);
        }
        async { Ok(()) }.boxed()
    }

    fn nack<'a>(
        &'a self,
        d: &'a Delivery,
        delay: Duration,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        // The message stays (its key's later messages wait behind it) and is offered again
        // after the delay.
        if let Some(h) = self.sub.lock().held.get_mut(&d.tag) {
            h.state = State::Delayed;
        }
        self.sub.settled.notify_all();
        let sub = self.sub.clone();
        let tag = d.tag;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let again = {
                let mut held = sub.lock();
                match held.held.get_mut(&tag) {
                    Some(h) if h.state == State::Delayed => {
                        h.state = State::Ready;
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
        // The adapter's own count of fetched, unsettled messages. (Broker watermarks are not
        // used: Tansu's are wrong.)
        let messages = self.sub.lock().held.len() as u64;
        let b = Backlog::since_last_published(
            messages,
            self.sub.last_published.load(Ordering::Relaxed),
        );
        async move { Ok(b) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(tp: &Tp, offset: i64, key: &str, tag: i64) -> Held {
        Held {
            tp: tp.clone(),
            offset,
            key: key.into(),
            state: State::Waiting,
            delivery: Delivery {
                tag,
                topic: "t".into(),
                payload: String::new(),
                attempt: 1,
            },
        }
    }

    /// The committed offset is the oldest unsettled message's, whatever order they settle in;
    /// a key's next message is offered when the one before it settles.
    #[test]
    fn commits_stop_at_the_oldest_unsettled_message() {
        let tp: Tp = (Arc::from("ns.t"), 0);
        let mut h = Holding::default();
        let part = h.parts.entry(tp.clone()).or_default();
        part.outstanding.extend([5, 6, 7]);
        part.next = Some(8);
        part.seen = 7;
        let mut a = held(&tp, 5, "a", 1);
        a.state = State::Taken;
        let mut b = held(&tp, 6, "b", 2);
        b.state = State::Taken;
        h.held.insert(1, a);
        h.held.insert(2, b);
        h.held.insert(3, held(&tp, 7, "a", 3));
        h.busy.extend(["a".to_owned(), "b".to_owned()]);
        h.waiting.entry("a".into()).or_default().push_back(3);
        let offset = |tpl: &TopicPartitionList| tpl.elements()[0].offset();
        assert_eq!(offset(&h.commits(None, false)), Offset::Offset(5));
        assert_eq!(
            h.commits(None, false).count(),
            0,
            "unchanged: nothing to commit"
        );
        // b (6) settles first: still 5.
        assert!(h.remove(2).unwrap().1.is_none());
        assert_eq!(h.commits(None, false).count(), 0);
        // a (5) settles: 7, a's next message, is offered.
        let next = h.remove(1).unwrap().1.unwrap();
        assert_eq!(next.tag, 3);
        assert_eq!(h.held[&3].state, State::Ready);
        assert_eq!(offset(&h.commits(None, false)), Offset::Offset(7));
        h.remove(3);
        assert_eq!(offset(&h.commits(None, false)), Offset::Offset(8));
        assert!(h.busy.is_empty() && h.waiting.is_empty());
        assert_eq!(
            h.fetched(None, false).elements()[0].offset(),
            Offset::Offset(8)
        );
        assert_eq!(h.fetched(None, false).count(), 0);
        assert_eq!(h.fetched(None, true).count(), 1, "all, on revocation");
    }

    /// Messages given back at a revocation (fetched, not taken) hold the commit back even
    /// once everything taken has settled: committing past them would lose them (issue 19).
    #[test]
    fn commits_stop_at_what_was_given_back() {
        let tp: Tp = (Arc::from("ns.t"), 0);
        let mut h = Holding::default();
        let part = h.parts.entry(tp.clone()).or_default();
        part.outstanding.extend([5, 6, 7, 8]);
        part.next = Some(9);
        part.seen = 8;
        let mut a = held(&tp, 5, "a", 1);
        a.state = State::Taken;
        let mut b = held(&tp, 6, "b", 2);
        b.state = State::Ready;
        let mut c = held(&tp, 8, "c", 4);
        c.state = State::Taken;
        for (tag, m) in [(1, a), (2, b), (3, held(&tp, 7, "a", 3)), (4, c)] {
            h.held.insert(tag, m);
        }
        h.busy
            .extend(["a".to_owned(), "b".to_owned(), "c".to_owned()]);
        h.waiting.entry("a".into()).or_default().push_back(3);
        // Revoked: what is not taken goes back.
        assert!(h.give_back(2).is_none());
        assert!(h.give_back(3).is_none());
        assert!(!h.busy.contains("b") && h.waiting.is_empty());
        // What was taken settles (8 first, then 5): the commit stops at 6, not 9.
        assert!(h.remove(4).unwrap().1.is_none());
        assert!(h.remove(1).unwrap().1.is_none());
        assert!(h.held.is_empty() && h.busy.is_empty());
        let tpl = h.commits(None, true);
        assert_eq!(tpl.elements()[0].offset(), Offset::Offset(6));
    }

    #[test]
    fn urls() {
        let o =
            crate::BrokerOptions::parse("kafka://127.0.0.1:9092?partitions=4&linger.ms=5").unwrap();
        assert_eq!(o.partitions, 4);
        let c = client_config(
            &settings(&o).unwrap(),
            &[("linger.ms", "1"), ("acks", "all")],
        );
        assert_eq!(c.get("bootstrap.servers"), Some("127.0.0.1:9092"));
        assert_eq!(c.get("linger.ms"), Some("5"), "the URL's setting wins");
        assert_eq!(c.get("acks"), Some("all"));
        assert!(settings(&crate::BrokerOptions::parse("kafka://").unwrap()).is_err());
        assert!(settings(&crate::BrokerOptions::parse("kafka://h:1?oops").unwrap()).is_err());
    }
}
