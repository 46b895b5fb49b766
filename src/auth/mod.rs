//! Who may call the back-office API: bearer JWTs from one OIDC issuer (Entra ID in
//! production), typically client-credential tokens of Dynamics plug-ins, X++ or Power
//! Automate.
//!
//! The signature is checked against the issuer's JWKS, found through OpenID discovery
//! and cached ([`IssuerKeys`], also used for portal users of an OIDC issuer); a token
//! signed with a key id we have not seen triggers one re-fetch (at most every 30 s, so
//! garbage tokens cannot make us hammer the issuer). The algorithm is pinned to RS256,
//! and issuer, audience, expiry and not-before are checked. Finally the caller must be
//! on an allow-list of client ids (`azp`/`appid`) or hold an allowed app role (`roles`).

pub mod issuer_keys;
pub mod jwt;

use jsonwebtoken::Validation;
use serde::Deserialize;

use crate::config::BackOfficeAuth;
pub use issuer_keys::{IssuerKeys, KeysError};
use jwt::{VerifiedTokens, rejection, rs256_header, rs256_validation};

const LEEWAY_SECS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    /// We cannot verify anything right now (the issuer's keys are unreachable).
    #[error("{0}")]
    Unavailable(String),
}

/// The verified caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub client_id: Option<String>,
    pub subject: Option<String>,
    pub roles: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<i64>,
    /// Entra v2 tokens.
    azp: Option<String>,
    /// Entra v1 tokens.
    appid: Option<String>,
    /// Other issuers' client-credential tokens.
    client_id: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

pub struct BearerVerifier {
    cfg: BackOfficeAuth,
    validation: Validation,
    keys: IssuerKeys,
    verified: VerifiedTokens<Caller>,
}

impl BearerVerifier {
    pub fn new(cfg: BackOfficeAuth, http: reqwest::Client) -> BearerVerifier {
        let validation = rs256_validation(Some(&cfg.issuer.issuer), &cfg.issuer.audiences, LEEWAY_SECS);
        let keys = IssuerKeys::new(&cfg.issuer.issuer, cfg.issuer.jwks_url.clone(), http);
        BearerVerifier { cfg, validation, keys, verified: VerifiedTokens::new() }
    }

    pub fn issuer(&self) -> &str {
        &self.cfg.issuer.issuer
    }

    /// Whether signing keys have been loaded (for health).
    pub fn keys_loaded(&self) -> bool {
        self.keys.loaded()
    }

    /// Loads the signing keys now (for `handler check`); returns how many.
    pub async fn load_keys(&self) -> Result<usize, KeysError> {
        self.keys.load().await
    }

    /// Verifies the `Authorization` header value.
    pub async fn verify(&self, authorization: Option<&str>) -> Result<Caller, AuthError> {
        let token = bearer(authorization)?;
        if let Some(caller) = self.verified.get(token) {
            return Ok(caller);
        }
        let kid = rs256_header(token)?
            .ok_or_else(|| AuthError::Unauthenticated("The bearer token has no key id (kid).".into()))?;
        let key = self.keys.key(&kid).await?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &self.validation)
            .map_err(|e| rejection(&e, &self.cfg.issuer.issuer))?
            .claims;
        let client_id = claims.azp.or(claims.appid).or(claims.client_id);
        let by_client = client_id.as_ref().is_some_and(|c| self.cfg.allowed_client_ids.iter().any(|a| a == c));
        let by_role = claims.roles.iter().any(|r| self.cfg.allowed_roles.contains(r));
        if !by_client && !by_role {
            return Err(AuthError::Forbidden(format!(
                "The caller ({}) is not allowed: it is neither in AUTH_ALLOWED_CLIENT_IDS nor holds a role in AUTH_ALLOWED_ROLES.",
                client_id.as_deref().unwrap_or("no client id")
            )));
        }
        let caller = Caller { client_id, subject: claims.sub, roles: claims.roles };
        self.verified.put(token, caller.clone(), claims.exp);
        Ok(caller)
    }
}

/// Extracts the token from `Authorization: Bearer <token>`.
pub fn bearer(authorization: Option<&str>) -> Result<&str, AuthError> {
    let value = authorization.ok_or_else(|| {
        AuthError::Unauthenticated(
            "Send an access token in the Authorization header: `Authorization: Bearer <token>`.".into(),
        )
    })?;
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Unauthenticated("The Authorization header must use the Bearer scheme.".into()));
    }
    Ok(token.trim())
}
