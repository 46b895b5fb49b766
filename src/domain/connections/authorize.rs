//! Starting an authorization and completing it at the callback.
//!
//! Starting creates (or, for a reconnect, updates) the record with a pending
//! authorization: the hash of a signed `state`, and the PKCE verifier and return URL
//! sealed. Completing consumes that pending authorization with a version-checked update
//! *before* the code is exchanged, so a replayed or duplicated callback finds nothing to
//! spend; then the code is exchanged and the tokens stored, retrying the store, because
//! the code is spent and the tokens exist nowhere else.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use url::Url;

use super::unsaved::{Unsaved, Withdrawal, withdraw};
use super::validate::{validate_id, validate_owner, validate_scopes};
use super::{ConnectionError, Connections, InvalidInput};
use crate::domain::oauth::catalog::Provider;
use crate::domain::oauth::{AuthorizationCode, CodeGrant, ErrorCode, OAuthError, PkceVerifier, State, TokenSet};
use crate::domain::{Connection, PendingAuth, Status, StoreError};
use crate::support::crypto::{self, VerifiedState};

/// What a caller asks for when starting a connection.
#[derive(Debug, Default, Clone)]
pub struct NewConnection {
    pub provider: String,
    pub connection_id: Option<String>,
    pub owner: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub return_url: Option<String>,
    /// The connection's own values for a preset's parameters (an instance, a region),
    /// for an entry that leaves them to each connection.
    pub params: std::collections::BTreeMap<String, String>,
    /// Set by the portal API only, never from a caller's body.
    pub portal: PortalFlow,
}

/// A flow a portal page runs in a popup: the page's origin (told the result by
/// `postMessage`), and the SHA-256 of a secret only that page knows, which the browser
/// that completes the flow must present (a cookie set on our origin before it left for
/// the provider). A link sent to anyone else is refused at the callback.
#[derive(Debug, Default, Clone)]
pub struct PortalFlow {
    pub opener_origin: Option<String>,
    pub binding: Option<String>,
}

/// What the bind step learned: where the popup may go, and how the cookie must be set.
#[derive(Debug)]
pub struct Bound {
    /// The provider's authorization endpoint, which the authorization URL must be on.
    pub authorization_endpoint: Url,
    pub opener_origin: Option<String>,
    /// The provider answers with `response_mode=form_post` (a cross-site POST).
    pub form_post: bool,
    pub expires_at: i64,
}

/// Why a bind step was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindFailure {
    /// No pending authorization has this state (used, replaced or never issued).
    UnknownState,
    /// The flow was not started by a portal page, or with another secret.
    WrongSecret,
}

/// A started (or restarted) authorization: where to send the person.
#[derive(Debug)]
pub struct StartedAuthorization {
    pub connection: Connection,
    pub authorization_url: Url,
    pub expires_at: i64,
}

/// The PKCE verifier and return URL of a pending authorization (sealed in the store).
#[derive(Serialize, Deserialize)]
struct PendingSecret {
    #[serde(default)]
    verifier: Option<PkceVerifier>,
    #[serde(default)]
    return_url: Option<String>,
    #[serde(default)]
    opener_origin: Option<String>,
    /// SHA-256 (hex) of the portal page's secret; see [`PortalFlow`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    binding: Option<String>,
}

/// What the callback learned, for the page it shows.
#[derive(Debug)]
pub struct Completed {
    pub connection_id: String,
    /// The provider's display name, for the page.
    pub provider: String,
    /// Its name in the catalog, for the record.
    pub provider_name: String,
    pub return_url: Option<Url>,
    /// The portal page that opened the flow in a popup, if any.
    pub opener_origin: Option<String>,
}

/// Why a managed callback did not complete. Said to the person by the web layer.
#[derive(Debug)]
pub enum CallbackFailure {
    StateUsed,
    StateExpired,
    StateForOtherConnection,
    UnknownProvider(String),
    WrongIssuer {
        expected: String,
        got: String,
    },
    MissingIssuer {
        expected: String,
    },
    MissingCode,
    /// A portal flow completed in a browser that did not start it (no binding cookie).
    BindingMissing,
    /// A binding cookie that is not this flow's.
    BindingMismatch,
    Crypto,
    ProviderError {
        error: ErrorCode,
        description: Option<String>,
        completed: Completed,
    },
    Exchange {
        error: OAuthError,
        completed: Completed,
    },
    /// The tokens were obtained but could not be stored; `revoked` says whether the grant
    /// was withdrawn at the provider, so nothing is left alive there.
    NotSaved {
        revoked: bool,
    },
    Store(StoreError),
}

impl Connections {
    /// What every new record needs checked first: its provider, its id (a random one when
    /// none is given), its owner and its scopes (the provider's when none are given).
    pub(super) fn new_record(
        &self,
        provider: &str,
        connection_id: Option<String>,
        owner: Option<&str>,
        scopes: Option<Vec<String>>,
    ) -> Result<(std::sync::Arc<Provider>, String, Vec<String>), ConnectionError> {
        let provider = self.provider(provider)?;
        let id = match connection_id {
            Some(id) => validate_id(&id)?,
            None => crypto::random_hex::<16>(),
        };
        validate_owner(owner)?;
        let scopes = validate_scopes(scopes.unwrap_or_else(|| provider.scopes.clone()), &provider)?;
        Ok((provider, id, scopes))
    }

    /// Stores a record that must not exist yet; its version is set on success.
    pub(super) async fn insert_new(&self, conn: &mut Connection) -> Result<(), ConnectionError> {
        match self.deps.store.insert(conn).await {
            Ok(v) => {
                conn.version = v;
                Ok(())
            }
            Err(StoreError::Conflict(_)) => Err(ConnectionError::Exists(conn.id.clone())),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates a connection and returns the URL to send the person to.
    pub async fn start(&self, req: NewConnection) -> Result<StartedAuthorization, ConnectionError> {
        // A per-connection entry's provider is its name with the connection's parameters.
        let key = match self.deps.catalog.instance_key(&req.provider, &req.params) {
            Ok(key) => key,
            Err(detail) if self.deps.catalog.names().contains(&req.provider.as_str()) => {
                return Err(ConnectionError::Invalid(InvalidInput::ProviderParams, detail.to_string()));
            }
            Err(_) => req.provider.clone(),
        };
        let (provider, id, scopes) = self.new_record(&key, req.connection_id, req.owner.as_deref(), req.scopes)?;
        let return_url = req.return_url.as_deref().map(|u| self.validate_return_url(u)).transpose()?;
        let t = self.deps.clock.now();
        let (pending, state, challenge) = self.new_pending(&id, &provider, return_url.as_ref(), req.portal, t);
        let mut conn = Connection::new(&id, &provider.name, req.owner, scopes, Status::Pending, t);
        conn.pending = Some(pending.clone());
        self.insert_new(&mut conn).await?;
        tracing::info!(connection = %id, provider = %provider.name, "connection started");
        Ok(self.started(conn, &provider, &state, challenge.as_deref(), pending.expires_at))
    }

    /// Issues a new authorization for an existing connection. Its current tokens keep
    /// working until the new authorization completes. `portal` is for a flow a portal
    /// page runs in a popup.
    pub async fn reconnect(
        &self,
        id: &str,
        return_url: Option<&str>,
        portal: PortalFlow,
    ) -> Result<StartedAuthorization, ConnectionError> {
        let return_url = return_url.map(|u| self.validate_return_url(u)).transpose()?;
        let mut issued = None;
        let now = self.deps.clock.now();
        let conn = self
            .modify(id, None, |c| {
                let provider = self.provider(&c.provider)?;
                let (pending, state, challenge) =
                    self.new_pending(&c.id, &provider, return_url.as_ref(), portal.clone(), now);
                c.pending = Some(pending);
                issued = Some((state, challenge));
                Ok::<(), ConnectionError>(())
            })
            .await?;
        let provider = self.provider(&conn.provider)?;
        let (state, challenge) = issued.ok_or_else(|| ConnectionError::NotFound(id.to_string()))?;
        let expires_at = conn.pending.as_ref().map(|p| p.expires_at).unwrap_or_default();
        tracing::info!(connection = %id, provider = %provider.name, "re-authorization started");
        Ok(self.started(conn, &provider, &state, challenge.as_deref(), expires_at))
    }

    fn new_pending(
        &self,
        id: &str,
        provider: &Provider,
        return_url: Option<&Url>,
        portal: PortalFlow,
        t: i64,
    ) -> (PendingAuth, State, Option<String>) {
        let expires_at = t + self.deps.cfg.state_ttl.as_secs() as i64;
        let state = State::new(self.deps.keys.issue_scoped_state(self.deps.scope.as_deref(), id, expires_at));
        let verifier = provider.pkce.then(PkceVerifier::random);
        let challenge = verifier.as_ref().map(PkceVerifier::challenge);
        let secret = PendingSecret {
            verifier,
            return_url: return_url.map(|u| u.to_string()),
            opener_origin: portal.opener_origin,
            binding: portal.binding,
        };
        let sealed = self.deps.keys.seal(&serde_json::to_vec(&secret).unwrap_or_default(), &pending_aad(id));
        (PendingAuth { state_hash: crypto::sha256_hex(state.secret()), sealed, expires_at }, state, challenge)
    }

    fn started(
        &self,
        connection: Connection,
        p: &Provider,
        state: &State,
        challenge: Option<&str>,
        expires_at: i64,
    ) -> StartedAuthorization {
        let authorization_url = p.authorization_request(&self.deps.redirect_uri, state, challenge, &connection.scopes);
        StartedAuthorization { connection, authorization_url, expires_at }
    }

    pub fn validate_return_url(&self, raw: &str) -> Result<Url, ConnectionError> {
        let invalid = |why: String| ConnectionError::Invalid(InvalidInput::ReturnUrl, why);
        let url = Url::parse(raw).map_err(|e| invalid(format!("return_url is not a valid absolute URL: {e}.")))?;
        if !matches!(url.scheme(), "https" | "http") || !url.username().is_empty() || url.password().is_some() {
            return Err(invalid("return_url must be an http(s) URL without credentials.".into()));
        }
        if !self.deps.cfg.return_url_origins.contains(&url.origin()) {
            return Err(invalid(format!(
                "return_url's origin {} is not in RETURN_URL_ALLOWLIST.",
                url.origin().ascii_serialization()
            )));
        }
        Ok(url)
    }

    /// Finishes a managed authorization: consumes the state, exchanges the code, stores
    /// the tokens. `state` has been verified by the caller.
    pub async fn complete(
        &self,
        verified: &VerifiedState,
        code: Option<&AuthorizationCode>,
        iss: Option<&str>,
        provider_error: Option<(&ErrorCode, Option<&str>)>,
        presented_binding: Option<&str>,
    ) -> Result<Completed, CallbackFailure> {
        let (conn, provider, secret) = self.pending_for(verified, iss, presented_binding).await?;
        if provider_error.is_none() && code.is_none() {
            return Err(CallbackFailure::MissingCode);
        }
        let return_url = secret.return_url.as_deref().and_then(|u| self.validate_return_url(u).ok());
        let done = |return_url| Completed {
            connection_id: conn.id.clone(),
            provider: provider.display_name.clone(),
            provider_name: conn.provider.clone(),
            return_url,
            opener_origin: secret.opener_origin.clone(),
        };
        let consumed = self.consume(&conn).await?;
        if let Some((error, description)) = provider_error {
            let detail = match description {
                Some(d) => format!("The provider returned {error}: {d}"),
                None => format!("The provider returned {error}."),
            };
            self.record_failure(&consumed, &detail).await;
            return Err(CallbackFailure::ProviderError {
                error: error.clone(),
                description: description.map(str::to_string),
                completed: done(return_url),
            });
        }
        let Some(code) = code else {
            return Err(CallbackFailure::MissingCode);
        };
        let grant = CodeGrant { code, verifier: secret.verifier.as_ref(), redirect_uri: &self.deps.redirect_uri };
        let tokens = match self.deps.endpoint.exchange_code(&provider, grant, self.deps.clock.now()).await {
            Ok(tokens) => tokens,
            Err(e) => {
                self.record_failure(&consumed, &format!("The code exchange failed: {e}")).await;
                return Err(CallbackFailure::Exchange { error: e, completed: done(return_url) });
            }
        };
        self.keep_tokens(consumed, provider.clone(), tokens).await?;
        Ok(done(return_url))
    }

    /// The pending authorization a verified state names, with every check that can refuse
    /// it before anything is spent: its connection, its time, the provider's issuer
    /// (RFC 9207), and, for a portal flow, the browser that started it.
    async fn pending_for(
        &self,
        verified: &VerifiedState,
        iss: Option<&str>,
        presented_binding: Option<&str>,
    ) -> Result<(Connection, Arc<Provider>, PendingSecret), CallbackFailure> {
        let conn = self
            .deps
            .store
            .find_by_state(&verified.hash)
            .await
            .map_err(CallbackFailure::Store)?
            .ok_or(CallbackFailure::StateUsed)?;
        if !verified.is_for(&conn.id) {
            return Err(CallbackFailure::StateForOtherConnection);
        }
        let pending = conn.pending.clone().ok_or(CallbackFailure::StateUsed)?;
        if pending.expires_at <= self.deps.clock.now() {
            return Err(CallbackFailure::StateExpired);
        }
        let provider =
            self.provider(&conn.provider).map_err(|_| CallbackFailure::UnknownProvider(conn.provider.clone()))?;
        // RFC 9207: when the provider declares its issuer, an `iss` sent must be it, and
        // one that always sends it (`issuer_required`) must send it.
        if let Some(expected) = provider.issuer.as_deref() {
            match iss {
                Some(got) if got == expected => {}
                Some(got) => return Err(CallbackFailure::WrongIssuer { expected: expected.into(), got: got.into() }),
                None if provider.issuer_required => {
                    return Err(CallbackFailure::MissingIssuer { expected: expected.into() });
                }
                None => {}
            }
        }
        let secret: PendingSecret = self
            .deps
            .keys
            .open(&pending.sealed, &pending_aad(&conn.id))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(CallbackFailure::Crypto)?;
        // A portal flow completes only in the browser that started it; refused before the
        // state is consumed, so nothing is spent and the person who did start it can finish.
        if let Some(binding) = &secret.binding {
            match presented_binding {
                None => return Err(CallbackFailure::BindingMissing),
                Some(p) if !crypto::constant_time_eq(crypto::sha256_hex(p).as_bytes(), binding.as_bytes()) => {
                    return Err(CallbackFailure::BindingMismatch);
                }
                Some(_) => {}
            }
        }
        Ok((conn, provider, secret))
    }

    /// Single use: removes the pending authorization before acting on it. A replay, or a
    /// duplicate racing this one, finds the state gone.
    async fn consume(&self, conn: &Connection) -> Result<Connection, CallbackFailure> {
        let mut consumed = conn.clone();
        consumed.pending = None;
        consumed.updated_at = self.deps.clock.now();
        match self.deps.store.update(&consumed, &conn.version).await {
            Ok(v) => consumed.version = v,
            Err(StoreError::Conflict(_)) | Err(StoreError::NotFound(_)) => return Err(CallbackFailure::StateUsed),
            Err(e) => return Err(CallbackFailure::Store(e)),
        }
        Ok(consumed)
    }

    /// The code is spent and these tokens exist nowhere else: stored (retrying the store),
    /// or withdrawn at the provider and the failure recorded once the store answers.
    async fn keep_tokens(
        &self,
        consumed: Connection,
        provider: Arc<Provider>,
        tokens: TokenSet,
    ) -> Result<(), CallbackFailure> {
        let id = consumed.id.clone();
        let stored = self
            .update(&id, Some(consumed), |c| {
                super::refresh::apply_tokens(c, &tokens, &self.deps.keys, self.deps.clock.now())
            })
            .await;
        match stored {
            Ok(c) => {
                self.cache.put(&c.id, super::CachedToken::for_connection(&c, &tokens, self.deps.clock.now_millis()));
                tracing::info!(connection = %c.id, provider = %provider.name, "connection authorized");
                Ok(())
            }
            Err(e) => {
                tracing::error!(connection = %id, error = %e, "tokens were obtained but could not be stored; the person must authorize again");
                let withdrawal = withdraw(self.deps.endpoint.as_ref(), &provider, &tokens).await;
                let revoked = withdrawal == Withdrawal::Revoked;
                let unsaved = Unsaved {
                    store: self.deps.store.clone(),
                    clock: self.deps.clock.clone(),
                    endpoint: self.deps.endpoint.clone(),
                    provider,
                    tokens,
                    id,
                    why: e.to_string(),
                };
                tokio::spawn(unsaved.settle(withdrawal));
                Err(CallbackFailure::NotSaved { revoked })
            }
        }
    }

    /// The bind step of a portal flow: checks that `secret` is the one the portal page
    /// registered for this state, before the popup goes to the provider.
    pub async fn bind(&self, verified: &VerifiedState, secret: &str) -> Result<Bound, BindFailure> {
        let conn = match self.deps.store.find_by_state(&verified.hash).await {
            Ok(Some(c)) if verified.is_for(&c.id) => c,
            _ => return Err(BindFailure::UnknownState),
        };
        let pending = conn.pending.clone().filter(|p| p.expires_at > self.deps.clock.now());
        let opened: Option<PendingSecret> = pending
            .as_ref()
            .and_then(|p| self.deps.keys.open(&p.sealed, &pending_aad(&conn.id)).ok())
            .and_then(|b| serde_json::from_slice(&b).ok());
        let (Some(pending), Some(opened)) = (pending, opened) else {
            return Err(BindFailure::UnknownState);
        };
        let matches = opened
            .binding
            .as_deref()
            .is_some_and(|b| crypto::constant_time_eq(crypto::sha256_hex(secret).as_bytes(), b.as_bytes()));
        if !matches {
            return Err(BindFailure::WrongSecret);
        }
        let provider = self.deps.catalog.get(&conn.provider).ok_or(BindFailure::UnknownState)?;
        Ok(Bound {
            authorization_endpoint: provider.authorization_url.clone(),
            opener_origin: opened.opener_origin,
            form_post: provider.authorization_params.iter().any(|(k, v)| k == "response_mode" && v == "form_post"),
            expires_at: pending.expires_at,
        })
    }

    async fn record_failure(&self, conn: &Connection, detail: &str) {
        let result = self
            .update(&conn.id, Some(conn.clone()), |c| {
                if c.tokens.is_none() {
                    c.status = Status::Failed;
                }
                c.status_detail = Some(detail.to_string());
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(connection = %conn.id, error = %e, "could not record the authorization failure");
        }
    }
}

pub(super) fn pending_aad(id: &str) -> String {
    format!("connection:{id}:pending")
}

#[cfg(test)]
#[path = "authorize_tests.rs"]
mod tests;
