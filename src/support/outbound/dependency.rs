//! One span per outbound HTTP call, with the trace context sent along.
//!
//! Every call to a provider, Dataverse, F&O, an issuer's keys or a webhook goes through
//! [`send`], so each shows in Application Insights as a dependency of the request that
//! made it, and the upstream (when it traces too) joins the same operation. The span
//! carries the method, host, port, path and status; never the query string, which can
//! hold a secret, and never a header or body.

use tracing::Instrument;
use tracing::field::Empty;

/// Sends a request built by `req` inside a client span, with `traceparent` injected.
pub async fn send(req: reqwest::RequestBuilder) -> reqwest::Result<reqwest::Response> {
    let (client, built) = req.build_split();
    let mut request = built?;
    let span = tracing::info_span!(
        "dependency",
        otel.kind = "client",
        otel.name = Empty,
        http.request.method = Empty,
        server.address = Empty,
        server.port = Empty,
        url.full = Empty,
        http.response.status_code = Empty,
        otel.status_code = Empty,
    );
    // The fields are worked out only for a span some layer keeps: a proxied call at
    // `LOG_LEVEL=warn` without export copies no URL.
    if !span.is_disabled() {
        let (url, method) = (request.url(), request.method());
        let host = url.host_str().unwrap_or_default();
        let mut target = url.clone();
        target.set_query(None);
        target.set_fragment(None);
        span.record("otel.name", format_args!("{method} {host}"));
        span.record("http.request.method", format_args!("{method}"));
        span.record("server.address", host);
        span.record("server.port", url.port_or_known_default().unwrap_or_default());
        span.record("url.full", format_args!("{target}"));
    }
    async move {
        crate::support::trace_context::inject(request.headers_mut());
        let result = client.execute(request).await;
        let span = tracing::Span::current();
        match &result {
            Ok(resp) => {
                span.record("http.response.status_code", resp.status().as_u16());
                if resp.status().is_server_error() {
                    span.record("otel.status_code", "ERROR");
                }
            }
            Err(_) => {
                span.record("otel.status_code", "ERROR");
            }
        }
        result
    }
    .instrument(span)
    .await
}
