//! The conventions every service's OpenAPI document follows, applied in one place (as
//! [`problem`](crate::problem) is the one place errors are built): add
//! `modifiers(&Conventions)` to a service's `#[openapi(...)]`.
//!
//! What [`Conventions`] does to a document:
//!
//! - adds the `Problem` (and `FieldError`) component schemas, the shape
//!   [`Problem`](crate::Problem) serialises;
//! - adds the `gatewayIdentity` security scheme: the identity headers the gateway sets
//!   ([`identity`](crate::identity)). An operation that needs a caller says so with
//!   `security(("gatewayIdentity" = []))`, one where a caller is optional with
//!   `security((), ("gatewayIdentity" = []))`;
//! - declares the path parameters a path template names but the operation does not (a
//!   string, required, at least one character: an empty segment does not match the route),
//!   gives every string path parameter that minimum length, and makes no parameter
//!   nullable (utoipa's reading of an `Option`: a parameter is absent, never `null`);
//! - adds the statuses an operation can answer by its shape, as the extractors of
//!   [`extract`](crate::extract) and [`identity`](crate::identity) and the stack of
//!   [`serve`](crate::serve) really answer them:
//!   - a JSON body: 400 (malformed JSON, or a body that cannot be read), 413 (over the body
//!     limit), 415 (not `application/json`), 422 (JSON of the wrong shape);
//!   - query parameters: 400 (a query string that does not deserialize: unknown, repeated or
//!     mistyped parameters);
//!   - path parameters: 400 (a parameter that does not decode, e.g. invalid UTF-8);
//!   - a required caller: 401 (no `x-shopmesh-user-id`);
//!   - every operation: 500 (an internal failure or a panic: the problem says only to quote
//!     the `x-request-id` response header), and 503 (the storage pool exhausted, or a
//!     dependency unavailable) unless the operation is marked with [`NO_STORAGE`];
//!
//!   403, 404, 409, 412, 429, and 422 for values a handler validates, are the operation's own
//!   and stay in its `#[utoipa::path]` annotation;
//! - gives every 4xx/5xx response the `application/problem+json` content, schema `Problem`;
//! - spells the response links (`links(...)` in `#[utoipa::path]`) as OpenAPI does.

use std::collections::BTreeSet;

use utoipa::Modify;
use utoipa::openapi::link::Link;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ArrayBuilder, Object, ObjectBuilder, SchemaType, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::openapi::{
    Content, OpenApi, PathItem, Ref, RefOr, Required, Response, Schema, SchemaFormat,
};

use crate::{USER_ID_HEADER, USER_ROLES_HEADER};

/// The security scheme of the identity the gateway vouches for.
pub const SECURITY_SCHEME: &str = "gatewayIdentity";
/// The component schema of every error response.
pub const PROBLEM_SCHEMA: &str = "Problem";
/// An operation extension (`extensions(("x-shopmesh-no-storage" = json!(true)))`) for the
/// rare operation that touches neither storage nor a dependency, so cannot answer 503. It
/// is removed from the document.
pub const NO_STORAGE: &str = "x-shopmesh-no-storage";

/// The `Modify` every service's `ApiDoc` uses (see the module documentation).
pub struct Conventions;

impl Modify for Conventions {
    fn modify(&self, doc: &mut OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components
            .schemas
            .insert(PROBLEM_SCHEMA.into(), RefOr::T(problem_schema()));
        components
            .schemas
            .insert("FieldError".into(), RefOr::T(field_error_schema()));
        components.add_security_scheme(
            SECURITY_SCHEME,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                USER_ID_HEADER.to_owned(),
                format!(
                    "The caller as the gateway vouches for it, from a verified bearer token: \
                     `{USER_ID_HEADER}` is the user id (the token's `sub`), and \
                     `{USER_ROLES_HEADER}` its roles, comma-separated (e.g. `admin,customer`). \
                     The gateway removes every `x-shopmesh-*` header a client sends; services \
                     are reachable only through it."
                ),
            ))),
        );
        for (template, item) in doc.paths.paths.iter_mut() {
            for op in operations(item) {
                conform(template, op);
            }
        }
    }
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}

/// The `{name}` segments of a path template.
fn template_params(template: &str) -> impl Iterator<Item = &str> {
    template
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
}

/// Whether the operation needs a caller: `gatewayIdentity` is asked for, and no alternative
/// requirement is empty (`{}` makes the caller optional).
fn needs_caller(op: &Operation) -> bool {
    let Some(reqs) = &op.security else {
        return false;
    };
    let reqs: Vec<serde_json::Value> = reqs
        .iter()
        .filter_map(|r| serde_json::to_value(r).ok())
        .collect();
    reqs.iter().any(|r| r.get(SECURITY_SCHEME).is_some())
        && !reqs
            .iter()
            .any(|r| r.as_object().is_some_and(|o| o.is_empty()))
}

fn conform(template: &str, op: &mut Operation) {
    // Path parameters the template names but the operation does not declare.
    let declared: BTreeSet<String> = op
        .parameters
        .iter()
        .flatten()
        .filter(|p| p.parameter_in == ParameterIn::Path)
        .map(|p| p.name.clone())
        .collect();
    for name in template_params(template) {
        if !declared.contains(name) {
            op.parameters.get_or_insert_with(Vec::new).push(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .min_length(Some(1)),
                    ))
                    .build(),
            );
        }
    }

    for param in op.parameters.iter_mut().flatten() {
        if let Some(RefOr::T(Schema::Object(schema))) = &mut param.schema {
            // A parameter is absent or a string, never JSON `null` (what utoipa makes of an
            // `Option`).
            if let SchemaType::Array(types) = &mut schema.schema_type {
                types.retain(|t| *t != Type::Null);
                if let [one] = types.as_slice() {
                    schema.schema_type = SchemaType::Type(one.clone());
                }
            }
            if param.parameter_in == ParameterIn::Path
                && schema.schema_type == SchemaType::Type(Type::String)
                && schema.min_length.is_none()
            {
                schema.min_length = Some(1);
            }
        }
    }

    let params = op.parameters.iter().flatten();
    let has_query = params.clone().any(|p| p.parameter_in == ParameterIn::Query);
    let has_path = params.clone().any(|p| p.parameter_in == ParameterIn::Path);
    let has_body = op.request_body.is_some();
    let caller = needs_caller(op);
    let no_storage = op
        .extensions
        .as_mut()
        .is_some_and(|e| e.remove(NO_STORAGE).is_some());
    if op.extensions.as_ref().is_some_and(|e| e.is_empty()) {
        op.extensions = None;
    }
    let mut bad_request = Vec::new();
    if has_body {
        bad_request.push("malformed JSON, or a body that cannot be read");
    }
    if has_query {
        bad_request.push(
            "a query string that does not deserialize (an unknown, repeated or mistyped parameter)",
        );
    }
    if has_path {
        bad_request.push("a path parameter that does not decode (e.g. invalid UTF-8)");
    }
    let responses = &mut op.responses.responses;
    let mut add = |status: &str, description: String| {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::T(Response::new(description)));
    };
    if !bad_request.is_empty() {
        add("400", capitalised(&bad_request.join("; ")));
    }
    if has_body {
        add("413", "The body exceeds the service's size limit".into());
        add(
            "415",
            "The body is not `Content-Type: application/json`".into(),
        );
        add(
            "422",
            "JSON of the wrong shape (a missing, unknown or mistyped field), or values out of \
             bounds"
                .into(),
        );
    }
    if caller {
        add(
            "401",
            format!(
                "No caller: `{USER_ID_HEADER}` is missing (no valid bearer token at the gateway)"
            ),
        );
    }
    add(
        "500",
        "An unexpected failure; the problem says only to quote the `x-request-id` response \
         header"
            .into(),
    );
    if !no_storage {
        add(
            "503",
            "The storage is overloaded or a dependency is unavailable; retry shortly".into(),
        );
    }

    for (status, response) in responses.iter_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        // Every error is a problem.
        if let Some(b'4' | b'5') = status.bytes().next() {
            response.content.clear();
            response.content.insert(
                crate::problem::CONTENT_TYPE.into(),
                Content::new(Some(Ref::from_schema_name(PROBLEM_SCHEMA))),
            );
        }
        for link in response.links.values_mut() {
            if let RefOr::T(link) = link {
                spell_link(link);
            }
        }
    }
}

/// utoipa 5.5 serialises a link's `operationId`, `operationRef` and `requestBody` in snake
/// case (`operation_id`…), which no client reads: they are moved to the link's extension
/// map, which is serialised flattened and as spelled.
fn spell_link(link: &mut Link) {
    let mut fields = Vec::new();
    for (name, value) in [
        ("operationId", std::mem::take(&mut link.operation_id)),
        ("operationRef", std::mem::take(&mut link.operation_ref)),
    ] {
        if !value.is_empty() {
            fields.push((name, serde_json::Value::from(value)));
        }
    }
    if let Some(body) = link.request_body.take() {
        fields.push(("requestBody", body));
    }
    if !fields.is_empty() {
        let extensions = link.extensions.get_or_insert_with(Default::default);
        for (name, value) in fields {
            extensions.insert(name.into(), value);
        }
    }
}

/// A string schema that is one of `values`, for string fields that hold an enumeration
/// (`#[schema(schema_with = ...)]` with a function returning this).
pub fn one_of(values: &[&str]) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.iter().copied()))
        .build()
}

/// [`one_of`], or `null` (an `Option` field that accepts `null` as absent).
pub fn one_of_or_null(values: &[&str]) -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some(
            values
                .iter()
                .map(|v| serde_json::Value::from(*v))
                .chain([serde_json::Value::Null]),
        ))
        .build()
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

fn string(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
}

fn count(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(
            utoipa::openapi::KnownFormat::Int64,
        )))
        .minimum(Some(0))
        .description(Some(description))
}

/// What [`Problem`](crate::Problem) serialises: the RFC 9457 members it sets, the extension
/// members the platform adds, and any other extension member a service adds.
fn problem_schema() -> Schema {
    ObjectBuilder::new()
        .description(Some(
            "RFC 9457 problem details: every error a client sees. Services add extension \
             members of their own (e.g. `reserved`, `unknown_products`, `current_status`).",
        ))
        .property(
            "type",
            string("`about:blank`, or a stable `urn:shopmesh:problem:<slug>`")
                .pattern(Some("^(about:blank|urn:shopmesh:problem:[a-z-]+)$")),
        )
        .required("type")
        .property(
            "title",
            string("Short, the same for every problem of a type"),
        )
        .required("title")
        .property(
            "status",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(SchemaFormat::KnownFormat(
                    utoipa::openapi::KnownFormat::Int32,
                )))
                .minimum(Some(400))
                .maximum(Some(599))
                .description(Some("The HTTP status, as answered")),
        )
        .required("status")
        .property("detail", string("This occurrence, written for the client"))
        .property(
            "errors",
            ArrayBuilder::new()
                .items(Ref::from_schema_name("FieldError"))
                .description(Some("422 `validation`: every field in error")),
        )
        .property(
            "limit_bytes",
            count("413: the body limit that was exceeded"),
        )
        .property(
            "retry_after",
            count("429: seconds until a request fits (also `Retry-After`)"),
        )
        .property(
            "retry_after_seconds",
            count("503: seconds after which to retry"),
        )
        .into()
}

fn field_error_schema() -> Schema {
    ObjectBuilder::new()
        .description(Some("One field in error"))
        .property(
            "field",
            string("The field, as a path (`items[0].quantity`)"),
        )
        .required("field")
        .property("message", string("What is wrong with it"))
        .required("message")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Problem;
    use crate::problem::FieldError;
    use http::StatusCode;

    #[test]
    fn links_are_spelled_as_openapi_does() {
        let mut link = Link::builder()
            .operation_id("get_thing")
            .parameter("id", "$response.body#/id")
            .build();
        spell_link(&mut link);
        assert_eq!(
            serde_json::to_value(&link).unwrap(),
            serde_json::json!({"operationId": "get_thing", "parameters": {"id": "$response.body#/id"}})
        );
    }

    #[derive(serde::Deserialize, utoipa::ToSchema)]
    #[allow(dead_code)]
    struct Thing {
        name: String,
    }

    /// A body, a caller, a query parameter and an undeclared path parameter.
    #[utoipa::path(post, path = "/things/{id}", request_body = Thing,
        params(("dry_run" = Option<bool>, Query)),
        security(("gatewayIdentity" = [])),
        responses((status = 201, links(("get" = (operation_id = "get_thing",
                                                 parameters(("id" = "$response.body#/id")))))),
                  (status = 404, description = "No such thing")))]
    #[allow(dead_code)]
    fn put_thing() {}

    /// Optional caller, no storage.
    #[utoipa::path(get, path = "/things/{id}", params(("id" = String, Path)),
        security((), ("gatewayIdentity" = [])),
        extensions(("x-shopmesh-no-storage" = json!(true))),
        responses((status = 200)))]
    #[allow(dead_code)]
    fn get_thing() {}

    #[derive(utoipa::OpenApi)]
    #[openapi(paths(put_thing, get_thing), modifiers(&Conventions))]
    struct Doc;

    #[test]
    fn conventions() {
        use utoipa::OpenApi as _;
        let doc = serde_json::to_value(Doc::openapi()).unwrap();
        let put = &doc["paths"]["/things/{id}"]["post"];
        let statuses: Vec<&str> = put["responses"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            statuses,
            [
                "201", "400", "401", "404", "413", "415", "422", "500", "503"
            ]
        );
        assert_eq!(
            put["responses"]["404"]["content"]["application/problem+json"]["schema"]["$ref"],
            "#/components/schemas/Problem"
        );
        assert_eq!(
            put["responses"]["201"]["links"]["get"]["operationId"],
            "get_thing"
        );
        let params = put["parameters"].as_array().unwrap();
        assert_eq!(params[0]["schema"]["type"], "boolean", "never null");
        assert_eq!(params[1]["name"], "id");
        assert_eq!(params[1]["in"], "path");
        assert_eq!(params[1]["required"], true);
        assert_eq!(params[1]["schema"]["minLength"], 1);

        let get = &doc["paths"]["/things/{id}"]["get"];
        let statuses: Vec<&str> = get["responses"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(statuses, ["200", "400", "500"], "no 401, no 503");
        assert!(get.get(NO_STORAGE).is_none());
        assert_eq!(get["parameters"][0]["schema"]["minLength"], 1);

        let scheme = &doc["components"]["securitySchemes"][SECURITY_SCHEME];
        assert_eq!(scheme["type"], "apiKey");
        assert_eq!(scheme["in"], "header");
        assert_eq!(scheme["name"], USER_ID_HEADER);
        assert!(doc["components"]["schemas"][PROBLEM_SCHEMA].is_object());
    }

    #[test]
    fn template_parameters() {
        assert_eq!(
            template_params("/api/payments/{id}/capture").collect::<Vec<_>>(),
            ["id"]
        );
        assert_eq!(template_params("/api/products").count(), 0);
    }

    #[test]
    fn the_problem_schema_has_what_is_served() {
        let RefOr::T(Schema::Object(schema)) = RefOr::T(problem_schema()) else {
            panic!("an object schema");
        };
        let served = [
            Problem::validation(vec![FieldError::new("a", "b")]),
            Problem::payload_too_large(10),
            Problem::too_many_requests(3),
            Problem::new(StatusCode::METHOD_NOT_ALLOWED).detail("x"),
            Problem::from(sqlx::Error::PoolTimedOut),
        ];
        for p in served {
            let v = serde_json::to_value(&p).unwrap();
            for (member, value) in v.as_object().unwrap() {
                assert!(
                    schema.properties.contains_key(member),
                    "{member} is served but not in the schema"
                );
                if member == "status" {
                    assert!((400..=599).contains(&value.as_u64().unwrap()));
                }
            }
            for member in &schema.required {
                assert!(v.get(member).is_some(), "{member} is required");
            }
        }
    }
}
