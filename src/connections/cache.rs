//! The in-process access-token cache.
//!
//! Serving a valid token must not cost a store round trip (a Dataverse call is tens of
//! milliseconds and counts against service-protection limits). An entry is trusted
//! for a short time (`TOKEN_CACHE_SECONDS`) and only while the token stays valid for
//! what the caller wants; after that the store is read again, so a deletion or
//! re-authorization made by another instance is seen within that time.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};

use crate::oauth::TokenSet;

/// An access token as handed to callers (never a refresh token).
#[derive(Debug, Clone)]
pub struct CachedToken {
    pub access_token: SecretString,
    pub token_type: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub scope: Option<String>,
    /// When the token was obtained from the provider (Unix milliseconds).
    pub obtained_ms: i64,
}

impl CachedToken {
    pub fn from_tokens(t: &TokenSet, obtained_ms: i64) -> CachedToken {
        CachedToken {
            access_token: t.access_token.clone(),
            token_type: t.token_type.clone(),
            expires_at: t.expires_at,
            scope: t.scope.clone(),
            obtained_ms,
        }
    }

    pub fn secret(&self) -> &str {
        self.access_token.expose_secret()
    }
}

struct Entry {
    token: CachedToken,
    stored: Instant,
}

pub struct TokenCache {
    ttl: Duration,
    entries: RwLock<HashMap<String, Entry>>,
}

impl TokenCache {
    pub fn new(ttl: Duration) -> TokenCache {
        TokenCache { ttl, entries: RwLock::new(HashMap::new()) }
    }

    /// The cached token, if it is recent and `ok` accepts it.
    pub fn get_satisfying(&self, id: &str, ok: impl Fn(&CachedToken) -> bool) -> Option<CachedToken> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get(id)?;
        (entry.stored.elapsed() < self.ttl && ok(&entry.token)).then(|| entry.token.clone())
    }

    pub fn put(&self, id: &str, token: CachedToken) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.insert(id.to_string(), Entry { token, stored: Instant::now() });
    }

    pub fn remove(&self, id: &str) {
        self.entries.write().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}
