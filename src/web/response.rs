//! Small constructors for the responses the handler sends.

use serde::Serialize;
use warp::http::{HeaderValue, StatusCode, header};

pub type Response = warp::reply::Response;

/// A JSON response with the given content type.
pub fn json_with_type<T: Serialize + ?Sized>(status: StatusCode, body: &T, content_type: &'static str) -> Response {
    // Serializing our own response types cannot fail (no maps with non-string keys).
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(bytes.into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

pub fn json<T: Serialize + ?Sized>(status: StatusCode, body: &T) -> Response {
    json_with_type(status, body, "application/json")
}

/// JSON that carries a secret (an access token): never cached by anything in between.
pub fn json_no_store<T: Serialize + ?Sized>(status: StatusCode, body: &T) -> Response {
    let mut resp = json(status, body);
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut().insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

pub fn empty(status: StatusCode) -> Response {
    let mut resp = Response::new(warp::hyper::body::Bytes::new().into());
    *resp.status_mut() = status;
    resp
}

pub fn text(status: StatusCode, body: &'static str) -> Response {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// A `303 See Other` to a URL we validated. No body, no caching, no referrer leak of
/// the callback's `code`.
pub fn redirect(location: &str) -> Response {
    let mut resp = empty(StatusCode::SEE_OTHER);
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut().insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    resp
}
