//! The provider API proxy, for the back office and the portal: the target URL (never
//! outside the provider's `api_base_url`), which headers pass each way, and the call
//! with the connection's token, refreshed and retried once on a 401.

use bytes::Bytes;
use warp::http::{HeaderMap, HeaderValue, StatusCode, header};

use super::{ApiError, Request, Response};
use crate::domain::connections::CachedToken;
use crate::domain::oauth::catalog::Provider;
use crate::support::outbound;

/// Request headers that pass to the provider's API, besides those a provider entry names
/// (`proxy_headers`): what describes the body and what the caller will accept, and
/// conditional requests. Everything else stays here: our own authentication, cookies,
/// the Functions and Azure front-end headers, hop-by-hop headers, and above all
/// method-override, URL-rewrite and forwarding headers, which some APIs honour and which
/// would let a caller run a method or reach a path the portal's allow-list refused.
const FORWARDED_REQUEST_HEADERS: &[&str] = &[
    "accept",
    "accept-encoding",
    "accept-language",
    "cache-control",
    "content-encoding",
    "content-language",
    "content-type",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "odata-maxversion",
    "odata-version",
    "prefer",
    "range",
];

/// Response headers that never reach the caller: hop-by-hop ones (RFC 9110 §7.6.1), the
/// provider's cookies, its authentication challenges, and its CORS headers (the
/// handler's own CORS layer alone decides what a browser may read).
///
/// `Content-Length` passes: the body is the provider's bytes unchanged (the outbound client
/// is built without decompression), so an answer with a length is sent length-delimited
/// while it streams; without it hyper would re-chunk every answer and, not knowing where
/// the body ends, write its last chunk apart (a second write, and a second wake-up of the
/// caller, on every proxied call). An answer without a length stays chunked.
fn forwardable_response_header(name: &str) -> bool {
    !(matches!(
        name,
        "connection"
            | "transfer-encoding"
            | "keep-alive"
            | "te"
            | "trailer"
            | "upgrade"
            | "set-cookie"
            | "set-cookie2"
            | "www-authenticate"
            | "proxy-authenticate"
            | "proxy-connection"
            | "timing-allow-origin"
    ) || name.starts_with("access-control-"))
}

/// The header names a `Connection` header lists: hop-by-hop for this message only.
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect()
}

/// The connection's provider and the provider URL a proxy request is for.
pub fn target(
    catalog: &crate::domain::oauth::catalog::Catalog,
    token: &CachedToken,
    id: &str,
    req: &Request,
) -> Result<(std::sync::Arc<Provider>, url::Url), ApiError> {
    let provider = provider_of(catalog, token, id)?;
    let target = proxy_target(api_base(&provider)?, &req.path, req.query.as_deref())?;
    Ok((provider, target))
}

/// The connection's provider in the catalog.
pub fn provider_of(
    catalog: &crate::domain::oauth::catalog::Catalog,
    token: &CachedToken,
    id: &str,
) -> Result<std::sync::Arc<Provider>, ApiError> {
    catalog.get(&token.provider).ok_or_else(|| {
        ApiError::internal(format!("connection {id} names provider {} which is not in the catalog", token.provider))
    })
}

/// The provider's API base URL, which every proxied call stays under.
pub fn api_base(provider: &Provider) -> Result<&url::Url, ApiError> {
    provider.api_base_url.as_ref().ok_or_else(|| {
        ApiError::bad_request(
            "no-api-base-url",
            format!("Provider {} has no api_base_url in the catalog; the proxy cannot be used.", provider.name),
        )
    })
}

/// Builds the provider URL from the raw (still percent-encoded) path after the route's
/// `/proxy/` segment, refusing anything that would leave the API base or that a server
/// behind it could read differently: dot segments, encoded separators (`%2F`, `%5C`),
/// `;` path parameters (`..;/`), double encoding (`%252e`), control characters and empty
/// segments. The path is decoded once, here, only to check it.
pub fn proxy_target(base: &url::Url, raw_path: &str, query: Option<&str>) -> Result<url::Url, ApiError> {
    // What follows the route's `proxy` segment: `/api/connections/{id}/proxy/...` or
    // `/api/portal/connections/{id}/proxy/...` (an id that is itself `proxy` is not it).
    let at = if raw_path.split('/').nth(2) == Some("portal") { 6 } else { 5 };
    let mut parts = raw_path.splitn(at + 1, '/');
    if parts.nth(at - 1) != Some("proxy") {
        return Err(ApiError::bad_request("invalid-proxy-path", "This is not a proxy path."));
    }
    let mut url = checked_join(base, parts.next())?;
    url.set_query(query);
    Ok(url)
}

/// Joins a path (still percent-encoded; `None` for no path at all) to the provider's API
/// base, refusing what would leave it or what a server behind it could read differently:
/// dot segments, encoded separators (`%2F`, `%5C`), `;` path parameters (`..;/`), double
/// encoding (`%252e`), control characters and empty segments (but a trailing slash).
fn checked_join(base: &url::Url, rest: Option<&str>) -> Result<url::Url, ApiError> {
    let mut segments = rest.into_iter().flat_map(|r| r.split('/')).peekable();
    let mut refused = segments.peek().is_none();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        refused |= if seg.is_empty() {
            !last // only a trailing slash may leave a segment empty
        } else if seg.contains(';') || seg.contains('?') || seg.contains('#') {
            true
        } else {
            match percent_encoding::percent_decode_str(seg).decode_utf8() {
                Err(_) => true,
                Ok(decoded) => {
                    decoded == "."
                        || decoded == ".."
                        || decoded.chars().any(|c| matches!(c, '/' | '\\' | ';' | '%') || c.is_control())
                }
            }
        };
        if refused {
            break;
        }
    }
    let rest = match rest {
        Some(rest) if !refused => rest,
        _ => {
            return Err(ApiError::bad_request(
                "invalid-proxy-path",
                "The proxied path may not contain '.', '..', empty segments, ';', encoded separators or double encoding.",
            ));
        }
    };
    // The checked segments set as the path after the base's (which ends in `/`): what
    // `Url::join` would give for them, without parsing the whole URL again (its host
    // included) on every proxied call.
    let mut path = String::with_capacity(base.path().len() + rest.len());
    path.push_str(base.path());
    path.push_str(rest);
    let mut url = base.clone();
    url.set_query(None);
    url.set_fragment(None);
    url.set_path(&path);
    let under_base = url.scheme() == base.scheme()
        && url.host_str() == base.host_str()
        && url.port() == base.port()
        && url.path().starts_with(base.path());
    if !under_base {
        return Err(ApiError::bad_request(
            "invalid-proxy-path",
            "The proxied path leaves the provider's API base URL.",
        ));
    }
    Ok(url)
}

/// The provider URL for the connector's "Call the provider's API"
/// (`/api/connections/{id}/call/{path}?query=`): the API path is one parameter, which a
/// custom connector sends URL-encoded (its `x-ms-url-encoding` is `single`: `invoices/123`
/// arrives as `invoices%2F123`; Microsoft Learn, "OpenAPI extensions for custom
/// connectors"), so it is decoded once here and then checked as the proxy checks a raw
/// path: `..` hidden as `%2E%2E` is still refused. The provider's query string is its own
/// parameter (`query=status%3Dopen` → `?status=open`); a path that carries a `?` instead
/// is split there, when no `query` parameter is given.
pub fn call_target(base: &url::Url, raw_tail: &str, request_query: Option<&str>) -> Result<url::Url, ApiError> {
    let invalid = |detail: &str| ApiError::bad_request("invalid-proxy-path", detail.to_string());
    let decoded = percent_encoding::percent_decode_str(raw_tail)
        .decode_utf8()
        .map_err(|_| invalid("The API path is not UTF-8 once decoded."))?;
    let given = request_query.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "query").map(|(_, v)| v.into_owned())
    });
    let (path, query) = match decoded.split_once('?') {
        Some(_) if given.is_some() => {
            return Err(invalid(
                "Give the provider's query either in the API path (after '?') or in the query parameter, not both.",
            ));
        }
        Some((path, query)) => (path.to_string(), Some(query.to_string())),
        None => (decoded.into_owned(), given),
    };
    if path.chars().any(|c| c.is_control() || c == '#')
        || query.as_deref().is_some_and(|q| q.chars().any(|c| c.is_control() || c == '#'))
    {
        return Err(invalid("The API path and query may not contain control characters or '#'."));
    }
    let path = path.trim_start_matches('/');
    if path.is_empty() {
        return Err(invalid("Give the API path: what follows the provider's api_base_url, e.g. invoices/123."));
    }
    // The maker's path as a URL path: what is not allowed in one is escaped (a space), what
    // is (an escape the maker wrote) stays, and is then checked like any raw path.
    let encoded: String = percent_encoding::utf8_percent_encode(path, PATH_UNSAFE).to_string();
    let mut url = checked_join(base, Some(&encoded))?;
    url.set_query(query.as_deref().filter(|q| !q.is_empty()));
    Ok(url)
}

/// What is escaped in a maker's API path: controls, space and what would end or redirect
/// the path (`?`, `#`) or confuse a server (`"`, `<`, `>`, `` ` ``, `{`, `}`); `%` and `/`
/// stay (the maker's own escapes, the path's separators).
const PATH_UNSAFE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// Sends a request to the provider's API with the connection's token (from the cache when
/// it is there: a proxied call then reads no store); on 401, forces one refresh (on behalf
/// of `actor`) and retries once (the token may have been revoked early).
#[allow(clippy::too_many_arguments)]
pub async fn send_with_token(
    actor: &crate::support::audit::Actor,
    http: &reqwest::Client,
    connections: &crate::domain::connections::Connections,
    provider: &Provider,
    id: &str,
    token: CachedToken,
    target: url::Url,
    req: &mut Request,
) -> Result<Response, ApiError> {
    let body: Bytes = req.body_bytes().await?;
    let (method, headers) = (req.method.clone(), &req.headers);
    let hop_by_hop = connection_listed(headers);
    let request = || {
        let mut out = http.request(method.clone(), target.clone()).body(body.clone());
        for (name, value) in headers {
            let name_str = name.as_str();
            let allowed =
                FORWARDED_REQUEST_HEADERS.contains(&name_str) || provider.proxy_headers.iter().any(|h| h == name_str);
            if allowed && !hop_by_hop.iter().any(|h| h == name_str) {
                out = out.header(name, value);
            }
        }
        out
    };
    let (resp, _) = send_authorized(connections, id, token, actor, request).await.map_err(|e| match e {
        Unanswered::Token(e) => ApiError::from(e),
        Unanswered::Unreachable(why) => {
            ApiError::bad_gateway("provider-api-unreachable", format!("The provider's API did not answer: {why}"))
        }
    })?;
    let status = resp.status();
    let hop_by_hop = connection_listed(resp.headers());
    let mut passed = HeaderMap::new();
    for (name, value) in resp.headers() {
        if forwardable_response_header(name.as_str()) && !hop_by_hop.iter().any(|h| h == name.as_str()) {
            passed.append(name.clone(), value.clone());
        }
    }
    passed.insert("x-dynamics-companion-proxied", HeaderValue::from_static("1"));
    // Stream the provider's body through rather than buffering it.
    let mut streamed = warp::Reply::into_response(warp::reply::stream(resp.bytes_stream()));
    *streamed.status_mut() = status;
    *streamed.headers_mut() = passed;
    Ok(streamed)
}

/// Why a call with a connection's token got no answer.
pub enum Unanswered {
    /// No (fresh) token for the connection.
    Token(crate::domain::connections::ConnectionError),
    /// The provider's API did not answer: the reason, without the URL.
    Unreachable(String),
}

/// Sends the request `request` makes, with the connection's token; on 401, forces one
/// refresh and sends it once more (the token may have been revoked early). Returns the
/// answer and the token it was sent with. The one way the proxy, the connector's call and
/// the agents' tool reach a provider's API. The refresh is recorded as `actor`'s
/// ([`Connections::access_token_for`](crate::domain::connections::Connections::access_token_for)).
pub async fn send_authorized(
    connections: &crate::domain::connections::Connections,
    id: &str,
    mut token: CachedToken,
    actor: &crate::support::audit::Actor,
    request: impl Fn() -> reqwest::RequestBuilder,
) -> Result<(reqwest::Response, CachedToken), Unanswered> {
    let mut retried = false;
    loop {
        let out =
            request().header(header::AUTHORIZATION, format!("{} {}", bearer_scheme(&token.token_type), token.secret()));
        let resp = outbound::upstream(outbound::send(out))
            .await
            .map_err(|e| Unanswered::Unreachable(outbound::error_text(e)))?;
        if resp.status() == StatusCode::UNAUTHORIZED && !retried {
            retried = true;
            token = connections.access_token_for(id, true, actor).await.map_err(Unanswered::Token)?;
            continue;
        }
        return Ok((resp, token));
    }
}

/// [`send_with_token`] on behalf of `actor`, leaving its audit record (a refresh the
/// call causes names the actor too).
#[allow(clippy::too_many_arguments)]
pub async fn send_audited(
    actor: crate::support::audit::Actor,
    http: &reqwest::Client,
    connections: &crate::domain::connections::Connections,
    provider: &Provider,
    id: &str,
    token: CachedToken,
    target: url::Url,
    req: &mut Request,
) -> Result<Response, ApiError> {
    use crate::support::audit;
    let sent = send_with_token(&actor, http, connections, provider, id, token, target, req).await;
    audit::record(audit::Action::ProxiedCall, id, &provider.name, &actor, &outcome(&sent));
    sent
}

/// A proxied call's outcome for the audit record: the provider's status, or why not.
fn outcome(sent: &Result<Response, ApiError>) -> std::borrow::Cow<'static, str> {
    match sent {
        Ok(r) => answered(r.status()),
        Err(e) => format!("refused: {}", e.code).into(),
    }
}

/// A provider's answer as the audit record's outcome, `provider answered {status}` (the
/// proxy's and the agents' tool's), for the statuses HTTP defines made once: formatted per
/// call it was an allocation on every proxied call, the audit line written or not.
pub fn answered(status: StatusCode) -> std::borrow::Cow<'static, str> {
    static ANSWERED: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| (100..600).map(|s| format!("provider answered {s}")).collect());
    match ANSWERED.get(usize::from(status.as_u16()).wrapping_sub(100)) {
        Some(text) => text.as_str().into(),
        None => format!("provider answered {}", status.as_u16()).into(),
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
    fn the_outcome_names_any_status() {
        for code in [100, 200, 401, 599, 600, 999] {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(answered(status), format!("provider answered {code}"));
        }
    }

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
        let root = proxy_target(&base, "/api/connections/c/proxy/", None).unwrap();
        assert_eq!(root.as_str(), "https://api.example/v1/", "a trailing slash is the base itself");
        for bad in ["/api/connections/c/proxy", "/api/connections/c/proxi/x", "/api/portal/connections/c/x/y"] {
            assert!(proxy_target(&base, bad, None).is_err(), "{bad} has no path after proxy/");
        }
    }

    /// The joined URL is what `Url::join` gives for every path the checks let through, read
    /// as a relative path (`./`): a first segment with a colon (`a:b`) is a path segment
    /// here, where a bare `join` would read it as a URL of scheme `a` (and the proxy
    /// refused it as leaving the base).
    #[test]
    fn joining_matches_url_join() {
        for base in ["https://api.example/v1/", "https://api.example/", "https://api.example:8443/a%20b/v1/?k=1#f"] {
            let base = url::Url::parse(base).unwrap();
            for rest in ["items", "items/42", "items/", "a%20b", "%C3%A9t%C3%A9/x", "a:b", "a@b/c", "~user/x!$&'()*+,="]
            {
                let ours = checked_join(&base, Some(rest)).unwrap_or_else(|e| panic!("{base} + {rest}: {}", e.detail));
                let joined = base.join(&format!("./{rest}")).unwrap();
                assert_eq!(ours.as_str(), joined.as_str(), "{base} + {rest}");
            }
        }
    }

    #[test]
    fn proxy_paths_refuse_what_a_server_behind_could_read_differently() {
        let base = url::Url::parse("https://api.example/v1/").unwrap();
        for bad in [
            "/api/connections/c/proxy/items/..;/admin",
            "/api/connections/c/proxy/items;jsessionid=1",
            "/api/connections/c/proxy/items/%252e%252e/admin",
            "/api/connections/c/proxy/a%5Cb",
            "/api/connections/c/proxy/a%3Bb",
            "/api/connections/c/proxy/a%00b",
            "/api/portal/connections/c/proxy/%2e",
        ] {
            assert!(proxy_target(&base, bad, None).is_err(), "{bad} should be refused");
        }
        let portal = proxy_target(&base, "/api/portal/connections/proxy/proxy/items/", None).unwrap();
        assert_eq!(portal.as_str(), "https://api.example/v1/items/", "an id named proxy is the id");
        let spaced = proxy_target(&base, "/api/connections/c/proxy/a%20b", None).unwrap();
        assert_eq!(spaced.as_str(), "https://api.example/v1/a%20b");
    }
}
