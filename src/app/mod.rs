//! The composition root: configuration plus every long-lived part, built once at
//! start-up and shared by all requests. Only this file knows how the parts are wired.

use std::sync::Arc;
use std::time::Instant;

use secrecy::ExposeSecret;
use url::Url;

use crate::clients::auth::BearerVerifier;
use crate::clients::azure::{self, IdentityError, ResourceToken};
use crate::clients::dataverse::Dataverse;
use crate::clients::dataverse::provision::Schema;
use crate::clients::fno::Fno;
use crate::clients::provider::HttpTokenEndpoint;
use crate::clients::secrets::{KeyVaultSecrets, SecretError, SecretSource, SettingsSecrets};
use crate::clients::store::dataverse::DataverseStore;
use crate::clients::store::sqlite::SqliteStore;
use crate::clients::webhooks::{Event, Webhook};
use crate::domain::captures::Captures;
use crate::domain::connections::events::{Events, NoEvents, StatusChange};
use crate::domain::connections::{Connections, Deps};
use crate::domain::oauth::catalog::Catalog;
use crate::domain::portal::Portal;
use crate::domain::portal::identity::PortalVerifier;
use crate::domain::{Changes, Store, StoreError};
use crate::support::config::{
    CaptureMode, Config, ConfigError, CredentialConfig, DataverseConfig, FnoConfig, Settings, StoreConfig,
};
use crate::support::crypto::Keyring;
use crate::support::outbound;
use crate::support::throttle::Throttle;
use crate::support::time::{Clock, SystemClock};

pub struct App {
    pub config: Config,
    pub started: Instant,
    pub started_at: i64,
    pub keys: Arc<Keyring>,
    pub secrets: Arc<dyn SecretSource>,
    pub connections: Arc<Connections>,
    /// Each onboarded customer tenant's connections (in its own organisation), made on
    /// first use, with when its record was last read (see [`App::tenant_scope`]).
    tenant_connections: std::sync::Mutex<std::collections::HashMap<String, TenantScope>>,
    /// Tenants whose callers were refused lately (not known, not onboarded), by id.
    refused_tenants: crate::support::cache::Cache<String, Refusal>,
    pub captures: Captures,
    pub back_office: Option<BearerVerifier>,
    /// Dataverse with our S2S identity, when `DATAVERSE_URL` is set (store, contacts).
    pub dataverse: Option<Arc<Dataverse>>,
    pub portal: Option<Portal>,
    /// Customer tenants, when this deployment serves other organisations.
    pub tenants: Option<crate::domain::tenants::Tenants>,
    /// The one pooled HTTPS client (providers' APIs through the proxy, among others).
    pub http: reqwest::Client,
    /// Places for requests without an `Authorization` header (`MAX_ANONYMOUS_REQUESTS`).
    pub anonymous: tokio::sync::Semaphore,
    /// Callback hits per client address (`CALLBACK_RATE_PER_MINUTE`).
    pub callback_rate: Throttle<std::net::IpAddr>,
    last_timer: std::sync::Mutex<Option<TimerRun>>,
    /// The store's counts for `/api/health`, reused for a minute.
    pub census: crate::support::cache::Cache<(), crate::domain::Census>,
    /// How many values each key seals in the store, for `/api/health`, reused a minute.
    pub sealed_keys: crate::support::cache::Cache<(), std::collections::BTreeMap<String, u64>>,
    /// The store's readiness for `/api/health`, checked at most once per interval.
    pub readiness: crate::support::cache::Cache<(), serde_json::Value>,
}

/// Why a caller or a callback reaches no connections.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("tenant {tenant} is not onboarded yet (status {status})")]
    NotOnboarded { tenant: String, status: &'static str },
    #[error("tenant {0} is not served by this deployment")]
    Unknown(String),
    #[error("tenant {tenant}'s organisation cannot be reached: {reason}")]
    Org { tenant: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why setting the product up in a customer's organisation stopped.
#[derive(Debug, thiserror::Error)]
pub enum OnboardError {
    #[error("{0}")]
    Dataverse(crate::clients::dataverse::DataverseError),
    #[error("{0}")]
    Other(String),
}

/// Why the application could not start. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("secrets: {0}")]
    Secret(#[from] SecretError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("HTTP client: {0}")]
    Http(#[from] outbound::ClientError),
    #[error("Azure identity: {0}")]
    Identity(#[from] IdentityError),
}

impl App {
    pub async fn build(settings: Settings, config: Config) -> Result<App, StartupError> {
        let started = Instant::now();
        let secrets = secret_source(&config, settings).await?;
        let catalog = Catalog::load(&config.providers_file, config.providers_file_required)
            .map_err(|e| ConfigError::new("PROVIDERS_FILE", e))?;
        // Every secret the catalog names must resolve now, not at the first callback.
        for name in catalog.secret_names() {
            secrets.get(name).await?;
        }
        let keys = Arc::new(load_keys(&config, secrets.as_ref()).await?);
        let http = http_client(&config)?;
        let dataverse = match &config.dataverse {
            Some(dv) => Some(dataverse_client(dv, &config, secrets.as_ref(), http.clone()).await?),
            None => None,
        };
        let store: Arc<dyn Store> = match (&config.store, &dataverse) {
            (StoreConfig::Sqlite { path }, _) => {
                Arc::new(SqliteStore::open(path).map_err(|e| match read_only(path) {
                    Some(why) => ConfigError::new("SQLITE_PATH", format!("{e}: {why}")).into(),
                    None => StartupError::from(e),
                })?)
            }
            (StoreConfig::Dataverse(dv), Some(client)) => {
                Arc::new(DataverseStore::new(client.clone(), Schema::new(&dv.prefix)))
            }
            (StoreConfig::Dataverse(_), None) => {
                return Err(ConfigError::new("DATAVERSE_URL", "is required with STORE=dataverse").into());
            }
        };
        // A key may leave TOKEN_ENCRYPTION_KEYS only once nothing is sealed with it. The
        // embedded store counts in place, in milliseconds; a Dataverse store is checked in
        // the background once serving (see `App::check_keys_in_use`).
        if store.kind() == "sqlite" {
            let missing = missing_keys(&keys, &store.sealed_key_counts().await?);
            if !missing.is_empty() {
                return Err(ConfigError::new(
                    crate::clients::secrets::env_name(&config.secrets.token_keys_secret),
                    format!(
                        "{} still seal{} values in the store ({}); list the key again after the current one, run `handler reseal`, and remove it once that reports none",
                        describe_missing(&missing),
                        if missing.len() == 1 { "s" } else { "" },
                        store.kind()
                    ),
                )
                .into());
            }
        }
        // A multi-tenant deployment's customers call with tokens of their own tenants.
        let back_office = config.back_office.clone().map(|b| match config.tenancy {
            Some(_) => BearerVerifier::new(b, http.clone()).accepting_other_tenants(),
            None => BearerVerifier::new(b, http.clone()),
        });
        let portal = config.portal.enabled().then(|| {
            let lookup = config.portal.oidc.as_ref().and_then(|o| o.lookup.as_ref()).map(|l| l.column.clone());
            Portal::new(PortalVerifier::new(&config.portal, http.clone()), dataverse.clone(), lookup)
        });
        let fno = match &config.oauth.capture {
            CaptureMode::Fno(f) => Some(Arc::new(fno_client(f, &config, secrets.as_ref(), http.clone()).await?)),
            _ => None,
        };
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let endpoint = Arc::new(HttpTokenEndpoint {
            http: outbound::unpooled_client(config.oauth.upstream_timeout)?,
            secrets: secrets.clone(),
        });
        let events: Arc<dyn Events> = match &config.webhook {
            Some(w) => {
                let key = secrets.get(&w.key_secret).await?;
                Arc::new(WebhookEvents(Webhook::start(w.url.clone(), key, http.clone())))
            }
            None => Arc::new(NoEvents),
        };
        let connections = Arc::new(Connections::new(Deps {
            store: store.clone(),
            keys: keys.clone(),
            catalog: Arc::new(catalog),
            endpoint,
            clock: clock.clone(),
            cfg: config.oauth.clone(),
            redirect_uri: config.redirect_uri.clone(),
            events,
            scope: None,
        }));
        let policy = config.oauth.capture_policy.clone();
        let state_key = match &policy.state_key_secret {
            Some(name) => Some(secrets.get(name).await?),
            None => None,
        };
        if policy.any_state && !matches!(config.oauth.capture, CaptureMode::Off) {
            tracing::warn!(
                "CAPTURE_STATES=any: every callback with a state this service did not issue is kept; anyone can add captures"
            );
        }
        let tenants = match &config.tenancy {
            Some(t) => Some(crate::domain::tenants::Tenants::new(
                store.clone(),
                keys.clone(),
                clock.clone(),
                t.clone(),
                crate::clients::entra::TenantCredentials::new(t, secrets.as_ref()).await?,
                outbound::unpooled_client(config.oauth.upstream_timeout)?,
            )),
            None => None,
        };
        let captures = Captures { store, keys: keys.clone(), clock, policy, state_key, fno };
        let anonymous = tokio::sync::Semaphore::new(config.limits.max_anonymous_requests);
        let callback_rate = Throttle::new(config.limits.callbacks_per_minute);
        Ok(App {
            anonymous,
            callback_rate,
            last_timer: Default::default(),
            census: crate::support::cache::Cache::new(1),
            readiness: crate::support::cache::Cache::new(1),
            sealed_keys: crate::support::cache::Cache::new(1),
            config,
            started,
            started_at: crate::support::time::now(),
            keys,
            secrets,
            connections,
            tenant_connections: Default::default(),
            refused_tenants: crate::support::cache::Cache::new(REFUSED_TENANTS),
            captures,
            back_office,
            dataverse,
            portal,
            tenants,
            http,
        })
    }

    /// The connections a back-office caller reaches: the deployment's own for its own
    /// tenant's callers (and always when single-tenant), an onboarded customer's for that
    /// customer's callers, none for anyone else.
    pub async fn connections_for(&self, caller: &crate::clients::auth::Caller) -> Result<Arc<Connections>, ScopeError> {
        if self.tenants.is_none() || caller.home {
            return Ok(self.connections.clone());
        }
        let tenant = caller.tenant.as_deref().ok_or_else(|| ScopeError::Unknown("(no tid claim)".into()))?;
        self.tenant_scope(tenant).await
    }

    /// An onboarded customer tenant's connections, kept once made. The tenant's record is
    /// read again after `MULTITENANT_RECHECK_SECONDS`, so an off-boarding on another
    /// instance is honoured here within that time.
    pub async fn tenant_scope(&self, tenant: &str) -> Result<Arc<Connections>, ScopeError> {
        let id = tenant.to_ascii_lowercase();
        let recheck = self.config.tenancy.as_ref().map(|t| t.recheck).unwrap_or_default();
        let known = self.tenant_connections.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned();
        if let Some(scope) = &known
            && scope.checked.elapsed() < recheck
        {
            return Ok(scope.connections.clone());
        }
        // A tenant that is not served is answered from memory for a while: tokens of a
        // tenant that is not onboarded cost one store read per tenant and interval, not one
        // per call (callers racing on one tenant wait for the one read).
        if let Some(refusal) = self.refused_tenants.get(&id) {
            return Err(refusal.into_error(id));
        }
        let tenants = self.tenants.as_ref().ok_or_else(|| ScopeError::Unknown(id.clone()))?;
        let read = self
            .refused_tenants
            .exclusive(&id, || async {
                if let Some(refusal) = self.refused_tenants.get(&id) {
                    return Err(Ok(refusal));
                }
                let refused = |r: Refusal| {
                    self.forget_tenant(&id);
                    self.refused_tenants.insert(id.clone(), r, recheck.min(REFUSAL_FOR));
                    Err(Ok(r))
                };
                match tenants.get(&id).await {
                    Ok(t) if t.status == crate::domain::TenantStatus::Onboarded => Ok(t),
                    Ok(t) => refused(Refusal::NotOnboarded(t.status.as_str())),
                    Err(crate::domain::tenants::TenantError::NotFound(_)) => refused(Refusal::Unknown),
                    Err(e) => Err(Err(e)),
                }
            })
            .await;
        let record = match read {
            Ok(t) => t,
            Err(Ok(refusal)) => return Err(refusal.into_error(id)),
            Err(Err(crate::domain::tenants::TenantError::Store(e))) => return Err(ScopeError::Store(e)),
            Err(Err(e)) => return Err(ScopeError::Org { tenant: id, reason: e.to_string() }),
        };
        // Still onboarded at the same organisation: keep the object (its token cache and
        // its in-process refresh queue), only the time of the check moves.
        let connections = match known.filter(|k| k.org_url == record.org_url) {
            Some(k) => k.connections,
            None => {
                let dv = self.tenant_dataverse(&record)?;
                let mut deps = self.connections.deps().clone();
                deps.store = Arc::new(DataverseStore::new(dv, Schema::new(self.dataverse_prefix())));
                deps.scope = Some(id.clone());
                Arc::new(Connections::new(deps))
            }
        };
        let mut map = self.tenant_connections.lock().unwrap_or_else(|e| e.into_inner());
        let scope = TenantScope { connections: connections.clone(), org_url: record.org_url, checked: Instant::now() };
        map.insert(id, scope);
        Ok(connections)
    }

    /// Every onboarded tenant's connections, for the timer.
    pub async fn tenant_scopes(&self) -> Result<Vec<(String, Arc<Connections>)>, ScopeError> {
        let Some(tenants) = &self.tenants else { return Ok(Vec::new()) };
        let list = tenants.list().await.map_err(|e| match e {
            crate::domain::tenants::TenantError::Store(e) => ScopeError::Store(e),
            e => ScopeError::Unknown(e.to_string()),
        })?;
        let mut out = Vec::new();
        for t in list.into_iter().filter(|t| t.status == crate::domain::TenantStatus::Onboarded) {
            out.push((t.id.clone(), self.tenant_scope(&t.id).await?));
        }
        Ok(out)
    }

    /// The customer tenants this instance currently serves, without reading anything.
    pub fn known_tenant_scopes(&self) -> Vec<(String, Arc<Connections>)> {
        let map = self.tenant_connections.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(id, s)| (id.clone(), s.connections.clone())).collect()
    }

    /// Drops an off-boarded tenant's connections object (its rows stay in its organisation).
    pub fn forget_tenant(&self, id: &str) {
        self.tenant_connections.lock().unwrap_or_else(|e| e.into_inner()).remove(&id.to_ascii_lowercase());
    }

    /// Forgets what this instance knows of a tenant, served or refused: its record changed
    /// here (consent, check, onboarding, off-boarding), so the next call reads it again.
    pub fn tenant_changed(&self, id: &str) {
        self.forget_tenant(id);
        self.refused_tenants.remove(&id.to_ascii_lowercase());
    }

    fn dataverse_prefix(&self) -> &str {
        self.config.dataverse.as_ref().map(|d| d.prefix.as_str()).unwrap_or("dc")
    }

    /// A Dataverse client for a customer's organisation, with the app's token from that
    /// customer's tenant and a request limit of its own: service-protection limits are per
    /// application user and organisation, so one busy customer never slows another.
    fn tenant_dataverse(&self, t: &crate::domain::Tenant) -> Result<Arc<Dataverse>, ScopeError> {
        let org_err = |reason: String| ScopeError::Org { tenant: t.id.clone(), reason };
        let tenants = self.tenants.as_ref().ok_or_else(|| ScopeError::Unknown(t.id.clone()))?;
        let org = t.org_url.as_deref().ok_or_else(|| org_err("no org_url was given".into()))?;
        let url = crate::support::config::parse_service_url(org).map_err(org_err)?;
        let limit = self.config.dataverse.as_ref().map(|d| d.max_concurrency).unwrap_or(16);
        let tokens = Arc::new(tenants.org_token(&t.id, org));
        Ok(Arc::new(Dataverse::new(&url, self.http.clone(), tokens, None).with_concurrency(limit)))
    }

    /// Checks a consented tenant's organisation with the app's own token: the application
    /// user answers `WhoAmI`, and the product's tables are there. Records `onboarded`, or
    /// what is missing, on the tenant.
    pub async fn check_tenant(&self, id: &str) -> Result<crate::domain::Tenant, crate::domain::tenants::TenantError> {
        use crate::domain::tenants::TenantError;
        let tenants = self.tenants.as_ref().ok_or_else(|| TenantError::NotFound(id.to_string()))?;
        let t = tenants.get(id).await?;
        if t.status == crate::domain::TenantStatus::ConsentPending {
            return Err(TenantError::Invalid(format!(
                "tenant {id} has not consented yet: send its administrator the link"
            )));
        }
        let dv = self.tenant_dataverse(&t).map_err(|e| TenantError::Invalid(e.to_string()))?;
        let outcome = match dv.who_am_i().await {
            Ok(_) => {
                match crate::clients::dataverse::provision::verify(&dv, &Schema::new(self.dataverse_prefix())).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(missing)) => Err(format!(
                        "the organisation does not have the product's tables yet ({missing}): run `handler provision` against it"
                    )),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(crate::clients::dataverse::DataverseError::Service { status: 403, message, code, .. }) => Err(format!(
                "the organisation refuses the app ({code}: {message}): an administrator adds the application user for app {} with the product's security role",
                tenants.config().app_id
            )),
            Err(e) => Err(e.to_string()),
        };
        self.tenant_changed(id);
        tenants.record_check(id, outcome).await
    }

    /// Sets the product up in the organisation the administrator signed in for (with
    /// their token, used for this and dropped), then checks it with the app's own token.
    pub async fn onboard_organisation(
        &self,
        signed_in: &crate::domain::tenants::signin::Delegated,
        org: &str,
    ) -> Result<(crate::clients::dataverse::provision::Report, crate::domain::Tenant), OnboardError> {
        let tenants =
            self.tenants.as_ref().ok_or_else(|| OnboardError::Other("not a multi-tenant deployment".into()))?;
        let url = crate::support::config::parse_service_url(org).map_err(OnboardError::Other)?;
        let token =
            tenants.org_token_for_admin(signed_in, org).await.map_err(|e| OnboardError::Other(e.to_string()))?;
        let dv = Dataverse::new(&url, self.http.clone(), Arc::new(azure::StaticToken(token)), None);
        let schema = Schema::new(self.dataverse_prefix());
        let report = crate::clients::dataverse::setup::onboard(&dv, &schema, &tenants.config().app_id)
            .await
            .map_err(OnboardError::Dataverse)?;
        let id = signed_in.tenant.id.clone();
        tenants.set_org(&id, org).await.map_err(|e| OnboardError::Other(e.to_string()))?;
        let t = self.check_tenant(&id).await.map_err(|e| OnboardError::Other(e.to_string()))?;
        Ok((report, t))
    }

    pub fn record_timer_run(&self, run: TimerRun) {
        *self.last_timer.lock().unwrap_or_else(|e| e.into_inner()) = Some(run);
    }

    pub fn last_timer_run(&self) -> Option<TimerRun> {
        *self.last_timer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads, in the background and all at once, what a cold instance's first requests
    /// would otherwise fetch one after another: the back-office issuer's signing keys
    /// (discovery, then JWKS), and the Dataverse token with a warm connection (WhoAmI).
    /// Failures are only logged: the requests fetch again when they need to.
    pub async fn prefetch(self: Arc<App>) {
        let started = Instant::now();
        let keys = async {
            if let Some(v) = &self.back_office
                && let Err(e) = v.load_keys().await
            {
                tracing::warn!("prefetch: the back-office issuer's keys: {e}");
            }
        };
        let dataverse = async {
            if let Some(dv) = &self.dataverse
                && let Err(e) = dv.who_am_i().await
            {
                tracing::warn!("prefetch: Dataverse: {e}");
            }
        };
        futures_util::join!(keys, dataverse);
        tracing::info!(ms = started.elapsed().as_millis() as u64, "prefetch done");
    }

    /// Follows what other instances change in the store (`CHANGE_FEED_SECONDS`): one
    /// request per interval whatever the number of connections, and every cached token
    /// another instance changed or deleted is dropped. While it runs, a cached token is
    /// trusted until it is due; when the feed breaks, for `TOKEN_CACHE_SECONDS` again and
    /// everything cached is dropped, since changes may have been missed.
    pub async fn follow_changes(self: Arc<App>) {
        let every = self.config.oauth.change_feed;
        if every.is_zero() {
            return;
        }
        let store = self.connections.store().clone();
        let mut cursor: Option<String> = None;
        loop {
            match store.connection_changes(cursor.as_deref()).await {
                Ok(None) => return,
                Ok(Some((changes, next))) => {
                    if cursor.is_none() {
                        self.connections.forget(&Changes::All);
                        self.connections.follow(Some(FEED_TRUST));
                        tracing::info!(every_ms = every.as_millis() as u64, "following the connections' changes");
                    } else {
                        self.connections.forget(&changes);
                    }
                    cursor = Some(next);
                }
                Err(e) => {
                    if cursor.take().is_some() {
                        self.connections.follow(None);
                        self.connections.forget(&Changes::All);
                    }
                    if !e.is_transient() {
                        // Change tracking is off on the table (provisioned by an earlier
                        // version) or refused: say so once and rely on TOKEN_CACHE_SECONDS.
                        tracing::warn!(
                            "no change feed ({e}); turn on change tracking for the connections table (handler provision does for new tables); cached tokens are trusted for TOKEN_CACHE_SECONDS"
                        );
                        return;
                    }
                    tracing::warn!(
                        "the change feed failed ({e}); cached tokens are trusted for TOKEN_CACHE_SECONDS until it is back"
                    );
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Each organisation this deployment keeps connections in (its own store, `None`, and
    /// every onboarded customer's) with what its connections object is.
    pub async fn organisations(&self) -> Result<Vec<(Option<String>, Arc<Connections>)>, ScopeError> {
        let mut all = vec![(None, self.connections.clone())];
        all.extend(self.tenant_scopes().await?.into_iter().map(|(id, c)| (Some(id), c)));
        Ok(all)
    }

    /// The keys that still seal something in any organisation and are not configured, by
    /// organisation (`None` for the deployment's own store). Logged as errors: tokens
    /// sealed with them cannot be read until the key is listed again.
    pub async fn check_keys_in_use(&self) -> Vec<(Option<String>, Vec<(String, u64)>)> {
        let mut found = Vec::new();
        let orgs = match self.organisations().await {
            Ok(orgs) => orgs,
            Err(e) => {
                tracing::warn!("could not list the organisations to check the keys in use: {e}");
                vec![(None, self.connections.clone())]
            }
        };
        for (org, connections) in orgs {
            match connections.store().sealed_key_counts().await {
                Ok(counts) => {
                    let missing = missing_keys(&self.keys, &counts);
                    if !missing.is_empty() {
                        tracing::error!(
                            organisation = org.as_deref().unwrap_or("own store"),
                            "{} still seal values there but are not in TOKEN_ENCRYPTION_KEYS: list them again and run `handler reseal`",
                            describe_missing(&missing)
                        );
                        found.push((org, missing));
                    }
                }
                Err(e) => tracing::warn!(
                    organisation = org.as_deref().unwrap_or("own store"),
                    "could not count the keys in use: {e}"
                ),
            }
        }
        found
    }

    /// Links this deployment signed that are still open (customer administrators' consent
    /// and set-up links): each is signed with the key current when it was issued and fails
    /// once that key is removed, so an older key stays listed until the last one expires.
    /// Authorization links are counted with the records (their pending part is sealed with
    /// the same key).
    pub async fn outstanding_links(&self) -> Option<String> {
        let tenants = self.tenants.as_ref()?.list().await.ok()?;
        let now = crate::support::time::now();
        let open: Vec<i64> = tenants.iter().filter_map(|t| t.state_expires_at).filter(|&at| at > now).collect();
        let until = open.iter().max()?;
        Some(format!(
            "links: {} consent or set-up link(s) still open, the last until {}: each is signed with the key that was current when it was issued, so keep older keys listed until then (or issue new links)",
            open.len(),
            crate::support::time::rfc3339(*until)
        ))
    }

    /// Re-reads the token encryption keys (a key rotated in Key Vault is used without a
    /// restart). A new list that drops a key still sealing something in any organisation
    /// is not applied: the current keys stay, and the error says where the key is used.
    pub async fn reload_keys(&self) {
        let name = &self.config.secrets.token_keys_secret;
        match self.secrets.get(name).await {
            Ok(spec) => match self.guarded_reload(spec.expose_secret()).await {
                Ok(true) => tracing::info!(current = %self.keys.current_id(), "token encryption keys reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!("the token encryption keys in {name} are malformed ({e}); keeping the current ones")
                }
            },
            Err(e) => tracing::warn!("could not re-read the token encryption keys: {e}"),
        }
    }

    async fn guarded_reload(&self, spec: &str) -> Result<bool, crate::support::crypto::KeyFormatError> {
        let dropped = self.keys.dropped_by(spec).unwrap_or_default();
        if !dropped.is_empty() {
            let orgs = self.organisations().await.unwrap_or_else(|_| vec![(None, self.connections.clone())]);
            for (org, connections) in orgs {
                let counts = match connections.store().sealed_key_counts().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(
                            "the new token encryption keys drop {}, and whether it still seals anything could not be read ({e}); keeping the current keys",
                            dropped.join(", ")
                        );
                        return Ok(false);
                    }
                };
                let in_use: Vec<(String, u64)> =
                    dropped.iter().filter_map(|k| counts.get(k).map(|n| (k.clone(), *n))).collect();
                if !in_use.is_empty() {
                    tracing::error!(
                        organisation = org.as_deref().unwrap_or("own store"),
                        "the new token encryption keys drop {}, which still seal values there; keeping the current keys: run `handler reseal` first",
                        describe_missing(&in_use)
                    );
                    return Ok(false);
                }
            }
        }
        self.keys.reload(spec)
    }
}

/// The keys `counts` names that the keyring does not have, with their counts.
fn missing_keys(keys: &Keyring, counts: &std::collections::BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let known = keys.ids();
    counts.iter().filter(|(k, _)| !known.contains(k)).map(|(k, n)| (k.clone(), *n)).collect()
}

fn describe_missing(missing: &[(String, u64)]) -> String {
    let parts: Vec<String> = missing.iter().map(|(k, n)| format!("key {k} ({n} sealed values)")).collect();
    parts.join(", ")
}

/// Why a tenant's callers were refused, remembered for [`REFUSAL_FOR`].
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Unknown,
    NotOnboarded(&'static str),
}

impl Refusal {
    fn into_error(self, tenant: String) -> ScopeError {
        match self {
            Refusal::Unknown => ScopeError::Unknown(tenant),
            Refusal::NotOnboarded(status) => ScopeError::NotOnboarded { tenant, status },
        }
    }
}

/// How long a refused tenant is answered from memory, at most (and never longer than
/// `MULTITENANT_RECHECK_SECONDS`); how many refused tenants are remembered.
const REFUSAL_FOR: std::time::Duration = std::time::Duration::from_secs(30);
const REFUSED_TENANTS: usize = 1024;

/// A customer tenant's connections as this instance serves them.
#[derive(Clone)]
struct TenantScope {
    connections: Arc<Connections>,
    org_url: Option<String>,
    checked: Instant,
}

/// How long a cached token is trusted while the change feed runs: the refresh margin
/// decides long before this.
const FEED_TRUST: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

// The builders below are the running app's and `handler check`'s alike, so a check
// exercises exactly the wiring production runs.

/// The one pooled HTTPS client, with the configured upstream timeout.
pub fn http_client(config: &Config) -> Result<reqwest::Client, StartupError> {
    Ok(outbound::client(config.oauth.upstream_timeout)?)
}

/// Where named secrets come from: Key Vault when `KEY_VAULT_URL` is set (read with the
/// app's Azure identity), the settings otherwise.
pub async fn secret_source(config: &Config, settings: Settings) -> Result<Arc<dyn SecretSource>, StartupError> {
    let local = SettingsSecrets::new(settings);
    let Some(vault) = &config.secrets.key_vault else {
        tracing::info!("secrets: from app settings (no KEY_VAULT_URL)");
        return Ok(Arc::new(local));
    };
    tracing::info!(vault = %vault, "secrets: Key Vault, authenticating with {}", config.azure_credential.describe());
    let credential = azure::credential(&config.azure_credential, &local).await?;
    Ok(Arc::new(KeyVaultSecrets::new(vault, credential, config.secrets.cache_ttl)?))
}

/// Tokens for an Azure resource with a credential (a resource's own, or the app's).
pub async fn resource_token(
    credential: Option<&CredentialConfig>,
    config: &Config,
    secrets: &dyn SecretSource,
    resource: &Url,
) -> Result<Arc<ResourceToken>, StartupError> {
    let credential = credential.unwrap_or(&config.azure_credential);
    let built = azure::credential(credential, secrets).await?;
    Ok(Arc::new(ResourceToken::new(built, resource.as_str())))
}

/// A Dataverse client with the configured identity (Dataverse's own, or the app's).
pub async fn dataverse_client(
    dv: &DataverseConfig,
    config: &Config,
    secrets: &dyn SecretSource,
    http: reqwest::Client,
) -> Result<Arc<Dataverse>, StartupError> {
    let credential = dv.credential.as_ref().unwrap_or(&config.azure_credential);
    tracing::info!(url = %dv.url, "Dataverse: authenticating with {}", credential.describe());
    let tokens = resource_token(dv.credential.as_ref(), config, secrets, &dv.url).await?;
    Ok(Arc::new(Dataverse::new(&dv.url, http, tokens, dv.solution.clone()).with_concurrency(dv.max_concurrency)))
}

/// The Finance & Operations capture target with the configured identity.
pub async fn fno_client(
    f: &FnoConfig,
    config: &Config,
    secrets: &dyn SecretSource,
    http: reqwest::Client,
) -> Result<Fno, StartupError> {
    let credential = f.credential.as_ref().unwrap_or(&config.azure_credential);
    tracing::info!(url = %f.url, path = %f.path, "F&O capture: authenticating with {}", credential.describe());
    let tokens = resource_token(f.credential.as_ref(), config, secrets, &f.url).await?;
    Fno::new(&f.url, &f.path, f.data_area.clone(), http, tokens, config.oauth.upstream_timeout)
        .map_err(|e| ConfigError::new("FNO_CAPTURE_PATH", e.to_string()).into())
}

/// The token encryption keys. Without a configured key and with the SQLite store, a
/// key is generated once and kept beside the database file, so the embedded defaults
/// work; any other store requires a configured key.
async fn load_keys(config: &Config, secrets: &dyn SecretSource) -> Result<Keyring, StartupError> {
    let name = &config.secrets.token_keys_secret;
    let setting = crate::clients::secrets::env_name(name);
    match secrets.get(name).await {
        Ok(spec) => Keyring::parse(spec.expose_secret()).map_err(|e| ConfigError::new(setting, e.0).into()),
        Err(SecretError::Missing { .. })
            if config.secrets.dev_key_file.is_some() && config.secrets.key_vault.is_none() =>
        {
            let path = config.secrets.dev_key_file.clone().unwrap_or_default();
            let spec = local_key(&path).map_err(|e| {
                let why = read_only(&path).map(|why| format!("; {why}")).unwrap_or_default();
                ConfigError::new(
                    &setting,
                    format!("is not set and a local key could not be written to {}: {e}{why}", path.display()),
                )
            })?;
            tracing::warn!(
                "{setting} is not set: using the local development key in {} (set {setting} for any shared or deployed instance)",
                path.display()
            );
            Keyring::parse(spec.trim()).map_err(|e| ConfigError::new(format!("{}", path.display()), e.0).into())
        }
        Err(e) => Err(e.into()),
    }
}

/// What the last timer run in this process did (for `/api/health`).
#[derive(Debug, Clone, Copy)]
pub struct TimerRun {
    /// Unix seconds.
    pub at: i64,
    pub ms: u64,
    pub refreshed: usize,
    pub needs_reauth: usize,
    pub failed: usize,
}

/// Status changes as signed webhook events.
struct WebhookEvents(Webhook);

impl Events for WebhookEvents {
    fn status_changed(&self, c: StatusChange) {
        let status = c.to.map(|s| s.as_str()).unwrap_or("deleted");
        self.0.send(Event::status_changed(
            c.connection_id,
            c.provider,
            c.owner,
            c.from.map(|s| s.as_str()),
            status,
            c.detail,
            c.at,
        ));
    }
}

/// Why nothing can be written next to `path`, when the reason is a read-only folder: a
/// deployed package (Flex Consumption runs the zip mounted read-only) has no place for
/// the embedded defaults, so the answer says what to set instead.
fn read_only(path: &std::path::Path) -> Option<String> {
    let dir = path.parent()?;
    let probe = dir.join(format!(".write-probe-{}", crate::support::crypto::random_hex::<4>()));
    let written = std::fs::create_dir_all(dir).and_then(|()| std::fs::File::create_new(&probe).map(drop));
    let _ = std::fs::remove_file(&probe);
    match written {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied) => {
            Some(format!(
                "{} cannot be written: the app folder is read-only (a deployed package is mounted read-only): set STORE=dataverse with TOKEN_ENCRYPTION_KEYS or KEY_VAULT_URL for production, or SQLITE_PATH to a writable file such as /tmp/companion.db (lost when the instance stops)",
                dir.display()
            ))
        }
        _ => None,
    }
}

/// The local development key in `path`, created on first use. Several handler processes
/// can start at once on a fresh app root (the host runs several workers), so the key is
/// written whole to a private temporary file and then linked into place, which fails if
/// another process got there first: the loser reads the winner's key, never half of it.
fn local_key(path: &std::path::Path) -> std::io::Result<String> {
    if let Ok(spec) = std::fs::read_to_string(path) {
        return Ok(spec);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    store_new_key(path, &Keyring::generate_spec("local1"))
}

/// Puts `spec` at `path` unless another process did first; returns the key in force.
fn store_new_key(path: &std::path::Path, spec: &str) -> std::io::Result<String> {
    use std::io::Write;
    let tmp = path.with_extension(format!("key-{}.tmp", crate::support::crypto::random_hex::<8>()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = opts.open(&tmp).and_then(|mut f| f.write_all(spec.as_bytes()).and_then(|()| f.sync_all()));
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(spec.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read_to_string(path),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_that_loses_the_key_race_uses_the_winners_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("companion.key");
        assert_eq!(store_new_key(&path, "first").unwrap(), "first");
        // The loser read nothing, generated its own key, and finds the winner's in place.
        assert_eq!(store_new_key(&path, "second").unwrap(), "first");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "first");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");
    }
}
