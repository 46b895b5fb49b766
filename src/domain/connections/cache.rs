//! The in-process access-token cache.
//!
//! Serving a valid token must not cost a store round trip (a Dataverse call is tens of
//! milliseconds and counts against service-protection limits). An entry is trusted
//! for a short time (`TOKEN_CACHE_SECONDS`) and only while the token stays valid for
//! what the caller wants; after that the store is read again, so a deletion or
//! re-authorization made by another instance is seen within that time. The cache is
//! also where callers for one connection take turns ([`TokenCache::exclusive`]): the
//! in-process half of the refresh single flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};

use crate::domain::oauth::TokenSet;
use crate::domain::{Connection, Version};
use crate::support::cache::Cache;

/// An access token as handed to callers (never a refresh token), with what the proxies
/// need to know of its connection, so a proxied call with a cached token reads no store.
///
/// Shared, not copied: every cache hit hands one out, and a copy of its strings was four
/// allocations on every proxied call.
#[derive(Debug, Clone)]
pub struct CachedToken(Arc<TokenFields>);

/// What a [`CachedToken`] holds.
#[derive(Debug)]
pub struct TokenFields {
    /// The connection's provider (catalog name) and owner.
    pub provider: String,
    pub owner: Option<String>,
    pub access_token: SecretString,
    pub token_type: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub scope: Option<String>,
    /// When the token was obtained from the provider (Unix milliseconds).
    pub obtained_ms: i64,
    /// The version of the record it was read from or written to: the change feed then
    /// tells this instance's own writes from other instances'.
    pub version: Version,
}

impl CachedToken {
    pub fn for_connection(c: &Connection, t: &TokenSet, obtained_ms: i64) -> CachedToken {
        CachedToken(Arc::new(TokenFields {
            provider: c.provider.clone(),
            owner: c.owner.clone(),
            access_token: t.access_token.clone(),
            token_type: t.token_type.clone(),
            expires_at: t.expires_at,
            scope: t.scope.clone(),
            obtained_ms,
            version: c.version.clone(),
        }))
    }

    pub fn secret(&self) -> &str {
        self.access_token.expose_secret()
    }
}

impl std::ops::Deref for CachedToken {
    type Target = TokenFields;

    fn deref(&self) -> &TokenFields {
        &self.0
    }
}

/// More connections than one deployment serves; past it the least recently used go.
const MAX_ENTRIES: usize = 50_000;

/// Access tokens by connection id, each trusted for `ttl` (and only while it satisfies
/// what the caller wants).
pub struct TokenCache {
    /// How long an entry is trusted, in milliseconds: `TOKEN_CACHE_SECONDS`, or much
    /// longer while a change feed tells this instance what others change.
    ttl_ms: AtomicU64,
    /// `TOKEN_CACHE_SECONDS`: the trust without a change feed that answers.
    base: Duration,
    /// While a feed is followed: until when (milliseconds after `epoch`) its last answer
    /// vouches for the entries. Past it the feed may be missing changes (an outage, a
    /// request stuck in retries), so entries are trusted for `base` only.
    vouched_until_ms: AtomicU64,
    epoch: Instant,
    /// The lapse has been logged (once per lapse).
    lapse_said: AtomicBool,
    entries: Cache<String, CachedToken>,
}

impl TokenCache {
    pub fn new(ttl: Duration) -> TokenCache {
        TokenCache {
            ttl_ms: AtomicU64::new(ttl.as_millis() as u64),
            base: ttl,
            vouched_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            lapse_said: AtomicBool::new(false),
            entries: Cache::new(MAX_ENTRIES),
        }
    }

    /// Trusts new entries for `ttl` from now on.
    pub fn trust_for(&self, ttl: Duration) {
        self.ttl_ms.store(ttl.as_millis() as u64, Ordering::SeqCst);
    }

    /// The change feed answered: its answer vouches for the entries for `bound`.
    pub fn vouch_for(&self, bound: Duration) {
        let until = (self.epoch.elapsed() + bound).as_millis() as u64;
        self.vouched_until_ms.store(until, Ordering::SeqCst);
        self.lapse_said.store(false, Ordering::Relaxed);
    }

    /// Whether entries get the long trust: no feed is followed (the trust is `base`
    /// anyway), or the feed answered recently enough.
    fn vouched(&self) -> bool {
        if self.ttl_ms.load(Ordering::Relaxed) <= self.base.as_millis() as u64 {
            return true;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        if now <= self.vouched_until_ms.load(Ordering::Relaxed) {
            return true;
        }
        if !self.lapse_said.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "the change feed has not answered in time: cached tokens are trusted for TOKEN_CACHE_SECONDS ({} s) until it does",
                self.base.as_secs()
            );
        }
        false
    }

    pub fn clear(&self) {
        self.entries.clear();
    }

    /// The cached token, if it is recent and `ok` accepts it.
    pub fn get_satisfying(&self, id: &str, ok: impl FnOnce(&CachedToken) -> bool) -> Option<CachedToken> {
        if self.vouched() {
            return self.entries.get_if(key(id).as_ref(), ok);
        }
        let entry = self.entries.get_stale(key(id).as_ref())?;
        (entry.age <= self.base && ok(&entry.value)).then_some(entry.value)
    }

    pub fn put(&self, id: &str, token: CachedToken) {
        self.entries.insert(key(id).into_owned(), token, Duration::from_millis(self.ttl_ms.load(Ordering::SeqCst)));
    }

    pub fn remove(&self, id: &str) {
        self.entries.remove(key(id).as_ref());
    }

    /// The cached entry while it is trusted, whatever it holds (for who owns it).
    pub fn peek(&self, id: &str) -> Option<CachedToken> {
        self.entries.get(key(id).as_ref())
    }

    /// Runs `f` as the only caller for this connection in this process.
    pub async fn exclusive<T, F, Fut>(&self, id: &str, f: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        self.entries.exclusive(&key(id).into_owned(), f).await
    }
}

/// Connection ids compare without case, as Dataverse compares them: `ERP-1` and `erp-1`
/// are one connection, with one cache entry and one refresh turn.
pub(super) fn key(id: &str) -> std::borrow::Cow<'_, str> {
    if id.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(id.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(id)
    }
}
