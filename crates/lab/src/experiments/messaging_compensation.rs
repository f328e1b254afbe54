//! Asynchronous messaging: orders that fail half-way (a declined card, no stock) — do the
//! compensations run, and does money and stock end exact?

use super::saga::{Audit, OrderKind, audit_figures, run_mix};
use super::{Ctx, Measured, Meta};
use crate::report::{Chart, Figures, Group, Outcome, Series, Verdict, num};
use crate::shop::ShopSpec;
use crate::{LabError, Scale};

pub const META: Meta = Meta {
    id: "messaging.compensation",
    group: Group::Messaging,
    claim: "Consistency becomes more complex, requiring compensation mechanisms",
    experiment: "a mix of good, declined-card and out-of-stock orders: compensations run, stock and money exact, time to consistency",
    method: "Orders are placed through the gateway at a fixed rate, six in ten good, two with a card the simulated network declines, two for a sold-out product. Once every order is decided and every effect settled, the orders, payments, reservations and stock are read from the services' databases: a declined order must release its reserved stock, an out-of-stock one void its authorization.",
    rule: "Holds when failed orders needed compensations, they ran (reservations released, payments voided) and money and stock ended exact with every order as its kind demands; partly when compensations ran but the end state is not exact; refuted when failed orders were compensated by nothing; inconclusive when no order failed.",
    shops: &[ShopSpec::MAIN],
};

/// Well-stocked products left to the burst experiment.
const SKIP_PRODUCTS: usize = 40;

pub fn steps(_: &Scale) -> u64 {
    3
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let shop = ctx.shop(ShopSpec::MAIN)?;
    let (placed, refused, a) = run_mix(ctx, shop, SKIP_PRODUCTS).await?;
    let failing = placed.iter().filter(|p| p.kind != OrderKind::Good).count();
    let mut f = Figures::default();
    f.push("orders.refused", refused as f64, "orders");
    f.push("orders.meant_to_fail", failing as f64, "orders");
    audit_figures(&a, &mut f);
    let mut ms = a.settle_ms.clone();
    ms.sort_by(f64::total_cmp);
    let cdf: Vec<(f64, f64)> = ms
        .iter()
        .enumerate()
        .map(|(i, v)| ((i + 1) as f64 * 100.0 / ms.len() as f64, *v))
        .collect();
    Ok(Measured {
        headline: format!(
            "{} compensations for {} failed orders; money off by {}, stock by {}; consistent p50 {} ms, p99 {} ms",
            a.released + a.voided,
            failing,
            a.money_difference_minor,
            a.stock_difference,
            num(f.get("consistent_after.p50_ms").unwrap_or(f64::NAN)),
            num(f.get("consistent_after.p99_ms").unwrap_or(f64::NAN)),
        ),
        verdict: verdict(&a, failing, refused),
        figures: f,
        charts: vec![Chart {
            title: "Time from placing an order until it and its effects are consistent".into(),
            x_label: "orders (%)".into(),
            y_label: "time to consistency (ms)".into(),
            series: vec![Series::new("orders, fastest first", cdf)],
        }],
    })
}

/// The rule of [`META`], applied to the audit.
pub fn verdict(a: &Audit, failing: usize, refused: usize) -> Verdict {
    let compensations = a.released + a.voided;
    let because = format!(
        "{failing} of {} orders were meant to fail; {} reservations released and {} payments voided; {} lost, {} pending, {} unsettled, {} with the wrong outcome, money off by {} and stock by {} units; {refused} refused",
        a.placed,
        a.released,
        a.voided,
        a.lost,
        a.pending,
        a.unsettled,
        a.wrong_outcome,
        a.money_difference_minor,
        a.stock_difference
    );
    if failing == 0 {
        return Verdict::new(Outcome::Inconclusive, because);
    }
    if compensations == 0 {
        return Verdict::new(Outcome::Refuted, because);
    }
    if a.exact() && refused == 0 {
        Verdict::new(Outcome::Holds, because)
    } else {
        Verdict::new(Outcome::Partly, because)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_follows_the_audit() {
        let exact = Audit {
            placed: 10,
            confirmed: 6,
            cancelled: 4,
            released: 2,
            voided: 2,
            ..Default::default()
        };
        assert_eq!(verdict(&exact, 4, 0).outcome, Outcome::Holds);
        let off = Audit {
            stock_difference: 1,
            ..exact.clone()
        };
        assert_eq!(verdict(&off, 4, 0).outcome, Outcome::Partly);
        let none = Audit {
            released: 0,
            voided: 0,
            ..exact.clone()
        };
        assert_eq!(verdict(&none, 4, 0).outcome, Outcome::Refuted);
        assert_eq!(verdict(&exact, 0, 0).outcome, Outcome::Inconclusive);
    }
}
