use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// An order to place. Pay with exactly one of `card` and `payment_method`.
#[derive(Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    pub items: Vec<NewItem>,
    /// Card number (test cards: 4242424242424242 succeeds, 4000000000000002 is declined).
    /// Handed to the payments vault at once; orders keep only the last four digits and the
    /// saga's messages carry the vault's payment method id.
    #[serde(default)]
    pub card: Option<String>,
    /// A payment method of the caller from `POST /api/payment-methods`.
    #[serde(default)]
    pub payment_method: Option<String>,
    /// Which of the caller's addresses (in the user center) to ship to, by position;
    /// default the first, when there is one.
    #[serde(default)]
    pub ship_to: Option<usize>,
}

/// Never prints the card number.
impl std::fmt::Debug for NewOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewOrder")
            .field("items", &self.items)
            .field("card", &self.card.as_ref().map(|_| "<redacted>"))
            .field("payment_method", &self.payment_method)
            .field("ship_to", &self.ship_to)
            .finish()
    }
}

/// What the payments vault answers (`POST /api/payment-methods`).
#[derive(Debug, Clone, Deserialize)]
pub struct VaultedCard {
    pub id: String,
    pub card_last4: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewItem {
    pub product_id: String,
    pub quantity: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Order {
    pub id: String,
    pub user_id: String,
    /// PENDING, CONFIRMED or CANCELLED.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub items: Vec<OrderItem>,
    /// The saga's timeline (on `GET /api/orders/{id}`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<Step>,
    pub total_minor: i64,
    pub currency: String,
    pub card_last4: String,
    /// Where it ships: the address as the user center had it when the order was placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub shipping_address: Option<serde_json::Value>,
    /// The W3C trace id the order and every message of its saga carry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// One step of an order's saga.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Step {
    pub step: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub at: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OrderItem {
    pub product_id: String,
    pub quantity: i64,
    pub unit_price_minor: i64,
    pub line_total_minor: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OrderPage {
    pub items: Vec<Order>,
    pub limit: i64,
    pub offset: i64,
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// 1 to 100, default 20.
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

/// A price as the pricing service returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct Price {
    pub product_id: String,
    pub amount_minor: i64,
    pub currency: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PriceList {
    pub items: Vec<Price>,
}
