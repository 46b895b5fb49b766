//! The back-office API under `/api/connections`, for Dynamics (plug-ins, X++, Power
//! Automate) and scripts. Every route needs a bearer token accepted by
//! [`crate::clients::auth::BearerVerifier`].

use warp::http::{Method, StatusCode, header};

use super::mapping::{Closed, configured};
use super::views::{
    ConnectionView, ImportRequest, ReconnectRequest, StartRequest, Started, TokenRequest, TokenResponse,
};
use super::{ApiError, Request, Response, proxy, response};
use crate::app::services::BackOffice;
use std::sync::Arc;

use crate::clients::auth::{BearerVerifier, Caller};
use crate::domain::connections::ConnectionError;
use crate::domain::connections::Connections;
use crate::domain::{ListFilter, Status};
use crate::support::audit::{self, Action};

/// Checks the back-office caller's bearer token.
pub(super) async fn caller(
    verifier: Option<&std::sync::Arc<BearerVerifier>>,
    req: &Request,
) -> Result<Caller, ApiError> {
    let verifier = configured(verifier, Closed::BackOffice)?;
    Ok(verifier.verify(req.header(header::AUTHORIZATION)).await?)
}

/// The caller as the audit record names it.
pub(super) fn actor(who: &Caller) -> audit::Actor {
    audit::Actor {
        tenant: who.tenant.clone(),
        app_id: who.client_id.clone(),
        object_id: who.subject.clone(),
        contact: None,
        kind: "",
    }
}

/// The caller and the connections it reaches (its own tenant's, in a multi-tenant
/// deployment: another tenant's connection is simply not there, 404).
pub(super) async fn caller_and_connections(
    svc: &BackOffice,
    req: &Request,
) -> Result<(Caller, Arc<Connections>), ApiError> {
    let who = caller(svc.verifier.as_ref(), req).await?;
    let connections = svc.organisations.for_caller(who.home, who.tenant.as_deref()).await?;
    Ok((who, connections))
}

/// `GET /api/connections` (list) and `POST /api/connections` (start).
pub async fn collection(svc: &BackOffice, mut req: Request) -> Result<Response, ApiError> {
    let (who, connections) = caller_and_connections(svc, &req).await?;
    if req.method == Method::POST {
        let start: StartRequest = req.json().await?;
        let started = connections.start(start.into()).await?;
        tracing::info!(connection = %started.connection.id, caller = who.client_id.as_deref().unwrap_or("-"), "start");
        return Ok(response::json(StatusCode::CREATED, &Started::from(&started)));
    }
    let mut filter = ListFilter { limit: 1000, ..Default::default() };
    for (k, v) in req.query_pairs() {
        match k.as_str() {
            "provider" => filter.provider = Some(v),
            "owner" => filter.owner = Some(v),
            "status" => {
                filter.status = Some(Status::parse(&v).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid-status",
                        format!("status {v:?} is not one of pending, active, needs_reauth, failed."),
                    )
                })?)
            }
            "limit" => {
                filter.limit =
                    v.parse().ok().filter(|n| (1..=1000).contains(n)).ok_or_else(|| {
                        ApiError::bad_request("invalid-limit", "limit must be a number from 1 to 1000.")
                    })?
            }
            "after" => {
                filter.after = Some(cursor::read(&v).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid-cursor",
                        "after must be the value a previous page's next link carried.",
                    )
                })?)
            }
            _ => {}
        }
    }
    let list = connections.list(&filter).await?;
    let views: Vec<ConnectionView> = list.iter().map(ConnectionView::from).collect();
    // A full page may have more after it: say where, as Dataverse does with its nextLink.
    let next = (list.len() == filter.limit).then(|| list.last()).flatten().map(|last| {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in req.query_pairs().into_iter().filter(|(k, _)| k != "after" && k != "limit") {
            q.append_pair(&k, &v);
        }
        q.append_pair("limit", &filter.limit.to_string());
        q.append_pair("after", &cursor::write(last.created_at, &last.id));
        format!("/api/connections?{}", q.finish())
    });
    Ok(response::json(StatusCode::OK, &serde_json::json!({ "connections": views, "next": next })))
}

/// `POST /api/connections/import`: takes over a connection from another token keeper
/// (its refresh token, verified by one refresh before the answer).
pub async fn import(svc: &BackOffice, mut req: Request) -> Result<Response, ApiError> {
    let (who, connections) = caller_and_connections(svc, &req).await?;
    let body: ImportRequest = req.json().await?;
    let imported = connections.import(body.try_into()?).await?;
    let c = &imported.connection;
    audit::record(Action::Import, &c.id, &c.provider, &actor(&who), "ok");
    Ok(response::json(StatusCode::CREATED, &ConnectionView::from(&imported.connection)))
}

/// The opaque page cursor: where a page ended, in the list's order.
mod cursor {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    pub fn write(created_at: i64, id: &str) -> String {
        URL_SAFE_NO_PAD.encode(format!("{created_at}:{id}"))
    }

    pub fn read(value: &str) -> Option<(i64, String)> {
        let text = String::from_utf8(URL_SAFE_NO_PAD.decode(value).ok()?).ok()?;
        let (created, id) = text.split_once(':')?;
        Some((created.parse().ok()?, id.to_string())).filter(|(_, id)| !id.is_empty() && id.len() <= 128)
    }
}

/// `GET /api/connections/{id}` (status) and `DELETE` (revoke and remove).
pub async fn item(svc: &BackOffice, req: Request, id: &str) -> Result<Response, ApiError> {
    let (who, connections) = caller_and_connections(svc, &req).await?;
    if req.method == Method::DELETE {
        let skip = req.query_param("skip_revocation").is_some_and(|v| v == "true");
        let provider = connections.get(id).await.map(|c| c.provider).unwrap_or_default();
        let deleted = connections.delete(id, skip).await;
        let (action, outcome) = match &deleted {
            Ok(true) => (Action::Revocation, "revoked and deleted"),
            Ok(false) => (Action::Deletion, "deleted"),
            Err(ConnectionError::Provider(_)) => (Action::Revocation, "revocation failed; kept"),
            Err(_) => (Action::Deletion, "refused"),
        };
        audit::record(action, id, &provider, &actor(&who), outcome);
        return match deleted {
            Ok(revoked) => Ok(response::json(
                StatusCode::OK,
                &serde_json::json!({ "connection_id": id, "deleted": true, "revoked_at_provider": revoked }),
            )),
            Err(ConnectionError::Provider(e)) => Err(ApiError::bad_gateway(
                "revocation-failed",
                format!(
                    "The provider did not confirm the revocation ({e}); the connection is kept. Retry, or delete with ?skip_revocation=true."
                ),
            )),
            Err(e) => Err(e.into()),
        };
    }
    let conn = connections.get(id).await?;
    Ok(response::json(StatusCode::OK, &ConnectionView::from(&conn)))
}

/// `POST /api/connections/{id}/token`: a valid access token.
pub async fn token(svc: &BackOffice, mut req: Request, id: &str) -> Result<Response, ApiError> {
    let (who, connections) = caller_and_connections(svc, &req).await?;
    let body: Option<TokenRequest> = req.json().await?;
    let force =
        body.map(|b| b.force_refresh).unwrap_or(false) || req.query_param("force_refresh").is_some_and(|v| v == "true");
    let actor = actor(&who);
    let token = connections.access_token_for(id, force, &actor).await;
    let (provider, outcome) = match &token {
        Ok(t) => (t.provider.as_str(), "ok"),
        Err(_) => ("-", "refused"),
    };
    audit::record(Action::TokenHandedOut, id, provider, &actor, outcome);
    Ok(response::json_no_store(StatusCode::OK, &TokenResponse::new(id, &token?)))
}

/// `POST /api/connections/{id}/reconnect`: a new authorization URL for a connection.
pub async fn reconnect(svc: &BackOffice, mut req: Request, id: &str) -> Result<Response, ApiError> {
    let (_, connections) = caller_and_connections(svc, &req).await?;
    let body: Option<ReconnectRequest> = req.json().await?;
    let started = connections.reconnect(id, body.and_then(|b| b.return_url).as_deref(), Default::default()).await?;
    Ok(response::json(StatusCode::OK, &Started::from(&started)))
}

/// `/api/connections/{id}/call/{*path}?query=`: the connector's form of the proxy (the API
/// path as one URL-encoded parameter, the provider's query as another).
pub async fn call(svc: &BackOffice, mut req: Request, id: &str, raw_path: &str) -> Result<Response, ApiError> {
    let (who, connections) = caller_and_connections(svc, &req).await?;
    let actor = actor(&who);
    let token = connections.access_token_for(id, false, &actor).await?;
    let provider = proxy::provider_of(connections.catalog(), &token, id)?;
    let base = proxy::api_base(&provider)?;
    let target = proxy::call_target(base, raw_path, req.query.as_deref())?;
    proxy::send_audited(actor, &svc.http, &connections, &provider, id, token, target, &mut req).await
}

/// `/api/connections/{id}/proxy/{*path}`: calls the provider's API with the token.
pub async fn proxy(svc: &BackOffice, mut req: Request, id: &str) -> Result<Response, ApiError> {
    let (who, connections) = caller_and_connections(svc, &req).await?;
    let actor = actor(&who);
    let token = connections.access_token_for(id, false, &actor).await?;
    let (provider, target) = proxy::target(connections.catalog(), &token, id, &req)?;
    proxy::send_audited(actor, &svc.http, &connections, &provider, id, token, target, &mut req).await
}
