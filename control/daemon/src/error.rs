//! One error type for every API answer: each variant has a status and a JSON body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use flynn_client::{ErrorBody, ErrorCode};
use flynn_state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    TooManyRequests(String),
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
    /// The client was too slow sending its request.
    #[error("{0}")]
    Timeout(String),
    /// The disk ran out of room; nothing was kept.
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The state machine refused the command: sending it again would be refused again.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ApiError::Invalid(_) | ApiError::NotFound(_) | ApiError::Conflict(_)
        )
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::Invalid(_) => ErrorCode::Invalid,
            ApiError::Unauthorized(_) => ErrorCode::Unauthorized,
            ApiError::Forbidden(_) => ErrorCode::Forbidden,
            ApiError::TooManyRequests(_) => ErrorCode::TooManyRequests,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::Conflict(_) => ErrorCode::Conflict,
            ApiError::TooLarge(_) => ErrorCode::TooLarge,
            ApiError::VersionMismatch(_) => ErrorCode::VersionMismatch,
            ApiError::Unavailable(_) => ErrorCode::Unavailable,
            ApiError::UnknownOutcome(_) => ErrorCode::UnknownOutcome,
            ApiError::Timeout(_) => ErrorCode::Timeout,
            ApiError::InsufficientStorage(_) => ErrorCode::InsufficientStorage,
            ApiError::Internal(_) => ErrorCode::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code().status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.code(),
            message: self.to_string(),
        }
    }

    /// Rebuilds the error a remote host answered with.
    pub fn from_body(body: ErrorBody) -> Self {
        let m = body.message;
        match body.error {
            ErrorCode::Invalid => ApiError::Invalid(m),
            ErrorCode::Unauthorized => ApiError::Unauthorized(m),
            ErrorCode::Forbidden => ApiError::Forbidden(m),
            ErrorCode::TooManyRequests => ApiError::TooManyRequests(m),
            ErrorCode::NotFound => ApiError::NotFound(m),
            ErrorCode::Conflict => ApiError::Conflict(m),
            ErrorCode::TooLarge => ApiError::TooLarge(m),
            ErrorCode::VersionMismatch => ApiError::VersionMismatch(m),
            ErrorCode::Unavailable => ApiError::Unavailable(m),
            ErrorCode::UnknownOutcome => ApiError::UnknownOutcome(m),
            ErrorCode::Timeout => ApiError::Timeout(m),
            ErrorCode::InsufficientStorage => ApiError::InsufficientStorage(m),
            ErrorCode::Internal | ErrorCode::Other(_) => ApiError::Internal(m),
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

impl From<flynn_state::UnexpectedResponse> for ApiError {
    fn from(e: flynn_state::UnexpectedResponse) -> Self {
        ApiError::Internal(e.to_string())
    }
}
