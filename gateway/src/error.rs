//! The gateway's errors and their OpenAI form: an HTTP status and the body
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use faasmoe_proto::generate::{ClientError, ClientErrorCode};
use serde_json::json;

/// A failed HTTP request. Every variant maps to one status and OpenAI error `type`; `code`
/// carries faasmoe's wire code (`bad_request`, `quota_exceeded`, `unavailable`, `internal`)
/// or OpenAI's (`invalid_api_key`, `model_not_found`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not valid JSON, a field is invalid or unsupported, the prompt does
    /// not fit, the chat template refused the messages.
    #[error("{message}")]
    BadRequest {
        /// What is wrong.
        message: String,
        /// The offending field, when known.
        param: Option<String>,
    },
    /// 401: no `Authorization: Bearer` header, or a key that no tenant holds.
    #[error("{0}")]
    Unauthorized(String),
    /// 404: the `model` is not served here.
    #[error("the model `{0}` does not exist or is not served by this gateway")]
    ModelNotFound(String),
    /// 404: no such route.
    #[error("no route {0}")]
    NoRoute(String),
    /// 429 with `Retry-After`: the tenant's quota refused the request.
    #[error("{message}")]
    QuotaExceeded {
        /// The quota's explanation.
        message: String,
        /// Seconds for `Retry-After`.
        retry_after_s: u64,
    },
    /// 503: no controller answers, no expert function could be activated, the tenant store
    /// cannot be read.
    #[error("{0}")]
    Unavailable(String),
    /// 500: anything else.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 about `param`.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// A 400 without a parameter.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotFound(_) | ApiError::NoRoute(_) => StatusCode::NOT_FOUND,
            ApiError::QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error object (the value of `"error"`).
    pub fn body(&self) -> serde_json::Value {
        let (kind, code) = match self {
            ApiError::BadRequest { .. } => ("invalid_request_error", "bad_request"),
            ApiError::Unauthorized(_) => ("invalid_request_error", "invalid_api_key"),
            ApiError::ModelNotFound(_) => ("invalid_request_error", "model_not_found"),
            ApiError::NoRoute(_) => ("invalid_request_error", "not_found"),
            ApiError::QuotaExceeded { .. } => ("rate_limit_error", "quota_exceeded"),
            ApiError::Unavailable(_) => ("service_unavailable_error", "unavailable"),
            ApiError::Internal(_) => ("server_error", "internal"),
        };
        let param = match self {
            ApiError::BadRequest { param, .. } => param.clone(),
            ApiError::ModelNotFound(_) => Some("model".into()),
            _ => None,
        };
        json!({"message": self.to_string(), "type": kind, "param": param, "code": code})
    }

    /// Maps a controller's typed error; `retry_after_s` goes to `Retry-After` for
    /// `quota_exceeded`.
    pub fn from_client(e: ClientError, retry_after_s: u64) -> Self {
        match e.code {
            ClientErrorCode::BadRequest => ApiError::bad_request(e.message),
            ClientErrorCode::QuotaExceeded => ApiError::QuotaExceeded {
                message: e.message,
                retry_after_s,
            },
            ClientErrorCode::Unavailable => ApiError::Unavailable(e.message),
            ClientErrorCode::Internal => ApiError::Internal(e.message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status(), axum::Json(json!({ "error": self.body() }))).into_response();
        if let ApiError::QuotaExceeded { retry_after_s, .. } = &self {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_the_openai_shape_and_status() {
        let e = ApiError::from_client(
            ClientError {
                code: ClientErrorCode::QuotaExceeded,
                message: "total_tokens".into(),
            },
            7,
        );
        assert_eq!(e.status(), StatusCode::TOO_MANY_REQUESTS);
        let r = e.clone().into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        let b = e.body();
        assert_eq!(
            (
                b["type"].as_str(),
                b["code"].as_str(),
                b["message"].as_str()
            ),
            (
                Some("rate_limit_error"),
                Some("quota_exceeded"),
                Some("total_tokens")
            )
        );
        assert!(b["param"].is_null());
        assert_eq!(ApiError::bad_param("n", "x").body()["param"], "n");
        assert_eq!(
            ApiError::ModelNotFound("m".into()).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            ApiError::Unavailable("x".into()).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
