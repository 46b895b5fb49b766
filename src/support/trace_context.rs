//! W3C Trace Context (`traceparent`, `tracestate`) in and out.
//!
//! A request's span continues the caller's trace ([`incoming`]); every outbound call
//! sends the current span's context on ([`inject`]), so one callback shows as one
//! operation from the browser's redirect to the provider's token endpoint and Dataverse.
//! Without the telemetry layer installed the current context is empty and nothing is sent.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The caller's trace context from a request's headers (empty when absent or malformed).
pub fn incoming(headers: &reqwest::header::HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes the current span's context into outgoing headers, replacing any the caller
/// passed in (a proxied request must not carry the caller's trace ids past us).
pub fn inject(headers: &mut reqwest::header::HeaderMap) {
    headers.remove("traceparent");
    headers.remove("tracestate");
    TraceContextPropagator::new().inject_context(&opentelemetry::Context::current(), &mut HeaderInjector(headers));
}
