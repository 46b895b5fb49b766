//! Connections: what a caller starts, a person authorizes at the callback, and
//! Dynamics later asks a token for.
//!
//! This module owns the rules that keep tokens alive and correct, one concern a file:
//! - [`authorize`]: starting an authorization and completing it at the callback. A
//!   `state` is single-use: it is consumed by a version-checked update before the code is
//!   exchanged, so a replay or a concurrent duplicate finds nothing;
//! - [`refresh`]: the refresh state machine, single-flight twice over (callers in one
//!   process take turns; across processes a lease is taken on the record with a
//!   version-checked update, so a rotating refresh token is never sent twice);
//!   `invalid_grant` marks the connection `needs_reauth`, transient failures back off;
//! - this file: reading, deleting (with RFC 7009 revocation), and [`Connections::modify`],
//!   the one way to change a record. Tokens obtained from a provider always reach the
//!   store (it retries transient store errors), because what produced them is spent.
//!
//! Time and the provider's token endpoint are passed in ([`Clock`], [`TokenEndpoint`]),
//! so the rules are unit-tested against a real store without a provider or a wait.

pub mod authorize;
mod cache;
pub mod events;
pub mod import;
pub mod refresh;
pub mod reseal;
#[cfg(test)]
pub(crate) mod testing;
mod unsaved;
mod usage;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use url::Url;

use crate::domain::oauth::catalog::{Catalog, Provider};
use crate::domain::oauth::{ErrorCode, OAuthError, TokenEndpoint, TokenHint, TokenSet};
use crate::domain::{Changes, Connection, ConnectionStore, ListFilter, Status, StoreError};
use crate::support::config::OAuthConfig;
use crate::support::crypto::{self, CryptoError, Keyring};
use crate::support::outbound::Backoff;
use crate::support::time::Clock;

pub use authorize::{BindFailure, Bound, CallbackFailure, Completed, NewConnection, PortalFlow, StartedAuthorization};
pub use cache::CachedToken;

/// Which piece of a caller's input was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidInput {
    UnknownProvider,
    /// A per-connection entry's parameters missing, unknown or not matching their pattern.
    ProviderParams,
    /// An import without a usable refresh token, or with an expiry but no access token.
    ImportedTokens,
    ConnectionId,
    Owner,
    Scopes,
    ReturnUrl,
}

/// Why a connection operation failed. Said to HTTP callers by the web layer.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("connection {0:?} does not exist")]
    NotFound(String),
    #[error("{1}")]
    Invalid(InvalidInput, String),
    #[error("connection {0:?} already exists; use reconnect to authorize it again")]
    Exists(String),
    #[error("connection {id:?} has no tokens yet (status {status}); complete the authorization first")]
    NotAuthorized { id: String, status: &'static str },
    #[error("connection {id:?} needs to be authorized again: {detail}")]
    NeedsReauth { id: String, detail: String },
    #[error("the provider could not refresh the token: {detail}; retry after {retry_after} s")]
    Backoff { detail: String, retry_after: u64 },
    #[error("{0}")]
    Provider(#[from] OAuthError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("stored data could not be decrypted: {0}")]
    Crypto(#[from] CryptoError),
    /// An imported refresh token the provider refused: nothing was kept.
    #[error("the provider refused the imported refresh token ({detail}); nothing was kept")]
    ImportRefused { detail: String },
}

/// A change to a record that must not be applied after all (see [`Connections::modify`]).
#[derive(Debug)]
pub(crate) enum Abandon {
    /// Another instance stored newer tokens while ours were on their way: keep theirs.
    Superseded,
    Failed(ConnectionError),
}

impl From<ConnectionError> for Abandon {
    fn from(e: ConnectionError) -> Abandon {
        Abandon::Failed(e)
    }
}

/// What the connection rules depend on, built once by the app (or by a test).
#[derive(Clone)]
pub struct Deps {
    pub store: Arc<dyn ConnectionStore>,
    pub keys: Arc<Keyring>,
    pub catalog: Arc<Catalog>,
    pub endpoint: Arc<dyn TokenEndpoint>,
    pub clock: Arc<dyn Clock>,
    pub cfg: OAuthConfig,
    /// The fixed redirect URI registered with every provider.
    pub redirect_uri: Url,
    /// Told of every stored status change.
    pub events: Arc<dyn events::Events>,
    /// The customer tenant whose organisation `store` is, in a multi-tenant deployment;
    /// `None` for the deployment's own. Written into each `state` so the callback finds
    /// the store again.
    pub scope: Option<String>,
}

pub struct Connections {
    deps: Deps,
    /// This process's name in refresh leases.
    instance: String,
    cache: cache::TokenCache,
    /// The last key-rotation pass ([`Connections::reseal`]).
    last_reseal: std::sync::Mutex<Option<reseal::ResealReport>>,
    /// Refreshes this process made that the provider granted, and that failed.
    pub(crate) refreshes_ok: crate::support::counters::HourWindow,
    pub(crate) refreshes_failed: crate::support::counters::HourWindow,
    /// Connections being imported and not verified yet (lower-case ids): nobody hears of
    /// them until the provider accepted their refresh token, so a refused import, which the
    /// caller is told never existed, raises no event.
    importing: std::sync::Mutex<std::collections::HashSet<String>>,
    /// When this process last recorded each connection's use (lower-case ids, Unix seconds).
    uses: usage::Uses,
}

/// Store writes retry transient failures for `STORE_RETRY_SECONDS` (30 s by default):
/// what is being stored may exist nowhere else.
const STORE_RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(4));

impl Connections {
    /// What this was built from (for a customer tenant's `Connections`: the same, with
    /// the tenant's store and scope).
    pub fn deps(&self) -> &Deps {
        &self.deps
    }

    pub fn new(deps: Deps) -> Connections {
        let cache = cache::TokenCache::new(deps.cfg.token_cache_ttl);
        Connections {
            deps,
            instance: crypto::random_token::<9>(),
            cache,
            last_reseal: Default::default(),
            refreshes_ok: Default::default(),
            refreshes_failed: Default::default(),
            importing: Default::default(),
            uses: Default::default(),
        }
    }

    fn importing(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.importing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn silent(&self, id: &str) -> bool {
        self.importing().contains(&id.to_ascii_lowercase())
    }

    /// Refreshes granted and failed in this process over the last hour.
    pub fn refreshes_last_hour(&self) -> (u64, u64) {
        let t = self.deps.clock.now();
        (self.refreshes_ok.total(t), self.refreshes_failed.total(t))
    }

    pub fn store(&self) -> &Arc<dyn ConnectionStore> {
        &self.deps.store
    }

    pub fn catalog(&self) -> &Catalog {
        &self.deps.catalog
    }

    pub(crate) fn config(&self) -> &OAuthConfig {
        &self.deps.cfg
    }

    pub(crate) fn clock(&self) -> &dyn Clock {
        self.deps.clock.as_ref()
    }

    fn provider(&self, name: &str) -> Result<std::sync::Arc<Provider>, ConnectionError> {
        self.deps.catalog.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.deps.catalog.names();
            ConnectionError::Invalid(
                InvalidInput::UnknownProvider,
                format!(
                    "There is no provider {:?} in the catalog{}.",
                    crate::support::logging::clip(name, 80),
                    if known.is_empty() { String::new() } else { format!(" (known: {})", known.join(", ")) }
                ),
            )
        })
    }

    // ----- what other instances changed ----------------------------------------------

    /// Drops cached tokens of connections another instance changed or deleted.
    pub fn forget(&self, changes: &Changes) {
        match changes {
            Changes::Ids(ids) => {
                for (id, now) in ids {
                    let ours = now.as_ref().is_some_and(|v| self.cache.peek(id).is_some_and(|t| &t.version == v));
                    if !ours {
                        self.cache.remove(id);
                    }
                }
            }
            Changes::All => self.cache.clear(),
        }
    }

    /// With a change feed running, a cached token is trusted until it is due (`trusted`
    /// long); without one, for `TOKEN_CACHE_SECONDS` again.
    pub fn follow(&self, trusted: Option<Duration>) {
        self.cache.trust_for(trusted.unwrap_or(self.deps.cfg.token_cache_ttl));
    }

    /// The change feed answered: cached tokens keep the long trust for `bound` (past it,
    /// an outage may be hiding changes, and they are trusted for `TOKEN_CACHE_SECONDS`).
    pub fn feed_answered(&self, bound: Duration) {
        self.cache.vouch_for(bound);
    }

    // ----- reading ------------------------------------------------------------------

    pub async fn get(&self, id: &str) -> Result<Connection, ConnectionError> {
        self.deps.store.get(id).await?.ok_or_else(|| ConnectionError::NotFound(id.to_string()))
    }

    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<Connection>, ConnectionError> {
        Ok(self.deps.store.list(filter).await?)
    }

    // ----- deleting -----------------------------------------------------------------

    /// Revokes the tokens at the provider (RFC 7009) and deletes the connection. When the
    /// provider cannot be reached the connection is kept, unless `skip_revocation`.
    pub async fn delete(&self, id: &str, skip_revocation: bool) -> Result<bool, ConnectionError> {
        let conn = self.get(id).await?;
        // From here on the stored id: the caller's may differ in case, and the tokens are
        // sealed to the stored one.
        let id = conn.id.clone();
        let id = id.as_str();
        let provider = self.deps.catalog.get(&conn.provider);
        let mut revoked = false;
        if let (Some(provider), Some(sealed), false) = (provider, &conn.tokens, skip_revocation)
            && provider.revocation_url.is_some()
        {
            let tokens = TokenSet::open(sealed, &self.deps.keys, id)?;
            // Revoking the refresh token ends the grant; the access token is revoked
            // too for providers that keep them apart.
            if let Some(rt) = &tokens.refresh_token {
                self.deps.endpoint.revoke(&provider, rt, TokenHint::RefreshToken).await?;
            }
            match self.deps.endpoint.revoke(&provider, &tokens.access_token, TokenHint::AccessToken).await {
                // RFC 7009 §2.2.1: a server that cannot revoke access tokens says so.
                Err(OAuthError::Rejected { error: ErrorCode::UnsupportedTokenType, .. }) => {}
                other => other?,
            }
            revoked = true;
        }
        let mut current = conn;
        for _ in 0..5 {
            match self.deps.store.delete(id, &current.version).await {
                Ok(()) => break,
                Err(StoreError::Conflict(_)) => current = self.get(id).await?,
                Err(StoreError::NotFound(_)) => break,
                Err(e) => return Err(e.into()),
            }
        }
        self.cache.remove(id);
        self.deleted(&current);
        tracing::info!(connection = %id, revoked, "connection deleted");
        Ok(revoked)
    }

    // ----- the one way to change a record -------------------------------------------

    /// Raises the event for the deletion of `c`.
    pub(crate) fn deleted(&self, c: &Connection) {
        if self.silent(&c.id) {
            return;
        }
        crate::support::metrics::status_change("deleted");
        self.deps.events.status_changed(events::StatusChange {
            connection_id: c.id.clone(),
            tenant: self.deps.scope.clone(),
            provider: c.provider.clone(),
            owner: c.owner.clone(),
            from: Some(c.status),
            to: None,
            detail: None,
            at: self.deps.clock.now(),
        });
    }

    /// Raises the event for a stored status change of `c` (now in its new status).
    pub(crate) fn status_changed(&self, c: &Connection, from: Option<Status>) {
        if self.silent(&c.id) {
            return;
        }
        let detail =
            matches!(c.status, Status::NeedsReauth | Status::Failed).then(|| c.status_detail.clone()).flatten();
        crate::support::metrics::status_change(c.status.as_str());
        self.deps.events.status_changed(events::StatusChange {
            connection_id: c.id.clone(),
            tenant: self.deps.scope.clone(),
            provider: c.provider.clone(),
            owner: c.owner.clone(),
            from,
            to: Some(c.status),
            detail,
            at: self.deps.clock.now(),
        });
    }

    /// Applies `change` to the latest version of a connection and stores it, re-reading
    /// on a version conflict and retrying transient store errors with backoff (for up to
    /// about half a minute: what is being stored may exist nowhere else).
    pub(crate) async fn modify<F, E>(
        &self,
        id: &str,
        mut known: Option<Connection>,
        mut change: F,
    ) -> Result<Connection, E>
    where
        F: FnMut(&mut Connection) -> Result<(), E>,
        E: From<ConnectionError>,
    {
        let give_up = self.deps.clock.now_millis() + self.deps.cfg.store_retry.as_millis() as i64;
        let mut attempt = 0;
        loop {
            let current = match known.take() {
                Some(c) => c,
                None => match self.deps.store.get(id).await {
                    Ok(Some(c)) => c,
                    Ok(None) => return Err(ConnectionError::NotFound(id.to_string()).into()),
                    Err(e) if e.is_transient() && self.deps.clock.now_millis() < give_up => {
                        attempt += 1;
                        self.deps.clock.sleep(STORE_RETRY.wait(attempt, None)).await;
                        continue;
                    }
                    Err(e) => return Err(ConnectionError::from(e).into()),
                },
            };
            let mut next = current.clone();
            change(&mut next)?;
            next.updated_at = self.deps.clock.now();
            match self.deps.store.update(&next, &current.version).await {
                Ok(v) => {
                    next.version = v;
                    if next.status != current.status {
                        self.status_changed(&next, Some(current.status));
                    }
                    return Ok(next);
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(StoreError::NotFound(_)) => return Err(ConnectionError::NotFound(id.to_string()).into()),
                Err(e) if e.is_transient() && self.deps.clock.now_millis() < give_up => {
                    tracing::warn!(connection = %id, error = %e, "store busy; retrying");
                    known = Some(current);
                    attempt += 1;
                    self.deps.clock.sleep(STORE_RETRY.wait(attempt, None)).await;
                }
                Err(e) => return Err(ConnectionError::from(e).into()),
            }
        }
    }

    /// [`Connections::modify`] for changes that cannot fail.
    pub(crate) async fn update<F>(
        &self,
        id: &str,
        known: Option<Connection>,
        mut change: F,
    ) -> Result<Connection, ConnectionError>
    where
        F: FnMut(&mut Connection),
    {
        self.modify(id, known, |c| {
            change(c);
            Ok::<(), ConnectionError>(())
        })
        .await
    }
}
