//! What the connection rules' unit tests share: the real SQLite store on a temporary
//! file (behind a wrapper that lets a test interleave another instance's write or make
//! the store fail), a scripted token endpoint, and a clock that jumps.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::refresh::apply_tokens;
use super::{ConnectionError, Connections, Deps};
use crate::clients::store::sqlite::SqliteStore;
use crate::domain::oauth::catalog::{Catalog, Provider};
use crate::domain::oauth::{CodeGrant, OAuthError, TokenEndpoint, TokenHint, TokenSet};
use crate::domain::{
    Capture, CaptureStore, ChangeFeed, Connection, ConnectionStore, Due, ExpectationStore, ListFilter, Status,
    StoreError, StoreResult, TenantStore, Version,
};
use crate::support::config::{CaptureMode, CapturePolicy, OAuthConfig};
use crate::support::crypto::Keyring;
use crate::support::time::ManualClock;

pub const T0: i64 = 1_800_000_000;
pub const ID: &str = "conn-1";

pub type Hook = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// What the scripted endpoint answers to the next refresh.
pub enum Answer {
    /// New tokens; `refresh: None` means the provider did not rotate (the old one stays).
    Tokens {
        access: &'static str,
        refresh: Option<&'static str>,
        expires_in: i64,
    },
    Fail(OAuthError),
}

pub struct ScriptedEndpoint {
    answers: Mutex<VecDeque<Answer>>,
    /// The refresh tokens it was sent, in order.
    sent: Mutex<Vec<String>>,
    /// The tokens it was asked to revoke, in order (refused ones included).
    pub revoked: Mutex<Vec<(String, TokenHint)>>,
    /// How many of the next revocations answer as a provider that is down.
    pub revocations_failing: std::sync::atomic::AtomicU32,
    /// Runs inside the next refresh call, after the request "left" and before it answers.
    pub during: Mutex<Option<Hook>>,
}

impl ScriptedEndpoint {
    pub fn answer(&self, a: Answer) {
        self.answers.lock().unwrap().push_back(a);
    }

    pub fn sent(&self) -> Vec<String> {
        self.sent.lock().unwrap().clone()
    }
}

#[async_trait]
impl TokenEndpoint for ScriptedEndpoint {
    async fn exchange_code(&self, _: &Provider, _: CodeGrant<'_>, now: i64) -> Result<TokenSet, OAuthError> {
        self.next(None, now)
    }

    async fn refresh(&self, _: &Provider, refresh_token: &SecretString, now: i64) -> Result<TokenSet, OAuthError> {
        self.sent.lock().unwrap().push(refresh_token.expose_secret().to_string());
        let hook = self.during.lock().unwrap().take();
        if let Some(hook) = hook {
            hook().await;
        }
        self.next(Some(refresh_token), now)
    }

    async fn revoke(&self, _: &Provider, token: &SecretString, hint: TokenHint) -> Result<(), OAuthError> {
        self.revoked.lock().unwrap().push((token.expose_secret().to_string(), hint));
        let failing = &self.revocations_failing;
        if failing.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(OAuthError::Transient("the revocation endpoint answered 503".into()));
        }
        Ok(())
    }
}

impl ScriptedEndpoint {
    fn next(&self, refresh_token: Option<&SecretString>, now: i64) -> Result<TokenSet, OAuthError> {
        let answer = self.answers.lock().unwrap().pop_front();
        match answer {
            Some(Answer::Tokens { access, refresh, expires_in }) => Ok(TokenSet {
                access_token: SecretString::from(access.to_string()),
                token_type: "Bearer".into(),
                refresh_token: refresh.map(|r| SecretString::from(r.to_string())).or_else(|| refresh_token.cloned()),
                expires_at: now + expires_in,
                scope: None,
            }),
            Some(Answer::Fail(e)) => Err(e),
            None => Err(OAuthError::Config("the test did not script this call".into())),
        }
    }
}

/// A store that lets a test slip another instance's write in just before our next
/// `update`, the way a race between two instances interleaves.
pub struct RacingStore {
    inner: Arc<SqliteStore>,
    /// Reads and writes of single connections that reached the store.
    pub gets: AtomicI64,
    pub updates: AtomicI64,
    /// Reads of tenant records.
    pub tenant_gets: AtomicI64,
    pub before_update: Mutex<Option<Hook>>,
    /// Updates still served before every further one answers "unavailable"; negative
    /// for never.
    pub updates_before_outage: AtomicI64,
    /// How many uses were recorded (`record_use` calls).
    pub uses: AtomicI64,
}

#[async_trait]
impl ConnectionStore for RacingStore {
    fn kind(&self) -> &'static str {
        "racing-sqlite"
    }

    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }

    async fn census(&self, now: i64) -> StoreResult<crate::domain::Census> {
        self.inner.census(now).await
    }

    async fn get(&self, id: &str) -> StoreResult<Option<Connection>> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get(id).await
    }

    async fn find_by_state(&self, h: &str) -> StoreResult<Option<Connection>> {
        self.inner.find_by_state(h).await
    }

    async fn insert(&self, c: &Connection) -> StoreResult<Version> {
        self.inner.insert(c).await
    }

    async fn update(&self, c: &Connection, expected: &Version) -> StoreResult<Version> {
        self.updates.fetch_add(1, Ordering::SeqCst);
        if self.updates_before_outage.fetch_sub(1, Ordering::SeqCst) == 0 {
            self.updates_before_outage.store(0, Ordering::SeqCst);
            return Err(StoreError::Unavailable("the store is locked (test outage)".into()));
        }
        let hook = self.before_update.lock().unwrap().take();
        if let Some(hook) = hook {
            hook().await;
        }
        self.inner.update(c, expected).await
    }

    async fn delete(&self, id: &str, expected: &Version) -> StoreResult<()> {
        self.inner.delete(id, expected).await
    }

    async fn record_use(&self, id: &str, at: i64, by: &str) -> StoreResult<()> {
        self.uses.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.record_use(id, at, by).await
    }

    async fn list(&self, f: &ListFilter) -> StoreResult<Vec<Connection>> {
        self.inner.list(f).await
    }

    async fn due_for_refresh(&self, due: &Due) -> StoreResult<Vec<Connection>> {
        self.inner.due_for_refresh(due).await
    }

    async fn expired_pending(&self, now: i64, limit: usize) -> StoreResult<Vec<Connection>> {
        self.inner.expired_pending(now, limit).await
    }
}

#[async_trait]
impl ChangeFeed for RacingStore {}

#[async_trait]
impl CaptureStore for RacingStore {
    async fn insert_capture(&self, c: &Capture) -> StoreResult<bool> {
        self.inner.insert_capture(c).await
    }

    async fn captures_by_state(&self, s: &str) -> StoreResult<Vec<Capture>> {
        self.inner.captures_by_state(s).await
    }

    async fn undelivered_captures(&self, limit: usize, ready: Option<i64>) -> StoreResult<Vec<Capture>> {
        self.inner.undelivered_captures(limit, ready).await
    }

    async fn claim_capture(&self, key: &str, now_ms: i64, until_ms: i64) -> StoreResult<bool> {
        self.inner.claim_capture(key, now_ms, until_ms).await
    }

    async fn release_capture(&self, key: &str, not_before_ms: i64, attempts: u32) -> StoreResult<()> {
        self.inner.release_capture(key, not_before_ms, attempts).await
    }

    async fn mark_capture_delivered(&self, key: &str, at: i64) -> StoreResult<()> {
        self.inner.mark_capture_delivered(key, at).await
    }

    async fn purge_captures(&self, before: i64) -> StoreResult<u64> {
        self.inner.purge_captures(before).await
    }
}

#[async_trait]
impl ExpectationStore for RacingStore {
    async fn expect_state(&self, h: &str, until: i64) -> StoreResult<()> {
        self.inner.expect_state(h, until).await
    }

    async fn expected_until(&self, h: &str) -> StoreResult<Option<i64>> {
        self.inner.expected_until(h).await
    }

    async fn purge_expectations(&self, now: i64) -> StoreResult<u64> {
        self.inner.purge_expectations(now).await
    }
}

#[async_trait]
impl TenantStore for RacingStore {
    async fn get_tenant(&self, id: &str) -> StoreResult<Option<crate::domain::Tenant>> {
        self.tenant_gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get_tenant(id).await
    }

    async fn list_tenants(&self) -> StoreResult<Vec<crate::domain::Tenant>> {
        self.inner.list_tenants().await
    }

    async fn insert_tenant(&self, t: &crate::domain::Tenant) -> StoreResult<crate::domain::Version> {
        self.inner.insert_tenant(t).await
    }

    async fn update_tenant(
        &self,
        t: &crate::domain::Tenant,
        expected: &crate::domain::Version,
    ) -> StoreResult<crate::domain::Version> {
        self.inner.update_tenant(t, expected).await
    }

    async fn delete_tenant(&self, id: &str) -> StoreResult<bool> {
        self.inner.delete_tenant(id).await
    }
}

pub struct Fx {
    pub conns: Connections,
    pub sqlite: Arc<SqliteStore>,
    pub racing: Arc<RacingStore>,
    pub clock: Arc<ManualClock>,
    pub endpoint: Arc<ScriptedEndpoint>,
    pub keys: Arc<Keyring>,
    _dir: tempfile::TempDir,
}

pub fn fixture() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Arc::new(SqliteStore::open(&dir.path().join("refresh.db")).unwrap());
    let racing = Arc::new(RacingStore {
        inner: sqlite.clone(),
        gets: AtomicI64::new(0),
        updates: AtomicI64::new(0),
        tenant_gets: AtomicI64::new(0),
        before_update: Mutex::new(None),
        updates_before_outage: AtomicI64::new(-1),
        uses: AtomicI64::new(0),
    });
    let keys = Arc::new(Keyring::parse(&Keyring::generate_spec("k1")).unwrap());
    let catalog = Catalog::parse(
        "[providers.p]\nauthorization_url = \"https://p.example/auth\"\ntoken_url = \"https://p.example/token\"\nrevocation_url = \"https://p.example/revoke\"\nclient_id = \"c\"\n",
    )
    .unwrap();
    let clock = Arc::new(ManualClock::at(T0));
    let endpoint = Arc::new(ScriptedEndpoint {
        answers: Mutex::new(VecDeque::new()),
        sent: Mutex::new(Vec::new()),
        revoked: Mutex::new(Vec::new()),
        revocations_failing: Default::default(),
        during: Mutex::new(None),
    });
    let cfg = OAuthConfig {
        state_ttl: Duration::from_secs(600),
        refresh_margin: Duration::from_secs(300),
        token_cache_ttl: Duration::from_secs(30),
        lease_duration: Duration::from_secs(60),
        timer_lookahead: Duration::from_secs(900),
        capture: CaptureMode::Store,
        capture_policy: CapturePolicy { any_state: false, state_key_secret: None, max_pending: 10 },
        capture_retention: Duration::from_secs(3600),
        return_url_origins: Vec::new(),
        upstream_timeout: Duration::from_secs(30),
        store_retry: Duration::from_secs(30),
        change_feed: Duration::ZERO,
    };
    let conns = Connections::new(Deps {
        store: racing.clone(),
        keys: keys.clone(),
        catalog: Arc::new(catalog),
        endpoint: endpoint.clone(),
        clock: clock.clone(),
        cfg,
        redirect_uri: Url::parse("https://dc.example/api/oauth/callback").unwrap(),
        events: Arc::new(super::events::NoEvents),
        scope: None,
    });
    Fx { conns, sqlite, racing, clock, endpoint, keys, _dir: dir }
}

pub fn tokens(access: &str, refresh: Option<&str>, expires_at: i64) -> TokenSet {
    TokenSet {
        access_token: SecretString::from(access.to_string()),
        token_type: "Bearer".into(),
        refresh_token: refresh.map(|r| SecretString::from(r.to_string())),
        expires_at,
        scope: None,
    }
}

impl Fx {
    /// An active connection whose token was obtained at `obtained` and expires at `expires_at`.
    pub async fn seed(&self, access: &str, refresh: Option<&str>, obtained: i64, expires_at: i64) -> Connection {
        self.seed_as(ID, access, refresh, obtained, expires_at).await
    }

    /// [`Fx::seed`] under another id.
    pub async fn seed_as(
        &self,
        id: &str,
        access: &str,
        refresh: Option<&str>,
        obtained: i64,
        expires_at: i64,
    ) -> Connection {
        let mut c = Connection::new(id, "p", None, vec![], Status::Active, obtained);
        apply_tokens(&mut c, &tokens(access, refresh, expires_at), &self.keys, obtained);
        c.version = self.sqlite.insert(&c).await.unwrap();
        c
    }

    pub async fn record(&self) -> Connection {
        self.sqlite.get(ID).await.unwrap().unwrap()
    }

    pub async fn stored_tokens(&self) -> TokenSet {
        TokenSet::open(self.record().await.tokens.as_deref().unwrap(), &self.keys, ID).unwrap()
    }

    /// Another instance's write, straight to the store.
    pub async fn other_instance_writes(&self, change: impl FnOnce(&mut Connection)) {
        let mut c = self.record().await;
        let expected = c.version.clone();
        change(&mut c);
        self.sqlite.update(&c, &expected).await.unwrap();
    }

    pub async fn token(&self) -> Result<String, ConnectionError> {
        self.conns.access_token(ID, false).await.map(|t| t.secret().to_string())
    }
}
