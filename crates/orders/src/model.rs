use serde::{Deserialize, Serialize};
use shopmesh_platform::openapi::one_of;
use utoipa::openapi::schema::Object;
use utoipa::{IntoParams, ToSchema};

/// The statuses of an order.
pub const STATUSES: [&str; 3] = ["PENDING", "CONFIRMED", "CANCELLED"];

fn status_schema() -> Object {
    one_of(&STATUSES)
}

/// An order to place. Pay with exactly one of `card` and `payment_method`.
#[derive(Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    /// 1 to 50 lines, each product once.
    #[schema(min_items = 1, max_items = 50)]
    pub items: Vec<NewItem>,
    /// Card number, 12 to 19 digits passing the Luhn check, spaces allowed (test cards:
    /// 4242424242424242 succeeds, 4000000000000002 is declined). Handed to the payments
    /// vault at once; orders keep only the last four digits and the saga's messages carry
    /// the vault's payment method id. Exactly one of `card` and `payment_method`.
    #[serde(default)]
    #[schema(pattern = "^[0-9 ]+$", example = "4242424242424242")]
    pub card: Option<String>,
    /// A payment method of the caller from `POST /api/payment-methods`: 1 to 512 visible
    /// ASCII characters.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 512, pattern = "^[\\x21-\\x7E]+$")]
    pub payment_method: Option<String>,
    /// Which of the caller's addresses (in the user center) to ship to, by position;
    /// default the first, when there is one.
    #[serde(default)]
    #[schema(minimum = 0)]
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
    /// 1 to 64 bytes.
    #[schema(min_length = 1, max_length = 64)]
    pub product_id: String,
    #[schema(minimum = 1, maximum = 1000)]
    pub quantity: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Order {
    pub id: String,
    pub user_id: String,
    /// PENDING, then CONFIRMED or CANCELLED.
    #[schema(schema_with = status_schema)]
    pub status: String,
    /// Why it was cancelled (when it was).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub reason: Option<String>,
    #[schema(min_items = 1, max_items = 50)]
    pub items: Vec<OrderItem>,
    /// The saga's timeline (on `GET /api/orders/{id}`; absent while empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(required = false, min_items = 1)]
    pub steps: Vec<Step>,
    #[schema(minimum = 0)]
    pub total_minor: i64,
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
    #[schema(pattern = "^[0-9]{4}$")]
    pub card_last4: String,
    /// Where it ships: the address as the user center had it when the order was placed
    /// (absent when the account had none).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object, required = false)]
    pub shipping_address: Option<serde_json::Value>,
    /// The W3C trace id the order and every message of its saga carry.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub trace_id: Option<String>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// One step of an order's saga.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Step {
    pub step: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub detail: Option<String>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub at: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OrderItem {
    #[schema(min_length = 1, max_length = 64)]
    pub product_id: String,
    #[schema(minimum = 1, maximum = 1000)]
    pub quantity: i64,
    #[schema(minimum = 0)]
    pub unit_price_minor: i64,
    #[schema(minimum = 0)]
    pub line_total_minor: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OrderPage {
    #[schema(max_items = 100)]
    pub items: Vec<Order>,
    #[schema(minimum = 1, maximum = 100)]
    pub limit: i64,
    #[schema(minimum = 0)]
    pub offset: i64,
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100, default = 20)]
    pub limit: Option<i64>,
    /// Orders to skip (default 0).
    #[param(minimum = 0, default = 0)]
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
