//! The console's server side: one sampler per process that runs only while somebody
//! watches (and a minute after, so that reloading the page loses nothing), the history it
//! keeps (15 minutes at one-second resolution), the event feed, and the stream every viewer
//! reads from.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast};

use crate::metrics::{self, Point, Tick, Totals};
use crate::model::{Features, Observation};

/// What a host gives the console.
pub trait Source: Send + Sync + 'static {
    fn features(&self) -> Features;
    /// The state now. Called once a second while somebody watches, never otherwise.
    fn observe(&self) -> BoxFuture<'_, Observation>;
    /// The host's JSON API under `/console/api`: reads the page asks for on demand (an
    /// order's timeline, a dead letter's payload) and actions (replay, reload). Writes pass
    /// the console's cross-origin guard first.
    fn api(&self) -> axum::Router;
}

/// Seconds of history kept.
pub const HISTORY_SECS: usize = 15 * 60;
/// Feed entries kept.
pub const FEED_LEN: usize = 200;
/// Frames a viewer may fall behind before it is dropped (its page reconnects and starts
/// again from a snapshot).
pub const VIEWER_BUFFER: usize = 64;
/// How long sampling goes on after the last viewer left.
pub const LINGER: Duration = Duration::from_secs(60);

/// One message of the stream.
#[derive(Debug)]
pub struct Frame {
    pub id: u64,
    pub event: &'static str,
    pub data: String,
}

/// An entry of the event feed.
#[derive(Debug, Clone, Serialize)]
pub struct FeedEvent {
    pub id: u64,
    pub t: i64,
    /// `breaker`, `health`, `reload`, `dead_letter` or `key`.
    pub kind: &'static str,
    /// `info`, `warn` or `error`.
    pub level: &'static str,
    pub title: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// What it is about: an endpoint, a configuration version, a dead letter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Per-second series, columnar (the page draws them as they are).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Series {
    /// Unix seconds of each sample (gaps where nobody watched).
    pub t: VecDeque<i64>,
    pub rps: VecDeque<f64>,
    pub err: VecDeque<f64>,
    pub p50: VecDeque<Option<f64>>,
    pub p99: VecDeque<Option<f64>>,
    pub backlog: VecDeque<f64>,
}

impl Series {
    fn push(&mut self, t: i64, p: &Point) {
        while self
            .t
            .front()
            .is_some_and(|f| *f <= t - HISTORY_SECS as i64)
        {
            self.t.pop_front();
            self.rps.pop_front();
            self.err.pop_front();
            self.p50.pop_front();
            self.p99.pop_front();
            self.backlog.pop_front();
        }
        self.t.push_back(t);
        self.rps.push_back(round(p.rps));
        self.err.push_back(round(p.err));
        self.p50.push_back(p.p50.map(round));
        self.p99.push_back(p.p99.map(round));
        self.backlog.push_back(p.backlog);
    }
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[derive(Default)]
struct State {
    last: Option<(Instant, Observation)>,
    tick: Option<Tick>,
    overview: Series,
    routes: BTreeMap<String, Series>,
    feed: VecDeque<FeedEvent>,
    /// Readings of the last ten seconds or so, newest last.
    readings: VecDeque<(Instant, Totals)>,
    reload_seen: Option<u64>,
    last_viewer_left: Option<Instant>,
}

pub(crate) struct Inner {
    pub(crate) source: Arc<dyn Source>,
    render: Box<dyn Fn() -> String + Send + Sync>,
    tx: broadcast::Sender<Arc<Frame>>,
    seq: AtomicU64,
    viewers: AtomicUsize,
    wake: Notify,
    sampling: AtomicBool,
    state: Mutex<State>,
    /// Observations made (by the sampler or for a snapshot): the tests' measure of
    /// whether anything runs while nobody watches.
    pub(crate) observations: AtomicU64,
}

/// The console of one process. Cheap to clone.
#[derive(Clone)]
pub struct Console {
    pub(crate) inner: Arc<Inner>,
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Console {
    /// A console over `source`, its figures read from the process's Prometheus registry.
    pub fn new(source: impl Source) -> Self {
        let _ = shopmesh_platform::telemetry::prometheus();
        Self::with_metrics(source, shopmesh_platform::telemetry::render)
    }

    /// A console whose metrics text comes from `render`.
    pub fn with_metrics(
        source: impl Source,
        render: impl Fn() -> String + Send + Sync + 'static,
    ) -> Self {
        let (tx, _) = broadcast::channel(VIEWER_BUFFER);
        Self {
            inner: Arc::new(Inner {
                source: Arc::new(source),
                render: Box::new(render),
                tx,
                seq: AtomicU64::new(0),
                viewers: AtomicUsize::new(0),
                wake: Notify::new(),
                sampling: AtomicBool::new(false),
                state: Mutex::new(State::default()),
                observations: AtomicU64::new(0),
            }),
        }
    }

    pub fn features(&self) -> Features {
        self.inner.source.features()
    }

    /// Viewers connected now.
    pub fn viewers(&self) -> usize {
        self.inner.viewers.load(Ordering::Relaxed)
    }

    /// Observations made so far (for tests: none while nobody watches).
    pub fn observations(&self) -> u64 {
        self.inner.observations.load(Ordering::Relaxed)
    }

    /// The event feed as it stands (oldest first).
    #[cfg(test)]
    pub(crate) fn inner_feed(&self) -> Vec<FeedEvent> {
        self.lock().feed.iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new viewer: subscribes it, wakes the sampler, and returns its snapshot (sent
    /// before anything the subscription receives, whose frames with an id up to the
    /// snapshot's it may ignore).
    pub(crate) async fn join(&self, resumed: bool) -> (Viewer, Frame) {
        let rx = self.inner.tx.subscribe();
        self.inner.viewers.fetch_add(1, Ordering::SeqCst);
        let viewer = Viewer {
            console: Arc::downgrade(&self.inner),
            rx,
        };
        self.start_sampler();
        self.inner.wake.notify_one();
        let recent = |st: &State| {
            st.last
                .as_ref()
                .filter(|(at, _)| at.elapsed() < Duration::from_secs(2))
                .map(|(_, o)| o.clone())
        };
        let has_recent = recent(&self.lock()).is_some();
        let observed = if has_recent {
            None
        } else {
            self.inner.observations.fetch_add(1, Ordering::Relaxed);
            Some(self.inner.source.observe().await)
        };
        let st = self.lock();
        // Under the lock: every frame up to this id has its effect in the state below.
        let id = self.inner.seq.load(Ordering::SeqCst);
        let obs = recent(&st).or(observed).unwrap_or_default();
        let data = json!({
            "seq": id,
            "now": unix_ms(),
            "resumed": resumed,
            "features": self.inner.source.features(),
            "state": obs,
            "tick": st.tick,
            "history": {
                "overview": st.overview,
                "routes": st.routes,
            },
            "feed": st.feed,
        });
        (
            viewer,
            Frame {
                id,
                event: "snapshot",
                data: data.to_string(),
            },
        )
    }

    fn start_sampler(&self) {
        if self.inner.sampling.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(sampler(weak));
    }

    fn next_id(&self) -> u64 {
        self.inner.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// One sampling step: read the metrics, observe, derive, broadcast.
    pub(crate) async fn sample(&self) {
        let text = (self.inner.render)();
        let totals = metrics::read(&text);
        self.inner.observations.fetch_add(1, Ordering::Relaxed);
        let obs = self.inner.source.observe().await;
        let now = Instant::now();
        let t = unix_ms();
        let mut frames: Vec<Frame> = Vec::new();
        {
            let mut st = self.lock();
            // Readings older than a gap in sampling say nothing about this second.
            if st
                .readings
                .back()
                .is_some_and(|(at, _)| now.duration_since(*at) > Duration::from_secs(5))
            {
                st.readings.clear();
            }
            let tick = st.readings.back().map(|(at, prev)| {
                let secs = now.duration_since(*at).as_secs_f64();
                let (since, window) = st.readings.front().expect("not empty");
                let window_secs = now.duration_since(*since).as_secs_f64();
                let mut tick = metrics::tick(t, &totals, prev, (window, window_secs), secs);
                let clusters: HashMap<&str, &str> = obs
                    .gateway
                    .iter()
                    .flat_map(|g| &g.routes)
                    .filter_map(|r| Some((r.name.as_str(), r.cluster.as_deref()?)))
                    .collect();
                metrics::attribute_retries(&mut tick, &totals, prev, secs, &|r| {
                    clusters.get(r).map(|c| (*c).to_owned())
                });
                tick
            });
            st.readings.push_back((now, totals));
            while st.readings.len() > 11 {
                st.readings.pop_front();
            }
            let events = self.diff(&mut st, &obs);
            let previous = st.last.take().map(|(_, o)| o);
            let mut changed = serde_json::Map::new();
            let section = |name: &str, now: &dyn Fn(&Observation) -> Value| {
                let v = now(&obs);
                match &previous {
                    Some(p) if now(p) == v => None,
                    _ => Some((name.to_owned(), v)),
                }
            };
            for (name, get) in [
                (
                    "gateway",
                    &(|o: &Observation| json!(o.gateway)) as &dyn Fn(&Observation) -> Value,
                ),
                ("health", &|o: &Observation| json!(o.health)),
                ("dead_letters", &|o: &Observation| json!(o.dead_letters)),
                ("outboxes", &|o: &Observation| json!(o.outboxes)),
            ] {
                if let Some((k, v)) = section(name, get) {
                    changed.insert(k, v);
                }
            }
            if let Some(tick) = &tick {
                let secs = tick.t / 1000;
                st.overview.push(secs, &tick.overview);
                for (name, r) in &tick.routes {
                    st.routes.entry(name.clone()).or_default().push(
                        secs,
                        &Point {
                            rps: r.rps,
                            err: r.err,
                            p50: r.p50,
                            p99: r.p99_now,
                            ..Default::default()
                        },
                    );
                }
                st.routes
                    .retain(|_, s| s.t.back().is_some_and(|b| *b > secs - HISTORY_SECS as i64));
                st.tick = Some(tick.clone());
            }
            frames.push(Frame {
                id: self.next_id(),
                event: "tick",
                data: json!({"t": t, "metrics": tick, "changed": changed}).to_string(),
            });
            for mut e in events {
                e.id = self.next_id();
                frames.push(Frame {
                    id: e.id,
                    event: e.kind,
                    data: json!(e).to_string(),
                });
                st.feed.push_back(e);
                while st.feed.len() > FEED_LEN {
                    st.feed.pop_front();
                }
            }
            for s in &obs.sagas {
                frames.push(Frame {
                    id: self.next_id(),
                    event: "saga",
                    data: json!(s).to_string(),
                });
            }
            if !obs.messages.is_empty() {
                frames.push(Frame {
                    id: self.next_id(),
                    event: "messages",
                    data: json!({ "subjects": obs.messages }).to_string(),
                });
            }
            st.last = Some((
                now,
                Observation {
                    sagas: Vec::new(),
                    messages: Vec::new(),
                    ..obs
                },
            ));
        }
        for f in frames {
            // No receiver is not an error: frames are for whoever listens now.
            let _ = self.inner.tx.send(Arc::new(f));
        }
    }

    /// Feed events: what changed between the last observation and `obs`.
    fn diff(&self, st: &mut State, obs: &Observation) -> Vec<FeedEvent> {
        let mut out = Vec::new();
        let t = unix_ms();
        let mut event = |kind, level, title: String, detail, subject, user| {
            out.push(FeedEvent {
                id: 0,
                t,
                kind,
                level,
                title,
                detail,
                subject,
                user,
            })
        };
        let previous = st.last.as_ref().map(|(_, o)| o);
        if let (Some(g), Some(p)) = (&obs.gateway, previous.and_then(|p| p.gateway.as_ref())) {
            let before: HashMap<(&str, &str), (&str, bool)> = p
                .clusters
                .iter()
                .flat_map(|c| {
                    c.endpoints
                        .iter()
                        .map(move |e| ((c.name.as_str(), e.url.as_str()), (e.breaker, e.healthy)))
                })
                .collect();
            for c in &g.clusters {
                for e in &c.endpoints {
                    let Some((breaker, healthy)) = before.get(&(c.name.as_str(), e.url.as_str()))
                    else {
                        continue;
                    };
                    if *breaker != e.breaker {
                        let level = match e.breaker {
                            "open" => "error",
                            "half_open" => "warn",
                            _ => "info",
                        };
                        event(
                            "breaker",
                            level,
                            format!("breaker {} → {}", breaker, e.breaker),
                            Some(format!("cluster {}", c.name)),
                            Some(e.url.clone()),
                            None,
                        );
                    }
                    if *healthy != e.healthy {
                        event(
                            "health",
                            if e.healthy { "info" } else { "error" },
                            format!(
                                "endpoint {}",
                                if e.healthy { "healthy" } else { "unhealthy" }
                            ),
                            Some(format!("cluster {}", c.name)),
                            Some(e.url.clone()),
                            None,
                        );
                    }
                }
            }
        }
        if let Some(p) = previous {
            let before: HashMap<&str, &str> = p
                .health
                .iter()
                .map(|h| (h.name.as_str(), h.status))
                .collect();
            for h in &obs.health {
                if before.get(h.name.as_str()).is_some_and(|s| *s != h.status) {
                    event(
                        "health",
                        if h.status == "ok" { "info" } else { "error" },
                        format!("{} {}", h.name, h.status),
                        h.detail.clone(),
                        Some(h.name.clone()),
                        None,
                    );
                }
            }
        }
        if let (Some(g), Some(p)) = (&obs.gateway, previous.and_then(|p| p.gateway.as_ref())) {
            for k in g
                .signing_keys
                .iter()
                .filter(|k| !p.signing_keys.contains(k))
            {
                // The first fetch is no rotation.
                if !p.signing_keys.is_empty() {
                    event(
                        "key",
                        "info",
                        format!("signing key {k} published"),
                        Some("a key rotation: tokens it signs are accepted from now on".into()),
                        Some(k.clone()),
                        None,
                    );
                }
            }
            for k in p
                .signing_keys
                .iter()
                .filter(|k| !g.signing_keys.contains(k))
            {
                event(
                    "key",
                    "info",
                    format!("signing key {k} retired"),
                    None,
                    Some(k.clone()),
                    None,
                );
            }
        }
        if let Some(g) = &obs.gateway {
            for r in &g.reloads {
                if st.reload_seen.is_some_and(|s| r.seq <= s) {
                    continue;
                }
                let title = if r.ok {
                    format!("configuration version {} applied", r.version)
                } else {
                    format!("configuration refused; version {} serves on", r.version)
                };
                let detail = match &r.error {
                    Some(e) => Some(e.clone()),
                    None if !r.changes.is_empty() => Some(r.changes.join("; ")),
                    None => None,
                };
                event(
                    "reload",
                    if r.ok { "info" } else { "error" },
                    title,
                    detail,
                    Some(format!("v{}", r.version)),
                    None,
                );
            }
            if let Some(last) = g.reloads.iter().map(|r| r.seq).max() {
                st.reload_seen = Some(last);
            }
        }
        if let (Some(now), Some(before)) = (
            &obs.dead_letters,
            previous.and_then(|p| p.dead_letters.as_ref()),
        ) {
            let known: HashSet<&str> = before.iter().map(|d| d.id.as_str()).collect();
            for d in now.iter().filter(|d| !known.contains(d.id.as_str())) {
                event(
                    "dead_letter",
                    "error",
                    format!("dead letter on {} ({})", d.topic, d.consumer),
                    Some(d.reason.clone()),
                    d.subject.clone(),
                    d.user.clone(),
                );
            }
        }
        out
    }
}

/// A connected viewer: its place in the stream. Dropping it (the page went away, or fell
/// too far behind) counts it out.
pub(crate) struct Viewer {
    console: Weak<Inner>,
    pub(crate) rx: broadcast::Receiver<Arc<Frame>>,
}

impl Drop for Viewer {
    fn drop(&mut self) {
        if let Some(inner) = self.console.upgrade()
            && inner.viewers.fetch_sub(1, Ordering::SeqCst) == 1
        {
            inner
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .last_viewer_left = Some(Instant::now());
        }
    }
}

/// Samples once a second while somebody watches (and [`LINGER`] after); sleeps otherwise.
/// Ends with the console.
async fn sampler(weak: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let console = Console { inner };
        let idle = console.viewers() == 0
            && console
                .lock()
                .last_viewer_left
                .is_none_or(|t| t.elapsed() >= LINGER);
        if idle {
            let inner = console.inner.clone();
            drop(console);
            // Woken by the next viewer; checks now and then whether the console is gone.
            let _ = tokio::time::timeout(Duration::from_secs(30), inner.wake.notified()).await;
            drop(inner);
            tick.reset();
            continue;
        }
        console.sample().await;
        drop(console);
        tick.tick().await;
    }
}
