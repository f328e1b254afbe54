//! NATS JetStream adapter (through `async-nats`). Works with NATS server 2.9 and later.
//!
//! Topology, declared by shopmesh at start-up (idempotently), under its namespace `{ns}`
//! (`shopmesh` unless the URL says `?namespace=…`; the stream's name is it upper-cased):
//!
//! | object | what for |
//! |---|---|
//! | stream `{NS}`, subjects `{ns}.>` | every message, on file storage, interest retention (a message stays until every group subscribed to it has acknowledged it), at most 7 days, 2-minute duplicate window on the message id |
//! | subject `{ns}.{topic}.{p}` | a publish to `topic`, partition `p` of its key |
//! | durable pull consumer `{group}_{topic}_{p}` | group `group`'s subscription to that partition: explicit acks, one unacknowledged message at a time, redelivered after 30 s without an ack, at most 100 deliveries |
//!
//! Ordering and sharing: each partition consumer lets one message out at a time
//! (`max_ack_pending = 1`), whichever instance pulls it, so one key's messages are handled in
//! order within a topic while instances of a group (competing consumers) share the
//! partitions. A retry delay is a negative acknowledgement with that delay: the partition
//! waits behind the message. A dead-letter replay publishes the message again; the groups
//! that handled it already recognize its id in their inbox.
//!
//! The client reconnects by itself; a consumer whose stream breaks is re-created with
//! backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::stream::{Config as StreamConfig, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind};
use async_nats::{ConnectOptions, HeaderMap};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::broker::{Backlog, Broker, BrokerError, Delivery, Subscription};
use crate::{Envelope, partition};

pub const DELIVERY_LIMIT: i64 = 100;
const ACK_WAIT: Duration = Duration::from_secs(30);
const PUBLISHED_MS: &str = "Shopmesh-Published-Ms";

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

fn subject(namespace: &str, topic: &str, p: u16) -> String {
    format!("{namespace}.{topic}.{p}")
}

/// The stream of a namespace: its name upper-cased (`shopmesh` → `SHOPMESH`).
pub fn stream_name(namespace: &str) -> String {
    namespace.to_ascii_uppercase()
}

/// The durable consumer of `group` for `topic`, partition `p` (NATS names cannot hold dots).
pub fn consumer_name(group: &str, topic: &str, p: u16) -> String {
    format!("{group}_{topic}_{p}").replace(['.', '*', '>', ' '], "-")
}

fn set_connected(up: bool) {
    metrics::gauge!("messaging_broker_connected", "broker" => "nats").set(f64::from(u8::from(up)));
}

/// A NATS JetStream broker. Cheap to clone.
#[derive(Clone)]
pub struct NatsBroker {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    options: Arc<crate::BrokerOptions>,
    next_tag: Arc<AtomicI64>,
}

impl NatsBroker {
    /// Connects to `url` (`nats://host:port`, with shopmesh's [`crate::BrokerOptions`] in the
    /// query if wanted) and declares the stream. Fails at once if the server cannot be
    /// reached; after that the client reconnects by itself.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let options = crate::BrokerOptions::parse(url)?;
        let client = ConnectOptions::new()
            .name("shopmesh")
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(|ev| async move {
                match ev {
                    async_nats::Event::Connected => {
                        tracing::info!("NATS connected");
                        set_connected(true);
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!("NATS connection lost; reconnecting");
                        set_connected(false);
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            })
            .connect(options.url.as_str())
            .await
            .map_err(unavailable)?;
        set_connected(true);
        let js = jetstream::new(client);
        let max_age = options
            .expires
            .unwrap_or(Duration::from_secs(7 * 24 * 3600));
        let stream = js
            .get_or_create_stream(StreamConfig {
                name: stream_name(&options.namespace),
                subjects: vec![format!("{}.>", options.namespace)],
                storage: StorageType::File,
                retention: RetentionPolicy::Interest,
                max_age,
                duplicate_window: Duration::from_secs(120).min(max_age),
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        Ok(Self {
            js,
            stream,
            options: Arc::new(options),
            next_tag: Arc::new(AtomicI64::new(1)),
        })
    }

    pub fn partitions(&self) -> u16 {
        self.options.partitions
    }

    /// The group's durable consumers, one per topic and partition (created if missing).
    async fn consumers(
        &self,
        group: &str,
        topics: &[&str],
    ) -> Result<Vec<(String, PullConsumer)>, BrokerError> {
        let mut consumers = Vec::new();
        for t in topics {
            for p in 0..self.options.partitions {
                let name = consumer_name(group, t, p);
                let c: PullConsumer = self
                    .stream
                    .get_or_create_consumer(
                        &name,
                        pull::Config {
                            durable_name: Some(name.clone()),
                            filter_subject: subject(&self.options.namespace, t, p),
                            inactive_threshold: self.options.expires.unwrap_or_default(),
                            ack_policy: AckPolicy::Explicit,
                            ack_wait: ACK_WAIT,
                            max_deliver: DELIVERY_LIMIT,
                            max_ack_pending: 1,
                            deliver_policy: DeliverPolicy::All,
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(unavailable)?;
                consumers.push(((*t).to_owned(), c));
            }
        }
        Ok(consumers)
    }

    async fn send(&self, topic: &str, batch: &[Envelope], dedup: bool) -> Result<(), BrokerError> {
        let started = Instant::now();
        let mut acks = Vec::with_capacity(batch.len());
        for env in batch {
            let mut headers = HeaderMap::new();
            if dedup {
                headers.insert("Nats-Msg-Id", env.id.as_str());
            }
            headers.insert(
                PUBLISHED_MS,
                shopmesh_platform::now_millis().to_string().as_str(),
            );
            let ack = self
                .js
                .publish_with_headers(
                    subject(
                        &self.options.namespace,
                        topic,
                        partition::of(&env.subject, self.options.partitions),
                    ),
                    headers,
                    env.to_json().into(),
                )
                .await
                .map_err(unavailable)?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(unavailable)?;
        }
        metrics::histogram!("messaging_publish_confirm_seconds", "broker" => "nats")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }
}

impl Broker for NatsBroker {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        batch: &'a [Envelope],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            self.send(topic, batch, true).await?;
            metrics::counter!("messaging_published_total", "topic" => topic.to_owned())
                .increment(batch.len() as u64);
            Ok(())
        }
        .boxed()
    }

    fn deliver_to<'a>(
        &'a self,
        _group: &'a str,
        topic: &'a str,
        batch: &'a [Envelope],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        // JetStream cannot address one consumer: the message goes to every group of the
        // topic, and those that handled it skip it by its id. No duplicate-window id, or
        // a replay soon after the original would be dropped.
        self.send(topic, batch, false).boxed()
    }

    fn declare<'a>(
        &'a self,
        group: &'a str,
        topics: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.consumers(group, topics).map(|r| r.map(drop)).boxed()
    }

    fn subscribe<'a>(
        &'a self,
        group: &'a str,
        topics: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, BrokerError>> {
        async move {
            let consumers = self.consumers(group, topics).await?;
            let (tx, rx) = mpsc::channel(consumers.len() * 2);
            let stop = CancellationToken::new();
            let sub = Arc::new(SubState {
                held: Mutex::new(HashMap::new()),
                last_published: AtomicI64::new(0),
            });
            for (topic, c) in &consumers {
                tokio::spawn(pull_loop(
                    c.clone(),
                    topic.clone(),
                    tx.clone(),
                    sub.clone(),
                    self.next_tag.clone(),
                    stop.clone(),
                ));
            }
            Ok(Box::new(NatsSubscription {
                consumers: consumers.into_iter().map(|(_, c)| c).collect(),
                sub,
                rx: tokio::sync::Mutex::new(rx),
                _stop: stop.drop_guard(),
            }) as Box<dyn Subscription>)
        }
        .boxed()
    }
}

struct SubState {
    held: Mutex<HashMap<i64, jetstream::Message>>,
    last_published: AtomicI64,
}

impl SubState {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, jetstream::Message>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn pull_loop(
    consumer: PullConsumer,
    topic: String,
    tx: mpsc::Sender<Delivery>,
    sub: Arc<SubState>,
    next_tag: Arc<AtomicI64>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        let messages = tokio::select! {
            _ = stop.cancelled() => return,
            m = consumer.stream().heartbeat(Duration::from_secs(5)).messages() => m,
        };
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "NATS consumer unavailable; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            let m = tokio::select! {
                _ = stop.cancelled() => return,
                m = messages.next() => m,
            };
            match m {
                Some(Ok(m)) => {
                    backoff = Duration::from_millis(100);
                    let attempt = m
                        .info()
                        .map(|i| u32::try_from(i.delivered.max(1)).unwrap_or(u32::MAX))
                        .unwrap_or(1);
                    if let Some(ms) = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(PUBLISHED_MS))
                        .and_then(|v| v.as_str().parse::<i64>().ok())
                    {
                        sub.last_published.store(ms, Ordering::Relaxed);
                    }
                    let d = Delivery {
                        tag: next_tag.fetch_add(1, Ordering::Relaxed),
                        topic: topic.clone(),
                        payload: String::from_utf8_lossy(&m.payload).into_owned(),
                        attempt,
                    };
                    sub.lock().insert(d.tag, m);
                    if tx.send(d).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    // A missed heartbeat too: its pull request may be gone (a server restart),
                    // and a new stream issues a new one.
                    tracing::debug!(error = %e, "NATS consumer stream broke; re-creating");
                    break;
                }
                None => break,
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

struct NatsSubscription {
    consumers: Vec<PullConsumer>,
    sub: Arc<SubState>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Delivery>>,
    _stop: DropGuard,
}

impl Subscription for NatsSubscription {
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
            let settled: Vec<jetstream::Message> = {
                let mut held = self.sub.lock();
                ds.iter().filter_map(|d| held.remove(&d.tag)).collect()
            };
            for m in settled {
                m.ack().await.map_err(unavailable)?;
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
        async move {
            let m = self.sub.lock().remove(&d.tag);
            if let Some(m) = m {
                m.ack_with(AckKind::Nak(Some(delay)))
                    .await
                    .map_err(unavailable)?;
            }
            Ok(())
        }
        .boxed()
    }

    fn backlog(&self) -> BoxFuture<'_, Result<Backlog, BrokerError>> {
        async move {
            let infos =
                futures::future::join_all(self.consumers.iter().map(|c| c.get_info())).await;
            let mut messages = 0u64;
            for i in infos {
                let i = i.map_err(unavailable)?;
                messages += i.num_pending + i.num_ack_pending as u64;
            }
            Ok(Backlog::since_last_published(
                messages,
                self.sub.last_published.load(Ordering::Relaxed),
            ))
        }
        .boxed()
    }
}
