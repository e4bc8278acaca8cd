//! Request bodies of the API: their size limit, how long they may take to arrive, and a
//! JSON extractor whose refusals are JSON errors.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest request body the controller API accepts.
pub const MAX_API_BODY: usize = 1024 * 1024;
/// Longest a request body may take to arrive, whole.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// JSON body whose rejections are JSON errors too (axum's own answer plain text). The body
/// must arrive whole within [`BODY_TIMEOUT`].
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let read = Bytes::from_request(req, state);
        let bytes = tokio::time::timeout(BODY_TIMEOUT, read)
            .await
            .map_err(|_| {
                ApiError::Timeout(format!(
                    "the request body did not arrive within {}s",
                    BODY_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::TooLarge(format!(
                        "request body is over the {MAX_API_BODY} byte limit"
                    ))
                } else {
                    ApiError::Invalid(format!("cannot read request body: {e}"))
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::Invalid(format!("malformed JSON body: {e}")))
    }
}
