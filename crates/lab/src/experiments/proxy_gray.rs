//! Proxy: a gray release through the gateway — does the observed share follow the configured
//! weight, do callers keep their variant, and does raising the canary move only callers into
//! it?

use std::net::{Ipv4Addr, SocketAddr};

use futures::StreamExt;
use shopmesh_gateway::GatewayConfig;
use shopmesh_gateway::config::{
    ClusterConfig, RouteConfig, SplitConfig, Stickiness, VariantConfig,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Ctx, Measured, Meta};
use crate::report::{Chart, Figures, Group, Outcome, Series, Verdict, num};
use crate::shop::{ExtraGateway, client};
use crate::{LabError, Scale};

pub const META: Meta = Meta {
    id: "proxy.gray-release",
    group: Group::Proxy,
    claim: "Facilitates gray releases and A/B testing",
    experiment: "a canary at 10%, then raised to 50%, over many anonymous callers: observed share, stickiness, who moved",
    method: "The gateway splits a route between a stable and a canary upstream (each answers with its own name) by weight, sticky per caller (the variant cookie it sets on a first answer). Each caller makes a first request and a few more with its cookie; the weights are then changed from 10/90 to 50/50 by a configuration reload and every caller asks once more.",
    rule: "Holds when the observed canary share is within three standard deviations (binomial) of its weight before and after the raise, every caller keeps its variant while the weights stay, and no caller moves from the canary back to stable when it grows; partly when the shares hold but stickiness does not, or the other way round; inconclusive when requests failed.",
    shops: &[],
};

/// Callers served at once.
const CONCURRENCY: usize = 32;
const COOKIE: &str = "lab-variant";

pub fn steps(_: &Scale) -> u64 {
    3
}

/// What was observed.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub callers: usize,
    pub weight_before_pct: f64,
    pub weight_after_pct: f64,
    pub canary_before: usize,
    pub canary_after: usize,
    /// Callers whose repeated requests all met their first variant.
    pub sticky: usize,
    /// Stable callers moved into the canary by the raise.
    pub moved_in: usize,
    /// Canary callers moved back to stable by the raise.
    pub moved_back: usize,
    pub failures: usize,
}

fn split_config(stable: SocketAddr, canary: SocketAddr, canary_pct: u32) -> GatewayConfig {
    let mut route = RouteConfig::prefix("release", "/", "stable");
    route.cluster = None;
    route.split = Some(SplitConfig {
        variants: vec![
            VariantConfig {
                name: "stable".into(),
                cluster: "stable".into(),
                weight: 100 - canary_pct,
                when: None,
            },
            VariantConfig {
                name: "canary".into(),
                cluster: "canary".into(),
                weight: canary_pct,
                when: None,
            },
        ],
        sticky: Stickiness::Caller,
        cookie: COOKIE.into(),
        cookie_max_age_secs: 3600,
    });
    GatewayConfig::new(
        vec![
            ClusterConfig::new("stable", vec![format!("http://{stable}")]),
            ClusterConfig::new("canary", vec![format!("http://{canary}")]),
        ],
        vec![route],
    )
}

/// An upstream that answers every request with its name.
async fn named_upstream(
    name: &'static str,
    stop: CancellationToken,
) -> Result<SocketAddr, LabError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(move || async move { name });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    Ok(addr)
}

/// One request: the variant that answered and the cookie it set (if any).
async fn ask(
    http: &reqwest::Client,
    url: &str,
    cookie: Option<&str>,
) -> Option<(String, Option<String>)> {
    let mut req = http.get(url);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let res = req.send().await.ok()?;
    if !res.status().is_success() {
        return None;
    }
    let set = res
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_owned);
    Some((res.text().await.ok()?, set))
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let stable = named_upstream("stable", stop.clone()).await?;
    let canary = named_upstream("canary", stop.clone()).await?;
    let (before, after) = (10u32, 50u32);
    let gw = ExtraGateway::start(split_config(stable, canary, before)).await?;
    let url = format!("{}/item", gw.base());
    let http = client()?;
    let repeats = ctx.scale.gray_repeats;
    ctx.say(format!("{} callers at {before}%", ctx.scale.gray_callers));
    // Each caller: its first variant, its cookie, whether it kept its variant.
    let callers: Vec<Option<(String, String, bool)>> =
        futures::stream::iter(0..ctx.scale.gray_callers)
            .map(|_| {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let (first, cookie) = ask(&http, &url, None).await?;
                    let cookie = cookie?;
                    let mut kept = true;
                    for _ in 0..repeats {
                        let (v, _) = ask(&http, &url, Some(&cookie)).await?;
                        kept &= v == first;
                    }
                    Some((first, cookie, kept))
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
    ctx.step(format!("raising the canary to {after}%"));
    gw.gateway.apply(split_config(stable, canary, after))?;
    ctx.step(format!("{} callers at {after}%", ctx.scale.gray_callers));
    let ok: Vec<&(String, String, bool)> = callers.iter().flatten().collect();
    let moves: Vec<Option<(String, String)>> = futures::stream::iter(ok.iter())
        .map(|(first, cookie, _)| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let (now, _) = ask(&http, &url, Some(cookie)).await?;
                Some((first.clone(), now))
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    gw.stop().await;
    ctx.step("done");
    let seen: Vec<&(String, String)> = moves.iter().flatten().collect();
    let o = Observed {
        callers: ok.len(),
        weight_before_pct: before as f64,
        weight_after_pct: after as f64,
        canary_before: ok.iter().filter(|c| c.0 == "canary").count(),
        canary_after: seen.iter().filter(|(_, now)| now == "canary").count(),
        sticky: ok.iter().filter(|c| c.2).count(),
        moved_in: seen
            .iter()
            .filter(|(was, now)| was == "stable" && now == "canary")
            .count(),
        moved_back: seen
            .iter()
            .filter(|(was, now)| was == "canary" && now == "stable")
            .count(),
        failures: (callers.len() - ok.len()) + (moves.len() - seen.len()),
    };
    Ok(measured(&o))
}

/// Three binomial standard deviations of a share `pct` over `n` draws, in points.
fn tolerance_pp(pct: f64, n: usize) -> f64 {
    let p = pct / 100.0;
    300.0 * (p * (1.0 - p) / n.max(1) as f64).sqrt()
}

fn share(k: usize, n: usize) -> f64 {
    k as f64 * 100.0 / n.max(1) as f64
}

fn measured(o: &Observed) -> Measured {
    let mut f = Figures::default();
    let stable_before = o.callers - o.canary_before;
    f.push("callers", o.callers as f64, "callers");
    f.push("before.weight_pct", o.weight_before_pct, "%");
    f.push(
        "before.observed_pct",
        share(o.canary_before, o.callers),
        "%",
    );
    f.push(
        "before.tolerance_pp",
        tolerance_pp(o.weight_before_pct, o.callers),
        "pp",
    );
    f.push("sticky_pct", share(o.sticky, o.callers), "%");
    f.push("after.weight_pct", o.weight_after_pct, "%");
    f.push("after.observed_pct", share(o.canary_after, o.callers), "%");
    f.push(
        "after.tolerance_pp",
        tolerance_pp(o.weight_after_pct, o.callers),
        "pp",
    );
    f.push(
        "after.moved_in_pct_of_stable",
        share(o.moved_in, stable_before),
        "%",
    );
    f.push(
        "after.expected_moved_in_pct",
        (o.weight_after_pct - o.weight_before_pct) * 100.0 / (100.0 - o.weight_before_pct),
        "%",
    );
    f.push("after.moved_back", o.moved_back as f64, "callers");
    f.push("failures", o.failures as f64, "requests");
    Measured {
        headline: format!(
            "canary {}% → observed {}%, raised to {}% → {}%; {}% sticky, {} moved back",
            num(o.weight_before_pct),
            num(share(o.canary_before, o.callers)),
            num(o.weight_after_pct),
            num(share(o.canary_after, o.callers)),
            num(share(o.sticky, o.callers)),
            o.moved_back
        ),
        verdict: verdict(o),
        figures: f,
        charts: vec![Chart {
            title: format!(
                "Canary share over {} callers: configured and observed",
                o.callers
            ),
            x_label: "configured canary weight (%)".into(),
            y_label: "callers on the canary (%)".into(),
            series: vec![
                Series::new(
                    "observed",
                    vec![
                        (o.weight_before_pct, share(o.canary_before, o.callers)),
                        (o.weight_after_pct, share(o.canary_after, o.callers)),
                    ],
                ),
                Series::reference("configured", vec![(0.0, 0.0), (60.0, 60.0)]),
            ],
        }],
    }
}

/// The rule of [`META`], applied to the observations.
pub fn verdict(o: &Observed) -> Verdict {
    if o.failures > 0 || o.callers == 0 {
        return Verdict::new(
            Outcome::Inconclusive,
            format!("{} request(s) failed", o.failures),
        );
    }
    let before = share(o.canary_before, o.callers);
    let after = share(o.canary_after, o.callers);
    let shares_hold = (before - o.weight_before_pct).abs()
        <= tolerance_pp(o.weight_before_pct, o.callers)
        && (after - o.weight_after_pct).abs() <= tolerance_pp(o.weight_after_pct, o.callers);
    let sticky = o.sticky == o.callers && o.moved_back == 0;
    let because = format!(
        "{}% of {} callers drew the canary at {}% and {}% at {}% (tolerance ±{} and ±{} points); {} of {} kept their variant; {} moved back to stable",
        num(before),
        o.callers,
        num(o.weight_before_pct),
        num(after),
        num(o.weight_after_pct),
        num(tolerance_pp(o.weight_before_pct, o.callers)),
        num(tolerance_pp(o.weight_after_pct, o.callers)),
        o.sticky,
        o.callers,
        o.moved_back
    );
    let outcome = match (shares_hold, sticky) {
        (true, true) => Outcome::Holds,
        (false, false) => Outcome::Refuted,
        _ => Outcome::Partly,
    };
    Verdict::new(outcome, because)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(
        canary_before: usize,
        canary_after: usize,
        sticky: usize,
        moved_back: usize,
    ) -> Observed {
        Observed {
            callers: 1000,
            weight_before_pct: 10.0,
            weight_after_pct: 50.0,
            canary_before,
            canary_after,
            sticky,
            moved_in: canary_after.saturating_sub(canary_before),
            moved_back,
            failures: 0,
        }
    }

    #[test]
    fn the_verdict_follows_the_observed_shares_and_moves() {
        assert_eq!(verdict(&obs(104, 497, 1000, 0)).outcome, Outcome::Holds);
        assert_eq!(verdict(&obs(200, 497, 1000, 0)).outcome, Outcome::Partly);
        assert_eq!(verdict(&obs(104, 497, 990, 0)).outcome, Outcome::Partly);
        assert_eq!(verdict(&obs(104, 497, 1000, 3)).outcome, Outcome::Partly);
        assert_eq!(verdict(&obs(300, 200, 900, 3)).outcome, Outcome::Refuted);
        let mut failed = obs(104, 497, 1000, 0);
        failed.failures = 1;
        assert_eq!(verdict(&failed).outcome, Outcome::Inconclusive);
    }
}
