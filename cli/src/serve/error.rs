//! Errors as OpenAI clients expect them: `{"error": {"message", "type", "code"}}` with the right status.

use axum::extract::rejection::JsonRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use usine_executor::ExecutorError;

/// An error response.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    code: &'static str,
    /// Seconds after which a retry may succeed (429).
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>, code: &'static str) -> Self {
        Self { status, message: message.into(), code, retry_after: None }
    }

    pub(crate) fn unavailable(message: impl Into<String>, code: &'static str) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message, code)
    }

    /// A value outside its limit: 422, naming the limit.
    pub(crate) fn out_of_range(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message, "invalid_parameter")
    }

    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// The OpenAI error type of the status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            status if status.is_client_error() => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// The body, also sent as the last event of a stream that fails after it started.
    pub(crate) fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": { "message": self.message, "type": self.kind(), "code": self.code } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<ExecutorError> for ApiError {
    fn from(error: ExecutorError) -> Self {
        // Parameters outside their limits, refused at submission: named as the request's own.
        if let ExecutorError::InvalidRequest {
            source: source @ usine_engine::EngineError::InvalidParams { .. }, ..
        } = &error
        {
            return Self::out_of_range(source.to_string());
        }
        let message = error.to_string();
        // A model that can never load is not a passing outage: no retry will mend it.
        if let ExecutorError::Kernel(
            usine_kernel::KernelError::TooLarge { .. } | usine_kernel::KernelError::UnknownEngine { .. },
        ) = &error
        {
            return Self::new(StatusCode::INTERNAL_SERVER_ERROR, message, "model_unusable");
        }
        let status = match error.code() {
            "queue_full" => {
                return Self {
                    retry_after: Some(1),
                    ..Self::new(StatusCode::TOO_MANY_REQUESTS, message, "queue_full")
                };
            }
            "too_many_streams" => {
                return Self {
                    retry_after: Some(1),
                    ..Self::new(StatusCode::TOO_MANY_REQUESTS, message, "too_many_streams")
                };
            }
            "timeout" => StatusCode::GATEWAY_TIMEOUT,
            "unknown_model" => return Self::new(StatusCode::NOT_FOUND, message, "model_not_found"),
            "invalid_request" => StatusCode::UNPROCESSABLE_ENTITY,
            "model_unavailable" | "out_of_memory" | "shutting_down" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, message, error.code())
    }
}

impl From<usine_kernel::KernelError> for ApiError {
    fn from(error: usine_kernel::KernelError) -> Self {
        ExecutorError::from(error).into()
    }
}

/// Fails with 404 unless `id` names a model of the catalog, showing at most 64 characters of it: an
/// id is the client's text, of any length (no id reaches a path either: ids are looked up).
pub(crate) fn known_model(state: &super::Shared, id: &str) -> Result<(), ApiError> {
    if state.app.kernel.engine_for(id).is_ok() {
        return Ok(());
    }
    let shown: String = id.chars().take(64).collect();
    let known: Vec<&str> = state.app.catalog.models.iter().map(|model| model.id.as_str()).collect();
    let message = format!("unknown model `{shown}` (known: {})", known.join(", "));
    Err(ApiError::new(StatusCode::NOT_FOUND, message, "model_not_found"))
}

/// A query string that does not read: 400, in the OpenAI error shape.
pub(crate) fn bad_query(rejection: &axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text(), "malformed_request")
}

/// A body that is not the JSON asked for: 413 when too large (naming the limit), 415 when not JSON,
/// else 400.
pub(crate) fn rejected(rejection: JsonRejection, state: &super::Shared) -> ApiError {
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            let limit = state.loaded.config.max_body_bytes;
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than the limit of {limit} bytes"),
                "body_too_large",
            )
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, rejection.body_text(), "unsupported_media_type")
        }
        _ => ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text(), "malformed_request"), // bad JSON, or the wrong shape
    }
}
