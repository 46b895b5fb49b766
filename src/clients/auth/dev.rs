//! The development issuer (`AUTH_ISSUER=dev`): back-office tokens for a developer's own
//! machine, without an Entra tenant.
//!
//! `handler dev-token` signs a short-lived token (HS256) with a key kept in the app root
//! (`.data/dev-issuer.key`, created on first use, readable by its owner only); the handler
//! accepts exactly those tokens. It is refused at start-up unless `PUBLIC_BASE_URL` is a
//! loopback address, so a deployed or shared instance cannot be configured with it, and
//! the key never leaves the machine that made it.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{AuthError, Caller};

pub use crate::support::config::dev::{AUDIENCE, CLIENT, ISSUER};

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    azp: String,
    sub: String,
    iat: i64,
    exp: i64,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tid: Option<String>,
}

/// The key at `path`, created (32 random bytes, hex, mode 0600) when missing; two
/// processes creating it at once agree on the first one written.
pub fn key(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    if let Ok(text) = std::fs::read_to_string(path) {
        return Ok(text.trim().as_bytes().to_vec());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let fresh = crate::support::crypto::random_hex::<32>();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(mut f) => {
            f.write_all(fresh.as_bytes())?;
            f.sync_all()?;
            Ok(fresh.into_bytes())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Another process is writing it: read it once it is whole.
            for _ in 0..50 {
                let text = std::fs::read_to_string(path)?;
                if text.trim().len() == 64 {
                    return Ok(text.trim().as_bytes().to_vec());
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(std::io::Error::other("the development key file is incomplete"))
        }
        Err(e) => Err(e),
    }
}

/// A development token with `roles` (and a tenant, to try a customer's view), valid for
/// `minutes`.
pub fn mint(
    key: &[u8],
    roles: &[String],
    tenant: Option<&str>,
    minutes: i64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = crate::support::time::now();
    let claims = Claims {
        iss: ISSUER.into(),
        aud: AUDIENCE.into(),
        azp: CLIENT.into(),
        sub: CLIENT.into(),
        iat: now,
        exp: now + minutes.clamp(1, 24 * 60) * 60,
        roles: roles.to_vec(),
        tid: tenant.map(str::to_string),
    };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(key))
}

/// The caller of a development token signed with `key`.
pub fn verify(key: &[u8], token: &str) -> Result<Caller, AuthError> {
    let mut v = Validation::new(Algorithm::HS256);
    v.set_issuer(&[ISSUER]);
    v.set_audience(&[AUDIENCE]);
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    v.leeway = 30;
    let claims = jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(key), &v)
        .map_err(|e| super::jwt::rejection(&e, ISSUER))?
        .claims;
    Ok(Caller {
        client_id: Some(claims.azp.into()),
        subject: Some(claims.sub.into()),
        roles: claims.roles.into(),
        home: claims.tid.is_none(),
        tenant: claims.tid.map(Into::into),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_minted_token_verifies_with_its_key_only() {
        let key = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let token = super::mint(key, &["ops".into()], None, 5).unwrap();
        let caller = super::verify(key, &token).unwrap();
        assert_eq!(
            (caller.client_id.as_deref(), caller.home, &caller.roles[..]),
            (Some(super::CLIENT), true, &["ops".to_string()][..])
        );
        assert!(super::verify(b"another key another key another key another key!", &token).is_err());
    }
}
