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

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::RwLock;
use url::Url;

use crate::config::{BackOfficeAuth, parse_service_url};

const REFETCH_INTERVAL: Duration = Duration::from_secs(30);
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

/// An OIDC issuer's signing keys, from its JWKS, cached by key id.
pub struct IssuerKeys {
    issuer: String,
    jwks_url: Option<Url>,
    http: reqwest::Client,
    keys: RwLock<Option<(HashMap<String, DecodingKey>, Instant)>>,
}

impl IssuerKeys {
    /// `jwks_url` overrides OpenID discovery on the issuer.
    pub fn new(issuer: &str, jwks_url: Option<Url>, http: reqwest::Client) -> IssuerKeys {
        IssuerKeys { issuer: issuer.to_string(), jwks_url, http, keys: RwLock::new(None) }
    }

    pub async fn loaded(&self) -> bool {
        self.keys.read().await.is_some()
    }

    /// Loads the keys now; returns how many.
    pub async fn load(&self) -> Result<usize, String> {
        let keys = self.fetch().await?;
        let n = keys.len();
        *self.keys.write().await = Some((keys, Instant::now()));
        Ok(n)
    }

    /// The key with this id, fetching the JWKS when the id is unknown (rate-limited).
    pub async fn key(&self, kid: &str) -> Result<DecodingKey, AuthError> {
        if let Some((keys, _)) = self.keys.read().await.as_ref()
            && let Some(k) = keys.get(kid)
        {
            return Ok(k.clone());
        }
        let mut keys = self.keys.write().await;
        // Another request may have fetched while we waited for the write lock.
        if let Some(k) = keys.as_ref().and_then(|(k, _)| k.get(kid)) {
            return Ok(k.clone());
        }
        let may_fetch = keys.as_ref().is_none_or(|(_, fetched)| fetched.elapsed() >= REFETCH_INTERVAL);
        if may_fetch {
            match self.fetch().await {
                Ok(fresh) => *keys = Some((fresh, Instant::now())),
                Err(e) if keys.is_none() => return Err(AuthError::Unavailable(e)),
                Err(e) => tracing::warn!("could not refresh the signing keys of {}: {e}", self.issuer),
            }
        }
        keys.as_ref().and_then(|(k, _)| k.get(kid).cloned()).ok_or_else(|| {
            AuthError::Unauthenticated("The bearer token is signed with a key the issuer does not publish.".into())
        })
    }

    async fn fetch(&self) -> Result<HashMap<String, DecodingKey>, String> {
        let jwks_url = match &self.jwks_url {
            Some(u) => u.clone(),
            None => self.discover().await?,
        };
        let set: JwkSet = get_json(&self.http, &jwks_url).await?;
        let mut by_kid = HashMap::new();
        for jwk in &set.keys {
            let (Some(kid), Ok(key)) = (jwk.common.key_id.clone(), DecodingKey::from_jwk(jwk)) else {
                continue;
            };
            by_kid.insert(kid, key);
        }
        if by_kid.is_empty() {
            return Err(format!("the JWKS at {jwks_url} has no usable keys"));
        }
        tracing::info!(keys = by_kid.len(), issuer = %self.issuer, "loaded signing keys");
        Ok(by_kid)
    }

    async fn discover(&self) -> Result<Url, String> {
        #[derive(Deserialize)]
        struct Discovery {
            jwks_uri: String,
        }
        let base = self.issuer.trim_end_matches('/');
        let url = Url::parse(&format!("{base}/.well-known/openid-configuration")).map_err(|e| e.to_string())?;
        let doc: Discovery = get_json(&self.http, &url).await?;
        parse_service_url(&doc.jwks_uri).map_err(|e| format!("the discovery document's jwks_uri {e}"))
    }
}

pub(crate) async fn get_json<T: serde::de::DeserializeOwned>(http: &reqwest::Client, url: &Url) -> Result<T, String> {
    let resp = crate::http::upstream(http.get(url.clone()).send())
        .await
        .map_err(|e| format!("{url} did not answer: {}", crate::oauth::client::describe(e)))?;
    if !resp.status().is_success() {
        return Err(format!("{url} answered {}", resp.status()));
    }
    resp.json()
        .await
        .map_err(|e| format!("{url} did not return the expected JSON: {}", crate::oauth::client::describe(e)))
}

/// Checks that a token is an RS256 JWT and returns its `kid`, before any key is looked up.
/// `alg` is read as text first: `none` and unknown algorithms are not even variants of
/// jsonwebtoken's enum, and the caller deserves to hear which one was refused.
pub(crate) fn rs256_header(token: &str) -> Result<Option<String>, AuthError> {
    let alg = raw_alg(token)
        .ok_or_else(|| AuthError::Unauthenticated("The bearer token is not a well-formed JWT.".into()))?;
    if alg != "RS256" {
        return Err(AuthError::Unauthenticated(format!(
            "The bearer token is signed with {alg:?}; only RS256 is accepted."
        )));
    }
    let header = jsonwebtoken::decode_header(token)
        .map_err(|_| AuthError::Unauthenticated("The bearer token is not a well-formed JWT.".into()))?;
    Ok(header.kid)
}

/// A JWT validation failure, said for the person reading the 401.
pub(crate) fn describe_jwt_error(e: &jsonwebtoken::errors::Error, issuer: &str) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    AuthError::Unauthenticated(match e.kind() {
        K::ExpiredSignature => "The bearer token has expired.".into(),
        K::ImmatureSignature => "The bearer token is not valid yet (nbf).".into(),
        K::InvalidAudience => "The bearer token is for another audience.".into(),
        K::InvalidIssuer => format!("The bearer token was not issued by {issuer}."),
        K::InvalidSignature => "The bearer token's signature is not valid.".into(),
        K::MissingRequiredClaim(c) => format!("The bearer token has no {c} claim."),
        _ => format!("The bearer token is not valid: {e}."),
    })
}

/// RS256 validation of issuer, audience, expiry and not-before.
pub(crate) fn rs256_validation(issuer: Option<&str>, audiences: &[String], leeway: u64) -> Validation {
    let mut validation = Validation::new(Algorithm::RS256);
    if let Some(iss) = issuer {
        validation.set_issuer(&[iss]);
    }
    validation.set_audience(audiences);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation.validate_nbf = true;
    validation.leeway = leeway;
    validation
}

/// Tokens already verified, so a caller reusing its token (as every client does until it
/// expires) costs a map lookup, not an RSA verification. An entry lives until the token's
/// `exp`, at most [`VERIFIED_TTL_SECS`]; failures are never cached.
pub struct VerifiedTokens<T> {
    /// Keyed by the token's SHA-256: bounded memory whatever the token sizes.
    entries: std::sync::RwLock<HashMap<[u8; 32], (T, i64)>>,
}

fn token_key(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

const VERIFIED_TTL_SECS: i64 = 600;
const VERIFIED_MAX: usize = 10_000;

impl<T: Clone> VerifiedTokens<T> {
    pub fn new() -> VerifiedTokens<T> {
        VerifiedTokens { entries: std::sync::RwLock::new(HashMap::new()) }
    }

    pub fn get(&self, token: &str) -> Option<T> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let (value, until) = entries.get(&token_key(token))?;
        (*until > crate::time::now()).then(|| value.clone())
    }

    pub fn put(&self, token: &str, value: T, exp: Option<i64>) {
        let now = crate::time::now();
        let until = exp.unwrap_or(now).min(now + VERIFIED_TTL_SECS);
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= VERIFIED_MAX {
            entries.retain(|_, (_, u)| *u > now);
            if entries.len() >= VERIFIED_MAX {
                entries.clear();
            }
        }
        entries.insert(token_key(token), (value, until));
    }
}

impl<T: Clone> Default for VerifiedTokens<T> {
    fn default() -> Self {
        Self::new()
    }
}

pub struct BearerVerifier {
    cfg: BackOfficeAuth,
    validation: Validation,
    keys: IssuerKeys,
    verified: VerifiedTokens<Caller>,
}

impl BearerVerifier {
    pub fn new(cfg: BackOfficeAuth, http: reqwest::Client) -> BearerVerifier {
        let validation = rs256_validation(Some(&cfg.issuer), &cfg.audiences, LEEWAY_SECS);
        let keys = IssuerKeys::new(&cfg.issuer, cfg.jwks_url.clone(), http);
        BearerVerifier { cfg, validation, keys, verified: VerifiedTokens::new() }
    }

    pub fn issuer(&self) -> &str {
        &self.cfg.issuer
    }

    /// Whether signing keys have been loaded (for health).
    pub async fn keys_loaded(&self) -> bool {
        self.keys.loaded().await
    }

    /// Loads the signing keys now (for `handler check`); returns how many.
    pub async fn load_keys(&self) -> Result<usize, String> {
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
            .map_err(|e| describe_jwt_error(&e, &self.cfg.issuer))?
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

/// The `alg` of a JWT's header, unverified.
fn raw_alg(token: &str) -> Option<String> {
    use base64::Engine;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header.trim_end_matches('=')).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("alg")?.as_str().map(str::to_string)
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
