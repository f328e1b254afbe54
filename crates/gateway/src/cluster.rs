//! Clusters of upstream endpoints: load balancing, active health checks, per-endpoint
//! circuit breakers, and the retry budget.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;
use tower::retry::budget::{Budget, TpsBudget};

use crate::breaker::{Breaker, Permit, State};
use crate::config::{
    BreakerConfig, ClusterConfig, HashOn, HealthCheckConfig, LoadBalancer, UpstreamProtocol,
};
use crate::upstream::{Kept, Settings};
use smallvec::SmallVec;

use crate::wire::{HttpClient, empty};
use crate::worker::PerWorker;

/// One upstream endpoint. Survives reloads that keep it (same cluster, URL and breaker
/// settings), so its health and breaker state are not forgotten.
#[derive(Debug)]
pub struct Endpoint {
    pub url: Arc<str>,
    pub scheme: Scheme,
    pub authority: Authority,
    pub breaker: Breaker,
    breaker_cfg: BreakerConfig,
    healthy: AtomicBool,
    /// Requests in flight, counted per worker (summed when read).
    in_flight: PerWorker<AtomicUsize>,
    probe_ok: AtomicU32,
    probe_fail: AtomicU32,
    /// Unix milliseconds of the last active health check's answer (0: none yet).
    last_check: AtomicU64,
    /// Idle HTTP/1 connections to it, per worker (proxied requests and part calls).
    pub kept: Arc<Kept>,
}

impl Endpoint {
    fn new(url: &str, breaker: BreakerConfig, workers: usize) -> Option<Self> {
        let parts = url.parse::<http::Uri>().ok()?.into_parts();
        let authority = parts.authority?;
        Some(Self {
            kept: Arc::new(Kept::new(&authority)),
            url: url.trim_end_matches('/').into(),
            scheme: parts.scheme.unwrap_or(Scheme::HTTP),
            authority,
            breaker: Breaker::new(breaker.clone()),
            breaker_cfg: breaker,
            healthy: AtomicBool::new(true),
            in_flight: PerWorker::new(workers, |_| AtomicUsize::default()),
            probe_ok: AtomicU32::new(0),
            probe_fail: AtomicU32::new(0),
            last_check: AtomicU64::new(0),
        })
    }

    /// Passing active health checks (always true without them).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .fold(0, usize::wrapping_add)
    }

    /// When the last active health check answered, in Unix milliseconds.
    pub fn last_check(&self) -> Option<u64> {
        Some(self.last_check.load(Ordering::Relaxed)).filter(|t| *t > 0)
    }

    fn usable(&self) -> bool {
        self.is_healthy() && self.breaker.is_available()
    }
}

/// A request in flight to an endpoint; counts toward least-request balancing until dropped.
pub struct Lease {
    pub endpoint: Arc<Endpoint>,
    /// Taken by [`Lease::finish`]; a lease dropped without an outcome gives it back.
    permit: Option<Permit>,
    cluster: Arc<str>,
    /// The worker whose `in_flight` count it is in.
    worker: usize,
}

impl Lease {
    /// Reports the outcome to the endpoint's breaker.
    pub fn finish(mut self, success: bool) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        if let Some(state) = self.endpoint.breaker.record(permit, success) {
            tracing::warn!(cluster = &*self.cluster, endpoint = %self.endpoint.url, state = state.as_str(), "circuit breaker changed state");
            breaker_gauge(&self.cluster, &self.endpoint, state);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.endpoint
            .in_flight
            .at(self.worker)
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(permit) = self.permit.take() {
            self.endpoint.breaker.release(permit);
        }
    }
}

fn breaker_gauge(cluster: &str, e: &Endpoint, state: State) {
    metrics::gauge!("gateway_breaker_state", "cluster" => cluster.to_owned(), "endpoint" => e.url.clone())
        .set(state.gauge());
}

pub struct Cluster {
    pub name: Arc<str>,
    pub endpoints: Vec<Arc<Endpoint>>,
    lb: LoadBalancer,
    pub hash_on: Option<HashOn>,
    /// The round-robin cursor, per worker (each worker goes round on its own).
    next: PerWorker<AtomicUsize>,
    /// One connection pool per worker thread (index 0: the main runtime, health checks),
    /// so a worker's requests only ever use connections its own runtime drives.
    clients: Box<[HttpClient]>,
    pub request_timeout: Duration,
    pub retry_attempts: u32,
    /// The retry budget, per worker: each worker holds its share of `min_per_sec`, the
    /// threads off the workers all of it; the percentage is the same (a worker's retries
    /// are a share of its own requests).
    budget: PerWorker<TpsBudget>,
    health: Option<HealthCheckConfig>,
    protocol: UpstreamProtocol,
    /// How connections to HTTP/1 endpoints are made and kept (see `upstream`).
    pub upstream: Settings,
    pub connector: HttpConnector,
}

impl Cluster {
    /// Builds a cluster for `workers` worker threads, reusing endpoints from `previous`
    /// where they are unchanged.
    pub fn new(
        cfg: &ClusterConfig,
        previous: Option<&Cluster>,
        workers: usize,
    ) -> Result<Self, String> {
        let endpoints: Vec<Arc<Endpoint>> = cfg
            .endpoints
            .iter()
            .map(|url| {
                let url_norm = url.trim_end_matches('/');
                let reused = previous.and_then(|p| {
                    p.endpoints
                        .iter()
                        .find(|e| *e.url == *url_norm && e.breaker_cfg == cfg.circuit_breaker)
                        .cloned()
                });
                match reused {
                    Some(e) => Ok(e),
                    None => Endpoint::new(url, cfg.circuit_breaker.clone(), workers)
                        .map(Arc::new)
                        .ok_or_else(|| format!("endpoint `{url}` is not a valid URL")),
                }
            })
            .collect::<Result<Vec<_>, String>>()?;
        if cfg.health_check.is_none() {
            // Without active checks nothing would ever bring a kept endpoint back.
            for e in &endpoints {
                e.healthy.store(true, Ordering::Relaxed);
                e.probe_ok.store(0, Ordering::Relaxed);
                e.probe_fail.store(0, Ordering::Relaxed);
            }
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_millis(cfg.timeouts.connect_ms)));
        let clients = (0..=workers)
            .map(|_| {
                let mut b = Client::builder(TokioExecutor::new());
                b.pool_idle_timeout(Duration::from_millis(cfg.timeouts.idle_ms))
                    .pool_max_idle_per_host(cfg.timeouts.max_idle_per_endpoint);
                if cfg.protocol == UpstreamProtocol::H2c {
                    b.http2_only(true)
                        .timer(hyper_util::rt::TokioTimer::new())
                        .http2_keep_alive_interval(Duration::from_secs(20))
                        .http2_keep_alive_timeout(Duration::from_secs(10));
                }
                b.build(connector.clone())
            })
            .collect();
        let r = &cfg.retry;
        Ok(Self {
            name: cfg.name.as_str().into(),
            endpoints,
            lb: cfg.load_balancer,
            hash_on: cfg.hash_on.clone(),
            next: PerWorker::new(workers, |_| AtomicUsize::default()),
            clients,
            request_timeout: Duration::from_millis(cfg.timeouts.request_ms),
            retry_attempts: r.attempts,
            budget: PerWorker::new(workers, |i| {
                // Off the workers (`shopmesh up`'s shared runtime, the mesh): the whole floor.
                let min = if i == 0 {
                    r.min_per_sec
                } else {
                    r.min_per_sec.div_ceil(workers.max(1) as u32)
                };
                TpsBudget::new(Duration::from_secs(10), min, r.budget_percent / 100.0)
            }),
            health: cfg.health_check.clone(),
            protocol: cfg.protocol,
            upstream: Settings {
                idle: Duration::from_millis(cfg.timeouts.idle_ms),
                max_idle: cfg.timeouts.max_idle_per_endpoint,
            },
            connector,
        })
    }

    /// The HTTP version requests to this cluster's endpoints are sent with.
    pub fn version(&self) -> http::Version {
        match self.protocol {
            UpstreamProtocol::Http1 => http::Version::HTTP_11,
            UpstreamProtocol::H2c => http::Version::HTTP_2,
        }
    }

    /// The connection pool of the calling worker thread.
    pub fn client(&self) -> &HttpClient {
        &self.clients[crate::worker::worker_index().min(self.clients.len() - 1)]
    }

    /// Counts a first attempt toward the retry budget.
    pub fn deposit(&self) {
        self.budget.mine().deposit();
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        self.budget.mine().withdraw()
    }

    /// Chooses an endpoint for one request. `avoid` is skipped when another is usable (a
    /// retry goes elsewhere). `None` when every endpoint is down or its breaker open.
    pub fn pick(&self, hash_key: Option<&[u8]>, avoid: Option<&Endpoint>) -> Option<Lease> {
        let usable: SmallVec<[&Arc<Endpoint>; 8]> = self
            .endpoints
            .iter()
            .filter(|e| e.usable() && avoid.is_none_or(|a| !std::ptr::eq(a, &***e)))
            .collect();
        let usable = if usable.is_empty() && avoid.is_some() {
            self.endpoints.iter().filter(|e| e.usable()).collect()
        } else {
            usable
        };
        if usable.is_empty() {
            return None;
        }
        let first = match (self.lb, hash_key) {
            (LoadBalancer::ConsistentHash, Some(key)) => rendezvous(&usable, key),
            (LoadBalancer::LeastRequest, _) if usable.len() > 1 => {
                let a = rand::random::<u32>() as usize % usable.len();
                let mut b = rand::random::<u32>() as usize % (usable.len() - 1);
                if b >= a {
                    b += 1;
                }
                if usable[b].in_flight() < usable[a].in_flight() {
                    b
                } else {
                    a
                }
            }
            _ => self.next.mine().fetch_add(1, Ordering::Relaxed) % usable.len(),
        };
        // The chosen one may have just used up its half-open probes: try the others.
        for i in 0..usable.len() {
            let e = usable[(first + i) % usable.len()];
            if let Some(permit) = e.breaker.try_acquire() {
                let worker = crate::worker::worker_index();
                e.in_flight.at(worker).fetch_add(1, Ordering::Relaxed);
                return Some(Lease {
                    endpoint: e.clone(),
                    permit: Some(permit),
                    cluster: self.name.clone(),
                    worker,
                });
            }
        }
        None
    }

    /// Starts the active health checks; they stop when `stop` is cancelled.
    pub fn start_health_checks(&self, stop: &CancellationToken) {
        for e in &self.endpoints {
            metrics::gauge!("gateway_upstream_healthy", "cluster" => self.name.to_string(), "endpoint" => e.url.clone())
                .set(if e.is_healthy() { 1.0 } else { 0.0 });
            breaker_gauge(&self.name, e, e.breaker.state());
            let Some(hc) = self.health.clone() else {
                continue;
            };
            let (e, client, stop, cluster) = (
                e.clone(),
                self.clients[0].clone(),
                stop.clone(),
                self.name.clone(),
            );
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(hc.interval_ms));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let ok = probe(&client, &e, &hc).await;
                    update_health(&cluster, &e, &hc, ok);
                }
            });
        }
    }
}

async fn probe(client: &HttpClient, e: &Endpoint, hc: &HealthCheckConfig) -> bool {
    let Ok(req) = http::Request::get(format!("{}{}", e.url, hc.path))
        .header(http::header::USER_AGENT, "shopmesh-health-check")
        .body(empty())
    else {
        return false;
    };
    match tokio::time::timeout(Duration::from_millis(hc.timeout_ms), client.request(req)).await {
        Ok(Ok(res)) => res.status().is_success(),
        _ => false,
    }
}

fn update_health(cluster: &str, e: &Endpoint, hc: &HealthCheckConfig, ok: bool) {
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    e.last_check.store(at, Ordering::Relaxed);
    let (ok_n, fail_n) = if ok {
        e.probe_fail.store(0, Ordering::Relaxed);
        (e.probe_ok.fetch_add(1, Ordering::Relaxed) + 1, 0)
    } else {
        e.probe_ok.store(0, Ordering::Relaxed);
        (0, e.probe_fail.fetch_add(1, Ordering::Relaxed) + 1)
    };
    let was = e.is_healthy();
    let now = if was {
        fail_n < hc.unhealthy_threshold
    } else {
        ok_n >= hc.healthy_threshold
    };
    if now != was {
        e.healthy.store(now, Ordering::Relaxed);
        tracing::warn!(cluster, endpoint = %e.url, healthy = now, "endpoint health changed");
        metrics::gauge!("gateway_upstream_healthy", "cluster" => cluster.to_owned(), "endpoint" => e.url.clone())
            .set(if now { 1.0 } else { 0.0 });
    }
}

/// Highest-random-weight hashing: removing an endpoint moves only its own clients.
fn rendezvous(endpoints: &[&Arc<Endpoint>], key: &[u8]) -> usize {
    let mut best = (0u64, 0usize);
    for (i, e) in endpoints.iter().enumerate() {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        e.url.hash(&mut h);
        let w = h.finish();
        if i == 0 || w > best.0 {
            best = (w, i);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(lb: LoadBalancer, n: usize) -> Cluster {
        let cfg = ClusterConfig {
            name: "c".into(),
            endpoints: (0..n)
                .map(|i| format!("http://127.0.0.1:{}", 9000 + i))
                .collect(),
            load_balancer: lb,
            hash_on: None,
            health_check: None,
            circuit_breaker: BreakerConfig::default(),
            timeouts: Default::default(),
            retry: Default::default(),
            protocol: Default::default(),
            openapi: None,
        };
        Cluster::new(&cfg, None, 1).unwrap()
    }

    #[tokio::test]
    async fn round_robin_spreads_evenly() {
        let c = cluster(LoadBalancer::RoundRobin, 3);
        let mut counts = [0; 3];
        for _ in 0..300 {
            let l = c.pick(None, None).unwrap();
            counts[(l.endpoint.authority.port_u16().unwrap() - 9000) as usize] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[tokio::test]
    async fn least_request_avoids_the_busy_endpoint() {
        let c = cluster(LoadBalancer::LeastRequest, 2);
        // Hold many requests on whichever endpoint is picked first.
        let first = c.pick(None, None).unwrap();
        let busy = first.endpoint.url.clone();
        let mut held = vec![first];
        for _ in 0..50 {
            let l = c.pick(None, None).unwrap();
            if l.endpoint.url == busy {
                held.push(l);
            }
        }
        for _ in 0..100 {
            let l = c.pick(None, None).unwrap();
            assert_ne!(l.endpoint.url, busy, "p2c over two picks the idle one");
        }
    }

    #[tokio::test]
    async fn consistent_hash_sticks_and_moves_only_the_lost_keys() {
        let c = cluster(LoadBalancer::ConsistentHash, 4);
        let before: Vec<Arc<str>> = (0..200)
            .map(|k| {
                c.pick(Some(format!("user-{k}").as_bytes()), None)
                    .unwrap()
                    .endpoint
                    .url
                    .clone()
            })
            .collect();
        let again: Vec<Arc<str>> = (0..200)
            .map(|k| {
                c.pick(Some(format!("user-{k}").as_bytes()), None)
                    .unwrap()
                    .endpoint
                    .url
                    .clone()
            })
            .collect();
        assert_eq!(before, again);
        let down = c.endpoints[1].clone();
        down.healthy.store(false, Ordering::Relaxed);
        for (k, was) in before.iter().enumerate() {
            let now = c
                .pick(Some(format!("user-{k}").as_bytes()), None)
                .unwrap()
                .endpoint
                .url
                .clone();
            if *was != down.url {
                assert_eq!(&now, was, "key {k} moved though its endpoint is up");
            } else {
                assert_ne!(now, down.url);
            }
        }
    }

    #[tokio::test]
    async fn open_breakers_and_unhealthy_endpoints_are_skipped() {
        let c = cluster(LoadBalancer::RoundRobin, 2);
        c.endpoints[0].healthy.store(false, Ordering::Relaxed);
        for _ in 0..10 {
            assert_eq!(c.pick(None, None).unwrap().endpoint.url, c.endpoints[1].url);
        }
        for _ in 0..5 {
            c.pick(None, None).unwrap().finish(false);
        }
        assert!(
            c.pick(None, None).is_none(),
            "all out: the caller answers 503"
        );
    }

    #[tokio::test]
    async fn retries_avoid_the_failed_endpoint_when_they_can() {
        let c = cluster(LoadBalancer::RoundRobin, 2);
        let e0 = c.endpoints[0].clone();
        for _ in 0..10 {
            assert_ne!(c.pick(None, Some(&e0)).unwrap().endpoint.url, e0.url);
        }
        let single = cluster(LoadBalancer::RoundRobin, 1);
        let only = single.endpoints[0].clone();
        assert!(single.pick(None, Some(&only)).is_some());
    }

    #[tokio::test]
    async fn endpoints_survive_a_rebuild() {
        let c = cluster(LoadBalancer::RoundRobin, 2);
        c.endpoints[0].healthy.store(false, Ordering::Relaxed);
        let cfg = ClusterConfig {
            name: "c".into(),
            endpoints: vec![
                "http://127.0.0.1:9000".into(),
                "http://127.0.0.1:9005".into(),
            ],
            load_balancer: LoadBalancer::RoundRobin,
            hash_on: None,
            health_check: Some(HealthCheckConfig {
                path: "/healthz".into(),
                interval_ms: 1000,
                timeout_ms: 100,
                unhealthy_threshold: 1,
                healthy_threshold: 1,
            }),
            circuit_breaker: BreakerConfig::default(),
            timeouts: Default::default(),
            retry: Default::default(),
            protocol: Default::default(),
            openapi: None,
        };
        let next = Cluster::new(&cfg, Some(&c), 1).unwrap();
        assert!(Arc::ptr_eq(&next.endpoints[0], &c.endpoints[0]));
        assert!(!next.endpoints[0].is_healthy(), "health is kept");
        assert!(next.endpoints[1].is_healthy());
        // Without health checks nothing could bring it back: it is reset to healthy.
        let unchecked = ClusterConfig {
            health_check: None,
            ..cfg
        };
        let last = Cluster::new(&unchecked, Some(&next), 1).unwrap();
        assert!(Arc::ptr_eq(&last.endpoints[0], &c.endpoints[0]));
        assert!(last.endpoints[0].is_healthy());
    }

    /// Each worker holds its share of the retry floor; threads off the workers (the shared
    /// runtime of `shopmesh up`) hold all of it.
    #[test]
    fn the_retry_floor_is_shared_among_the_workers_only() {
        let mut cfg = ClusterConfig::new("c", vec!["http://127.0.0.1:1".into()]);
        cfg.retry.min_per_sec = 10;
        cfg.retry.budget_percent = 0.0;
        let c = Cluster::new(&cfg, None, 2).unwrap();
        let spend = |c: &Cluster| (0..1000).take_while(|_| c.withdraw()).count();
        let off = spend(&c);
        let on_a_worker = std::thread::scope(|s| {
            s.spawn(|| {
                crate::worker::enter_worker(1);
                spend(&c)
            })
            .join()
            .unwrap()
        });
        assert!(off > 0 && on_a_worker > 0);
        assert_eq!(off, 2 * on_a_worker, "off {off}, worker 1 {on_a_worker}");
    }
}
