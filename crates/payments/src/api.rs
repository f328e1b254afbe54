use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use shopmesh_platform::Problem;
use shopmesh_platform::extract::{Json, Path, Query};
use shopmesh_platform::identity::Caller;
use shopmesh_platform::openapi::Conventions;
use shopmesh_platform::validate::Errors;
use utoipa::OpenApi;

use crate::State;
use crate::error::PaymentError;
use crate::model::{
    CardOutcome, ListQuery, MAX_AMOUNT_MINOR, NewPayment, NewPaymentMethod, Operation, Payment,
    PaymentList, PaymentMethod, RefundRequest, Status, card_brand, card_last4, card_outcome,
    normalize_card,
};
use crate::store;

/// Header making `POST /api/payments` safe to retry.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Most payments one list answers.
const LIST_LIMIT: i64 = 100;
/// Compare-and-set attempts of one transition before answering 409.
const TRANSITION_ATTEMPTS: usize = 3;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "shopmesh payments",
        description = "Card payments of the caller: authorize, capture, void, refund."
    ),
    paths(
        create_payment,
        list_payments,
        get_payment,
        capture_payment,
        void_payment,
        refund_payment,
        create_payment_method,
        get_payment_method
    ),
    components(schemas(
        Payment,
        NewPayment,
        RefundRequest,
        PaymentList,
        Status,
        NewPaymentMethod,
        PaymentMethod
    )),
    modifiers(&Conventions)
)]
pub struct ApiDoc;

pub fn routes(state: State) -> Router {
    Router::new()
        .route("/api/payments", get(list_payments).post(create_payment))
        .route("/api/payments/{id}", get(get_payment))
        .route("/api/payments/{id}/capture", post(capture_payment))
        .route("/api/payments/{id}/void", post(void_payment))
        .route("/api/payments/{id}/refund", post(refund_payment))
        .route("/api/payment-methods", post(create_payment_method))
        .route("/api/payment-methods/{id}", get(get_payment_method))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .with_state(state)
}

/// Vault a card: the answer's `id` pays for an order (`payment_method`) without the number
/// ever travelling again. Only brand and last four digits are kept.
#[utoipa::path(post, path = "/api/payment-methods", request_body = NewPaymentMethod,
    security(("gatewayIdentity" = [])),
    responses((status = 201, body = PaymentMethod, links(
                  ("getPaymentMethod" = (operation_id = "get_payment_method",
                                         parameters(("id" = "$response.body#/id")))))),
              (status = 422, description = "Not a valid card number")))]
async fn create_payment_method(
    axum::extract::State(s): axum::extract::State<State>,
    caller: Caller,
    Json(p): Json<NewPaymentMethod>,
) -> Result<(StatusCode, Json<PaymentMethod>), Problem> {
    let card = normalize_card(&p.card).unwrap_or_default();
    let mut errs = Errors::new();
    errs.check(
        !card.is_empty(),
        "card",
        "not a valid card number (12 to 19 digits passing the Luhn check)",
    );
    errs.into_result()?;
    let method = s.vault.seal(&caller.user_id, &card).await?;
    Ok((StatusCode::CREATED, Json(method)))
}

/// One of the caller's payment methods.
#[utoipa::path(get, path = "/api/payment-methods/{id}",
    params(("id" = String, Path, description = "Payment method id (`pm_…`)")),
    security(("gatewayIdentity" = [])),
    responses((status = 200, body = PaymentMethod), (status = 404, description = "No such method of the caller")))]
async fn get_payment_method(
    axum::extract::State(s): axum::extract::State<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<PaymentMethod>, Problem> {
    match s.vault.open(&caller.user_id, &id).await? {
        Some((m, _)) => Ok(Json(m)),
        None => Err(Problem::not_found("no such payment method")),
    }
}

/// Authorize a card payment. A declined card is recorded (status `DECLINED`), not an error.
#[utoipa::path(post, path = "/api/payments", request_body = NewPayment,
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 200,
            description = "1 to 200 visible ASCII characters, not starting with `saga:`; a \
                           repeat by the same user returns the original payment")),
    security(("gatewayIdentity" = [])),
    responses((status = 201, body = Payment, description = "Authorized or declined",
               links(("getPayment" = (operation_id = "get_payment",
                                      parameters(("id" = "$response.body#/id")))),
                     ("capturePayment" = (operation_id = "capture_payment",
                                          parameters(("id" = "$response.body#/id")))),
                     ("voidPayment" = (operation_id = "void_payment",
                                       parameters(("id" = "$response.body#/id")))),
                     ("refundPayment" = (operation_id = "refund_payment",
                                         parameters(("id" = "$response.body#/id")))))),
              (status = 200, body = Payment, description = "Idempotent repeat: the original payment"),
              (status = 409, description = "A concurrent request with the same key won, and its \
                                            payment cannot be read"),
              (status = 422, description = "Invalid payment or `Idempotency-Key`")))]
async fn create_payment(
    axum::extract::State(s): axum::extract::State<State>,
    caller: Caller,
    headers: HeaderMap,
    Json(p): Json<NewPayment>,
) -> Result<(StatusCode, Json<Payment>), Problem> {
    let mut errs = Errors::new();
    let key = match headers.get(IDEMPOTENCY_KEY_HEADER) {
        None => None,
        Some(v) => {
            let key = v.to_str().ok().filter(|k| (1..=200).contains(&k.len()));
            errs.check(
                key.is_some(),
                "Idempotency-Key",
                "1 to 200 visible ASCII characters",
            );
            errs.check(
                !key.is_some_and(|k| k.starts_with("saga:")),
                "Idempotency-Key",
                "the `saga:` prefix is reserved",
            );
            key
        }
    };
    let order_id = p.order_id.trim();
    let card = normalize_card(&p.card).unwrap_or_default();
    errs.check(
        !order_id.is_empty() && order_id.len() <= 200,
        "order_id",
        "1 to 200 characters",
    )
    .check(
        (1..=MAX_AMOUNT_MINOR).contains(&p.amount_minor),
        "amount_minor",
        "must be between 1 and 100000000000",
    )
    .check(
        p.currency.len() == 3 && p.currency.bytes().all(|b| b.is_ascii_uppercase()),
        "currency",
        "three uppercase letters (ISO 4217)",
    )
    .check(
        !card.is_empty(),
        "card",
        "not a valid card number (12 to 19 digits passing the Luhn check)",
    );
    errs.into_result()?;

    if let Some(key) = key
        && let Some(original) = store::get_by_idempotency_key(&s.db, &caller.user_id, key).await?
    {
        return Ok((StatusCode::OK, Json(original)));
    }

    let (status, decline_code) = match card_outcome(&card) {
        CardOutcome::Authorized => (Status::Authorized, None),
        CardOutcome::Declined(code) => (Status::Declined, Some(code)),
    };
    let id = uuid::Uuid::now_v7().to_string();
    let record = store::NewRecord {
        id: &id,
        order_id,
        user_id: &caller.user_id,
        amount_minor: p.amount_minor,
        currency: &p.currency,
        card_brand: card_brand(&card),
        card_last4: card_last4(&card),
        status,
        decline_code,
        idempotency_key: key,
        now: shopmesh_platform::now_millis(),
    };
    if !store::insert_new(&s.db.pool, &record).await? {
        // A concurrent request with the same key won the race: answer with its payment.
        if let Some(key) = key
            && let Some(original) =
                store::get_by_idempotency_key(&s.db, &caller.user_id, key).await?
        {
            return Ok((StatusCode::OK, Json(original)));
        }
        return Err(Problem::conflict(
            "a payment with this Idempotency-Key already exists",
        ));
    }
    let created = store::get(&s.db, &caller.user_id, &id)
        .await?
        .ok_or_else(|| Problem::internal(&"created payment vanished"))?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// The caller's payments, newest first (at most 100), optionally of one order.
#[utoipa::path(get, path = "/api/payments", params(ListQuery),
    security(("gatewayIdentity" = [])),
    responses((status = 200, body = PaymentList),
              (status = 422, description = "`order_id` too long")))]
async fn list_payments(
    axum::extract::State(s): axum::extract::State<State>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<PaymentList>, Problem> {
    let order_id = q
        .order_id
        .as_deref()
        .map(str::trim)
        .filter(|o| !o.is_empty());
    let mut errs = Errors::new();
    errs.check(
        order_id.is_none_or(|o| o.len() <= 200),
        "order_id",
        "at most 200 characters",
    );
    errs.into_result()?;
    let items = store::list(&s.db, &caller.user_id, order_id, LIST_LIMIT).await?;
    Ok(Json(PaymentList { items }))
}

/// Get one of the caller's payments.
#[utoipa::path(get, path = "/api/payments/{id}",
    params(("id" = String, Path, description = "Payment id")),
    security(("gatewayIdentity" = [])),
    responses((status = 200, body = Payment), (status = 404, description = "Unknown payment")))]
async fn get_payment(
    axum::extract::State(s): axum::extract::State<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Payment>, Problem> {
    store::get(&s.db, &caller.user_id, &id)
        .await?
        .map(Json)
        .ok_or_else(|| PaymentError::NotFound(id).into())
}

/// Capture an authorized payment in full (`AUTHORIZED` → `CAPTURED`).
#[utoipa::path(post, path = "/api/payments/{id}/capture",
    params(("id" = String, Path, description = "Payment id")),
    security(("gatewayIdentity" = [])),
    responses((status = 200, body = Payment), (status = 404, description = "Unknown payment"),
              (status = 409, description = "Not AUTHORIZED, or changed concurrently")))]
async fn capture_payment(
    axum::extract::State(s): axum::extract::State<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Payment>, Problem> {
    transition(&s, &caller, &id, Operation::Capture).await
}

/// Release an authorization (`AUTHORIZED` → `VOIDED`).
#[utoipa::path(post, path = "/api/payments/{id}/void",
    params(("id" = String, Path, description = "Payment id")),
    security(("gatewayIdentity" = [])),
    responses((status = 200, body = Payment), (status = 404, description = "Unknown payment"),
              (status = 409, description = "Not AUTHORIZED, or changed concurrently")))]
async fn void_payment(
    axum::extract::State(s): axum::extract::State<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Payment>, Problem> {
    transition(&s, &caller, &id, Operation::Void).await
}

/// Refund a captured payment, in part (stays `CAPTURED`) or in full (`REFUNDED`). Without a
/// body, or without `amount_minor`, refunds everything not yet refunded.
#[utoipa::path(post, path = "/api/payments/{id}/refund",
    params(("id" = String, Path, description = "Payment id")),
    request_body(content = ref("#/components/schemas/RefundRequest"),
                 description = "Optional: without a body (or `amount_minor`), everything not yet \
                                refunded"),
    security(("gatewayIdentity" = [])),
    responses((status = 200, body = Payment), (status = 404, description = "Unknown payment"),
              (status = 409, description = "Not CAPTURED, or changed concurrently"),
              (status = 422, description = "Amount not between 1 and the remaining amount")))]
async fn refund_payment(
    axum::extract::State(s): axum::extract::State<State>,
    caller: Caller,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<RefundRequest>,
) -> Result<Json<Payment>, Problem> {
    let amount = body.unwrap_or_default().amount_minor;
    let mut errs = Errors::new();
    errs.check(
        amount.is_none_or(|a| (1..=MAX_AMOUNT_MINOR).contains(&a)),
        "amount_minor",
        "must be between 1 and the amount not yet refunded",
    );
    errs.into_result()?;
    transition(&s, &caller, &id, Operation::Refund(amount)).await
}

/// Applies `op` to one of the caller's payments with a compare-and-set on its current state,
/// re-reading and re-deciding if a concurrent request changed it first.
async fn transition(
    s: &State,
    caller: &Caller,
    id: &str,
    op: Operation,
) -> Result<Json<Payment>, Problem> {
    for _ in 0..TRANSITION_ATTEMPTS {
        let current = store::get(&s.db, &caller.user_id, id)
            .await?
            .ok_or_else(|| PaymentError::NotFound(id.to_owned()))?;
        let change = current.plan(op)?;
        let now = shopmesh_platform::now_millis();
        if store::apply(&s.db, &caller.user_id, &current, &change, now).await? {
            return store::get(&s.db, &caller.user_id, id)
                .await?
                .map(Json)
                .ok_or_else(|| Problem::internal(&"updated payment vanished"));
        }
    }
    Err(PaymentError::Contended.into())
}

/// An optional JSON body: an empty body is `None`; anything else must be JSON of `T`, with
/// the same problems as [`Json`] (415, 400, 422, 413).
struct OptionalJson<T>(Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_json_content_type);
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| Problem::from(JsonRejection::from(e)))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(None));
        }
        if !is_json {
            return Err(Problem::unsupported_media_type(
                "expected `Content-Type: application/json`",
            ));
        }
        let axum::Json(value) = axum::Json::<T>::from_bytes(&bytes)?;
        Ok(Self(Some(value)))
    }
}

fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("Application/JSON; charset=utf-8"));
        assert!(is_json_content_type("application/merge-patch+json"));
        assert!(!is_json_content_type("text/plain"));
        assert!(!is_json_content_type("application/jsonx"));
        assert!(!is_json_content_type(""));
    }

    #[test]
    fn openapi_documents_every_route() {
        let doc = ApiDoc::openapi();
        for path in [
            "/api/payments",
            "/api/payments/{id}",
            "/api/payments/{id}/capture",
            "/api/payments/{id}/void",
            "/api/payments/{id}/refund",
            "/api/payment-methods",
            "/api/payment-methods/{id}",
        ] {
            assert!(doc.paths.paths.contains_key(path), "{path}");
        }
    }
}
