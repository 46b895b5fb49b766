//! CORS for the portal API, when this handler is the layer that answers it.
//!
//! CORS must be answered in exactly one layer. On Azure the platform does it (the function
//! app's CORS list must hold the portal's origin; set `CORS_LAYER=platform` and the
//! handler adds nothing). Elsewhere (locally, other hosting) this layer does: an exact
//! origin allow-list, never `*`, credentials only for listed origins, `Vary: Origin` on
//! every answer so caches keep origins apart, and a 403 before any work for a page from
//! an origin that is not listed.

use warp::http::{HeaderValue, Method, StatusCode, header};

use super::error::ApiError;
use super::response::{self, Response};

const ALLOWED_METHODS: &str = "GET, POST, DELETE, PUT, PATCH";
const ALLOWED_HEADERS: &str = "authorization, content-type, accept, x-requested-with";
const MAX_AGE_SECS: &str = "600";

/// What to do with a request's `Origin`.
pub enum Verdict {
    /// No `Origin` header: not a cross-origin browser request.
    NoOrigin,
    /// A listed origin: answer, with these CORS headers.
    Allowed(HeaderValue),
    /// Refuse (unlisted origin, or an unlisted preflight method).
    Denied(ApiError),
    /// A preflight for a listed origin, answered here.
    Preflight(Response),
}

pub fn check(
    origins: &[url::Origin],
    method: &Method,
    origin: Option<&HeaderValue>,
    requested: Option<&str>,
) -> Verdict {
    let Some(origin) = origin else {
        return Verdict::NoOrigin;
    };
    if !origin.to_str().is_ok_and(|o| is_listed(origins, o)) {
        let shown = origin.to_str().unwrap_or("?");
        return Verdict::Denied(ApiError::forbidden(format!(
            "Pages from {shown} may not call this API (not in PORTAL_ORIGINS)."
        )));
    }
    if *method == Method::OPTIONS {
        let Some(requested) = requested else {
            return Verdict::Denied(ApiError::bad_request(
                "bad-preflight",
                "A preflight needs Access-Control-Request-Method.",
            ));
        };
        if !ALLOWED_METHODS.split(", ").any(|m| m.eq_ignore_ascii_case(requested.trim())) {
            return Verdict::Denied(ApiError::forbidden(format!(
                "Method {requested} is not allowed from a portal page."
            )));
        }
        let mut resp = response::empty(StatusCode::NO_CONTENT);
        decorate(&mut resp, origin);
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOWED_METHODS));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOWED_HEADERS));
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE_SECS));
        return Verdict::Preflight(resp);
    }
    Verdict::Allowed(origin.clone())
}

/// Whether an `Origin` value is one of the listed origins.
pub fn is_listed(origins: &[url::Origin], origin: &str) -> bool {
    url::Url::parse(origin).is_ok_and(|u| origins.contains(&u.origin()))
}

/// Adds the headers of an allowed cross-origin answer.
pub fn decorate(resp: &mut Response, origin: &HeaderValue) {
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("retry-after, www-authenticate"));
    vary_origin(resp);
}

/// `Vary: Origin`, on every portal answer whatever the origin.
pub fn vary_origin(resp: &mut Response) {
    resp.headers_mut().append(header::VARY, HeaderValue::from_static("Origin"));
}
