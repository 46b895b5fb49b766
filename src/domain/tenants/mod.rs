//! Customer tenants of a multi-tenant deployment: onboarding by admin consent.
//!
//! `start` records the tenant and returns the link its administrator opens: Entra's v2
//! admin-consent endpoint, with our own signed, expiring, single-use `state`. Entra
//! redirects the administrator to `/api/oauth/consent`, and [`Tenants::answer`] decides:
//! an `error` first (Entra sends `admin_consent=True` with errors too), then the state,
//! then the `tenant` it names, which must be the one the state was issued for. Even then
//! the answer is not trusted (anyone can type that redirect): consent counts once a
//! client-credential token of the app has actually been had from that tenant.

pub mod onboarding;
pub mod scope;
pub mod signin;

use std::sync::Arc;

use url::Url;

use crate::domain::{StoreError, Tenant, TenantStatus, TenantStore, Version};
use crate::support::config::{TenancyConfig, is_guid};
use crate::support::crypto::{Keyring, StateError};
use crate::support::time::Clock;

/// How long an admin-consent link stays valid: an administrator may need a while to
/// find the right account.
const CONSENT_LINK_SECONDS: i64 = 24 * 3600;

/// The waits between tries of the verifying token right after consent, as far as
/// `MULTITENANT_CONSENT_WAIT_SECONDS` (30 s by default) reaches.
/// Entra creates the app's service principal in the customer's tenant on consent, and
/// it takes a while to replicate; until it has, a client-credential request answers
/// AADSTS7000229 (no service principal) or AADSTS700016 (app not found in the
/// directory). Microsoft's consent guidance asks callers to wait and retry rather than
/// fail the consent.
const PROPAGATION_WAITS: [std::time::Duration; 5] = [
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(2),
    std::time::Duration::from_secs(4),
    std::time::Duration::from_secs(8),
    std::time::Duration::from_secs(15),
];

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("{0}")]
    Invalid(String),
    #[error("tenant {0} is not known here")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What Entra's admin-consent redirect carried.
#[derive(Debug, Default, Clone)]
pub struct ConsentAnswer {
    pub admin_consent: Option<String>,
    pub tenant: Option<String>,
    pub scope: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

/// How an answer ended, for the administrator's page.
#[derive(Debug)]
pub enum ConsentOutcome {
    /// Consent confirmed by a token from the tenant.
    Consented(Tenant),
    /// The administrator (or a policy) declined; the record says so.
    Declined { tenant: Tenant, error: String, description: String },
    /// Entra said yes but no token could be had from the tenant.
    Unconfirmed { tenant: Tenant, error: TenantTokenError },
}

/// Why an answer was not accepted at all (nothing was changed).
#[derive(Debug, thiserror::Error)]
pub enum ConsentRefusal {
    #[error("the answer carries no state")]
    NoState,
    #[error("{0}")]
    State(StateError),
    #[error("this consent link was already used or replaced by a newer one")]
    Used,
    #[error("the answer does not say that consent was given")]
    NotConsented,
    #[error("the answer names tenant {got:?}, but the link was issued for another tenant")]
    WrongTenant { got: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a failed organisation check found, for the tenant's record.
#[derive(Debug, Clone)]
pub struct CheckFailure {
    pub detail: String,
    /// The organisation's own state stops the app (refused, no tables): a served tenant
    /// is suspended. Not so when it merely could not be reached.
    pub suspends: bool,
}

/// Why no token could be had from a customer's tenant (Entra's answer).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TenantTokenError {
    /// The `AADSTS` code Entra answered with, when it did (`7000229`).
    pub code: Option<u32>,
    pub message: String,
}

impl TenantTokenError {
    /// The app has no service principal in the tenant yet (no consent, or it has not
    /// propagated): worth a short retry right after consent.
    pub fn is_missing_consent(&self) -> bool {
        matches!(self.code, Some(700016 | 7000229))
    }
}

/// The app's tokens from customers' tenants: the port `clients::entra` implements (a
/// client-credential grant at each tenant, the app proving itself with its federated
/// credential, a certificate or a secret).
#[async_trait::async_trait]
pub trait TenantTokens: Send + Sync {
    /// A token for `scope` from `tenant`.
    async fn token(&self, tenant: &str, scope: &str) -> Result<secrecy::SecretString, TenantTokenError>;
    /// The form fields that prove the app at `tenant`'s token endpoint, for a code
    /// redemption of its own (the administrator's sign-in).
    async fn client_auth(&self, tenant: &str) -> Result<Vec<(&'static str, String)>, TenantTokenError>;
    /// Drops what is kept for `tenant` (it was off-boarded).
    fn forget(&self, tenant: &str);
}

pub struct Tenants {
    store: Arc<dyn TenantStore>,
    keys: Arc<Keyring>,
    clock: Arc<dyn Clock>,
    cfg: TenancyConfig,
    credentials: Arc<dyn TenantTokens>,
    /// For the administrator's sign-in: a client that never reuses a connection (a code
    /// is spent once; see [`crate::support::outbound::unpooled_client`]).
    http: reqwest::Client,
}

impl Tenants {
    pub fn new(
        store: Arc<dyn TenantStore>,
        keys: Arc<Keyring>,
        clock: Arc<dyn Clock>,
        cfg: TenancyConfig,
        credentials: Arc<dyn TenantTokens>,
        http: reqwest::Client,
    ) -> Tenants {
        Tenants { store, keys, clock, cfg, credentials, http }
    }

    /// Records what the organisation check found: onboarded, or what is missing. A
    /// tenant that was served and whose organisation now refuses the app, or lacks the
    /// tables, is suspended (its callers refused, naming why) until a check passes; a
    /// check that could not reach the organisation changes only the detail.
    pub async fn record_check(&self, id: &str, outcome: Result<(), CheckFailure>) -> Result<Tenant, TenantError> {
        let now = self.clock.now();
        self.modify(id, |t| {
            match &outcome {
                Ok(()) => {
                    t.status = TenantStatus::Onboarded;
                    t.status_detail = None;
                    t.onboarded_at = t.onboarded_at.or(Some(now));
                }
                Err(failure) => {
                    if failure.suspends && t.status == TenantStatus::Onboarded {
                        t.status = TenantStatus::Suspended;
                    }
                    t.status_detail = Some(failure.detail.clone());
                }
            }
            Ok(())
        })
        .await
    }

    /// The one way to change a stored tenant: `change` is applied to the latest record,
    /// which is stored if it is still the version read, and read again otherwise (as
    /// [`crate::domain::connections::Connections`] does for connections). `change` may refuse.
    pub(crate) async fn modify(
        &self,
        id: &str,
        mut change: impl FnMut(&mut Tenant) -> Result<(), TenantError>,
    ) -> Result<Tenant, TenantError> {
        loop {
            let mut t = self.get(id).await?;
            let expected = t.version.clone();
            change(&mut t)?;
            t.updated_at = self.clock.now();
            match self.store.update_tenant(&t, &expected).await {
                Ok(v) => {
                    t.version = v;
                    return Ok(t);
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn config(&self) -> &TenancyConfig {
        &self.cfg
    }

    /// Records a tenant (or issues a new link for one already recorded) and returns the
    /// administrator's consent link. A new link replaces the previous one.
    pub async fn start(
        &self,
        tenant_id: &str,
        org_url: Option<crate::domain::ids::OrgUrl>,
        started_by: Option<String>,
    ) -> Result<(Tenant, Url), TenantError> {
        if !is_guid(tenant_id) {
            return Err(TenantError::Invalid(format!(
                "tenant_id {tenant_id:?} must be the customer's Entra tenant id (a GUID, shown on the tenant's Overview page)"
            )));
        }
        let id = tenant_id.to_ascii_lowercase();
        let now = self.clock.now();
        let expires_at = now + CONSENT_LINK_SECONDS;
        let state = self.keys.issue_state(&tag(&id), expires_at);
        let state_hash = crate::support::crypto::sha256_hex(&state);
        let org_url = org_url.map(|u| u.to_string());
        loop {
            let existing = self.store.get_tenant(&id).await?;
            let mut t = existing.clone().unwrap_or_else(|| Tenant {
                id: id.clone(),
                org_url: None,
                status: TenantStatus::ConsentPending,
                status_detail: None,
                state_hash: None,
                state_expires_at: None,
                started_by: None,
                consented_at: None,
                onboarded_at: None,
                created_at: now,
                updated_at: now,
                version: Version::default(),
            });
            if org_url.is_some() {
                t.org_url = org_url.clone();
            }
            if matches!(t.status, TenantStatus::Failed) {
                t.status = TenantStatus::ConsentPending;
                t.status_detail = None;
            }
            t.state_hash = Some(state_hash.clone());
            t.state_expires_at = Some(expires_at);
            t.started_by = started_by.clone().or(t.started_by);
            t.updated_at = now;
            let written = match &existing {
                None => self.store.insert_tenant(&t).await,
                Some(old) => self.store.update_tenant(&t, &old.version).await,
            };
            match written {
                Ok(v) => {
                    t.version = v;
                    return Ok((t, self.consent_link(&id, &state)));
                }
                // Someone else wrote the record meanwhile: read it again.
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn consent_link(&self, tenant: &str, state: &str) -> Url {
        let mut url = self.cfg.authority.clone();
        url.set_path(&format!("/{tenant}/v2.0/adminconsent"));
        url.query_pairs_mut()
            .append_pair("client_id", &self.cfg.app_id)
            .append_pair("scope", &self.cfg.consent_scope)
            .append_pair("redirect_uri", self.cfg.consent_redirect_uri.as_str())
            .append_pair("state", state);
        url
    }

    /// Decides an admin-consent answer (see the module's doc for the order of checks).
    pub async fn answer(&self, a: ConsentAnswer) -> Result<ConsentOutcome, ConsentRefusal> {
        let state = a.state.as_deref().filter(|s| !s.is_empty()).ok_or(ConsentRefusal::NoState)?;
        let now = self.clock.now();
        let verified = self.keys.verify_state(state, now).map_err(ConsentRefusal::State)?;
        let found = self
            .store
            .list_tenants()
            .await?
            .into_iter()
            .find(|t| t.state_hash.as_deref() == Some(verified.hash.as_str()))
            .filter(|t| verified.is_for(&tag(&t.id)))
            .ok_or(ConsentRefusal::Used)?;
        if let Some(error) = a.error.as_deref().filter(|e| !e.is_empty()) {
            let description = a.error_description.clone().unwrap_or_default();
            let first = description.lines().next().unwrap_or_default().to_string();
            let detail = format!("consent was not given ({error}): {first}");
            let tenant = self.settle(found, TenantStatus::Failed, Some(detail), None).await?;
            return Ok(ConsentOutcome::Declined { tenant, error: error.to_string(), description: first });
        }
        if !a.admin_consent.as_deref().is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Err(ConsentRefusal::NotConsented);
        }
        let named = a.tenant.clone().unwrap_or_default();
        if !named.eq_ignore_ascii_case(&found.id) {
            tracing::warn!(tenant = %found.id, named = %named, "an admin-consent answer named another tenant; refused");
            return Err(ConsentRefusal::WrongTenant { got: named });
        }
        // The answer is only a claim: confirm it with a token from that tenant.
        let scope = match &found.org_url {
            Some(org) => format!("{org}/.default"),
            None => self.cfg.consent_scope.clone(),
        };
        let mut budget = self.cfg.consent_wait;
        let mut waits = PROPAGATION_WAITS.iter().map_while(|w| {
            let wait = (*w).min(budget);
            budget -= wait;
            (!wait.is_zero()).then_some(wait)
        });
        let verdict = loop {
            match self.credentials.token(&found.id, &scope).await {
                Ok(_) => break Ok(()),
                Err(e) if e.is_missing_consent() => match waits.next() {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => break Err(e),
                },
                Err(e) => break Err(e),
            }
        };
        match verdict {
            Ok(()) => {
                let tenant = self.settle(found, TenantStatus::Consented, None, Some(now)).await?;
                tracing::info!(tenant = %tenant.id, "admin consent confirmed");
                Ok(ConsentOutcome::Consented(tenant))
            }
            Err(error) => {
                let detail = format!("Entra answered consent, but no token could be had from the tenant: {error}");
                let tenant = self.settle(found, TenantStatus::Failed, Some(detail), None).await?;
                Ok(ConsentOutcome::Unconfirmed { tenant, error })
            }
        }
    }

    /// Uses up the state and stores the outcome, if the record is still as it was read.
    async fn settle(
        &self,
        mut t: Tenant,
        status: TenantStatus,
        detail: Option<String>,
        consented_at: Option<i64>,
    ) -> Result<Tenant, ConsentRefusal> {
        let expected = t.version.clone();
        t.state_hash = None;
        t.state_expires_at = None;
        // A tenant already served stays served: a re-consent that was declined or could not
        // be confirmed is recorded in its detail, and never switches its callers off.
        let served = matches!(t.status, TenantStatus::Onboarded | TenantStatus::Consented);
        t.status = match status {
            TenantStatus::Consented | TenantStatus::Failed if t.status == TenantStatus::Onboarded => t.status,
            TenantStatus::Failed if served => t.status,
            other => other,
        };
        t.status_detail = detail;
        if consented_at.is_some() {
            t.consented_at = consented_at;
        }
        t.updated_at = self.clock.now();
        match self.store.update_tenant(&t, &expected).await {
            Ok(v) => {
                t.version = v;
                Ok(t)
            }
            Err(StoreError::Conflict(_) | StoreError::NotFound(_)) => Err(ConsentRefusal::Used),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn get(&self, id: &str) -> Result<Tenant, TenantError> {
        self.store.get_tenant(&id.to_ascii_lowercase()).await?.ok_or_else(|| TenantError::NotFound(id.to_string()))
    }

    /// Links this deployment signed that are still open (customer administrators' consent
    /// and set-up links), said in one line: each is signed with the key current when it
    /// was issued and fails once that key is removed, so an older key stays listed until
    /// the last one expires. (Authorization links are counted with the records: their
    /// pending part is sealed with the same key.)
    pub async fn open_links(&self) -> Option<String> {
        let tenants = self.list().await.ok()?;
        let now = self.clock.now();
        let open: Vec<i64> = tenants.iter().filter_map(|t| t.state_expires_at).filter(|&at| at > now).collect();
        let until = open.iter().max()?;
        Some(format!(
            "links: {} consent or set-up link(s) still open, the last until {}: each is signed with the key that was current when it was issued, so keep older keys listed until then (or issue new links)",
            open.len(),
            crate::support::time::rfc3339(*until)
        ))
    }

    pub async fn list(&self) -> Result<Vec<Tenant>, TenantError> {
        Ok(self.store.list_tenants().await?)
    }

    /// Off-boards a tenant: its record and cached credential go. What lives in the
    /// customer's organisation (its connections, the application user) stays theirs.
    pub async fn delete(&self, id: &str) -> Result<(), TenantError> {
        let id = id.to_ascii_lowercase();
        if !self.store.delete_tenant(&id).await? {
            return Err(TenantError::NotFound(id));
        }
        self.credentials.forget(&id);
        tracing::info!(tenant = %id, "tenant off-boarded");
        Ok(())
    }
}

/// What a consent state is bound to, so it can only ever answer for its own tenant.
fn tag(tenant: &str) -> String {
    format!("tenant:{tenant}")
}
