//! The few counters exported beside the spans: what an operator charts or alerts on.
//!
//! They come from the global meter, which is a no-op until the telemetry client's start
//! sets one, so callers record unconditionally and pay nothing without export.

use std::sync::LazyLock;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

struct Instruments {
    refreshes: Counter<u64>,
    status_changes: Counter<u64>,
    timer_runs: Histogram<f64>,
}

static INSTRUMENTS: LazyLock<Instruments> = LazyLock::new(|| {
    let meter = opentelemetry::global::meter("dynamics-companion");
    Instruments {
        refreshes: meter
            .u64_counter("dc.token.refreshes")
            .with_description("Refresh-token grants, by outcome (granted, failed)")
            .build(),
        status_changes: meter
            .u64_counter("dc.connection.status_changes")
            .with_description("Connections entering a status (active, needs_reauth, failed, deleted)")
            .build(),
        timer_runs: meter
            .f64_histogram("dc.timer.duration")
            .with_unit("s")
            .with_description("How long each timer run took")
            .build(),
    }
});

/// One refresh grant asked of a provider; `granted` is whether it gave tokens.
pub fn refresh(granted: bool) {
    INSTRUMENTS.refreshes.add(1, &[KeyValue::new("outcome", if granted { "granted" } else { "failed" })]);
}

/// A connection entered `status`.
pub fn status_change(status: &'static str) {
    INSTRUMENTS.status_changes.add(1, &[KeyValue::new("status", status)]);
}

/// A timer run finished after `seconds`.
pub fn timer_run(seconds: f64) {
    INSTRUMENTS.timer_runs.record(seconds, &[]);
}
