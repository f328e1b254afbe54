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
//! | consumer group `{ns}.{group}._attempts` | no members; per partition, its head's offset and attempt (the delivery limit), in one committed offset |
//! | topic `{ns}._dead-letter`, same partitions | messages delivered `delivery_limit` times (100 by default) and never settled: a message that crashes its consumer before it can be dead-lettered in the service's database |
//!
//! Ordering: a key's records are in one partition of a topic, in publish order. Of what an
//! instance has fetched, the adapter hands the consumer one message per key at a time, in
//! partition order (the others of that key wait in the adapter, like the RabbitMQ adapter's
//! prefetch), so one key's messages are handled in order while the partition's other keys
//! proceed (except behind a partition's first message of an assignment: see the delivery
//! limit).
//!
//! Offsets: committed only for messages the consumer has settled (acked after its
//! transaction committed). Messages of a partition settle out of order (different keys), so
//! the committed offset of a partition is its oldest unsettled message (or the next one to
//! fetch): a crash or a rebalance means redelivery from there, which the inbox absorbs.
//! What an instance fetched but had not handed to the consumer when a rebalance takes its
//! partitions goes back to Kafka: the commit stops at the oldest such message, so the next
//! owner fetches it (with any later one already settled: at least once).
//! Commits are asynchronous, batched every [`COMMIT_EVERY`], and synchronous when partitions
//! are given up (and when a partition's head is settled: see the delivery limit). Before giving partitions up in a rebalance, an instance waits (up to
//! [`DRAIN_WAIT`]) until the consumer has settled what it holds of them, so the next owner
//! does not hand a key's message out while the previous one still works on the one before.
//!
//! Delivery counts: Kafka has none, and Tansu drops a commit's metadata. So each group has
//! a second, member-less group `{ns}.{group}._fetched` whose committed offsets say how far the
//! group had fetched each partition: a message fetched before a crash or a rebalance says
//! `attempt >= 2` when it comes again. That group is committed asynchronously (with the
//! offsets), so it cannot count a message that crashes its consumer process every time: that
//! one would come again with attempt 2 after every restart, for good.
//!
//! Delivery limit: the first message an instance fetches of a partition in an assignment
//! (the partition's head: the oldest message not settled, where the group's committed
//! offset stands) is counted durably. Before it is offered, its offset and attempt go into
//! a third, member-less group `{ns}.{group}._attempts` (one synchronous commit for the
//! heads fetched within 10 ms of each other; Tansu drops commit metadata, so both go in the
//! committed offset, `offset << 16 | attempt`); the next owner of the partition reads it at
//! assignment, and if its head is the same message, offers it with the next attempt. Each
//! subscription has a third librdkafka client for that group. A message whose attempt would
//! pass the `delivery_limit` (URL, default [`DELIVERY_LIMIT`], as RabbitMQ's
//! `x-delivery-limit` and NATS's `max_deliver`) is not offered: it is parked on the topic
//! `{ns}._dead-letter` (its key, value and headers, plus `x-topic`, `x-group`,
//! `x-partition`, `x-offset` and `x-delivery-count`) and the partition's committed offset
//! passes it, as RabbitMQ moves it to its dead-letter queue and NATS stops delivering it.
//! The consumer never sees it: like there, it is for an operator (subscribing to the
//! shopmesh topic [`DEAD_LETTER_TOPIC`] reads it), not in the service's own dead letters,
//! since the consumer could not record it there without running its handler again.
//!
//! So that a count means "this message was in the consumer's hands when the process died":
//! - a partition's head is offered alone: the partition's later messages wait until it is
//!   settled (or parked) and the group's committed offset has passed it, synchronously (a
//!   crash right after must not bring it back and count it again);
//! - a head that came twice already without being settled (attempt 3 and up, a suspect) is
//!   offered only while no other suspect of the subscription is in the consumer's hands, so
//!   that the messages that crashed in the same batch as a poison message are not parked
//!   with it (they settle, one per life at least, and the poison message becomes its
//!   partition's head and counts alone).
//!
//! A message that crashes every time is therefore parked after `delivery_limit` deliveries,
//! plus about one life per unsettled message before it in its partition. Only heads count:
//! the other redelivered messages say attempt 2 as before, and a retry delay counts in memory
//! only. The price, paid after every assignment (start, rebalance, reconnection), not per
//! message: each partition hands out its first message alone, and its other keys wait until
//! that one is settled (through its retries, if it fails: a few seconds with the consumer's
//! defaults) and committed past; two synchronous round trips per partition, batched across
//! partitions.
//!
//! What a crash can do to the counts: before a head's record is written it was not offered,
//! and nothing counts; after it, the attempt counts even if the consumer never had the
//! message (it was waiting behind its key, or given back in a rebalance: one too many). A
//! crash after a message is parked and before the committed offset passes it parks it again
//! (twice on the dead-letter topic). A head that was settled but whose partition's commit did
//! not land comes again and counts again (the inbox absorbs it; only at its last attempt
//! could it be parked although it was applied). A record that fails to be written (warned)
//! does not count, and if `_attempts` cannot be read at assignment that assignment counts
//! nothing and gates nothing: the limit is then passed by those lives.
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
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
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
/// Header naming the topic a replayed message was published to (or a parked one came from).
const ORIGINAL_TOPIC: &str = "x-topic";
/// Headers of a parked message: the group that gave up, where it was, and its deliveries.
const PARKED_GROUP: &str = "x-group";
const PARKED_PARTITION: &str = "x-partition";
const PARKED_OFFSET: &str = "x-offset";
const PARKED_DELIVERIES: &str = "x-delivery-count";
/// Deliveries after which a message that is never settled is parked on the dead-letter topic
/// rather than delivered again (the consumers give up on handler failures, into their
/// database's dead letters, long before); `?delivery_limit=N` in the URL changes it.
pub const DELIVERY_LIMIT: u16 = 100;
/// The shopmesh topic whose Kafka topic (`{ns}._dead-letter`) holds the parked messages: a
/// subscription to it reads them.
pub const DEAD_LETTER_TOPIC: &str = "_dead-letter";
/// From this attempt on, a head is a suspect: offered only while no other suspect is out.
const SUSPECT: u32 = 3;
/// Low bits of an `_attempts` record holding the attempt; the offset is in the others.
const ATTEMPT_BITS: u32 = 16;

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
    /// The member-less group recording the attempt of each of `group`'s partition heads.
    pub fn attempts(&self, group: &str) -> String {
        format!("{}.{group}._attempts", self.namespace)
    }
    /// The topic messages past the delivery limit are parked on (every group's).
    pub fn dead_letter(&self) -> String {
        self.topic(DEAD_LETTER_TOPIC)
    }
}

/// An `_attempts` record: a head's offset and the attempt it was offered with, in one
/// committed offset (Tansu drops commit metadata). `None` for an offset too large to hold
/// (2^47 and up: not counted).
fn record(offset: i64, attempt: u32) -> Option<i64> {
    let max_attempt = (1u32 << ATTEMPT_BITS) - 1;
    if !(0..(1i64 << (63 - ATTEMPT_BITS))).contains(&offset) {
        return None;
    }
    Some((offset << ATTEMPT_BITS) | i64::from(attempt.min(max_attempt)))
}

/// The offset and attempt of an `_attempts` record (`None`: no record, such as librdkafka's
/// negative "invalid offset").
fn unrecord(committed: i64) -> Option<(i64, u32)> {
    if committed < 0 {
        return None;
    }
    let attempt = u32::try_from(committed & ((1i64 << ATTEMPT_BITS) - 1)).ok()?;
    Some((committed >> ATTEMPT_BITS, attempt))
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
        let mut missing: Vec<String> = {
            let created = self.created.lock().unwrap_or_else(|p| p.into_inner());
            topics
                .iter()
                .filter(|t| !created.contains(*t))
                .cloned()
                .collect()
        };
        // A name twice in one request is refused (a subscription to the dead-letter topic
        // needs it twice).
        missing.sort();
        missing.dedup();
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
            // With the topic it parks what passes the delivery limit on.
            let mut needed = all.clone();
            needed.push(self.shared.names.dead_letter());
            self.shared.ensure(&needed).await?;
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
            let attempts: Arc<BaseConsumer> = Arc::new(
                client_config(
                    &self.shared.settings,
                    &[
                        ("group.id", self.shared.names.attempts(group).as_str()),
                        ("enable.auto.commit", "false"),
                        // A commit waits this long at most for an unavailable coordinator
                        // (librdkafka's default is 45 s); the poll thread waits for it.
                        ("session.timeout.ms", "6000"),
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
                attempts: attempts.clone(),
            })
            .map_err(unavailable)?;
            let names: Vec<&str> = all.iter().map(String::as_str).collect();
            consumer.subscribe(&names).map_err(unavailable)?;
            let poller = Poller {
                consumer,
                tracker,
                attempts,
                group: group.to_owned(),
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
    /// A partition head whose attempt is being recorded (or which is being parked) before it
    /// is offered.
    Recording,
    /// Behind its partition's head, which is not settled (or not committed past) yet.
    Gated,
}

/// What `_attempts` held for a partition at assignment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Tally {
    /// Not read (it failed): the head is neither counted nor offered alone in this assignment,
    /// so that an unread count is not overwritten with a lower one.
    #[default]
    Unread,
    /// Read: the offset and attempt it names (`None`: nothing recorded).
    Read(Option<(i64, u32)>),
}

/// Whether a partition's messages wait behind its head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Gate {
    #[default]
    Open,
    /// The head (this tag) is held: the partition's later messages wait.
    Closed(i64),
    /// The head is settled or parked: they wait until the group's committed offset has
    /// passed it.
    Opening,
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
    /// What `_attempts` held for it at assignment.
    tally: Tally,
    gate: Gate,
    /// The messages waiting behind the head (tags, in offset order; at most `prefetch`).
    gated: VecDeque<i64>,
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
            tally: Tally::Unread,
            gate: Gate::Open,
            gated: VecDeque::new(),
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
    /// Heads fetched (state `Recording`) and not offered yet, with what parking them takes;
    /// one per assigned partition at most.
    heads: Vec<(i64, OwnedMessage)>,
    /// Partitions whose gate is opening.
    opening: HashSet<Tp>,
    /// The suspect head (attempt [`SUSPECT`] or more) in the consumer's hands, if any.
    suspect: Option<i64>,
}

impl Holding {
    /// Calls `f` with each partition of `tpl` (made when new) and its offset there.
    fn each(&mut self, tpl: &TopicPartitionList, mut f: impl FnMut(&mut Part, Offset)) {
        for e in tpl.elements() {
            let part = self
                .parts
                .entry((Arc::from(e.topic()), e.partition()))
                .or_default();
            f(part, e.offset());
        }
    }

    /// The commit of `tpl` failed: its partitions are committed again with the next.
    fn not_committed(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            if let Some(p) = self.parts.get_mut(&(Arc::from(e.topic()), e.partition())) {
                p.committed = None;
            }
        }
    }

    /// Removes `tag`; returns it and the next message of its key, now offered, if one waits.
    /// A partition head's removal opens its partition's gate (once its commit passes it).
    fn remove(&mut self, tag: i64) -> Option<(Held, Option<Delivery>)> {
        let h = self.held.remove(&tag)?;
        if let Some(p) = self.parts.get_mut(&h.tp) {
            p.outstanding.remove(&h.offset);
            if p.gate == Gate::Closed(tag) {
                p.gate = Gate::Opening;
                self.opening.insert(h.tp.clone());
            }
            if h.state == State::Gated {
                p.gated.retain(|t| *t != tag);
            }
        }
        if self.suspect == Some(tag) {
            self.suspect = None;
        }
        match h.state {
            // Neither offered nor behind its key.
            State::Gated => return Some((h, None)),
            State::Recording => {
                self.heads.retain(|(t, _)| *t != tag);
                return Some((h, None));
            }
            _ => {}
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

    /// Offers `tag` (returned, to be sent) unless a message of its key is offered already: it
    /// then waits behind it.
    fn offer(&mut self, tag: i64) -> Option<Delivery> {
        let h = self.held.get_mut(&tag)?;
        if self.busy.insert(h.key.clone()) {
            h.state = State::Ready;
            Some(h.delivery.clone())
        } else {
            h.state = State::Waiting;
            self.waiting
                .entry(h.key.clone())
                .or_default()
                .push_back(tag);
            None
        }
    }

    /// Opens the gates of `tps` (the group's committed offset has passed their heads): the
    /// messages that waited are offered in offset order, each behind its key. Returns those
    /// offered, to be sent.
    fn open(&mut self, tps: &HashSet<Tp>) -> Vec<Delivery> {
        let mut out = Vec::new();
        for tp in tps {
            self.opening.remove(tp);
            let Some(part) = self.parts.get_mut(tp) else {
                continue;
            };
            if part.gate != Gate::Opening {
                continue;
            }
            part.gate = Gate::Open;
            let gated = std::mem::take(&mut part.gated);
            for tag in gated {
                out.extend(self.offer(tag));
            }
        }
        out
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
    /// A member-less consumer of the `_attempts` group (likewise).
    attempts: Arc<BaseConsumer>,
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
        held.opening.retain(|tp| !revoked.contains(tp));
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
                let attempts = self.attempts.committed_offsets((*tpl).clone(), TIMEOUT);
                let mut held = self.sub.lock();
                for e in tpl.elements() {
                    held.parts
                        .entry((Arc::from(e.topic()), e.partition()))
                        .or_default();
                }
                match committed {
                    Ok(c) => held.each(&c, |part, o| {
                        part.start = o.to_raw().filter(|o| *o >= 0);
                        part.committed = part.start;
                    }),
                    Err(e) => tracing::warn!(error = %e, "Kafka committed offsets unavailable"),
                }
                match fetched {
                    Ok(c) => held.each(&c, |part, o| {
                        if let Some(o) = o.to_raw().filter(|o| *o > 0) {
                            part.prior_seen = o - 1;
                            part.seen = o - 1;
                            part.recorded = o - 1;
                        }
                    }),
                    Err(e) => tracing::debug!(error = %e, "Kafka fetched offsets unavailable"),
                }
                match attempts {
                    Ok(c) => held.each(&c, |part, o| {
                        part.tally = Tally::Read(o.to_raw().and_then(unrecord));
                    }),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "Kafka delivery counts unavailable: this assignment's heads are not counted"
                    ),
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
    attempts: Arc<BaseConsumer>,
    /// The subscription's group (shopmesh's name).
    group: String,
    sub: Arc<SubState>,
    shared: Arc<Shared>,
    /// The subscription's Kafka topics.
    topics: Vec<String>,
    /// Its replay topic.
    replay: String,
    runtime: tokio::runtime::Handle,
    stop: CancellationToken,
}

/// Takes what Kafka delivers in, offers partition heads (recorded or parked first) and opens
/// the partitions behind them, commits what was settled, pauses and resumes partitions; until
/// the subscription is dropped.
fn poll_loop(p: Poller) {
    let Poller {
        consumer,
        tracker,
        attempts,
        group,
        sub,
        shared,
        topics,
        replay,
        runtime,
        stop,
    } = p;
    let mut last_commit = Instant::now();
    let mut last_flow = Instant::now();
    // After a failed commit, partitions stay gated until this time, then it is tried again.
    let mut gates_retry = Instant::now();
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
            offer_heads(&sub, &shared, &attempts, &runtime, &group);
            if Instant::now() >= gates_retry && !open_gates(&consumer, &sub) {
                gates_retry = Instant::now() + COMMIT_EVERY;
            }
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
                sub.lock().not_committed(&commits);
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
/// otherwise queued behind it. The first of its partition in this assignment (its head) waits
/// for [`offer_heads`] instead, and the partition's next ones wait behind it until
/// [`open_gates`].
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
    let first = part.next.is_none();
    part.next = Some(offset + 1);
    // The partition's head is counted across crashes (if `_attempts` could be read).
    let head = match part.tally {
        Tally::Read(recorded) if first => Some(recorded),
        _ => None,
    };
    let attempt = match head {
        Some(Some((o, n))) if o == offset => n.saturating_add(1),
        _ if offset <= part.prior_seen => 2,
        _ => 1,
    };
    part.seen = part.seen.max(offset);
    part.outstanding.insert(offset);
    let tag = shared.next_tag.fetch_add(1, Ordering::Relaxed);
    let state = if head.is_some() {
        part.gate = Gate::Closed(tag);
        State::Recording
    } else if part.gate != Gate::Open {
        part.gated.push_back(tag);
        State::Gated
    } else {
        // Decided by `offer` below.
        State::Waiting
    };
    held.held.insert(
        tag,
        Held {
            tp,
            offset,
            key,
            state,
            delivery: Delivery {
                tag,
                topic: shop_topic,
                payload,
                attempt,
            },
        },
    );
    let offered = match state {
        State::Recording => {
            held.heads.push((tag, m.detach()));
            None
        }
        State::Gated => None,
        _ => held.offer(tag),
    };
    drop(held);
    if let Some(d) = offered {
        let _ = sub.ready.send(d);
    }
}

/// Adds `m`'s `_attempts` record (its offset and `attempt`) to `records`.
fn note(records: &mut TopicPartitionList, m: &OwnedMessage, attempt: u32) {
    if let Some(v) = record(m.offset(), attempt) {
        let _ = records.add_partition_offset(m.topic(), m.partition(), Offset::Offset(v));
    }
}

/// Offers the partition heads fetched since the last look. A head whose attempt would pass
/// the delivery limit is parked (not offered) and its partition's gate opens; the others'
/// attempts are recorded in `_attempts` (one synchronous commit for all) and then they are
/// offered. A suspect waits while another one is in the consumer's hands.
///
/// A crash before the record is written loses nothing (the heads were not offered); after
/// it, the attempts count even for a head that never reached the consumer. A record that
/// cannot be written is warned of and the heads are offered anyway (that life does not
/// count); a head that cannot be parked is offered too (it is parked after the next crash).
fn offer_heads(
    sub: &SubState,
    shared: &Shared,
    attempts: &BaseConsumer,
    runtime: &tokio::runtime::Handle,
    group: &str,
) {
    let limit = u32::from(shared.options.delivery_limit);
    let mut to_park = Vec::new();
    let mut records = TopicPartitionList::new();
    let mut to_offer = Vec::new();
    {
        let mut held = sub.lock();
        if held.heads.is_empty() {
            return;
        }
        let heads = std::mem::take(&mut held.heads);
        for (tag, m) in heads {
            let Some((attempt, topic)) = held
                .held
                .get(&tag)
                .map(|h| (h.delivery.attempt, h.delivery.topic.clone()))
            else {
                continue;
            };
            if attempt > limit {
                to_park.push((tag, attempt, topic, m));
                continue;
            }
            if attempt >= SUSPECT {
                if held.suspect.is_some() {
                    // Another suspect is out: this one waits for the next look.
                    held.heads.push((tag, m));
                    continue;
                }
                held.suspect = Some(tag);
            }
            note(&mut records, &m, attempt);
            to_offer.push(tag);
        }
    }
    let mut parked = Vec::new();
    for (tag, attempt, topic, m) in to_park {
        match park(shared, runtime, &m, &topic, group, attempt - 1) {
            Ok(()) => {
                tracing::error!(
                    group,
                    topic,
                    partition = m.partition(),
                    offset = m.offset(),
                    deliveries = attempt - 1,
                    "Kafka message never settled in {} deliveries: parked on {}",
                    attempt - 1,
                    shared.names.dead_letter()
                );
                metrics::counter!("messaging_parked_total", "consumer" => group.to_owned())
                    .increment(1);
                parked.push(tag);
            }
            Err(e) => {
                tracing::warn!(
                    error = %e, group, topic,
                    "Kafka message past its delivery limit not parked; offered once more"
                );
                note(&mut records, &m, attempt);
                to_offer.push(tag);
            }
        }
    }
    if records.count() > 0
        && let Err(e) = attempts.commit(&records, CommitMode::Sync)
    {
        tracing::warn!(
            error = %e,
            "Kafka delivery counts not recorded: these deliveries do not count to the limit"
        );
    }
    let ready = {
        let mut guard = sub.lock();
        let held = &mut *guard;
        for tag in parked {
            // Settled as far as the group goes: its gate opens once the commit passes it.
            held.remove(tag);
        }
        let mut ready = Vec::new();
        for tag in to_offer {
            // (Unless given back meanwhile.)
            if held
                .held
                .get(&tag)
                .is_some_and(|h| h.state == State::Recording)
            {
                ready.extend(held.offer(tag));
            }
        }
        ready
    };
    for d in ready {
        let _ = sub.ready.send(d);
    }
}

/// Opens the gates of the partitions whose head was settled or parked, once the group's
/// committed offset is past it: that commit is synchronous, or a crash right after it could
/// bring the head back and count a delivery it did not cause. Returns `false` if the commit
/// failed (the gates stay closed; tried again later).
fn open_gates(consumer: &BaseConsumer<SubCtx>, sub: &SubState) -> bool {
    let (tps, commits) = {
        let mut held = sub.lock();
        if held.opening.is_empty() {
            return true;
        }
        let tps = held.opening.clone();
        let commits = held.commits(Some(&tps), true);
        (tps, commits)
    };
    if commits.count() > 0
        && let Err(e) = consumer.commit(&commits, CommitMode::Sync)
    {
        tracing::debug!(error = %e, "Kafka commit failed; gated partitions wait for the next");
        sub.lock().not_committed(&commits);
        return false;
    }
    let ready = sub.lock().open(&tps);
    for d in ready {
        let _ = sub.ready.send(d);
    }
    true
}

/// Parks `m`, a message of shopmesh topic `topic` that `group` never settled in `deliveries`
/// deliveries, on the dead-letter topic: its key, value and headers, in the same partition,
/// with where it came from. Returns once Kafka has it (`acks=all`), or fails (nothing parked,
/// or parked without the confirmation: then it may be parked twice).
fn park(
    shared: &Shared,
    runtime: &tokio::runtime::Handle,
    m: &OwnedMessage,
    topic: &str,
    group: &str,
    deliveries: u32,
) -> Result<(), BrokerError> {
    let dead_letter = shared.names.dead_letter();
    runtime.block_on(shared.ensure(std::slice::from_ref(&dead_letter)))?;
    let ours = [
        ORIGINAL_TOPIC,
        PARKED_GROUP,
        PARKED_PARTITION,
        PARKED_OFFSET,
        PARKED_DELIVERIES,
    ];
    let mut headers = OwnedHeaders::new_with_capacity(16);
    if let Some(hs) = m.headers() {
        for h in hs.iter().filter(|h| !ours.contains(&h.key)) {
            headers = headers.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    let partition = m.partition().to_string();
    let offset = m.offset().to_string();
    let deliveries = deliveries.to_string();
    for (key, value) in [
        (ORIGINAL_TOPIC, topic),
        (PARKED_GROUP, group),
        (PARKED_PARTITION, partition.as_str()),
        (PARKED_OFFSET, offset.as_str()),
        (PARKED_DELIVERIES, deliveries.as_str()),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    let mut parked: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&dead_letter)
        .partition(m.partition())
        .headers(headers);
    if let Some(k) = m.key() {
        parked = parked.key(k);
    }
    if let Some(p) = m.payload() {
        parked = parked.payload(p);
    }
    match runtime.block_on(shared.producer.send(parked, TIMEOUT)) {
        Ok(_) => Ok(()),
        Err((e, _)) => Err(unavailable(e)),
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

    /// A partition's head is offered alone: what was fetched behind it waits until it is
    /// settled and the commit has passed it, then goes out in offset order, behind its key.
    #[test]
    fn a_head_is_offered_alone_until_the_commit_passes_it() {
        let tp: Tp = (Arc::from("ns.t"), 0);
        let mut h = Holding::default();
        let part = h.parts.entry(tp.clone()).or_default();
        part.outstanding.extend([5, 6, 7, 8]);
        part.next = Some(9);
        part.gate = Gate::Closed(1);
        part.gated.extend([2, 3, 4]);
        let mut head = held(&tp, 5, "a", 1);
        head.state = State::Taken;
        h.held.insert(1, head);
        for (tag, offset, key) in [(2, 6, "b"), (3, 7, "a"), (4, 8, "c")] {
            let mut m = held(&tp, offset, key, tag);
            m.state = State::Gated;
            h.held.insert(tag, m);
        }
        h.busy.insert("a".to_owned());
        h.suspect = Some(1);
        // Given back (a revocation) while gated: just gone.
        assert!(h.give_back(4).is_none());
        assert_eq!(h.parts[&tp].gated, [2, 3]);
        // The head settles: nothing is offered yet, its gate is opening.
        assert!(h.remove(1).unwrap().1.is_none());
        assert!(h.busy.is_empty() && h.suspect.is_none());
        assert_eq!(h.parts[&tp].gate, Gate::Opening);
        assert!(h.opening.contains(&tp));
        // The commit that must land first stops at the first message behind the head.
        let tps = h.opening.clone();
        let tpl = h.commits(Some(&tps), true);
        assert_eq!(tpl.elements()[0].offset(), Offset::Offset(6));
        // Opened: in offset order, each behind its key (b is busy elsewhere).
        h.busy.insert("b".to_owned());
        let offered: Vec<i64> = h.open(&tps).iter().map(|d| d.tag).collect();
        assert_eq!(offered, [3]);
        assert_eq!(h.held[&2].state, State::Waiting);
        assert_eq!(h.waiting["b"], [2]);
        assert!(h.opening.is_empty());
        assert_eq!(h.parts[&tp].gate, Gate::Open);
        assert!(h.parts[&tp].gated.is_empty());
    }

    #[test]
    fn records_hold_an_offset_and_an_attempt() {
        for (offset, attempt) in [(0, 1), (5, 2), (123_456_789, 100), ((1 << 47) - 1, 10_001)] {
            assert_eq!(
                unrecord(record(offset, attempt).unwrap()),
                Some((offset, attempt))
            );
        }
        assert_eq!(record(1 << 47, 2), None, "too large: not counted");
        assert_eq!(record(-1, 2), None);
        assert_eq!(
            unrecord(-1001),
            None,
            "librdkafka's invalid offset: nothing recorded"
        );
        assert_eq!(unrecord(record(7, u32::MAX).unwrap()), Some((7, 65_535)));
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
        let o = crate::BrokerOptions::parse("kafka://h:1?delivery_limit=3&linger.ms=5").unwrap();
        assert_eq!(o.delivery_limit, 3);
        assert!(
            settings(&o)
                .unwrap()
                .iter()
                .all(|(k, _)| k != "delivery_limit"),
            "shopmesh's, not librdkafka's"
        );
        assert!(settings(&crate::BrokerOptions::parse("kafka://").unwrap()).is_err());
        assert!(settings(&crate::BrokerOptions::parse("kafka://h:1?oops").unwrap()).is_err());
    }
}
