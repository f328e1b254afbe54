//! Asynchronous messaging: a burst of orders ten times the steady rate — the shop accepts at
//! the client's pace while the saga completes at its own, and the backlog drains.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::saga::{GOOD_CARD, customers, place, settled_count, stocked};
use super::{Ctx, Measured, Meta};
use crate::load::{Phase, Summary, open_loop};
use crate::report::{Chart, Figures, Group, Outcome, Series, Verdict, num};
use crate::shop::ShopSpec;
use crate::{LabError, Scale};
use shopmesh_shop::ServiceName;

pub const META: Meta = Meta {
    id: "messaging.burst",
    group: Group::Messaging,
    claim: "Peaks are smoothed, preventing traffic spikes from overwhelming databases",
    experiment: "orders at a steady rate, then ten times that rate, then steady again: accepted and completed orders per second, backlog, drain time",
    method: "An open-loop client places orders through the gateway in three equal phases (steady, 10× burst, steady). Accepted orders are counted when their 202 arrives; completed ones (confirmed or cancelled by the saga) are read from the orders database five times a second until every accepted order is done.",
    rule: "Holds when every order of the burst was accepted, the peak accepted rate is at least 1.5× the peak completed rate (the queue took the peak, the consumers kept their pace) and the backlog drained; partly when the front door could not take the offered rate (more than 1% of the orders could not be sent: 512 were waiting for an answer); inconclusive when the consumers kept up with the burst (nothing to smooth); refuted when orders were refused or never completed.",
    shops: &[ShopSpec::MAIN],
};

/// How often completed orders are counted.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// Customers placing the orders, and products they order (each well stocked).
const CUSTOMERS: usize = 8;
const PRODUCTS: usize = 40;
/// Longest wait for the backlog to drain after the last order.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

pub fn steps(_: &Scale) -> u64 {
    3
}

/// A count taken during the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds since the first order was due.
    pub t: f64,
    pub accepted: usize,
    pub completed: usize,
}

/// What the run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub steady_rate: f64,
    pub phase_secs: f64,
    /// Seconds from the start at which each accepted order's answer came.
    pub accepted_at: Vec<f64>,
    /// Orders answered with an error (or not at all).
    pub refused: usize,
    /// Orders not sent: the client's bound on orders awaiting an answer was reached.
    pub not_sent: usize,
    pub samples: Vec<Sample>,
    pub accept_steady: Summary,
    pub accept_burst: Summary,
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let shop = ctx.shop(ShopSpec::MAIN)?;
    ctx.say("registering customers");
    let customers = customers(shop, CUSTOMERS).await?;
    let users: Vec<String> = customers.iter().map(|c| c.id.clone()).collect();
    let products = stocked(shop, 0, PRODUCTS, 300);
    if products.is_empty() {
        return Err(LabError::Shop("no well-stocked product was seeded".into()));
    }
    let orders_db = shop.db(ServiceName::Orders).await?;
    let (rate, secs) = (ctx.scale.steady_rate, ctx.scale.phase_secs);
    let phases = [
        Phase {
            rate,
            duration: Duration::from_secs_f64(secs),
        },
        Phase {
            rate: rate * 10.0,
            duration: Duration::from_secs_f64(secs),
        },
        Phase {
            rate,
            duration: Duration::from_secs_f64(secs),
        },
    ];
    ctx.step("steady, burst, steady");
    let accepted = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let started = Instant::now();
    let sampler = {
        let (db, users, accepted, stop) = (
            orders_db.clone(),
            users.clone(),
            accepted.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let a = accepted.load(Ordering::Relaxed);
                if let Ok((done, _)) = settled_count(&db, &users).await {
                    samples.push(Sample {
                        t: started.elapsed().as_secs_f64(),
                        accepted: a,
                        completed: done,
                    });
                }
            }
            samples
        })
    };
    let http = shop.http.clone();
    let run = open_loop(&phases, 512, |i| {
        let i = i as usize;
        let (http, base) = (http.clone(), shop.base.clone());
        let token = customers[i % customers.len()].token.clone();
        let product = products[i % products.len()].id.clone();
        let accepted = accepted.clone();
        async move {
            let id = place(&http, &base, &token, &product, 1, GOOD_CARD).await?;
            accepted.fetch_add(1, Ordering::Relaxed);
            Some(id)
        }
    })
    .await;
    ctx.step("draining the backlog");
    let total = accepted.load(Ordering::Relaxed);
    let until = Instant::now() + DRAIN_LIMIT;
    while Instant::now() < until {
        let (done, _) = settled_count(&orders_db, &users).await?;
        if done >= total {
            break;
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    // One more sample after the last order completed.
    tokio::time::sleep(SAMPLE_EVERY * 2).await;
    stop.cancel();
    let samples = sampler
        .await
        .map_err(|e| LabError::Shop(format!("the sampler stopped: {e}")))?;
    ctx.step("done");
    let offset = run.started.duration_since(started).as_secs_f64();
    let in_burst = |d: Duration| (secs..2.0 * secs).contains(&d.as_secs_f64());
    let lat = |burst: bool| -> Vec<Duration> {
        run.calls
            .iter()
            .filter(|c| c.outcome.is_some() && in_burst(c.due) == burst)
            .map(|c| c.latency)
            .collect()
    };
    let o = Observed {
        steady_rate: rate,
        phase_secs: secs,
        accepted_at: run
            .calls
            .iter()
            .filter(|c| c.outcome.is_some())
            .map(|c| offset + (c.due + c.latency).as_secs_f64())
            .collect(),
        refused: run.failures(),
        not_sent: run.skipped,
        samples,
        accept_steady: Summary::of(&lat(false)),
        accept_burst: Summary::of(&lat(true)),
    };
    Ok(measured(&o))
}

/// Completed orders at `t`, interpolated between samples.
fn completed_at(samples: &[Sample], t: f64) -> f64 {
    let mut prev: Option<&Sample> = None;
    for s in samples {
        if s.t >= t {
            return match prev {
                Some(p) if s.t > p.t => {
                    p.completed as f64
                        + (s.completed as f64 - p.completed as f64) * (t - p.t) / (s.t - p.t)
                }
                _ => s.completed as f64,
            };
        }
        prev = Some(s);
    }
    prev.map_or(0.0, |p| p.completed as f64)
}

/// Per-second rates: (second, accepted, completed).
pub fn rates(o: &Observed) -> Vec<(f64, f64, f64)> {
    let end = o.samples.last().map_or(0.0, |s| s.t);
    let seconds = end.floor() as usize;
    (0..seconds)
        .map(|k| {
            let (a, b) = (k as f64, k as f64 + 1.0);
            let accepted = o.accepted_at.iter().filter(|t| (a..b).contains(*t)).count() as f64;
            let completed = completed_at(&o.samples, b) - completed_at(&o.samples, a);
            (a, accepted, completed)
        })
        .collect()
}

/// Seconds from the burst's end until the backlog is back to its level before the burst
/// (`None` when it never was).
pub fn drain_secs(o: &Observed) -> Option<f64> {
    let burst_start = o.phase_secs;
    let burst_end = 2.0 * o.phase_secs;
    let backlog = |s: &Sample| s.accepted.saturating_sub(s.completed);
    let before = o
        .samples
        .iter()
        .filter(|s| s.t < burst_start)
        .map(backlog)
        .max()
        .unwrap_or(0);
    o.samples
        .iter()
        .filter(|s| s.t >= burst_end)
        .find(|s| backlog(s) <= before)
        .map(|s| s.t - burst_end)
}

fn measured(o: &Observed) -> Measured {
    let r = rates(o);
    let peak = |f: fn(&(f64, f64, f64)) -> f64| r.iter().map(f).fold(0.0, f64::max);
    let burst_mean = |f: fn(&(f64, f64, f64)) -> f64| {
        let w: Vec<f64> = r
            .iter()
            .filter(|x| x.0 >= o.phase_secs && x.0 < 2.0 * o.phase_secs)
            .map(f)
            .collect();
        w.iter().sum::<f64>() / w.len().max(1) as f64
    };
    let last = o.samples.last().copied().unwrap_or(Sample {
        t: 0.0,
        accepted: 0,
        completed: 0,
    });
    let max_backlog = o
        .samples
        .iter()
        .map(|s| s.accepted.saturating_sub(s.completed))
        .max()
        .unwrap_or(0);
    let drain = drain_secs(o);
    let mut f = Figures::default();
    f.push("offered.steady_per_s", o.steady_rate, "orders/s");
    f.push("offered.burst_per_s", o.steady_rate * 10.0, "orders/s");
    f.push("orders.accepted", o.accepted_at.len() as f64, "orders");
    f.push("orders.refused", o.refused as f64, "orders");
    f.push("orders.not_sent", o.not_sent as f64, "orders");
    f.push(
        "orders.never_completed",
        last.accepted.saturating_sub(last.completed) as f64,
        "orders",
    );
    f.push("accepted_per_s.peak", peak(|x| x.1), "orders/s");
    f.push("completed_per_s.peak", peak(|x| x.2), "orders/s");
    f.push("burst.accepted_per_s", burst_mean(|x| x.1), "orders/s");
    f.push("burst.completed_per_s", burst_mean(|x| x.2), "orders/s");
    f.push("backlog.max", max_backlog as f64, "orders");
    f.push("drain_secs", drain.unwrap_or(f64::NAN), "s");
    f.push("accept.steady.p50_ms", o.accept_steady.p50_ms, "ms");
    f.push("accept.steady.p99_ms", o.accept_steady.p99_ms, "ms");
    f.push("accept.burst.p50_ms", o.accept_burst.p50_ms, "ms");
    f.push("accept.burst.p99_ms", o.accept_burst.p99_ms, "ms");
    Measured {
        headline: format!(
            "accepted up to {}/s, completed at most {}/s; backlog {} drained {} s after the burst",
            num(peak(|x| x.1)),
            num(peak(|x| x.2)),
            max_backlog,
            drain.map_or_else(|| "never".to_owned(), num)
        ),
        verdict: verdict(o),
        figures: f,
        charts: vec![
            Chart {
                title: format!(
                    "A burst of {}× the steady rate: orders accepted and completed per second",
                    10
                ),
                x_label: "time (s)".into(),
                y_label: "orders per second".into(),
                series: vec![
                    Series::new("accepted (202)", r.iter().map(|x| (x.0, x.1)).collect()),
                    Series::new(
                        "completed (confirmed or cancelled)",
                        r.iter().map(|x| (x.0, x.2)).collect(),
                    ),
                ],
            },
            Chart {
                title: "Backlog: orders accepted and not yet completed".into(),
                x_label: "time (s)".into(),
                y_label: "orders".into(),
                series: vec![Series::new(
                    "backlog",
                    o.samples
                        .iter()
                        .map(|s| (s.t, s.accepted.saturating_sub(s.completed) as f64))
                        .collect(),
                )],
            },
        ],
    }
}

/// The rule of [`META`], applied to the observations.
pub fn verdict(o: &Observed) -> Verdict {
    let r = rates(o);
    let peak_in = r.iter().map(|x| x.1).fold(0.0, f64::max);
    let peak_out = r.iter().map(|x| x.2).fold(0.0, f64::max);
    let never = o
        .samples
        .last()
        .map_or(0, |s| s.accepted.saturating_sub(s.completed));
    let drain = drain_secs(o);
    let because = format!(
        "{} orders accepted at up to {}/s (offered {}/s at the peak) while the saga completed at most {}/s; {} refused, {} not sent, {} never completed; the backlog drained {}",
        o.accepted_at.len(),
        num(peak_in),
        num(o.steady_rate * 10.0),
        num(peak_out),
        o.refused,
        o.not_sent,
        never,
        drain.map_or_else(
            || "never".to_owned(),
            |d| format!("{} s after the burst", num(d))
        )
    );
    if o.accepted_at.is_empty() {
        return Verdict::new(Outcome::Inconclusive, "no order was accepted");
    }
    if o.refused > 0 || never > 0 || drain.is_none() {
        return Verdict::new(Outcome::Refuted, because);
    }
    let offered = o.accepted_at.len() + o.refused + o.not_sent;
    if o.not_sent as f64 > 0.01 * offered as f64 {
        return Verdict::new(Outcome::Partly, because);
    }
    if peak_in < 1.5 * peak_out {
        return Verdict::new(Outcome::Inconclusive, because);
    }
    Verdict::new(Outcome::Holds, because)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10/s accepted for 2 s, 100/s for 2 s, 10/s for 2 s; completed at `cap` per second.
    fn observed(cap: f64) -> Observed {
        let mut accepted_at = Vec::new();
        for (from, rate) in [(0.0, 10.0), (2.0, 100.0), (4.0, 10.0)] {
            for k in 0..(2.0 * rate) as usize {
                accepted_at.push(from + k as f64 / rate);
            }
        }
        let mut samples = Vec::new();
        let mut done = 0.0f64;
        let mut t = 0.0;
        while t < 30.0 {
            t += 0.2;
            let a = accepted_at.iter().filter(|x| **x < t).count();
            done = (done + cap * 0.2).min(a as f64);
            samples.push(Sample {
                t,
                accepted: a,
                completed: done as usize,
            });
            if done as usize == accepted_at.len() && t > 7.0 {
                break;
            }
        }
        Observed {
            steady_rate: 10.0,
            phase_secs: 2.0,
            accepted_at,
            refused: 0,
            not_sent: 0,
            samples,
            accept_steady: Summary::default(),
            accept_burst: Summary::default(),
        }
    }

    #[test]
    fn the_verdict_follows_accepted_and_completed_rates() {
        let smoothed = observed(40.0);
        assert_eq!(verdict(&smoothed).outcome, Outcome::Holds);
        assert!(drain_secs(&smoothed).unwrap() > 1.0);
        // Consumers as fast as the burst: nothing was smoothed.
        assert_eq!(verdict(&observed(1000.0)).outcome, Outcome::Inconclusive);
        let mut refused = observed(40.0);
        refused.refused = 3;
        assert_eq!(verdict(&refused).outcome, Outcome::Refuted);
        let mut front_door = observed(40.0);
        front_door.not_sent = 50;
        assert_eq!(verdict(&front_door).outcome, Outcome::Partly);
    }

    #[test]
    fn completions_are_interpolated_between_samples() {
        let s = [
            Sample {
                t: 1.0,
                accepted: 10,
                completed: 0,
            },
            Sample {
                t: 2.0,
                accepted: 10,
                completed: 10,
            },
        ];
        assert_eq!(completed_at(&s, 1.5), 5.0);
        assert_eq!(completed_at(&s, 3.0), 10.0);
        assert_eq!(completed_at(&s, 0.5), 0.0);
    }
}
