use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Price {
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[\\x21-\\x2B\\x2D-\\x7E]{1,64}$"
    )]
    pub product_id: String,
    /// Amount in the currency's minor unit (cents for USD).
    #[schema(minimum = 0, maximum = 1_000_000_000_000_i64)]
    pub amount_minor: i64,
    /// ISO 4217 code, e.g. `EUR`.
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub updated_at: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPrice {
    /// 0 to 1000000000000.
    #[schema(minimum = 0, maximum = 1_000_000_000_000_i64)]
    pub amount_minor: i64,
    /// Three uppercase ASCII letters.
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct BatchQuery {
    /// Comma-separated product ids, at most 100.
    pub ids: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PriceList {
    /// In request order; unknown ids are left out.
    pub items: Vec<Price>,
}

/// Product ids are opaque (UUIDs in practice): 1 to 64 visible ASCII characters, no commas
/// (they would not survive a `?ids=` list).
pub fn is_product_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_graphic() && b != b',')
}

/// An ISO 4217-shaped currency code: exactly three uppercase ASCII letters.
pub fn is_currency(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_ids() {
        assert!(is_product_id("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"));
        assert!(!is_product_id(&"a".repeat(65)));
        assert!(!is_product_id(""));
        assert!(!is_product_id("a,b"));
    }

    #[test]
    fn currencies() {
        assert!(is_currency("EUR"));
        assert!(!is_currency("eur"));
        assert!(!is_currency("EURO"));
        assert!(!is_currency("E1R"));
        assert!(!is_currency("ÉUR"));
    }
}
