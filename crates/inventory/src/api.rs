use axum::Router;
use axum::routing::get;
use shopmesh_platform::Problem;
use shopmesh_platform::extract::{Json, Path, Query};
use shopmesh_platform::identity::Caller;
use shopmesh_platform::openapi::Conventions;
use shopmesh_platform::validate::{Errors, id_list};
use utoipa::OpenApi;

use crate::State;
use crate::model::{BatchQuery, SetStock, StockLevel, StockList, is_product_id};
use crate::store::{self, SetOutcome};

/// Most units a product can have on hand.
const MAX_ON_HAND: i64 = 1_000_000_000;
/// Most ids in one batch read.
const MAX_BATCH: usize = 100;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "shopmesh inventory",
        description = "Stock levels: get, batch get, set."
    ),
    paths(batch_stock, get_stock, set_stock),
    components(schemas(StockLevel, SetStock, StockList)),
    modifiers(&Conventions)
)]
pub struct ApiDoc;

pub fn routes(state: State) -> Router {
    Router::new()
        .route("/api/inventory", get(batch_stock))
        .route("/api/inventory/{product_id}", get(get_stock).put(set_stock))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .with_state(state)
}

/// Get the stock levels of several products at once.
#[utoipa::path(get, path = "/api/inventory", params(BatchQuery),
    responses((status = 200, body = StockList),
              (status = 400, description = "Missing `ids`, more than 100 of them, or another \
                                             parameter")))]
async fn batch_stock(
    axum::extract::State(s): axum::extract::State<State>,
    Query(q): Query<BatchQuery>,
) -> Result<Json<StockList>, Problem> {
    let ids = id_list(&q.ids, MAX_BATCH)?;
    let items = store::get_many(&s.db, &ids).await?;
    Ok(Json(StockList { items }))
}

/// Get the stock level of one product.
#[utoipa::path(get, path = "/api/inventory/{product_id}",
    params(("product_id" = String, Path, description = "Product id")),
    responses((status = 200, body = StockLevel), (status = 404, description = "No stock level")))]
async fn get_stock(
    axum::extract::State(s): axum::extract::State<State>,
    Path(product_id): Path<String>,
) -> Result<Json<StockLevel>, Problem> {
    store::get(&s.db, &product_id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no stock level for product `{product_id}`")))
}

/// Set the units on hand of a product (admin), creating its stock level if needed.
#[utoipa::path(put, path = "/api/inventory/{product_id}", request_body = SetStock,
    params(("product_id" = String, Path, pattern = "^[\\x21-\\x2B\\x2D-\\x7E]{1,64}$",
            description = "Product id: 1 to 64 visible ASCII characters, no commas")),
    security(("gatewayIdentity" = [])),
    responses((status = 200, body = StockLevel, links(
                  ("getStock" = (operation_id = "get_stock",
                                 parameters(("product_id" = "$response.body#/product_id")))))),
              (status = 403, description = "Not an admin"),
              (status = 409, description = "Below the units reserved"),
              (status = 422, description = "Invalid stock level")))]
async fn set_stock(
    axum::extract::State(s): axum::extract::State<State>,
    caller: Caller,
    Path(product_id): Path<String>,
    Json(body): Json<SetStock>,
) -> Result<Json<StockLevel>, Problem> {
    caller.require_role("admin")?;
    let mut errs = Errors::new();
    errs.check(
        is_product_id(&product_id),
        "product_id",
        "1 to 64 visible ASCII characters, no commas",
    )
    .check(
        (0..=MAX_ON_HAND).contains(&body.on_hand),
        "on_hand",
        "must be between 0 and 1000000000",
    );
    errs.into_result()?;
    match store::set_on_hand(&s.db, &product_id, body.on_hand).await? {
        Some(SetOutcome::Set(level)) => Ok(Json(level)),
        Some(SetOutcome::BelowReserved(current)) => Err(Problem::conflict(format!(
            "on_hand {} is below the {} units reserved for product `{product_id}`",
            body.on_hand, current.reserved
        ))
        .with("reserved", current.reserved)),
        None => Err(Problem::internal(&"stock level vanished while being set")),
    }
}
