use serde::{Deserialize, Serialize};
use shopmesh_platform::openapi::one_of;
use shopmesh_platform::validate::luhn_valid;
use utoipa::openapi::schema::Object;
use utoipa::{IntoParams, ToSchema};

use crate::error::PaymentError;

/// Largest amount of one payment, in minor units (1_000_000_000_00: a billion major units).
pub const MAX_AMOUNT_MINOR: i64 = 100_000_000_000;

/// Where a payment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Funds held; can be captured or voided.
    Authorized,
    /// The card was refused (see `decline_code`); final.
    Declined,
    /// Funds taken; can be refunded, in part (stays captured) or in full.
    Captured,
    /// Authorization released; final.
    Voided,
    /// Fully refunded; final.
    Refunded,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Authorized,
        Status::Declined,
        Status::Captured,
        Status::Voided,
        Status::Refunded,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Authorized => "AUTHORIZED",
            Status::Declined => "DECLINED",
            Status::Captured => "CAPTURED",
            Status::Voided => "VOIDED",
            Status::Refunded => "REFUNDED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Payment {
    pub id: String,
    /// 1 to 200 characters.
    #[schema(min_length = 1, max_length = 200)]
    pub order_id: String,
    /// Amount authorized, in minor units of `currency` (an order's total, for the saga's).
    #[schema(minimum = 0)]
    pub amount_minor: i64,
    /// ISO 4217 code.
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
    pub status: Status,
    /// Why the card was declined (only when `DECLINED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = decline_code_schema, required = false)]
    pub decline_code: Option<String>,
    /// `visa`, `mastercard`, `amex` or `unknown`.
    #[schema(schema_with = card_brand_schema)]
    pub card_brand: String,
    #[schema(pattern = "^[0-9]{4}$")]
    pub card_last4: String,
    #[schema(minimum = 0)]
    pub captured_minor: i64,
    #[schema(minimum = 0)]
    pub refunded_minor: i64,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// What [`card_brand`] answers.
pub const CARD_BRANDS: [&str; 4] = ["visa", "mastercard", "amex", "unknown"];
/// What [`card_outcome`] declines with.
pub const DECLINE_CODES: [&str; 3] = ["card_declined", "insufficient_funds", "expired_card"];

fn card_brand_schema() -> Object {
    one_of(&CARD_BRANDS)
}

fn decline_code_schema() -> Object {
    one_of(&DECLINE_CODES)
}

/// A card to vault: the answer is a payment method id to pay with later (orders use it so
/// that the number never travels in a message).
#[derive(Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPaymentMethod {
    /// Card number, 12 to 19 digits passing the Luhn check (spaces allowed).
    #[schema(pattern = "^[0-9 ]+$", example = "4242424242424242")]
    pub card: String,
}

/// Never prints the card number.
impl std::fmt::Debug for NewPaymentMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewPaymentMethod")
            .field("card", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PaymentMethod {
    /// `pm_…`, usable by its owner only.
    #[schema(pattern = "^pm_")]
    pub id: String,
    #[schema(schema_with = card_brand_schema)]
    pub card_brand: String,
    #[schema(pattern = "^[0-9]{4}$")]
    pub card_last4: String,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub created_at: String,
}

/// The card network's standing answer for a card, stored in place of the number.
pub fn network_verdict(number: &str) -> String {
    match card_outcome(number) {
        CardOutcome::Authorized => "authorize".into(),
        CardOutcome::Declined(code) => format!("decline:{code}"),
    }
}

#[derive(Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPayment {
    /// 1 to 200 characters once trimmed.
    #[schema(min_length = 1, max_length = 200)]
    pub order_id: String,
    /// In minor units, 1 to 100000000000.
    #[schema(minimum = 1, maximum = 100_000_000_000_i64)]
    pub amount_minor: i64,
    /// Three uppercase letters (ISO 4217).
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
    /// Card number, 12 to 19 digits passing the Luhn check (spaces allowed). Only its brand
    /// and last 4 digits are kept.
    #[schema(pattern = "^[0-9 ]+$", example = "4242424242424242")]
    pub card: String,
}

/// Never prints the card number.
impl std::fmt::Debug for NewPayment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewPayment")
            .field("order_id", &self.order_id)
            .field("amount_minor", &self.amount_minor)
            .field("currency", &self.currency)
            .field("card", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    /// In minor units, 1 to the amount not yet refunded (the default).
    #[schema(minimum = 1, maximum = 100_000_000_000_i64)]
    pub amount_minor: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only the payments of this order (at most 200 bytes once trimmed).
    #[param(max_length = 200)]
    pub order_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PaymentList {
    /// Newest first, at most 100.
    #[schema(max_items = 100)]
    pub items: Vec<Payment>,
}

/// An operation on an existing payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Capture,
    Void,
    /// Refund this amount, or everything not yet refunded.
    Refund(Option<i64>),
}

/// The mutable state of a payment after an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub status: Status,
    pub captured_minor: i64,
    pub refunded_minor: i64,
}

impl Payment {
    /// Captured and not yet refunded.
    pub fn refundable_minor(&self) -> i64 {
        self.captured_minor - self.refunded_minor
    }

    /// What `op` turns this payment into, if the state machine allows it.
    pub fn plan(&self, op: Operation) -> Result<Change, PaymentError> {
        let (expected, to) = match op {
            Operation::Capture => (Status::Authorized, Status::Captured),
            Operation::Void => (Status::Authorized, Status::Voided),
            Operation::Refund(_) => (Status::Captured, Status::Refunded),
        };
        if self.status != expected {
            return Err(PaymentError::InvalidTransition {
                from: self.status,
                to,
            });
        }
        let change = match op {
            Operation::Capture => Change {
                status: Status::Captured,
                captured_minor: self.amount_minor,
                refunded_minor: 0,
            },
            Operation::Void => Change {
                status: Status::Voided,
                captured_minor: self.captured_minor,
                refunded_minor: self.refunded_minor,
            },
            Operation::Refund(amount) => {
                let remaining = self.refundable_minor();
                let amount = amount.unwrap_or(remaining);
                if !(1..=remaining).contains(&amount) {
                    return Err(PaymentError::InvalidRefundAmount { remaining });
                }
                let refunded_minor = self.refunded_minor + amount;
                Change {
                    status: if refunded_minor == self.captured_minor {
                        Status::Refunded
                    } else {
                        Status::Captured
                    },
                    captured_minor: self.captured_minor,
                    refunded_minor,
                }
            }
        };
        Ok(change)
    }
}

/// The card number with spaces removed, if it is 12 to 19 digits passing the Luhn check.
pub fn normalize_card(raw: &str) -> Option<String> {
    let digits: String = raw.chars().filter(|c| *c != ' ').collect();
    luhn_valid(&digits).then_some(digits)
}

/// What the (simulated) issuer answers for a card number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardOutcome {
    Authorized,
    /// Declined with this code.
    Declined(&'static str),
}

/// Test cards by the usual convention; every other valid number is authorized.
pub fn card_outcome(number: &str) -> CardOutcome {
    match number {
        "4000000000000002" => CardOutcome::Declined("card_declined"),
        "4000000000009995" => CardOutcome::Declined("insufficient_funds"),
        "4000000000000069" => CardOutcome::Declined("expired_card"),
        _ => CardOutcome::Authorized,
    }
}

/// The card network, from the number's leading digits.
pub fn card_brand(number: &str) -> &'static str {
    let prefix = |n: usize| {
        number
            .get(..n)
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u32>().ok())
    };
    if number.starts_with('4') {
        "visa"
    } else if matches!(prefix(2), Some(51..=55)) || matches!(prefix(4), Some(2221..=2720)) {
        "mastercard"
    } else if matches!(prefix(2), Some(34 | 37)) {
        "amex"
    } else {
        "unknown"
    }
}

/// The last four digits, the only part of a card number that is kept.
pub fn card_last4(number: &str) -> &str {
    number
        .get(number.len().saturating_sub(4)..)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes() {
        assert_eq!(
            card_outcome("4000000000000002"),
            CardOutcome::Declined("card_declined")
        );
        assert_eq!(
            card_outcome("4000000000009995"),
            CardOutcome::Declined("insufficient_funds")
        );
        assert_eq!(
            card_outcome("4000000000000069"),
            CardOutcome::Declined("expired_card")
        );
        assert_eq!(card_outcome("4242424242424242"), CardOutcome::Authorized);
        assert_eq!(card_outcome("5555555555554444"), CardOutcome::Authorized);
    }

    #[test]
    fn test_cards_are_valid() {
        for n in [
            "4000000000000002",
            "4000000000009995",
            "4000000000000069",
            "4242424242424242",
        ] {
            assert_eq!(normalize_card(n).as_deref(), Some(n), "{n}");
        }
    }

    #[test]
    fn normalize() {
        assert_eq!(
            normalize_card(" 4242 4242 4242 4242 ").as_deref(),
            Some("4242424242424242")
        );
        assert_eq!(normalize_card("4242424242424241"), None);
        assert_eq!(normalize_card("4242-4242-4242-4242"), None);
        assert_eq!(normalize_card("42424242"), None);
        assert_eq!(normalize_card("42424242424242424242"), None);
        assert_eq!(normalize_card(""), None);
        assert_eq!(normalize_card("４２４２４２４２４２４２４２４２"), None);
    }

    #[test]
    fn brands() {
        assert_eq!(card_brand("4242424242424242"), "visa");
        assert_eq!(card_brand("5105105105105100"), "mastercard");
        assert_eq!(card_brand("5555555555554444"), "mastercard");
        assert_eq!(card_brand("2221000000000009"), "mastercard");
        assert_eq!(card_brand("2720990000000000"), "mastercard");
        assert_eq!(card_brand("2220990000000000"), "unknown");
        assert_eq!(card_brand("2721000000000000"), "unknown");
        assert_eq!(card_brand("5655555555554444"), "unknown");
        assert_eq!(card_brand("5000000000000000"), "unknown");
        assert_eq!(card_brand("378282246310005"), "amex");
        assert_eq!(card_brand("341111111111111"), "amex");
        assert_eq!(card_brand("6011111111111117"), "unknown");
        assert_eq!(card_brand(""), "unknown");
        assert_eq!(card_brand("5"), "unknown");
    }

    #[test]
    fn last4() {
        assert_eq!(card_last4("4242424242424242"), "4242");
        assert_eq!(card_last4("12"), "12");
    }

    #[test]
    fn statuses_round_trip() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_value(s).ok(),
                Some(serde_json::Value::from(s.as_str()))
            );
        }
        assert_eq!(Status::parse("authorized"), None);
    }

    fn payment(status: Status, amount: i64, captured: i64, refunded: i64) -> Payment {
        Payment {
            id: "p".into(),
            order_id: "o".into(),
            amount_minor: amount,
            currency: "EUR".into(),
            status,
            decline_code: None,
            card_brand: "visa".into(),
            card_last4: "4242".into(),
            captured_minor: captured,
            refunded_minor: refunded,
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    #[test]
    fn capture_and_void() {
        let p = payment(Status::Authorized, 500, 0, 0);
        assert_eq!(
            p.plan(Operation::Capture),
            Ok(Change {
                status: Status::Captured,
                captured_minor: 500,
                refunded_minor: 0
            })
        );
        assert_eq!(
            p.plan(Operation::Void).map(|c| c.status),
            Ok(Status::Voided)
        );
        let captured = payment(Status::Captured, 500, 500, 0);
        assert_eq!(
            captured.plan(Operation::Capture),
            Err(PaymentError::InvalidTransition {
                from: Status::Captured,
                to: Status::Captured
            })
        );
        assert!(captured.plan(Operation::Void).is_err());
        for s in [Status::Declined, Status::Voided, Status::Refunded] {
            let p = payment(s, 500, 0, 0);
            assert!(p.plan(Operation::Capture).is_err());
            assert!(p.plan(Operation::Void).is_err());
            assert!(p.plan(Operation::Refund(None)).is_err());
        }
    }

    #[test]
    fn refunds() {
        let authorized = payment(Status::Authorized, 500, 0, 0);
        assert_eq!(
            authorized.plan(Operation::Refund(None)),
            Err(PaymentError::InvalidTransition {
                from: Status::Authorized,
                to: Status::Refunded
            })
        );
        let p = payment(Status::Captured, 500, 500, 0);
        assert_eq!(
            p.plan(Operation::Refund(Some(200))),
            Ok(Change {
                status: Status::Captured,
                captured_minor: 500,
                refunded_minor: 200
            })
        );
        assert_eq!(
            p.plan(Operation::Refund(None)),
            Ok(Change {
                status: Status::Refunded,
                captured_minor: 500,
                refunded_minor: 500
            })
        );
        let partly = payment(Status::Captured, 500, 500, 200);
        assert_eq!(
            partly.plan(Operation::Refund(Some(300))).map(|c| c.status),
            Ok(Status::Refunded)
        );
        assert_eq!(
            partly
                .plan(Operation::Refund(None))
                .map(|c| c.refunded_minor),
            Ok(500)
        );
        for bad in [0, -1, 301, i64::MAX] {
            assert_eq!(
                partly.plan(Operation::Refund(Some(bad))),
                Err(PaymentError::InvalidRefundAmount { remaining: 300 }),
                "{bad}"
            );
        }
    }
}
