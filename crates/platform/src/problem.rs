//! RFC 9457 problem details. Every error a client sees is built here and nowhere else.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use serde_json::{Map, Value};

const RESERVED: [&str; 5] = ["type", "title", "status", "detail", "instance"];

pub const CONTENT_TYPE: &str = "application/problem+json";

/// A problem+json response. Internal details never go into it: `detail` is written for the
/// client, and server-side causes are logged where they happen.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    #[serde(serialize_with = "ser_status")]
    pub status: StatusCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(flatten)]
    pub extensions: Map<String, Value>,
}

fn ser_status<S: serde::Serializer>(s: &StatusCode, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_u16(s.as_u16())
}

impl Problem {
    pub fn new(status: StatusCode) -> Self {
        Self {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status,
            detail: None,
            extensions: Map::new(),
        }
    }

    /// A problem with a stable machine-readable type (`urn:shopmesh:problem:<slug>`).
    pub fn typed(status: StatusCode, slug: &str, title: impl Into<String>) -> Self {
        Self {
            kind: format!("urn:shopmesh:problem:{slug}"),
            title: title.into(),
            ..Self::new(status)
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds an extension member. The standard members (`type`, `title`, `status`, `detail`,
    /// `instance`) cannot be overridden this way.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        debug_assert!(
            !RESERVED.contains(&key),
            "`{key}` is a standard problem member"
        );
        if !RESERVED.contains(&key) {
            self.extensions.insert(key.into(), value.into());
        }
        self
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::typed(StatusCode::BAD_REQUEST, "bad-request", "Bad request").detail(detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::typed(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized").detail(detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::typed(StatusCode::FORBIDDEN, "forbidden", "Forbidden").detail(detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::typed(StatusCode::NOT_FOUND, "not-found", "Not found").detail(detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::typed(StatusCode::CONFLICT, "conflict", "Conflict").detail(detail)
    }
    pub fn payload_too_large(limit: usize) -> Self {
        Self::typed(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Payload too large",
        )
        .detail(format!(
            "the request body exceeds the limit of {limit} bytes"
        ))
        .with("limit_bytes", limit)
    }
    pub fn unsupported_media_type(detail: impl Into<String>) -> Self {
        Self::typed(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
        )
        .detail(detail)
    }
    /// 422 with per-field errors: `errors: [{"field": .., "message": ..}]`.
    pub fn validation(errors: Vec<FieldError>) -> Self {
        let detail = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        Self::typed(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            "The request is not valid",
        )
        .detail(detail)
        .with("errors", serde_json::to_value(errors).unwrap_or_default())
    }
    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::typed(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable",
            "The request cannot be processed",
        )
        .detail(detail)
    }
    /// An unexpected server-side failure. The cause is logged here; the client learns nothing
    /// of it beyond the request id it can quote.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::typed(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal server error",
        )
        .detail("an unexpected error occurred; quote the x-request-id header when reporting it")
    }
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::typed(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
        )
        .detail(detail)
    }
    /// 429 with the seconds until a request fits (sent as `Retry-After` too).
    /// 412: an `If-Match` (or other precondition) no longer holds.
    pub fn precondition_failed(detail: impl Into<String>) -> Self {
        Self::typed(
            StatusCode::PRECONDITION_FAILED,
            "precondition-failed",
            "Precondition failed",
        )
        .detail(detail)
    }

    pub fn too_many_requests(retry_after_secs: u64) -> Self {
        Self::typed(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
        )
        .detail("the rate limit for this route is exhausted; retry after the indicated delay")
        .with("retry_after", retry_after_secs)
    }
    pub fn bad_gateway(detail: impl Into<String>) -> Self {
        Self::typed(StatusCode::BAD_GATEWAY, "bad-gateway", "Bad gateway").detail(detail)
    }
    pub fn gateway_timeout(detail: impl Into<String>) -> Self {
        Self::typed(
            StatusCode::GATEWAY_TIMEOUT,
            "gateway-timeout",
            "Gateway timeout",
        )
        .detail(detail)
    }

    /// The serialized body (for callers that are not axum handlers, e.g. the gateway).
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.title)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problem {}

impl Problem {
    /// The headers every problem response carries (its content type, and the challenge of a
    /// 401), for axum handlers and the gateway alike.
    pub fn headers(&self) -> Vec<(header::HeaderName, HeaderValue)> {
        let mut h = vec![(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))];
        if self.status == StatusCode::UNAUTHORIZED {
            h.push((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        if let Some(secs) = self.extensions.get("retry_after").and_then(Value::as_u64) {
            h.push((header::RETRY_AFTER, HeaderValue::from(secs)));
        }
        h
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut res = (self.status, self.to_body()).into_response();
        for (name, value) in self.headers() {
            res.headers_mut().insert(name, value);
        }
        res
    }
}

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut => {
                tracing::warn!(error = %e, "database pool exhausted");
                Problem::unavailable("the service is overloaded; retry shortly")
                    .with("retry_after_seconds", 1)
            }
            _ => Problem::internal(&e),
        }
    }
}
