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

/// Runs the route the request matched ([`super::filters`]), or says why none did: a path
/// that some routes match but none with this method is `405` with `Allow`, any other
/// `404`. Returns the route template (for the log line), who the caller is (for the
/// error format) and the outcome.
pub async fn dispatch(s: &Services, req: Request, matched: Option<Matched>) -> Outcome {
    let Some(Matched { route, params }) = matched else { return unmatched(&req) };
    let id = params.first().map(|p| percent_decode(p)).unwrap_or_default();
    let id = id.as_str();
    let result = match route.template {
        // The host's readiness probe and health ping: any answer counts.
        "/" => Ok(response::text(StatusCode::OK, "ok\n")),
        "/refresh" => timer::invoke(&s.timer, req).await,
        "/api/openapi.json" => Ok(super::openapi::serve(&s.server.redirect_uri)),
        "/api/health" => health::handle(&s.health, req).await,
        "/api/oauth/callback" => callback::handle(&s.callback, req).await,
        "/api/oauth/bind" => binding::handle(&s.callback, req).await,
        "/api/oauth/consent" => tenants::consent(&s.tenants, req).await,
        "/api/oauth/onboard" => tenants::onboard(&s.tenants, req).await,
        "/api/connections" => connections::collection(&s.back_office, req).await,
        "/api/connections/import" => connections::import(&s.back_office, req).await,
        "/api/connections/{id}" => connections::item(&s.back_office, req, id).await,
        "/api/connections/{id}/token" => connections::token(&s.back_office, req, id).await,
        "/api/connections/{id}/reconnect" => connections::reconnect(&s.back_office, req, id).await,
        "/api/connections/{id}/proxy/{*path}" => connections::proxy(&s.back_office, req, id).await,
        "/api/connections/{id}/call/{*path}" => {
            let tail = params.get(1).cloned().unwrap_or_default();
            connections::call(&s.back_office, req, id, &tail).await
        }
        "/api/captures" => captures::handle(&s.back_office, req).await,
        "/api/mcp" => super::mcp::handle(&s.agents, req).await,
        "/api/mcp/.well-known/oauth-protected-resource" | "/.well-known/oauth-protected-resource/api/mcp" => {
            Ok(super::mcp::metadata(&s.agents))
        }
        "/api/tenants" => tenants::collection(&s.tenants, req).await,
        "/api/tenants/{id}" => tenants::item(&s.tenants, req, id).await,
        "/api/tenants/{id}/onboard" => tenants::onboard_link(&s.tenants, req, id).await,
        "/api/tenants/{id}/check" => tenants::check(&s.tenants, req, id).await,
        "/api/portal/me" => portal::me(&s.portal, req).await,
        "/api/portal/connections" => portal::connections(&s.portal, req).await,
        "/api/portal/connections/{id}" => portal::connection(&s.portal, req, id).await,
        "/api/portal/connections/{id}/proxy/{*path}" => portal::proxy(&s.portal, req, id).await,
        other => Err(ApiError::internal(format!("the route {other} has no handler"))),
    };
    (route.template, route.audience, result)
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
