//! Which code answers which path and method: the paths and methods are [`ROUTES`]'s,
//! the code is named here.
//!
//! Paths are those the Functions host forwards (`/api/...`, the full original path)
//! and those it calls itself (`/` for readiness, `/refresh` for the timer).

use warp::http::StatusCode;

use super::back_office as connections;
use super::error::{ApiError, Audience};
use super::request::Request;
use super::response::{self, Response};
use super::routes::{ROUTES, Route};
use super::{binding, callback, captures, health, portal, tenants, timer};
use crate::app::App;

type Outcome = (&'static str, Audience, Result<Response, ApiError>);

/// Finds the route for a request ([`ROUTES`]) and runs it. Returns the route template
/// (for the log line), who the caller is (for the error format) and the outcome. A path
/// several templates match goes to the first that accepts the method (`/api/connections/
/// import` is `POST` only; `GET` on it reads a connection named "import"); a path that
/// matches but whose routes accept no such method is `405` with `Allow`.
pub async fn dispatch(app: &App, req: Request) -> Outcome {
    let segments: Vec<String> = req.path.split('/').filter(|s| !s.is_empty()).map(percent_decode).collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = req.method.as_str().to_string();
    let mut path_matched: Option<&Route> = None;
    let mut found = None;
    for route in ROUTES {
        if let Some(params) = route.matches(&segs) {
            if route.allows(&method) {
                found = Some((route, params.first().map(|p| p.to_string()).unwrap_or_default()));
                break;
            }
            path_matched.get_or_insert(route);
        }
    }
    let Some((route, id)) = found else {
        return match path_matched {
            Some(r) => (r.template, r.audience, Err(ApiError::method_not_allowed(&r.methods().collect::<Vec<_>>()))),
            None => (
                "(unknown)",
                if segs.first() == Some(&"api") && segs.get(1) == Some(&"oauth") {
                    Audience::Browser
                } else {
                    Audience::Api
                },
                Err(ApiError::not_found(format!("There is no route {} {}.", req.method, req.path))),
            ),
        };
    };
    let id = id.as_str();
    let result = match route.template {
        // The host's readiness probe and health ping: any answer counts.
        "/" => Ok(response::text(StatusCode::OK, "ok\n")),
        "/refresh" => timer::invoke(app, req).await,
        "/api/openapi.json" => Ok(super::openapi::serve(app)),
        "/api/health" => health::handle(app, req).await,
        "/api/oauth/callback" => callback::handle(app, req).await,
        "/api/oauth/bind" => binding::handle(app, req).await,
        "/api/oauth/consent" => tenants::consent(app, req).await,
        "/api/oauth/onboard" => tenants::onboard(app, req).await,
        "/api/connections" => connections::collection(app, req).await,
        "/api/connections/import" => connections::import(app, req).await,
        "/api/connections/{id}" => connections::item(app, req, id).await,
        "/api/connections/{id}/token" => connections::token(app, req, id).await,
        "/api/connections/{id}/reconnect" => connections::reconnect(app, req, id).await,
        "/api/connections/{id}/proxy/{*path}" => connections::proxy(app, req, id).await,
        "/api/captures" => captures::handle(app, req).await,
        "/api/tenants" => tenants::collection(app, req).await,
        "/api/tenants/{id}" => tenants::item(app, req, id).await,
        "/api/tenants/{id}/onboard" => tenants::onboard_link(app, req, id).await,
        "/api/tenants/{id}/check" => tenants::check(app, req, id).await,
        "/api/portal/me" => portal::me(app, req).await,
        "/api/portal/connections" => portal::connections(app, req).await,
        "/api/portal/connections/{id}" => portal::connection(app, req, id).await,
        "/api/portal/connections/{id}/proxy/{*path}" => portal::proxy(app, req, id).await,
        other => Err(ApiError::internal(format!("the route {other} has no handler"))),
    };
    (route.template, route.audience, result)
}

/// Decodes `%xx` escapes in one path segment; invalid UTF-8 is kept lossily, and the
/// route's own validation rejects what it does not accept.
fn percent_decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment).decode_utf8_lossy().into_owned()
}
