//! The composition root: configuration plus every long-lived part, built once at
//! start-up. Only this module knows how the parts are wired; what it hands out is one
//! narrow service per audience ([`services`]) and, to the command line, the few
//! operations the sub-commands run. Its fields are its own.
//!
//! - [`build`]: the builders (secrets, HTTP, Dataverse, F&O) and the encryption keys;
//! - [`loops`]: what runs beside the server (prefetch, change feed, key reload);
//! - [`services`]: what each audience's routes are handed.

pub mod build;
mod loops;
pub mod services;

use std::sync::Arc;
use std::time::Instant;

use crate::clients::auth::BearerVerifier;
use crate::clients::azure::IdentityError;
use crate::clients::dataverse::Dataverse;
use crate::clients::dataverse::organisations::DataverseOrganisations;
use crate::clients::dataverse::provision::Schema;
use crate::clients::entra::TenantCredentials;
use crate::clients::provider::HttpTokenEndpoint;
use crate::clients::secrets::{SecretError, SecretSource};
use crate::clients::store::dataverse::DataverseStore;
use crate::clients::webhooks::Webhook;
use crate::domain::captures::Captures;
use crate::domain::connections::events::{Events, NoEvents};
use crate::domain::connections::{Connections, Deps};
use crate::domain::oauth::catalog::Catalog;
use crate::domain::portal::Portal;
use crate::domain::portal::identity::PortalVerifier;
use crate::domain::tenants::Tenants;
use crate::domain::tenants::scope::Organisations;
use crate::domain::{ChangeFeed, Store, StoreError};
use crate::support::cache::Cache;
use crate::support::config::{CaptureMode, Config, ConfigError, Settings, StoreConfig};
use crate::support::crypto::Keyring;
use crate::support::outbound;
use crate::support::throttle::Throttle;
use crate::support::time::{Clock, SystemClock};
use services::{
    Agents, BackOffice, BindCookies, Callback, FeedRecord, Health, PortalApi, Server, Services, TenantsApi, Timer,
    TimerRecord,
};

pub struct App {
    config: Config,
    started: Instant,
    keys: Arc<Keyring>,
    secrets: Arc<dyn SecretSource>,
    organisations: Arc<Organisations>,
    verifier: Option<Arc<BearerVerifier>>,
    /// Dataverse with our S2S identity, when `DATAVERSE_URL` is set (warmed at start).
    dataverse: Option<Arc<Dataverse>>,
    /// The own store's change feed (other instances' writes).
    feed: Arc<dyn ChangeFeed>,
    services: Arc<Services>,
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

/// The parts every service is made of, between the two halves of [`App::build`].
struct Parts {
    keys: Arc<Keyring>,
    secrets: Arc<dyn SecretSource>,
    http: reqwest::Client,
    dataverse: Option<Arc<Dataverse>>,
    organisations: Arc<Organisations>,
    captures: Arc<Captures>,
    verifier: Option<Arc<BearerVerifier>>,
    feed: Arc<dyn ChangeFeed>,
}

impl App {
    pub async fn build(settings: Settings, config: Config) -> Result<App, StartupError> {
        let started = Instant::now();
        let parts = Self::parts(settings, &config).await?;
        let services = Arc::new(Self::audiences(&config, &parts, started));
        Ok(App {
            started,
            keys: parts.keys,
            secrets: parts.secrets,
            organisations: parts.organisations,
            verifier: parts.verifier,
            dataverse: parts.dataverse,
            feed: parts.feed,
            services,
            config,
        })
    }

    /// Secrets, keys, the store, the connection rules, captures and tenancy.
    async fn parts(settings: Settings, config: &Config) -> Result<Parts, StartupError> {
        let secrets = build::secret_source(config, settings).await?;
        let catalog = Catalog::load(&config.providers_file, config.providers_file_required)
            .map_err(|e| ConfigError::new("PROVIDERS_FILE", e))?;
        // Every secret the catalog names must resolve now, not at the first callback.
        for name in catalog.secret_names() {
            secrets.get(name).await?;
        }
        let keys = Arc::new(build::load_keys(config, secrets.as_ref()).await?);
        let http = build::http_client(config)?;
        let dataverse = match &config.dataverse {
            Some(dv) => Some(build::dataverse_client(dv, config, secrets.as_ref(), http.clone()).await?),
            None => None,
        };
        let store: Arc<dyn Store> = match (&config.store, &dataverse) {
            (StoreConfig::Sqlite { path }, _) => build::open_sqlite(path)?,
            (StoreConfig::Dataverse(dv), Some(client)) => {
                Arc::new(DataverseStore::new(client.clone(), Schema::new(&dv.prefix)))
            }
            (StoreConfig::Dataverse(_), None) => {
                return Err(ConfigError::new("DATAVERSE_URL", "is required with STORE=dataverse").into());
            }
        };
        build::refuse_dropped_keys(config, &keys, store.as_ref()).await?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let events: Arc<dyn Events> = match &config.webhook {
            Some(w) => {
                let key = secrets.get(&w.key_secret).await?;
                Arc::new(build::WebhookEvents(Webhook::start(w.url.clone(), key, http.clone())))
            }
            None => Arc::new(NoEvents),
        };
        let endpoint = Arc::new(HttpTokenEndpoint {
            http: outbound::unpooled_client(config.oauth.upstream_timeout)?,
            secrets: secrets.clone(),
        });
        let home = Arc::new(Connections::new(Deps {
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
        let captures = Arc::new(Self::captures(config, secrets.as_ref(), &http, &store, &keys, &clock).await?);
        let organisations =
            Arc::new(Self::served_organisations(config, &secrets, &http, home, &store, &keys, &clock).await?);
        // A multi-tenant deployment's customers call with tokens of their own tenants.
        if config.back_office.as_ref().is_some_and(|b| b.dev_key.is_some()) {
            tracing::warn!(
                "back-office API: development tokens (AUTH_ISSUER=dev, `handler dev-token`), for this machine only; set AUTH_ISSUER to your Entra issuer for anything shared"
            );
        }
        let verifier = config.back_office.clone().map(|b| {
            let v = BearerVerifier::new(b, http.clone());
            Arc::new(if config.tenancy.is_some() { v.accepting_other_tenants() } else { v })
        });
        Ok(Parts { keys, secrets, http, dataverse, organisations, captures, verifier, feed: store })
    }

    async fn captures(
        config: &Config,
        secrets: &dyn SecretSource,
        http: &reqwest::Client,
        store: &Arc<dyn Store>,
        keys: &Arc<Keyring>,
        clock: &Arc<dyn Clock>,
    ) -> Result<Captures, StartupError> {
        let fno = match &config.oauth.capture {
            CaptureMode::Fno(f) => {
                let fno = build::fno_client(f, config, secrets, http.clone()).await?;
                Some(Arc::new(fno) as Arc<dyn crate::domain::captures::CaptureDelivery>)
            }
            _ => None,
        };
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
        Ok(Captures {
            store: store.clone(),
            expectations: store.clone(),
            keys: keys.clone(),
            clock: clock.clone(),
            policy,
            state_key,
            fno,
        })
    }

    /// The organisations served: our own, and (multi-tenant) each onboarded customer's.
    async fn served_organisations(
        config: &Config,
        secrets: &Arc<dyn SecretSource>,
        http: &reqwest::Client,
        home: Arc<Connections>,
        store: &Arc<dyn Store>,
        keys: &Arc<Keyring>,
        clock: &Arc<dyn Clock>,
    ) -> Result<Organisations, StartupError> {
        let Some(t) = &config.tenancy else { return Ok(Organisations::single(home)) };
        let credentials = Arc::new(TenantCredentials::new(t, secrets.as_ref(), http.clone()).await?);
        let tenants = Arc::new(Tenants::new(
            store.clone(),
            keys.clone(),
            clock.clone(),
            t.clone(),
            credentials.clone(),
            outbound::unpooled_client(config.oauth.upstream_timeout)?,
        ));
        let access = Arc::new(DataverseOrganisations {
            http: http.clone(),
            credentials,
            schema: Schema::new(&config.tables.prefix),
            max_concurrency: config.tables.max_concurrency,
        });
        Ok(Organisations::multi(home, tenants, access, t.recheck))
    }

    /// One narrow service per audience.
    fn audiences(config: &Config, p: &Parts, started: Instant) -> Services {
        let portal = config.portal.enabled().then(|| {
            let lookup = config.portal.oidc.as_ref().and_then(|o| o.lookup.as_ref()).map(|l| l.column.clone());
            Portal::new(PortalVerifier::new(&config.portal, p.http.clone()), p.dataverse.clone(), lookup)
        });
        let mut bind_url = config.redirect_uri.clone();
        bind_url.set_path("/api/oauth/bind");
        bind_url.set_query(None);
        let record = Arc::new(TimerRecord::default());
        let mut resource = config.redirect_uri.clone();
        resource.set_path("/api/mcp");
        resource.set_query(None);
        Services {
            agents: Agents {
                verifier: p.verifier.clone(),
                organisations: p.organisations.clone(),
                http: p.http.clone(),
                metadata_url: format!("{resource}/.well-known/oauth-protected-resource"),
                resource,
                allowed_roles: config.mcp.allowed_roles.clone(),
                scopes: config.mcp.scopes.clone(),
                in_flight: Default::default(),
            },
            server: Server {
                limits: config.limits.clone(),
                anonymous: tokio::sync::Semaphore::new(config.limits.max_anonymous_requests),
                portal_cors: config.portal.handler_cors.then(|| config.portal.origins.clone()),
                redirect_uri: config.redirect_uri.clone(),
            },
            back_office: BackOffice {
                verifier: p.verifier.clone(),
                organisations: p.organisations.clone(),
                captures: p.captures.clone(),
                http: p.http.clone(),
            },
            callback: Callback {
                keys: p.keys.clone(),
                organisations: p.organisations.clone(),
                captures: p.captures.clone(),
                capturing: !matches!(config.oauth.capture, CaptureMode::Off),
                rate: Throttle::new(config.limits.callbacks_per_minute),
                under_host: config.listen.under_host,
                max_param_bytes: config.limits.max_param_bytes,
                cookies: BindCookies {
                    redirect_uri: config.redirect_uri.clone(),
                    portal_origins: config.portal.origins.clone(),
                },
            },
            portal: PortalApi {
                portal,
                organisations: p.organisations.clone(),
                origins: config.portal.origins.clone(),
                http: p.http.clone(),
                bind_url,
            },
            tenants: TenantsApi { verifier: p.verifier.clone(), organisations: p.organisations.clone() },
            health: Health {
                verifier: p.verifier.clone(),
                organisations: p.organisations.clone(),
                keys: p.keys.clone(),
                secrets: p.secrets.clone(),
                started,
                started_at: crate::support::time::now(),
                under_host: config.listen.under_host,
                timer: record.clone(),
                feed: Arc::new(FeedRecord::default()),
                census: Cache::new(1),
                readiness: Cache::new(1),
                sealed_keys: Cache::new(1),
            },
            timer: Timer {
                organisations: p.organisations.clone(),
                captures: p.captures.clone(),
                under_host: config.listen.under_host,
                record,
            },
        }
    }

    /// What the routes are handed.
    pub fn services(&self) -> &Arc<Services> {
        &self.services
    }

    /// Every organisation this deployment keeps connections in.
    pub fn organisations(&self) -> &Arc<Organisations> {
        &self.organisations
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Milliseconds since [`App::build`] began.
    pub fn startup_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }
}
