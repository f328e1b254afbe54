use std::collections::{HashMap, HashSet};

use axum::Router;
use axum::extract::State as S;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use shopmesh_platform::Problem;
use shopmesh_platform::client::{CallError, RequestId};
use shopmesh_platform::db::is_unique_violation;
use shopmesh_platform::extract::{Json, Path, Query};
use shopmesh_platform::identity::Caller;
use shopmesh_platform::openapi::Conventions;
use shopmesh_platform::problem::FieldError;
use shopmesh_platform::validate::{Errors, luhn_valid};
use utoipa::OpenApi;

use shopmesh_events::{Line, OrderPlaced};
use shopmesh_messaging::Envelope;

use crate::State;
use crate::model::{
    ListQuery, NewItem, NewOrder, Order, OrderItem, OrderPage, PriceList, VaultedCard,
};
use crate::store;

pub const MAX_ITEMS: usize = 50;
pub const MAX_QUANTITY: i64 = 1000;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "shopmesh orders",
        description = "Place, get and list your own orders."
    ),
    paths(create_order, get_order, list_orders),
    components(schemas(NewOrder, NewItem, Order, OrderItem, OrderPage)),
    modifiers(&Conventions)
)]
pub struct ApiDoc;

pub fn routes(state: State) -> Router {
    Router::new()
        .route("/api/orders", get(list_orders).post(create_order))
        .route("/api/orders/{id}", get(get_order))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .with_state(state)
}

fn validate(o: &NewOrder) -> Result<(), Problem> {
    let mut errs = Errors::new();
    errs.check(
        (1..=MAX_ITEMS).contains(&o.items.len()),
        "items",
        "must hold 1 to 50 items",
    );
    let mut seen = HashSet::new();
    for (i, it) in o.items.iter().enumerate() {
        if it.product_id.is_empty() || it.product_id.len() > 64 {
            errs.push(
                format!("items[{i}].product_id"),
                "must be 1 to 64 characters",
            );
        }
        if !(1..=MAX_QUANTITY).contains(&it.quantity) {
            errs.push(format!("items[{i}].quantity"), "must be between 1 and 1000");
        }
        if !seen.insert(it.product_id.as_str()) {
            errs.push(format!("items[{i}].product_id"), "appears more than once");
        }
    }
    match (&o.card, &o.payment_method) {
        (Some(card), None) => {
            errs.check(
                luhn_valid(&card.replace(' ', "")),
                "card",
                "must be a valid card number",
            );
        }
        (None, Some(pm)) => {
            errs.check(
                (1..=512).contains(&pm.len()) && pm.bytes().all(|b| b.is_ascii_graphic()),
                "payment_method",
                "must be 1 to 512 visible characters",
            );
        }
        _ => errs.push("card", "give exactly one of `card` and `payment_method`"),
    }
    errs.into_result()
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(s) if !s.is_empty() && s.len() <= 200 => Ok(Some(s.to_owned())),
            _ => Err(Problem::bad_request(
                "Idempotency-Key must be 1 to 200 visible ASCII characters",
            )),
        },
    }
}

fn accepted(order: Order) -> Response {
    let location = format!("/api/orders/{}", order.id);
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(order),
    )
        .into_response()
}

fn replayed(order: Order) -> Response {
    (
        StatusCode::OK,
        [("idempotent-replayed", "true")],
        Json(order),
    )
        .into_response()
}

/// Place an order. Accepted as PENDING; prices come from the pricing service. With an
/// `Idempotency-Key` header a retried request returns the original order.
#[utoipa::path(post, path = "/api/orders", request_body = NewOrder,
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 200,
            description = "Makes retries safe: 1 to 200 visible ASCII characters; a repeat by \
                           the same user answers the original order")),
    security(("gatewayIdentity" = [])),
    responses((status = 202, body = Order, description = "Accepted, PENDING",
               headers(("Location" = String, description = "`/api/orders/{id}`")),
               links(("getOrder" = (operation_id = "get_order",
                                    parameters(("id" = "$response.body#/id")))))),
              (status = 200, body = Order, description = "Idempotent repeat: the original order",
               headers(("idempotent-replayed" = String, description = "`true`")),
               links(("getOrder" = (operation_id = "get_order",
                                    parameters(("id" = "$response.body#/id")))))),
              (status = 400, description = "Malformed JSON, a body that cannot be read, or an \
                                            `Idempotency-Key` that is not 1 to 200 visible ASCII \
                                            characters"),
              (status = 403, description = "The caller's account does not exist or is disabled"),
              (status = 422, description = "Invalid order: its shape or values, unknown or \
                                            unpriced products, several currencies, an unknown \
                                            payment method or address, or an `Idempotency-Key` \
                                            used for another order")))]
async fn create_order(
    S(s): S<State>,
    caller: Caller,
    rid: RequestId,
    headers: HeaderMap,
    Json(o): Json<NewOrder>,
) -> Result<Response, Problem> {
    validate(&o)?;
    let key = idempotency_key(&headers)?;
    let hash = fingerprint(&o);
    if let Some(k) = &key
        && let Some(existing) = store::find_by_idempotency_key(&s.db, &caller.user_id, k).await?
    {
        return same_request(&s, &caller.user_id, k, &hash, existing).await;
    }

    // The user center decides who may order and where it ships (a snapshot of the address).
    let account = s
        .directory
        .get(&caller.user_id, &rid)
        .await?
        .ok_or_else(|| Problem::forbidden("the account does not exist"))?;
    if !account.is_active() {
        return Err(Problem::forbidden("the account is disabled"));
    }
    let shipping_address = match (o.ship_to, account.addresses.as_slice()) {
        (None, []) => None,
        (None, [first, ..]) => Some(first),
        (Some(i), list) => Some(list.get(i).ok_or_else(|| {
            Problem::validation(vec![FieldError::new(
                "ship_to",
                format!("the account has {} address(es)", list.len()),
            )])
        })?),
    }
    .map(serde_json::to_value)
    .transpose()
    .map_err(|e| Problem::internal(&e))?;
    let shipping_text = shipping_address.as_ref().map(|a| a.to_string());

    let ids: Vec<&str> = o.items.iter().map(|i| i.product_id.as_str()).collect();
    // The prices and the means of payment are independent: both calls go out at once (an
    // order refused for its items may leave the card vaulted, as a vault call alone would).
    let prices_path = format!("/api/prices?ids={}", encode_ids(&ids));
    let prices = s.pricing.get_json::<PriceList>(&prices_path, &rid);
    let method = async {
        match (&o.card, &o.payment_method) {
            (Some(card), _) => s
                .payments
                .post_json::<_, VaultedCard>(
                    "/api/payment-methods",
                    &serde_json::json!({ "card": card.replace(' ', "") }),
                    &caller,
                    &rid,
                )
                .await
                .map_err(Problem::from),
            (None, Some(pm)) => s
                .payments
                .get_json_as::<VaultedCard>(
                    &format!("/api/payment-methods/{}", encode_ids(&[pm.as_str()])),
                    &caller,
                    &rid,
                )
                .await
                .map_err(|e| match e {
                    CallError::NotFound(_) => Problem::validation(vec![FieldError::new(
                        "payment_method",
                        "no such payment method of yours",
                    )]),
                    other => other.into(),
                }),
            (None, None) => Err(Problem::unprocessable("no means of payment")),
        }
    };
    let (prices, method) = tokio::join!(prices, method);
    let prices = prices?;
    let prices: HashMap<&str, _> = prices
        .items
        .iter()
        .map(|p| (p.product_id.as_str(), p))
        .collect();
    let unknown: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !prices.contains_key(id))
        .collect();
    if !unknown.is_empty() {
        return Err(Problem::unprocessable(format!(
            "unknown or unpriced products: {}",
            unknown.join(", ")
        ))
        .with("unknown_products", unknown));
    }
    let currency = prices[ids[0]].currency.clone();
    if prices.values().any(|p| p.currency != currency) {
        return Err(Problem::unprocessable(
            "all items of an order must be priced in one currency",
        ));
    }
    let mut total: i64 = 0;
    let mut items = Vec::with_capacity(o.items.len());
    for it in &o.items {
        let unit = prices[it.product_id.as_str()].amount_minor;
        let line = unit
            .checked_mul(it.quantity)
            .ok_or_else(|| Problem::unprocessable("order total is too large"))?;
        total = total
            .checked_add(line)
            .ok_or_else(|| Problem::unprocessable("order total is too large"))?;
        items.push(OrderItem {
            product_id: it.product_id.clone(),
            quantity: it.quantity,
            unit_price_minor: unit,
            line_total_minor: line,
        });
    }
    // The card went to the payments vault; from here on only its id travels.
    let method: VaultedCard = method?;
    let id = uuid::Uuid::now_v7().to_string();
    let placed = OrderPlaced {
        order_id: id.clone(),
        user_id: caller.user_id.clone(),
        items: o
            .items
            .iter()
            .map(|i| Line {
                product_id: i.product_id.clone(),
                quantity: i.quantity,
            })
            .collect(),
        amount_minor: total,
        currency: currency.clone(),
        payment_method: method.id.clone(),
    };
    let placed = Envelope::new(crate::NAME, &id, &placed)
        .map_err(|e| Problem::internal(&e))?
        .with_traceparent(traceparent(&headers));
    let row = store::NewOrderRow {
        placed: &placed,
        request_hash: &hash,
        id: &id,
        user_id: &caller.user_id,
        total_minor: total,
        currency: &currency,
        card_last4: &method.card_last4,
        idempotency_key: key.as_deref(),
        items: &items,
        shipping_address: shipping_text.as_deref(),
    };
    match store::insert(&s.db, &row).await {
        Ok(()) => {}
        Err(e) if is_unique_violation(&e) => {
            // A concurrent retry with the same key won the race: answer with its order.
            if let Some(k) = &key
                && let Some(existing) =
                    store::find_by_idempotency_key(&s.db, &caller.user_id, k).await?
            {
                return same_request(&s, &caller.user_id, k, &hash, existing).await;
            }
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    }
    s.relay.notify();
    tracing::debug!(order_id = %id, total, "order placed");
    // Answer from what was just written rather than reading it back.
    let now = shopmesh_platform::millis_to_rfc3339(shopmesh_platform::now_millis());
    Ok(accepted(Order {
        id,
        user_id: caller.user_id,
        status: "PENDING".into(),
        reason: None,
        items,
        steps: Vec::new(),
        total_minor: total,
        currency,
        card_last4: method.card_last4.clone(),
        shipping_address,
        trace_id: placed
            .traceparent
            .as_deref()
            .and_then(|t| t.split('-').nth(1))
            .map(str::to_owned),
        created_at: now.clone(),
        updated_at: now,
    }))
}

/// A retry with the same key must be the same request: same order, else 422.
async fn same_request(
    s: &State,
    user_id: &str,
    key: &str,
    hash: &str,
    existing: Order,
) -> Result<Response, Problem> {
    match store::request_hash(&s.db, user_id, key).await? {
        Some(h) if h != hash => Err(Problem::unprocessable(
            "this Idempotency-Key was used for a different request",
        )),
        _ => Ok(replayed(existing)),
    }
}

/// SHA-256 of what defines the order (lines and means of payment), for Idempotency-Key
/// checks.
fn fingerprint(o: &NewOrder) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for it in &o.items {
        h.update(it.product_id.as_bytes());
        h.update([0]);
        h.update(it.quantity.to_be_bytes());
    }
    match (&o.card, &o.payment_method) {
        // Never a digest of the whole number (a card number is guessable from its hash):
        // its length and last four digits tell a retry from a different card well enough.
        (Some(card), _) => {
            let digits = card.replace(' ', "");
            h.update(b"card:");
            h.update(digits.len().to_be_bytes());
            h.update(&digits.as_bytes()[digits.len().saturating_sub(4)..]);
        }
        (None, Some(pm)) => {
            h.update(b"pm:");
            h.update(pm.as_bytes());
        }
        (None, None) => {}
    }
    hex::encode(h.finalize())
}

/// The W3C trace context of the request, carried into the saga's messages: this request's
/// span when spans are exported, else the context the request came with.
fn traceparent(headers: &HeaderMap) -> Option<String> {
    if let Some(tp) = shopmesh_platform::otel::traceparent(&tracing::Span::current()) {
        return Some(tp);
    }
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() == 55)
        .map(str::to_owned)
}

/// Product ids are opaque; percent-encode anything outside the unreserved set.
fn encode_ids(ids: &[&str]) -> String {
    let mut out = String::new();
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for b in id.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// One of the caller's orders (another user's order is 404, never 403).
#[utoipa::path(get, path = "/api/orders/{id}",
    params(("id" = String, Path, description = "Order id")),
    security(("gatewayIdentity" = [])),
    responses((status = 200, body = Order), (status = 404, description = "No such order of yours")))]
async fn get_order(
    S(s): S<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Order>, Problem> {
    store::get_owned(&s.db, &caller.user_id, &id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no order `{id}`")))
}

/// The caller's orders, newest first.
#[utoipa::path(get, path = "/api/orders", params(ListQuery),
    security(("gatewayIdentity" = [])),
    responses((status = 200, body = OrderPage),
              (status = 422, description = "`limit` or `offset` out of bounds")))]
async fn list_orders(
    S(s): S<State>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<OrderPage>, Problem> {
    let limit = q.limit.unwrap_or(20);
    let offset = q.offset.unwrap_or(0);
    let mut errs = Errors::new();
    errs.check(
        (1..=100).contains(&limit),
        "limit",
        "must be between 1 and 100",
    )
    .check(offset >= 0, "offset", "must not be negative");
    errs.into_result()?;
    let items = store::list_owned(&s.db, &caller.user_id, limit, offset).await?;
    Ok(Json(OrderPage {
        items,
        limit,
        offset,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_encoded() {
        assert_eq!(encode_ids(&["a-1", "b c", "x,y"]), "a-1,b%20c,x%2Cy");
    }
}
