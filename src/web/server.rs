//! The HTTP server: warp accepts connections, one catch-all filter turns each request
//! into a [`Request`], and [`super::router`] sends it to the code that owns the route.
//!
//! Routing is done here rather than with a tree of warp filters so that an unknown
//! route is always 404, a known route with the wrong method is always 405 with `Allow`,
//! and each request produces exactly one log line with its route template, status and
//! duration (never its query string, which can carry an authorization code).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Buf;
use futures_util::StreamExt;
use warp::Filter;
use warp::http::{HeaderMap, Method};

use super::error::Audience;
use super::request::{BodyStream, Request};
use super::response::{self, Response};
use super::{cors, router};
use crate::app::App;
use crate::outbound::timing;

/// Serves until `shutdown` completes, then lets open requests finish.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let max_body = app.config.limits.max_body_bytes;
    let filter = warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().map(Some).or(warp::any().map(|| None)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::addr::remote())
        .and(warp::body::stream())
        .then(
            move |method: Method,
                  path: warp::path::FullPath,
                  query: Option<String>,
                  headers: HeaderMap,
                  remote: Option<SocketAddr>,
                  body| {
                let app = app.clone();
                let mut req = Request::new(method, path.as_str().to_string(), query, headers, boxed(body), max_body);
                req.remote = remote;
                async move { handle(&app, req).await }
            },
        )
        .recover(|_rejection: warp::Rejection| async move {
            // The catch-all filter never rejects; this keeps the types infallible.
            Ok::<_, Infallible>(response::empty(warp::http::StatusCode::NOT_FOUND))
        });
    warp::serve(filter).incoming(listener).graceful(shutdown).run().await;
}

/// Erases warp's body stream type (it cannot be named) into our boxed stream.
fn boxed<S, B>(body: S) -> BodyStream
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Send + Sync + 'static,
    B: Buf,
{
    Box::pin(body.map(|chunk| chunk.map(|mut b| b.copy_to_bytes(b.remaining()))))
}

/// Handles one request end to end, including its log line.
pub async fn handle(app: &App, req: Request) -> Response {
    let started = Instant::now();
    let method = req.method.clone();
    let invocation = req.header("x-azure-functions-invocationid").map(str::to_string);
    let path = req.path.clone();
    // The portal API is called across origins: CORS first, when this layer answers it.
    let portal = path == "/api/portal" || path.starts_with("/api/portal/");
    let mut allowed_origin = None;
    if portal && app.config.portal.handler_cors {
        let requested = req.header(warp::http::header::ACCESS_CONTROL_REQUEST_METHOD).map(str::to_string);
        let origin = req.headers.get(warp::http::header::ORIGIN);
        match cors::check(&app.config.portal.origins, &method, origin, requested.as_deref()) {
            cors::Verdict::NoOrigin => {}
            cors::Verdict::Allowed(origin) => allowed_origin = Some(origin),
            cors::Verdict::Preflight(resp) => return log_line(started, &method, "(preflight)", resp, invocation),
            cors::Verdict::Denied(err) => {
                let mut resp = err.into_response(Audience::Api, &path);
                cors::vary_origin(&mut resp);
                return log_line(started, &method, "(cors)", resp, invocation);
            }
        }
    }
    let ((route, audience, result), upstream_nanos) = timing::measure(router::dispatch(app, req)).await;
    let mut resp = match result {
        Ok(resp) => resp,
        Err(err) => {
            // Both are warnings on stdout: a caller's mistake is not our error, and the host
            // counts every stderr line as one. Our own faults were logged as errors where
            // they happened (`ApiError::internal`). The field is `problem`, not `code`, so
            // the log redaction (which masks `code=` values) leaves the slug readable.
            if err.status.is_server_error() {
                tracing::warn!(route, problem = err.code, detail = %err.detail, "request failed");
            } else {
                tracing::warn!(route, status = err.status.as_u16(), problem = err.code, "request refused");
            }
            err.into_response(audience, &path)
        }
    };
    if portal {
        match &allowed_origin {
            Some(origin) => cors::decorate(&mut resp, origin),
            None => cors::vary_origin(&mut resp),
        }
    }
    // W3C Server-Timing: the handler's own share and the upstreams' (no secrets, numbers).
    let total = started.elapsed().as_secs_f64() * 1000.0;
    let upstream_ms = upstream_nanos as f64 / 1e6;
    let timing = format!("app;dur={:.2}, upstream;dur={upstream_ms:.2}", (total - upstream_ms).max(0.0));
    if let Ok(v) = warp::http::HeaderValue::from_str(&timing) {
        resp.headers_mut().insert("server-timing", v);
    }
    log_line(started, &method, route, resp, invocation)
}

/// The one log line of a request: method, route template, status, duration.
fn log_line(started: Instant, method: &Method, route: &str, resp: Response, invocation: Option<String>) -> Response {
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let status = resp.status().as_u16();
    match invocation {
        Some(id) => {
            tracing::info!(target: "request", %method, route, status, ms = format_args!("{ms:.2}"), invocation = %id)
        }
        None => tracing::info!(target: "request", %method, route, status, ms = format_args!("{ms:.2}")),
    }
    resp
}

/// Binds the listener first, so bind errors are reported instead of panicking in warp.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
