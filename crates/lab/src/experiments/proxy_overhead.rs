//! Proxy: what a request pays for going through the gateway instead of straight to the
//! service, at a fixed rate.

use std::time::Duration;

use shopmesh_shop::ServiceName;

use super::{Ctx, Measured, Meta};
use crate::load::{Phase, Run, Summary, open_loop, percentile};
use crate::report::{Chart, Figures, Group, Outcome, Series, Verdict, num, signed};
use crate::shop::{ShopSpec, client};
use crate::{LabError, Scale};

pub const META: Meta = Meta {
    id: "proxy.overhead",
    group: Group::Proxy,
    claim: "Introduces additional performance overhead",
    experiment: "a stock lookup straight to the inventory service against the same lookup through the gateway, at a fixed rate",
    method: "An open-loop client sends GET /api/inventory/{id} at a fixed rate, every other request straight to the service and through the shop's gateway (routing, identity, limits, balancing, metrics, a pooled upstream connection), so that both see the same machine at the same moments; latency is from sending to the whole answer, after a warm-up on both.",
    rule: "Holds when the gateway adds to the median at least 20 µs and 5% of the direct median; refuted (not measurable) below that; inconclusive when more than 1% of the requests failed or could not be sent on time.",
    shops: &[ShopSpec::MAIN],
};

/// The run in slices (for the progress bar).
const SLICES: usize = 3;
/// Requests in flight at most.
const MAX_IN_FLIGHT: usize = 128;
/// Unrecorded lookups on each side first.
const WARM_UP: Duration = Duration::from_millis(500);
const PERCENTILES: [f64; 6] = [50.0, 75.0, 90.0, 95.0, 99.0, 99.9];

pub fn steps(_: &Scale) -> u64 {
    SLICES as u64
}

/// One side of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Side {
    pub summary: Summary,
    /// (percentile, ms) for the chart.
    pub percentiles: Vec<(f64, f64)>,
    pub sent: usize,
    pub failures: usize,
    pub skipped: usize,
}

impl Side {
    /// The calls of `runs` with an index of `parity` (0: direct, 1: gateway).
    fn of(runs: &[Run<()>], parity: u64) -> Side {
        let mine = || {
            runs.iter()
                .flat_map(|r| r.calls.iter())
                .filter(move |c| c.index % 2 == parity)
        };
        let mut lat: Vec<Duration> = mine()
            .filter(|c| c.outcome.is_some())
            .map(|c| c.service)
            .collect();
        lat.sort();
        let due: usize = runs
            .iter()
            .map(|r| (r.calls.len() + r.skipped + 1 - parity as usize) / 2)
            .sum();
        let sent = mine().count();
        Side {
            summary: Summary::of(&lat),
            percentiles: PERCENTILES
                .iter()
                .map(|p| (*p, percentile(&lat, *p).as_secs_f64() * 1e3))
                .collect(),
            sent,
            failures: mine().filter(|c| c.outcome.is_none()).count(),
            skipped: due.saturating_sub(sent),
        }
    }
}

/// Stock lookups on the schedule of `phases`, every other one at each of `bases`.
async fn lookups(
    http: &reqwest::Client,
    bases: [&str; 2],
    ids: &[String],
    phases: &[Phase],
) -> Run<()> {
    open_loop(phases, MAX_IN_FLIGHT, |i| {
        let http = http.clone();
        let url = format!(
            "{}/api/inventory/{}",
            bases[(i % 2) as usize],
            ids[(i / 2) as usize % ids.len().max(1)]
        );
        async move {
            let res = http.get(url).send().await.ok()?;
            if !res.status().is_success() {
                return None;
            }
            res.bytes().await.ok().map(|_| ())
        }
    })
    .await
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let shop = ctx.shop(ShopSpec::MAIN)?;
    let direct = format!("http://{}", shop.service(ServiceName::Inventory));
    let gateway = shop.base.clone();
    let http = client()?;
    // Each side gets `proxy_rate`: the schedule alternates between them.
    let phase = [Phase {
        rate: 2.0 * ctx.scale.proxy_rate,
        duration: Duration::from_secs_f64(ctx.scale.proxy_secs / SLICES as f64),
    }];
    let ids: Vec<String> = shop.products.iter().map(|p| p.id.clone()).collect();
    let bases = [direct.as_str(), gateway.as_str()];
    // Connections opened and pools filled on both sides before anything counts.
    ctx.say("warming up");
    let warm_up = [Phase {
        rate: 2.0 * ctx.scale.proxy_rate,
        duration: WARM_UP,
    }];
    lookups(&http, bases, &ids, &warm_up).await;
    let mut runs = Vec::new();
    for slice in 0..SLICES {
        ctx.say(format!("slice {}", slice + 1));
        runs.push(lookups(&http, bases, &ids, &phase).await);
        ctx.step(format!("slice {} done", slice + 1));
    }
    let (d, g) = (Side::of(&runs, 0), Side::of(&runs, 1));
    let mut figures = Figures::default();
    figures.push("rate_per_s", ctx.scale.proxy_rate, "requests/s");
    for (name, s) in [("direct", &d), ("gateway", &g)] {
        figures.push(format!("{name}.p50_ms"), s.summary.p50_ms, "ms");
        figures.push(format!("{name}.p90_ms"), s.summary.p90_ms, "ms");
        figures.push(format!("{name}.p99_ms"), s.summary.p99_ms, "ms");
        figures.push(format!("{name}.requests"), s.sent as f64, "requests");
        figures.push(format!("{name}.failures"), s.failures as f64, "requests");
        figures.push(format!("{name}.skipped"), s.skipped as f64, "requests");
    }
    figures.push(
        "added.p50_us",
        (g.summary.p50_ms - d.summary.p50_ms) * 1e3,
        "µs",
    );
    figures.push(
        "added.p99_us",
        (g.summary.p99_ms - d.summary.p99_ms) * 1e3,
        "µs",
    );
    Ok(Measured {
        headline: format!(
            "{} µs p50 ({} → {} ms), {} µs p99 at {} req/s",
            signed((g.summary.p50_ms - d.summary.p50_ms) * 1e3),
            num(d.summary.p50_ms),
            num(g.summary.p50_ms),
            signed((g.summary.p99_ms - d.summary.p99_ms) * 1e3),
            num(ctx.scale.proxy_rate)
        ),
        verdict: verdict(&d, &g),
        figures,
        charts: vec![Chart {
            title: format!(
                "Stock lookup latency at {} requests/s, direct and through the gateway",
                num(ctx.scale.proxy_rate)
            ),
            x_label: "percentile".into(),
            y_label: "latency (ms)".into(),
            series: vec![
                Series::new("direct to the service", d.percentiles.clone()),
                Series::new("through the gateway", g.percentiles.clone()),
            ],
        }],
    })
}

/// The rule of [`META`], applied to the measurements.
pub fn verdict(direct: &Side, gateway: &Side) -> Verdict {
    let lost = |s: &Side| s.failures + s.skipped;
    let total = direct.sent + direct.skipped + gateway.sent + gateway.skipped;
    if total == 0 || (lost(direct) + lost(gateway)) as f64 > 0.01 * total as f64 {
        return Verdict::new(
            Outcome::Inconclusive,
            format!(
                "{} of {total} requests failed or could not be sent on time",
                lost(direct) + lost(gateway)
            ),
        );
    }
    let added = gateway.summary.p50_ms - direct.summary.p50_ms;
    let because = format!(
        "the gateway added {} µs to the median ({} → {} ms, {}%) and {} µs to the p99",
        signed(added * 1e3),
        num(direct.summary.p50_ms),
        num(gateway.summary.p50_ms),
        signed(added / direct.summary.p50_ms.max(f64::EPSILON) * 100.0),
        signed((gateway.summary.p99_ms - direct.summary.p99_ms) * 1e3),
    );
    if added >= 0.020 && added >= 0.05 * direct.summary.p50_ms {
        Verdict::new(Outcome::Holds, because)
    } else {
        Verdict::new(Outcome::Refuted, because)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(p50: f64, failures: usize) -> Side {
        Side {
            summary: Summary {
                n: 100,
                p50_ms: p50,
                p90_ms: p50,
                p99_ms: p50 * 2.0,
                max_ms: p50 * 3.0,
                mean_ms: p50,
            },
            percentiles: Vec::new(),
            sent: 100,
            failures,
            skipped: 0,
        }
    }

    #[test]
    fn the_verdict_follows_the_measured_medians() {
        assert_eq!(
            verdict(&side(0.5, 0), &side(0.7, 0)).outcome,
            Outcome::Holds
        );
        assert_eq!(
            verdict(&side(0.5, 0), &side(0.505, 0)).outcome,
            Outcome::Refuted
        );
        assert_eq!(
            verdict(&side(0.5, 0), &side(0.7, 5)).outcome,
            Outcome::Inconclusive
        );
    }
}
