//! Aggregation: does one composite call beat the calls a client would make, once the
//! client's network has a round trip?

use std::time::{Duration, Instant};

use serde_json::Value;
use shopmesh_gateway::config::RouteConfig;

use super::{Ctx, Measured, Meta, product_window};
use crate::load::Summary;
use crate::relay::Relay;
use crate::report::{Chart, Figures, Group, Outcome, Series, Verdict, num};
use crate::shop::{Product, ShopSpec, client};
use crate::{LabError, Scale};

pub const META: Meta = Meta {
    id: "aggregation.round-trips",
    group: Group::Aggregation,
    claim: "Reduces client call count and network overhead",
    experiment: "the product page as one composite call against the four calls a client makes (one after another, and in parallel) at 0, 20 and 80 ms round trips",
    method: "A delaying TCP relay in front of the gateway adds half the round trip each way (and a round trip to a new connection) and counts the bytes. At each round trip each client loads the same number of product pages (distinct products, warm connections). The parallel client calls product, stock and price at once and the promotions once the product's category is known: the composite's own dependency graph. The clients reach the catalog's plain product route by a header the lab's gateway routes to it.",
    rule: "Holds when, at every simulated round trip of 20 ms or more, the composite's median page time is below both clients' and it makes fewer calls and moves fewer bytes per page; partly when only some of these hold; refuted when none does; inconclusive when pages failed or no round trip of 20 ms or more was measured.",
    shops: &[ShopSpec::MAIN],
};

/// Warm-up pages per client before measuring (connections opened, pools filled).
const WARM_UP: usize = 2;
/// The header that sends a client's product call to the plain catalog route.
const PLAIN: &str = "x-lab-plain";

pub fn steps(s: &Scale) -> u64 {
    (s.rtts_ms.len() * Client::ALL.len()) as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    Composite,
    Sequential,
    Parallel,
}

impl Client {
    const ALL: [Client; 3] = [Client::Composite, Client::Sequential, Client::Parallel];

    fn name(self) -> &'static str {
        match self {
            Client::Composite => "composite",
            Client::Sequential => "sequential",
            Client::Parallel => "parallel",
        }
    }

    fn calls(self) -> f64 {
        match self {
            Client::Composite => 1.0,
            Client::Sequential | Client::Parallel => 4.0,
        }
    }
}

/// One client kind at one round trip.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub rtt_ms: u64,
    pub client: &'static str,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub calls_per_page: f64,
    pub bytes_per_page: f64,
    pub failures: usize,
    /// Composite pages flagged incomplete.
    pub incomplete: usize,
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let shop = ctx.shop(ShopSpec::MAIN)?;
    let gw = shop
        .gateway_with(|g| {
            let mut plain = RouteConfig::prefix("lab-plain-products", "/api/products", "catalog");
            plain.matches.headers.insert(PLAIN.into(), "1".into());
            g.routes.insert(0, plain);
        })
        .await?;
    let relay = Relay::start(gw.addr, Duration::ZERO).await?;
    let base = format!("http://{}", relay.addr());
    let per_run = ctx.scale.pages + WARM_UP;
    let mut points = Vec::new();
    let mut run_no = 0;
    for &rtt in &ctx.scale.rtts_ms {
        relay.set_one_way(Duration::from_micros(rtt * 500));
        for c in Client::ALL {
            ctx.say(format!("{} client at {rtt} ms", c.name()));
            let products = product_window(shop, run_no * per_run, per_run);
            run_no += 1;
            let http = client()?;
            let (warm, measured) = products.split_at(WARM_UP.min(products.len()));
            for p in warm {
                let _ = page(&http, &base, c, p).await;
            }
            relay.reset();
            let mut times = Vec::with_capacity(measured.len());
            let (mut failures, mut incomplete) = (0, 0);
            for p in measured {
                let t = Instant::now();
                match page(&http, &base, c, p).await {
                    Ok(true) => times.push(t.elapsed()),
                    Ok(false) => {
                        incomplete += 1;
                        times.push(t.elapsed());
                    }
                    Err(_) => failures += 1,
                }
            }
            let traffic = relay.traffic();
            let s = Summary::of(&times);
            let pages = measured.len().max(1) as f64;
            points.push(Point {
                rtt_ms: rtt,
                client: c.name(),
                p50_ms: s.p50_ms,
                p99_ms: s.p99_ms,
                calls_per_page: c.calls(),
                bytes_per_page: traffic.bytes() as f64 / pages,
                failures,
                incomplete,
            });
            ctx.step(format!("{} client at {rtt} ms done", c.name()));
        }
    }
    drop(relay);
    gw.stop().await;
    Ok(measured(&points))
}

/// Loads one product page as client `c`: `Ok(complete)`, or why it failed.
async fn page(http: &reqwest::Client, base: &str, c: Client, p: &Product) -> Result<bool, String> {
    let product = format!("{base}/api/products/{}", p.id);
    let stock = format!("{base}/api/inventory/{}", p.id);
    let price = format!("{base}/api/prices/{}", p.id);
    match c {
        Client::Composite => {
            let res = http.get(&product).send().await.map_err(|e| e.to_string())?;
            if !res.status().is_success() {
                return Err(format!("composite page: {}", res.status()));
            }
            let complete = res
                .headers()
                .get(shopmesh_gateway::aggregate::COMPLETE_HEADER)
                .is_none_or(|v| v.as_bytes() == b"true");
            res.bytes().await.map_err(|e| e.to_string())?;
            Ok(complete)
        }
        Client::Sequential => {
            let category = product_category(http, &product).await?;
            fetch(http.get(&stock)).await?;
            fetch(http.get(&price)).await?;
            fetch(promotions(http, base, p, &category)).await?;
            Ok(true)
        }
        Client::Parallel => {
            let product_then_promotions = async {
                let category = product_category(http, &product).await?;
                fetch(promotions(http, base, p, &category)).await
            };
            let (a, b, c) = tokio::join!(
                product_then_promotions,
                fetch(http.get(&stock)),
                fetch(http.get(&price))
            );
            a.and(b).and(c).map(|_| true)
        }
    }
}

fn promotions(
    http: &reqwest::Client,
    base: &str,
    p: &Product,
    category: &str,
) -> reqwest::RequestBuilder {
    http.get(format!("{base}/api/promotions"))
        .query(&[("product_id", p.id.as_str()), ("category", category)])
}

async fn product_category(http: &reqwest::Client, url: &str) -> Result<String, String> {
    let body = fetch(http.get(url).header(PLAIN, "1")).await?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    v["category"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| "a product without a category".into())
}

async fn fetch(req: reqwest::RequestBuilder) -> Result<Vec<u8>, String> {
    let res = req.send().await.map_err(|e| e.to_string())?;
    if !res.status().is_success() {
        return Err(res.status().to_string());
    }
    Ok(res.bytes().await.map_err(|e| e.to_string())?.to_vec())
}

fn measured(points: &[Point]) -> Measured {
    let mut figures = Figures::default();
    for p in points {
        let k = format!("rtt_{}ms.{}", p.rtt_ms, p.client);
        figures.push(format!("{k}.p50_ms"), p.p50_ms, "ms");
        figures.push(format!("{k}.p99_ms"), p.p99_ms, "ms");
        figures.push(format!("{k}.calls_per_page"), p.calls_per_page, "calls");
        figures.push(format!("{k}.bytes_per_page"), p.bytes_per_page, "bytes");
        figures.push(format!("{k}.failures"), p.failures as f64, "pages");
        if p.client == "composite" {
            figures.push(format!("{k}.incomplete"), p.incomplete as f64, "pages");
        }
    }
    let series = Client::ALL
        .iter()
        .map(|c| {
            Series::new(
                format!(
                    "{} ({} call{})",
                    c.name(),
                    c.calls(),
                    if c.calls() > 1.0 { "s" } else { "" }
                ),
                points
                    .iter()
                    .filter(|p| p.client == c.name())
                    .map(|p| (p.rtt_ms as f64, p.p50_ms))
                    .collect(),
            )
        })
        .collect();
    let headline = match worst_rtt(points) {
        Some((c, s, p)) => format!(
            "{} ms RTT: 1 call {} ms · 4 calls {} ms one by one, {} ms in parallel",
            c.rtt_ms,
            num(c.p50_ms),
            num(s.p50_ms),
            num(p.p50_ms)
        ),
        None => "no page measured".into(),
    };
    Measured {
        headline,
        verdict: verdict(points),
        figures,
        charts: vec![Chart {
            title: "Product page: median time by client round trip".into(),
            x_label: "simulated round trip (ms)".into(),
            y_label: "median page time (ms)".into(),
            series,
        }],
    }
}

fn at<'a>(points: &'a [Point], rtt: u64, client: &str) -> Option<&'a Point> {
    points
        .iter()
        .find(|p| p.rtt_ms == rtt && p.client == client)
}

/// The composite, sequential and parallel points at the largest round trip.
fn worst_rtt(points: &[Point]) -> Option<(&Point, &Point, &Point)> {
    let rtt = points.iter().map(|p| p.rtt_ms).max()?;
    Some((
        at(points, rtt, "composite")?,
        at(points, rtt, "sequential")?,
        at(points, rtt, "parallel")?,
    ))
}

/// The rule of [`META`], applied to the measurements.
pub fn verdict(points: &[Point]) -> Verdict {
    let failures: usize = points.iter().map(|p| p.failures).sum();
    if failures > 0 {
        return Verdict::new(Outcome::Inconclusive, format!("{failures} page(s) failed"));
    }
    let mut rtts: Vec<u64> = points
        .iter()
        .map(|p| p.rtt_ms)
        .filter(|r| *r >= 20)
        .collect();
    rtts.sort_unstable();
    rtts.dedup();
    let (mut held, mut checked) = (0, 0);
    let mut reasons = Vec::new();
    for rtt in &rtts {
        let (Some(c), Some(s), Some(p)) = (
            at(points, *rtt, "composite"),
            at(points, *rtt, "sequential"),
            at(points, *rtt, "parallel"),
        ) else {
            continue;
        };
        let conditions = [
            c.p50_ms < s.p50_ms && c.p50_ms < p.p50_ms,
            c.calls_per_page < s.calls_per_page.min(p.calls_per_page),
            c.bytes_per_page < s.bytes_per_page.min(p.bytes_per_page),
        ];
        checked += conditions.len();
        held += conditions.iter().filter(|c| **c).count();
        reasons.push(format!(
            "at {rtt} ms the composite took {} ms against {} ms one by one and {} ms in parallel, {} call(s) and {} bytes against {} calls and {} bytes",
            num(c.p50_ms),
            num(s.p50_ms),
            num(p.p50_ms),
            c.calls_per_page,
            num(c.bytes_per_page),
            s.calls_per_page,
            num(s.bytes_per_page.min(p.bytes_per_page)),
        ));
    }
    if checked == 0 {
        return Verdict::new(
            Outcome::Inconclusive,
            "no round trip of 20 ms or more was measured",
        );
    }
    if let (Some(c), Some(s)) = (at(points, 0, "composite"), at(points, 0, "sequential")) {
        reasons.push(format!(
            "on loopback (0 ms) {} ms against {} ms",
            num(c.p50_ms),
            num(s.p50_ms)
        ));
    }
    let outcome = if held == checked {
        Outcome::Holds
    } else if held == 0 {
        Outcome::Refuted
    } else {
        Outcome::Partly
    };
    Verdict::new(outcome, reasons.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(rtt: u64, client: &'static str, p50: f64, calls: f64, bytes: f64) -> Point {
        Point {
            rtt_ms: rtt,
            client,
            p50_ms: p50,
            p99_ms: p50,
            calls_per_page: calls,
            bytes_per_page: bytes,
            failures: 0,
            incomplete: 0,
        }
    }

    fn run(composite_at_80: f64) -> Vec<Point> {
        vec![
            p(0, "composite", 3.0, 1.0, 1000.0),
            p(0, "sequential", 4.0, 4.0, 2500.0),
            p(0, "parallel", 3.0, 4.0, 2500.0),
            p(80, "composite", composite_at_80, 1.0, 1000.0),
            p(80, "sequential", 330.0, 4.0, 2500.0),
            p(80, "parallel", 170.0, 4.0, 2500.0),
        ]
    }

    #[test]
    fn the_verdict_follows_the_measured_times() {
        assert_eq!(verdict(&run(90.0)).outcome, Outcome::Holds);
        // Slower than the parallel client: fewer calls and bytes still, so partly.
        assert_eq!(verdict(&run(200.0)).outcome, Outcome::Partly);
        let mut failed = run(90.0);
        failed[4].failures = 1;
        assert_eq!(verdict(&failed).outcome, Outcome::Inconclusive);
        // Only loopback measured: nothing to decide on.
        assert_eq!(verdict(&run(90.0)[..3]).outcome, Outcome::Inconclusive);
        // Everything worse: refuted.
        let mut worse = run(400.0);
        worse[3].calls_per_page = 4.0;
        worse[3].bytes_per_page = 9000.0;
        assert_eq!(verdict(&worse).outcome, Outcome::Refuted);
    }
}
