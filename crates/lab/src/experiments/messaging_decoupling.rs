//! Asynchronous messaging: with inventory stopped under a steady flow of orders, does the
//! shop keep taking orders, and do they all end once inventory is back — how long after?

use std::time::Duration;

use tokio::time::Instant;

use super::saga::{Audit, GOOD_CARD, Placed, Setup, audit, audit_figures, place};
use super::{Ctx, Measured, Meta};
use crate::load::{Phase, Summary, open_loop};
use crate::report::{Chart, Figures, Group, Outcome, Series, Verdict, num};
use crate::shop::ShopSpec;
use crate::{LabError, Scale};
use shopmesh_shop::ServiceName;

pub const META: Meta = Meta {
    id: "messaging.decoupling",
    group: Group::Messaging,
    claim: "Decouples services, allowing upstream and downstream to evolve independently",
    experiment: "inventory stopped under a steady flow of orders: orders accepted meanwhile, all terminal after it returns, and how long that took",
    method: "The inventory service alone is stopped (its server, its outbox relay and its consumer; the broker keeps what it would consume) while good orders are placed through the gateway at a fixed rate for the whole outage. Then it is started again on its port and the orders, payments, reservations and stock are read from the services' databases until every order is decided and every effect settled.",
    rule: "Holds when at least 99% of the orders offered during the outage were accepted, and after inventory returned every one of them ended as it should (none lost, none pending, stock and money exact); partly when they were accepted but did not all end, or not exactly; refuted when more than 1% were refused while inventory was down; inconclusive when no order was offered.",
    shops: &[ShopSpec::MAIN],
};

/// Well-stocked products skipped (other experiments order the first ones).
const SKIP_PRODUCTS: usize = 100;
/// How long the orders may take to end after inventory returns.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

pub fn steps(_: &Scale) -> u64 {
    4
}

/// What the outage did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outage {
    pub offered: usize,
    pub accepted: usize,
    /// Orders decided (no longer pending) while inventory was down.
    pub decided_during: usize,
    /// From the restart until every accepted order was decided, and until every effect
    /// settled; `None` when it did not happen within the limit.
    pub decided_after_ms: Option<f64>,
    pub settled_after_ms: Option<f64>,
    pub audit: Audit,
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let shop = ctx.shop(ShopSpec::MAIN)?;
    let secs = ctx.scale.outage_secs;
    ctx.say("registering customers");
    let setup = Setup::new(shop, SKIP_PRODUCTS).await?;
    ctx.step("inventory stopped, orders placed");
    let stopping = Instant::now();
    shop.system.stop_service(ServiceName::Inventory).await;
    let stop_ms = stopping.elapsed().as_secs_f64() * 1e3;
    let phase = [Phase {
        rate: ctx.scale.steady_rate,
        duration: Duration::from_secs_f64(secs),
    }];
    let run = open_loop(&phase, 256, |i| {
        let i = i as usize;
        let c = &setup.customers[i % setup.customers.len()];
        let product = setup.products[i % setup.products.len()].id.clone();
        let (http, base, token) = (shop.http.clone(), shop.base.clone(), c.token.clone());
        async move {
            let id = place(&http, &base, &token, &product, 1, GOOD_CARD).await?;
            Some(Placed {
                id,
                kind: super::saga::OrderKind::Good,
                product,
                quantity: 1,
            })
        }
    })
    .await;
    let offered = run.calls.len() + run.skipped;
    let accept_latency = Summary::of(&run.latencies());
    let placed: Vec<Placed> = run.calls.into_iter().filter_map(|c| c.outcome).collect();
    // Whatever was decided while inventory was down (none should be: nothing reserved).
    let during = audit(&setup.dbs, &placed, &setup.before).await?;
    ctx.step("inventory started again");
    shop.system.restart_service(ServiceName::Inventory).await?;
    let restarted = Instant::now();
    ctx.step("waiting until every order ends");
    let mut pending_curve = vec![(0.0, during.pending as f64)];
    let mut settled_after_ms = None;
    let a = loop {
        let a = audit(&setup.dbs, &placed, &setup.before).await?;
        let t = restarted.elapsed();
        pending_curve.push((t.as_secs_f64(), a.pending as f64));
        if a.pending == 0 && a.unsettled == 0 {
            settled_after_ms = Some(t.as_secs_f64() * 1e3);
        }
        if settled_after_ms.is_some() || t >= SETTLE_LIMIT {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The first audit that found none pending.
    let decided_after_ms = pending_curve
        .iter()
        .find(|(_, p)| *p == 0.0)
        .map(|(t, _)| t * 1e3);
    ctx.step("done");
    let outage = Outage {
        offered,
        accepted: placed.len(),
        decided_during: during.confirmed + during.cancelled,
        decided_after_ms,
        settled_after_ms,
        audit: a,
    };
    let mut f = Figures::default();
    f.push("outage_s", secs, "s");
    f.push("inventory_stop_ms", stop_ms, "ms");
    f.push("orders.offered", outage.offered as f64, "orders");
    f.push(
        "orders.accepted_during_outage",
        outage.accepted as f64,
        "orders",
    );
    f.push(
        "orders.refused_during_outage",
        (outage.offered - outage.accepted) as f64,
        "orders",
    );
    f.push("accept.p50_ms", accept_latency.p50_ms, "ms");
    f.push("accept.p99_ms", accept_latency.p99_ms, "ms");
    f.push(
        "orders.decided_during_outage",
        outage.decided_during as f64,
        "orders",
    );
    if let Some(ms) = outage.decided_after_ms {
        f.push("all_decided_after_return_ms", ms, "ms");
    }
    if let Some(ms) = outage.settled_after_ms {
        f.push("all_settled_after_return_ms", ms, "ms");
    }
    audit_figures(&outage.audit, &mut f);
    Ok(Measured {
        headline: format!(
            "inventory down {} s: {} of {} orders accepted; all ended {} after it returned ({} pending, {} lost)",
            num(secs),
            outage.accepted,
            outage.offered,
            outage
                .settled_after_ms
                .map_or("not within 120 s".into(), |ms| format!(
                    "{} s",
                    num(ms / 1e3)
                )),
            outage.audit.pending,
            outage.audit.lost,
        ),
        verdict: verdict(&outage),
        figures: f,
        charts: vec![Chart {
            title: "Orders still pending after inventory returns".into(),
            x_label: "seconds since inventory returned".into(),
            y_label: "pending orders".into(),
            series: vec![Series::new("pending orders", pending_curve)],
        }],
    })
}

/// The rule of [`META`], applied to the outage.
pub fn verdict(o: &Outage) -> Verdict {
    let a = &o.audit;
    let because = format!(
        "{} of {} orders accepted while inventory was down ({} decided meanwhile); after it returned {} pending, {} lost, {} with the wrong end, stock off by {}, money by {}, every effect settled {}",
        o.accepted,
        o.offered,
        o.decided_during,
        a.pending,
        a.lost,
        a.wrong_outcome,
        a.stock_difference,
        a.money_difference_minor,
        o.settled_after_ms
            .map_or("not within 120 s".into(), |ms| format!(
                "after {} ms",
                num(ms)
            )),
    );
    if o.offered == 0 {
        return Verdict::new(Outcome::Inconclusive, because);
    }
    if (o.accepted as f64) < 0.99 * o.offered as f64 {
        return Verdict::new(Outcome::Refuted, because);
    }
    if a.exact() && a.placed == o.accepted && o.settled_after_ms.is_some() {
        Verdict::new(Outcome::Holds, because)
    } else {
        Verdict::new(Outcome::Partly, because)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outage(offered: usize, accepted: usize, pending: usize) -> Outage {
        Outage {
            offered,
            accepted,
            decided_during: 0,
            decided_after_ms: (pending == 0).then_some(800.0),
            settled_after_ms: (pending == 0).then_some(900.0),
            audit: Audit {
                placed: accepted,
                pending,
                confirmed: accepted - pending,
                ..Audit::default()
            },
        }
    }

    #[test]
    fn the_verdict_follows_acceptance_and_the_end_state() {
        assert_eq!(verdict(&outage(100, 100, 0)).outcome, Outcome::Holds);
        assert_eq!(verdict(&outage(100, 100, 3)).outcome, Outcome::Partly);
        assert_eq!(verdict(&outage(100, 60, 0)).outcome, Outcome::Refuted);
        assert_eq!(verdict(&outage(0, 0, 0)).outcome, Outcome::Inconclusive);
        let mut off = outage(100, 100, 0);
        off.audit.stock_difference = 2;
        assert_eq!(verdict(&off).outcome, Outcome::Partly);
    }
}
