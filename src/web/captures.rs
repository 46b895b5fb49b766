//! `GET /api/captures?state=...`: what the callback captured for a state Dynamics
//! issued (capture mode), for back-office callers.

use warp::http::StatusCode;

use super::back_office::caller;
use super::views::CaptureView;
use super::{ApiError, Request, Response, response};
use crate::app::App;

pub async fn list(app: &App, req: Request) -> Result<Response, ApiError> {
    caller(app, &req).await?;
    let state = req
        .query_param("state")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad_request("missing-state", "Pass the state to look up: /api/captures?state=..."))?;
    let captures: Vec<CaptureView> = app.captures.for_state(&state).await?.into_iter().map(CaptureView::from).collect();
    if captures.is_empty() {
        return Err(ApiError::not_found(format!("Nothing was captured for state {state:?} (yet).")));
    }
    Ok(response::json_no_store(StatusCode::OK, &serde_json::json!({ "captures": captures })))
}
