//! Aggregation: does the composite page run out of headroom before a plain route does, as
//! the offered load grows?

use std::time::Duration;

use super::{Ctx, Measured, Meta};
use crate::load::{Phase, Summary, open_loop};
use crate::report::{Chart, Figures, Group, Outcome, Series, Verdict, num};
use crate::shop::ShopSpec;
use crate::{LabError, Scale};

pub const META: Meta = Meta {
    id: "aggregation.load",
    group: Group::Aggregation,
    claim: "The aggregation layer can become a performance bottleneck",
    experiment: "offered load against p99 for the composite product page and a plain route through the same gateway; the load at which each crosses a 50 ms p99",
    method: "An open-loop client offers the composite product page (four backend calls, the product part cached 2 s) and a plain stock lookup (one backend call) at rising rates, alternating, each for the same time; a rate is sustained when the p99 stays under the objective and fewer than 1% of the requests fail or cannot be sent on time. Everything shares the machine, the load generator included.",
    rule: "Holds when the composite stops sustaining the load at a lower rate than the plain route (or only the composite stops within the rates tried); refuted when the composite sustains every rate the plain route does; inconclusive when neither stops within the rates tried.",
    shops: &[ShopSpec::MAIN],
};

/// The latency objective.
pub const OBJECTIVE_P99_MS: f64 = 50.0;
const MAX_IN_FLIGHT: usize = 256;

pub fn steps(s: &Scale) -> u64 {
    2 * s.load_rates.len() as u64
}

/// One route at one offered rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Failed or not sent on time, as a share of those due.
    pub lost_share: f64,
}

impl Point {
    pub fn sustained(&self) -> bool {
        self.p99_ms <= OBJECTIVE_P99_MS && self.lost_share < 0.01
    }
}

/// The highest rate sustained, and the lowest rate above it that was not (a miss below a
/// sustained rate is a hiccup of the machine, not the route's limit).
pub fn knee(points: &[Point]) -> (Option<f64>, Option<f64>) {
    let best = points
        .iter()
        .filter(|p| p.sustained())
        .map(|p| p.rate)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    let miss = points
        .iter()
        .filter(|p| !p.sustained() && best.is_none_or(|b| p.rate > b))
        .map(|p| p.rate)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.min(r))));
    (best, miss)
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let shop = ctx.shop(ShopSpec::MAIN)?;
    let http = shop.http.clone();
    let ids: Vec<String> = shop.products.iter().map(|p| p.id.clone()).collect();
    let routes = [
        ("composite", "/api/products/"),
        ("plain", "/api/inventory/"),
    ];
    let (mut composite, mut plain) = (Vec::new(), Vec::new());
    let secs = ctx.scale.load_secs;
    // Connections opened and caches filled on both routes before anything counts.
    ctx.say("warming up");
    for (_, path) in routes {
        let warm = [Phase {
            rate: ctx.scale.load_rates.first().copied().unwrap_or(50.0),
            duration: Duration::from_secs(1),
        }];
        open_loop(&warm, MAX_IN_FLIGHT, |i| {
            let (http, url) = (
                http.clone(),
                format!("{}{path}{}", shop.base, ids[i as usize % ids.len().max(1)]),
            );
            async move {
                http.get(url)
                    .send()
                    .await
                    .ok()?
                    .bytes()
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await;
    }
    for &rate in &ctx.scale.load_rates {
        for (name, path) in routes {
            ctx.say(format!("{name} at {rate}/s"));
            let phase = [Phase {
                rate,
                duration: Duration::from_secs_f64(secs),
            }];
            let run = open_loop(&phase, MAX_IN_FLIGHT, |i| {
                let http = http.clone();
                let url = format!("{}{path}{}", shop.base, ids[i as usize % ids.len().max(1)]);
                async move {
                    let res = http.get(url).send().await.ok()?;
                    if !res.status().is_success() {
                        return None;
                    }
                    res.bytes().await.ok().map(|_| ())
                }
            })
            .await;
            let due = run.calls.len() + run.skipped;
            let s = Summary::of(&run.latencies());
            let point = Point {
                rate,
                p50_ms: s.p50_ms,
                p99_ms: s.p99_ms,
                lost_share: (run.failures() + run.skipped) as f64 / due.max(1) as f64,
            };
            if name == "composite" {
                composite.push(point);
            } else {
                plain.push(point);
            }
            ctx.step(format!("{name} at {rate}/s done"));
        }
        // Both routes missed at this rate: higher rates only cost time.
        let missed = |v: &[Point]| v.last().is_some_and(|p| !p.sustained());
        if missed(&composite) && missed(&plain) {
            break;
        }
    }
    Ok(measured(&composite, &plain))
}

fn measured(composite: &[Point], plain: &[Point]) -> Measured {
    let mut f = Figures::default();
    f.push("objective.p99_ms", OBJECTIVE_P99_MS, "ms");
    for (name, points) in [("composite", composite), ("plain", plain)] {
        for p in points {
            let k = format!("{name}.rate_{}", p.rate);
            f.push(format!("{k}.p50_ms"), p.p50_ms, "ms");
            f.push(format!("{k}.p99_ms"), p.p99_ms, "ms");
            f.push(format!("{k}.lost_share"), p.lost_share, "ratio");
        }
        let (ok, broke) = knee(points);
        f.push(
            format!("{name}.sustained_per_s"),
            ok.unwrap_or(0.0),
            "requests/s",
        );
        f.push(
            format!("{name}.first_unsustained_per_s"),
            broke.unwrap_or(f64::NAN),
            "requests/s",
        );
    }
    let show = |k: (Option<f64>, Option<f64>)| match k {
        (_, Some(b)) => format!("breaks at {}/s", num(b)),
        (Some(ok), None) => format!("holds to {}/s", num(ok)),
        (None, None) => "not measured".into(),
    };
    let line = |points: &[Point]| points.iter().map(|p| (p.rate, p.p99_ms)).collect();
    let max_rate = composite
        .iter()
        .chain(plain)
        .map(|p| p.rate)
        .fold(0.0, f64::max);
    Measured {
        headline: format!(
            "p99 ≤ {} ms: composite {}, plain route {}",
            num(OBJECTIVE_P99_MS),
            show(knee(composite)),
            show(knee(plain))
        ),
        verdict: verdict(composite, plain),
        figures: f,
        charts: vec![Chart {
            title: "p99 latency against offered load: composite page and plain route".into(),
            x_label: "offered load (requests/s)".into(),
            y_label: "p99 (ms)".into(),
            series: vec![
                Series::new("composite page (4 backend calls)", line(composite)),
                Series::new("plain route (1 backend call)", line(plain)),
                Series::reference(
                    "objective",
                    vec![(0.0, OBJECTIVE_P99_MS), (max_rate, OBJECTIVE_P99_MS)],
                ),
            ],
        }],
    }
}

/// The rule of [`META`], applied to the measurements.
pub fn verdict(composite: &[Point], plain: &[Point]) -> Verdict {
    let (c, p) = (knee(composite), knee(plain));
    let because = format!(
        "the composite page sustained up to {}/s (first miss at {}), the plain route up to {}/s (first miss at {}), against a {} ms p99",
        num(c.0.unwrap_or(0.0)),
        c.1.map_or_else(|| "none".to_owned(), |r| format!("{}/s", num(r))),
        num(p.0.unwrap_or(0.0)),
        p.1.map_or_else(|| "none".to_owned(), |r| format!("{}/s", num(r))),
        num(OBJECTIVE_P99_MS)
    );
    match (c.1, p.1) {
        (None, None) => Verdict::new(Outcome::Inconclusive, because),
        (Some(_), None) => Verdict::new(Outcome::Holds, because),
        (Some(cb), Some(pb)) if cb < pb => Verdict::new(Outcome::Holds, because),
        _ => Verdict::new(Outcome::Refuted, because),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pts(p99s: &[f64]) -> Vec<Point> {
        p99s.iter()
            .enumerate()
            .map(|(i, p99)| Point {
                rate: 100.0 * (1 << i) as f64,
                p50_ms: p99 / 4.0,
                p99_ms: *p99,
                lost_share: 0.0,
            })
            .collect()
    }

    #[test]
    fn the_knee_is_the_first_rate_missing_the_objective() {
        assert_eq!(
            knee(&pts(&[5.0, 8.0, 70.0, 90.0])),
            (Some(200.0), Some(400.0))
        );
        assert_eq!(knee(&pts(&[5.0, 8.0])), (Some(200.0), None));
        assert_eq!(knee(&pts(&[60.0])), (None, Some(100.0)));
        // A hiccup at a low rate is not the limit.
        assert_eq!(knee(&pts(&[60.0, 8.0, 70.0])), (Some(200.0), Some(400.0)));
        let mut lost = pts(&[5.0, 8.0]);
        lost[1].lost_share = 0.05;
        assert_eq!(knee(&lost), (Some(100.0), Some(200.0)));
    }

    #[test]
    fn the_verdict_compares_the_knees() {
        let (early, late, never) = (
            pts(&[5.0, 70.0, 90.0]),
            pts(&[5.0, 8.0, 90.0]),
            pts(&[5.0, 8.0, 9.0]),
        );
        assert_eq!(verdict(&early, &late).outcome, Outcome::Holds);
        assert_eq!(verdict(&early, &never).outcome, Outcome::Holds);
        assert_eq!(verdict(&late, &early).outcome, Outcome::Refuted);
        assert_eq!(verdict(&late, &late).outcome, Outcome::Refuted);
        assert_eq!(verdict(&never, &never).outcome, Outcome::Inconclusive);
    }
}
