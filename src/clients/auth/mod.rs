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

use crate::support::config::BackOfficeAuth;
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
    /// The Entra tenant the token was issued in (`tid`); with several tenants accepted
    /// ([`BearerVerifier::accepting_other_tenants`]), the one whose issuer signed it.
    pub tenant: Option<String>,
    /// Issued by `AUTH_ISSUER` itself: a caller of the deployment's own tenant.
    pub home: bool,
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
    iss: Option<String>,
    tid: Option<String>,
}

pub struct BearerVerifier {
    cfg: BackOfficeAuth,
    validation: Validation,
    keys: IssuerKeys,
    verified: VerifiedTokens<Caller>,
    /// `AUTH_ISSUER` split around its tenant segment, when tokens of other tenants are
    /// accepted: `https://login.microsoftonline.com/` and `/v2.0`.
    tenant_issuer: Option<(String, String)>,
}

impl BearerVerifier {
    pub fn new(cfg: BackOfficeAuth, http: reqwest::Client) -> BearerVerifier {
        let validation = rs256_validation(Some(&cfg.issuer.issuer), &cfg.issuer.audiences, LEEWAY_SECS);
        let keys = IssuerKeys::new(&cfg.issuer.issuer, cfg.issuer.jwks_url.clone(), http);
        BearerVerifier { cfg, validation, keys, verified: VerifiedTokens::new(), tenant_issuer: None }
    }

    /// Also accepts tokens issued in other Entra tenants, for a multi-tenant deployment
    /// whose customers call it: the issuer must be `AUTH_ISSUER` with the token's own
    /// `tid` in place of the tenant segment (Entra signs every tenant's tokens with the
    /// same keys, so `AUTH_ISSUER`'s key set serves). Which tenants may reach what is the
    /// caller's business, from [`Caller::tenant`].
    pub fn accepting_other_tenants(mut self) -> BearerVerifier {
        if let Ok(url) = url::Url::parse(&self.cfg.issuer.issuer)
            && let Some(first) = url.path_segments().and_then(|mut s| s.next()).filter(|s| !s.is_empty())
        {
            let iss = &self.cfg.issuer.issuer;
            if let Some(at) = iss.find(&format!("/{first}")) {
                self.tenant_issuer = Some((iss[..at + 1].to_string(), iss[at + 1 + first.len()..].to_string()));
                let mut validation = self.validation.clone();
                validation.iss = None;
                self.validation = validation;
            }
        }
        self
    }

    /// Whether `iss` is one this verifier accepts for a token naming tenant `tid`.
    fn issuer_accepted(&self, iss: Option<&str>, tid: Option<&str>) -> bool {
        let Some(iss) = iss else { return false };
        if iss == self.cfg.issuer.issuer {
            return true;
        }
        match (&self.tenant_issuer, tid) {
            (Some((before, after)), Some(tid)) => {
                crate::support::config::is_guid(tid)
                    && iss.len() == before.len() + tid.len() + after.len()
                    && iss.starts_with(before.as_str())
                    && iss.ends_with(after.as_str())
                    && &iss[before.len()..before.len() + tid.len()] == tid
            }
            _ => false,
        }
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
        if self.tenant_issuer.is_some() && !self.issuer_accepted(claims.iss.as_deref(), claims.tid.as_deref()) {
            return Err(AuthError::Unauthenticated(format!(
                "The bearer token was issued by {}, which is neither {} nor that issuer for the token's own tenant.",
                claims.iss.as_deref().unwrap_or("no issuer"),
                self.cfg.issuer.issuer
            )));
        }
        let client_id = claims.azp.or(claims.appid).or(claims.client_id);
        let by_client = client_id.as_ref().is_some_and(|c| self.cfg.allowed_client_ids.iter().any(|a| a == c));
        let by_role = claims.roles.iter().any(|r| self.cfg.allowed_roles.contains(r));
        if !by_client && !by_role {
            return Err(AuthError::Forbidden(format!(
                "The caller ({}) is not allowed: it is neither in AUTH_ALLOWED_CLIENT_IDS nor holds a role in AUTH_ALLOWED_ROLES.",
                client_id.as_deref().unwrap_or("no client id")
            )));
        }
        let home = self.tenant_issuer.is_none() || claims.iss.as_deref() == Some(self.cfg.issuer.issuer.as_str());
        let caller = Caller { client_id, subject: claims.sub, roles: claims.roles, tenant: claims.tid, home };
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
