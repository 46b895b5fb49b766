//! `GET /api/health`: version, uptime, and whether each configured dependency is
//! ready. Says nothing secret: no URLs with credentials, no key material, no tokens.

use serde_json::json;
use warp::http::StatusCode;

use super::{ApiError, Response, response};
use crate::app::App;

pub async fn handle(app: &App) -> Result<Response, ApiError> {
    let store = app.connections.store();
    // Answering is not enough: the tables and keys must be there too.
    let checked = match store.ping().await {
        Ok(()) => store.check_schema().await,
        Err(e) => Err(e),
    };
    let store = match checked {
        Ok(()) => json!({ "kind": store.kind(), "ready": true }),
        Err(e) => json!({ "kind": store.kind(), "ready": false, "detail": e.to_string() }),
    };
    let store_ready = store["ready"].as_bool().unwrap_or(false);
    let back_office = match &app.back_office {
        Some(v) => json!({ "configured": true, "issuer": v.issuer(), "signing_keys_loaded": v.keys_loaded() }),
        None => json!({ "configured": false }),
    };
    let body = json!({
        "status": if store_ready { "ok" } else { "degraded" },
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": app.started.elapsed().as_secs(),
        "started_at": crate::time::rfc3339(app.started_at),
        "under_functions_host": app.config.listen.under_host,
        "dependencies": {
            "store": store,
            "providers": { "ready": true, "count": app.connections.catalog().len() },
            "secrets": { "source": app.secrets.describe() },
            "encryption": encryption(app),
            "back_office_auth": back_office,
        },
    });
    let mut body = body;
    if let Some(run) = app.last_timer_run() {
        body["timer"] = json!({
            "last_run_at": crate::time::rfc3339(run.at),
            "last_run_ms": run.ms,
            "refreshed": run.refreshed,
            "needs_reauth": run.needs_reauth,
            "failed": run.failed,
        });
    }
    let status = if store_ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok(response::json(status, &body))
}

/// The current key, and how many records the last key-rotation pass (the timer's or
/// `handler reseal` in this process) left under each older key: an older key may be
/// removed once its count is zero on every instance's report, or `handler reseal` says so.
fn encryption(app: &App) -> serde_json::Value {
    let mut e = json!({ "current_key_id": app.keys.current_id() });
    if let Some(r) = app.connections.last_reseal() {
        e["records_under_older_keys"] = json!(r.remaining);
        e["checked_for_key"] = json!(r.current_key);
    }
    e
}
