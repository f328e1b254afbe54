//! Domain errors of the payments service, and how clients see them.

use axum::http::StatusCode;
use shopmesh_platform::Problem;
use shopmesh_platform::problem::FieldError;

use crate::model::Status;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// No such payment, or it belongs to someone else (indistinguishable on purpose).
    #[error("no payment with id `{0}`")]
    NotFound(String),
    /// The state machine forbids the operation in the payment's current status.
    #[error("the payment is {from} and cannot become {to}")]
    InvalidTransition { from: Status, to: Status },
    /// A refund amount outside `1..=remaining`.
    #[error("must be between 1 and {remaining} (the amount not yet refunded)")]
    InvalidRefundAmount { remaining: i64 },
    /// The payment kept changing under us; the client may retry.
    #[error("the payment is being changed concurrently; retry")]
    Contended,
}

impl From<PaymentError> for Problem {
    fn from(e: PaymentError) -> Self {
        match &e {
            PaymentError::NotFound(_) => Problem::not_found(e.to_string()),
            PaymentError::InvalidTransition { from, to } => Problem::typed(
                StatusCode::CONFLICT,
                "invalid-transition",
                "Invalid payment transition",
            )
            .detail(e.to_string())
            .with("current_status", from.as_str())
            .with("target_status", to.as_str()),
            PaymentError::InvalidRefundAmount { .. } => {
                Problem::validation(vec![FieldError::new("amount_minor", e.to_string())])
            }
            PaymentError::Contended => Problem::conflict(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems() {
        let p = Problem::from(PaymentError::NotFound("x".into()));
        assert_eq!(p.status, StatusCode::NOT_FOUND);

        let p = Problem::from(PaymentError::InvalidTransition {
            from: Status::Captured,
            to: Status::Voided,
        });
        assert_eq!(p.status, StatusCode::CONFLICT);
        assert_eq!(p.extensions["current_status"], "CAPTURED");
        assert!(p.detail.as_deref().is_some_and(|d| d.contains("CAPTURED")));

        let p = Problem::from(PaymentError::InvalidRefundAmount { remaining: 5 });
        assert_eq!(p.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(p.extensions["errors"][0]["field"], "amount_minor");
    }
}
