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
use crate::model::{
    ListQuery, NewPromotion, Promotion, PromotionKind, PromotionPage, PromotionSeed, is_currency,
    is_product_id,
};
use crate::store;

/// Largest `amount_off`, in minor units.
const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "shopmesh promotions",
        description = "Promotions: list, get, create."
    ),
    paths(list_promotions, get_promotion, create_promotion),
    components(schemas(Promotion, PromotionKind, NewPromotion, PromotionPage)),
    modifiers(&Conventions)
)]
pub struct ApiDoc;

pub fn routes(state: State) -> Router {
    Router::new()
        .route(
            "/api/promotions",
            get(list_promotions).post(create_promotion),
        )
        .route("/api/promotions/{id}", get(get_promotion))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .with_state(state)
}

/// List promotions of a product and/or a category, by default only those running now.
#[utoipa::path(get, path = "/api/promotions", params(ListQuery),
    responses((status = 200, body = PromotionPage),
              (status = 422, description = "`limit`, `offset`, `product_id` or `category` out \
                                             of bounds")))]
async fn list_promotions(
    axum::extract::State(s): axum::extract::State<State>,
    Query(q): Query<ListQuery>,
) -> Result<Json<PromotionPage>, Problem> {
    let mut errs = Errors::new();
    let (limit, offset) = shopmesh_platform::validate::page(&mut errs, q.limit, q.offset);
    errs.check(
        q.product_id.as_ref().is_none_or(|p| p.len() <= 64),
        "product_id",
        "at most 64 characters",
    )
    .check(
        q.category.as_ref().is_none_or(|c| c.len() <= 100),
        "category",
        "at most 100 characters",
    );
    errs.into_result()?;
    let filter = store::Filter {
        product_id: q.product_id.as_deref().filter(|p| !p.is_empty()),
        category: q
            .category
            .as_deref()
            .map(str::trim)
            .filter(|c| !c.is_empty()),
        active_at: q.active.unwrap_or(true).then(shopmesh_platform::now_millis),
    };
    let (items, total) = store::list(&s.db, &filter, limit, offset).await?;
    Ok(Json(PromotionPage {
        items,
        total,
        limit,
        offset,
    }))
}

/// Get one promotion.
#[utoipa::path(get, path = "/api/promotions/{id}",
    params(("id" = String, Path, description = "Promotion id")),
    responses((status = 200, body = Promotion), (status = 404, description = "Unknown promotion")))]
async fn get_promotion(
    axum::extract::State(s): axum::extract::State<State>,
    Path(id): Path<String>,
) -> Result<Json<Promotion>, Problem> {
    store::get(&s.db, &id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no promotion with id `{id}`")))
}

/// Parses an RFC 3339 instant into Unix millis.
fn parse_instant(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|d| d.timestamp_millis())
}

/// Create a promotion (admin).
#[utoipa::path(post, path = "/api/promotions", request_body = NewPromotion,
    security(("gatewayIdentity" = [])),
    responses((status = 201, body = Promotion, links(
                  ("getPromotion" = (operation_id = "get_promotion",
                                     parameters(("id" = "$response.body#/id")))))),
              (status = 403, description = "Not an admin"),
              (status = 422, description = "Invalid promotion")))]
async fn create_promotion(
    axum::extract::State(s): axum::extract::State<State>,
    caller: Caller,
    Json(p): Json<NewPromotion>,
) -> Result<(StatusCode, Json<Promotion>), Problem> {
    caller.require_role("admin")?;
    let name = p.name.trim();
    let category = p.category.as_deref().map(str::trim);
    let starts_at = parse_instant(&p.starts_at);
    let ends_at = parse_instant(&p.ends_at);
    let mut errs = Errors::new();
    errs.check(
        (1..=200).contains(&name.chars().count()),
        "name",
        "1 to 200 characters",
    )
    .check(
        p.description.len() <= 10_000,
        "description",
        "at most 10000 characters",
    )
    .check(
        p.product_id.is_some() != category.is_some(),
        "product_id",
        "exactly one of `product_id` and `category` is required",
    )
    .check(
        p.product_id.as_deref().is_none_or(is_product_id),
        "product_id",
        "1 to 64 visible ASCII characters, no commas",
    )
    .check(
        category.is_none_or(|c| !c.is_empty() && c.len() <= 100),
        "category",
        "1 to 100 characters",
    )
    .check(starts_at.is_some(), "starts_at", "an RFC 3339 instant")
    .check(ends_at.is_some(), "ends_at", "an RFC 3339 instant");
    if let (Some(start), Some(end)) = (starts_at, ends_at) {
        errs.check(start < end, "ends_at", "must be after `starts_at`");
    }
    match p.kind {
        PromotionKind::PercentOff => {
            errs.check(
                (1..=100).contains(&p.value),
                "value",
                "a percentage between 1 and 100",
            )
            .check(
                p.currency.is_none(),
                "currency",
                "only for `amount_off` promotions",
            );
        }
        PromotionKind::AmountOff => {
            errs.check(
                (1..=MAX_AMOUNT_MINOR).contains(&p.value),
                "value",
                "an amount in minor units between 1 and 1000000000000",
            )
            .check(
                p.currency.as_deref().is_some_and(is_currency),
                "currency",
                "exactly 3 uppercase ASCII letters",
            );
        }
    }
    errs.into_result()?;
    let (Some(starts_at), Some(ends_at)) = (starts_at, ends_at) else {
        return Err(Problem::internal(&"validated instants missing"));
    };
    let seed = PromotionSeed {
        id: uuid::Uuid::now_v7().to_string(),
        name: name.to_owned(),
        description: p.description,
        kind: p.kind,
        value: p.value,
        currency: p.currency,
        product_id: p.product_id,
        category: category.map(str::to_owned),
        starts_at,
        ends_at,
    };
    if store::insert_many(&s.db, std::slice::from_ref(&seed)).await? == 0 {
        return Err(Problem::internal(&"promotion id collision"));
    }
    let created = store::get(&s.db, &seed.id)
        .await?
        .ok_or_else(|| Problem::internal(&"created promotion vanished"))?;
    Ok((StatusCode::CREATED, Json(created)))
}
