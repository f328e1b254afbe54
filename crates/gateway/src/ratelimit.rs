//! Rate limits: token buckets (GCRA) per route and key, in memory (governor) or shared by
//! every gateway through Redis (one atomic script call per decision, Redis's own clock).
//!
//! Both count the same way: `per_second` tokens refill the bucket, `burst` is its size. A
//! shared limit whose Redis does not answer within `timeout_ms` lets the request through
//! (counted in `gateway_ratelimit_errors_total`): a cache outage must not take the site down.

use std::num::NonZeroU32;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::{RateLimitConfig, RedisConfig};

/// The outcome of one decision, with what the `RateLimit-*` headers report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// When denied: until one request fits.
    pub retry_after: Duration,
}

impl Decision {
    fn unlimited(limit: u32) -> Self {
        Self {
            allowed: true,
            limit,
            remaining: limit,
            reset: Duration::ZERO,
            retry_after: Duration::ZERO,
        }
    }
}

fn interval(cfg: &RateLimitConfig) -> Duration {
    Duration::from_secs_f64(1.0 / cfg.per_second).max(Duration::from_nanos(1))
}

/// An in-memory limiter for one route.
pub struct LocalLimiter {
    pub cfg: RateLimitConfig,
    limiter: DefaultKeyedRateLimiter<String, StateInformationMiddleware>,
    clock: DefaultClock,
}

impl LocalLimiter {
    pub fn new(cfg: RateLimitConfig) -> Self {
        let burst = NonZeroU32::new(cfg.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(interval(&cfg))
            .unwrap_or_else(|| Quota::per_second(burst))
            .allow_burst(burst);
        Self {
            limiter: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
            clock: DefaultClock::default(),
            cfg,
        }
    }

    pub fn check(&self, key: &str) -> Decision {
        let t = interval(&self.cfg);
        // The map is keyed by owned strings; most keys are short.
        match self.limiter.check_key(&key.to_owned()) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision {
                    allowed: true,
                    limit: self.cfg.burst,
                    remaining,
                    reset: t * (self.cfg.burst - remaining.min(self.cfg.burst)),
                    retry_after: Duration::ZERO,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Decision {
                    allowed: false,
                    limit: self.cfg.burst,
                    remaining: 0,
                    reset: wait + t * self.cfg.burst.saturating_sub(1),
                    retry_after: wait,
                }
            }
        }
    }

    /// Forgets keys whose buckets are full again (bounds memory).
    pub fn housekeep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn keys(&self) -> usize {
        self.limiter.len()
    }
}

/// GCRA in one script: the theoretical arrival time (TAT) per key, on Redis's clock.
/// Returns {allowed, retry_after_us, remaining, reset_us}.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tau = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tau
if allow_at > now then
  return {0, allow_at - now, 0, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0, math.floor((now - allow_at) / interval), new_tat - now}
"#;

static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(GCRA));

/// A connection to the Redis that shared limits live in. Cheap to clone.
#[derive(Clone)]
pub struct SharedStore {
    pub cfg: RedisConfig,
    conn: ConnectionManager,
    timeout: Duration,
}

impl SharedStore {
    /// Connects lazily: a Redis that is down at start-up does not stop the gateway.
    pub fn new(cfg: &RedisConfig) -> Result<Self, String> {
        let client = redis::Client::open(cfg.url.as_str()).map_err(|e| e.to_string())?;
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let mc = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_secs(1));
        let conn =
            ConnectionManager::new_lazy_with_config(client, mc).map_err(|e| e.to_string())?;
        Ok(Self {
            cfg: cfg.clone(),
            conn,
            timeout,
        })
    }

    /// Whether Redis answers a `PING` within the configured timeout.
    pub async fn ping(&self) -> Result<(), String> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        match tokio::time::timeout(self.timeout, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    pub async fn check(&self, route: &str, cfg: &RateLimitConfig, key: &str) -> Decision {
        let interval_us = (1_000_000.0 / cfg.per_second).max(1.0).round() as u64;
        let mut conn = self.conn.clone();
        let redis_key = format!("shopmesh:ratelimit:{route}:{key}");
        let mut inv = SCRIPT.key(redis_key);
        inv.arg(interval_us).arg(cfg.burst);
        let call = inv.invoke_async::<(i64, i64, i64, i64)>(&mut conn);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok((allowed, retry_us, remaining, reset_us))) => Decision {
                allowed: allowed == 1,
                limit: cfg.burst,
                remaining: remaining.clamp(0, cfg.burst as i64) as u32,
                reset: Duration::from_micros(reset_us.max(0) as u64),
                retry_after: Duration::from_micros(retry_us.max(0) as u64),
            },
            Ok(Err(e)) => {
                metrics::counter!("gateway_ratelimit_errors_total", "route" => route.to_owned())
                    .increment(1);
                tracing::warn!(error = %e, route, "shared rate limit unavailable; request let through");
                Decision::unlimited(cfg.burst)
            }
            Err(_) => {
                metrics::counter!("gateway_ratelimit_errors_total", "route" => route.to_owned())
                    .increment(1);
                tracing::warn!(route, "shared rate limit timed out; request let through");
                Decision::unlimited(cfg.burst)
            }
        }
    }
}

/// The limiter of one route.
pub enum Limiter {
    Local(Arc<LocalLimiter>),
    Shared {
        store: SharedStore,
        cfg: RateLimitConfig,
    },
}

impl Limiter {
    pub fn cfg(&self) -> &RateLimitConfig {
        match self {
            Limiter::Local(l) => &l.cfg,
            Limiter::Shared { cfg, .. } => cfg,
        }
    }

    pub async fn check(&self, route: &str, key: &str) -> Decision {
        match self {
            Limiter::Local(l) => l.check(key),
            Limiter::Shared { store, cfg } => store.check(route, cfg, key).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(per_second: f64, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            per_second,
            burst,
            key: Default::default(),
            shared: false,
        }
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let l = LocalLimiter::new(cfg(1.0, 3));
        let d: Vec<Decision> = (0..4).map(|_| l.check("a")).collect();
        assert!(d[..3].iter().all(|d| d.allowed));
        assert_eq!(d[0].remaining, 2);
        assert_eq!(d[2].remaining, 0);
        assert!(!d[3].allowed);
        assert!(d[3].retry_after > Duration::from_millis(900));
        assert!(d[3].retry_after <= Duration::from_secs(1));
        // Keys are independent.
        assert!(l.check("b").allowed);
        assert_eq!(l.keys(), 2);
    }

    #[test]
    fn fractional_rates_work() {
        let l = LocalLimiter::new(cfg(0.5, 1));
        assert!(l.check("a").allowed);
        let d = l.check("a");
        assert!(!d.allowed);
        assert!(d.retry_after > Duration::from_millis(1900), "{d:?}");
    }
}
