use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Product {
    pub id: String,
    #[schema(min_length = 1, max_length = 64)]
    pub sku: String,
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    #[schema(max_length = 10_000)]
    pub description: String,
    #[schema(min_length = 1, max_length = 100)]
    pub category: String,
    /// Free-form attributes (brand, colour, size…).
    #[schema(value_type = Object)]
    pub attributes: Map<String, Value>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub created_at: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    /// Unique; 1 to 64 characters, not blank (trimmed).
    #[schema(min_length = 1, max_length = 64)]
    pub sku: String,
    /// 1 to 200 characters, not blank (trimmed).
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    #[serde(default)]
    #[schema(max_length = 10_000)]
    pub description: String,
    /// 1 to 100 characters, not blank (trimmed).
    #[schema(min_length = 1, max_length = 100)]
    pub category: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub attributes: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100, default = 20)]
    pub limit: Option<i64>,
    /// Items to skip, 0 to 1000000 (default 0).
    #[param(minimum = 0, maximum = 1_000_000, default = 0)]
    pub offset: Option<i64>,
    /// Text searched in name, description and sku (case-insensitive), at most 200 bytes.
    #[param(max_length = 200)]
    pub q: Option<String>,
    /// Exact category.
    pub category: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProductPage {
    pub items: Vec<Product>,
    #[schema(minimum = 0)]
    pub total: i64,
    #[schema(minimum = 1, maximum = 100)]
    pub limit: i64,
    #[schema(minimum = 0, maximum = 1_000_000)]
    pub offset: i64,
}
