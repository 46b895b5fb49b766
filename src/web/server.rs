//! The HTTP server: the route table's warp filters ([`super::filters`]) served through
//! `warp::service` on hyper-util's connection loop, and the one path every request takes
//! through them ([`handle`]).
//!
//! The loop is hyper-util's rather than warp's own because a server facing the internet
//! needs what warp's does not set: a deadline for a request's headers, so half-sent
//! requests do not hold connections open; client hang-ups and malformed requests logged
//! as debug rather than errors (the host counts every stderr line as one); the peer's
//! address on every request; and a graceful shutdown.
//!
//! Every request produces exactly one log line with its route template, status and
//! duration (never its query string, which can carry an authorization code); an unknown
//! route is `404`, a known route with the wrong method `405` with `Allow`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use warp::Filter;
use warp::http::Method;

use super::error::Audience;
use super::filters::{self, Matched, Peer};
use super::request::Request;
use super::response::Response;
use super::{cors, router};
use crate::app::services::Services;
use crate::support::outbound::timing;

/// The warp filter every request goes through: the request taken apart, the route it
/// matches, and [`handle`].
pub fn filter(services: Arc<Services>) -> warp::filters::BoxedFilter<(Response,)> {
    let limits = Arc::new(services.server.limits.clone());
    filters::request(limits)
        .and(filters::routes())
        .then(move |req: Request, matched: Option<Matched>| {
            let services = services.clone();
            // Boxed here, once: the handler's future is large, and unboxed it was copied by
            // each warp layer above it and into warp's own box (a memcpy per request that
            // `perf` put at 3 % of the proxy's cycles).
            Box::pin(async move { handle(&services, req, matched).await })
        })
        .boxed()
}

/// Serves until `shutdown` completes, then lets open requests finish.
pub async fn serve(
    services: Arc<Services>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let header_timeout = services.server.limits.header_read_timeout;
    let routes = warp::service(filter(services));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!("could not accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let routes = routes.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(Peer(remote));
            let mut routes = routes.clone();
            async move { tower_service::Service::call(&mut routes, req).await }
        });
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn).await {
                // A client that hangs up, times out or sends garbage: not our error.
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Handles one request end to end inside its span, including its log line.
///
/// The span is the request as Application Insights shows it (kind server): it continues
/// the caller's `traceparent` (in proxying mode the host's own, so the host's request and
/// ours are one operation) and carries the host's invocation id. Its route and status are
/// filled in by [`log_line`], which every path through here ends with.
pub async fn handle(s: &Services, req: Request, matched: Option<Matched>) -> Response {
    use tracing::Instrument;
    use tracing::field::Empty;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let invocation = req.header("x-azure-functions-invocationid").map(str::to_string);
    let span = tracing::info_span!(
        "request",
        otel.kind = "server",
        otel.name = %req.method,
        http.request.method = %req.method,
        http.route = Empty,
        http.response.status_code = Empty,
        otel.status_code = Empty,
        faas.trigger = "http",
        faas.invocation_id = invocation.as_deref(),
    );
    // A malformed or absent `traceparent` starts a new trace: nothing to refuse.
    let _ = span.set_parent(crate::support::trace_context::incoming(&req.headers));
    handle_in_span(s, req, matched, invocation).instrument(span).await
}

async fn handle_in_span(s: &Services, req: Request, matched: Option<Matched>, invocation: Option<String>) -> Response {
    let started = Instant::now();
    let method = req.method.clone();
    let path = req.path.clone();
    // Anyone can send requests without credentials (the callback, health, junk): they get
    // a bounded number of places, so a flood of slow ones cannot hold the server.
    let _place = if req.headers.contains_key(warp::http::header::AUTHORIZATION) {
        None
    } else {
        match s.server.anonymous.try_acquire() {
            Ok(place) => Some(place),
            Err(_) => {
                let err = super::ApiError::unavailable(
                    "busy",
                    "Too many requests without credentials are in progress; retry shortly.",
                    Some(1),
                );
                return log_line(started, &method, "(busy)", err.into_response(Audience::Api, &path), invocation);
            }
        }
    };
    // The portal API is called across origins: CORS first, when this layer answers it.
    let portal = path == "/api/portal" || path.starts_with("/api/portal/");
    let mut allowed_origin = None;
    if portal && let Some(origins) = &s.server.portal_cors {
        let requested = req.header(warp::http::header::ACCESS_CONTROL_REQUEST_METHOD).map(str::to_string);
        let origin = req.headers.get(warp::http::header::ORIGIN);
        match cors::check(origins, &method, origin, requested.as_deref()) {
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
    let ((route, audience, result), upstream_nanos) = timing::measure(router::dispatch(s, req, matched)).await;
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
    let total = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    if let Ok(v) = warp::http::HeaderValue::try_from(server_timing(total, upstream_nanos)) {
        resp.headers_mut().insert("server-timing", v);
    }
    log_line(started, &method, route, resp, invocation)
}

/// W3C Server-Timing: the handler's own share and the upstreams', in milliseconds with two
/// decimals (no secrets, numbers). Written from whole numbers: formatting the two as
/// floats was most of what the header cost.
fn server_timing(total_nanos: u64, upstream_nanos: u64) -> String {
    use std::fmt::Write;
    let hundredths = |nanos: u64| nanos.saturating_add(5_000) / 10_000;
    let (app, upstream) = (hundredths(total_nanos.saturating_sub(upstream_nanos)), hundredths(upstream_nanos));
    let mut out = String::with_capacity(48);
    let _ =
        write!(out, "app;dur={}.{:02}, upstream;dur={}.{:02}", app / 100, app % 100, upstream / 100, upstream % 100);
    out
}

/// The one log line of a request: method, route template, status, duration.
fn log_line(started: Instant, method: &Method, route: &str, resp: Response, invocation: Option<String>) -> Response {
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let status = resp.status().as_u16();
    let span = tracing::Span::current();
    span.record("otel.name", format_args!("{method} {route}"));
    span.record("http.route", route);
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    match invocation {
        // Every line has a message (JSON logs too): the request in words, then its fields.
        Some(id) => tracing::info!(
            target: "request", %method, route, status, ms = format_args!("{ms:.2}"), invocation = %id,
            "{method} {route} {status} {ms:.2} ms"
        ),
        None => tracing::info!(
            target: "request", %method, route, status, ms = format_args!("{ms:.2}"),
            "{method} {route} {status} {ms:.2} ms"
        ),
    }
    resp
}

/// Binds the listener first, so bind errors are reported instead of panicking in warp.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::server_timing;

    /// The header reads as the float formatting it replaced (`{:.2}` of milliseconds),
    /// up to how a value exactly halfway between two hundredths rounds.
    #[test]
    fn server_timing_reads_as_milliseconds_with_two_decimals() {
        for (total, upstream) in [
            (0, 0),
            (4_999, 0),
            (5_001, 0),
            (1_234_567, 1_000_000),
            (987_654_321, 12_345_678),
            (10_000_000_000, 9_999_990_000),
            (3, 7), // the upstream's clock read later than the total's: the app's share is 0
        ] {
            let ms = |n: u64| n as f64 / 1e6;
            let expected =
                format!("app;dur={:.2}, upstream;dur={:.2}", (ms(total) - ms(upstream)).max(0.0), ms(upstream));
            assert_eq!(server_timing(total, upstream), expected, "{total} / {upstream}");
        }
        assert_eq!(server_timing(u64::MAX, 0).split(", ").count(), 2, "no overflow");
    }
}
