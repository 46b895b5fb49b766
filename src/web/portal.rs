//! The portal API under `/api/portal`, called across origins by portal pages for the
//! signed-in contact (CORS is answered in the server, before this runs).
//!
//! Anything that is not the contact's own answers 404, whatever the verb. Portal users
//! see statuses and reach a provider's API only through the proxy, limited by the
//! provider's `portal.proxy` allow-list of methods and paths.

use serde_json::json;
use warp::http::{Method, StatusCode, header};

use super::mapping::{Closed, configured};
use super::views::{ConnectBody, ConnectionView, PortalStarted, Started};
use super::{ApiError, Request, Response, cors, proxy, response};
use crate::app::services::PortalApi;
use crate::domain::connections::{ConnectionError, NewConnection, PortalFlow};
use crate::domain::portal::identity::PortalUser;
use crate::domain::portal::{self, Contact, Portal};
use crate::domain::{Connection, ListFilter};

async fn user<'a>(svc: &'a PortalApi, req: &Request) -> Result<(&'a Portal, PortalUser), ApiError> {
    let portal = configured(svc.portal.as_ref(), Closed::Portal)?;
    Ok((portal, portal.user(req.header(header::AUTHORIZATION)).await?))
}

/// The connection, if it exists and belongs to this contact; 404 otherwise.
async fn own(svc: &PortalApi, u: &PortalUser, id: &str) -> Result<Connection, ApiError> {
    portal::own(svc.organisations.home(), u, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("You have no connection {id:?}.")))
}

/// `GET /api/portal/me`: the contact.
pub async fn me(svc: &PortalApi, req: Request) -> Result<Response, ApiError> {
    let (portal, u) = user(svc, &req).await?;
    let body = match portal.contact(&u).await? {
        Contact::FromToken(u) => {
            json!({ "contact_id": u.contact_id, "name": u.name, "email": u.email, "source": "token" })
        }
        Contact::FromDataverse { contact_id, name, first_name, last_name, email } => json!({
            "contact_id": contact_id,
            "name": name,
            "first_name": first_name,
            "last_name": last_name,
            "email": email,
            "source": "dataverse",
        }),
    };
    Ok(response::json(StatusCode::OK, &body))
}

/// `GET /api/portal/connections` (the contact's) and `POST` (connect a provider).
pub async fn connections(svc: &PortalApi, mut req: Request) -> Result<Response, ApiError> {
    let (_, u) = user(svc, &req).await?;
    if req.method == Method::POST {
        let body: ConnectBody = req.json().await?;
        let provider =
            svc.organisations.home().catalog().get(&body.provider).filter(|p| p.portal.enabled).ok_or_else(|| {
                ApiError::bad_request(
                    "unknown-provider",
                    format!("Provider {:?} is not available to portal users.", body.provider),
                )
            })?;
        let binding = body.binding.to_ascii_lowercase();
        if binding.len() != 64 || !binding.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ApiError::bad_request(
                "invalid-binding",
                "binding must be the SHA-256 of the page's secret, as 64 hexadecimal digits.",
            ));
        }
        let id = portal::connection_id(&u, &provider.name);
        let opener = req.header(header::ORIGIN).filter(|o| cors::is_listed(&svc.origins, o)).map(str::to_string);
        let flow = PortalFlow { opener_origin: opener, binding: Some(binding) };
        let start = NewConnection {
            provider: provider.name.clone(),
            connection_id: Some(id.clone()),
            owner: Some(portal::owner(&u)),
            portal: flow.clone(),
            ..Default::default()
        };
        let started = match svc.organisations.home().start(start).await {
            Err(ConnectionError::Exists(_)) => {
                own(svc, &u, &id).await?;
                svc.organisations.home().reconnect(&id, None, flow).await?
            }
            other => other?,
        };
        let body = PortalStarted { started: Started::from(&started), bind_url: svc.bind_url.to_string() };
        return Ok(response::json(StatusCode::CREATED, &body));
    }
    let filter = ListFilter { owner: Some(portal::owner(&u)), limit: 200, ..Default::default() };
    let list = svc.organisations.home().list(&filter).await?;
    let views: Vec<ConnectionView> = list.iter().map(ConnectionView::from).collect();
    Ok(response::json(StatusCode::OK, &json!({ "connections": views })))
}

/// `GET /api/portal/connections/{id}` (status) and `DELETE` (disconnect).
pub async fn connection(svc: &PortalApi, req: Request, id: &str) -> Result<Response, ApiError> {
    let (_, u) = user(svc, &req).await?;
    let conn = own(svc, &u, id).await?;
    if req.method == Method::DELETE {
        svc.organisations.home().delete(id, false).await?;
        return Ok(response::json(StatusCode::OK, &json!({ "connection_id": id, "deleted": true })));
    }
    Ok(response::json(StatusCode::OK, &ConnectionView::from(&conn)))
}

/// `/api/portal/connections/{id}/proxy/{*path}`: the provider's API, for the listed
/// methods and paths only.
pub async fn proxy(svc: &PortalApi, mut req: Request, id: &str) -> Result<Response, ApiError> {
    let (_, u) = user(svc, &req).await?;
    // Whose it is, from the token cache when the token is there (no store read); the
    // token is asked for only once ownership is settled, so nothing about another
    // contact's connection (not even that it needs re-authorization) is revealed.
    let mine = match svc.organisations.home().cached_owner(id) {
        Some(owner) => owner.is_some_and(|o| o.eq_ignore_ascii_case(&portal::owner(&u))),
        None => portal::own(svc.organisations.home(), &u, id).await?.is_some(),
    };
    if !mine {
        return Err(ApiError::not_found(format!("You have no connection {id:?}.")));
    }
    let token = svc.organisations.home().access_token(id, false).await?;
    let home = svc.organisations.home();
    let (provider, target) = proxy::target(home.catalog(), &token, id, &req)?;
    let base_path = provider.api_base_url.as_ref().map(|b| b.path()).unwrap_or("/");
    let relative = target.path().strip_prefix(base_path).unwrap_or("");
    if !provider.portal.allows(req.method.as_str(), relative) {
        return Err(ApiError::forbidden(format!(
            "{} {relative} is not allowed for portal users of {} (portal.proxy in the catalog).",
            req.method, provider.name
        )));
    }
    let actor =
        crate::support::audit::Actor { contact: Some(portal::owner(&u).into()), kind: "portal", ..Default::default() };
    proxy::send_audited(actor, &svc.http, home, &provider, id, token, target, &mut req).await
}
