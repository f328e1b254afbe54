//! Proxy: the gateway is the one way in. What does losing a gateway instance under load
//! cost — when it is the only one, and when a second one shares its address?

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use shopmesh_shop::ServiceName;

use super::{Ctx, Measured, Meta, product_window};
use crate::cpu::Worker;
use crate::load::{Phase, open_loop};
use crate::relay::Relay;
use crate::report::{Chart, Figures, Group, Outcome, Series, Verdict, num};
use crate::shop::{LabShop, ShopSpec, client, redirect};
use crate::{LabError, Scale};

pub const META: Meta = Meta {
    id: "proxy.single-point",
    group: Group::Proxy,
    claim: "Proxy layer can become a single point of risk",
    experiment: "one gateway instance lost under steady load, alone and as one of two instances sharing an address: failed requests before and after the loss",
    method: "Gateways built from the shop's own configuration listen on one address (SO_REUSEPORT, as `shopmesh gateway` instances share one; the kernel spreads connections among them), each on a thread with its own runtime. Eight callers, each with its own keep-alive connections, send GET /api/prices/{id} to that address at a fixed rate (each instance's calls to the pricing service cross a relay of its own, which counts the share of the traffic it carried); halfway, one instance is lost: its listener closed and its runtime dropped with every connection it held, no drain, as a crash (kill -9) leaves them. Run once with that instance alone, once with a second beside it. A request fails when it is not answered 200; nothing is retried but what the HTTP client itself resends on a pooled connection found closed before the request was written.",
    rule: "Holds when, with two instances, at least 5% of the requests due after the loss still failed (a second instance does not take the risk away); mitigated when the lone instance's loss failed at least 90% of the requests after it and the pair's failed fewer than 5% (the risk is there, and a second instance bounds it to the requests caught on the lost one); inconclusive when more than 1% failed before the loss, or the lone instance's loss did not fail at least 90% after it, or the lost one of two had carried less than 10% of the traffic, or nothing was sent.",
    shops: &[ShopSpec::MAIN],
};

/// Requests in flight at most.
const MAX_IN_FLIGHT: usize = 256;
/// Callers, each with its own HTTP client (and so its own connections).
const CLIENTS: usize = 8;
/// Share of the traffic the lost instance must have carried for its loss to tell anything.
const MIN_LOST_SHARE: f64 = 0.1;
/// Share of requests failing after the loss that still counts as bounded.
const BOUNDED: f64 = 0.05;

pub fn steps(_: &Scale) -> u64 {
    2
}

/// One instance: a gateway on a worker thread of its own, on `addr` (port 0: any),
/// joining the `SO_REUSEPORT` group already there; its calls to the pricing service cross
/// `relay` (which counts what this instance forwarded). No drain: stopping it is losing it
/// (its listener closed, its runtime dropped with every connection on it).
fn instance(shop: &LabShop, addr: SocketAddr, relay: &Relay) -> Result<Worker, LabError> {
    let mut g = shopmesh_shop::gateway_config(&shop.cfg, |n| shop.service(n));
    redirect(&mut g, "pricing", relay.addr());
    Worker::serve(g, addr, Duration::ZERO)
}

/// One run: requests due before and after the loss, and those of each that failed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Loss {
    pub instances: usize,
    pub before: usize,
    pub failed_before: usize,
    pub after: usize,
    pub failed_after: usize,
    /// Requests that could not be sent on time (all slots busy).
    pub skipped: usize,
    /// The lost instance's share of what the instances forwarded before the loss (bytes to
    /// the pricing service).
    pub lost_share: f64,
}

impl Loss {
    pub fn failed_after_share(&self) -> f64 {
        if self.after == 0 {
            0.0
        } else {
            self.failed_after as f64 / self.after as f64
        }
    }
}

/// `instances` gateways on one address, the last lost halfway through `secs` of requests at
/// `rate`; also the failures per tenth of a second (for the chart).
async fn run_once(
    shop: &LabShop,
    instances: usize,
    rate: f64,
    secs: f64,
) -> Result<(Loss, Vec<(f64, f64)>), LabError> {
    let mut relays = Vec::new();
    for _ in 0..instances.max(1) {
        relays.push(Arc::new(
            Relay::start(shop.service(ServiceName::Pricing), Duration::ZERO).await?,
        ));
    }
    let first = instance(shop, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), &relays[0])?;
    let addr = first.addr;
    let mut running = vec![first];
    for relay in &relays[1..] {
        running.push(instance(shop, addr, relay)?);
    }
    // Several callers, each with its own keep-alive connections (spread over the instances).
    let clients = (0..CLIENTS)
        .map(|_| client())
        .collect::<Result<Vec<_>, _>>()?;
    let products: Vec<String> = product_window(shop, 500, 64)
        .into_iter()
        .map(|p| p.id)
        .collect();
    if products.is_empty() {
        return Err(LabError::Shop("no product was seeded".into()));
    }
    let base = format!("http://{addr}");
    // The gateways answer before the clock starts.
    for (http, p) in clients.iter().zip(products.iter()) {
        http.get(format!("{base}/api/prices/{p}")).send().await?;
    }
    for r in &relays {
        r.reset();
    }
    let lost = running
        .pop()
        .ok_or_else(|| LabError::Shop("no gateway instance".into()))?;
    let loss_at = Duration::from_secs_f64(secs / 2.0);
    let counted = relays.clone();
    let loser = tokio::spawn(async move {
        tokio::time::sleep(loss_at).await;
        let forwarded: Vec<u64> = counted.iter().map(|r| r.traffic().bytes_up).collect();
        lost.stop().await;
        let all: u64 = forwarded.iter().sum();
        forwarded
            .last()
            .map_or(0.0, |l| *l as f64 / all.max(1) as f64)
    });
    let phase = [Phase {
        rate,
        duration: Duration::from_secs_f64(secs),
    }];
    let run = open_loop(&phase, MAX_IN_FLIGHT, |i| {
        let url = format!(
            "{base}/api/prices/{}",
            products[i as usize % products.len()]
        );
        let http = clients[i as usize % clients.len()].clone();
        async move {
            let res = http.get(url).send().await.ok()?;
            if res.status() != 200 {
                return None;
            }
            res.bytes().await.ok().map(|_| ())
        }
    })
    .await;
    let lost_share = loser.await.unwrap_or(0.0);
    for survivor in running {
        survivor.stop().await;
    }
    let mut loss = Loss {
        instances,
        skipped: run.skipped,
        lost_share,
        ..Loss::default()
    };
    let tenths = (secs * 10.0).ceil() as usize;
    let mut failed_per_tenth = vec![0.0; tenths.max(1)];
    for c in &run.calls {
        let failed = c.outcome.is_none();
        if c.due < loss_at {
            loss.before += 1;
            loss.failed_before += usize::from(failed);
        } else {
            loss.after += 1;
            loss.failed_after += usize::from(failed);
        }
        if failed {
            let slot = ((c.due.as_secs_f64() * 10.0) as usize).min(failed_per_tenth.len() - 1);
            failed_per_tenth[slot] += 1.0;
        }
    }
    let curve = failed_per_tenth
        .into_iter()
        .enumerate()
        .map(|(i, n)| (i as f64 / 10.0 - loss_at.as_secs_f64(), n))
        .collect();
    Ok((loss, curve))
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let shop = ctx.shop(ShopSpec::MAIN)?;
    let (rate, secs) = (ctx.scale.proxy_rate, ctx.scale.loss_secs);
    ctx.say("one instance, lost");
    let (alone, alone_curve) = run_once(shop, 1, rate, secs).await?;
    ctx.step("two instances, one lost");
    let (pair, pair_curve) = run_once(shop, 2, rate, secs).await?;
    ctx.step("done");
    let mut f = Figures::default();
    f.push("rate_per_s", rate, "requests/s");
    f.push("loss_at_s", secs / 2.0, "s");
    for (k, l) in [("one_instance", &alone), ("two_instances", &pair)] {
        f.push(
            format!("{k}.requests_before_loss"),
            l.before as f64,
            "requests",
        );
        f.push(
            format!("{k}.failed_before_loss"),
            l.failed_before as f64,
            "requests",
        );
        f.push(
            format!("{k}.requests_after_loss"),
            l.after as f64,
            "requests",
        );
        f.push(
            format!("{k}.failed_after_loss"),
            l.failed_after as f64,
            "requests",
        );
        f.push(
            format!("{k}.failed_after_loss_share"),
            l.failed_after_share(),
            "share",
        );
        f.push(format!("{k}.skipped"), l.skipped as f64, "requests");
        f.push(
            format!("{k}.lost_instance_share_before_loss"),
            l.lost_share,
            "share",
        );
    }
    Ok(Measured {
        headline: format!(
            "instance lost: alone, {}% of the requests after it failed ({} of {}); one of two, {} of {} failed",
            num(alone.failed_after_share() * 100.0),
            alone.failed_after,
            alone.after,
            pair.failed_after,
            pair.after,
        ),
        verdict: verdict(&alone, &pair),
        figures: f,
        charts: vec![Chart {
            title: "Failed requests per 100 ms around the loss of a gateway instance".into(),
            x_label: "seconds since the loss".into(),
            y_label: "failed requests".into(),
            series: vec![
                Series::new("the only instance lost", alone_curve),
                Series::new("one of two instances lost", pair_curve),
            ],
        }],
    })
}

/// The rule of [`META`], applied to the run with one instance and the run with two.
pub fn verdict(alone: &Loss, pair: &Loss) -> Verdict {
    let because = format!(
        "losing the only instance failed {} of the {} requests due after it ({}%); losing one of two (which had carried {}% of the traffic) failed {} of {} ({}%); before the loss {} and {} failed",
        alone.failed_after,
        alone.after,
        num(alone.failed_after_share() * 100.0),
        num(pair.lost_share * 100.0),
        pair.failed_after,
        pair.after,
        num(pair.failed_after_share() * 100.0),
        alone.failed_before,
        pair.failed_before,
    );
    let unsteady = |l: &Loss| l.failed_before as f64 > 0.01 * l.before as f64;
    if alone.after == 0 || pair.after == 0 || alone.before == 0 || pair.before == 0 {
        return Verdict::new(Outcome::Inconclusive, because);
    }
    if unsteady(alone) || unsteady(pair) || alone.failed_after_share() < 0.9 {
        return Verdict::new(Outcome::Inconclusive, because);
    }
    if pair.lost_share < MIN_LOST_SHARE {
        return Verdict::new(
            Outcome::Inconclusive,
            format!(
                "{because}; but the lost instance had carried only {}% of the traffic",
                num(pair.lost_share * 100.0)
            ),
        );
    }
    if pair.failed_after_share() >= BOUNDED {
        Verdict::new(Outcome::Holds, because)
    } else {
        Verdict::new(Outcome::Mitigated, because)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loss(instances: usize, failed_before: usize, failed_after: usize) -> Loss {
        Loss {
            instances,
            before: 100,
            failed_before,
            after: 100,
            failed_after,
            skipped: 0,
            lost_share: 0.5,
        }
    }

    #[test]
    fn the_verdict_follows_the_failures_after_the_loss() {
        assert_eq!(
            verdict(&loss(1, 0, 100), &loss(2, 0, 2)).outcome,
            Outcome::Mitigated
        );
        assert_eq!(
            verdict(&loss(1, 0, 100), &loss(2, 0, 40)).outcome,
            Outcome::Holds
        );
        // The lone instance's loss did not show: nothing to compare.
        assert_eq!(
            verdict(&loss(1, 0, 10), &loss(2, 0, 2)).outcome,
            Outcome::Inconclusive
        );
        // Failing before the loss: the setup, not the loss.
        assert_eq!(
            verdict(&loss(1, 5, 100), &loss(2, 0, 2)).outcome,
            Outcome::Inconclusive
        );
        assert_eq!(
            verdict(&Loss::default(), &loss(2, 0, 2)).outcome,
            Outcome::Inconclusive
        );
        // The lost one of two had carried nothing: its loss tells nothing.
        let mut idle = loss(2, 0, 0);
        idle.lost_share = 0.0;
        assert_eq!(
            verdict(&loss(1, 0, 100), &idle).outcome,
            Outcome::Inconclusive
        );
    }
}
