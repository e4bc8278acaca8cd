//! One error type for every API answer: each variant has a status and a JSON body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use flynn_client::ErrorBody;
use flynn_state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    VersionMismatch(String),
    /// No leader could be reached in time; nothing was written.
    #[error("{0}")]
    Unavailable(String),
    /// A write was sent but its fate is not known (the leader went away mid-request).
    #[error("{0}")]
    UnknownOutcome(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) | ApiError::VersionMismatch(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UnknownOutcome(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid(_) => "invalid",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge(_) => "too_large",
            ApiError::VersionMismatch(_) => "version_mismatch",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::UnknownOutcome(_) => "unknown_outcome",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.code().to_string(),
            message: self.to_string(),
        }
    }

    /// Rebuilds the error a remote host answered with.
    pub fn from_body(body: ErrorBody) -> Self {
        let m = body.message;
        match body.error.as_str() {
            "invalid" => ApiError::Invalid(m),
            "unauthorized" => ApiError::Unauthorized(m),
            "not_found" => ApiError::NotFound(m),
            "conflict" => ApiError::Conflict(m),
            "too_large" => ApiError::TooLarge(m),
            "version_mismatch" => ApiError::VersionMismatch(m),
            "unavailable" => ApiError::Unavailable(m),
            "unknown_outcome" => ApiError::UnknownOutcome(m),
            _ => ApiError::Internal(m),
        }
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Invalid(m) => ApiError::Invalid(m),
            StateError::NotFound(m) => ApiError::NotFound(format!("{m} not found")),
            StateError::Conflict(m) => ApiError::Conflict(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, ApiError::Internal(_)) {
            tracing::error!(error = %self, "internal error");
        }
        (self.status(), Json(self.body())).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
