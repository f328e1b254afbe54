//! Aggregation: one slow part, slowed step by step — does the page wait for it, and for how
//! long?

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;
use shopmesh_gateway::GatewayConfig;
use shopmesh_gateway::config::RouteConfig;
use shopmesh_shop::ServiceName;

use super::{Ctx, Measured, Meta, product_window};
use crate::load::Summary;
use crate::relay::Relay;
use crate::report::{Chart, Figures, Group, Outcome, Series, Verdict, num};
use crate::shop::{ShopSpec, client, redirect};
use crate::{LabError, Scale};

pub const META: Meta = Meta {
    id: "aggregation.slow-part",
    group: Group::Aggregation,
    claim: "Complex aggregation logic may cause slow responses",
    experiment: "the product page's price part slowed step by step (0 → 2 s): page latency and completeness",
    method: "A delaying relay sits between the lab's gateway and the pricing service (the shop's own composite configuration otherwise); at each step it adds the step's delay to every price call. Pages of distinct products are loaded four at a time; the part's timeout is read from the shop's composite configuration. Beyond the timeout the pricing cluster's circuit breaker may open, and the page is then answered without the part at once.",
    rule: "Holds when the page's median latency grows with the part's delay below its timeout (by at least 70% of the delay); mitigated when it also stays within the part's timeout (+25% and 100 ms) beyond it, answered without the part (no complete page); refuted when the page does not slow down; inconclusive when no step below the timeout was measured.",
    shops: &[ShopSpec::MAIN],
};

/// Pages loaded at once.
const CONCURRENCY: usize = 4;

pub fn steps(s: &Scale) -> u64 {
    s.slow_steps_ms.len() as u64
}

/// The page at one delay of the part.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub delay_ms: u64,
    pub p50_ms: f64,
    pub max_ms: f64,
    /// Share of the pages answered complete (every part present).
    pub complete_share: f64,
    /// Pages answered with an error status or not at all.
    pub failures: usize,
}

/// The product page's price part timeout, from the shop's composite configuration.
pub fn price_timeout_ms() -> Result<u64, LabError> {
    let routes: Vec<RouteConfig> = GatewayConfig::fragment(shopmesh_shop::COMPOSITES)?;
    routes
        .iter()
        .filter(|r| r.name == "product-page")
        .filter_map(|r| r.aggregate.as_ref())
        .flat_map(|a| a.parts.iter())
        .find(|p| p.cluster == "pricing")
        .map(|p| p.timeout_ms)
        .ok_or_else(|| LabError::Shop("the product page has no pricing part".into()))
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let shop = ctx.shop(ShopSpec::MAIN)?;
    let timeout_ms = price_timeout_ms()?;
    let relay = Relay::start(shop.service(ServiceName::Pricing), Duration::ZERO).await?;
    let gw = shop
        .gateway_with(|g| redirect(g, "pricing", relay.addr()))
        .await?;
    let base = gw.base();
    let http = client()?;
    let mut steps = Vec::new();
    // Products no other experiment asks for (the product part is cached).
    let offset = shop.products.len() / 2;
    for (i, &delay) in ctx.scale.slow_steps_ms.iter().enumerate() {
        ctx.say(format!("price part slowed by {delay} ms"));
        relay.set_one_way(Duration::from_micros(delay * 500));
        let products = product_window(
            shop,
            offset + i * ctx.scale.slow_pages,
            ctx.scale.slow_pages,
        );
        let results: Vec<Option<(Duration, bool)>> = futures::stream::iter(products)
            .map(|p| {
                let (http, url) = (http.clone(), format!("{base}/api/products/{}", p.id));
                async move {
                    let t = Instant::now();
                    let res = http.get(&url).send().await.ok()?;
                    if !res.status().is_success() {
                        return None;
                    }
                    let complete = res
                        .headers()
                        .get(shopmesh_gateway::aggregate::COMPLETE_HEADER)
                        .is_none_or(|v| v.as_bytes() == b"true");
                    let body: Value = res.json().await.ok()?;
                    let priced = !body["price"].is_null();
                    Some((t.elapsed(), complete && priced))
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let times: Vec<Duration> = results.iter().flatten().map(|(d, _)| *d).collect();
        let complete = results.iter().flatten().filter(|(_, c)| *c).count();
        let s = Summary::of(&times);
        steps.push(Step {
            delay_ms: delay,
            p50_ms: s.p50_ms,
            max_ms: s.max_ms,
            complete_share: complete as f64 / results.len().max(1) as f64,
            failures: results.iter().filter(|r| r.is_none()).count(),
        });
        ctx.step(format!("{delay} ms done"));
    }
    gw.stop().await;
    drop(relay);
    Ok(measured(&steps, timeout_ms))
}

fn measured(steps: &[Step], timeout_ms: u64) -> Measured {
    let mut figures = Figures::default();
    figures.push("part_timeout_ms", timeout_ms as f64, "ms");
    for s in steps {
        let k = format!("delay_{}ms", s.delay_ms);
        figures.push(format!("{k}.p50_ms"), s.p50_ms, "ms");
        figures.push(format!("{k}.max_ms"), s.max_ms, "ms");
        figures.push(format!("{k}.complete_share"), s.complete_share, "ratio");
        figures.push(format!("{k}.failures"), s.failures as f64, "pages");
    }
    let max_delay = steps.iter().map(|s| s.delay_ms).max().unwrap_or(0) as f64;
    let line = |f: fn(&Step) -> f64| steps.iter().map(|s| (s.delay_ms as f64, f(s))).collect();
    let headline = match steps.iter().max_by_key(|s| s.delay_ms) {
        Some(s) => format!(
            "part +{} ms: page p50 {} ms, max {} ms (timeout {} ms), {}% complete",
            s.delay_ms,
            num(s.p50_ms),
            num(s.max_ms),
            timeout_ms,
            num(s.complete_share * 100.0)
        ),
        None => "no step measured".into(),
    };
    Measured {
        headline,
        verdict: verdict(steps, timeout_ms),
        figures,
        charts: vec![
            Chart {
                title: "Product page latency as one part slows".into(),
                x_label: "added latency of the price part (ms)".into(),
                y_label: "page latency (ms)".into(),
                series: vec![
                    Series::new("page p50", line(|s| s.p50_ms)),
                    Series::new("page max", line(|s| s.max_ms)),
                    Series::reference("the part's delay", vec![(0.0, 0.0), (max_delay, max_delay)]),
                    Series::reference(
                        "the part's timeout",
                        vec![(0.0, timeout_ms as f64), (max_delay, timeout_ms as f64)],
                    ),
                ],
            },
            Chart {
                title: "Complete product pages as one part slows".into(),
                x_label: "added latency of the price part (ms)".into(),
                y_label: "complete pages (%)".into(),
                series: vec![Series::new(
                    "complete pages",
                    line(|s| s.complete_share * 100.0),
                )],
            },
        ],
    }
}

/// The rule of [`META`], applied to the measurements.
pub fn verdict(steps: &[Step], timeout_ms: u64) -> Verdict {
    let Some(base) = steps.iter().find(|s| s.delay_ms == 0) else {
        return Verdict::new(Outcome::Inconclusive, "no page measured without a delay");
    };
    let timeout = timeout_ms as f64;
    let below: Vec<&Step> = steps
        .iter()
        .filter(|s| s.delay_ms > 0 && (s.delay_ms as f64) <= 0.8 * timeout)
        .collect();
    let beyond: Vec<&Step> = steps
        .iter()
        .filter(|s| s.delay_ms as f64 >= 1.2 * timeout)
        .collect();
    if below.is_empty() {
        return Verdict::new(
            Outcome::Inconclusive,
            "no step below the part's timeout was measured",
        );
    }
    let tracks = below
        .iter()
        .all(|s| s.failures == 0 && s.p50_ms - base.p50_ms >= 0.7 * s.delay_ms as f64);
    let slowest_below = below
        .iter()
        .max_by_key(|s| s.delay_ms)
        .copied()
        .unwrap_or(base);
    let mut because = format!(
        "with the part {} ms slower the page's median went from {} to {} ms",
        slowest_below.delay_ms,
        num(base.p50_ms),
        num(slowest_below.p50_ms)
    );
    if !tracks {
        return Verdict::new(Outcome::Refuted, because);
    }
    let bound = timeout * 1.25 + 100.0;
    let bounded = !beyond.is_empty()
        && beyond
            .iter()
            .all(|s| s.failures == 0 && s.max_ms <= bound && s.complete_share == 0.0);
    if let Some(worst) = beyond.iter().max_by_key(|s| s.delay_ms) {
        because.push_str(&format!(
            "; {} ms slower (beyond its {timeout_ms} ms timeout) the page took at most {} ms, {}% complete, {} failed",
            worst.delay_ms,
            num(worst.max_ms),
            num(worst.complete_share * 100.0),
            worst.failures
        ));
    }
    Verdict::new(
        if bounded {
            Outcome::Mitigated
        } else {
            Outcome::Holds
        },
        because,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(delay_ms: u64, p50_ms: f64, max_ms: f64, complete_share: f64) -> Step {
        Step {
            delay_ms,
            p50_ms,
            max_ms,
            complete_share,
            failures: 0,
        }
    }

    #[test]
    fn the_verdict_follows_the_measured_latencies() {
        let bounded = [
            s(0, 5.0, 8.0, 1.0),
            s(500, 508.0, 512.0, 1.0),
            s(2000, 1004.0, 1010.0, 0.0),
        ];
        assert_eq!(verdict(&bounded, 1000).outcome, Outcome::Mitigated);
        // The page waits past the timeout: the claim holds unmitigated.
        let unbounded = [
            s(0, 5.0, 8.0, 1.0),
            s(500, 508.0, 512.0, 1.0),
            s(2000, 2004.0, 2010.0, 1.0),
        ];
        assert_eq!(verdict(&unbounded, 1000).outcome, Outcome::Holds);
        // The page does not slow down with its part.
        let flat = [s(0, 5.0, 8.0, 1.0), s(500, 6.0, 9.0, 1.0)];
        assert_eq!(verdict(&flat, 1000).outcome, Outcome::Refuted);
        assert_eq!(
            verdict(&[s(0, 5.0, 8.0, 1.0)], 1000).outcome,
            Outcome::Inconclusive
        );
    }

    #[test]
    fn the_part_timeout_comes_from_the_shop_configuration() {
        assert!(price_timeout_ms().unwrap() > 0);
    }
}
