//! W3C Trace Context (`traceparent`, `tracestate`) in and out.
//!
//! A request's span continues the caller's trace ([`incoming`]); every outbound call
//! sends the current span's context on ([`inject`]), so one callback shows as one
//! operation from the browser's redirect to the provider's token endpoint and Dataverse.
//! Without the telemetry layer installed the current context is empty and nothing is sent.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// Whether spans carry trace contexts: only the telemetry layer gives them one, and
/// without it a context read from a request is dropped and none is ever sent, so neither
/// is worked out (two propagator passes per proxied call, for nothing).
static ACTIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says that spans carry trace contexts from now on (the telemetry layer is installed).
pub fn activate() {
    ACTIVE.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether spans carry trace contexts ([`activate`]).
pub fn active() -> bool {
    ACTIVE.load(std::sync::atomic::Ordering::Relaxed)
}

/// The caller's trace context from a request's headers (empty when absent or malformed,
/// or when no span could carry it).
pub fn incoming(headers: &reqwest::header::HeaderMap) -> opentelemetry::Context {
    if !active() {
        return opentelemetry::Context::new();
    }
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes the current span's context into outgoing headers, replacing any the caller
/// passed in (a proxied request must not carry the caller's trace ids past us).
pub fn inject(headers: &mut reqwest::header::HeaderMap) {
    headers.remove("traceparent");
    headers.remove("tracestate");
    if !active() {
        return;
    }
    TraceContextPropagator::new().inject_context(&opentelemetry::Context::current(), &mut HeaderInjector(headers));
}
