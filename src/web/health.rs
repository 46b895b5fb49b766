//! `GET /api/health`: liveness for anyone; readiness and counters for operators.
//!
//! A caller without a token (a probe, anyone on the internet) gets liveness only: that
//! the process answers, its version and uptime. It never causes a store request, so
//! anonymous probes cannot spend the operator's Dataverse budget. An operator (a
//! back-office token of the deployment's own tenant) also gets each dependency's
//! readiness, whose store check runs at most once per [`READINESS_FOR`] whoever asks,
//! the connections' counters and the last timer run. A customer tenant's token sees what
//! a probe sees: the counters are the operator's. Nothing secret either way.

use serde_json::json;
use warp::http::StatusCode;

use super::{ApiError, Request, Response, response};
use crate::app::services::Health;

/// How long a census of the store is reused: six Dataverse requests each time.
const CENSUS_FOR: std::time::Duration = std::time::Duration::from_secs(60);
/// How long the store's readiness (a round trip and a schema check) is reused.
pub const READINESS_FOR: std::time::Duration = std::time::Duration::from_secs(30);

pub async fn handle(svc: &Health, req: Request) -> Result<Response, ApiError> {
    // A bearer token must be a valid back-office one; only the home tenant's is an operator.
    let operator = match req.header(warp::http::header::AUTHORIZATION) {
        Some(_) => super::back_office::caller(svc.verifier.as_ref(), &req).await?.home,
        None => false,
    };
    let mut body = json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": svc.started.elapsed().as_secs(),
        "started_at": crate::support::time::rfc3339(svc.started_at),
        "under_functions_host": svc.under_host,
    });
    if !operator {
        return Ok(response::json(StatusCode::OK, &body));
    }
    let store = store_readiness(svc).await;
    let store_ready = store["ready"].as_bool().unwrap_or(false);
    let back_office = match &svc.verifier {
        Some(v) => json!({ "configured": true, "issuer": v.issuer(), "signing_keys_loaded": v.keys_loaded() }),
        None => json!({ "configured": false }),
    };
    body["status"] = json!(if store_ready { "ok" } else { "degraded" });
    body["dependencies"] = json!({
        "store": store,
        "providers": { "ready": true, "count": svc.organisations.home().catalog().len() },
        "secrets": { "source": svc.secrets.describe() },
        "encryption": encryption(svc).await,
        "back_office_auth": back_office,
    });
    body["connections"] = counters(svc).await;
    body["change_feed"] = json!(svc.feed.get());
    if let Some(run) = svc.timer.last() {
        body["timer"] = json!({
            "last_run_at": crate::support::time::rfc3339(run.at),
            "last_run_ms": run.ms,
            "refreshed": run.refreshed,
            "needs_reauth": run.needs_reauth,
            "failed": run.failed,
            "tenants_failing": run.tenants_failing,
        });
    }
    let status = if store_ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok(response::json(status, &body))
}

/// Whether the store answers and has its tables (and keys): checked at most once per
/// [`READINESS_FOR`], by one caller while the others wait for its answer.
async fn store_readiness(svc: &Health) -> serde_json::Value {
    let store = svc.organisations.home().store();
    let checked = svc
        .readiness
        .get_or_try_insert_with(&(), || async {
            let checked = match store.ping().await {
                Ok(()) => store.check_schema().await,
                Err(e) => Err(e),
            };
            let v = match checked {
                Ok(()) => json!({ "kind": store.kind(), "ready": true }),
                Err(e) => json!({ "kind": store.kind(), "ready": false, "detail": e.to_string() }),
            };
            Ok::<_, std::convert::Infallible>((v, READINESS_FOR))
        })
        .await;
    match checked {
        Ok(v) => v,
        Err(never) => match never {},
    }
}

/// Counts over the store (cached for [`CENSUS_FOR`]) and this instance's refreshes.
async fn counters(svc: &Health) -> serde_json::Value {
    let (granted, failed) = svc.organisations.home().refreshes_last_hour();
    let now = crate::support::time::now();
    let census = match svc.census.get(&()) {
        Some(c) => Ok(c),
        None => {
            svc.organisations.home().store().census(now).await.inspect(|c| svc.census.insert((), c.clone(), CENSUS_FOR))
        }
    };
    let mut v = match census {
        Ok(c) => json!({
            "by_status": c.by_status,
            "in_backoff": c.in_backoff,
            "oldest_token_age_seconds": c.oldest_token_at.map(|t| now.saturating_sub(t).max(0)),
            "counts_capped_at": c.capped_at,
        }),
        Err(e) => json!({ "error": e.to_string() }),
    };
    v["refreshes_last_hour"] = json!({ "granted": granted, "failed": failed, "scope": "this instance" });
    v
}

/// The current key, and how many sealed values each older key still seals: in the
/// deployment's own store as the store says now (counted at most once a minute, so a
/// `handler reseal` run elsewhere shows within a minute), and in each customer
/// organisation as this instance's last key-rotation pass found. An older key may be
/// removed once no count names it (`handler reseal` checks every organisation).
async fn encryption(svc: &Health) -> serde_json::Value {
    let current = svc.keys.current_id();
    let mut e = json!({ "current_key_id": current });
    let store = svc.organisations.home().store();
    let counted = svc
        .sealed_keys
        .get_or_try_insert_with(&(), || async { store.sealed_key_counts().await.map(|c| (c, CENSUS_FOR)) })
        .await;
    match counted {
        Ok(counts) => {
            let older: std::collections::BTreeMap<&String, &u64> =
                counts.iter().filter(|(k, _)| **k != current).collect();
            e["records_under_older_keys"] = json!(older);
        }
        Err(err) => e["records_under_older_keys"] = json!({ "error": err.to_string() }),
    }
    let mut tenants = serde_json::Map::new();
    for (id, connections) in svc.organisations.known() {
        if let Some(r) = connections.last_reseal().filter(|r| r.current_key == current) {
            tenants.insert(id, json!(r.remaining));
        }
    }
    if !tenants.is_empty() {
        e["tenants_under_older_keys"] = json!(tenants);
    }
    e
}
