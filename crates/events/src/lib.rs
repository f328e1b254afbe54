//! The order saga's contracts. Every event's CloudEvents `subject` is the order id, so all
//! messages about one order are handled in order by each consumer.
//!
//! ```text
//! orders ──OrderPlaced──▶ inventory (reserve)      ──StockReserved | StockRejected──▶ orders
//!        └─────────────▶ payments  (authorize)    ──PaymentAuthorized | PaymentDeclined──▶ orders
//! orders ──OrderConfirmed──▶ inventory (commit), payments (capture)
//! orders ──OrderCancelled──▶ inventory (release), payments (void)      [compensations]
//! ```

use serde::{Deserialize, Serialize};
use shopmesh_messaging::Event;

pub const TOPIC_ORDERS: &str = "orders";
pub const TOPIC_INVENTORY: &str = "inventory";
pub const TOPIC_PAYMENTS: &str = "payments";

pub const CONSUMER_INVENTORY: &str = "inventory";
pub const CONSUMER_PAYMENTS: &str = "payments";
pub const CONSUMER_ORDERS: &str = "orders-saga";
/// Account changes published by the user center.
pub const TOPIC_USERS: &str = "users";
/// The orders service's user directory, invalidated by account changes.
pub const CONSUMER_ORDERS_USERS: &str = "orders-users";

/// Every subscription of the shop: declared up front so that no publish finds a topic
/// without its subscribers (like declaring queues and bindings before traffic).
pub const SUBSCRIPTIONS: [(&str, &[&str]); 4] = [
    (CONSUMER_INVENTORY, &[TOPIC_ORDERS]),
    (CONSUMER_PAYMENTS, &[TOPIC_ORDERS]),
    (CONSUMER_ORDERS, &[TOPIC_INVENTORY, TOPIC_PAYMENTS]),
    (CONSUMER_ORDERS_USERS, &[TOPIC_USERS]),
];

/// An account changed (profile, role or status). Its `subject` is the user id, so the
/// changes of one account arrive in order. Readers that cache accounts drop their copy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserUpdated {
    pub user_id: String,
    /// The account's version after the change.
    pub version: i64,
    /// `active` or `disabled`.
    pub status: String,
}
impl Event for UserUpdated {
    const TYPE: &'static str = "shop.user.updated";
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub product_id: String,
    pub quantity: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: String,
    pub user_id: String,
    pub items: Vec<Line>,
    pub amount_minor: i64,
    pub currency: String,
    /// The payment method (a card vaulted by payments) to authorize; card numbers never
    /// travel in messages.
    pub payment_method: String,
}
impl Event for OrderPlaced {
    const TYPE: &'static str = "shop.order.placed";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderConfirmed {
    pub order_id: String,
}
impl Event for OrderConfirmed {
    const TYPE: &'static str = "shop.order.confirmed";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: String,
    /// `out_of_stock`, `payment_declined` or `timeout`.
    pub reason: String,
}
impl Event for OrderCancelled {
    const TYPE: &'static str = "shop.order.cancelled";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StockReserved {
    pub order_id: String,
}
impl Event for StockReserved {
    const TYPE: &'static str = "shop.stock.reserved";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StockRejected {
    pub order_id: String,
    pub reason: String,
}
impl Event for StockRejected {
    const TYPE: &'static str = "shop.stock.rejected";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentAuthorized {
    pub order_id: String,
    pub payment_id: String,
}
impl Event for PaymentAuthorized {
    const TYPE: &'static str = "shop.payment.authorized";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentDeclined {
    pub order_id: String,
    pub reason: String,
}
impl Event for PaymentDeclined {
    const TYPE: &'static str = "shop.payment.declined";
}
