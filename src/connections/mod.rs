//! Connections: what a caller starts, a person authorizes at the callback, and
//! Dynamics later asks a token for.
//!
//! This module owns the rules that keep tokens alive and correct:
//! - a `state` is single-use: it is consumed by a version-checked update before the
//!   code is exchanged, so a replay or a concurrent duplicate finds nothing;
//! - a refresh is single-flight twice over. Inside a process, callers for one
//!   connection queue on one mutex and the first refresh serves them all. Across
//!   processes, the refresher first takes a lease on the connection record with a
//!   version-checked update (the Dataverse ETag in production), so a rotating refresh
//!   token is never sent twice;
//! - tokens obtained from a provider always reach the store (retries on transient
//!   store errors), because the code or refresh token that produced them is spent;
//! - `invalid_grant` marks the connection `needs_reauth`; transient failures back off.

pub mod api;
mod cache;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::config::OAuthConfig;
use crate::crypto::{self, CryptoError, Keyring};
use crate::fno::{Delivery, Fno};
use crate::oauth::catalog::{Catalog, Provider};
use crate::oauth::client::{self, TokenClient};
use crate::oauth::{OAuthError, TokenSet};
use crate::secrets::SecretSource;
use crate::store::{Capture, Connection, Lease, ListFilter, PendingAuth, Status, Store, StoreError};
use crate::time::{now, now_millis};

pub use cache::CachedToken;

/// Why a connection operation failed. Mapped to HTTP in [`api`].
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("connection {0:?} does not exist")]
    NotFound(String),
    #[error("{1}")]
    Invalid(&'static str, String),
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
}

/// What a caller asks for when starting a connection.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub provider: String,
    #[serde(default)]
    pub connection_id: Option<String>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    #[serde(default)]
    pub return_url: Option<String>,
    /// The portal origin whose popup runs the authorization (told the result by
    /// `postMessage`); set by the portal API, never by a caller's body.
    #[serde(skip)]
    pub opener_origin: Option<String>,
}

/// The answer to a start or reconnect: where to send the person.
#[derive(Debug, Serialize)]
pub struct Started {
    pub connection_id: String,
    pub provider: String,
    pub status: Status,
    pub authorization_url: String,
    pub authorization_expires_at: String,
}

/// A connection as callers may see it: status, never a token.
#[derive(Debug, Serialize)]
pub struct ConnectionView {
    pub connection_id: String,
    pub provider: String,
    pub owner: Option<String>,
    pub scopes: Vec<String>,
    pub status: Status,
    pub status_detail: Option<String>,
    pub authorization_pending: bool,
    pub has_refresh_token: bool,
    pub access_token_expires_at: Option<String>,
    pub last_refreshed_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&Connection> for ConnectionView {
    fn from(c: &Connection) -> Self {
        ConnectionView {
            connection_id: c.id.clone(),
            provider: c.provider.clone(),
            owner: c.owner.clone(),
            scopes: c.scopes.clone(),
            status: c.status,
            status_detail: c.status_detail.clone(),
            authorization_pending: c.pending.as_ref().is_some_and(|p| p.expires_at > now()),
            has_refresh_token: c.has_refresh_token,
            access_token_expires_at: c.access_expires_at.map(crate::time::rfc3339),
            last_refreshed_at: c.refreshed_at.map(crate::time::rfc3339),
            created_at: crate::time::rfc3339(c.created_at),
            updated_at: crate::time::rfc3339(c.updated_at),
        }
    }
}

/// The PKCE verifier and return URL of a pending authorization (sealed in the store).
#[derive(Serialize, Deserialize)]
struct PendingSecret {
    #[serde(default)]
    verifier: Option<String>,
    #[serde(default)]
    return_url: Option<String>,
    #[serde(default)]
    opener_origin: Option<String>,
}

/// What the callback learned, for the page it shows.
#[derive(Debug)]
pub struct Completed {
    pub connection_id: String,
    pub provider: String,
    pub return_url: Option<Url>,
    /// The portal page that opened the flow in a popup, if any.
    pub opener_origin: Option<String>,
}

/// Everything the timer did, for its invocation logs.
#[derive(Debug, Default)]
pub struct SweepReport {
    pub due: usize,
    pub refreshed: usize,
    pub needs_reauth: usize,
    pub failed: usize,
    pub expired_states: usize,
    pub purged_captures: u64,
    pub captures_delivered: usize,
    pub captures_pending: usize,
    pub errors: Vec<String>,
}

impl SweepReport {
    pub fn lines(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "refresh: {} due, {} refreshed, {} need re-authorization, {} failed; {} expired authorizations cleared; {} old captures purged",
            self.due, self.refreshed, self.needs_reauth, self.failed, self.expired_states, self.purged_captures
        )];
        if self.captures_delivered + self.captures_pending > 0 {
            lines.push(format!(
                "captures: {} delivered to F&O, {} still pending",
                self.captures_delivered, self.captures_pending
            ));
        }
        lines.extend(self.errors.iter().cloned());
        lines
    }
}

/// What a refresh must achieve.
#[derive(Debug, Clone, Copy)]
enum Want {
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
}

pub struct Connections {
    store: Arc<dyn Store>,
    keys: Arc<Keyring>,
    catalog: Arc<Catalog>,
    secrets: Arc<dyn SecretSource>,
    http: reqwest::Client,
    cfg: OAuthConfig,
    redirect_uri: Url,
    /// This process's name in refresh leases.
    instance: String,
    cache: cache::TokenCache,
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Where captures go besides the store (Finance & Operations), if anywhere.
    fno: Option<Fno>,
}

const MAX_ID_LEN: usize = 128;

impl Connections {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        keys: Arc<Keyring>,
        catalog: Arc<Catalog>,
        secrets: Arc<dyn SecretSource>,
        http: reqwest::Client,
        cfg: OAuthConfig,
        redirect_uri: Url,
        fno: Option<Fno>,
    ) -> Connections {
        let cache = cache::TokenCache::new(cfg.token_cache_ttl);
        Connections {
            store,
            keys,
            catalog,
            secrets,
            http,
            cfg,
            redirect_uri,
            instance: crypto::random_token::<9>(),
            cache,
            flights: Mutex::new(HashMap::new()),
            fno,
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn client(&self) -> TokenClient<'_> {
        TokenClient { http: &self.http, secrets: self.secrets.as_ref() }
    }

    fn provider(&self, name: &str) -> Result<&Provider, ConnectionError> {
        self.catalog.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.catalog.iter().map(|p| p.name.as_str()).collect();
            ConnectionError::Invalid(
                "unknown-provider",
                format!(
                    "There is no provider {name:?} in the catalog{}.",
                    if known.is_empty() { String::new() } else { format!(" (known: {})", known.join(", ")) }
                ),
            )
        })
    }

    // ----- starting -----------------------------------------------------------------

    /// Creates a connection and returns the URL to send the person to.
    pub async fn start(&self, req: StartRequest) -> Result<Started, ConnectionError> {
        let provider = self.provider(&req.provider)?.clone();
        let id = match req.connection_id {
            Some(id) => validate_id(&id)?,
            None => new_id(),
        };
        if let Some(owner) = &req.owner
            && (owner.is_empty() || owner.len() > 200 || owner.chars().any(char::is_control))
        {
            return Err(ConnectionError::Invalid("invalid-owner", "owner must be 1-200 printable characters.".into()));
        }
        let scopes = validate_scopes(req.scopes.unwrap_or_else(|| provider.scopes.clone()), &provider)?;
        let return_url = req.return_url.as_deref().map(|u| self.validate_return_url(u)).transpose()?;
        let t = now();
        let (pending, state, challenge) = self.new_pending(&id, &provider, return_url.as_ref(), req.opener_origin, t);
        let conn = Connection {
            id: id.clone(),
            provider: provider.name.clone(),
            owner: req.owner,
            scopes,
            status: Status::Pending,
            status_detail: None,
            tokens: None,
            access_expires_at: None,
            has_refresh_token: false,
            pending: Some(pending.clone()),
            lease: None,
            failures: 0,
            next_attempt_at: None,
            created_at: t,
            updated_at: t,
            refreshed_at: None,
            version: Default::default(),
        };
        match self.store.insert(&conn).await {
            Ok(_) => {}
            Err(StoreError::Conflict(_)) => return Err(ConnectionError::Exists(id)),
            Err(e) => return Err(e.into()),
        }
        tracing::info!(connection = %id, provider = %provider.name, "connection started");
        Ok(self.started(&conn, &provider, &state, challenge.as_deref(), pending.expires_at))
    }

    /// Issues a new authorization for an existing connection. Its current tokens keep
    /// working until the new authorization completes.
    pub async fn reconnect(&self, id: &str, return_url: Option<&str>) -> Result<Started, ConnectionError> {
        self.reconnect_for(id, return_url, None).await
    }

    /// [`Connections::reconnect`], for a flow a portal page runs in a popup.
    pub async fn reconnect_for(
        &self,
        id: &str,
        return_url: Option<&str>,
        opener_origin: Option<String>,
    ) -> Result<Started, ConnectionError> {
        let return_url = return_url.map(|u| self.validate_return_url(u)).transpose()?;
        let mut issued = None;
        let conn = self
            .modify(id, None, |c| {
                let provider = self.provider(&c.provider)?;
                let (pending, state, challenge) =
                    self.new_pending(&c.id, provider, return_url.as_ref(), opener_origin.clone(), now());
                c.pending = Some(pending);
                issued = Some((state, challenge));
                Ok(())
            })
            .await?;
        let provider = self.provider(&conn.provider)?;
        let (state, challenge) = issued.ok_or_else(|| ConnectionError::NotFound(id.to_string()))?;
        let expires_at = conn.pending.as_ref().map(|p| p.expires_at).unwrap_or_default();
        tracing::info!(connection = %id, provider = %provider.name, "re-authorization started");
        Ok(self.started(&conn, provider, &state, challenge.as_deref(), expires_at))
    }

    fn new_pending(
        &self,
        id: &str,
        provider: &Provider,
        return_url: Option<&Url>,
        opener_origin: Option<String>,
        t: i64,
    ) -> (PendingAuth, String, Option<String>) {
        let expires_at = t + self.cfg.state_ttl.as_secs() as i64;
        let state = self.keys.issue_state(id, expires_at);
        // RFC 7636 §4.1: 32 random octets, base64url = 43 characters.
        let verifier = provider.pkce.then(crypto::random_token::<32>);
        let challenge = verifier.as_deref().map(crypto::pkce_challenge);
        let secret = PendingSecret { verifier, return_url: return_url.map(|u| u.to_string()), opener_origin };
        let sealed = self.keys.seal(&serde_json::to_vec(&secret).unwrap_or_default(), &pending_aad(id));
        (PendingAuth { state_hash: crypto::state_hash(&state), sealed, expires_at }, state, challenge)
    }

    fn started(&self, c: &Connection, p: &Provider, state: &str, challenge: Option<&str>, expires_at: i64) -> Started {
        Started {
            connection_id: c.id.clone(),
            provider: p.name.clone(),
            status: c.status,
            authorization_url: client::authorization_url(p, &self.redirect_uri, state, challenge, &c.scopes)
                .to_string(),
            authorization_expires_at: crate::time::rfc3339(expires_at),
        }
    }

    pub fn validate_return_url(&self, raw: &str) -> Result<Url, ConnectionError> {
        let invalid = |why: String| ConnectionError::Invalid("invalid-return-url", why);
        let url = Url::parse(raw).map_err(|e| invalid(format!("return_url is not a valid absolute URL: {e}.")))?;
        if !matches!(url.scheme(), "https" | "http") || !url.username().is_empty() || url.password().is_some() {
            return Err(invalid("return_url must be an http(s) URL without credentials.".into()));
        }
        if !self.cfg.return_url_origins.contains(&url.origin()) {
            return Err(invalid(format!(
                "return_url's origin {} is not in RETURN_URL_ALLOWLIST.",
                url.origin().ascii_serialization()
            )));
        }
        Ok(url)
    }

    // ----- the callback -------------------------------------------------------------

    /// Finishes a managed authorization: consumes the state, exchanges the code, stores
    /// the tokens. `state` has been verified by the caller.
    pub async fn complete(
        &self,
        verified: &crypto::VerifiedState,
        code: Option<&str>,
        iss: Option<&str>,
        provider_error: Option<(&str, Option<&str>)>,
    ) -> Result<Completed, CallbackFailure> {
        let conn = self
            .store
            .find_by_state(&verified.hash)
            .await
            .map_err(CallbackFailure::Store)?
            .ok_or(CallbackFailure::StateUsed)?;
        if !verified.is_for(&conn.id) {
            return Err(CallbackFailure::StateForOtherConnection);
        }
        let t = now();
        let pending = conn.pending.clone().ok_or(CallbackFailure::StateUsed)?;
        if pending.expires_at <= t {
            return Err(CallbackFailure::StateExpired);
        }
        let provider =
            self.provider(&conn.provider).map_err(|_| CallbackFailure::UnknownProvider(conn.provider.clone()))?.clone();
        // RFC 9207: when the provider declares its issuer, the response must carry it.
        if let Some(expected) = provider.issuer.as_deref() {
            match iss {
                Some(got) if got == expected => {}
                Some(got) => return Err(CallbackFailure::WrongIssuer { expected: expected.into(), got: got.into() }),
                None => return Err(CallbackFailure::MissingIssuer { expected: expected.into() }),
            }
        }
        if provider_error.is_none() && code.is_none() {
            return Err(CallbackFailure::MissingCode);
        }
        let secret: PendingSecret = self
            .keys
            .open(&pending.sealed, &pending_aad(&conn.id))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(CallbackFailure::Crypto)?;
        let return_url = secret.return_url.as_deref().and_then(|u| self.validate_return_url(u).ok());
        let opener_origin = secret.opener_origin.clone();
        let done = |return_url| Completed {
            connection_id: conn.id.clone(),
            provider: provider.display_name.clone(),
            return_url,
            opener_origin: opener_origin.clone(),
        };

        // Single use: remove the pending authorization before acting on it. A replay,
        // or a duplicate racing this one, finds the state gone.
        let mut consumed = conn.clone();
        consumed.pending = None;
        consumed.updated_at = t;
        match self.store.update(&consumed, &conn.version).await {
            Ok(v) => consumed.version = v,
            Err(StoreError::Conflict(_)) | Err(StoreError::NotFound(_)) => return Err(CallbackFailure::StateUsed),
            Err(e) => return Err(CallbackFailure::Store(e)),
        }

        if let Some((error, description)) = provider_error {
            let detail = provider_error_text(error, description);
            self.record_failure(&consumed, &detail).await;
            return Err(CallbackFailure::ProviderError {
                error: error.to_string(),
                description: description.map(str::to_string),
                completed: done(return_url),
            });
        }
        let code = code.unwrap_or_default();
        let tokens =
            match self.client().exchange_code(&provider, code, secret.verifier.as_deref(), &self.redirect_uri, t).await
            {
                Ok(tokens) => tokens,
                Err(e) => {
                    let detail = format!("The code exchange failed: {e}");
                    self.record_failure(&consumed, &detail).await;
                    return Err(CallbackFailure::Exchange { error: e, completed: done(return_url) });
                }
            };
        // The code is spent; these tokens exist nowhere else. Keep trying to store them.
        let stored = self
            .modify(&conn.id, Some(consumed), |c| {
                apply_tokens(c, &tokens, &self.keys, now());
                Ok(())
            })
            .await;
        match stored {
            Ok(c) => {
                self.cache.put(&c.id, CachedToken::from_tokens(&tokens, now_millis()));
                tracing::info!(connection = %c.id, provider = %provider.name, "connection authorized");
                Ok(done(return_url))
            }
            Err(e) => {
                tracing::error!(connection = %conn.id, error = %e, "tokens were obtained but could not be stored; the person must authorize again");
                Err(CallbackFailure::NotSaved(e.to_string()))
            }
        }
    }

    async fn record_failure(&self, conn: &Connection, detail: &str) {
        let result = self
            .modify(&conn.id, Some(conn.clone()), |c| {
                if c.tokens.is_none() {
                    c.status = Status::Failed;
                }
                c.status_detail = Some(detail.to_string());
                Ok(())
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(connection = %conn.id, error = %e, "could not record the authorization failure");
        }
    }

    /// Keeps what the provider sent for a `state` we did not issue, exactly once per code,
    /// and delivers it to Finance & Operations when configured. A delivery that fails
    /// stays pending in the store for the timer. Returns whether the capture was new.
    pub async fn capture(
        &self,
        state: &str,
        code: Option<&str>,
        iss: Option<&str>,
        error: Option<&str>,
        error_description: Option<&str>,
    ) -> Result<bool, StoreError> {
        let key = match code {
            Some(code) => crypto::fingerprint(&format!("code:{code}")),
            None => crypto::fingerprint(&format!("error:{state}:{}", error.unwrap_or_default())),
        };
        let received_at = now();
        let capture = Capture {
            state: state.to_string(),
            code: code.map(|c| self.keys.seal(c.as_bytes(), &capture_aad(&key))),
            key: key.clone(),
            iss: iss.map(str::to_string),
            error: error.map(str::to_string),
            error_description: error_description.map(str::to_string),
            received_at,
            delivered_at: if self.fno.is_some() { None } else { Some(received_at) },
        };
        let fresh = self.store.insert_capture(&capture).await?;
        tracing::info!(new = fresh, has_code = code.is_some(), "capture received");
        if let (true, Some(fno)) = (fresh, &self.fno) {
            let delivery = Delivery { code, state, iss, error, error_description, received_at };
            match fno.deliver(&delivery).await {
                Ok(()) => self.store.mark_capture_delivered(&key, now()).await?,
                Err(e) => tracing::warn!(error = %e, "capture kept; delivery to F&O will be retried by the timer"),
            }
        }
        Ok(fresh)
    }

    /// Delivers captures that Finance & Operations did not take yet; returns (delivered, failed).
    async fn deliver_pending(&self, fno: &Fno) -> Result<(usize, usize), StoreError> {
        let (mut delivered, mut failed) = (0, 0);
        for c in self.store.undelivered_captures(100).await? {
            let Ok(code) = self.open_capture_code(&c) else {
                failed += 1;
                tracing::error!("a pending capture's code cannot be decrypted; it is skipped");
                continue;
            };
            let delivery = Delivery {
                code: code.as_deref(),
                state: &c.state,
                iss: c.iss.as_deref(),
                error: c.error.as_deref(),
                error_description: c.error_description.as_deref(),
                received_at: c.received_at,
            };
            match fno.deliver(&delivery).await {
                Ok(()) => {
                    self.store.mark_capture_delivered(&c.key, now()).await?;
                    delivered += 1;
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(error = %e, "pending capture still not delivered to F&O");
                }
            }
        }
        Ok((delivered, failed))
    }

    /// A capture's authorization code, decrypted.
    fn open_capture_code(&self, c: &Capture) -> Result<Option<String>, CryptoError> {
        c.code
            .as_deref()
            .map(|sealed| {
                String::from_utf8(self.keys.open(sealed, &capture_aad(&c.key))?).map_err(|_| CryptoError::Malformed)
            })
            .transpose()
    }

    /// The captures received for a state, with their codes decrypted.
    pub async fn captures(&self, state: &str) -> Result<Vec<CaptureView>, ConnectionError> {
        let captures = self.store.captures_by_state(state).await?;
        captures
            .into_iter()
            .map(|c| {
                let code = self.open_capture_code(&c)?;
                Ok(CaptureView {
                    state: c.state,
                    code,
                    iss: c.iss,
                    error: c.error,
                    error_description: c.error_description,
                    received_at: crate::time::rfc3339(c.received_at),
                    delivered_at: c.delivered_at.map(crate::time::rfc3339),
                })
            })
            .collect()
    }

    // ----- reading ------------------------------------------------------------------

    pub async fn get(&self, id: &str) -> Result<Connection, ConnectionError> {
        self.store.get(id).await?.ok_or_else(|| ConnectionError::NotFound(id.to_string()))
    }

    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<Connection>, ConnectionError> {
        Ok(self.store.list(filter).await?)
    }

    // ----- tokens -------------------------------------------------------------------

    /// A valid access token for a connection, refreshing first when it expires within
    /// the margin (or always, with `force`).
    pub async fn access_token(&self, id: &str, force: bool) -> Result<CachedToken, ConnectionError> {
        let asked_at = now_millis();
        let margin = self.cfg.refresh_margin.as_secs() as i64;
        let want = if force { Want::RefreshedAfter(asked_at) } else { Want::Fresh { margin, asked_at_ms: asked_at } };
        if let Some(t) = self.cache.get_satisfying(id, |t| satisfies(t.expires_at, t.obtained_ms, want)) {
            return Ok(t);
        }
        self.refresh_single_flight(id, want).await
    }

    async fn refresh_single_flight(&self, id: &str, want: Want) -> Result<CachedToken, ConnectionError> {
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            flights.entry(id.to_string()).or_default().clone()
        };
        let result = {
            let _turn = flight.lock().await;
            // Whoever held the turn before us may have done the work.
            match self.cache.get_satisfying(id, |t| satisfies(t.expires_at, t.obtained_ms, want)) {
                Some(t) => Ok(t),
                None => self.refresh(id, want).await,
            }
        };
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::strong_count(&flight) <= 2 {
            flights.remove(id);
        }
        result
    }

    /// The cross-process part: read, lease, refresh, store.
    async fn refresh(&self, id: &str, want: Want) -> Result<CachedToken, ConnectionError> {
        let deadline = now_millis() + (self.cfg.lease_duration.as_millis() as i64) + 5_000;
        let mut wait = Duration::from_millis(50);
        loop {
            if now_millis() > deadline {
                return Err(ConnectionError::Backoff {
                    detail: "the connection record kept changing under the refresh".into(),
                    retry_after: 1,
                });
            }
            let conn = self.get(id).await?;
            let tokens = self.usable_tokens(&conn)?;
            let t = now();
            let obtained_ms = conn.refreshed_at.unwrap_or(conn.created_at) * 1000;
            let current = CachedToken::from_tokens(&tokens, obtained_ms);
            if satisfies(tokens.expires_at, obtained_ms, want) {
                self.cache.put(id, current.clone());
                return Ok(current);
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
            if let Some(next) = conn.next_attempt_at
                && want.accepts_still_valid()
                && next > t
            {
                // Backing off after a transient failure: serve what is still valid.
                if tokens.expires_at > t {
                    return Ok(current);
                }
                return Err(ConnectionError::Backoff {
                    detail: conn.status_detail.clone().unwrap_or_else(|| "an earlier refresh failed".into()),
                    retry_after: (next - t) as u64,
                });
            }
            if let Some(lease) = &conn.lease
                && lease.owner != self.instance
                && lease.until_ms > now_millis()
            {
                // Another instance is refreshing. Wait for its result.
                if now_millis() > deadline {
                    return Err(ConnectionError::Backoff {
                        detail: "another instance holds the refresh lease".into(),
                        retry_after: 1,
                    });
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(400));
                continue;
            }
            // Take the lease. A conflict means someone else changed the record: re-read.
            let mut leased = conn.clone();
            leased.lease = Some(Lease {
                owner: self.instance.clone(),
                until_ms: now_millis() + self.cfg.lease_duration.as_millis() as i64,
            });
            leased.updated_at = t;
            match self.store.update(&leased, &conn.version).await {
                Ok(v) => leased.version = v,
                Err(StoreError::Conflict(_)) => continue,
                Err(StoreError::NotFound(_)) => return Err(ConnectionError::NotFound(id.to_string())),
                Err(e) if e.is_transient() && now_millis() < deadline => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(2_000));
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            return self.refresh_with_lease(leased, tokens, refresh_token, want).await;
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
        let started = now();
        match self.client().refresh(&provider, &refresh_token, started).await {
            Ok(tokens) => {
                let lease_version = leased.version.clone();
                let stored = self
                    .modify(&id, Some(leased), |c| {
                        if c.version != lease_version && c.refreshed_at.is_some_and(|r| r > started) {
                            // Our lease expired and another instance stored newer tokens.
                            return Err(ConnectionError::Backoff { detail: "superseded".into(), retry_after: 0 });
                        }
                        apply_tokens(c, &tokens, &self.keys, now());
                        Ok(())
                    })
                    .await;
                match stored {
                    Ok(c) => {
                        let token = CachedToken::from_tokens(&tokens, now_millis());
                        self.cache.put(&c.id, token.clone());
                        tracing::info!(connection = %c.id, provider = %provider.name, "token refreshed");
                        Ok(token)
                    }
                    // Someone else's newer tokens won; serve those.
                    Err(ConnectionError::Backoff { .. }) => Box::pin(self.refresh(&id, want)).await,
                    Err(e) => {
                        tracing::error!(error = %e, "a refreshed token could not be stored");
                        Err(e)
                    }
                }
            }
            Err(e) if e.is_invalid_grant() => {
                let detail = e.to_string();
                Err(self.mark_needs_reauth(leased, &detail).await)
            }
            Err(e) => {
                let t = now();
                let failures = leased.failures.saturating_add(1);
                let backoff = backoff_secs(failures);
                let detail = e.to_string();
                let _ = self
                    .modify(&id, Some(leased), |c| {
                        c.lease = None;
                        c.failures = failures;
                        c.next_attempt_at = Some(t + backoff);
                        c.status_detail = Some(format!("Refresh failed ({failures} in a row): {detail}"));
                        Ok(())
                    })
                    .await;
                tracing::warn!(connection = %id, provider = %provider.name, error = %e, failures, "refresh failed; backing off {backoff} s");
                if old.expires_at > t && want.accepts_still_valid() {
                    return Ok(CachedToken::from_tokens(&old, 0));
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
        let detail = why.to_string();
        let result = self
            .modify(&id, Some(conn), |c| {
                c.status = Status::NeedsReauth;
                c.status_detail = Some(detail.clone());
                c.lease = None;
                Ok(())
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
            (_, Some(sealed)) => Ok(TokenSet::open(sealed, &self.keys, &conn.id)?),
            (status, None) => Err(ConnectionError::NotAuthorized { id: conn.id.clone(), status: status.as_str() }),
        }
    }

    // ----- deleting -----------------------------------------------------------------

    /// Revokes the tokens at the provider (RFC 7009) and deletes the connection. When the
    /// provider cannot be reached the connection is kept, unless `skip_revocation`.
    pub async fn delete(&self, id: &str, skip_revocation: bool) -> Result<bool, ConnectionError> {
        let conn = self.get(id).await?;
        let provider = self.catalog.get(&conn.provider);
        let mut revoked = false;
        if let (Some(provider), Some(sealed), false) = (provider, &conn.tokens, skip_revocation)
            && provider.revocation_url.is_some()
        {
            let tokens = TokenSet::open(sealed, &self.keys, id)?;
            // Revoking the refresh token ends the grant; the access token is revoked
            // too for providers that keep them apart.
            if let Some(rt) = &tokens.refresh_token {
                self.client().revoke(provider, rt, "refresh_token").await?;
            }
            match self.client().revoke(provider, &tokens.access_token, "access_token").await {
                // RFC 7009 §2.2.1: a server that cannot revoke access tokens says so.
                Err(OAuthError::Rejected { error, .. }) if error == "unsupported_token_type" => {}
                other => other?,
            }
            revoked = true;
        }
        let mut current = conn;
        for _ in 0..5 {
            match self.store.delete(id, &current.version).await {
                Ok(()) => break,
                Err(StoreError::Conflict(_)) => current = self.get(id).await?,
                Err(StoreError::NotFound(_)) => break,
                Err(e) => return Err(e.into()),
            }
        }
        self.cache.remove(id);
        tracing::info!(connection = %id, revoked, "connection deleted");
        Ok(revoked)
    }

    // ----- the timer ----------------------------------------------------------------

    /// Refreshes tokens that would expire before the timer's next run (plus margin),
    /// keeps idle refresh tokens alive, and clears expired authorizations and old captures.
    pub async fn timer_sweep(&self, next_run: Option<i64>) -> SweepReport {
        let mut report = SweepReport::default();
        let t = now();
        let margin = self.cfg.refresh_margin.as_secs() as i64;
        let horizon = next_run.unwrap_or(t + self.cfg.timer_lookahead.as_secs() as i64).max(t) + margin;
        let keepalive = self.catalog.iter().filter_map(|p| p.refresh_keepalive).min();
        let idle_before = keepalive.map(|k| t - k.as_secs() as i64).unwrap_or(i64::MIN);
        match self.store.due_for_refresh(horizon, idle_before, 500).await {
            Ok(due) => {
                report.due = due.len();
                let results: Vec<_> = futures_util::stream::iter(due)
                    .map(|c| async move {
                        let keep = self.catalog.get(&c.provider).and_then(|p| p.refresh_keepalive);
                        let idle =
                            keep.is_some_and(|k| c.refreshed_at.unwrap_or(c.created_at) < t - k.as_secs() as i64);
                        let want = if idle { Want::RefreshedAfter(now_millis()) } else { Want::ValidUntil(horizon) };
                        (c.id.clone(), self.refresh_single_flight(&c.id, want).await)
                    })
                    .buffer_unordered(4)
                    .collect()
                    .await;
                for (id, r) in results {
                    match r {
                        Ok(_) => report.refreshed += 1,
                        Err(ConnectionError::NeedsReauth { .. }) => report.needs_reauth += 1,
                        Err(e) => {
                            report.failed += 1;
                            report.errors.push(format!("connection {id}: {e}"));
                        }
                    }
                }
            }
            Err(e) => report.errors.push(format!("could not list connections due for refresh: {e}")),
        }
        match self.store.expired_pending(t, 500).await {
            Ok(expired) => {
                for c in expired {
                    let r = self.modify(&c.id, Some(c.clone()), |c| {
                        c.pending = None;
                        Ok(())
                    });
                    if r.await.is_ok() {
                        report.expired_states += 1;
                    }
                }
            }
            Err(e) => report.errors.push(format!("could not list expired authorizations: {e}")),
        }
        if let Some(fno) = &self.fno {
            match self.deliver_pending(fno).await {
                Ok((delivered, failed)) => {
                    report.captures_delivered = delivered;
                    report.captures_pending = failed;
                }
                Err(e) => report.errors.push(format!("could not deliver pending captures: {e}")),
            }
        }
        match self.store.purge_captures(t - self.cfg.capture_retention.as_secs() as i64).await {
            Ok(n) => report.purged_captures = n,
            Err(e) => report.errors.push(format!("could not purge captures: {e}")),
        }
        report
    }

    // ----- the one way to change a record -------------------------------------------

    /// Applies `change` to the latest version of a connection and stores it, re-reading
    /// on a version conflict and retrying transient store errors with backoff (for up to
    /// about half a minute: what is being stored may exist nowhere else).
    async fn modify<F>(
        &self,
        id: &str,
        mut known: Option<Connection>,
        mut change: F,
    ) -> Result<Connection, ConnectionError>
    where
        F: FnMut(&mut Connection) -> Result<(), ConnectionError>,
    {
        let mut wait = Duration::from_millis(100);
        let give_up = now_millis() + 30_000;
        loop {
            let current = match known.take() {
                Some(c) => c,
                None => match self.store.get(id).await {
                    Ok(Some(c)) => c,
                    Ok(None) => return Err(ConnectionError::NotFound(id.to_string())),
                    Err(e) if e.is_transient() && now_millis() < give_up => {
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(4));
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                },
            };
            let mut next = current.clone();
            change(&mut next)?;
            next.updated_at = now();
            match self.store.update(&next, &current.version).await {
                Ok(v) => {
                    next.version = v;
                    return Ok(next);
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(StoreError::NotFound(_)) => return Err(ConnectionError::NotFound(id.to_string())),
                Err(e) if e.is_transient() && now_millis() < give_up => {
                    tracing::warn!(connection = %id, error = %e, "store busy; retrying");
                    known = Some(current);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(4));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A capture as the back office reads it.
#[derive(Debug, Serialize)]
pub struct CaptureView {
    pub state: String,
    pub code: Option<String>,
    pub iss: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
    pub received_at: String,
    pub delivered_at: Option<String>,
}

/// Why a managed callback did not complete. Mapped to a page in `oauth::callback`.
#[derive(Debug)]
pub enum CallbackFailure {
    StateUsed,
    StateExpired,
    StateForOtherConnection,
    UnknownProvider(String),
    WrongIssuer { expected: String, got: String },
    MissingIssuer { expected: String },
    MissingCode,
    Crypto,
    ProviderError { error: String, description: Option<String>, completed: Completed },
    Exchange { error: OAuthError, completed: Completed },
    NotSaved(String),
    Store(StoreError),
}

fn satisfies(expires_at: i64, obtained_ms: i64, want: Want) -> bool {
    match want {
        Want::Fresh { margin, asked_at_ms } => {
            // In milliseconds: expiry is kept in whole seconds, and for a short-lived token
            // the rounding alone could make a token obtained a moment ago look due.
            let (now_ms, expires_ms) = (now_millis(), expires_at * 1000);
            if obtained_ms >= asked_at_ms && expires_ms > now_ms {
                return true;
            }
            let lifetime_ms = expires_ms - obtained_ms;
            expires_ms - (margin * 1000).min(lifetime_ms / 2).max(0) > now_ms
        }
        Want::ValidUntil(t) => expires_at > t,
        Want::RefreshedAfter(ms) => obtained_ms >= ms,
    }
}

fn apply_tokens(c: &mut Connection, tokens: &TokenSet, keys: &Keyring, t: i64) {
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

/// 30 s, 1 min, 2 min, ... capped at 30 min.
fn backoff_secs(failures: u32) -> i64 {
    (30i64 << failures.saturating_sub(1).min(6)).min(1800)
}

fn pending_aad(id: &str) -> String {
    format!("connection:{id}:pending")
}

fn capture_aad(key: &str) -> String {
    format!("capture:{key}:code")
}

fn provider_error_text(error: &str, description: Option<&str>) -> String {
    match description {
        Some(d) => format!("The provider returned {error}: {d}"),
        None => format!("The provider returned {error}."),
    }
}

fn new_id() -> String {
    crypto::random_bytes::<16>().iter().map(|b| format!("{b:02x}")).collect()
}

fn validate_id(id: &str) -> Result<String, ConnectionError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(id.to_string())
    } else {
        Err(ConnectionError::Invalid(
            "invalid-connection-id",
            format!(
                "connection_id must be 1-{MAX_ID_LEN} letters, digits, '-', '_' or '.', starting with a letter or digit."
            ),
        ))
    }
}

fn validate_scopes(scopes: Vec<String>, provider: &Provider) -> Result<Vec<String>, ConnectionError> {
    if scopes.len() > 50 {
        return Err(ConnectionError::Invalid("invalid-scopes", "At most 50 scopes may be requested.".into()));
    }
    for s in &scopes {
        if s.is_empty()
            || s.len() > 200
            || s.chars().any(|c| c.is_whitespace() || c.is_control())
            || s.contains(provider.scope_separator.as_str())
        {
            return Err(ConnectionError::Invalid(
                "invalid-scopes",
                format!(
                    "Scope {s:?} is not valid: scopes are 1-200 characters without spaces or the provider's separator."
                ),
            ));
        }
    }
    Ok(scopes)
}
