//! What each audience's routes are handed: a narrow service each (as mini-redis hands a
//! command only `db` and `dst`), built once by [`super::App::build`]. A handler sees the
//! parts of the app its audience uses and nothing else.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use url::{Origin, Url};

use crate::clients::auth::BearerVerifier;
use crate::clients::secrets::SecretSource;
use crate::domain::captures::Captures;
use crate::domain::portal::Portal;
use crate::domain::tenants::scope::Organisations;
use crate::domain::{Census, Tenant};
use crate::support::cache::Cache;
use crate::support::config::Limits;
use crate::support::crypto::Keyring;
use crate::support::throttle::Throttle;

/// The parts every route shares, as the server applies them before routing.
pub struct Server {
    pub limits: Limits,
    /// Places for requests without an `Authorization` header (`MAX_ANONYMOUS_REQUESTS`).
    pub anonymous: tokio::sync::Semaphore,
    /// The portal origins the handler's own CORS layer allows (`None`: the platform's CORS).
    pub portal_cors: Option<Vec<Origin>>,
    /// The public URL of the redirect URI (its host names the Swagger document's host).
    pub redirect_uri: Url,
}

/// `/api/connections` and `/api/captures`: Dynamics, Power Automate, scripts.
pub struct BackOffice {
    pub verifier: Option<Arc<BearerVerifier>>,
    pub organisations: Arc<Organisations>,
    pub captures: Arc<Captures>,
    /// The pooled client the provider proxy sends through.
    pub http: reqwest::Client,
}

/// `/api/mcp`: AI agents over the Model Context Protocol.
pub struct Agents {
    pub verifier: Option<Arc<BearerVerifier>>,
    pub organisations: Arc<Organisations>,
    pub http: reqwest::Client,
    /// `{PUBLIC_BASE_URL}/api/mcp`: the protected resource.
    pub resource: Url,
    /// Where its RFC 9728 metadata is served (named by every `401`).
    pub metadata_url: String,
    /// `MCP_ALLOWED_ROLES`: when set, a caller needs one of them (else `403`).
    pub allowed_roles: Vec<String>,
    /// The scopes the metadata advertises (`MCP_SCOPES`).
    pub scopes: Vec<String>,
    /// Tool calls in flight per caller, at most [`Agents::CALLS_PER_CALLER`].
    pub in_flight: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl Agents {
    pub const CALLS_PER_CALLER: usize = 4;

    /// A browser page may call only from the deployment's own origin.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        Url::parse(origin).is_ok_and(|o| o.origin() == self.resource.origin())
    }

    /// The caller's place for one tool call, or `None` when it has its share in flight.
    pub fn place(&self, caller: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let sem = {
            let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() > 10_000 {
                map.retain(|_, s| s.available_permits() < Self::CALLS_PER_CALLER);
            }
            map.entry(caller.to_string())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(Self::CALLS_PER_CALLER)))
                .clone()
        };
        sem.try_acquire_owned().ok()
    }
}

/// `/api/oauth/callback` and `/api/oauth/bind`: a person's browser.
pub struct Callback {
    pub keys: Arc<Keyring>,
    pub organisations: Arc<Organisations>,
    pub captures: Arc<Captures>,
    /// Whether foreign states are captured at all (`CAPTURE_MODE` not `off`).
    pub capturing: bool,
    /// Callback hits per client address (`CALLBACK_RATE_PER_MINUTE`).
    pub rate: Throttle<std::net::IpAddr>,
    /// Under the Functions host, the client address is the last `X-Forwarded-For` entry.
    pub under_host: bool,
    pub max_param_bytes: usize,
    pub cookies: BindCookies,
}

/// What the bind step and the callback agree on: the public redirect URI (its scheme
/// decides the cookies' attributes) and the portal origins the bind page listens to.
pub struct BindCookies {
    pub redirect_uri: Url,
    pub portal_origins: Vec<Origin>,
}

/// `/api/portal/...`: portal pages across origins.
pub struct PortalApi {
    pub portal: Option<Portal>,
    pub organisations: Arc<Organisations>,
    pub origins: Vec<Origin>,
    pub http: reqwest::Client,
    /// The bind page the connect popup opens first.
    pub bind_url: Url,
}

/// `/api/tenants` and `/api/oauth/consent`, `/api/oauth/onboard`: customer tenants.
pub struct TenantsApi {
    pub verifier: Option<Arc<BearerVerifier>>,
    pub organisations: Arc<Organisations>,
}

/// `/api/health`.
pub struct Health {
    pub verifier: Option<Arc<BearerVerifier>>,
    pub organisations: Arc<Organisations>,
    pub keys: Arc<Keyring>,
    pub secrets: Arc<dyn SecretSource>,
    pub started: Instant,
    /// Unix seconds.
    pub started_at: i64,
    pub under_host: bool,
    pub timer: Arc<TimerRecord>,
    pub feed: Arc<FeedRecord>,
    /// The store's counts, reused for a minute.
    pub census: Cache<(), Census>,
    /// The store's readiness, checked at most once per interval.
    pub readiness: Cache<(), serde_json::Value>,
    /// How many values each key seals in the store, reused a minute.
    pub sealed_keys: Cache<(), std::collections::BTreeMap<String, u64>>,
}

/// `/refresh`: the host's timer.
pub struct Timer {
    pub organisations: Arc<Organisations>,
    pub captures: Arc<Captures>,
    pub under_host: bool,
    pub record: Arc<TimerRecord>,
}

/// Every audience's service.
pub struct Services {
    pub agents: Agents,
    pub server: Server,
    pub back_office: BackOffice,
    pub callback: Callback,
    pub portal: PortalApi,
    pub tenants: TenantsApi,
    pub health: Health,
    pub timer: Timer,
}

/// What the last timer run in this process did (for `/api/health`).
#[derive(Debug, Clone)]
pub struct TimerRun {
    /// Unix seconds.
    pub at: i64,
    pub ms: u64,
    pub refreshed: usize,
    pub needs_reauth: usize,
    pub failed: usize,
    /// Customer organisations whose sweep met an error, with its first line: where an
    /// organisation that refuses the app shows to the operator.
    pub tenants_failing: std::collections::BTreeMap<String, String>,
}

/// The change feed's state, shared by the feed (which writes it) and health (which reads
/// it): whether this instance learns what other instances change, and since when.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FeedState {
    /// `off` (not configured, or the store needs none), `starting`, `following`,
    /// `restarting` (its delta link expired: a fresh initial sync), `down` (its requests
    /// fail; retried with back-off), `unavailable` (the store refuses it, e.g. change
    /// tracking is off on the table; tried again every few minutes).
    pub state: &'static str,
    /// Unix seconds: since when in this state.
    pub since: i64,
    /// Unix seconds: the feed's last answer.
    pub last_answer_at: Option<i64>,
    pub last_error: Option<String>,
    /// Fresh initial syncs after the first.
    pub restarts: u32,
}

#[derive(Debug)]
pub struct FeedRecord(Mutex<FeedState>);

impl Default for FeedRecord {
    fn default() -> Self {
        FeedRecord(Mutex::new(FeedState {
            state: "off",
            since: crate::support::time::now(),
            last_answer_at: None,
            last_error: None,
            restarts: 0,
        }))
    }
}

impl FeedRecord {
    pub fn update(&self, f: impl FnOnce(&mut FeedState)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Moves to `state` (its `since` changes only when the state does).
    pub fn set(&self, state: &'static str, error: Option<String>) {
        self.update(|s| {
            if s.state != state {
                s.state = state;
                s.since = crate::support::time::now();
            }
            if error.is_some() || state == "following" {
                s.last_error = error;
            }
        });
    }

    pub fn get(&self) -> FeedState {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The last timer run, shared by the timer (which writes it) and health (which reads it).
#[derive(Default)]
pub struct TimerRecord(Mutex<Option<TimerRun>>);

impl TimerRecord {
    pub fn record(&self, run: TimerRun) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(run);
    }

    pub fn last(&self) -> Option<TimerRun> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl TenantsApi {
    /// A tenant's record changed on this instance: the next call reads it again.
    pub fn changed(&self, t: &Tenant) {
        self.organisations.changed(&t.id);
    }
}
