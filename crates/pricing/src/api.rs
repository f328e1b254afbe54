use axum::Router;
use axum::routing::get;
use shopmesh_platform::Problem;
use shopmesh_platform::extract::{Json, Path, Query};
use shopmesh_platform::identity::Caller;
use shopmesh_platform::openapi::Conventions;
use shopmesh_platform::validate::{Errors, id_list};
use utoipa::OpenApi;

use crate::State;
use crate::model::{BatchQuery, Price, PriceList, SetPrice, is_currency, is_product_id};
use crate::store;

/// Largest price, in minor units.
const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000;
/// Most ids in one batch read.
const MAX_BATCH: usize = 100;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "shopmesh pricing",
        description = "Prices: get, batch get, set."
    ),
    paths(batch_prices, get_price, set_price),
    components(schemas(Price, SetPrice, PriceList)),
    modifiers(&Conventions)
)]
pub struct ApiDoc;

pub fn routes(state: State) -> Router {
    Router::new()
        .route("/api/prices", get(batch_prices))
        .route("/api/prices/{product_id}", get(get_price).put(set_price))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .with_state(state)
}

/// Get the prices of several products at once.
#[utoipa::path(get, path = "/api/prices", params(BatchQuery),
    responses((status = 200, body = PriceList),
              (status = 400, description = "Missing `ids`, more than 100 of them, or another \
                                             parameter")))]
async fn batch_prices(
    axum::extract::State(s): axum::extract::State<State>,
    Query(q): Query<BatchQuery>,
) -> Result<Json<PriceList>, Problem> {
    let ids = id_list(&q.ids, MAX_BATCH)?;
    let items = store::get_many(&s.db, &ids).await?;
    Ok(Json(PriceList { items }))
}

/// Get the price of one product.
#[utoipa::path(get, path = "/api/prices/{product_id}",
    params(("product_id" = String, Path, description = "Product id")),
    responses((status = 200, body = Price), (status = 404, description = "No price")))]
async fn get_price(
    axum::extract::State(s): axum::extract::State<State>,
    Path(product_id): Path<String>,
) -> Result<Json<Price>, Problem> {
    store::get(&s.db, &product_id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no price for product `{product_id}`")))
}

/// Set the price of a product (admin), creating it if needed.
#[utoipa::path(put, path = "/api/prices/{product_id}", request_body = SetPrice,
    params(("product_id" = String, Path, pattern = "^[\\x21-\\x2B\\x2D-\\x7E]{1,64}$",
            description = "Product id: 1 to 64 visible ASCII characters, no commas")),
    security(("gatewayIdentity" = [])),
    responses((status = 200, body = Price, links(
                  ("getPrice" = (operation_id = "get_price",
                                 parameters(("product_id" = "$response.body#/product_id")))))),
              (status = 403, description = "Not an admin"),
              (status = 422, description = "Invalid price")))]
async fn set_price(
    axum::extract::State(s): axum::extract::State<State>,
    caller: Caller,
    Path(product_id): Path<String>,
    Json(body): Json<SetPrice>,
) -> Result<Json<Price>, Problem> {
    caller.require_role("admin")?;
    let mut errs = Errors::new();
    errs.check(
        is_product_id(&product_id),
        "product_id",
        "1 to 64 visible ASCII characters, no commas",
    )
    .check(
        (0..=MAX_AMOUNT_MINOR).contains(&body.amount_minor),
        "amount_minor",
        "must be between 0 and 1000000000000",
    )
    .check(
        is_currency(&body.currency),
        "currency",
        "exactly 3 uppercase ASCII letters",
    );
    errs.into_result()?;
    let price = store::upsert(&s.db, &product_id, body.amount_minor, &body.currency).await?;
    Ok(Json(price))
}
