//! The server's boundary error and the one place that renders the error envelope.
//!
//! Handlers and extractors return [`ApiError`]; its `IntoResponse` only parks it in the
//! response's extensions. The [`crate::middleware::request_context`] middleware, which knows
//! the request id and the deployment's error style and overrides, renders every error there,
//! including the ones axum produces itself (unknown method, oversized body).

use std::borrow::Cow;
use std::collections::HashMap;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keyward_core::ErrorCode;
use keyward_store::StoreError;
use serde::Serialize;

use crate::config::{CodeOverride, ErrorStyle, ErrorsConfig};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    /// Replaces the code's default message; must never contain a secret.
    pub message: Option<Cow<'static, str>>,
    /// The request field at fault, e.g. `allowed_ips[2]`.
    pub param: Option<String>,
    pub retry_after: Option<u64>,
    /// What went wrong inside, for the log only; clients never see it.
    pub cause: Option<String>,
    /// Headers the error response carries (rate-limit headers on a 429).
    pub headers: Option<Box<axum::http::HeaderMap>>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub const fn new(code: ErrorCode) -> Self {
        Self {
            code,
            message: None,
            param: None,
            retry_after: None,
            cause: None,
            headers: None,
        }
    }

    pub fn with_message(mut self, message: impl Into<Cow<'static, str>>) -> Self {
        self.message = Some(message.into());
        self
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_cause(mut self, cause: impl std::fmt::Display) -> Self {
        self.cause = Some(cause.to_string());
        self
    }

    /// 422 naming the field at fault.
    pub fn validation(param: impl Into<String>, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::ValidationFailed)
            .with_param(param)
            .with_message(message)
    }

    pub fn not_found(what: &'static str) -> Self {
        Self::new(ErrorCode::NotFound).with_message(format!("No such {what}."))
    }

    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::InternalError).with_cause(cause)
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The message a CLI user or a log reader sees.
    pub fn message(&self) -> &str {
        self.message
            .as_deref()
            .unwrap_or(self.code.default_message())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message(), self.code)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.status().into_response();
        response.extensions_mut().insert(self);
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => Self::new(ErrorCode::NotFound),
            StoreError::Conflict(_) => Self::new(ErrorCode::AlreadyExists).with_cause(error),
            StoreError::Unavailable(_) => Self::new(ErrorCode::StoreUnavailable).with_cause(error),
            StoreError::Corrupt(_) | StoreError::Unsupported(_) => Self::internal(error),
        }
    }
}

/// The code an error response from outside our handlers (axum, tower) stands for.
pub fn code_for_status(status: StatusCode) -> ErrorCode {
    match status.as_u16() {
        404 => ErrorCode::NotFound,
        405 => ErrorCode::MethodNotAllowed,
        413 => ErrorCode::PayloadTooLarge,
        415 => ErrorCode::UnsupportedMediaType,
        422 => ErrorCode::ValidationFailed,
        401 => ErrorCode::MissingCredentials,
        429 => ErrorCode::RateLimitExceeded,
        503 => ErrorCode::StoreUnavailable,
        400..=499 => ErrorCode::InvalidRequest,
        _ => ErrorCode::InternalError,
    }
}

#[derive(Serialize)]
struct NestedEnvelope<'a> {
    error: NestedError<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
}

#[derive(Serialize)]
struct NestedError<'a> {
    r#type: &'static str,
    code: &'a str,
    message: &'a str,
    retryable: bool,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    param: Option<&'a str>,
}

#[derive(Serialize)]
struct FlatEnvelope<'a> {
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    param: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
    request_id: &'a str,
}

/// Renders envelopes in the deployment's style, with its per-code overrides.
#[derive(Debug, Clone)]
pub struct ErrorRenderer {
    style: ErrorStyle,
    overrides: HashMap<ErrorCode, CodeOverride>,
}

impl ErrorRenderer {
    pub fn new(config: &ErrorsConfig) -> Self {
        Self {
            style: config.style,
            overrides: config.codes.clone(),
        }
    }

    pub fn body(&self, error: &ApiError, request_id: &str) -> String {
        let o = self.overrides.get(&error.code);
        let code = o
            .and_then(|o| o.code.as_deref())
            .unwrap_or(error.code.as_str());
        let message = o
            .and_then(|o| o.message.as_deref())
            .unwrap_or(error.message());
        let param = error.param.as_deref();
        let body = match self.style {
            ErrorStyle::Nested => serde_json::to_string(&NestedEnvelope {
                error: NestedError {
                    r#type: error.code.error_type().as_str(),
                    code,
                    message,
                    retryable: error.code.retryable(),
                    request_id,
                    param,
                },
                retry_after: error.retry_after,
            }),
            ErrorStyle::Flat => serde_json::to_string(&FlatEnvelope {
                error: code,
                message,
                param,
                retry_after: error.retry_after,
                request_id,
            }),
        };
        // Serialising plain strings and numbers cannot fail; keep a valid envelope regardless.
        body.unwrap_or_else(|_| {
            String::from(r#"{"error":{"type":"api_error","code":"internal_error"}}"#)
        })
    }

    pub fn render(&self, error: &ApiError, request_id: &str) -> Response {
        let body = self.body(error, request_id);
        let mut response = (error.status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if error.code.status() == 401 {
            let challenge = if error.code == ErrorCode::MissingCredentials {
                "Bearer realm=\"keyward\""
            } else {
                "Bearer realm=\"keyward\", error=\"invalid_token\""
            };
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if let Some(secs) = error.retry_after {
            headers.insert(header::RETRY_AFTER, crate::limits::number_value(secs));
        }
        if let Some(extra) = &error.headers {
            for (name, value) in extra.iter() {
                headers.insert(name.clone(), value.clone());
            }
        }
        response
    }
}
