//! Which code answers which path and method: the paths and methods are [`ROUTES`]'s,
//! the code is named here.
//!
//! Paths are those the Functions host forwards (`/api/...`, the full original path)
//! and those it calls itself (`/` for readiness, `/refresh` for the timer).

use warp::http::StatusCode;

use super::back_office as connections;
use super::error::{ApiError, Audience};
use super::filters::Matched;
use super::request::Request;
use super::response::{self, Response};
use super::routes::ROUTES;
use super::{binding, callback, captures, health, portal, tenants, timer};
use crate::app::services::Services;

type Outcome = (&'static str, Audience, Result<Response, ApiError>);

/// A route's work, boxed.
type Handling<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, ApiError>> + Send + 'a>>;

/// An answer known without waiting, as a [`Handling`].
fn ready<'a>(answer: Result<Response, ApiError>) -> Handling<'a> {
    Box::pin(std::future::ready(answer))
}

/// Runs the route the request matched ([`super::filters`]), or says why none did: a path
/// that some routes match but none with this method is `405` with `Allow`, any other
/// `404`. Returns the route template (for the log line), who the caller is (for the
/// error format) and the outcome.
pub async fn dispatch(s: &Services, req: Request, matched: Option<Matched>) -> Outcome {
    let Some(Matched { route, params }) = matched else { return unmatched(&req) };
    let id = params.first().map(|p| percent_decode(p)).unwrap_or_default();
    let id = id.as_str();
    // Each route's work is boxed: one allocation of its own size, where the unboxed match
    // made this future as large as the largest handler's (9 KB; 28 KB once wrapped by the
    // request's span and upstream timing), copied whole at each layer on every request
    // (`perf`: `memmove` 12 % of the proxy's cycles).
    let handling: Handling<'_> = match route.template {
        // The host's readiness probe and health ping: any answer counts.
        "/" => ready(Ok(response::text(StatusCode::OK, "ok\n"))),
        "/refresh" => Box::pin(timer::invoke(&s.timer, req)),
        "/api/openapi.json" => ready(Ok(super::openapi::serve(&s.server.redirect_uri))),
        "/api/health" => Box::pin(health::handle(&s.health, req)),
        "/api/oauth/callback" => Box::pin(callback::handle(&s.callback, req)),
        "/api/oauth/bind" => Box::pin(binding::handle(&s.callback, req)),
        "/api/oauth/consent" => Box::pin(tenants::consent(&s.tenants, req)),
        "/api/oauth/onboard" => Box::pin(tenants::onboard(&s.tenants, req)),
        "/api/connections" => Box::pin(connections::collection(&s.back_office, req)),
        "/api/connections/import" => Box::pin(connections::import(&s.back_office, req)),
        "/api/connections/{id}" => Box::pin(connections::item(&s.back_office, req, id)),
        "/api/connections/{id}/token" => Box::pin(connections::token(&s.back_office, req, id)),
        "/api/connections/{id}/reconnect" => Box::pin(connections::reconnect(&s.back_office, req, id)),
        "/api/connections/{id}/proxy/{*path}" => Box::pin(connections::proxy(&s.back_office, req, id)),
        "/api/connections/{id}/call/{*path}" => {
            let tail = params.get(1).map(String::as_str).unwrap_or_default();
            Box::pin(connections::call(&s.back_office, req, id, tail))
        }
        "/api/captures" => Box::pin(captures::handle(&s.back_office, req)),
        "/api/mcp" => Box::pin(super::mcp::handle(&s.agents, req)),
        "/api/mcp/.well-known/oauth-protected-resource" | "/.well-known/oauth-protected-resource/api/mcp" => {
            ready(Ok(super::mcp::metadata(&s.agents)))
        }
        "/api/tenants" => Box::pin(tenants::collection(&s.tenants, req)),
        "/api/tenants/{id}" => Box::pin(tenants::item(&s.tenants, req, id)),
        "/api/tenants/{id}/onboard" => Box::pin(tenants::onboard_link(&s.tenants, req, id)),
        "/api/tenants/{id}/check" => Box::pin(tenants::check(&s.tenants, req, id)),
        "/api/portal/me" => Box::pin(portal::me(&s.portal, req)),
        "/api/portal/connections" => Box::pin(portal::connections(&s.portal, req)),
        "/api/portal/connections/{id}" => Box::pin(portal::connection(&s.portal, req, id)),
        "/api/portal/connections/{id}/proxy/{*path}" => Box::pin(portal::proxy(&s.portal, req, id)),
        other => ready(Err(ApiError::internal(format!("the route {other} has no handler")))),
    };
    (route.template, route.audience, handling.await)
}

/// `405` with `Allow` when some route has this path, else `404`.
fn unmatched(req: &Request) -> Outcome {
    let segments: Vec<String> = req.path.split('/').filter(|s| !s.is_empty()).map(percent_decode).collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    if let Some(r) = ROUTES.iter().find(|r| r.matches(&segs).is_some()) {
        return (r.template, r.audience, Err(ApiError::method_not_allowed(&r.methods().collect::<Vec<_>>())));
    }
    let audience =
        if segs.first() == Some(&"api") && segs.get(1) == Some(&"oauth") { Audience::Browser } else { Audience::Api };
    ("(unknown)", audience, Err(ApiError::not_found(format!("There is no route {} {}.", req.method, req.path))))
}

/// Decodes `%xx` escapes in one path segment; invalid UTF-8 is kept lossily, and the
/// route's own validation rejects what it does not accept.
fn percent_decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment).decode_utf8_lossy().into_owned()
}
