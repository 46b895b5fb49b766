//! The provider API proxy, for the back office and the portal: the target URL (never
//! outside the provider's `api_base_url`), which headers pass each way, and the call
//! with the connection's token, refreshed and retried once on a 401.

use bytes::Bytes;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use super::{ApiError, Request, Response};
use crate::app::App;
use crate::oauth::catalog::Provider;
use crate::outbound;
use crate::store::Connection;

/// Request headers not passed on to the provider's API: ours (auth, host routing,
/// Functions and Azure front-end headers) and hop-by-hop ones.
fn forwardable_request_header(name: &str) -> bool {
    !matches!(
        name,
        "host"
            | "authorization"
            | "cookie"
            | "connection"
            | "content-length"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "keep-alive"
            | "proxy-authorization"
            | "proxy-connection"
            | "max-forwards"
            | "origin"
            | "referer"
            | "x-functions-key"
            | "disguised-host"
            | "traceparent"
    ) && !name.starts_with("x-forwarded-")
        && !name.starts_with("x-azure-")
        && !name.starts_with("x-arr-")
        && !name.starts_with("x-original-")
        && !name.starts_with("x-ms-")
}

fn forwardable_response_header(name: &str) -> bool {
    !matches!(
        name,
        "connection"
            | "transfer-encoding"
            | "keep-alive"
            | "te"
            | "trailer"
            | "upgrade"
            | "set-cookie"
            | "content-length"
            | "www-authenticate"
            | "proxy-authenticate"
    )
}

/// The connection's provider and the provider URL a proxy request is for.
pub fn target<'a>(app: &'a App, conn: &Connection, req: &Request) -> Result<(&'a Provider, url::Url), ApiError> {
    let provider = app.connections.catalog().get(&conn.provider).ok_or_else(|| {
        ApiError::internal(format!(
            "connection {} names provider {} which is not in the catalog",
            conn.id, conn.provider
        ))
    })?;
    let base = provider.api_base_url.as_ref().ok_or_else(|| {
        ApiError::bad_request(
            "no-api-base-url",
            format!("Provider {} has no api_base_url in the catalog; the proxy cannot be used.", provider.name),
        )
    })?;
    Ok((provider, proxy_target(base, &req.path, req.query.as_deref())?))
}

/// Builds the provider URL from the raw (still percent-encoded) path after `/proxy/`,
/// refusing anything that would leave the API base.
pub fn proxy_target(base: &url::Url, raw_path: &str, query: Option<&str>) -> Result<url::Url, ApiError> {
    let rest = raw_path.split_once("/proxy/").map(|(_, r)| r).unwrap_or("");
    let escapes = rest.split('/').any(|seg| {
        let decoded = percent_encoding::percent_decode_str(seg).decode_utf8_lossy();
        decoded == ".." || decoded == "." || decoded.contains('/') || decoded.contains('\\')
    });
    if escapes || rest.starts_with('/') || rest.contains("//") {
        return Err(ApiError::bad_request(
            "invalid-proxy-path",
            "The proxied path may not contain '.', '..' or empty segments.",
        ));
    }
    let mut url = base
        .join(rest)
        .map_err(|e| ApiError::bad_request("invalid-proxy-path", format!("The proxied path is not valid: {e}.")))?;
    if !url.as_str().starts_with(base.as_str()) {
        return Err(ApiError::bad_request(
            "invalid-proxy-path",
            "The proxied path leaves the provider's API base URL.",
        ));
    }
    url.set_query(query);
    Ok(url)
}

/// Sends a request to the provider's API with the connection's token; on 401, forces
/// one refresh and retries once (the token may have been revoked early).
pub async fn send_with_token(
    app: &App,
    id: &str,
    method: Method,
    target: url::Url,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut token = app.connections.access_token(id, false).await?;
    let mut retried = false;
    loop {
        let mut out = app.http.request(method.clone(), target.clone()).body(body.clone());
        for (name, value) in headers {
            if forwardable_request_header(name.as_str()) {
                out = out.header(name, value);
            }
        }
        out = out.header(header::AUTHORIZATION, format!("{} {}", bearer_scheme(&token.token_type), token.secret()));
        let resp = outbound::upstream(out.send()).await.map_err(|e| {
            ApiError::bad_gateway(
                "provider-api-unreachable",
                format!("The provider's API did not answer: {}", outbound::error_text(e)),
            )
        })?;
        if resp.status() == StatusCode::UNAUTHORIZED && !retried {
            retried = true;
            token = app.connections.access_token(id, true).await?;
            continue;
        }
        let status = resp.status();
        let mut passed = HeaderMap::new();
        for (name, value) in resp.headers() {
            if forwardable_response_header(name.as_str()) {
                passed.append(name.clone(), value.clone());
            }
        }
        passed.insert("x-dynamics-companion-proxied", HeaderValue::from_static("1"));
        // Stream the provider's body through rather than buffering it.
        let mut streamed = warp::Reply::into_response(warp::reply::stream(resp.bytes_stream()));
        *streamed.status_mut() = status;
        *streamed.headers_mut() = passed;
        return Ok(streamed);
    }
}

/// RFC 6750 uses `Bearer`; providers answering `bearer` in `token_type` mean the same.
fn bearer_scheme(token_type: &str) -> &str {
    if token_type.eq_ignore_ascii_case("bearer") { "Bearer" } else { token_type }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_paths_stay_under_the_base() {
        let base = url::Url::parse("https://api.example/v1/").unwrap();
        let ok = proxy_target(&base, "/api/connections/c/proxy/items/42", Some("a=1")).unwrap();
        assert_eq!(ok.as_str(), "https://api.example/v1/items/42?a=1");
        for bad in [
            "/api/connections/c/proxy/../admin",
            "/api/connections/c/proxy/a/%2e%2e/b",
            "/api/connections/c/proxy//evil.example/x",
            "/api/connections/c/proxy/a%2Fb",
        ] {
            assert!(proxy_target(&base, bad, None).is_err(), "{bad} should be refused");
        }
    }
}
