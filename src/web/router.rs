//! The route table: which code answers which path and method.
//!
//! Paths are those the Functions host forwards (`/api/...`, the full original path)
//! and those it calls itself (`/` for readiness, `/refresh` for the timer).

use warp::http::{Method, StatusCode};

use super::back_office as connections;
use super::error::{ApiError, Audience};
use super::request::Request;
use super::response::{self, Response};
use super::{binding, callback, captures, health, portal, tenants, timer};
use crate::app::App;

type Outcome = (&'static str, Audience, Result<Response, ApiError>);

/// Finds the route for a request and runs it. Returns the route template (for the
/// log line), who the caller is (for the error format) and the outcome.
pub async fn dispatch(app: &App, req: Request) -> Outcome {
    let segments: Vec<String> = req.path.split('/').filter(|s| !s.is_empty()).map(percent_decode).collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let m = req.method.clone();

    macro_rules! route {
        ($template:expr, $audience:expr, [$($allowed:expr),+], $run:expr) => {{
            let allowed: &[Method] = &[$($allowed),+];
            if allowed.contains(&m) || (m == Method::HEAD && allowed.contains(&Method::GET)) {
                ($template, $audience, $run.await)
            } else {
                let names: Vec<&str> = allowed.iter().map(Method::as_str).collect();
                ($template, $audience, Err(ApiError::method_not_allowed(&names)))
            }
        }};
    }

    use Audience::{Api, Browser};
    match segs.as_slice() {
        // The host's readiness probe and health ping: any answer counts.
        [] => route!("/", Api, [Method::GET], async { Ok(response::text(StatusCode::OK, "ok\n")) }),
        // The timer function, invoked by the host with the payload protocol.
        ["refresh"] => route!("/refresh", Api, [Method::POST], timer::invoke(app, req)),
        ["api", "health"] => route!("/api/health", Api, [Method::GET], health::handle(app, req)),
        ["api", "oauth", "callback"] => {
            route!("/api/oauth/callback", Browser, [Method::GET, Method::POST], callback::handle(app, req))
        }
        ["api", "oauth", "consent"] => route!("/api/oauth/consent", Browser, [Method::GET], tenants::consent(app, req)),
        ["api", "tenants"] => route!("/api/tenants", Api, [Method::GET, Method::POST], tenants::collection(app, req)),
        ["api", "tenants", id] => {
            route!("/api/tenants/{id}", Api, [Method::GET, Method::DELETE], tenants::item(app, req, id))
        }
        ["api", "oauth", "onboard"] => route!("/api/oauth/onboard", Browser, [Method::GET], tenants::onboard(app, req)),
        ["api", "tenants", id, "onboard"] => {
            route!("/api/tenants/{id}/onboard", Api, [Method::POST], tenants::onboard_link(app, req, id))
        }
        ["api", "tenants", id, "check"] => {
            route!("/api/tenants/{id}/check", Api, [Method::POST], tenants::check(app, req, id))
        }
        ["api", "oauth", "bind"] => {
            route!("/api/oauth/bind", Browser, [Method::GET, Method::POST], binding::handle(app, req))
        }
        ["api", "connections"] => {
            route!("/api/connections", Api, [Method::GET, Method::POST], connections::collection(app, req))
        }
        ["api", "connections", "import"] if m == Method::POST => {
            route!("/api/connections/import", Api, [Method::POST], connections::import(app, req))
        }
        ["api", "connections", id] => {
            route!("/api/connections/{id}", Api, [Method::GET, Method::DELETE], connections::item(app, req, id))
        }
        ["api", "connections", id, "token"] => {
            route!("/api/connections/{id}/token", Api, [Method::POST], connections::token(app, req, id))
        }
        ["api", "connections", id, "reconnect"] => {
            route!("/api/connections/{id}/reconnect", Api, [Method::POST], connections::reconnect(app, req, id))
        }
        ["api", "connections", id, "proxy", ..] => {
            route!(
                "/api/connections/{id}/proxy/{*path}",
                Api,
                [Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE],
                connections::proxy(app, req, id)
            )
        }
        ["api", "portal", "me"] => route!("/api/portal/me", Api, [Method::GET], portal::me(app, req)),
        ["api", "portal", "connections"] => {
            route!("/api/portal/connections", Api, [Method::GET, Method::POST], portal::connections(app, req))
        }
        ["api", "portal", "connections", id] => {
            route!("/api/portal/connections/{id}", Api, [Method::GET, Method::DELETE], portal::connection(app, req, id))
        }
        ["api", "portal", "connections", id, "proxy", ..] => route!(
            "/api/portal/connections/{id}/proxy/{*path}",
            Api,
            [Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE],
            portal::proxy(app, req, id)
        ),
        ["api", "captures"] => {
            route!("/api/captures", Api, [Method::GET, Method::POST], captures::handle(app, req))
        }
        _ => (
            "(unknown)",
            if segs.first() == Some(&"api") && segs.get(1) == Some(&"oauth") { Browser } else { Api },
            Err(ApiError::not_found(format!("There is no route {} {}.", m, req.path))),
        ),
    }
}

/// Decodes `%xx` escapes in one path segment; invalid UTF-8 is kept lossily, and the
/// route's own validation rejects what it does not accept.
fn percent_decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment).decode_utf8_lossy().into_owned()
}
