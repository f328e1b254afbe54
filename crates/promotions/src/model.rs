use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PromotionKind {
    /// `value` is a percentage, 1 to 100.
    PercentOff,
    /// `value` is an amount in minor units of `currency`.
    AmountOff,
}

impl PromotionKind {
    /// The value stored in the `kind` column (same as the JSON one).
    pub fn as_str(self) -> &'static str {
        match self {
            PromotionKind::PercentOff => "percent_off",
            PromotionKind::AmountOff => "amount_off",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "percent_off" => Some(PromotionKind::PercentOff),
            "amount_off" => Some(PromotionKind::AmountOff),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Promotion {
    pub id: String,
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    #[schema(max_length = 10_000)]
    pub description: String,
    pub kind: PromotionKind,
    /// Percentage (`percent_off`, 1 to 100) or minor units of `currency` (`amount_off`).
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64)]
    pub value: i64,
    /// Only for `amount_off`.
    #[schema(required = true, pattern = "^[A-Z]{3}$")]
    pub currency: Option<String>,
    /// Set when the promotion targets one product (exclusive with `category`).
    #[schema(
        required = true,
        min_length = 1,
        max_length = 64,
        pattern = "^[\\x21-\\x2B\\x2D-\\x7E]{1,64}$"
    )]
    pub product_id: Option<String>,
    /// Set when the promotion targets a category (exclusive with `product_id`).
    #[schema(required = true, min_length = 1, max_length = 100)]
    pub category: Option<String>,
    /// RFC 3339, inclusive.
    #[schema(format = DateTime)]
    pub starts_at: String,
    /// RFC 3339, exclusive.
    #[schema(format = DateTime)]
    pub ends_at: String,
    /// Whether the promotion is running now (`starts_at <= now < ends_at`).
    pub active: bool,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPromotion {
    /// 1 to 200 characters, not blank (trimmed).
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    #[serde(default)]
    #[schema(max_length = 10_000)]
    pub description: String,
    pub kind: PromotionKind,
    /// `percent_off`: 1 to 100; `amount_off`: 1 to 1000000000000 minor units.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64)]
    pub value: i64,
    /// Required for `amount_off`, absent (or null) for `percent_off`.
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: Option<String>,
    /// Exactly one of `product_id` and `category`.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[\\x21-\\x2B\\x2D-\\x7E]{1,64}$"
    )]
    pub product_id: Option<String>,
    /// 1 to 100 characters, not blank (trimmed).
    #[schema(min_length = 1, max_length = 100)]
    pub category: Option<String>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub starts_at: String,
    /// RFC 3339, after `starts_at`.
    #[schema(format = DateTime)]
    pub ends_at: String,
}

/// A promotion as stored, instants in Unix milliseconds: what [`crate::seed`] inserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromotionSeed {
    pub id: String,
    pub name: String,
    pub description: String,
    pub kind: PromotionKind,
    pub value: i64,
    pub currency: Option<String>,
    pub product_id: Option<String>,
    pub category: Option<String>,
    pub starts_at: i64,
    pub ends_at: i64,
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Promotions of this product (at most 64 bytes). With `category`, promotions of either.
    #[param(max_length = 64)]
    pub product_id: Option<String>,
    /// Promotions of this category (at most 100 bytes). With `product_id`, promotions of
    /// either.
    #[param(max_length = 100)]
    pub category: Option<String>,
    /// `true` (default): only promotions running now; `false`: all of them.
    #[param(default = true)]
    pub active: Option<bool>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100, default = 20)]
    pub limit: Option<i64>,
    /// Items to skip, 0 to 1000000 (default 0).
    #[param(minimum = 0, maximum = 1_000_000, default = 0)]
    pub offset: Option<i64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PromotionPage {
    pub items: Vec<Promotion>,
    #[schema(minimum = 0)]
    pub total: i64,
    #[schema(minimum = 1, maximum = 100)]
    pub limit: i64,
    #[schema(minimum = 0, maximum = 1_000_000)]
    pub offset: i64,
}

/// A promotion runs from `starts_at` (inclusive) to `ends_at` (exclusive), all in millis.
pub fn is_active(starts_at: i64, ends_at: i64, now: i64) -> bool {
    starts_at <= now && now < ends_at
}

/// Product ids are opaque (UUIDs in practice): 1 to 64 visible ASCII characters, no commas.
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
    fn active_window_is_half_open() {
        assert!(!is_active(100, 200, 99));
        assert!(is_active(100, 200, 100));
        assert!(is_active(100, 200, 199));
        assert!(!is_active(100, 200, 200));
        assert!(!is_active(100, 100, 100));
    }

    #[test]
    fn kind_round_trips() {
        for k in [PromotionKind::PercentOff, PromotionKind::AmountOff] {
            assert_eq!(PromotionKind::parse(k.as_str()), Some(k));
            assert_eq!(
                serde_json::to_value(k).ok(),
                Some(serde_json::Value::from(k.as_str()))
            );
        }
        assert_eq!(PromotionKind::parse("bogus"), None);
    }

    #[test]
    fn currencies() {
        assert!(is_currency("USD"));
        assert!(!is_currency("usd"));
        assert!(!is_currency("US"));
    }
}
