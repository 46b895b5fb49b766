//! OAuth 2.0 with external systems: the provider catalog, the token endpoint (as a
//! trait, so the connection rules can be tested without a provider), and the types.

pub mod catalog;
pub mod presets;
pub mod types;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::support::crypto::{CryptoError, Keyring};
use catalog::Provider;
pub use types::{AuthorizationCode, ErrorCode, PkceVerifier, State};

/// The tokens of one connection. Only ever stored sealed (see [`TokenSet::seal`]).
#[derive(Debug, Clone)]
pub struct TokenSet {
    pub access_token: SecretString,
    pub token_type: String,
    pub refresh_token: Option<SecretString>,
    /// Unix seconds.
    pub expires_at: i64,
    pub scope: Option<String>,
}

/// The sealed form's plaintext. Kept private so secrets leave `SecretString` only here.
#[derive(Serialize, Deserialize)]
struct SealedTokens {
    access_token: String,
    token_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    expires_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
}

impl TokenSet {
    pub fn aad(connection_id: &str) -> String {
        format!("connection:{connection_id}:tokens")
    }

    pub fn seal(&self, keys: &Keyring, connection_id: &str) -> String {
        let plain = SealedTokens {
            access_token: self.access_token.expose_secret().to_string(),
            token_type: self.token_type.clone(),
            refresh_token: self.refresh_token.as_ref().map(|r| r.expose_secret().to_string()),
            expires_at: self.expires_at,
            scope: self.scope.clone(),
        };
        let json = serde_json::to_vec(&plain).unwrap_or_default();
        keys.seal(&json, &TokenSet::aad(connection_id))
    }

    pub fn open(sealed: &str, keys: &Keyring, connection_id: &str) -> Result<TokenSet, CryptoError> {
        let json = keys.open(sealed, &TokenSet::aad(connection_id))?;
        let plain: SealedTokens = serde_json::from_slice(&json).map_err(|_| CryptoError::Malformed)?;
        Ok(TokenSet {
            access_token: SecretString::from(plain.access_token),
            token_type: plain.token_type,
            refresh_token: plain.refresh_token.map(SecretString::from),
            expires_at: plain.expires_at,
            scope: plain.scope,
        })
    }
}

/// A failed call to a provider's token or revocation endpoint.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OAuthError {
    /// The provider answered with an RFC 6749 §5.2 error (`invalid_grant`, ...).
    #[error("the provider refused: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Rejected { error: ErrorCode, description: Option<String>, status: u16 },
    /// Worth retrying later: network failure, timeout, 429 or 5xx.
    #[error("{0}")]
    Transient(String),
    /// The provider answered something that is not OAuth.
    #[error("unexpected answer from the provider: {0}")]
    Protocol(String),
    /// Our side is missing something (a client secret).
    #[error("{0}")]
    Config(String),
}

impl OAuthError {
    /// The refresh token (or code) is dead: only a person can fix this, by reconnecting.
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, OAuthError::Rejected { error: ErrorCode::InvalidGrant, .. })
    }
}

/// Which token a revocation names (RFC 7009 §2.1 `token_type_hint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenHint {
    AccessToken,
    RefreshToken,
}

impl TokenHint {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenHint::AccessToken => "access_token",
            TokenHint::RefreshToken => "refresh_token",
        }
    }
}

/// What an authorization-code exchange sends besides the client's credentials.
#[derive(Debug, Clone, Copy)]
pub struct CodeGrant<'a> {
    pub code: &'a AuthorizationCode,
    /// The PKCE verifier (RFC 7636 §4.5), for providers that use PKCE.
    pub verifier: Option<&'a PkceVerifier>,
    /// The same redirect URI the authorization request named (RFC 6749 §4.1.3).
    pub redirect_uri: &'a Url,
}

/// A provider's token and revocation endpoints: the seam between the connection rules
/// and HTTP. [`client::HttpTokenEndpoint`] is the real one; tests pass their own.
#[async_trait]
pub trait TokenEndpoint: Send + Sync {
    /// Exchanges an authorization code (RFC 6749 §4.1.3).
    async fn exchange_code(&self, provider: &Provider, grant: CodeGrant<'_>, now: i64) -> Result<TokenSet, OAuthError>;

    /// Uses a refresh token (RFC 6749 §6). The result holds the provider's new refresh
    /// token, or the one sent when the provider did not rotate it.
    async fn refresh(
        &self,
        provider: &Provider,
        refresh_token: &SecretString,
        now: i64,
    ) -> Result<TokenSet, OAuthError>;

    /// Revokes a token (RFC 7009); a provider without a revocation endpoint is a no-op.
    async fn revoke(&self, provider: &Provider, token: &SecretString, hint: TokenHint) -> Result<(), OAuthError>;
}
