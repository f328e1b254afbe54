use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StockLevel {
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[\\x21-\\x2B\\x2D-\\x7E]{1,64}$"
    )]
    pub product_id: String,
    /// Units physically in stock.
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub on_hand: i64,
    /// Units held for orders not yet fulfilled.
    #[schema(minimum = 0)]
    pub reserved: i64,
    /// `on_hand - reserved`: what can still be sold.
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub available: i64,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetStock {
    /// 0 to 1000000000, and not below the units reserved.
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub on_hand: i64,
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct BatchQuery {
    /// Comma-separated product ids, at most 100 (empty items are skipped).
    pub ids: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StockList {
    /// In request order; unknown ids are left out.
    pub items: Vec<StockLevel>,
}

/// Product ids are opaque (UUIDs in practice): 1 to 64 visible ASCII characters, no commas
/// (they would not survive a `?ids=` list).
pub fn is_product_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_graphic() && b != b',')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_ids() {
        assert!(is_product_id("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"));
        assert!(is_product_id(&"a".repeat(64)));
        assert!(!is_product_id(&"a".repeat(65)));
        assert!(!is_product_id(""));
        assert!(!is_product_id("a,b"));
        assert!(!is_product_id("a b"));
    }
}
