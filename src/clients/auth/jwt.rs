//! The JWT checks every bearer-token verifier shares (back office, Power Pages, a portal
//! OIDC issuer): RS256 pinned before any key is looked up, the validation rules, the
//! 401 wording, the one unverified segment decoder, and the cache of verified tokens.

use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};
use sha2::Digest;

use super::AuthError;
use crate::support::cache::Cache;

/// The JWT's parts we read before its signature is checked.
#[derive(Debug, Clone, Copy)]
pub enum Segment {
    Header = 0,
    Payload = 1,
}

/// One segment of a JWT as a JSON object, **unverified**: only for choosing how to
/// verify (`alg`, `iss`) or for a provider's own access token (`exp`), never to trust.
pub fn unverified(token: &str, segment: Segment) -> Option<Map<String, Value>> {
    let part = token.split('.').nth(segment as usize)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// Checks that a token is an RS256 JWT and returns its `kid`, before any key is looked up.
/// `alg` is read as text first: `none` and unknown algorithms are not even variants of
/// jsonwebtoken's enum, and the caller deserves to hear which one was refused.
pub fn rs256_header(token: &str) -> Result<Option<String>, AuthError> {
    let malformed = || AuthError::Unauthenticated("The bearer token is not a well-formed JWT.".into());
    let header = unverified(token, Segment::Header).ok_or_else(malformed)?;
    let alg = header.get("alg").and_then(Value::as_str).ok_or_else(malformed)?;
    if alg != "RS256" {
        return Err(AuthError::Unauthenticated(format!(
            "The bearer token is signed with {alg:?}; only RS256 is accepted."
        )));
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| malformed())?;
    Ok(header.kid)
}

/// A JWT validation failure, said for the person reading the 401.
pub fn rejection(e: &jsonwebtoken::errors::Error, issuer: &str) -> AuthError {
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
pub fn rs256_validation(issuer: Option<&str>, audiences: &[String], leeway: u64) -> Validation {
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
/// `exp`, at most [`VERIFIED_TTL`]; failures are never cached. Keyed by the token's
/// SHA-256 (bounded memory whatever the token sizes), and bounded in number: a flood of
/// distinct tokens evicts the least recently used, not everyone's.
pub struct VerifiedTokens<T> {
    entries: Cache<[u8; 32], T>,
}

const VERIFIED_TTL: Duration = Duration::from_secs(600);
const VERIFIED_MAX: usize = 10_000;

impl<T: Clone> VerifiedTokens<T> {
    pub fn new() -> VerifiedTokens<T> {
        VerifiedTokens { entries: Cache::new(VERIFIED_MAX) }
    }

    pub fn get(&self, token: &str) -> Option<T> {
        self.entries.get(&key(token))
    }

    pub fn put(&self, token: &str, value: T, exp: Option<i64>) {
        let left = exp.map(|e| e.saturating_sub(crate::support::time::now())).unwrap_or(0).max(0) as u64;
        self.entries.insert(key(token), value, Duration::from_secs(left).min(VERIFIED_TTL));
    }
}

impl<T: Clone> Default for VerifiedTokens<T> {
    fn default() -> Self {
        Self::new()
    }
}

fn key(token: &str) -> [u8; 32] {
    sha2::Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_segments_without_verifying() {
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!("{}.{}.sig", enc(r#"{"alg":"none"}"#), enc(r#"{"iss":"x","exp":5}"#));
        assert_eq!(unverified(&token, Segment::Header).unwrap()["alg"], "none");
        assert_eq!(unverified(&token, Segment::Payload).unwrap()["exp"], 5);
        assert!(unverified("not-a-jwt", Segment::Payload).is_none());
        assert!(matches!(rs256_header(&token), Err(AuthError::Unauthenticated(m)) if m.contains("\"none\"")));
    }
}
