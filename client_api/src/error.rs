//! Turning errors into Matrix error responses — the one place it happens for the client API.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use myelin_core::{Error, ErrorKind};
use serde_json::json;

/// A handler error: a core error rendered as `{"errcode", "error"}` with the spec's status.
#[derive(Debug)]
pub struct ApiError(pub Error);

pub type ApiResult<T> = Result<T, ApiError>;

impl<E: Into<Error>> From<E> for ApiError {
    fn from(e: E) -> Self {
        ApiError(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = self.0.kind();
        if matches!(self.0, Error::Database(_) | Error::Internal(_)) {
            tracing::error!(error = %self.0, "request failed");
        }
        let mut body = json!({ "errcode": kind.errcode(), "error": self.0.message() });
        if let ErrorKind::UnknownToken { soft_logout } = kind {
            body["soft_logout"] = json!(soft_logout);
        }
        let status =
            StatusCode::from_u16(kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(body)).into_response()
    }
}

/// A Matrix error with a status the core error kinds do not pair with its errcode (e.g. 405
/// `M_BAD_JSON`, 409 `M_UNKNOWN`).
pub fn matrix_error(status: StatusCode, errcode: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "errcode": errcode, "error": message })),
    )
        .into_response()
}

/// Shorthand for a Matrix error result.
pub fn err<T>(kind: ErrorKind, message: impl Into<String>) -> ApiResult<T> {
    Err(ApiError(Error::new(kind, message)))
}
