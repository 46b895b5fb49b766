//! The refresh state machine against the real SQLite store on a temporary file, with a
//! scripted token endpoint and a clock that jumps. No process, no provider, no waiting:
//! each test runs in milliseconds.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::{REFRESH_BACKOFF, apply_tokens};
use crate::config::{CaptureMode, OAuthConfig};
use crate::connections::{ConnectionError, Connections, Deps};
use crate::crypto::Keyring;
use crate::oauth::catalog::{Catalog, Provider};
use crate::oauth::{CodeGrant, ErrorCode, OAuthError, TokenEndpoint, TokenHint, TokenSet};
use crate::store::sqlite::SqliteStore;
use crate::store::{Capture, Connection, Lease, ListFilter, Status, Store, StoreResult, Version};
use crate::time::{Clock, ManualClock};

const T0: i64 = 1_800_000_000;
const ID: &str = "conn-1";

type Hook = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// What the scripted endpoint answers to the next refresh.
enum Answer {
    /// New tokens; `refresh: None` means the provider did not rotate (the old one stays).
    Tokens {
        access: &'static str,
        refresh: Option<&'static str>,
        expires_in: i64,
    },
    Fail(OAuthError),
}

struct ScriptedEndpoint {
    answers: Mutex<VecDeque<Answer>>,
    /// The refresh tokens it was sent, in order.
    sent: Mutex<Vec<String>>,
    /// Runs inside the next refresh call, after the request "left" and before it answers.
    during: Mutex<Option<Hook>>,
}

impl ScriptedEndpoint {
    fn answer(&self, a: Answer) {
        self.answers.lock().unwrap().push_back(a);
    }

    fn sent(&self) -> Vec<String> {
        self.sent.lock().unwrap().clone()
    }
}

#[async_trait]
impl TokenEndpoint for ScriptedEndpoint {
    async fn exchange_code(&self, _: &Provider, _: CodeGrant<'_>, _: i64) -> Result<TokenSet, OAuthError> {
        Err(OAuthError::Config("no exchange in these tests".into()))
    }

    async fn refresh(&self, _: &Provider, refresh_token: &SecretString, now: i64) -> Result<TokenSet, OAuthError> {
        self.sent.lock().unwrap().push(refresh_token.expose_secret().to_string());
        let hook = self.during.lock().unwrap().take();
        if let Some(hook) = hook {
            hook().await;
        }
        let answer = self.answers.lock().unwrap().pop_front();
        match answer {
            Some(Answer::Tokens { access, refresh, expires_in }) => Ok(TokenSet {
                access_token: SecretString::from(access.to_string()),
                token_type: "Bearer".into(),
                refresh_token: Some(
                    refresh.map_or_else(|| refresh_token.clone(), |r| SecretString::from(r.to_string())),
                ),
                expires_at: now + expires_in,
                scope: None,
            }),
            Some(Answer::Fail(e)) => Err(e),
            None => Err(OAuthError::Config("the test did not script this refresh".into())),
        }
    }

    async fn revoke(&self, _: &Provider, _: &SecretString, _: TokenHint) -> Result<(), OAuthError> {
        Ok(())
    }
}

/// A store that lets a test slip another instance's write in just before our next
/// `update`, the way a race between two instances interleaves.
struct RacingStore {
    inner: Arc<SqliteStore>,
    before_update: Mutex<Option<Hook>>,
}

#[async_trait]
impl Store for RacingStore {
    fn kind(&self) -> &'static str {
        "racing-sqlite"
    }
    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
    async fn get(&self, id: &str) -> StoreResult<Option<Connection>> {
        self.inner.get(id).await
    }
    async fn find_by_state(&self, h: &str) -> StoreResult<Option<Connection>> {
        self.inner.find_by_state(h).await
    }
    async fn insert(&self, c: &Connection) -> StoreResult<Version> {
        self.inner.insert(c).await
    }
    async fn update(&self, c: &Connection, expected: &Version) -> StoreResult<Version> {
        let hook = self.before_update.lock().unwrap().take();
        if let Some(hook) = hook {
            hook().await;
        }
        self.inner.update(c, expected).await
    }
    async fn delete(&self, id: &str, expected: &Version) -> StoreResult<()> {
        self.inner.delete(id, expected).await
    }
    async fn list(&self, f: &ListFilter) -> StoreResult<Vec<Connection>> {
        self.inner.list(f).await
    }
    async fn due_for_refresh(&self, before: i64, idle: i64, limit: usize) -> StoreResult<Vec<Connection>> {
        self.inner.due_for_refresh(before, idle, limit).await
    }
    async fn expired_pending(&self, now: i64, limit: usize) -> StoreResult<Vec<Connection>> {
        self.inner.expired_pending(now, limit).await
    }
    async fn insert_capture(&self, c: &Capture) -> StoreResult<bool> {
        self.inner.insert_capture(c).await
    }
    async fn captures_by_state(&self, s: &str) -> StoreResult<Vec<Capture>> {
        self.inner.captures_by_state(s).await
    }
    async fn undelivered_captures(&self, limit: usize) -> StoreResult<Vec<Capture>> {
        self.inner.undelivered_captures(limit).await
    }
    async fn mark_capture_delivered(&self, key: &str, at: i64) -> StoreResult<()> {
        self.inner.mark_capture_delivered(key, at).await
    }
    async fn purge_captures(&self, before: i64) -> StoreResult<u64> {
        self.inner.purge_captures(before).await
    }
}

struct Fx {
    conns: Connections,
    sqlite: Arc<SqliteStore>,
    racing: Arc<RacingStore>,
    clock: Arc<ManualClock>,
    endpoint: Arc<ScriptedEndpoint>,
    keys: Arc<Keyring>,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Arc::new(SqliteStore::open(&dir.path().join("refresh.db")).unwrap());
    let racing = Arc::new(RacingStore { inner: sqlite.clone(), before_update: Mutex::new(None) });
    let keys = Arc::new(Keyring::parse(&Keyring::generate_spec("k1")).unwrap());
    let catalog = Catalog::parse(
        "[providers.p]\nauthorization_url = \"https://p.example/auth\"\ntoken_url = \"https://p.example/token\"\nclient_id = \"c\"\n",
    )
    .unwrap();
    let clock = Arc::new(ManualClock::at(T0));
    let endpoint = Arc::new(ScriptedEndpoint {
        answers: Mutex::new(VecDeque::new()),
        sent: Mutex::new(Vec::new()),
        during: Mutex::new(None),
    });
    let cfg = OAuthConfig {
        state_ttl: Duration::from_secs(600),
        refresh_margin: Duration::from_secs(300),
        token_cache_ttl: Duration::from_secs(30),
        lease_duration: Duration::from_secs(60),
        timer_lookahead: Duration::from_secs(900),
        capture: CaptureMode::Store,
        capture_retention: Duration::from_secs(3600),
        return_url_origins: Vec::new(),
        upstream_timeout: Duration::from_secs(30),
    };
    let conns = Connections::new(Deps {
        store: racing.clone(),
        keys: keys.clone(),
        catalog: Arc::new(catalog),
        endpoint: endpoint.clone(),
        clock: clock.clone(),
        cfg,
        redirect_uri: Url::parse("https://dc.example/api/oauth/callback").unwrap(),
    });
    Fx { conns, sqlite, racing, clock, endpoint, keys, _dir: dir }
}

fn tokens(access: &str, refresh: Option<&str>, expires_at: i64) -> TokenSet {
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
    async fn seed(&self, access: &str, refresh: Option<&str>, obtained: i64, expires_at: i64) -> Connection {
        let mut c = Connection {
            id: ID.into(),
            provider: "p".into(),
            owner: None,
            scopes: vec![],
            status: Status::Active,
            status_detail: None,
            tokens: None,
            access_expires_at: None,
            has_refresh_token: false,
            pending: None,
            lease: None,
            failures: 0,
            next_attempt_at: None,
            created_at: obtained,
            updated_at: obtained,
            refreshed_at: None,
            version: Version::default(),
        };
        apply_tokens(&mut c, &tokens(access, refresh, expires_at), &self.keys, obtained);
        c.version = self.sqlite.insert(&c).await.unwrap();
        c
    }

    async fn record(&self) -> Connection {
        self.sqlite.get(ID).await.unwrap().unwrap()
    }

    async fn stored_tokens(&self) -> TokenSet {
        TokenSet::open(self.record().await.tokens.as_deref().unwrap(), &self.keys, ID).unwrap()
    }

    /// Another instance's write, straight to the store.
    async fn other_instance_writes(&self, change: impl FnOnce(&mut Connection)) {
        let mut c = self.record().await;
        let expected = c.version.clone();
        change(&mut c);
        self.sqlite.update(&c, &expected).await.unwrap();
    }

    async fn token(&self) -> Result<String, ConnectionError> {
        self.conns.access_token(ID, false).await.map(|t| t.secret().to_string())
    }
}

fn secret(s: &Option<SecretString>) -> Option<String> {
    s.as_ref().map(|s| s.expose_secret().to_string())
}

/// Obtained an hour ago, an hour-long token expiring within the 300 s margin: due.
async fn seed_due(fx: &Fx) -> Connection {
    fx.seed("at-0", Some("rt-0"), T0 - 3500, T0 + 100).await
}

#[tokio::test]
async fn a_fresh_token_is_served_without_calling_the_provider() {
    let fx = fixture();
    fx.seed("at-0", Some("rt-0"), T0 - 60, T0 + 3540).await;
    assert_eq!(fx.token().await.unwrap(), "at-0");
    assert_eq!(fx.token().await.unwrap(), "at-0");
    assert!(fx.endpoint.sent().is_empty());
}

#[tokio::test]
async fn a_due_token_is_refreshed_under_our_lease_and_the_lease_is_released() {
    let fx = fixture();
    seed_due(&fx).await;
    let sqlite = fx.sqlite.clone();
    let seen_lease: Arc<Mutex<Option<Lease>>> = Arc::default();
    let seen = seen_lease.clone();
    *fx.endpoint.during.lock().unwrap() = Some(Box::new(move || {
        Box::pin(async move {
            *seen.lock().unwrap() = sqlite.get(ID).await.unwrap().unwrap().lease;
        })
    }));
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: Some("rt-1"), expires_in: 3600 });

    assert_eq!(fx.token().await.unwrap(), "at-1");
    let lease = seen_lease.lock().unwrap().clone().expect("the record was leased during the call");
    assert_eq!(lease.owner, fx.conns.instance);
    assert_eq!(lease.until_ms, T0 * 1000 + 60_000);
    let rec = fx.record().await;
    assert_eq!((rec.lease, rec.failures, rec.refreshed_at), (None, 0, Some(T0)));
    assert_eq!(fx.endpoint.sent(), vec!["rt-0"]);
}

#[tokio::test]
async fn losing_the_lease_race_to_an_instance_that_refreshed_serves_its_token() {
    let fx = fixture();
    seed_due(&fx).await;
    // Just before we write our lease, another instance completes its own refresh.
    let (sqlite, keys) = (fx.sqlite.clone(), fx.keys.clone());
    *fx.racing.before_update.lock().unwrap() = Some(Box::new(move || {
        Box::pin(async move {
            let mut c = sqlite.get(ID).await.unwrap().unwrap();
            let expected = c.version.clone();
            apply_tokens(&mut c, &tokens("at-other", Some("rt-other"), T0 + 3600), &keys, T0);
            sqlite.update(&c, &expected).await.unwrap();
        })
    }));

    assert_eq!(fx.token().await.unwrap(), "at-other");
    assert!(fx.endpoint.sent().is_empty(), "our copy of the rotated refresh token was never sent");
}

#[tokio::test]
async fn a_crashed_instances_lease_is_waited_out_then_taken_over() {
    let fx = fixture();
    seed_due(&fx).await;
    fx.other_instance_writes(|c| c.lease = Some(Lease { owner: "other".into(), until_ms: T0 * 1000 + 2_000 })).await;
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: Some("rt-1"), expires_in: 3600 });

    assert_eq!(fx.token().await.unwrap(), "at-1");
    assert!(fx.clock.now_millis() >= T0 * 1000 + 2_000, "we waited for the lease to lapse");
    assert_eq!(fx.endpoint.sent(), vec!["rt-0"]);
}

#[tokio::test]
async fn a_lease_held_beyond_our_patience_answers_retry_later_without_a_call() {
    let fx = fixture();
    fx.seed("at-0", Some("rt-0"), T0 - 3600, T0 - 1).await; // expired: nothing to fall back on
    fx.other_instance_writes(|c| c.lease = Some(Lease { owner: "other".into(), until_ms: T0 * 1000 + 600_000 })).await;

    let err = fx.token().await.unwrap_err();
    assert!(matches!(err, ConnectionError::Backoff { retry_after: 1, .. }), "{err:?}");
    assert!(fx.endpoint.sent().is_empty());
}

#[tokio::test]
async fn newer_tokens_stored_by_another_instance_win_over_ours() {
    let fx = fixture();
    seed_due(&fx).await;
    // Our refresh call outlives our lease; meanwhile another instance refreshes and stores.
    let (sqlite, keys, clock) = (fx.sqlite.clone(), fx.keys.clone(), fx.clock.clone());
    *fx.endpoint.during.lock().unwrap() = Some(Box::new(move || {
        Box::pin(async move {
            clock.advance(Duration::from_secs(61));
            let mut c = sqlite.get(ID).await.unwrap().unwrap();
            let expected = c.version.clone();
            apply_tokens(&mut c, &tokens("at-other", Some("rt-other"), clock.now() + 3600), &keys, clock.now());
            sqlite.update(&c, &expected).await.unwrap();
        })
    }));
    fx.endpoint.answer(Answer::Tokens { access: "at-ours", refresh: Some("rt-ours"), expires_in: 3600 });

    assert_eq!(fx.token().await.unwrap(), "at-other");
    assert_eq!(secret(&fx.stored_tokens().await.refresh_token).as_deref(), Some("rt-other"));
}

#[tokio::test]
async fn a_rotated_refresh_token_replaces_the_old_one() {
    let fx = fixture();
    seed_due(&fx).await;
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: Some("rt-1"), expires_in: 3600 });
    fx.conns.access_token(ID, true).await.unwrap();
    fx.endpoint.answer(Answer::Tokens { access: "at-2", refresh: None, expires_in: 3600 });
    fx.clock.advance(Duration::from_millis(5));
    fx.conns.access_token(ID, true).await.unwrap();
    assert_eq!(fx.endpoint.sent(), vec!["rt-0", "rt-1"], "the second refresh used the rotated token");
}

#[tokio::test]
async fn a_refresh_without_rotation_keeps_the_refresh_token() {
    let fx = fixture();
    seed_due(&fx).await;
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: None, expires_in: 3600 });
    assert_eq!(fx.token().await.unwrap(), "at-1");
    let stored = fx.stored_tokens().await;
    assert_eq!(secret(&stored.refresh_token).as_deref(), Some("rt-0"));
    assert!(fx.record().await.has_refresh_token);
}

#[tokio::test]
async fn invalid_grant_marks_the_connection_needs_reauth_for_good() {
    let fx = fixture();
    seed_due(&fx).await;
    fx.endpoint.answer(Answer::Fail(OAuthError::Rejected {
        error: ErrorCode::InvalidGrant,
        description: Some("refresh token revoked".into()),
        status: 400,
    }));

    assert!(matches!(fx.token().await, Err(ConnectionError::NeedsReauth { .. })));
    let rec = fx.record().await;
    assert_eq!(rec.status, Status::NeedsReauth);
    assert!(rec.status_detail.unwrap().contains("invalid_grant"));
    assert_eq!(rec.lease, None);
    // No further call reaches the provider: only a person can fix this.
    assert!(matches!(fx.token().await, Err(ConnectionError::NeedsReauth { .. })));
    assert_eq!(fx.endpoint.sent().len(), 1);
}

#[tokio::test]
async fn a_transient_failure_backs_off_and_serves_the_still_valid_token() {
    let fx = fixture();
    seed_due(&fx).await;
    fx.endpoint.answer(Answer::Fail(OAuthError::Transient("the provider answered 503".into())));

    assert_eq!(fx.token().await.unwrap(), "at-0");
    let rec = fx.record().await;
    assert_eq!((rec.failures, rec.next_attempt_at, rec.lease), (1, Some(T0 + 30), None));
    // During the back-off the old token keeps being served, with no call.
    fx.clock.advance(Duration::from_secs(10));
    assert_eq!(fx.token().await.unwrap(), "at-0");
    assert_eq!(fx.endpoint.sent().len(), 1);
}

#[tokio::test]
async fn back_off_doubles_and_is_capped_then_clears_on_success() {
    let fx = fixture();
    // Expired: every failure surfaces, and the back-off is the only thing between calls.
    fx.seed("at-0", Some("rt-0"), T0 - 3600, T0 - 1).await;
    let mut waits = Vec::new();
    for _ in 0..8 {
        fx.endpoint.answer(Answer::Fail(OAuthError::Transient("down".into())));
        let err = fx.token().await.unwrap_err();
        let ConnectionError::Backoff { retry_after, .. } = err else { panic!("{err:?}") };
        waits.push(retry_after);
        // Inside the back-off: refused at once, no call.
        assert!(matches!(fx.token().await, Err(ConnectionError::Backoff { .. })));
        fx.clock.advance(Duration::from_secs(retry_after));
    }
    assert_eq!(waits, vec![30, 60, 120, 240, 480, 960, 1800, 1800]);
    assert_eq!(REFRESH_BACKOFF.delay(100), Duration::from_secs(1800));
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: None, expires_in: 3600 });
    assert_eq!(fx.token().await.unwrap(), "at-1");
    let rec = fx.record().await;
    assert_eq!((rec.failures, rec.next_attempt_at, rec.status_detail), (0, None, None));
}

#[tokio::test]
async fn a_token_shorter_than_the_margin_is_not_refreshed_on_every_call() {
    let fx = fixture();
    // A 120 s token: the 300 s margin shrinks to half its lifetime.
    fx.seed("at-0", Some("rt-0"), T0, T0 + 120).await;
    assert_eq!(fx.token().await.unwrap(), "at-0");
    fx.clock.advance(Duration::from_secs(59));
    assert_eq!(fx.token().await.unwrap(), "at-0");
    assert!(fx.endpoint.sent().is_empty());
    fx.clock.advance(Duration::from_secs(2)); // past half its life
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: None, expires_in: 120 });
    assert_eq!(fx.token().await.unwrap(), "at-1");
    assert_eq!(fx.endpoint.sent().len(), 1);
}

#[tokio::test]
async fn force_refresh_gets_a_new_token_even_when_the_old_one_is_fresh() {
    let fx = fixture();
    fx.seed("at-0", Some("rt-0"), T0 - 60, T0 + 3540).await;
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: None, expires_in: 3600 });
    let t = fx.conns.access_token(ID, true).await.unwrap();
    assert_eq!(t.secret(), "at-1");
    assert_eq!(fx.endpoint.sent(), vec!["rt-0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_refresh() {
    let fx = Arc::new(fixture());
    seed_due(&fx).await;
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: Some("rt-1"), expires_in: 3600 });
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let fx = fx.clone();
            tokio::spawn(async move { fx.token().await.unwrap() })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), "at-1");
    }
    assert_eq!(fx.endpoint.sent(), vec!["rt-0"]);
}

#[tokio::test]
async fn an_expired_token_without_a_refresh_token_needs_reauth() {
    let fx = fixture();
    fx.seed("at-0", None, T0 - 3600, T0 - 1).await;
    assert!(matches!(fx.token().await, Err(ConnectionError::NeedsReauth { .. })));
    assert_eq!(fx.record().await.status, Status::NeedsReauth);
}
