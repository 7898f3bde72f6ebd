//! API errors and the one place they become an HTTP status and a JSON body.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::catalog::CatalogError;

/// Why an API request failed. [`IntoResponse`] maps each kind to its status and the body
/// `{"error": "<message>"}` (plus `"field"` for invalid input).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A field with an unacceptable value (400).
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field, as named in the request.
        field: String,
        /// Why.
        reason: String,
    },
    /// A request that is not understood at all, e.g. not JSON (400).
    #[error("{0}")]
    BadRequest(String),
    /// A token is needed and none was given (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Wrong secret, or a token without the right (403).
    #[error("{0}")]
    Forbidden(String),
    /// Unknown service, instance or path (404).
    #[error("{0}")]
    NotFound(String),
    /// The method is not allowed on this path (405).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request conflicts with the catalog, e.g. another service port (409).
    #[error("{0}")]
    Conflict(String),
    /// The body is larger than `api.max_body_bytes` (413).
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// The body is not `application/json` (415).
    #[error("request body must be application/json")]
    UnsupportedMediaType,
    /// The client is over its rate limit (429).
    #[error("rate limit exceeded; retry in {retry_after_secs} s")]
    RateLimited {
        /// Seconds until a request will be accepted again.
        retry_after_secs: u64,
    },
    /// Out of capacity (no VIP, port or slot left) or shutting down (503).
    #[error("{0}")]
    Unavailable(String),
    /// Something failed inside NetSel (500).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        let message = e.to_string();
        match e {
            CatalogError::InvalidName(_) => ApiError::invalid("name", message),
            CatalogError::Invalid { field, reason } => {
                // The catalog calls the endpoint `endpoint`; the API sends address + port.
                let field = match field {
                    "endpoint" => "address",
                    "ttl" => "ttl_secs",
                    other => other,
                };
                ApiError::invalid(field, reason)
            }
            CatalogError::UnknownInstance(_)
            | CatalogError::UnknownService(_)
            | CatalogError::OwnedElsewhere { .. } => ApiError::NotFound(message),
            CatalogError::WrongSecret(_) | CatalogError::NotOwner { .. } => {
                ApiError::Forbidden(message)
            }
            CatalogError::PortConflict { .. } => ApiError::Conflict(message),
            CatalogError::Full(_)
            | CatalogError::Network(_)
            | CatalogError::Unavailable(_)
            | CatalogError::Store(crate::store::StoreError::Unavailable(_)) => {
                ApiError::Unavailable(message)
            }
            CatalogError::Store(_) => {
                tracing::error!(error = %message, "catalog write not persisted");
                ApiError::Internal(message)
            }
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let field = match &self {
            ApiError::Invalid { field, .. } => Some(field.as_str()),
            _ => None,
        };
        let body = ErrorBody {
            error: self.to_string(),
            field,
        };
        let mut response = (status, Json(body)).into_response();
        if let ApiError::RateLimited { retry_after_secs } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_errors_map_to_fitting_statuses() {
        let cases = [
            (
                CatalogError::Invalid {
                    field: "weight",
                    reason: "x".into(),
                },
                400,
            ),
            (CatalogError::UnknownService("a".into()), 404),
            (CatalogError::UnknownInstance("a".into()), 404),
            (CatalogError::WrongSecret("a".into()), 403),
            (
                CatalogError::PortConflict {
                    service: "a".into(),
                    existing: 1,
                    requested: 2,
                },
                409,
            ),
            (CatalogError::Full(1), 503),
        ];
        for (e, status) in cases {
            assert_eq!(ApiError::from(e).status().as_u16(), status);
        }
    }
}
