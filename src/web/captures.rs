//! `/api/captures`, capture mode for back-office callers: `POST` registers a state
//! Dynamics issued (only registered or signed states are kept), `GET ?state=...` reads
//! what the callback captured for it.

use warp::http::{Method, StatusCode};

use super::back_office::caller;
use super::views::{CaptureView, ExpectRequest};
use super::{ApiError, Request, Response, response};
use crate::app::services::BackOffice;

/// `GET /api/captures?state=...` and `POST /api/captures`.
pub async fn handle(svc: &BackOffice, mut req: Request) -> Result<Response, ApiError> {
    let who = caller(svc.verifier.as_ref(), &req).await?;
    if !who.home {
        // Captures are the deployment's own (one callback URL, one capture store).
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "operator-only",
            "Captures belong to the deployment's own tenant; a customer's token cannot read them.",
        ));
    }
    if req.method == Method::POST {
        let body: ExpectRequest = req.json().await?;
        let until = svc.captures.expect(&body.state, body.expires_in.unwrap_or(600)).await?;
        return Ok(response::json(
            StatusCode::CREATED,
            &serde_json::json!({ "state": body.state, "expires_at": crate::support::time::rfc3339(until) }),
        ));
    }
    list(svc, req).await
}

async fn list(svc: &BackOffice, req: Request) -> Result<Response, ApiError> {
    let state = req
        .query_param("state")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad_request("missing-state", "Pass the state to look up: /api/captures?state=..."))?;
    let captures: Vec<CaptureView> = svc.captures.for_state(&state).await?.into_iter().map(CaptureView::from).collect();
    if captures.is_empty() {
        return Err(ApiError::not_found(format!("Nothing was captured for state {state:?} (yet).")));
    }
    Ok(response::json_no_store(StatusCode::OK, &serde_json::json!({ "captures": captures })))
}
