//! Shared data: with the user center's service stopped, which of the shop's operations keep
//! working — when the orders service reads accounts through the users service's interface,
//! and when it reads them from the user center's shared read-only view?

use std::time::Duration;

use serde_json::json;
use shopmesh_shop::ServiceName;
use tokio::time::Instant;

use super::saga::{GOOD_CARD, stocked};
use super::{Ctx, Measured, Meta};
use crate::report::{Figures, Group, Outcome, Verdict};
use crate::shop::{LabShop, PASSWORD, ShopSpec};
use crate::{LabError, Scale};

pub const META: Meta = Meta {
    id: "shared-data.coupling",
    group: Group::SharedData,
    claim: "Reduces service autonomy, increasing coupling (to the user center at run time)",
    experiment: "the users service stopped: which operations keep working when orders read accounts through its interface, and when they read the shared view",
    method: "Two shops, identical but for how the orders service reads accounts (the users service's interface, cached and invalidated by events, or the user center's published view through a read-only connection). In each, two customers sign in, one of them orders once (so the orders service has read its account); then the users service alone is stopped (its server and its relay; its database stays) and each operation is tried a few times through the gateway: a product page, signing in, registering, reading one's profile, an order by each customer, listing one's orders. Then the service is started again on its port and every operation is tried once more.",
    rule: "Looks at the operations of another service that reads accounts (the orders service: an order by each customer, listing orders) that failed on any try while the users service was stopped, by each way; the user center's own operations (signing in, registering, the profile) are shown but fail by both ways by design. Holds when some failed by both ways (every reader lost autonomy); partly when by one way only; refuted when by neither; inconclusive when the product page (which needs no account) failed, or any operation failed after the restart.",
    shops: &[ShopSpec::MAIN, ShopSpec::SHARED_VIEW],
};

/// Tries per operation while the service is stopped.
const TRIES: usize = 3;
/// Longest the shop may take to serve sign-ins again after the restart.
const RECOVERY_LIMIT: Duration = Duration::from_secs(20);
/// Well-stocked products skipped (other experiments order them).
const SKIP_PRODUCTS: usize = 95;

/// The operations of the orders service, a reader of accounts (the others are the user
/// center's own, or need no account).
pub const DEPENDENT: [&str; 3] = ["order_known_customer", "order_new_customer", "list_orders"];

/// The operations tried, in the table's order.
pub const OPERATIONS: [&str; 7] = [
    "product_page",
    "sign_in",
    "register",
    "profile",
    "order_known_customer",
    "order_new_customer",
    "list_orders",
];

pub fn steps(_: &Scale) -> u64 {
    4
}

/// One way's results: per operation, the share of tries that worked while the users
/// service was stopped and after it was started again.
#[derive(Debug, Clone, PartialEq)]
pub struct Way {
    pub during: Vec<(&'static str, f64)>,
    pub after: Vec<(&'static str, f64)>,
    /// From the restart until a sign-in through the gateway worked.
    pub recovered_ms: Option<f64>,
}

impl Way {
    /// Operations that worked on every try while the service was stopped.
    pub fn working(&self) -> Vec<&'static str> {
        self.during
            .iter()
            .filter(|(_, s)| *s >= 1.0)
            .map(|(op, _)| *op)
            .collect()
    }

    /// The orders service's operations that failed on some try while it was stopped.
    pub fn coupled(&self) -> Vec<&'static str> {
        self.during
            .iter()
            .filter(|(op, s)| DEPENDENT.contains(op) && *s < 1.0)
            .map(|(op, _)| *op)
            .collect()
    }
}

struct Session {
    email: String,
    token: String,
}

async fn session(shop: &LabShop) -> Result<Session, LabError> {
    let (email, _) = shop.register().await?;
    let token = shop
        .sign_in(&email)
        .await?
        .ok_or_else(|| LabError::Shop("sign-in refused before the stop".into()))?;
    Ok(Session { email, token })
}

/// Tries `op` once: did it answer as it does when all is well?
async fn try_op(shop: &LabShop, op: &str, known: &Session, new: &Session, product: &str) -> bool {
    let order = |token: &str| {
        shop.http
            .post(shop.url("/api/orders"))
            .bearer_auth(token)
            .json(&json!({"items": [{"product_id": product, "quantity": 1}], "card": GOOD_CARD}))
    };
    let req = match op {
        "product_page" => shop.http.get(shop.url(&format!("/api/products/{product}"))),
        "sign_in" => shop
            .http
            .post(shop.url("/api/auth/token"))
            .json(&json!({"email": known.email, "password": PASSWORD})),
        "register" => shop.http.post(shop.url("/api/users")).json(&json!({
            "email": format!("{}@lab.example", uuid::Uuid::new_v4().simple()),
            "password": PASSWORD, "name": "Lab"})),
        "profile" => shop
            .http
            .get(shop.url("/api/users/me"))
            .bearer_auth(&known.token),
        "order_known_customer" => order(&known.token),
        "order_new_customer" => order(&new.token),
        _ => shop
            .http
            .get(shop.url("/api/orders"))
            .bearer_auth(&known.token),
    };
    let expected = match op {
        "register" => 201,
        "order_known_customer" | "order_new_customer" => 202,
        _ => 200,
    };
    match req.timeout(Duration::from_secs(10)).send().await {
        Ok(res) => res.status().as_u16() == expected,
        Err(_) => false,
    }
}

async fn tries(
    shop: &LabShop,
    n: usize,
    known: &Session,
    new: &Session,
    product: &str,
) -> Vec<(&'static str, f64)> {
    let mut out = Vec::new();
    for op in OPERATIONS {
        let mut ok = 0;
        for _ in 0..n {
            if try_op(shop, op, known, new, product).await {
                ok += 1;
            }
        }
        out.push((op, ok as f64 / n as f64));
    }
    out
}

async fn way(ctx: &Ctx<'_>, shop: &LabShop, label: &str) -> Result<Way, LabError> {
    let product = stocked(shop, SKIP_PRODUCTS, 1, 300)
        .pop()
        .ok_or_else(|| LabError::Shop("no well-stocked product was seeded".into()))?;
    ctx.say(format!("{label}: two customers"));
    let (known, new) = (session(shop).await?, session(shop).await?);
    // The orders service reads the known customer's account (and keeps its copy, when it
    // reads through the interface).
    if !try_op(shop, "order_known_customer", &known, &new, &product.id).await {
        return Err(LabError::Shop(
            "an order was refused before the stop".into(),
        ));
    }
    ctx.say(format!("{label}: users service stopped"));
    shop.system.stop_service(ServiceName::Users).await;
    let during = tries(shop, TRIES, &known, &new, &product.id).await;
    ctx.say(format!("{label}: users service started again"));
    shop.system.restart_service(ServiceName::Users).await?;
    let restarted = Instant::now();
    let mut recovered_ms = None;
    while restarted.elapsed() < RECOVERY_LIMIT {
        if shop.sign_in(&known.email).await?.is_some() {
            recovered_ms = Some(restarted.elapsed().as_secs_f64() * 1e3);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = tries(shop, 1, &known, &new, &product.id).await;
    ctx.step(format!("{label} done"));
    Ok(Way {
        during,
        after,
        recovered_ms,
    })
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let interface = way(ctx, ctx.shop(ShopSpec::MAIN)?, "interface").await?;
    ctx.step("shared view");
    let view = way(ctx, ctx.shop(ShopSpec::SHARED_VIEW)?, "shared view").await?;
    ctx.step("verdict");
    let mut f = Figures::default();
    for (k, w) in [("interface", &interface), ("shared_view", &view)] {
        for (op, share) in &w.during {
            f.push(format!("{k}.users_stopped.{op}"), *share, "share of tries");
        }
        for (op, share) in &w.after {
            f.push(format!("{k}.restarted.{op}"), *share, "share of tries");
        }
        f.push(
            format!("{k}.operations_working"),
            w.working().len() as f64,
            "operations",
        );
        if let Some(ms) = w.recovered_ms {
            f.push(format!("{k}.recovered_ms"), ms, "ms");
        }
    }
    f.push("operations", OPERATIONS.len() as f64, "operations");
    Ok(Measured {
        headline: format!(
            "users service stopped: {}/{} operations kept working via the interface, {}/{} via the shared view; orders failing: {} via the interface, {} via the view",
            interface.working().len(),
            OPERATIONS.len(),
            view.working().len(),
            OPERATIONS.len(),
            none_or(&interface.coupled()),
            none_or(&view.coupled()),
        ),
        verdict: verdict(&interface, &view),
        figures: f,
        charts: Vec::new(),
    })
}

/// The rule of [`META`], applied to both ways.
pub fn verdict(interface: &Way, view: &Way) -> Verdict {
    let (ci, cv) = (interface.coupled(), view.coupled());
    let because = format!(
        "with the users service stopped, {} of {} operations worked on every try through the interface and {} through the shared view; the orders service's that failed: {} through the interface, {} through the shared view",
        interface.working().len(),
        OPERATIONS.len(),
        view.working().len(),
        none_or(&ci),
        none_or(&cv),
    );
    let broken_after = |w: &Way| w.after.iter().any(|(_, s)| *s < 1.0);
    let page = |w: &Way| w.working().contains(&"product_page");
    if broken_after(interface) || broken_after(view) {
        return Verdict::new(
            Outcome::Inconclusive,
            format!("{because}; but an operation still failed after the restart"),
        );
    }
    if !page(interface) || !page(view) {
        return Verdict::new(
            Outcome::Inconclusive,
            format!("{because}; but the product page, which needs no account, failed"),
        );
    }
    match (ci.is_empty(), cv.is_empty()) {
        (false, false) => Verdict::new(Outcome::Holds, because),
        (true, true) => Verdict::new(Outcome::Refuted, because),
        _ => Verdict::new(Outcome::Partly, because),
    }
}

fn none_or(ops: &[&str]) -> String {
    if ops.is_empty() {
        "none".into()
    } else {
        ops.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn way(working: &[&str]) -> Way {
        Way {
            during: OPERATIONS
                .iter()
                .map(|op| (*op, if working.contains(op) { 1.0 } else { 0.0 }))
                .collect(),
            after: OPERATIONS.iter().map(|op| (*op, 1.0)).collect(),
            recovered_ms: Some(50.0),
        }
    }

    #[test]
    fn the_verdict_counts_the_orders_operations_that_failed() {
        let iface = way(&["product_page", "order_known_customer", "list_orders"]);
        let view = way(&[
            "product_page",
            "order_known_customer",
            "order_new_customer",
            "list_orders",
        ]);
        let v = verdict(&iface, &view);
        assert_eq!(v.outcome, Outcome::Partly);
        assert!(v.because.contains("order_new_customer"), "{}", v.because);
        assert_eq!(verdict(&iface, &iface).outcome, Outcome::Holds);
        assert_eq!(verdict(&view, &view).outcome, Outcome::Refuted);
        // The user center's own operations do not count.
        let all = way(&OPERATIONS);
        assert_eq!(verdict(&view, &all).outcome, Outcome::Refuted);
        // The page needs no account: when it fails, something else is down.
        let no_page = way(&["order_known_customer", "order_new_customer"]);
        assert_eq!(verdict(&iface, &no_page).outcome, Outcome::Inconclusive);
        let mut broken = view.clone();
        broken.after[1].1 = 0.0;
        assert_eq!(verdict(&iface, &broken).outcome, Outcome::Inconclusive);
    }
}
