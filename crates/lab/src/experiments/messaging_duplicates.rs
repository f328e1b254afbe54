//! Asynchronous messaging: every message delivered twice — is anything lost, reserved twice
//! or charged twice?

use super::saga::{Audit, audit_figures, run_mix};
use super::{Ctx, Measured, Meta};
use crate::report::{Figures, Group, Outcome, Verdict};
use crate::shop::ShopSpec;
use crate::{LabError, Scale};

pub const META: Meta = Meta {
    id: "messaging.duplicates",
    group: Group::Messaging,
    claim: "Potential for message loss or duplicate consumption; idempotency handling needed",
    experiment: "every saga message delivered twice, under a mix of good, declined and out-of-stock orders: lost orders, double reservations, double charges",
    method: "The shop runs with a broker that hands every message to its consumer twice (the at-least-once delivery a broker may do after a redelivery). Orders of the same mix as the compensation experiment are placed; once settled, the services' databases are audited for lost orders, second authorizations or captures, stock taken twice or left reserved, and money that does not add up.",
    rule: "Mitigated when, with every message delivered twice, no order is lost or pending, none has two payments or a second charge, and money and stock are exact (the consumers' inboxes absorb the duplicates); holds when any duplicate effect or loss shows; inconclusive when no order was placed.",
    shops: &[ShopSpec::DUPLICATES],
};

pub fn steps(_: &Scale) -> u64 {
    3
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let shop = ctx.shop(ShopSpec::DUPLICATES)?;
    let (_, refused, a) = run_mix(ctx, shop, 0).await?;
    let mut f = Figures::default();
    f.push("orders.refused", refused as f64, "orders");
    audit_figures(&a, &mut f);
    Ok(Measured {
        headline: format!(
            "each message twice, {} orders: {} lost, {} double authorizations, {} double charges, stock off by {}",
            a.placed,
            a.lost + a.pending,
            a.double_authorizations,
            a.double_charges,
            a.stock_difference
        ),
        verdict: verdict(&a),
        figures: f,
        charts: Vec::new(),
    })
}

/// The rule of [`META`], applied to the audit.
pub fn verdict(a: &Audit) -> Verdict {
    let because = format!(
        "with every message delivered twice, of {} orders {} were lost and {} left pending; {} had two payments, {} were charged twice; money off by {}, stock off by {} units, {} units left reserved, {} unsettled, {} with the wrong outcome",
        a.placed,
        a.lost,
        a.pending,
        a.double_authorizations,
        a.double_charges,
        a.money_difference_minor,
        a.stock_difference,
        a.reserved_left,
        a.unsettled,
        a.wrong_outcome
    );
    if a.placed == 0 {
        return Verdict::new(Outcome::Inconclusive, because);
    }
    if a.exact() {
        Verdict::new(Outcome::Mitigated, because)
    } else {
        Verdict::new(Outcome::Holds, because)
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
            ..Default::default()
        };
        assert_eq!(verdict(&exact).outcome, Outcome::Mitigated);
        let doubled = Audit {
            double_charges: 1,
            ..exact.clone()
        };
        assert_eq!(verdict(&doubled).outcome, Outcome::Holds);
        assert_eq!(verdict(&Audit::default()).outcome, Outcome::Inconclusive);
    }
}
