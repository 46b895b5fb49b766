//! `/api/tenants` (back office) and `/api/oauth/consent` (the customer administrator's
//! browser): onboarding customer organisations of a multi-tenant deployment.

use serde::{Deserialize, Serialize};
use warp::http::{Method, StatusCode};

use super::html::{self, Tone};
use super::mapping::{Closed, closed_error, configured};
use super::{ApiError, Request, Response, back_office, response};
use crate::app::services::TenantsApi;
use crate::domain::Tenant;
use crate::domain::ids::OrgUrl;
use crate::domain::tenants::onboarding::SetupError;
use crate::domain::tenants::{ConsentAnswer, ConsentOutcome, ConsentRefusal, Tenants};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartTenant {
    tenant_id: String,
    /// The customer's organisation, when known: consent is then confirmed with a token
    /// for it, which also proves the tenant has that Dataverse resource.
    org_url: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TenantView<'a> {
    tenant_id: &'a str,
    org_url: Option<&'a str>,
    status: &'static str,
    status_detail: Option<&'a str>,
    started_by: Option<&'a str>,
    consented_at: Option<String>,
    onboarded_at: Option<String>,
    created_at: String,
    updated_at: String,
}

impl<'a> From<&'a Tenant> for TenantView<'a> {
    fn from(t: &'a Tenant) -> Self {
        TenantView {
            tenant_id: &t.id,
            org_url: t.org_url.as_deref(),
            status: t.status.as_str(),
            status_detail: t.status_detail.as_deref(),
            started_by: t.started_by.as_deref(),
            consented_at: t.consented_at.map(crate::support::time::rfc3339),
            onboarded_at: t.onboarded_at.map(crate::support::time::rfc3339),
            created_at: crate::support::time::rfc3339(t.created_at),
            updated_at: crate::support::time::rfc3339(t.updated_at),
        }
    }
}

fn tenants(svc: &TenantsApi) -> Result<&Tenants, ApiError> {
    configured(svc.organisations.tenants().map(|t| t.as_ref()), Closed::Tenants)
}

/// Only the deployment's own tenant manages tenants: a customer's callers are refused.
async fn operator(svc: &TenantsApi, req: &Request) -> Result<Option<String>, ApiError> {
    let who = back_office::caller(svc.verifier.as_ref(), req).await?;
    if !who.home {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "operator-only",
            "Tenants are managed by the deployment's own tenant; a customer's token cannot.",
        ));
    }
    Ok(who.client_id.as_deref().map(str::to_string))
}

/// `GET /api/tenants` (list) and `POST /api/tenants` (start onboarding: the link).
pub async fn collection(svc: &TenantsApi, mut req: Request) -> Result<Response, ApiError> {
    let tenants = tenants(svc)?;
    let who = operator(svc, &req).await?;
    if req.method == Method::POST {
        let body: StartTenant = req.json().await?;
        let org_url = body
            .org_url
            .as_deref()
            .map(|u| OrgUrl::parse(u).map_err(|p| ApiError::bad_request("invalid-org-url", format!("org_url {p}"))))
            .transpose()?;
        let (t, link) = tenants.start(&body.tenant_id, org_url, who).await?;
        return Ok(response::json(
            StatusCode::CREATED,
            &serde_json::json!({ "tenant": TenantView::from(&t), "consent_url": link.as_str() }),
        ));
    }
    let list = tenants.list().await?;
    let views: Vec<TenantView> = list.iter().map(TenantView::from).collect();
    Ok(response::json(StatusCode::OK, &serde_json::json!({ "tenants": views })))
}

/// `GET` and `DELETE /api/tenants/{id}`.
pub async fn item(svc: &TenantsApi, req: Request, id: &str) -> Result<Response, ApiError> {
    let tenants = tenants(svc)?;
    operator(svc, &req).await?;
    if req.method == Method::DELETE {
        tenants.delete(id).await?;
        svc.organisations.changed(id);
        return Ok(response::empty(StatusCode::NO_CONTENT));
    }
    let t = tenants.get(id).await?;
    Ok(response::json(StatusCode::OK, &TenantView::from(&t)))
}

/// `POST /api/tenants/{id}/check`: whether the customer's organisation lets the app in
/// (its application user answers `WhoAmI`) and has the product's tables; `onboarded` when
/// both hold, else the tenant's `status_detail` says what is missing.
pub async fn check(svc: &TenantsApi, req: Request, id: &str) -> Result<Response, ApiError> {
    tenants(svc)?;
    operator(svc, &req).await?;
    let access = svc.organisations.access().ok_or_else(|| closed_error(Closed::Tenants))?;
    let t = tenants(svc)?.check(access, id).await?;
    svc.changed(&t);
    Ok(response::json(StatusCode::OK, &TenantView::from(&t)))
}

/// `POST /api/tenants/{id}/onboard`: a new link for the customer's administrator to sign
/// in and have their environment set up (once consent is confirmed).
pub async fn onboard_link(svc: &TenantsApi, req: Request, id: &str) -> Result<Response, ApiError> {
    let tenants = tenants(svc)?;
    operator(svc, &req).await?;
    let link = tenants.onboarding_link(id).await?;
    Ok(response::json(StatusCode::OK, &serde_json::json!({ "onboarding_url": link.as_str() })))
}

/// `GET /api/oauth/onboard`: the administrator's sign-in comes back; find the
/// environment, set the product up in it, check it with the app's own token.
pub async fn onboard(svc: &TenantsApi, req: Request) -> Result<Response, ApiError> {
    let tenants = tenants(svc)?;
    let signed_in = match tenants.signed_in(sign_in_answer(&req)?).await {
        Ok(d) => d,
        Err(e) => return sign_in_refused(e),
    };
    let instances = tenants
        .discover(&signed_in)
        .await
        .map_err(|e| ApiError::bad_gateway("discovery-failed", format!("Nothing was changed: {e}.")))?;
    let chosen = match choose_environment(&signed_in, &instances) {
        Ok(chosen) => chosen,
        Err(page) => return Ok(page),
    };
    let url = chosen.org().ok_or_else(|| {
        ApiError::bad_gateway(
            "discovery-failed",
            format!("The Discovery Service named {:?}, not an organisation URL.", chosen.api_url),
        )
    })?;
    let access = svc.organisations.access().ok_or_else(|| closed_error(Closed::Tenants))?;
    let onboarded = tenants.onboard(access, &signed_in, &url).await;
    if let Ok((_, t)) = &onboarded {
        svc.changed(t);
    }
    set_up_page(&url.to_string(), onboarded)
}

/// The sign-in answer's parameters, each at most once.
fn sign_in_answer(req: &Request) -> Result<crate::domain::tenants::signin::SignInAnswer, ApiError> {
    let mut answer = crate::domain::tenants::signin::SignInAnswer::default();
    for (k, v) in req.query_pairs() {
        let slot = match k.as_str() {
            "code" => &mut answer.code,
            "state" => &mut answer.state,
            "error" => &mut answer.error,
            "error_description" => &mut answer.error_description,
            _ => continue,
        };
        if slot.replace(v).is_some() {
            return Err(ApiError::bad_request(
                "duplicate-parameter",
                format!("The answer carries {k} more than once."),
            ));
        }
    }
    Ok(answer)
}

/// What the administrator sees when the sign-in did not complete.
fn sign_in_refused(e: crate::domain::tenants::signin::SignInError) -> Result<Response, ApiError> {
    use crate::domain::tenants::signin::SignInError;
    match e {
        SignInError::Store(e) => Err(e.into()),
        e @ SignInError::Refused { .. } => Ok(html::page(
            StatusCode::FORBIDDEN,
            "Sign-in not completed",
            &format!("{e}. Nothing was changed. Ask your provider for a new link to try again."),
            Tone::Error,
        )),
        e @ (SignInError::Token(_) | SignInError::Discovery(_)) => {
            Err(ApiError::bad_gateway("sign-in-failed", format!("Nothing was changed: {e}.")))
        }
        e => Err(ApiError::bad_request("invalid-sign-in-answer", format!("Nothing was changed: {e}."))),
    }
}

/// The environment to set up: the one the tenant names (by either of its URLs), or the
/// only one the administrator administers; else a page listing them.
fn choose_environment<'a>(
    signed_in: &crate::domain::tenants::signin::Delegated,
    instances: &'a [crate::domain::tenants::signin::Instance],
) -> Result<&'a crate::domain::tenants::signin::Instance, Response> {
    let named = signed_in.tenant.org_url.as_deref().and_then(|o| OrgUrl::parse(o).ok());
    let chosen = match &named {
        Some(org) => instances.iter().find(|i| i.is(org)),
        None => match instances.iter().filter(|i| i.is_user_sys_admin != Some(false)).collect::<Vec<_>>().as_slice() {
            [one] => Some(*one),
            _ => None,
        },
    };
    chosen.ok_or_else(|| {
        let items: Vec<String> = instances
            .iter()
            .map(|i| format!("{} ({})", i.friendly_name.as_deref().unwrap_or("unnamed"), i.api_url))
            .collect();
        let message = match &signed_in.tenant.org_url {
            Some(org) => format!(
                "Your account does not reach {org}, the environment your provider named. Sign in with an administrator of that environment, or tell your provider which of these to use. Nothing was changed."
            ),
            None => "Your account reaches more than one environment (or none). Tell your provider which one to set up; they start again with it. Nothing was changed.".to_string(),
        };
        html::page_with_link(StatusCode::CONFLICT, "Which environment?", &message, Tone::Error, &items, None)
    })
}

/// The page that says how the set-up went.
fn set_up_page(
    org: &str,
    onboarded: Result<(crate::domain::tenants::onboarding::SetupReport, Tenant), SetupError>,
) -> Result<Response, ApiError> {
    match onboarded {
        Ok((report, t)) => {
            let done = t.status == crate::domain::TenantStatus::Onboarded;
            let title = if done { "Your environment is set up" } else { "Set up, but not ready yet" };
            let message = match (done, report.changes) {
                (true, 0) => format!("{org} was already set up; nothing needed changing. You can close this page."),
                (true, n) => format!("{org} is set up ({n} changes). You can close this page."),
                (false, _) => format!(
                    "{org}: {}. Nothing else is needed from you if your provider retries in a few minutes.",
                    t.status_detail.as_deref().unwrap_or("the app cannot use it yet")
                ),
            };
            let tone = if done { Tone::Success } else { Tone::Error };
            let status = if done { StatusCode::OK } else { StatusCode::ACCEPTED };
            Ok(html::page_with_link(status, title, &message, tone, &report.lines, None))
        }
        Err(SetupError::Refused(e)) => Ok(html::page(
            StatusCode::FORBIDDEN,
            "Not allowed in this environment",
            &format!(
                "Dynamics 365 refused: {e}. Sign in with a System Administrator of {org} and open the link again."
            ),
            Tone::Error,
        )),
        Err(e) => Err(ApiError::bad_gateway(
            "onboarding-failed",
            format!("Setting up {org} stopped: {e}. Open the link again to retry; what was done stays done."),
        )),
    }
}

const ANSWER_NAMES: [&str; 6] = ["admin_consent", "tenant", "scope", "state", "error", "error_description"];

/// `GET /api/oauth/consent`: where Entra sends the administrator after admin consent.
pub async fn consent(svc: &TenantsApi, req: Request) -> Result<Response, ApiError> {
    let tenants = tenants(svc)?;
    let mut answer = ConsentAnswer::default();
    for (k, v) in req.query_pairs() {
        let slot = match k.as_str() {
            "admin_consent" => &mut answer.admin_consent,
            "tenant" => &mut answer.tenant,
            "scope" => &mut answer.scope,
            "state" => &mut answer.state,
            "error" => &mut answer.error,
            "error_description" => &mut answer.error_description,
            _ => continue,
        };
        if slot.replace(v).is_some() {
            return Err(ApiError::bad_request(
                "duplicate-parameter",
                format!("The answer carries {k} more than once ({} may each appear once).", ANSWER_NAMES.join(", ")),
            ));
        }
    }
    let outcome = tenants.answer(answer).await.map_err(|e| match e {
        ConsentRefusal::Store(e) => ApiError::from(e),
        e @ ConsentRefusal::WrongTenant { .. } => {
            ApiError::bad_request("tenant-mismatch", format!("Consent was not recorded: {e}."))
        }
        e => ApiError::bad_request(
            "invalid-consent-answer",
            format!("Consent was not recorded: {e}. Ask for a new link."),
        ),
    })?;
    let changed = match &outcome {
        ConsentOutcome::Consented(t) | ConsentOutcome::Declined { tenant: t, .. } => &t.id,
        ConsentOutcome::Unconfirmed { tenant: t, .. } => &t.id,
    };
    svc.organisations.changed(changed);
    Ok(match outcome {
        ConsentOutcome::Consented(t) => {
            // The next step in the same browser: sign in to set the environment up.
            let next = tenants.onboarding_link(&t.id).await.ok();
            html::page_with_link(
                StatusCode::OK,
                "Consent recorded",
                &format!(
                    "Thank you. Consent for tenant {} is confirmed. Next, sign in as an administrator of your Dynamics 365 environment: the app's security role, its application user and its tables are then created for you (your sign-in is used for this only and not kept).",
                    t.id
                ),
                Tone::Success,
                &[],
                next.as_ref().map(|u| ("Set up my Dynamics 365 environment", u.as_str())),
            )
        }
        ConsentOutcome::Declined { error, description, .. } => html::page(
            StatusCode::FORBIDDEN,
            "Consent was not given",
            &format!(
                "Microsoft Entra answered {error}: {description} Nothing was set up. To try again, ask for a new link; an administrator who may consent for the organisation (Cloud Application Administrator or Global Administrator) must open it."
            ),
            Tone::Error,
        ),
        ConsentOutcome::Unconfirmed { error, .. } => html::page(
            StatusCode::BAD_GATEWAY,
            "Consent could not be confirmed",
            &format!(
                "Microsoft Entra reported consent, but the application could not sign in to your tenant: {error}. If you just consented, wait a minute and open the link again; otherwise check the application under Enterprise applications."
            ),
            Tone::Error,
        ),
    })
}
