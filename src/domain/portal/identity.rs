//! Who the portal user is.
//!
//! Power Pages issues an implicit-grant JWT (`/_services/auth/token`) signed RS256 with
//! the site's key, published as PEM at `/_services/auth/publickey` (there is no JWKS).
//! Its `iss` is the site's host name (no scheme), `aud` the registered client id, `sub`
//! the contact id. The key is cached; when a signature does not verify the key is
//! fetched again, at most once a minute, in case the site's certificate was replaced.
//!
//! A site signing users in with Azure AD B2C or Entra External ID can be trusted instead
//! (or as well): that issuer's keys come from its JWKS, and a configured claim carries
//! the contact id. A token without that claim is still a verified person, [`Verified::
//! Unmapped`]: [`crate::domain::portal::Portal::user`] then finds their contact in Dynamics.

use std::time::Duration;

use jsonwebtoken::{DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::clients::auth::jwt::{Segment, VerifiedTokens, rejection, rs256_header, rs256_validation, unverified};
use crate::clients::auth::{AuthError, IssuerKeys, bearer};
use crate::support::cache::Cache;
use crate::support::config::{PortalConfig, PortalOidcConfig, PowerPagesConfig};
use crate::support::outbound;

/// Power Pages tokens live 15 minutes; clocks on both sides are Azure's.
const LEEWAY_SECS: u64 = 30;
const PEM_REFETCH: Duration = Duration::from_secs(60);
/// The key stays until a signature fails to verify with it; freshness plays no part.
const KEEP: Duration = Duration::from_secs(365 * 24 * 3600);

/// A verified portal user.
#[derive(Debug, Clone)]
pub struct PortalUser {
    /// The Dataverse contact id (lower-case GUID).
    pub contact_id: String,
    pub name: Option<String>,
    pub email: Option<String>,
}

/// What a verified token says about its holder.
#[derive(Debug, Clone)]
pub enum Verified {
    /// The token names the contact.
    User(PortalUser),
    /// A person of the OIDC issuer whose token does not name a contact.
    Unmapped(ExternalUser),
}

/// A person signed in by the portal's OIDC issuer, to be mapped to a contact.
#[derive(Debug, Clone)]
pub struct ExternalUser {
    pub issuer: String,
    pub subject: String,
    /// The value of the lookup claim (`PORTAL_OIDC_LOOKUP_CLAIM`, e.g. the email), if set.
    pub lookup: Option<String>,
    /// The contact claim the token lacked, for the error message.
    pub missing_claim: String,
    pub name: Option<String>,
    pub email: Option<String>,
}

struct PowerPages {
    cfg: PowerPagesConfig,
    http: reqwest::Client,
    validation: Validation,
    key: Cache<(), DecodingKey>,
}

struct Oidc {
    cfg: PortalOidcConfig,
    keys: IssuerKeys,
    validation: Validation,
}

pub struct PortalVerifier {
    power_pages: Option<PowerPages>,
    oidc: Option<Oidc>,
    verified: VerifiedTokens<Verified>,
}

impl PortalVerifier {
    pub fn new(cfg: &PortalConfig, http: reqwest::Client) -> PortalVerifier {
        let power_pages = cfg.power_pages.clone().map(|pp| {
            // `iss` is compared by hand: it is a bare host name, compared without case.
            let mut validation = rs256_validation(None, std::slice::from_ref(&pp.client_id), LEEWAY_SECS);
            validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            PowerPages { cfg: pp, http: http.clone(), validation, key: Cache::new(1) }
        });
        let oidc = cfg.oidc.clone().map(|o| Oidc {
            keys: IssuerKeys::new(&o.issuer.issuer, o.issuer.jwks_url.clone(), http.clone()),
            validation: rs256_validation(Some(&o.issuer.issuer), &o.issuer.audiences, LEEWAY_SECS),
            cfg: o,
        });
        PortalVerifier { power_pages, oidc, verified: VerifiedTokens::new() }
    }

    /// Verifies the `Authorization` header of a portal request.
    pub async fn verify(&self, authorization: Option<&str>) -> Result<Verified, AuthError> {
        let token = bearer(authorization)?;
        if let Some(user) = self.verified.get(token) {
            return Ok(user);
        }
        let (user, exp) = self.verify_uncached(token).await?;
        self.verified.put(token, user.clone(), exp);
        Ok(user)
    }

    async fn verify_uncached(&self, token: &str) -> Result<(Verified, Option<i64>), AuthError> {
        let kid = rs256_header(token)?;
        let payload = unverified(token, Segment::Payload).unwrap_or_default();
        let iss = payload.get("iss").and_then(Value::as_str).unwrap_or_default();
        if let Some(pp) = &self.power_pages
            && iss.eq_ignore_ascii_case(&pp.cfg.host)
        {
            return pp.verify(token).await.map(|(u, exp)| (Verified::User(u), exp));
        }
        if let Some(o) = &self.oidc
            && iss == o.cfg.issuer.issuer
        {
            let kid = kid.ok_or_else(|| AuthError::Unauthenticated("The bearer token has no key id (kid).".into()))?;
            let key = o.keys.key(&kid).await?;
            let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &o.validation)
                .map_err(|e| rejection(&e, &o.cfg.issuer.issuer))?
                .claims;
            if let Some(contact) = claims.get(&o.cfg.contact_claim).and_then(Value::as_str) {
                return Ok((Verified::User(user(contact, &claims)?), exp_of(&claims)));
            }
            let text = |k: &str| claims.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
            let subject = text("sub").ok_or_else(|| {
                AuthError::Unauthenticated(format!(
                    "The token has neither a {} claim nor a subject.",
                    o.cfg.contact_claim
                ))
            })?;
            let external = ExternalUser {
                issuer: o.cfg.issuer.issuer.clone(),
                subject,
                lookup: o.cfg.lookup.as_ref().and_then(|l| text(&l.claim)),
                missing_claim: o.cfg.contact_claim.clone(),
                name: text("name"),
                email: text("email").or_else(|| text("emails")),
            };
            return Ok((Verified::Unmapped(external), exp_of(&claims)));
        }
        Err(AuthError::Unauthenticated(
            "The bearer token was not issued by this portal or its identity provider.".into(),
        ))
    }
}

impl PowerPages {
    async fn verify(&self, token: &str) -> Result<(PortalUser, Option<i64>), AuthError> {
        let (key, age) = self.key(false).await?;
        let claims = match jsonwebtoken::decode::<Map<String, Value>>(token, &key, &self.validation) {
            Ok(data) => data.claims,
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature) && age >= PEM_REFETCH => {
                // The site may have a new certificate: fetch the key once more.
                let (key, _) = self.key(true).await?;
                jsonwebtoken::decode::<Map<String, Value>>(token, &key, &self.validation)
                    .map_err(|e| rejection(&e, &self.cfg.host))?
                    .claims
            }
            Err(e) => return Err(rejection(&e, &self.cfg.host)),
        };
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or_default();
        if !iss.eq_ignore_ascii_case(&self.cfg.host) {
            return Err(AuthError::Unauthenticated(format!("The bearer token was not issued by {}.", self.cfg.host)));
        }
        let sub = claims.get("sub").and_then(Value::as_str).unwrap_or_default();
        Ok((user(sub, &claims)?, exp_of(&claims)))
    }

    /// The site's public key, fetched on first use or when `refetch` (at most once a
    /// [`PEM_REFETCH`]); a failed re-read keeps the key we have.
    async fn key(&self, refetch: bool) -> Result<(DecodingKey, Duration), AuthError> {
        let usable = |refetch: bool| {
            self.key.get_stale(&()).filter(|s| !refetch || s.age < PEM_REFETCH).map(|s| (s.value, s.age))
        };
        if let Some(found) = usable(refetch) {
            return Ok(found);
        }
        self.key
            .exclusive(&(), || async {
                if let Some(found) = usable(refetch) {
                    return Ok(found);
                }
                let url = self
                    .cfg
                    .url
                    .join("/_services/auth/publickey")
                    .map_err(|e| AuthError::Unavailable(e.to_string()))?;
                match self.fetch(&url).await {
                    Ok(key) => {
                        self.key.insert((), key.clone(), KEEP);
                        tracing::info!(portal = %self.cfg.host, "loaded the portal's public key");
                        Ok((key, Duration::ZERO))
                    }
                    Err(e) => match usable(false) {
                        Some(found) => {
                            tracing::warn!(
                                "the portal's public key could not be re-read ({url} {e}); keeping the cached one"
                            );
                            Ok(found)
                        }
                        None => {
                            Err(AuthError::Unavailable(format!("the portal's public key could not be read: {url} {e}")))
                        }
                    },
                }
            })
            .await
    }

    async fn fetch(&self, url: &url::Url) -> Result<DecodingKey, KeyFetchError> {
        let unreachable = |e| KeyFetchError::Unreachable(outbound::error_text(e));
        let resp = outbound::upstream(outbound::send(self.http.get(url.clone()))).await.map_err(unreachable)?;
        if !resp.status().is_success() {
            return Err(KeyFetchError::Status(resp.status().as_u16()));
        }
        let pem = outbound::upstream(resp.text()).await.map_err(unreachable)?;
        DecodingKey::from_rsa_pem(pem.trim().as_bytes()).map_err(KeyFetchError::NotRsaPem)
    }
}

/// Why the portal's public key could not be read (the sentence follows its URL).
#[derive(Debug, thiserror::Error)]
enum KeyFetchError {
    #[error("{0}")]
    Unreachable(String),
    #[error("answered {0}")]
    Status(u16),
    #[error("is not an RSA public key in PEM: {0}")]
    NotRsaPem(jsonwebtoken::errors::Error),
}

fn exp_of(claims: &Map<String, Value>) -> Option<i64> {
    claims.get("exp").and_then(Value::as_i64)
}

fn user(contact: &str, claims: &Map<String, Value>) -> Result<PortalUser, AuthError> {
    let contact_id = normalize_guid(contact)
        .ok_or_else(|| AuthError::Unauthenticated("The token's subject is not a contact id (a GUID).".into()))?;
    let text = |k: &str| claims.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
    let name = text("name").or_else(|| match (text("given_name"), text("family_name")) {
        (Some(g), Some(f)) => Some(format!("{g} {f}")),
        (g, f) => g.or(f),
    });
    Ok(PortalUser { contact_id, name, email: text("email") })
}

/// A GUID in its canonical lower-case form, or `None`.
pub fn normalize_guid(s: &str) -> Option<String> {
    let s = s.trim().trim_start_matches('{').trim_end_matches('}');
    let parts: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    (parts.len() == 5 && parts.iter().zip(lens).all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit())))
        .then(|| s.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::normalize_guid;

    #[test]
    fn guids_are_normalized() {
        assert_eq!(
            normalize_guid("{6E2F0D4A-1B2C-4D5E-8F90-0A1B2C3D4E5F}").as_deref(),
            Some("6e2f0d4a-1b2c-4d5e-8f90-0a1b2c3d4e5f")
        );
        assert!(normalize_guid("not-a-guid").is_none());
        assert!(normalize_guid("6e2f0d4a1b2c4d5e8f900a1b2c3d4e5f").is_none());
    }
}
