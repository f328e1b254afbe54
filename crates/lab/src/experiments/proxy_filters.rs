//! Proxy: what each of the gateway's filters costs it, in CPU per request.

use shopmesh_gateway::GatewayConfig;
use shopmesh_gateway::config::{RateLimitConfig, RateLimitKey};

use super::{Ctx, Measured, Meta};
use crate::cpu::{self, Worker};
use crate::report::{Figures, Group, Outcome, Verdict, num, signed};
use crate::shop::{LabShop, ShopSpec};
use crate::{LabError, Scale};

pub const META: Meta = Meta {
    id: "proxy.filters",
    group: Group::Proxy,
    claim: "Introduces additional performance overhead (the cost of each filter)",
    experiment: "the gateway's own CPU time per proxied stock lookup with routing alone, then with a per-caller rate limit, token verification (the verified-token cache off, then on) and all of them",
    method: "One gateway per filter set, each built from the shop's own configuration and run on one worker thread of its own (as `shopmesh gateway` runs each worker), in front of the shop's inventory service. Four clients at a time send the same GET /api/inventory/{id} with the same bearer token to each gateway in turn, after a warm-up on every one; five rounds take the gateways in turn, each round starting one gateway further on, so that all see the same machine and none is always first. The CPU time the kernel accounts to each gateway's thread (/proc/self/task/TID/schedstat) per request answered is that filter set's cost; the median of the rounds is kept, and a filter's cost is the difference from routing alone. Metrics are always on. The access log is left out: it writes to the lab's own standard output (bench/syscalls.sh and bench/proxy-vs-peers.sh price it).",
    rule: "Holds when the whole chain costs the gateway at least 5% more CPU per request than routing alone; refuted below that; inconclusive when the threads' CPU cannot be read (not Linux) or a request failed.",
    shops: &[ShopSpec::MAIN],
};

/// Requests in flight at once, per gateway.
const CLIENTS: usize = 4;
/// Rounds over every gateway, each starting one gateway further on (so that none is always
/// measured first); each filter set's figure is the median of its rounds.
const ROUNDS: usize = 5;

/// The filter sets, in the order they are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filters {
    /// Routing, the pooled upstream connection, metrics.
    Routing,
    /// + an in-memory token bucket per caller, high enough never to refuse.
    RateLimit,
    /// + a required bearer token, its signature checked on every request.
    TokenUncached,
    /// + a required bearer token through the verified-token cache (the default).
    TokenCached,
    /// Rate limit and cached token verification together.
    All,
}

impl Filters {
    pub const ALL: [Filters; 5] = [
        Filters::Routing,
        Filters::RateLimit,
        Filters::TokenUncached,
        Filters::TokenCached,
        Filters::All,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Filters::Routing => "routing",
            Filters::RateLimit => "rate_limit",
            Filters::TokenUncached => "token_uncached",
            Filters::TokenCached => "token_cached",
            Filters::All => "all",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Filters::Routing => "routing alone",
            Filters::RateLimit => "a rate limit",
            Filters::TokenUncached => "token verification (no cache)",
            Filters::TokenCached => "token verification (cached)",
            Filters::All => "the whole chain",
        }
    }

    /// The shop's gateway configuration with this filter set on its inventory route.
    fn config(self, shop: &LabShop) -> Result<GatewayConfig, LabError> {
        let mut g = shopmesh_shop::gateway_config(&shop.cfg, |n| shop.service(n));
        let limit = matches!(self, Filters::RateLimit | Filters::All);
        let token = matches!(
            self,
            Filters::TokenUncached | Filters::TokenCached | Filters::All
        );
        if let Some(jwt) = g.jwt.as_mut() {
            jwt.cache = self != Filters::TokenUncached;
        }
        let route = g
            .routes
            .iter_mut()
            .find(|r| r.name == "inventory")
            .ok_or_else(|| LabError::Shop("the shop's gateway has no inventory route".into()))?;
        route.auth.required = token;
        route.rate_limit = limit.then_some(RateLimitConfig {
            per_second: 1e6,
            burst: 1_000_000,
            key: RateLimitKey::User,
            shared: false,
        });
        Ok(g)
    }
}

pub fn steps(_: &Scale) -> u64 {
    ROUNDS as u64 + 1
}

/// One filter set's figure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    pub filters: Filters,
    /// CPU of its gateway's thread per request (µs), the median of the rounds; `None`
    /// when it could not be read.
    pub us: Option<f64>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let shop = ctx.shop(ShopSpec::MAIN)?;
    let (_, token) = shop.user().await?;
    let ids: Vec<&str> = shop.products.iter().map(|p| p.id.as_str()).collect();
    if ids.is_empty() {
        return Err(LabError::Shop("the shop has no products".into()));
    }
    let mut workers = Vec::new();
    for f in Filters::ALL {
        workers.push((f, Worker::start(f.config(shop)?)?));
    }
    let n = ctx.scale.cpu_requests;
    let lookups = |base: String, n: usize| {
        let (ids, token) = (&ids, &token);
        cpu::load(n, CLIENTS, move |i| {
            shop.http
                .get(format!("{base}/api/inventory/{}", ids[i % ids.len()]))
                .bearer_auth(token)
        })
    };
    // Connections opened, the signing keys fetched, caches filled, on every gateway.
    ctx.say("warming up");
    let mut failed = 0;
    for (_, w) in &workers {
        failed += lookups(w.base(), n / 4 + CLIENTS).await;
    }
    ctx.step("round 1");
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); workers.len()];
    for round in 0..ROUNDS {
        for j in 0..workers.len() {
            let k = (round + j) % workers.len();
            let w = &workers[k].1;
            let (f, us) = w.per(n, lookups(w.base(), n)).await;
            failed += f;
            samples[k].extend(us);
        }
        ctx.step(format!("round {} done", round + 1));
    }
    for (_, w) in workers.drain(..) {
        w.stop().await;
    }
    let costs: Vec<Cost> = Filters::ALL
        .iter()
        .zip(samples)
        .map(|(f, s)| Cost {
            filters: *f,
            us: median(s),
        })
        .collect();

    let mut figures = Figures::default();
    let base = costs[0].us;
    for c in &costs {
        if let Some(us) = c.us {
            figures.push(format!("{}.cpu_per_request", c.filters.key()), us, "µs");
            if let Some(b) = base
                && c.filters != Filters::Routing
            {
                figures.push(format!("{}.added", c.filters.key()), us - b, "µs");
            }
        }
    }
    figures.push("requests_each", (n * ROUNDS) as f64, "requests");
    figures.push("failed", failed as f64, "requests");
    let headline = match base {
        Some(b) => format!(
            "routing {} µs of CPU per request; {}",
            num(b),
            costs[1..]
                .iter()
                .map(|c| format!(
                    "{} {} µs",
                    c.filters.label(),
                    c.us.map(|u| signed(u - b)).unwrap_or_else(|| "n/a".into())
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "the gateway threads' CPU time could not be read".into(),
    };
    Ok(Measured {
        headline,
        verdict: verdict(&costs, failed),
        figures,
        charts: Vec::new(),
    })
}

/// The rule of [`META`].
pub fn verdict(costs: &[Cost], failed: usize) -> Verdict {
    let of = |f: Filters| costs.iter().find(|c| c.filters == f).and_then(|c| c.us);
    let (Some(routing), Some(all)) = (of(Filters::Routing), of(Filters::All)) else {
        return Verdict::new(
            Outcome::Inconclusive,
            "the CPU time of the gateways' threads could not be read (/proc/self/task)",
        );
    };
    if failed > 0 {
        return Verdict::new(Outcome::Inconclusive, format!("{failed} requests failed"));
    }
    let added = all - routing;
    let pct = |us: f64| signed((us - routing) / routing.max(f64::EPSILON) * 100.0);
    let mut because = format!(
        "the whole chain cost the gateway {} µs of CPU per request against {} µs for routing alone ({}%)",
        num(all),
        num(routing),
        pct(all)
    );
    if let Some(uncached) = of(Filters::TokenUncached) {
        because.push_str(&format!(
            "; a token's signature checked on every request (the cache off) {} µs ({}%)",
            num(uncached),
            pct(uncached)
        ));
    }
    if added >= 0.05 * routing {
        Verdict::new(Outcome::Holds, because)
    } else {
        Verdict::new(Outcome::Refuted, because)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(routing: Option<f64>, all: f64) -> Vec<Cost> {
        vec![
            Cost {
                filters: Filters::Routing,
                us: routing,
            },
            Cost {
                filters: Filters::All,
                us: Some(all),
            },
        ]
    }

    #[test]
    fn the_verdict_compares_the_whole_chain_with_routing_alone() {
        assert_eq!(verdict(&costs(Some(40.0), 50.0), 0).outcome, Outcome::Holds);
        assert_eq!(
            verdict(&costs(Some(40.0), 41.0), 0).outcome,
            Outcome::Refuted
        );
        assert_eq!(
            verdict(&costs(None, 50.0), 0).outcome,
            Outcome::Inconclusive
        );
        assert_eq!(
            verdict(&costs(Some(40.0), 50.0), 1).outcome,
            Outcome::Inconclusive
        );
    }

    #[test]
    fn the_median_of_the_rounds_is_kept() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(Vec::new()), None);
    }
}
