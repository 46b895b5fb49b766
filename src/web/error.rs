//! The one error model every HTTP caller sees.
//!
//! API callers get RFC 9457 `application/problem+json`; a person's browser at the OAuth
//! callback gets a small HTML page with the same title and detail. The `detail` is
//! written for the person reading it and never carries a secret or an internal trace.

use warp::http::{HeaderValue, StatusCode, header};

use super::html;
use super::response::{self, Response};

/// What kind of caller is being answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Api,
    Browser,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// A stable, machine-readable slug, e.g. `state-expired`; the problem `type`.
    pub code: &'static str,
    pub detail: String,
    /// Extra response headers (`Allow`, `Retry-After`, `WWW-Authenticate`).
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError { status, code, detail: detail.into(), headers: Vec::new() }
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    pub fn conflict(code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, detail)
    }

    pub fn unauthorized(detail: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", detail);
        e.headers.push((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        e
    }

    pub fn forbidden(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    pub fn method_not_allowed(allowed: &[&str]) -> ApiError {
        let allow = allowed.join(", ");
        let mut e =
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", format!("This route accepts {allow}."));
        if let Ok(v) = HeaderValue::from_str(&allow) {
            e.headers.push((header::ALLOW, v));
        }
        e
    }

    pub fn payload_too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            format!("The request body is larger than the {limit}-byte limit."),
        )
    }

    /// An upstream (provider, store) is failing; the caller may retry later.
    pub fn unavailable(code: &'static str, detail: impl Into<String>, retry_after_secs: Option<u64>) -> ApiError {
        let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, detail);
        if let Some(secs) = retry_after_secs {
            e.headers.push((header::RETRY_AFTER, HeaderValue::from(secs.max(1))));
        }
        e
    }

    pub fn bad_gateway(code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_GATEWAY, code, detail)
    }

    /// A fault on our side. The detail shown is generic; the cause goes to the log.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Something went wrong on our side. The error is logged; please retry or contact the operator.",
        )
    }

    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> ApiError {
        self.headers.push((name, value));
        self
    }

    pub fn title(&self) -> &'static str {
        self.status.canonical_reason().unwrap_or("Error")
    }

    pub fn into_response(self, audience: Audience, instance: &str) -> Response {
        let mut resp = match audience {
            Audience::Api => {
                let body = serde_json::json!({
                    "type": format!("urn:dynamics-companion:problem:{}", self.code),
                    "title": self.title(),
                    "status": self.status.as_u16(),
                    "detail": self.detail,
                    "instance": instance,
                });
                response::json_with_type(self.status, &body, "application/problem+json")
            }
            Audience::Browser => html::page(self.status, self.title(), &self.detail, html::Tone::Error),
        };
        for (name, value) in self.headers {
            resp.headers_mut().append(name, value);
        }
        resp
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.detail)
    }
}
