//! One generation of the gateway's configuration, compiled: routes, clusters, verifiers and
//! limiters. A reload builds a whole new generation next to the serving one and swaps it in
//! atomically; requests in flight finish on the generation they started on.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::aggregate::{Composite, Plan};
use crate::cluster::Cluster;
use crate::config::{AuthConfig, ConfigError, GatewayConfig, RateLimitKey};
use crate::jwt::JwtVerifier;
use crate::openapi::PublicDocument;
use crate::ratelimit::{Limiter, LocalLimiter, SharedStore};
use crate::router::Matcher;
use crate::traffic::{Mirror, Split};
use crate::wire::HttpClient;

/// Where a route's requests go.
pub enum Target {
    /// Proxied to one cluster.
    Cluster(Arc<Cluster>),
    /// Divided between versions of the upstream (gray release, A/B test).
    Split(Arc<Split>),
    /// Answered by a composite of several backend calls.
    Aggregate(Arc<Composite>),
    /// Answered by the gateway itself: the public API's OpenAPI document.
    Document(Arc<PublicDocument>),
}

pub struct Route {
    pub name: Arc<str>,
    pub matcher: Matcher,
    pub target: Target,
    pub strip_prefix: Option<String>,
    pub add_prefix: Option<String>,
    pub auth: AuthConfig,
    pub limiter: Option<Limiter>,
    pub limit_key: RateLimitKey,
    /// The route's `timeout_ms`: a proxied route's upstream answer timeout (else each
    /// cluster's own), a composite's deadline (else [`Route::deadline`]'s default).
    pub timeout: Option<Duration>,
    pub mirror: Option<Mirror>,
    /// Largest request body forwarded.
    pub max_body: u64,
    /// WebSocket upgrades are passed on.
    pub websocket: bool,
}

impl Route {
    /// How long a composite may take.
    pub fn deadline(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_AGGREGATE_TIMEOUT)
    }

    pub fn needs_identity(&self) -> bool {
        self.auth.required || !self.auth.roles.is_empty() || !self.auth.scopes.is_empty()
    }
}

/// Deadline of a composite whose route sets no `timeout_ms`.
const DEFAULT_AGGREGATE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ApiKey {
    pub name: String,
    pub roles: Vec<String>,
}

pub struct ApiKeys {
    pub header: http::HeaderName,
    by_hash: HashMap<[u8; 32], Arc<ApiKey>>,
}

impl ApiKeys {
    /// Looks a presented key up by its SHA-256.
    pub fn find(&self, presented: &[u8]) -> Option<Arc<ApiKey>> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        self.by_hash.get(&digest).cloned()
    }
}

pub struct Runtime {
    pub version: u64,
    pub loaded_at: SystemTime,
    pub config: GatewayConfig,
    pub routes: Vec<Route>,
    pub clusters: Vec<Arc<Cluster>>,
    pub jwt: Option<Arc<JwtVerifier>>,
    pub api_keys: Option<ApiKeys>,
    pub trusted_proxies: Vec<(IpAddr, u8)>,
    pub redis: Option<SharedStore>,
    /// TLS for new client connections (read from its files when this generation was built).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Stops this generation's health checks and housekeeping.
    pub stop: CancellationToken,
    /// The `route` label of requests no route matched (one allocation, so that its metric
    /// handles are found by identity like every route's).
    pub unmatched: Arc<str>,
    pub(crate) request_metrics: crate::observe::RequestMetrics,
    /// The public API document, when the configuration asks for one.
    pub document: Option<Arc<PublicDocument>>,
    /// The routes' path patterns as a tree: the candidates for a path in declaration order.
    pub route_index: crate::router::RouteIndex,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Runtime {
    /// Compiles a validated configuration, reusing what `previous` has that is unchanged:
    /// endpoints (with their health and breaker state), the JWKS cache, in-memory rate
    /// limit buckets and the Redis connection.
    pub fn build(
        cfg: GatewayConfig,
        version: u64,
        previous: Option<&Runtime>,
    ) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let clusters: Vec<Arc<Cluster>> = cfg
            .clusters
            .iter()
            .map(|c| {
                let prev = previous.and_then(|p| p.clusters.iter().find(|o| *o.name == *c.name));
                Cluster::new(c, prev.map(|a| &**a), cfg.worker_count())
                    .map(Arc::new)
                    .map_err(|reason| ConfigError::Cluster {
                        cluster: c.name.clone(),
                        reason,
                    })
            })
            .collect::<Result<_, _>>()?;

        let jwt = cfg.jwt.as_ref().map(|j| {
            previous
                .and_then(|p| p.jwt.clone())
                .filter(|v| v.config() == j)
                .unwrap_or_else(|| Arc::new(JwtVerifier::new(j.clone(), jwks_client())))
        });

        let api_keys = cfg.api_keys.as_ref().map(|k| ApiKeys {
            header: http::HeaderName::from_bytes(k.header.as_bytes())
                .unwrap_or(http::HeaderName::from_static("x-api-key")),
            by_hash: k
                .keys
                .iter()
                .filter_map(|key| {
                    Some((
                        <[u8; 32] as hex::FromHex>::from_hex(&key.sha256).ok()?,
                        Arc::new(ApiKey {
                            name: key.name.clone(),
                            roles: key.roles.clone(),
                        }),
                    ))
                })
                .collect(),
        });

        let redis = match &cfg.redis {
            None => None,
            Some(r) => Some(
                match previous
                    .and_then(|p| p.redis.clone())
                    .filter(|s| s.cfg == *r)
                {
                    Some(s) => s,
                    None => SharedStore::new(r)
                        .map_err(|e| ConfigError::Invalid(format!("redis: {e}")))?,
                },
            ),
        };

        let mut routes = Vec::with_capacity(cfg.routes.len() + 1);
        // The public API document comes before every route.
        let document = cfg.openapi.as_ref().map(|o| {
            (
                o.path.clone(),
                Arc::new(PublicDocument::new(Arc::new(cfg.clone()), jwks_client())),
            )
        });
        if let Some((path, doc)) = &document {
            let matcher = Matcher::new(&crate::config::RouteMatch {
                exact: Some(path.clone()),
                methods: vec!["GET".into(), "HEAD".into()],
                ..Default::default()
            })
            .map_err(ConfigError::Invalid)?;
            routes.push(Route {
                name: "openapi".into(),
                matcher,
                timeout: None,
                mirror: None,
                max_body: 0,
                websocket: false,
                target: Target::Document(doc.clone()),
                strip_prefix: None,
                add_prefix: None,
                auth: AuthConfig::default(),
                limit_key: RateLimitKey::default(),
                limiter: None,
            });
        }
        for r in &cfg.routes {
            let err = |reason: String| ConfigError::Route {
                route: r.name.clone(),
                reason,
            };
            let find = |name: &str| clusters.iter().find(|c| *c.name == *name).cloned();
            let target = match (&r.cluster, &r.split, &r.aggregate) {
                (Some(name), _, _) => Target::Cluster(
                    find(name).ok_or_else(|| err(format!("unknown cluster `{name}`")))?,
                ),
                (None, Some(s), _) => {
                    Target::Split(Arc::new(Split::new(s, &r.name, &find).map_err(err)?))
                }
                (None, None, Some(a)) => {
                    let plan =
                        Plan::compile(a, &|c| find(c).is_some(), r.matches.template.as_deref())
                            .map_err(err)?;
                    let previous = previous.and_then(|p| {
                        p.routes.iter().find_map(|o| match &o.target {
                            Target::Aggregate(c) if *o.name == *r.name => Some(c.clone()),
                            _ => None,
                        })
                    });
                    let composite =
                        Composite::new(r.name.as_str().into(), plan, &find, previous.as_deref())
                            .map_err(err)?;
                    Target::Aggregate(Arc::new(composite))
                }
                (None, None, None) => {
                    return Err(err(
                        "needs exactly one of `cluster`, `split` and `aggregate`".into(),
                    ));
                }
            };
            let matcher = Matcher::new(&r.effective_match()).map_err(err)?;
            let limiter = match &r.rate_limit {
                None => None,
                Some(rl) if rl.shared => Some(Limiter::Shared {
                    store: redis
                        .clone()
                        .ok_or_else(|| err("rate_limit.shared needs `redis`".into()))?,
                    cfg: rl.clone(),
                }),
                Some(rl) => {
                    let kept = previous.and_then(|p| {
                        p.routes.iter().find_map(|o| match &o.limiter {
                            Some(Limiter::Local(l)) if *o.name == *r.name && l.cfg == *rl => {
                                Some(l.clone())
                            }
                            _ => None,
                        })
                    });
                    Some(Limiter::Local(
                        kept.unwrap_or_else(|| Arc::new(LocalLimiter::new(rl.clone()))),
                    ))
                }
            };
            let mirror = match &r.mirror {
                None => None,
                Some(m) => Some(Mirror::new(
                    m,
                    &r.name,
                    find(&m.cluster)
                        .ok_or_else(|| err(format!("mirror: unknown cluster `{}`", m.cluster)))?,
                )),
            };
            routes.push(Route {
                name: r.name.as_str().into(),
                matcher,
                timeout: r.timeout_ms.map(Duration::from_millis),
                mirror,
                max_body: r.max_body_bytes.unwrap_or(cfg.limits.max_body_bytes),
                websocket: r.websocket,
                target,
                strip_prefix: r.rewrite.as_ref().and_then(|w| w.strip_prefix.clone()),
                add_prefix: r.rewrite.as_ref().and_then(|w| w.add_prefix.clone()),
                auth: r.auth.clone(),
                limit_key: r.rate_limit.as_ref().map(|l| l.key).unwrap_or_default(),
                limiter,
            });
        }

        let tls = cfg
            .tls
            .as_ref()
            .map(crate::tls::acceptor)
            .transpose()
            .map_err(ConfigError::Invalid)?;
        let trusted_proxies = cfg
            .trusted_proxies
            .iter()
            .filter_map(|p| crate::config::parse_cidr(p))
            .collect();
        let route_index = crate::router::RouteIndex::new(routes.iter().map(|r| &r.matcher));
        Ok(Self {
            version,
            loaded_at: SystemTime::now(),
            routes,
            clusters,
            jwt,
            api_keys,
            trusted_proxies,
            redis,
            tls,
            stop: CancellationToken::new(),
            unmatched: "unmatched".into(),
            request_metrics: Default::default(),
            document: document.map(|(_, d)| d),
            route_index,
            config: cfg,
        })
    }

    /// Starts this generation's background work: health checks, limiter housekeeping.
    pub fn start(&self) {
        for c in &self.clusters {
            c.start_health_checks(&self.stop);
        }
        if let Some(jwt) = &self.jwt {
            // The first tick is immediate: the keys are there before the first token.
            let j = jwt.clone();
            self.every(
                Duration::from_millis(jwt.config().jwks_refresh_ms),
                move || {
                    let j = j.clone();
                    async move {
                        let _ = j.refresh_scheduled().await;
                    }
                },
            );
            if let Some(url) = jwt.config().revocations_url.clone() {
                let j = jwt.clone();
                let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
                self.every(Duration::from_millis(jwt.config().revocations_poll_ms), move || {
                    let (j, url, failing) = (j.clone(), url.clone(), failing.clone());
                    async move {
                        use std::sync::atomic::Ordering::Relaxed;
                        match j.poll_revocations(&url).await {
                            Ok(n) => {
                                if failing.swap(false, Relaxed) {
                                    tracing::info!(revoked = n, "revocation list fetched again");
                                }
                                metrics::gauge!("gateway_revoked_subjects").set(n as f64);
                            }
                            Err(e) => {
                                if !failing.swap(true, Relaxed) {
                                    tracing::warn!(error = %e, "revocation list fetch failed; the last list stays in force");
                                }
                                metrics::counter!("gateway_revocation_fetch_errors_total")
                                    .increment(1);
                            }
                        }
                    }
                });
            }
        }
        let locals: Vec<Arc<LocalLimiter>> = self
            .routes
            .iter()
            .filter_map(|r| match &r.limiter {
                Some(Limiter::Local(l)) => Some(l.clone()),
                _ => None,
            })
            .collect();
        if !locals.is_empty() {
            let locals = Arc::new(locals);
            self.every(Duration::from_secs(10), move || {
                let locals = locals.clone();
                async move { locals.iter().for_each(|l| l.housekeep()) }
            });
        }
    }

    /// Runs `job` every `period` (the first time at once) until this generation stops.
    fn every<F, Fut>(&self, period: Duration, mut job: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => job().await,
                }
            }
        });
    }

    /// Whether `ip` is one of the configured trusted proxies.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies
            .iter()
            .any(|(net, len)| in_cidr(ip, *net, *len))
    }
}

/// The HTTP client the gateway fetches JWKS and revocation lists with.
pub fn jwks_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new()).build(connector)
}

fn in_cidr(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_membership() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_cidr(ip("10.1.2.3"), ip("10.0.0.0"), 8));
        assert!(!in_cidr(ip("11.1.2.3"), ip("10.0.0.0"), 8));
        assert!(in_cidr(ip("::ffff:10.1.2.3"), ip("10.0.0.0"), 8));
        assert!(in_cidr(ip("127.0.0.1"), ip("127.0.0.1"), 32));
        assert!(in_cidr(ip("fd00::1"), ip("fd00::"), 8));
        assert!(in_cidr(ip("1.2.3.4"), ip("0.0.0.0"), 0));
    }
}
