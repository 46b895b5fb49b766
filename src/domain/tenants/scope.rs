//! Which organisation's connections a caller, a callback or the timer reaches.
//!
//! The deployment's own store holds its own connections (and, single-tenant, all of
//! them). In a multi-tenant deployment each onboarded customer's connections live in
//! that customer's organisation: a [`Connections`] with that organisation's store, made
//! on first use and kept while the tenant stays onboarded at the same organisation (its
//! token cache and in-process refresh turns go with it). A tenant's record is read again
//! after `MULTITENANT_RECHECK_SECONDS`, so an off-boarding on another instance is honoured
//! here within that time; a tenant that is not served is remembered as refused for a
//! while too, so its callers cost one store read per tenant and interval, not one per call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::onboarding::OrganisationAccess;
use super::{TenantError, Tenants};
use crate::domain::connections::Connections;
use crate::domain::ids::TenantId;
use crate::domain::{StoreError, TenantStatus};
use crate::support::cache::Cache;

/// Why a caller or a callback reaches no connections.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("tenant {tenant} is not onboarded yet (status {status})")]
    NotOnboarded { tenant: String, status: &'static str },
    #[error("tenant {0} is not served by this deployment")]
    Unknown(String),
    /// Onboarded once; its organisation now refuses the app or lacks the tables.
    #[error("tenant {tenant} is suspended: {detail}")]
    Suspended { tenant: String, detail: Arc<str> },
    #[error("tenant {tenant}'s organisation cannot be reached: {reason}")]
    Org { tenant: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How long a refused tenant is answered from memory, at most (and never longer than
/// the recheck interval); how many refused tenants are remembered.
const REFUSAL_FOR: Duration = Duration::from_secs(30);
const REFUSED_TENANTS: usize = 1024;
/// Customer organisations the timer sweeps at once.
pub const TENANTS_AT_ONCE: usize = 4;

/// Why a tenant's callers were refused, remembered for a while.
#[derive(Debug, Clone)]
enum Refusal {
    Unknown,
    NotOnboarded(&'static str),
    Suspended(Arc<str>),
}

impl Refusal {
    fn into_error(self, tenant: &TenantId) -> ScopeError {
        match self {
            Refusal::Unknown => ScopeError::Unknown(tenant.to_string()),
            Refusal::NotOnboarded(status) => ScopeError::NotOnboarded { tenant: tenant.to_string(), status },
            Refusal::Suspended(detail) => ScopeError::Suspended { tenant: tenant.to_string(), detail },
        }
    }
}

/// A customer tenant's connections as this instance serves them.
#[derive(Clone)]
struct Served {
    connections: Arc<Connections>,
    org_url: Option<String>,
    checked: Instant,
}

/// Every organisation this deployment keeps connections in.
pub struct Organisations {
    home: Arc<Connections>,
    tenancy: Option<Tenancy>,
}

struct Tenancy {
    tenants: Arc<Tenants>,
    access: Arc<dyn OrganisationAccess>,
    recheck: Duration,
    served: Mutex<HashMap<TenantId, Served>>,
    refused: Cache<TenantId, Refusal>,
}

impl Organisations {
    /// A deployment that serves its own organisation only.
    pub fn single(home: Arc<Connections>) -> Organisations {
        Organisations { home, tenancy: None }
    }

    /// A deployment that also serves customers' organisations.
    pub fn multi(
        home: Arc<Connections>,
        tenants: Arc<Tenants>,
        access: Arc<dyn OrganisationAccess>,
        recheck: Duration,
    ) -> Organisations {
        let tenancy =
            Tenancy { tenants, access, recheck, served: Mutex::default(), refused: Cache::new(REFUSED_TENANTS) };
        Organisations { home, tenancy: Some(tenancy) }
    }

    /// The deployment's own connections.
    pub fn home(&self) -> &Arc<Connections> {
        &self.home
    }

    /// The customer tenants' records, when this deployment serves others.
    pub fn tenants(&self) -> Option<&Arc<Tenants>> {
        self.tenancy.as_ref().map(|t| &t.tenants)
    }

    /// The port to customers' organisations, when this deployment serves others.
    pub fn access(&self) -> Option<&dyn OrganisationAccess> {
        self.tenancy.as_ref().map(|t| t.access.as_ref())
    }

    /// The connections a back-office caller reaches: the deployment's own for its own
    /// tenant's callers (and always when single-tenant), an onboarded customer's for that
    /// customer's callers, none for anyone else.
    pub async fn for_caller(&self, home: bool, tenant: Option<&str>) -> Result<Arc<Connections>, ScopeError> {
        if self.tenancy.is_none() || home {
            return Ok(self.home.clone());
        }
        let tenant = tenant.ok_or_else(|| ScopeError::Unknown("(no tid claim)".into()))?;
        self.tenant(tenant).await
    }

    /// The connections a signed `state` belongs to: its scope's tenant, or our own.
    pub async fn for_scope(&self, scope: Option<&str>) -> Result<Arc<Connections>, ScopeError> {
        match scope {
            None => Ok(self.home.clone()),
            Some(tenant) => self.tenant(tenant).await,
        }
    }

    /// An onboarded customer tenant's connections.
    pub async fn tenant(&self, tenant: &str) -> Result<Arc<Connections>, ScopeError> {
        let Some(t) = &self.tenancy else { return Err(ScopeError::Unknown(tenant.to_string())) };
        let id = TenantId::parse(tenant).map_err(|_| ScopeError::Unknown(tenant.to_string()))?;
        let known = t.served().get(&id).cloned();
        if let Some(s) = &known
            && s.checked.elapsed() < t.recheck
        {
            return Ok(s.connections.clone());
        }
        if let Some(refusal) = t.refused.get(&id) {
            return Err(refusal.into_error(&id));
        }
        let record = t
            .refused
            .exclusive(&id, || async {
                if let Some(refusal) = t.refused.get(&id) {
                    return Err(Ok(refusal));
                }
                let refused = |r: Refusal| {
                    t.served().remove(&id);
                    t.refused.insert(id.clone(), r.clone(), t.recheck.min(REFUSAL_FOR));
                    Err(Ok(r))
                };
                match t.tenants.get(id.as_str()).await {
                    Ok(rec) if rec.status == TenantStatus::Onboarded => Ok(rec),
                    Ok(rec) if rec.status == TenantStatus::Suspended => refused(Refusal::Suspended(
                        rec.status_detail.as_deref().unwrap_or("its organisation refuses the app").into(),
                    )),
                    Ok(rec) => refused(Refusal::NotOnboarded(rec.status.as_str())),
                    Err(TenantError::NotFound(_)) => refused(Refusal::Unknown),
                    Err(e) => Err(Err(e)),
                }
            })
            .await;
        let record = match record {
            Ok(rec) => rec,
            Err(Ok(refusal)) => return Err(refusal.into_error(&id)),
            Err(Err(TenantError::Store(e))) => return Err(ScopeError::Store(e)),
            Err(Err(e)) => return Err(ScopeError::Org { tenant: id.to_string(), reason: e.to_string() }),
        };
        // Still onboarded at the same organisation: keep the object, move the check's time.
        let connections = match known.filter(|k| k.org_url == record.org_url) {
            Some(k) => k.connections,
            None => {
                let store = t
                    .access
                    .store_for(&record)
                    .map_err(|e| ScopeError::Org { tenant: id.to_string(), reason: e.to_string() })?;
                let mut deps = self.home.deps().clone();
                deps.store = store;
                deps.scope = Some(id.to_string());
                Arc::new(Connections::new(deps))
            }
        };
        let served = Served { connections: connections.clone(), org_url: record.org_url, checked: Instant::now() };
        t.served().insert(id, served);
        Ok(connections)
    }

    /// Every onboarded tenant's connections, for the timer and key rotation.
    pub async fn onboarded(&self) -> Result<Vec<(String, Arc<Connections>)>, ScopeError> {
        let Some(t) = &self.tenancy else { return Ok(Vec::new()) };
        let list = t.tenants.list().await.map_err(|e| match e {
            TenantError::Store(e) => ScopeError::Store(e),
            e => ScopeError::Unknown(e.to_string()),
        })?;
        let mut out = Vec::new();
        for rec in list.into_iter().filter(|r| r.status == TenantStatus::Onboarded) {
            out.push((rec.id.clone(), self.tenant(&rec.id).await?));
        }
        Ok(out)
    }

    /// The deployment's own connections (`None`) and every onboarded customer's.
    pub async fn all(&self) -> Result<Vec<(Option<String>, Arc<Connections>)>, ScopeError> {
        let mut all = vec![(None, self.home.clone())];
        all.extend(self.onboarded().await?.into_iter().map(|(id, c)| (Some(id), c)));
        Ok(all)
    }

    /// The customer tenants this instance currently serves, without reading anything.
    pub fn known(&self) -> Vec<(String, Arc<Connections>)> {
        let Some(t) = &self.tenancy else { return Vec::new() };
        t.served().iter().map(|(id, s)| (id.to_string(), s.connections.clone())).collect()
    }

    /// Forgets what this instance knows of a tenant, served or refused: its record changed
    /// here (consent, check, onboarding, off-boarding), so the next call reads it again.
    pub fn changed(&self, tenant: &str) {
        let (Some(t), Ok(id)) = (&self.tenancy, TenantId::parse(tenant)) else { return };
        t.served().remove(&id);
        t.refused.remove(&id);
    }
}

impl Tenancy {
    fn served(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, Served>> {
        self.served.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use async_trait::async_trait;
    use secrecy::SecretString;

    use super::*;
    use crate::clients::entra::TenantCredentials;
    use crate::clients::secrets::SettingsSecrets;
    use crate::domain::connections::testing::fixture;
    use crate::domain::tenants::onboarding::{OrgCheck, SetupError, SetupReport};
    use crate::support::config::{AppCredential, Settings, TenancyConfig};

    struct NoOrganisations;

    #[async_trait]
    impl OrganisationAccess for NoOrganisations {
        fn store_for(
            &self,
            _: &crate::domain::Tenant,
        ) -> Result<Arc<dyn crate::domain::ConnectionStore>, crate::domain::tenants::onboarding::OrgAddressError>
        {
            Err(crate::domain::tenants::onboarding::OrgAddressError::NoUrl)
        }
        async fn check(&self, _: &crate::domain::Tenant) -> OrgCheck {
            OrgCheck::Failed("not in this test".into())
        }
        async fn set_up(
            &self,
            _: &crate::domain::ids::OrgUrl,
            _: SecretString,
            _: &str,
        ) -> Result<SetupReport, SetupError> {
            Err(SetupError::NotMultiTenant)
        }
    }

    /// Tokens of a tenant that is not served (unknown here, or not onboarded) cost one
    /// read of its record per interval, however many calls, concurrent or not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_tenants_are_answered_from_memory() {
        let fx = fixture();
        let url = |s: &str| url::Url::parse(s).unwrap();
        let cfg = TenancyConfig {
            app_id: "6a7b8c9d-0e1f-4a2b-9c3d-4e5f6a7b8c9d".into(),
            credential: AppCredential::ClientSecret { secret_name: "app-secret".into() },
            authority: url("https://login.microsoftonline.com"),
            consent_scope: "https://graph.microsoft.com/.default".into(),
            consent_redirect_uri: url("https://dc.example/api/oauth/consent"),
            onboard_redirect_uri: url("https://dc.example/api/oauth/onboard"),
            discovery_url: url("https://globaldisco.crm.dynamics.com"),
            recheck: Duration::from_secs(60),
            consent_wait: Duration::from_secs(0),
        };
        let secrets = SettingsSecrets::new(Settings::from_map([("APP_SECRET".to_string(), "s".to_string())].into()));
        let credentials = Arc::new(TenantCredentials::new(&cfg, &secrets, reqwest::Client::new()).await.unwrap());
        let store: Arc<dyn crate::domain::TenantStore> = fx.racing.clone();
        let tenants =
            Arc::new(Tenants::new(store, fx.keys.clone(), fx.clock.clone(), cfg, credentials, reqwest::Client::new()));
        let (pending, _) = tenants.start("cccccccc-3333-4333-8333-cccccccccccc", None, None).await.unwrap();
        let orgs =
            Organisations::multi(Arc::new(fx.conns), tenants, Arc::new(NoOrganisations), Duration::from_secs(60));
        let before = fx.racing.tenant_gets.load(Ordering::SeqCst);
        let unknown = "dddddddd-4444-4444-8444-dddddddddddd";
        let calls = (0..30).map(|_| orgs.for_caller(false, Some(unknown)));
        for r in futures_util::future::join_all(calls).await {
            assert!(matches!(r, Err(ScopeError::Unknown(_))), "{:?}", r.err());
        }
        for _ in 0..30 {
            let r = orgs.for_caller(false, Some(&pending.id)).await;
            assert!(matches!(r, Err(ScopeError::NotOnboarded { status: "consent_pending", .. })), "{:?}", r.err());
        }
        let reads = fx.racing.tenant_gets.load(Ordering::SeqCst) - before;
        assert_eq!(reads, 2, "one read per refused tenant, not one per call");
        // A change made here forgets the refusal: the next call reads the record again.
        orgs.changed(&pending.id);
        let _ = orgs.for_caller(false, Some(&pending.id)).await;
        assert_eq!(fx.racing.tenant_gets.load(Ordering::SeqCst) - before, 3);
    }
}
