//! Extractors whose rejections are problem+json: malformed JSON → 400, wrong content type →
//! 415, well-formed JSON of the wrong shape → 422, body over the limit → 413.

use axum::extract::FromRequest;
use axum::extract::FromRequestParts;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::response::{IntoResponse, Response};
use http::StatusCode;

use crate::problem::Problem;

/// `axum::Json` with problem+json rejections; also the response type for JSON bodies.
#[derive(Debug, Clone, Copy, Default, FromRequest)]
#[from_request(via(axum::Json), rejection(Problem))]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Path` with problem+json rejections.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(Problem))]
pub struct Path<T>(pub T);

/// `axum::extract::Query` with problem+json rejections.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(Problem))]
pub struct Query<T>(pub T);

impl From<JsonRejection> for Problem {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonDataError(e) => Problem::typed(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                "The request is not valid",
            )
            .detail(e.body_text()),
            JsonRejection::JsonSyntaxError(e) => {
                Problem::typed(StatusCode::BAD_REQUEST, "malformed-json", "Malformed JSON")
                    .detail(e.body_text())
            }
            JsonRejection::MissingJsonContentType(_) => {
                Problem::unsupported_media_type("expected `Content-Type: application/json`")
            }
            JsonRejection::BytesRejection(e) => {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    Problem::typed(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload-too-large",
                        "Payload too large",
                    )
                    .detail("the request body exceeds the size limit")
                } else {
                    Problem::bad_request("the request body could not be read")
                }
            }
            other => Problem::new(other.status()).detail(other.body_text()),
        }
    }
}

impl From<PathRejection> for Problem {
    fn from(r: PathRejection) -> Self {
        Problem::bad_request(r.body_text())
    }
}

impl From<QueryRejection> for Problem {
    fn from(r: QueryRejection) -> Self {
        Problem::bad_request(r.body_text())
    }
}
