//! The back-office API under `/api/connections` and `/api/captures`, for Dynamics
//! (plug-ins, X++, Power Automate) and scripts. Every route needs a bearer token
//! accepted by [`crate::auth::BearerVerifier`].

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use super::{CachedToken, ConnectionError, ConnectionView, StartRequest};
use crate::app::App;
use crate::auth::{AuthError, Caller};
use crate::http::{ApiError, Request, Response, response};
use crate::oauth::OAuthError;
use crate::store::{ListFilter, Status, StoreError};

impl From<ConnectionError> for ApiError {
    fn from(e: ConnectionError) -> ApiError {
        match e {
            ConnectionError::NotFound(id) => ApiError::not_found(format!("There is no connection {id:?}.")),
            ConnectionError::Invalid(code, detail) => ApiError::bad_request(code, detail),
            e @ ConnectionError::Exists(_) => ApiError::conflict("connection-exists", e.to_string()),
            e @ ConnectionError::NotAuthorized { .. } => ApiError::conflict("not-authorized", e.to_string()),
            e @ ConnectionError::NeedsReauth { .. } => ApiError::conflict("needs-reauth", e.to_string()),
            e @ ConnectionError::Backoff { retry_after, .. } => {
                ApiError::unavailable("provider-unavailable", e.to_string(), Some(retry_after))
            }
            ConnectionError::Provider(e @ OAuthError::Transient(_)) => {
                ApiError::unavailable("provider-unavailable", e.to_string(), Some(30))
            }
            ConnectionError::Provider(e @ OAuthError::Config(_)) => ApiError::internal(e),
            ConnectionError::Provider(e) => ApiError::bad_gateway("provider-error", e.to_string()),
            ConnectionError::Store(e) => store_error(e),
            ConnectionError::Crypto(e) => ApiError::internal(format!("stored tokens could not be decrypted: {e}")),
        }
    }
}

pub fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Unavailable(m) => {
            ApiError::unavailable("store-unavailable", format!("The store is unavailable: {m}"), Some(5))
        }
        other => ApiError::internal(other),
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::Unauthenticated(m) => ApiError::unauthorized(m),
            AuthError::Forbidden(m) => ApiError::forbidden(m),
            AuthError::Unavailable(m) => ApiError::unavailable(
                "auth-unavailable",
                format!("Bearer tokens cannot be verified right now: {m}"),
                Some(10),
            ),
        }
    }
}

/// Checks the back-office caller's bearer token.
async fn caller(app: &App, req: &Request) -> Result<Caller, ApiError> {
    let Some(verifier) = app.back_office.as_ref() else {
        return Err(ApiError::unavailable(
            "api-not-configured",
            "The back-office API is closed: set AUTH_ISSUER, AUTH_AUDIENCE and AUTH_ALLOWED_CLIENT_IDS (or AUTH_ALLOWED_ROLES).",
            None,
        ));
    };
    Ok(verifier.verify(req.header(header::AUTHORIZATION)).await?)
}

/// `GET /api/connections` (list) and `POST /api/connections` (start).
pub async fn collection(app: &App, mut req: Request) -> Result<Response, ApiError> {
    let who = caller(app, &req).await?;
    if req.method == Method::POST {
        let start: StartRequest = req.json().await?;
        let started = app.connections.start(start).await?;
        tracing::info!(connection = %started.connection_id, caller = who.client_id.as_deref().unwrap_or("-"), "start");
        return Ok(response::json(StatusCode::CREATED, &started));
    }
    let mut filter = ListFilter { limit: 1000, ..Default::default() };
    for (k, v) in req.query_pairs() {
        match k.as_str() {
            "provider" => filter.provider = Some(v),
            "owner" => filter.owner = Some(v),
            "status" => {
                filter.status = Some(Status::parse(&v).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid-status",
                        format!("status {v:?} is not one of pending, active, needs_reauth, failed."),
                    )
                })?)
            }
            "limit" => {
                filter.limit =
                    v.parse().ok().filter(|n| (1..=1000).contains(n)).ok_or_else(|| {
                        ApiError::bad_request("invalid-limit", "limit must be a number from 1 to 1000.")
                    })?
            }
            _ => {}
        }
    }
    let list = app.connections.list(&filter).await?;
    let views: Vec<ConnectionView> = list.iter().map(ConnectionView::from).collect();
    Ok(response::json(StatusCode::OK, &serde_json::json!({ "connections": views })))
}

/// `GET /api/connections/{id}` (status) and `DELETE` (revoke and remove).
pub async fn item(app: &App, req: Request, id: &str) -> Result<Response, ApiError> {
    caller(app, &req).await?;
    if req.method == Method::DELETE {
        let skip = req.query_param("skip_revocation").is_some_and(|v| v == "true");
        return match app.connections.delete(id, skip).await {
            Ok(revoked) => Ok(response::json(
                StatusCode::OK,
                &serde_json::json!({ "connection_id": id, "deleted": true, "revoked_at_provider": revoked }),
            )),
            Err(ConnectionError::Provider(e)) => Err(ApiError::bad_gateway(
                "revocation-failed",
                format!(
                    "The provider did not confirm the revocation ({e}); the connection is kept. Retry, or delete with ?skip_revocation=true."
                ),
            )),
            Err(e) => Err(e.into()),
        };
    }
    let conn = app.connections.get(id).await?;
    Ok(response::json(StatusCode::OK, &ConnectionView::from(&conn)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    #[serde(default)]
    force_refresh: bool,
}

#[derive(Serialize)]
struct TokenResponse<'a> {
    connection_id: &'a str,
    access_token: &'a str,
    token_type: &'a str,
    expires_at: String,
    expires_in: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
}

fn token_response(id: &str, t: &CachedToken) -> Response {
    let body = TokenResponse {
        connection_id: id,
        access_token: t.secret(),
        token_type: &t.token_type,
        expires_at: crate::time::rfc3339(t.expires_at),
        expires_in: (t.expires_at - crate::time::now()).max(0),
        scope: t.scope.as_deref(),
    };
    response::json_no_store(StatusCode::OK, &body)
}

/// `POST /api/connections/{id}/token`: a valid access token.
pub async fn token(app: &App, mut req: Request, id: &str) -> Result<Response, ApiError> {
    caller(app, &req).await?;
    let body: Option<TokenRequest> = req.json().await?;
    let force =
        body.map(|b| b.force_refresh).unwrap_or(false) || req.query_param("force_refresh").is_some_and(|v| v == "true");
    let token = app.connections.access_token(id, force).await?;
    Ok(token_response(id, &token))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReconnectRequest {
    #[serde(default)]
    return_url: Option<String>,
}

/// `POST /api/connections/{id}/reconnect`: a new authorization URL for a connection.
pub async fn reconnect(app: &App, mut req: Request, id: &str) -> Result<Response, ApiError> {
    caller(app, &req).await?;
    let body: Option<ReconnectRequest> = req.json().await?;
    let started = app.connections.reconnect(id, body.and_then(|b| b.return_url).as_deref()).await?;
    Ok(response::json(StatusCode::OK, &started))
}

/// `GET /api/captures?state=...`: what the callback captured for a state Dynamics issued.
pub async fn captures(app: &App, req: Request) -> Result<Response, ApiError> {
    caller(app, &req).await?;
    let state = req
        .query_param("state")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad_request("missing-state", "Pass the state to look up: /api/captures?state=..."))?;
    let captures = app.connections.captures(&state).await?;
    if captures.is_empty() {
        return Err(ApiError::not_found(format!("Nothing was captured for state {state:?} (yet).")));
    }
    Ok(response::json_no_store(StatusCode::OK, &serde_json::json!({ "captures": captures })))
}

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

/// `/api/connections/{id}/proxy/{*path}`: calls the provider's API with the token.
pub async fn proxy(app: &App, mut req: Request, id: &str) -> Result<Response, ApiError> {
    caller(app, &req).await?;
    let conn = app.connections.get(id).await?;
    let (_, target) = proxy_request(app, &conn, &req)?;
    let body = req.body_bytes().await?;
    send_with_token(app, id, req.method.clone(), target, &req.headers, body).await
}

/// The connection's provider and the provider URL a proxy request is for.
pub fn proxy_request<'a>(
    app: &'a App,
    conn: &crate::store::Connection,
    req: &Request,
) -> Result<(&'a crate::oauth::catalog::Provider, url::Url), ApiError> {
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
        let mut out = app.proxy_http.request(method.clone(), target.clone()).body(body.clone());
        for (name, value) in headers {
            if forwardable_request_header(name.as_str()) {
                out = out.header(name, value);
            }
        }
        out = out.header(header::AUTHORIZATION, format!("{} {}", bearer_scheme(&token.token_type), token.secret()));
        let resp = crate::http::upstream(out.send()).await.map_err(|e| {
            ApiError::bad_gateway(
                "provider-api-unreachable",
                format!("The provider's API did not answer: {}", crate::oauth::client::describe(e)),
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
