//! The portal companion: endpoints portal pages call across origins, for the signed-in
//! contact, with our own server-to-server identity in Dataverse.
//!
//! A contact only ever reaches its own connections (owner `contact:{id}`); anything else
//! answers 404, whatever the verb, so ids cannot be probed. Portal users never receive a
//! token: they see statuses, and reach a provider's API only through the proxy, limited by
//! the provider's `portal.proxy` allow-list of methods and paths.

pub mod identity;

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use warp::http::{Method, StatusCode, header};

use crate::app::App;
use crate::connections::{ConnectionError, ConnectionView, StartRequest};
use crate::dataverse::Key;
use crate::http::{ApiError, Request, Response, response};
use crate::store::{Connection, ListFilter};
use identity::{PortalUser, PortalVerifier};

const CONTACT_CACHE: Duration = Duration::from_secs(60);

/// The portal's long-lived parts.
pub struct Portal {
    pub verifier: PortalVerifier,
    contacts: RwLock<HashMap<String, (Value, Instant)>>,
}

impl Portal {
    pub fn new(verifier: PortalVerifier) -> Portal {
        Portal { verifier, contacts: RwLock::new(HashMap::new()) }
    }
}

async fn user(app: &App, req: &Request) -> Result<PortalUser, ApiError> {
    let Some(portal) = app.portal.as_ref() else {
        return Err(ApiError::unavailable(
            "portal-not-configured",
            "The portal API is closed: set PORTAL_URL and PORTAL_CLIENT_ID (Power Pages) or PORTAL_OIDC_ISSUER.",
            None,
        ));
    };
    Ok(portal.verifier.verify(req.header(header::AUTHORIZATION)).await?)
}

fn owner(u: &PortalUser) -> String {
    format!("contact:{}", u.contact_id)
}

/// The connection, if it exists and belongs to this contact; 404 otherwise.
async fn own(app: &App, u: &PortalUser, id: &str) -> Result<Connection, ApiError> {
    let not_found = || ApiError::not_found(format!("You have no connection {id:?}."));
    match app.connections.get(id).await {
        Ok(c) if c.owner.as_deref() == Some(owner(u).as_str()) => Ok(c),
        Ok(_) | Err(ConnectionError::NotFound(_)) => Err(not_found()),
        Err(e) => Err(e.into()),
    }
}

/// `GET /api/portal/me`: the contact, read from Dataverse with our S2S identity (or from
/// the token's claims where no Dataverse is configured).
pub async fn me(app: &App, req: Request) -> Result<Response, ApiError> {
    let u = user(app, &req).await?;
    let Some(dv) = app.dataverse.as_ref() else {
        let body = json!({ "contact_id": u.contact_id, "name": u.name, "email": u.email, "source": "token" });
        return Ok(response::json(StatusCode::OK, &body));
    };
    let portal = app.portal.as_ref().ok_or_else(|| ApiError::internal("portal state missing"))?;
    let cached = {
        let contacts = portal.contacts.read().unwrap_or_else(|e| e.into_inner());
        contacts.get(&u.contact_id).filter(|(_, at)| at.elapsed() < CONTACT_CACHE).map(|(v, _)| v.clone())
    };
    let contact = match cached {
        Some(v) => v,
        None => {
            let rec = dv
                .get(
                    "contacts",
                    &Key::Id(&u.contact_id),
                    &["contactid", "fullname", "firstname", "lastname", "emailaddress1"],
                )
                .await
                .map_err(|e| {
                    if e.is_transient() {
                        ApiError::unavailable("dataverse-unavailable", e.to_string(), Some(5))
                    } else {
                        ApiError::internal(e)
                    }
                })?
                .ok_or_else(|| ApiError::not_found("Your contact record was not found in Dynamics."))?;
            let v = json!({
                "contact_id": u.contact_id,
                "name": rec.str("fullname"),
                "first_name": rec.str("firstname"),
                "last_name": rec.str("lastname"),
                "email": rec.str("emailaddress1"),
                "source": "dataverse",
            });
            let mut contacts = portal.contacts.write().unwrap_or_else(|e| e.into_inner());
            contacts.insert(u.contact_id.clone(), (v.clone(), Instant::now()));
            v
        }
    };
    Ok(response::json(StatusCode::OK, &contact))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectBody {
    provider: String,
}

/// `GET /api/portal/connections` (the contact's) and `POST` (connect a provider).
pub async fn connections(app: &App, mut req: Request) -> Result<Response, ApiError> {
    let u = user(app, &req).await?;
    if req.method == Method::POST {
        let body: ConnectBody = req.json().await?;
        let provider = app.connections.catalog().get(&body.provider).filter(|p| p.portal.enabled).ok_or_else(|| {
            ApiError::bad_request(
                "unknown-provider",
                format!("Provider {:?} is not available to portal users.", body.provider),
            )
        })?;
        // One connection per contact and provider: connecting again re-authorizes it.
        let id = format!("portal-{}-{}", u.contact_id, provider.name);
        let opener = req
            .header(header::ORIGIN)
            .filter(|o| crate::http::cors::is_listed(&app.config.portal.origins, o))
            .map(str::to_string);
        let start = StartRequest {
            provider: provider.name.clone(),
            connection_id: Some(id.clone()),
            owner: Some(owner(&u)),
            opener_origin: opener.clone(),
            ..Default::default()
        };
        let started = match app.connections.start(start).await {
            Err(ConnectionError::Exists(_)) => {
                own(app, &u, &id).await?;
                app.connections.reconnect_for(&id, None, opener).await?
            }
            other => other?,
        };
        return Ok(response::json(StatusCode::CREATED, &started));
    }
    let filter = ListFilter { owner: Some(owner(&u)), limit: 200, ..Default::default() };
    let list = app.connections.list(&filter).await?;
    let views: Vec<ConnectionView> = list.iter().map(ConnectionView::from).collect();
    Ok(response::json(StatusCode::OK, &json!({ "connections": views })))
}

/// `GET /api/portal/connections/{id}` (status) and `DELETE` (disconnect).
pub async fn connection(app: &App, req: Request, id: &str) -> Result<Response, ApiError> {
    let u = user(app, &req).await?;
    let conn = own(app, &u, id).await?;
    if req.method == Method::DELETE {
        app.connections.delete(id, false).await?;
        return Ok(response::json(StatusCode::OK, &json!({ "connection_id": id, "deleted": true })));
    }
    Ok(response::json(StatusCode::OK, &ConnectionView::from(&conn)))
}

/// `/api/portal/connections/{id}/proxy/{*path}`: the provider's API, for the listed
/// methods and paths only.
pub async fn proxy(app: &App, mut req: Request, id: &str) -> Result<Response, ApiError> {
    let u = user(app, &req).await?;
    let conn = own(app, &u, id).await?;
    let (provider, target) = crate::connections::api::proxy_request(app, &conn, &req)?;
    let base_path = provider.api_base_url.as_ref().map(|b| b.path()).unwrap_or("/");
    let relative = target.path().strip_prefix(base_path).unwrap_or("");
    if !provider.portal.allows(req.method.as_str(), relative) {
        return Err(ApiError::forbidden(format!(
            "{} {relative} is not allowed for portal users of {} (portal.proxy in the catalog).",
            req.method, provider.name
        )));
    }
    let body = req.body_bytes().await?;
    let mut headers = req.headers.clone();
    headers.remove(header::ORIGIN);
    crate::connections::api::send_with_token(app, id, req.method.clone(), target, &headers, body).await
}
