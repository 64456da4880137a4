//! The one table of error codes: every code keyward answers with, its type, its HTTP status,
//! whether a client may retry, and its default message. Deployments may rename a code or
//! replace its message (`[errors.codes.<code>]`); that happens where the envelope is rendered.

use std::fmt;

/// The `type` member of the error envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    InvalidRequest,
    Authentication,
    Permission,
    RateLimit,
    NotFound,
    Api,
}

impl ErrorType {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request_error",
            Self::Authentication => "authentication_error",
            Self::Permission => "permission_error",
            Self::RateLimit => "rate_limit_error",
            Self::NotFound => "not_found_error",
            Self::Api => "api_error",
        }
    }
}

macro_rules! error_codes {
    ($($variant:ident => $code:literal, $ty:ident, $status:literal, $retryable:literal, $message:literal;)*) => {
        /// Every error code keyward answers with.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode { $($variant),* }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            pub const fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $code),* }
            }
            pub const fn error_type(self) -> ErrorType {
                match self { $(Self::$variant => ErrorType::$ty),* }
            }
            pub const fn status(self) -> u16 {
                match self { $(Self::$variant => $status),* }
            }
            pub const fn retryable(self) -> bool {
                match self { $(Self::$variant => $retryable),* }
            }
            pub const fn default_message(self) -> &'static str {
                match self { $(Self::$variant => $message),* }
            }
            pub fn from_code(code: &str) -> Option<Self> {
                match code { $($code => Some(Self::$variant),)* _ => None }
            }
        }
    };
}

error_codes! {
    // Authentication (DESIGN.md section 2, steps 1 and 2).
    MissingCredentials => "missing_credentials", Authentication, 401, false, "No API key was provided. Send it as `Authorization: Bearer <key>`.";
    InvalidApiKey => "invalid_api_key", Authentication, 401, false, "Invalid or expired API key.";
    AmbiguousCredentials => "ambiguous_credentials", Authentication, 401, false, "The request carries two different credentials; send exactly one.";
    KeyRevoked => "key_revoked", Authentication, 401, false, "This API key has been revoked.";
    KeyExpired => "key_expired", Authentication, 401, false, "This API key has expired.";
    ExpiredToken => "expired_token", Authentication, 401, false, "The token has expired; exchange your API key for a new one.";
    InvalidToken => "invalid_token", Authentication, 401, false, "The token is invalid.";
    // Authorisation (steps 3 to 5).
    IpNotAllowed => "ip_not_allowed", Permission, 403, false, "Requests from this IP address are not allowed for this key.";
    EndpointNotAllowed => "endpoint_not_allowed", Permission, 403, false, "This key is restricted to another endpoint.";
    InsufficientScope => "insufficient_scope", Authentication, 403, false, "This key lacks the scope this endpoint requires.";
    HttpsRequired => "https_required", Permission, 403, false, "Plain HTTP is refused; use HTTPS.";
    // Limits (steps 6 and 7).
    RateLimitExceeded => "rate_limit_exceeded", RateLimit, 429, true, "Too many requests.";
    UsageExhausted => "usage_exhausted", RateLimit, 429, false, "This key has no remaining credits.";
    // Request shape.
    InvalidJson => "invalid_json", InvalidRequest, 400, false, "The request body is not valid JSON.";
    UnknownField => "unknown_field", InvalidRequest, 400, false, "The request body has a field this endpoint does not accept.";
    InvalidRequest => "invalid_request", InvalidRequest, 400, false, "The request is invalid.";
    ValidationFailed => "validation_failed", InvalidRequest, 422, false, "A field has an invalid value.";
    ScopesImmutable => "scopes_immutable", InvalidRequest, 422, false, "Scopes cannot be changed after creation; rotate the key with a new scope list (POST /v1/keys/{id}/rotate).";
    InvalidState => "invalid_state", InvalidRequest, 409, false, "The resource is in a state that does not allow this operation.";
    AlreadyExists => "already_exists", InvalidRequest, 409, false, "A resource with this identifier already exists.";
    PayloadTooLarge => "payload_too_large", InvalidRequest, 413, false, "The request body exceeds the limit of 1 MiB.";
    UnsupportedMediaType => "unsupported_media_type", InvalidRequest, 415, false, "Send the body as `Content-Type: application/json`.";
    MethodNotAllowed => "method_not_allowed", InvalidRequest, 405, false, "This method is not allowed on this path.";
    NotFound => "not_found", NotFound, 404, false, "No such resource.";
    RouteNotFound => "route_not_found", NotFound, 404, false, "No route matches this path.";
    // Server side.
    StoreUnavailable => "store_unavailable", Api, 503, true, "Storage is unavailable; try again shortly.";
    LimiterUnavailable => "limiter_unavailable", Api, 503, true, "The rate limiter is unavailable; try again shortly.";
    UpstreamUnavailable => "upstream_unavailable", Api, 502, true, "The upstream service is unavailable.";
    UpstreamTimeout => "upstream_timeout", Api, 504, true, "The upstream service did not answer in time.";
    InternalError => "internal_error", Api, 500, true, "An internal error occurred.";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for &code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate code {code}");
            assert_eq!(ErrorCode::from_code(code.as_str()), Some(code));
            assert!((400..600).contains(&code.status()));
        }
    }

    #[test]
    fn contract_statuses() {
        assert_eq!(ErrorCode::InsufficientScope.status(), 403);
        assert_eq!(
            ErrorCode::InsufficientScope.error_type().as_str(),
            "authentication_error"
        );
        assert_eq!(ErrorCode::KeyRevoked.status(), 401);
        assert!(ErrorCode::RateLimitExceeded.retryable());
        assert!(!ErrorCode::UsageExhausted.retryable());
    }
}
