//! Each MariaDB resource's own database and user.

use crate::error::{ApiError, ApiResult};
use crate::host::Host;

pub async fn create(_host: &Host, _name: &str, _password: &str) -> ApiResult<()> {
    Err(ApiError::Unavailable(
        "MariaDB resources are not provided yet".into(),
    ))
}

pub async fn drop(_host: &Host, _name: &str) -> ApiResult<()> {
    Ok(())
}
