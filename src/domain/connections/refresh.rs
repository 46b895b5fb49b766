//! The refresh state machine: when a token is good enough, who may refresh it, and what
//! a failure does to the connection.
//!
//! 1. A token that satisfies what the caller wants ([`Want`]) is served, from the
//!    in-process cache when it is there.
//! 2. Otherwise callers for one connection take turns in this process, and the first
//!    one re-reads the record. A token that satisfies is served; during a back-off a
//!    still-valid token is served; a live lease held by another instance is waited on.
//! 3. To refresh, the caller takes the lease with a version-checked update (the
//!    Dataverse ETag across instances), calls the token endpoint, and stores the result
//!    through [`Connections::modify`]. If its lease expired meanwhile and another
//!    instance stored newer tokens, those win and are served.
//! 4. `invalid_grant` ends in `needs_reauth`; other failures back off (30 s doubling to
//!    30 min) and serve the old token while it is still valid.

use std::time::Duration;

use secrecy::SecretString;

use super::{Abandon, CachedToken, ConnectionError, Connections};
use crate::domain::oauth::{OAuthError, TokenSet};
use crate::domain::{Connection, Lease, Status, StoreError};
use crate::support::crypto::Keyring;
use crate::support::outbound::Backoff;

/// Waiting for another instance's lease to end.
const LEASE_WAIT: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(400));
/// Retrying a transient store error while taking the lease.
const LEASE_STORE_RETRY: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
/// After the n-th failed refresh in a row: 30 s, 1 min, 2 min, ... capped at 30 min.
pub const REFRESH_BACKOFF: Backoff = Backoff::new(Duration::from_secs(30), Duration::from_secs(1800));

/// What a refresh must achieve.
#[derive(Debug, Clone, Copy)]
pub enum Want {
    /// A token not due for refresh: it expires beyond the margin (shrunk to half the
    /// token's lifetime, so short-lived tokens are not refreshed on every call), or it was
    /// obtained after the caller asked (the caller queued behind that refresh).
    Fresh { margin: i64, asked_at_ms: i64 },
    /// A token valid at least until this Unix second (the timer's horizon).
    ValidUntil(i64),
    /// A token obtained after this Unix millisecond (force refresh, coalesced).
    RefreshedAfter(i64),
}

impl Want {
    /// Whether a token that is still valid, though due, will do when no refresh can be made
    /// now (back-off, a transient failure); only a forced refresh insists on a new one.
    fn accepts_still_valid(self) -> bool {
        !matches!(self, Want::RefreshedAfter(_))
    }

    /// Whether a token expiring at `expires_at` (Unix seconds) and obtained at
    /// `obtained_ms` satisfies this want at `now_ms`.
    pub fn satisfied_by(self, expires_at: i64, obtained_ms: i64, now_ms: i64) -> bool {
        match self {
            Want::Fresh { margin, asked_at_ms } => {
                // In milliseconds: expiry is kept in whole seconds, and for a short-lived token
                // the rounding alone could make a token obtained a moment ago look due.
                let expires_ms = expires_at.saturating_mul(1000);
                if obtained_ms >= asked_at_ms && expires_ms > now_ms {
                    return true;
                }
                let lifetime_ms = expires_ms - obtained_ms;
                expires_ms - margin.saturating_mul(1000).min(lifetime_ms / 2).max(0) > now_ms
            }
            Want::ValidUntil(t) => expires_at > t,
            Want::RefreshedAfter(ms) => obtained_ms >= ms,
        }
    }
}

impl Connections {
    /// A valid access token for a connection, refreshing first when it expires within
    /// the margin (or always, with `force`).
    pub async fn access_token(&self, id: &str, force: bool) -> Result<CachedToken, ConnectionError> {
        self.access_token_as(id, force, None).await
    }

    /// [`Self::access_token`] on behalf of `actor`: a refresh it causes, and the use itself
    /// (`last_used_by`), are recorded as the actor's. The actor's task-local scope is entered
    /// only for a refresh: a cached token needs none (the scope held a copy of the whole
    /// lookup's future, on every proxied call).
    pub async fn access_token_for(
        &self,
        id: &str,
        force: bool,
        actor: &crate::support::audit::Actor,
    ) -> Result<CachedToken, ConnectionError> {
        self.access_token_as(id, force, Some(actor)).await
    }

    async fn access_token_as(
        &self,
        id: &str,
        force: bool,
        actor: Option<&crate::support::audit::Actor>,
    ) -> Result<CachedToken, ConnectionError> {
        let asked_at = self.deps.clock.now_millis();
        let margin = self.deps.cfg.refresh_margin.as_secs() as i64;
        let want = if force { Want::RefreshedAfter(asked_at) } else { Want::Fresh { margin, asked_at_ms: asked_at } };
        let token = match self.cached(id, want) {
            Some(t) => t,
            // Boxed: the refresh's future is large (the lease, the provider's call, the
            // store's retries), and callers above it (the proxy's 401 retry) add their own;
            // kept inline, a debug build's worker stack overflowed on that path.
            None => match actor {
                Some(actor) => {
                    let refresh = self.refresh_single_flight(id, want, None);
                    Box::pin(crate::support::audit::acting(actor.clone(), refresh)).await?
                }
                None => Box::pin(self.refresh_single_flight(id, want, None)).await?,
            },
        };
        self.note_use(id, actor);
        Ok(token)
    }

    /// Who owns a connection, when its token is in the cache (no store read); `None` when
    /// it is not cached.
    pub fn cached_owner(&self, id: &str) -> Option<Option<String>> {
        self.cache.peek(id).map(|t| t.owner.clone())
    }

    fn cached(&self, id: &str, want: Want) -> Option<CachedToken> {
        let now_ms = self.deps.clock.now_millis();
        self.cache.get_satisfying(id, |t| want.satisfied_by(t.expires_at, t.obtained_ms, now_ms))
    }

    /// The in-process half: callers for one connection take turns, and whoever held the
    /// turn before may have done the work.
    /// `known` is the record as a query just returned it (the timer's): used instead of a
    /// first read, its version (the Dataverse ETag) guards the lease all the same.
    pub(crate) async fn refresh_single_flight(
        &self,
        id: &str,
        want: Want,
        known: Option<Connection>,
    ) -> Result<CachedToken, ConnectionError> {
        self.cache
            .exclusive(id, || async {
                match self.cached(id, want) {
                    Some(t) => Ok(t),
                    None => self.refresh(id, want, known).await,
                }
            })
            .await
    }

    /// The cross-process half: read, lease, refresh, store.
    async fn refresh(
        &self,
        id: &str,
        want: Want,
        mut known: Option<Connection>,
    ) -> Result<CachedToken, ConnectionError> {
        let deadline = self.deps.clock.now_millis() + (self.deps.cfg.lease_duration.as_millis() as i64) + 5_000;
        let (mut waits, mut store_retries) = (0, 0);
        loop {
            if self.deps.clock.now_millis() > deadline {
                return Err(ConnectionError::Backoff {
                    detail: "the connection record kept changing under the refresh".into(),
                    retry_after: 1,
                });
            }
            let conn = match known.take() {
                Some(c) => c,
                None => self.get(id).await?,
            };
            let tokens = self.usable_tokens(&conn)?;
            let t = self.deps.clock.now();
            let obtained_ms = conn.refreshed_at.unwrap_or(conn.created_at).saturating_mul(1000);
            let current = CachedToken::for_connection(&conn, &tokens, obtained_ms);
            if want.satisfied_by(tokens.expires_at, obtained_ms, self.deps.clock.now_millis()) {
                self.cache.put(id, current.clone());
                return Ok(current);
            }
            if let Some(answer) = backing_off(&conn, tokens.expires_at, t, want, &current) {
                return answer;
            }
            let Some(refresh_token) = tokens.refresh_token.clone() else {
                if tokens.expires_at > t {
                    // Nothing to refresh with; the token is still good for a while.
                    return Ok(current);
                }
                return Err(self
                    .mark_needs_reauth(conn, "the access token expired and the provider issued no refresh token")
                    .await);
            };
            if let Some(lease) = &conn.lease
                && lease.owner != self.instance
                && lease.until_ms > self.deps.clock.now_millis()
            {
                // Another instance is refreshing. Wait for its result.
                if self.deps.clock.now_millis() > deadline {
                    return Err(ConnectionError::Backoff {
                        detail: "another instance holds the refresh lease".into(),
                        retry_after: 1,
                    });
                }
                waits += 1;
                self.deps.clock.sleep(LEASE_WAIT.wait(waits, None)).await;
                continue;
            }
            // Take the lease. A conflict means someone else changed the record: re-read.
            let mut leased = conn.clone();
            leased.lease = Some(Lease {
                owner: self.instance.clone(),
                until_ms: self.deps.clock.now_millis() + self.deps.cfg.lease_duration.as_millis() as i64,
            });
            leased.updated_at = t;
            match self.deps.store.update(&leased, &conn.version).await {
                Ok(v) => leased.version = v,
                Err(StoreError::Conflict(_)) => continue,
                Err(StoreError::NotFound(_)) => return Err(ConnectionError::NotFound(id.to_string())),
                Err(e) if e.is_transient() && self.deps.clock.now_millis() < deadline => {
                    store_retries += 1;
                    self.deps.clock.sleep(LEASE_STORE_RETRY.wait(store_retries, None)).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            let provider = leased.provider.clone();
            let result = self.refresh_with_lease(leased, tokens, refresh_token, want).await;
            let outcome = match &result {
                Ok(_) => "ok",
                Err(ConnectionError::NeedsReauth { .. }) => "needs_reauth",
                Err(_) => "failed",
            };
            // Who caused it: the caller the web layer named, or the timer.
            let actor = crate::support::audit::current();
            crate::support::audit::record(crate::support::audit::Action::Refresh, id, &provider, &actor, outcome);
            return result;
        }
    }

    async fn refresh_with_lease(
        &self,
        leased: Connection,
        old: TokenSet,
        refresh_token: SecretString,
        want: Want,
    ) -> Result<CachedToken, ConnectionError> {
        let provider = self.provider(&leased.provider)?.clone();
        let id = leased.id.clone();
        let started = self.deps.clock.now();
        match self.deps.endpoint.refresh(&provider, &refresh_token, started).await {
            Ok(tokens) => {
                let lease_version = leased.version.clone();
                let stored = self
                    .modify(&id, Some(leased), |c| {
                        if c.version != lease_version && c.refreshed_at.is_some_and(|r| r > started) {
                            // Our lease expired and another instance stored newer tokens.
                            return Err(Abandon::Superseded);
                        }
                        apply_tokens(c, &tokens, &self.deps.keys, self.deps.clock.now());
                        Ok(())
                    })
                    .await;
                self.refreshes_ok.add(self.deps.clock.now());
                crate::support::metrics::refresh(true);
                match stored {
                    Ok(c) => {
                        let token = CachedToken::for_connection(&c, &tokens, self.deps.clock.now_millis());
                        self.cache.put(&c.id, token.clone());
                        tracing::info!(connection = %c.id, provider = %provider.name, "token refreshed");
                        Ok(token)
                    }
                    // Someone else's newer tokens won; serve those.
                    Err(Abandon::Superseded) => Box::pin(self.refresh(&id, want, None)).await,
                    Err(Abandon::Failed(e)) => {
                        tracing::error!(error = %e, "a refreshed token could not be stored");
                        Err(e)
                    }
                }
            }
            Err(e) if e.is_invalid_grant() => {
                self.refreshes_failed.add(self.deps.clock.now());
                crate::support::metrics::refresh(false);
                let detail = e.to_string();
                Err(self.mark_needs_reauth(leased, &detail).await)
            }
            Err(e) => {
                let t = self.deps.clock.now();
                self.refreshes_failed.add(t);
                crate::support::metrics::refresh(false);
                let failures = leased.failures.saturating_add(1);
                let backoff = REFRESH_BACKOFF.delay(failures).as_secs() as i64;
                let detail = e.to_string();
                // What is still valid is served while the record backs off.
                let still_valid = (old.expires_at > t && want.accepts_still_valid())
                    .then(|| CachedToken::for_connection(&leased, &old, 0));
                let _ = self
                    .update(&id, Some(leased), |c| {
                        c.lease = None;
                        c.failures = failures;
                        c.next_attempt_at = Some(t + backoff);
                        c.status_detail = Some(format!("Refresh failed ({failures} in a row): {detail}"));
                    })
                    .await;
                tracing::warn!(connection = %id, provider = %provider.name, error = %e, failures, "refresh failed; backing off {backoff} s");
                if let Some(token) = still_valid {
                    return Ok(token);
                }
                // Either way the record backs off; the caller learns whether waiting helps.
                match e {
                    OAuthError::Transient(_) => Err(ConnectionError::Backoff { detail, retry_after: backoff as u64 }),
                    other => Err(ConnectionError::Provider(other)),
                }
            }
        }
    }

    async fn mark_needs_reauth(&self, conn: Connection, why: &str) -> ConnectionError {
        let id = conn.id.clone();
        self.cache.remove(&id);
        let result = self
            .update(&id, Some(conn), |c| {
                c.status = Status::NeedsReauth;
                c.status_detail = Some(why.to_string());
                c.lease = None;
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(connection = %id, error = %e, "could not mark the connection needs_reauth");
        }
        tracing::warn!(connection = %id, "connection needs re-authorization: {why}");
        ConnectionError::NeedsReauth { id, detail: why.to_string() }
    }

    fn usable_tokens(&self, conn: &Connection) -> Result<TokenSet, ConnectionError> {
        match (conn.status, &conn.tokens) {
            (Status::NeedsReauth, _) => Err(ConnectionError::NeedsReauth {
                id: conn.id.clone(),
                detail: conn.status_detail.clone().unwrap_or_else(|| "the provider refused the refresh token".into()),
            }),
            (_, Some(sealed)) => Ok(TokenSet::open(sealed, &self.deps.keys, &conn.id)?),
            (status, None) => Err(ConnectionError::NotAuthorized { id: conn.id.clone(), status: status.as_str() }),
        }
    }
}

/// Puts freshly obtained tokens on a record and clears every failure mark.
pub(crate) fn apply_tokens(c: &mut Connection, tokens: &TokenSet, keys: &Keyring, t: i64) {
    c.tokens = Some(tokens.seal(keys, &c.id));
    c.access_expires_at = Some(tokens.expires_at);
    c.has_refresh_token = tokens.refresh_token.is_some();
    c.status = Status::Active;
    c.status_detail = None;
    c.lease = None;
    c.failures = 0;
    c.next_attempt_at = None;
    c.refreshed_at = Some(t);
}

/// While a connection backs off after a transient failure (and the caller accepts a
/// still-valid token), the answer without a refresh: what is still valid, or when to
/// come back.
fn backing_off(
    conn: &Connection,
    expires_at: i64,
    t: i64,
    want: Want,
    current: &CachedToken,
) -> Option<Result<CachedToken, ConnectionError>> {
    let next = conn.next_attempt_at.filter(|&next| want.accepts_still_valid() && next > t)?;
    if expires_at > t {
        return Some(Ok(current.clone()));
    }
    Some(Err(ConnectionError::Backoff {
        detail: conn.status_detail.clone().unwrap_or_else(|| "an earlier refresh failed".into()),
        retry_after: next.saturating_sub(t).max(0) as u64,
    }))
}

#[cfg(test)]
#[path = "refresh_tests.rs"]
mod tests;
