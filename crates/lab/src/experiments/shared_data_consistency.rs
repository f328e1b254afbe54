//! Shared data: after a profile change, how long until another service sees it — through
//! the user center's interface (its cache dropped by the `user.updated` event) and through
//! the user center's published read-only view (the shared database)?

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use super::saga::{GOOD_CARD, stocked};
use super::{Ctx, Measured, Meta};
use crate::load::Summary;
use crate::report::{Chart, Figures, Group, Outcome, Series, Verdict, num};
use crate::shop::{LabShop, ShopSpec};
use crate::{LabError, Scale};

pub const META: Meta = Meta {
    id: "shared-data.consistency",
    group: Group::SharedData,
    claim: "Better data consistency, avoiding multiple-copy synchronization issues",
    experiment: "a profile change, then orders until one ships to the new address: through the interface (cached, invalidated by event) and through the shared read-only view",
    method: "Two shops run side by side, identical but for how the orders service reads accounts: the user center's interface (a cache dropped by the user.updated event) or its published view through a read-only connection. A customer warms the orders service's copy with an order, changes the address, then places orders until one ships to the new city; the window is the time from the change's answer to the start of the first order that saw it (exact to within one order placement).",
    rule: "Holds when the shared view's median window is shorter than the interface's; refuted when it is not; inconclusive when both were consistent within a millisecond (nothing to tell apart) or a change was not seen within 10 s.",
    shops: &[ShopSpec::MAIN, ShopSpec::SHARED_VIEW],
};

/// Longest a change may stay unseen before the round gives up.
const ROUND_LIMIT: Duration = Duration::from_secs(10);
/// Well-stocked products skipped (other experiments order them).
const SKIP_PRODUCTS: usize = 90;

pub fn steps(s: &Scale) -> u64 {
    2 * s.consistency_rounds as u64
}

/// One way's windows, in milliseconds (`None`: not seen within the limit).
#[derive(Debug, Clone, PartialEq)]
pub struct Way {
    pub windows_ms: Vec<Option<f64>>,
    /// Orders placed to see the changes.
    pub probes: usize,
}

impl Way {
    fn seen(&self) -> Vec<Duration> {
        self.windows_ms
            .iter()
            .flatten()
            .map(|ms| Duration::from_secs_f64(ms / 1e3))
            .collect()
    }
}

async fn order(shop: &LabShop, token: &str, product: &str) -> Result<Value, LabError> {
    let res = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(token)
        .json(&json!({"items": [{"product_id": product, "quantity": 1}], "card": GOOD_CARD}))
        .send()
        .await?;
    if res.status() != 202 {
        return Err(LabError::Shop(format!(
            "an order answered {}",
            res.status()
        )));
    }
    Ok(res.json().await?)
}

async fn way(ctx: &Ctx<'_>, shop: &LabShop, label: &str) -> Result<Way, LabError> {
    let product = stocked(shop, SKIP_PRODUCTS, 1, 300)
        .pop()
        .ok_or_else(|| LabError::Shop("no well-stocked product was seeded".into()))?;
    let (_, token) = shop.user().await?;
    // Warm the orders service's copy of the account.
    order(shop, &token, &product.id).await?;
    let mut w = Way {
        windows_ms: Vec::new(),
        probes: 0,
    };
    for round in 0..ctx.scale.consistency_rounds {
        ctx.say(format!("{label}: change {}", round + 1));
        let city = format!("Lab City {round}");
        let res = shop
            .http
            .patch(shop.url("/api/users/me"))
            .bearer_auth(&token)
            .json(
                &json!({"addresses": [{"recipient": "Lab", "line1": "1 Main St",
                "city": city, "postal_code": "1000", "country": "BE"}]}),
            )
            .send()
            .await?;
        if !res.status().is_success() {
            return Err(LabError::Shop(format!(
                "a profile change answered {}",
                res.status()
            )));
        }
        let changed = Instant::now();
        let mut window = None;
        while changed.elapsed() < ROUND_LIMIT {
            let sent = changed.elapsed();
            let o = order(shop, &token, &product.id).await?;
            w.probes += 1;
            if o["shipping_address"]["city"] == city.as_str() {
                window = Some(sent.as_secs_f64() * 1e3);
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        w.windows_ms.push(window);
        ctx.step(format!("{label}: change {} seen", round + 1));
    }
    Ok(w)
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let interface = way(ctx, ctx.shop(ShopSpec::MAIN)?, "interface").await?;
    let view = way(ctx, ctx.shop(ShopSpec::SHARED_VIEW)?, "shared view").await?;
    let (si, sv) = (Summary::of(&interface.seen()), Summary::of(&view.seen()));
    let mut f = Figures::default();
    for (name, w, s) in [("interface", &interface, &si), ("shared_view", &view, &sv)] {
        f.push(format!("{name}.window.p50_ms"), s.p50_ms, "ms");
        f.push(format!("{name}.window.max_ms"), s.max_ms, "ms");
        f.push(
            format!("{name}.unseen"),
            w.windows_ms.iter().filter(|x| x.is_none()).count() as f64,
            "changes",
        );
        f.push(
            format!("{name}.probes_per_change"),
            w.probes as f64 / w.windows_ms.len().max(1) as f64,
            "orders",
        );
    }
    let series = |name: &str, w: &Way| {
        Series::new(
            name,
            w.windows_ms
                .iter()
                .enumerate()
                .filter_map(|(i, x)| x.map(|ms| ((i + 1) as f64, ms)))
                .collect(),
        )
    };
    Ok(Measured {
        headline: format!(
            "change seen after p50 {} ms (max {}) via the interface, {} ms (max {}) via the shared view",
            num(si.p50_ms),
            num(si.max_ms),
            num(sv.p50_ms),
            num(sv.max_ms)
        ),
        verdict: verdict(&interface, &view),
        figures: f,
        charts: vec![Chart {
            title: "Time until the orders service sees a profile change".into(),
            x_label: "change".into(),
            y_label: "window (ms)".into(),
            series: vec![
                series("interface (cache invalidated by event)", &interface),
                series("shared read-only view", &view),
            ],
        }],
    })
}

/// The rule of [`META`], applied to the windows.
pub fn verdict(interface: &Way, view: &Way) -> Verdict {
    let unseen = |w: &Way| w.windows_ms.iter().filter(|x| x.is_none()).count();
    let (si, sv) = (Summary::of(&interface.seen()), Summary::of(&view.seen()));
    let because = format!(
        "the interface's window was {} ms at the median (max {}), the shared view's {} ms (max {}); {} and {} change(s) unseen within 10 s",
        num(si.p50_ms),
        num(si.max_ms),
        num(sv.p50_ms),
        num(sv.max_ms),
        unseen(interface),
        unseen(view)
    );
    if si.n == 0 || sv.n == 0 || unseen(interface) + unseen(view) > 0 {
        return Verdict::new(Outcome::Inconclusive, because);
    }
    if si.max_ms < 1.0 && sv.max_ms < 1.0 {
        return Verdict::new(Outcome::Inconclusive, because);
    }
    if sv.p50_ms < si.p50_ms {
        Verdict::new(Outcome::Holds, because)
    } else {
        Verdict::new(Outcome::Refuted, because)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn way(ms: &[f64]) -> Way {
        Way {
            windows_ms: ms.iter().map(|m| Some(*m)).collect(),
            probes: ms.len(),
        }
    }

    #[test]
    fn the_verdict_follows_the_windows() {
        assert_eq!(
            verdict(&way(&[12.0, 15.0, 9.0]), &way(&[0.1, 0.2, 0.1])).outcome,
            Outcome::Holds
        );
        assert_eq!(
            verdict(&way(&[0.1, 0.2]), &way(&[8.0, 9.0])).outcome,
            Outcome::Refuted
        );
        assert_eq!(
            verdict(&way(&[0.1, 0.2]), &way(&[0.1, 0.2])).outcome,
            Outcome::Inconclusive
        );
        let mut unseen = way(&[12.0]);
        unseen.windows_ms.push(None);
        assert_eq!(
            verdict(&unseen, &way(&[0.1])).outcome,
            Outcome::Inconclusive
        );
    }
}
