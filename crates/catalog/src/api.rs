use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use shopmesh_platform::Problem;
use shopmesh_platform::extract::{Json, Path, Query};
use shopmesh_platform::identity::Caller;
use shopmesh_platform::openapi::Conventions;
use shopmesh_platform::validate::Errors;
use utoipa::OpenApi;

use crate::State;
use crate::model::{ListQuery, NewProduct, Product, ProductPage};
use crate::store;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "shopmesh catalog",
        description = "Products: list, search, get, create."
    ),
    paths(list_products, get_product, create_product),
    components(schemas(Product, NewProduct, ProductPage)),
    modifiers(&Conventions)
)]
pub struct ApiDoc;

pub fn routes(state: State) -> Router {
    Router::new()
        .route("/api/products", get(list_products).post(create_product))
        .route("/api/products/{id}", get(get_product))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .with_state(state)
}

/// List products, optionally filtered by text and category.
#[utoipa::path(get, path = "/api/products", params(ListQuery),
    responses((status = 200, body = ProductPage),
              (status = 422, description = "`limit`, `offset` or `q` out of bounds")))]
async fn list_products(
    axum::extract::State(s): axum::extract::State<State>,
    Query(q): Query<ListQuery>,
) -> Result<Json<ProductPage>, Problem> {
    let mut errs = Errors::new();
    let (limit, offset) = shopmesh_platform::validate::page(&mut errs, q.limit, q.offset);
    errs.check(
        q.q.as_ref().is_none_or(|t| t.len() <= 200),
        "q",
        "at most 200 characters",
    );
    errs.into_result()?;
    let filter = store::Filter {
        q: q.q.as_deref().map(str::trim).filter(|t| !t.is_empty()),
        category: q.category.as_deref().filter(|c| !c.is_empty()),
    };
    let (items, total) = store::list(&s.db, &filter, limit, offset).await?;
    Ok(Json(ProductPage {
        items,
        total,
        limit,
        offset,
    }))
}

/// Get one product.
#[utoipa::path(get, path = "/api/products/{id}",
    params(("id" = String, Path, description = "Product id")),
    responses((status = 200, body = Product), (status = 404, description = "Unknown product")))]
async fn get_product(
    axum::extract::State(s): axum::extract::State<State>,
    Path(id): Path<String>,
) -> Result<Json<Product>, Problem> {
    store::get(&s.db, &id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no product with id `{id}`")))
}

/// Create a product (admin).
#[utoipa::path(post, path = "/api/products", request_body = NewProduct,
    security(("gatewayIdentity" = [])),
    responses((status = 201, body = Product, links(
                  ("getProduct" = (operation_id = "get_product",
                                   parameters(("id" = "$response.body#/id")))))),
              (status = 403, description = "Not an admin"),
              (status = 409, description = "SKU exists"),
              (status = 422, description = "Invalid product")))]
async fn create_product(
    axum::extract::State(s): axum::extract::State<State>,
    caller: Caller,
    Json(p): Json<NewProduct>,
) -> Result<(StatusCode, Json<Product>), Problem> {
    caller.require_role("admin")?;
    let mut errs = Errors::new();
    errs.check(
        !p.sku.trim().is_empty() && p.sku.len() <= 64,
        "sku",
        "1 to 64 characters",
    )
    .check(
        !p.name.trim().is_empty() && p.name.len() <= 200,
        "name",
        "1 to 200 characters",
    )
    .check(
        p.description.len() <= 10_000,
        "description",
        "at most 10000 characters",
    )
    .check(
        !p.category.trim().is_empty() && p.category.len() <= 100,
        "category",
        "1 to 100 characters",
    );
    errs.into_result()?;
    let product = Product {
        id: uuid::Uuid::now_v7().to_string(),
        sku: p.sku.trim().to_owned(),
        name: p.name.trim().to_owned(),
        description: p.description,
        category: p.category.trim().to_owned(),
        attributes: p.attributes,
        created_at: String::new(),
    };
    if store::insert_many(&s.db, std::slice::from_ref(&product)).await? == 0 {
        return Err(Problem::conflict(format!(
            "a product with sku `{}` already exists",
            product.sku
        )));
    }
    let created = store::get(&s.db, &product.id)
        .await?
        .ok_or_else(|| Problem::internal(&"created product vanished"))?;
    Ok((StatusCode::CREATED, Json(created)))
}
