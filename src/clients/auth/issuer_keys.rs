//! An OIDC issuer's signing keys, from its JWKS (found through OpenID discovery unless
//! configured), cached by key id.
//!
//! A token signed with a key id we have not seen triggers one re-fetch, at most every
//! [`REFETCH_INTERVAL`], so garbage tokens cannot make us hammer the issuer; when a
//! re-fetch fails the keys we have keep working, and a failed first fetch is remembered
//! for [`FAILED_FETCH_TTL`]. The fetch runs under the cache's single-fetch turn, never
//! under a lock that readers of known keys wait on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::JwkSet;
use serde::Deserialize;
use url::Url;

use super::AuthError;
use crate::support::cache::Cache;
use crate::support::config::parse_service_url;
use crate::support::outbound;

const REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// After a failed fetch with no keys at all, how long callers are told "unavailable"
/// without another fetch: an issuer outage costs one fetch per interval, not one per
/// bad token.
const FAILED_FETCH_TTL: Duration = Duration::from_secs(5);
/// Keys stay until a token names one we do not have; freshness plays no part.
const KEEP: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why the keys could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeysError {
    #[error("{url} did not answer: {reason}")]
    Unreachable { url: Url, reason: String },
    #[error("{url} answered {status}")]
    Status { url: Url, status: u16 },
    #[error("{url} did not return the expected JSON: {reason}")]
    Body { url: Url, reason: String },
    #[error("the discovery document's jwks_uri {0}")]
    JwksUri(String),
    #[error("the JWKS at {0} has no usable keys")]
    NoKeys(Url),
}

type KeySet = Arc<HashMap<String, DecodingKey>>;

pub struct IssuerKeys {
    issuer: String,
    jwks_url: Option<Url>,
    http: reqwest::Client,
    keys: Cache<(), KeySet>,
    /// The last fetch, while it still counts: `None` after a success, the error after a
    /// failure. While it is fresh no new fetch is made.
    attempted: Cache<(), Option<String>>,
}

impl IssuerKeys {
    /// `jwks_url` overrides OpenID discovery on the issuer.
    pub fn new(issuer: &str, jwks_url: Option<Url>, http: reqwest::Client) -> IssuerKeys {
        IssuerKeys { issuer: issuer.to_string(), jwks_url, http, keys: Cache::new(1), attempted: Cache::new(1) }
    }

    pub fn loaded(&self) -> bool {
        self.keys.get_stale(&()).is_some()
    }

    /// Loads the keys now; returns how many.
    pub async fn load(&self) -> Result<usize, KeysError> {
        // Under the same turn as a request's fetch: a request arriving while the keys load
        // waits for them instead of fetching them again.
        self.keys.exclusive(&(), || self.load_now()).await
    }

    async fn load_now(&self) -> Result<usize, KeysError> {
        match self.fetch().await {
            Ok(keys) => {
                let n = keys.len();
                self.keys.insert((), keys, KEEP);
                self.attempted.insert((), None, REFETCH_INTERVAL);
                Ok(n)
            }
            Err(e) => {
                if self.keys.get_stale(&()).is_none() {
                    self.attempted.insert((), Some(e.to_string()), FAILED_FETCH_TTL);
                }
                Err(e)
            }
        }
    }

    /// The key with this id, fetching the JWKS when the id is unknown (rate-limited).
    pub async fn key(&self, kid: &str) -> Result<DecodingKey, AuthError> {
        if let Some(k) = self.known(kid) {
            return Ok(k);
        }
        if self.attempted.get(&()).is_none() {
            self.keys
                .exclusive(&(), || async {
                    // Another request may have fetched while we waited for the turn.
                    if self.known(kid).is_some() || self.attempted.get(&()).is_some() {
                        return;
                    }
                    match self.fetch().await {
                        Ok(fresh) => {
                            self.keys.insert((), fresh, KEEP);
                            self.attempted.insert((), None, REFETCH_INTERVAL);
                        }
                        Err(e) => {
                            let have_keys = self.keys.get_stale(&()).is_some();
                            if have_keys {
                                tracing::warn!("could not refresh the signing keys of {}: {e}", self.issuer);
                            }
                            let ttl = if have_keys { REFETCH_INTERVAL } else { FAILED_FETCH_TTL };
                            self.attempted.insert((), Some(e.to_string()), ttl);
                        }
                    }
                })
                .await;
        }
        if let Some(k) = self.known(kid) {
            return Ok(k);
        }
        match (self.keys.get_stale(&()), self.attempted.get(&()).flatten()) {
            (None, Some(failure)) => Err(AuthError::Unavailable(failure)),
            (None, None) => Err(AuthError::Unavailable(format!("the signing keys of {} are not loaded", self.issuer))),
            (Some(_), _) => Err(AuthError::Unauthenticated(
                "The bearer token is signed with a key the issuer does not publish.".into(),
            )),
        }
    }

    fn known(&self, kid: &str) -> Option<DecodingKey> {
        self.keys.get_stale(&()).and_then(|s| s.value.get(kid).cloned())
    }

    async fn fetch(&self) -> Result<KeySet, KeysError> {
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
            return Err(KeysError::NoKeys(jwks_url));
        }
        tracing::info!(keys = by_kid.len(), issuer = %self.issuer, "loaded signing keys");
        Ok(Arc::new(by_kid))
    }

    async fn discover(&self) -> Result<Url, KeysError> {
        #[derive(Deserialize)]
        struct Discovery {
            jwks_uri: String,
        }
        let base = self.issuer.trim_end_matches('/');
        let url = Url::parse(&format!("{base}/.well-known/openid-configuration"))
            .map_err(|e| KeysError::JwksUri(format!("cannot be built from the issuer: {e}")))?;
        let doc: Discovery = get_json(&self.http, &url).await?;
        parse_service_url(&doc.jwks_uri).map_err(|e| KeysError::JwksUri(e.to_string()))
    }
}

async fn get_json<T: serde::de::DeserializeOwned>(http: &reqwest::Client, url: &Url) -> Result<T, KeysError> {
    let resp = outbound::upstream(outbound::send(http.get(url.clone())))
        .await
        .map_err(|e| KeysError::Unreachable { url: url.clone(), reason: outbound::error_text(e) })?;
    if !resp.status().is_success() {
        return Err(KeysError::Status { url: url.clone(), status: resp.status().as_u16() });
    }
    outbound::upstream(resp.json())
        .await
        .map_err(|e| KeysError::Body { url: url.clone(), reason: outbound::error_text(e) })
}
