//! One incoming request, with a body that is read lazily and with a limit.
//!
//! The Functions host sends invocation payloads chunked, without `Content-Length`, so
//! the limit is enforced while the stream is read rather than by asking for a length
//! up front (warp's `content_length_limit` answers 411 to chunked bodies).

use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use warp::http::{HeaderMap, Method, header};

use super::error::ApiError;
use crate::support::config::Limits;

/// How far past the limit an oversized body is still read before answering 413.
const DRAIN_FACTOR: usize = 8;

pub type BodyError = Box<dyn std::error::Error + Send + Sync>;
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, BodyError>> + Send + Sync>>;

pub struct Request {
    pub method: Method,
    /// The path as received, percent-encoded, e.g. `/api/connections/abc/token`.
    pub path: String,
    /// The raw query string without `?`, if any.
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// The TCP peer: the Functions host itself when it started us.
    pub remote: Option<std::net::SocketAddr>,
    body: Option<BodyStream>,
    max_body: usize,
    /// How long the whole body may take to arrive.
    body_timeout: std::time::Duration,
}

impl Request {
    pub fn new(
        method: Method,
        path: String,
        query: Option<String>,
        headers: HeaderMap,
        body: BodyStream,
        limits: &Limits,
    ) -> Request {
        Request {
            method,
            path,
            query,
            headers,
            remote: None,
            body: Some(body),
            max_body: limits.max_body_bytes,
            body_timeout: limits.body_read_timeout,
        }
    }

    /// A request with a fixed body (tests, internal calls).
    pub fn from_parts(method: Method, path: &str, query: Option<&str>, headers: HeaderMap, body: Bytes) -> Request {
        let stream: BodyStream = Box::pin(futures_util::stream::once(async move { Ok(body) }));
        let limits =
            Limits { max_body_bytes: usize::MAX, body_read_timeout: std::time::Duration::MAX, ..Limits::default() };
        Request::new(method, path.to_string(), query.map(str::to_string), headers, stream, &limits)
    }

    pub fn header(&self, name: impl header::AsHeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Decoded query pairs, in order.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        match &self.query {
            Some(q) => url::form_urlencoded::parse(q.as_bytes()).into_owned().collect(),
            None => Vec::new(),
        }
    }

    /// The first value of a query parameter.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query_pairs().into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// Reads the whole body, failing with 413 as soon as it passes the limit, and with
    /// 408 when it does not arrive within the body timeout (a client that sends its
    /// headers and then trickles, or stops, holds nothing for long).
    pub async fn body_bytes(&mut self) -> Result<Bytes, ApiError> {
        let timeout = self.body_timeout;
        match tokio::time::timeout(timeout, self.read_body()).await {
            Ok(read) => read,
            Err(_) => Err(ApiError::new(
                warp::http::StatusCode::REQUEST_TIMEOUT,
                "body-timeout",
                format!("The request body did not arrive within {} s.", timeout.as_secs()),
            )),
        }
    }

    async fn read_body(&mut self) -> Result<Bytes, ApiError> {
        let Some(mut stream) = self.body.take() else {
            return Ok(Bytes::new());
        };
        let limit = self.max_body;
        // A declared length over the limit is refused up front, but only after draining
        // (below), so the connection stays usable for the client's next request.
        let declared_too_large =
            self.header(header::CONTENT_LENGTH).and_then(|v| v.parse::<usize>().ok()).is_some_and(|len| len > limit);
        let mut buf = BytesMut::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request("body-unreadable", format!("The request body could not be read: {e}"))
            })?;
            if declared_too_large || buf.len() + chunk.len() > limit {
                // Read on (and discard) up to a bound, so a client still sending its body can
                // read the 413 instead of seeing the connection reset under it. Past the bound
                // the connection is dropped with the reply.
                let mut seen = buf.len() + chunk.len();
                while seen <= limit.saturating_mul(DRAIN_FACTOR) {
                    match stream.next().await {
                        Some(Ok(more)) => seen += more.len(),
                        _ => break,
                    }
                }
                return Err(ApiError::payload_too_large(limit));
            }
            buf.extend_from_slice(&chunk);
        }
        if declared_too_large {
            return Err(ApiError::payload_too_large(limit));
        }
        Ok(buf.freeze())
    }

    /// Reads and parses a JSON body. An empty body parses as `null`, which a
    /// `#[serde(default)]` struct accepts through `Option`.
    pub async fn json<T: DeserializeOwned>(&mut self) -> Result<T, ApiError> {
        let content_type = self.header(header::CONTENT_TYPE).unwrap_or("").to_ascii_lowercase();
        let bytes = self.body_bytes().await?;
        if !bytes.is_empty() && !content_type.is_empty() && !is_json(&content_type) {
            return Err(ApiError::new(
                warp::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                format!("Send the body as application/json, not {content_type}."),
            ));
        }
        parse_json(&bytes)
    }
}

pub fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

/// Parses JSON with a 400 that says where the text went wrong.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"null" } else { bytes };
    serde_json::from_slice(text).map_err(|e| {
        let what = if e.is_data() { "does not have the expected fields" } else { "is not valid JSON" };
        ApiError::bad_request("malformed-json", format!("The request body {what}: {e}."))
    })
}
