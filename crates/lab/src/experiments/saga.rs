//! The order saga as the messaging experiments drive and audit it: customers, orders of
//! known kinds (good, declined card, out of stock), waiting until every order and its
//! participants' effects are settled, and the audit of money and stock read from the
//! services' own databases.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use shopmesh_platform::db::{Db, placeholders};
use shopmesh_shop::ServiceName;
use sqlx::Row;
use tokio::time::Instant;

use crate::LabError;
use crate::shop::{LabShop, Product};

/// The test card the simulated network authorizes, and one it declines.
pub const GOOD_CARD: &str = "4242424242424242";
pub const DECLINED_CARD: &str = "4000000000000002";

/// Rows fetched per `IN (…)` query.
const IN_CHUNK: usize = 400;

pub struct Customer {
    pub id: String,
    pub token: String,
}

/// Registers `n` customers (a few at a time: registration hashes a password).
pub async fn customers(shop: &LabShop, n: usize) -> Result<Vec<Customer>, LabError> {
    futures::stream::iter(0..n)
        .map(|_| async {
            let (id, token) = shop.user().await?;
            Ok(Customer { id, token })
        })
        .buffer_unordered(4)
        .collect::<Vec<Result<Customer, LabError>>>()
        .await
        .into_iter()
        .collect()
}

/// What an order is meant to meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderKind {
    /// In stock, a good card: confirmed.
    Good,
    /// A declined card: cancelled, its stock released.
    Declined,
    /// Out of stock: cancelled, its payment voided.
    OutOfStock,
}

impl OrderKind {
    /// Six good orders in ten, two declined, two out of stock.
    pub fn of_mix(i: usize) -> OrderKind {
        match i % 10 {
            0..=5 => OrderKind::Good,
            6 | 7 => OrderKind::Declined,
            _ => OrderKind::OutOfStock,
        }
    }

    pub fn expected_status(self) -> &'static str {
        match self {
            OrderKind::Good => "CONFIRMED",
            OrderKind::Declined | OrderKind::OutOfStock => "CANCELLED",
        }
    }
}

/// An order the lab placed.
#[derive(Debug, Clone)]
pub struct Placed {
    pub id: String,
    pub kind: OrderKind,
    pub product: String,
    pub quantity: i64,
}

/// Products with at least `min_on_hand` in stock, from the `skip`-th on, and every product
/// with none.
pub fn stocked(shop: &LabShop, skip: usize, n: usize, min_on_hand: i64) -> Vec<Product> {
    shop.products
        .iter()
        .filter(|p| p.on_hand >= min_on_hand)
        .skip(skip)
        .take(n)
        .cloned()
        .collect()
}

pub fn sold_out(shop: &LabShop) -> Vec<Product> {
    shop.products
        .iter()
        .filter(|p| p.on_hand == 0)
        .cloned()
        .collect()
}

/// Places one order through the gateway: its id once accepted (202).
pub async fn place(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    product: &str,
    quantity: i64,
    card: &str,
) -> Option<String> {
    let res = http
        .post(format!("{base}/api/orders"))
        .bearer_auth(token)
        .json(&json!({"items": [{"product_id": product, "quantity": quantity}], "card": card}))
        .send()
        .await
        .ok()?;
    if res.status() != 202 {
        return None;
    }
    let o: Value = res.json().await.ok()?;
    o["id"].as_str().map(str::to_owned)
}

/// `select … WHERE column IN (ids)`, in chunks; `map` reads each row.
async fn rows_in<T>(
    db: &Db,
    select: &str,
    ids: &[String],
    map: impl Fn(&sqlx::any::AnyRow) -> Result<T, sqlx::Error>,
) -> Result<Vec<T>, LabError> {
    let mut out = Vec::new();
    for chunk in ids.chunks(IN_CHUNK) {
        let sql = format!("{select} IN ({})", placeholders(1, chunk.len()));
        let mut q = sqlx::query(&sql);
        for id in chunk {
            q = q.bind(id.as_str());
        }
        for row in q.fetch_all(&db.pool).await? {
            out.push(map(&row)?);
        }
    }
    Ok(out)
}

/// Orders of these customers that are no longer pending, and all of them.
pub async fn settled_count(db: &Db, users: &[String]) -> Result<(usize, usize), LabError> {
    let rows = rows_in(db, "SELECT status FROM orders WHERE user_id", users, |r| {
        r.try_get::<String, _>(0)
    })
    .await?;
    Ok((rows.iter().filter(|s| *s != "PENDING").count(), rows.len()))
}

/// The databases of the services the saga touches.
pub struct SagaDbs {
    pub orders: Db,
    pub payments: Db,
    pub inventory: Db,
}

impl SagaDbs {
    pub async fn open(shop: &LabShop) -> Result<SagaDbs, LabError> {
        Ok(SagaDbs {
            orders: shop.db(ServiceName::Orders).await?,
            payments: shop.db(ServiceName::Payments).await?,
            inventory: shop.db(ServiceName::Inventory).await?,
        })
    }
}

/// (on hand, reserved) per product.
pub async fn stock(db: &Db, products: &[String]) -> Result<HashMap<String, (i64, i64)>, LabError> {
    let rows = rows_in(
        db,
        "SELECT product_id, on_hand, reserved FROM stock WHERE product_id",
        products,
        |r| Ok((r.try_get::<String, _>(0)?, (r.try_get(1)?, r.try_get(2)?))),
    )
    .await?;
    Ok(rows.into_iter().collect())
}

struct OrderRow {
    id: String,
    status: String,
    total_minor: i64,
    created_at: i64,
    updated_at: i64,
}

struct PaymentRow {
    order_id: String,
    status: String,
    amount_minor: i64,
    captured_minor: i64,
    updated_at: i64,
}

struct ReservationRow {
    order_id: String,
    status: String,
    updated_at: i64,
}

/// What the databases say about a set of placed orders.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Audit {
    pub placed: usize,
    /// Accepted orders the orders service does not have.
    pub lost: usize,
    pub pending: usize,
    pub confirmed: usize,
    pub cancelled: usize,
    /// Orders whose end differs from what their kind should meet.
    pub wrong_outcome: usize,
    /// Orders with more than one payment.
    pub double_authorizations: usize,
    /// Orders charged more than once or more than their total, or charged while cancelled.
    pub double_charges: usize,
    /// Money captured minus the totals of the confirmed orders (minor units).
    pub money_difference_minor: i64,
    /// Sum over products of |stock taken − quantities confirmed|.
    pub stock_difference: i64,
    /// Units still reserved that were not before.
    pub reserved_left: i64,
    /// Effects still under way: authorized payments, reservations still held.
    pub unsettled: usize,
    /// Compensations: reservations released, payments voided.
    pub released: usize,
    pub voided: usize,
    /// Per settled order: from placing to its last effect (ms).
    pub settle_ms: Vec<f64>,
}

impl Audit {
    /// Nothing lost, doubled or wrong, and every effect settled.
    pub fn exact(&self) -> bool {
        self.lost == 0
            && self.pending == 0
            && self.wrong_outcome == 0
            && self.double_authorizations == 0
            && self.double_charges == 0
            && self.money_difference_minor == 0
            && self.stock_difference == 0
            && self.reserved_left == 0
            && self.unsettled == 0
    }
}

/// Reads the orders, payments, reservations and stock of `placed`, against the stock
/// `before` they were placed.
pub async fn audit(
    dbs: &SagaDbs,
    placed: &[Placed],
    before: &HashMap<String, (i64, i64)>,
) -> Result<Audit, LabError> {
    let ids: Vec<String> = placed.iter().map(|p| p.id.clone()).collect();
    let orders = rows_in(
        &dbs.orders,
        "SELECT id, status, total_minor, created_at, updated_at FROM orders WHERE id",
        &ids,
        |r| {
            Ok(OrderRow {
                id: r.try_get(0)?,
                status: r.try_get(1)?,
                total_minor: r.try_get(2)?,
                created_at: r.try_get(3)?,
                updated_at: r.try_get(4)?,
            })
        },
    )
    .await?;
    let payments = rows_in(
        &dbs.payments,
        "SELECT order_id, status, amount_minor, captured_minor, updated_at FROM payments WHERE order_id",
        &ids,
        |r| {
            Ok(PaymentRow {
                order_id: r.try_get(0)?,
                status: r.try_get(1)?,
                amount_minor: r.try_get(2)?,
                captured_minor: r.try_get(3)?,
                updated_at: r.try_get(4)?,
            })
        },
    )
    .await?;
    let reservations = rows_in(
        &dbs.inventory,
        "SELECT order_id, status, updated_at FROM reservations WHERE order_id",
        &ids,
        |r| {
            Ok(ReservationRow {
                order_id: r.try_get(0)?,
                status: r.try_get(1)?,
                updated_at: r.try_get(2)?,
            })
        },
    )
    .await?;
    let products: Vec<String> = before.keys().cloned().collect();
    let after = stock(&dbs.inventory, &products).await?;

    let by_id: HashMap<&str, &OrderRow> = orders.iter().map(|o| (o.id.as_str(), o)).collect();
    let mut pays: HashMap<&str, Vec<&PaymentRow>> = HashMap::new();
    for p in &payments {
        pays.entry(p.order_id.as_str()).or_default().push(p);
    }
    let holds: HashMap<&str, &ReservationRow> = reservations
        .iter()
        .map(|r| (r.order_id.as_str(), r))
        .collect();

    let mut a = Audit {
        placed: placed.len(),
        ..Default::default()
    };
    let mut taken: HashMap<&str, i64> = HashMap::new();
    let mut captured_total = 0i64;
    let mut confirmed_total = 0i64;
    for p in placed {
        let Some(o) = by_id.get(p.id.as_str()) else {
            a.lost += 1;
            continue;
        };
        match o.status.as_str() {
            "PENDING" => a.pending += 1,
            "CONFIRMED" => {
                a.confirmed += 1;
                confirmed_total += o.total_minor;
                *taken.entry(p.product.as_str()).or_default() += p.quantity;
            }
            _ => a.cancelled += 1,
        }
        if o.status != "PENDING" && o.status != p.kind.expected_status() {
            a.wrong_outcome += 1;
        }
        let ps = pays.get(p.id.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        if ps.len() > 1 {
            a.double_authorizations += 1;
        }
        let captured: i64 = ps.iter().map(|x| x.captured_minor).sum();
        captured_total += captured;
        let charged_twice = ps.iter().filter(|x| x.captured_minor > 0).count() > 1
            || ps.iter().any(|x| x.captured_minor > x.amount_minor)
            || (o.status == "CANCELLED" && captured > 0);
        if charged_twice {
            a.double_charges += 1;
        }
        a.voided += ps.iter().filter(|x| x.status == "VOIDED").count();
        let hold = holds.get(p.id.as_str());
        if hold.is_some_and(|h| h.status == "RELEASED") {
            a.released += 1;
        }
        // Settled: a confirmed order captured and committed; a cancelled one with nothing
        // authorized or reserved left.
        let unsettled = ps.iter().any(|x| x.status == "AUTHORIZED")
            || hold.is_some_and(|h| h.status == "RESERVED")
            || (o.status == "CONFIRMED"
                && (!ps.iter().any(|x| x.status == "CAPTURED")
                    || hold.is_none_or(|h| h.status != "COMMITTED")));
        if unsettled || o.status == "PENDING" {
            a.unsettled += usize::from(unsettled);
            continue;
        }
        let last = ps
            .iter()
            .map(|x| x.updated_at)
            .chain(hold.map(|h| h.updated_at))
            .fold(o.updated_at, i64::max);
        a.settle_ms.push((last - o.created_at) as f64);
    }
    a.money_difference_minor = captured_total - confirmed_total;
    for (product, (on_hand_before, reserved_before)) in before {
        let (on_hand, reserved) = after.get(product).copied().unwrap_or((0, 0));
        let expected = taken.get(product.as_str()).copied().unwrap_or(0);
        a.stock_difference += ((on_hand_before - on_hand) - expected).abs();
        a.reserved_left += (reserved - reserved_before).max(0);
    }
    Ok(a)
}

/// Audits until every order and its effects are settled or `deadline` passes; returns the
/// last audit.
pub async fn settle(
    dbs: &SagaDbs,
    placed: &[Placed],
    before: &HashMap<String, (i64, i64)>,
    deadline: Duration,
) -> Result<Audit, LabError> {
    let until = Instant::now() + deadline;
    loop {
        let a = audit(dbs, placed, before).await?;
        if (a.pending == 0 && a.unsettled == 0) || Instant::now() >= until {
            return Ok(a);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Places `n` orders of the mix at `rate` per second over `customers`: good ones on
/// `products`, out-of-stock ones on `none_left`. Returns those accepted and how many were
/// not.
pub async fn place_mix(
    shop: &LabShop,
    customers: &[Customer],
    products: &[Product],
    none_left: &[Product],
    n: usize,
    rate: f64,
) -> (Vec<Placed>, usize) {
    if customers.is_empty() || products.is_empty() || none_left.is_empty() || rate <= 0.0 {
        return (Vec::new(), n);
    }
    let http = shop.http.clone();
    let phase = [crate::load::Phase {
        rate,
        duration: Duration::from_secs_f64(n as f64 / rate),
    }];
    let run = crate::load::open_loop(&phase, 256, |i| {
        let i = i as usize;
        let kind = OrderKind::of_mix(i);
        let c = &customers[i % customers.len()];
        let (product, card) = match kind {
            OrderKind::Good => (&products[i % products.len()], GOOD_CARD),
            OrderKind::Declined => (&products[i % products.len()], DECLINED_CARD),
            OrderKind::OutOfStock => (&none_left[i % none_left.len()], GOOD_CARD),
        };
        let quantity = 1 + (i % 3) as i64;
        let (http, base, token, product) = (
            http.clone(),
            shop.base.clone(),
            c.token.clone(),
            product.id.clone(),
        );
        async move {
            let id = place(&http, &base, &token, &product, quantity, card).await?;
            Some(Placed {
                id,
                kind,
                product,
                quantity,
            })
        }
    })
    .await;
    let failed = run.failures() + run.skipped;
    (
        run.calls.into_iter().filter_map(|c| c.outcome).collect(),
        failed,
    )
}

/// The audit's figures, under `prefix`.
/// How long a mix may take to settle before the audit gives up waiting.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

/// The three steps of a saga experiment on `shop`: customers registered (the first `skip`
/// well-stocked products left to others), the mix placed through the gateway at three times
/// the steady rate, every order settled; what was placed, how many were refused, the audit.
pub async fn run_mix(
    ctx: &super::Ctx<'_>,
    shop: &LabShop,
    skip: usize,
) -> Result<(Vec<Placed>, usize, Audit), LabError> {
    ctx.say("registering customers");
    let setup = Setup::new(shop, skip).await?;
    ctx.step("placing the mix");
    let (placed, refused) = place_mix(
        shop,
        &setup.customers,
        &setup.products,
        &setup.none_left,
        ctx.scale.saga_orders,
        ctx.scale.steady_rate * 3.0,
    )
    .await;
    ctx.step("waiting until settled");
    let audit = settle(&setup.dbs, &placed, &setup.before, SETTLE_LIMIT).await?;
    ctx.step("done");
    Ok((placed, refused, audit))
}

/// The figures an exact run of a failure experiment (`messaging.crash`,
/// `messaging.broker-outage`) has at zero: nothing lost, stuck, unanswered or unacknowledged,
/// no second authorization or charge, money and stock exact, no effect left under way.
pub const ZERO_WHEN_EXACT: [&str; 10] = [
    "orders.lost",
    "orders.pending",
    "orders.unanswered",
    "orders.unacknowledged",
    "payments.double_authorizations",
    "payments.double_charges",
    "money.difference_minor",
    "stock.difference",
    "stock.reserved_left",
    "effects.unsettled",
];

pub fn audit_figures(a: &Audit, f: &mut crate::report::Figures) {
    f.push("orders.placed", a.placed as f64, "orders");
    f.push("orders.confirmed", a.confirmed as f64, "orders");
    f.push("orders.cancelled", a.cancelled as f64, "orders");
    f.push("orders.pending", a.pending as f64, "orders");
    f.push("orders.lost", a.lost as f64, "orders");
    f.push("orders.wrong_outcome", a.wrong_outcome as f64, "orders");
    f.push(
        "payments.double_authorizations",
        a.double_authorizations as f64,
        "orders",
    );
    f.push("payments.double_charges", a.double_charges as f64, "orders");
    f.push(
        "money.difference_minor",
        a.money_difference_minor as f64,
        "minor units",
    );
    f.push("stock.difference", a.stock_difference as f64, "units");
    f.push("stock.reserved_left", a.reserved_left as f64, "units");
    f.push("effects.unsettled", a.unsettled as f64, "orders");
    f.push("compensations.released", a.released as f64, "reservations");
    f.push("compensations.voided", a.voided as f64, "payments");
    let settle: Vec<Duration> = a
        .settle_ms
        .iter()
        .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1e3))
        .collect();
    let s = crate::load::Summary::of(&settle);
    f.push("consistent_after.p50_ms", s.p50_ms, "ms");
    f.push("consistent_after.p99_ms", s.p99_ms, "ms");
    f.push("consistent_after.max_ms", s.max_ms, "ms");
}

/// Customers, products and the stock before: what a saga experiment starts from.
pub struct Setup {
    pub customers: Vec<Customer>,
    pub products: Vec<Product>,
    pub none_left: Vec<Product>,
    pub before: HashMap<String, (i64, i64)>,
    pub dbs: SagaDbs,
}

impl Setup {
    /// Its customers and products, for a [`super::burst::Burst`].
    pub fn mix(&self) -> super::burst::Mix<'_> {
        super::burst::Mix {
            customers: &self.customers,
            products: &self.products,
            none_left: &self.none_left,
        }
    }

    /// `skip` well-stocked products are left to other experiments.
    pub async fn new(shop: &LabShop, skip: usize) -> Result<Setup, LabError> {
        let customers = customers(shop, 6).await?;
        let products = stocked(shop, skip, 30, 300);
        let none_left = sold_out(shop);
        if products.is_empty() || none_left.is_empty() {
            return Err(LabError::Shop(
                "the seeded catalog has no well-stocked or no sold-out product".into(),
            ));
        }
        let dbs = SagaDbs::open(shop).await?;
        let ids: Vec<String> = products
            .iter()
            .chain(none_left.iter())
            .map(|p| p.id.clone())
            .collect();
        let before = stock(&dbs.inventory, &ids).await?;
        Ok(Setup {
            customers,
            products,
            none_left,
            before,
            dbs,
        })
    }
}
