//! The `state` this service issues (`dc1.<payload>.<mac>`), and the capture-mode states
//! Dynamics signs with a shared key (`dcx1.`): their signing and checking. The store keeps
//! only a state's hash; the MAC lets the callback tell a state that was altered or expired
//! from one we never issued (capture mode) before touching the store.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use sha2::{Digest, Sha256};

use super::{Keyring, constant_time_eq, hmac, random_bytes, sha256_hex};

pub(super) const STATE_PREFIX: &str = "dc1.";
const STATE_NONCE_LEN: usize = 32;
const STATE_TAG_LEN: usize = 8;
const STATE_MAC_LEN: usize = 16;
/// A scope is a tenant id (36 characters); more is refused.
const MAX_SCOPE_LEN: usize = 64;

impl Keyring {
    /// Issues a `state` for a connection, valid until `expires_at` (Unix seconds).
    pub fn issue_state(&self, connection_id: &str, expires_at: i64) -> String {
        self.issue_scoped_state(None, connection_id, expires_at)
    }

    /// Issues a `state` that also names, under the signature, where its connection lives
    /// (a customer tenant's id), so the callback knows which store to look in.
    pub fn issue_scoped_state(&self, scope: Option<&str>, connection_id: &str, expires_at: i64) -> String {
        let ring = self.ring();
        let key = &ring.keys[0];
        let mut payload = Vec::with_capacity(1 + key.id.len() + 8 + STATE_TAG_LEN + STATE_NONCE_LEN);
        payload.push(key.id.len() as u8);
        payload.extend_from_slice(key.id.as_bytes());
        payload.extend_from_slice(&(expires_at as u64).to_be_bytes());
        payload.extend_from_slice(&connection_tag(connection_id));
        payload.extend_from_slice(&random_bytes::<STATE_NONCE_LEN>());
        if let Some(scope) = scope {
            payload.extend_from_slice(&scope.as_bytes()[..scope.len().min(MAX_SCOPE_LEN)]);
        }
        let mac = hmac(&key.state_mac, &[&payload]);
        format!("{STATE_PREFIX}{}.{}", B64URL.encode(&payload), B64URL.encode(&mac[..STATE_MAC_LEN]))
    }

    /// A secret derived from a state we issued, with the key that signed it: a PKCE
    /// verifier that needs no storage, since only this service can compute it again from
    /// the state. `None` for a state that is not ours.
    pub fn derive_from_state(&self, state: &str, label: &str) -> Option<String> {
        let payload = B64URL.decode(state.strip_prefix(STATE_PREFIX)?.split_once('.')?.0).ok()?;
        let id_len = *payload.first()? as usize;
        let id = std::str::from_utf8(payload.get(1..1 + id_len)?).ok()?;
        let ring = self.ring();
        let key = ring.by_id.get(id).map(|&i| &ring.keys[i])?;
        Some(B64URL.encode(hmac(&key.state_mac, &[b"derived/", label.as_bytes(), b"/", state.as_bytes()])))
    }

    /// Checks a `state` from the callback without touching the store.
    pub fn verify_state(&self, state: &str, now: i64) -> Result<VerifiedState, StateError> {
        let Some(rest) = state.strip_prefix(STATE_PREFIX) else {
            return Err(StateError::NotOurs);
        };
        let (payload_b64, mac_b64) = rest.split_once('.').ok_or(StateError::Tampered)?;
        let payload = B64URL.decode(payload_b64).map_err(|_| StateError::Tampered)?;
        let mac = B64URL.decode(mac_b64).map_err(|_| StateError::Tampered)?;
        let id_len = *payload.first().ok_or(StateError::Tampered)? as usize;
        let fixed = 1 + id_len + 8 + STATE_TAG_LEN + STATE_NONCE_LEN;
        if payload.len() < fixed || payload.len() > fixed + MAX_SCOPE_LEN || mac.len() != STATE_MAC_LEN {
            return Err(StateError::Tampered);
        }
        let id = std::str::from_utf8(&payload[1..1 + id_len]).map_err(|_| StateError::Tampered)?;
        let ring = self.ring();
        let key = ring.by_id.get(id).map(|&i| &ring.keys[i]).ok_or(StateError::Tampered)?;
        let expected = hmac(&key.state_mac, &[&payload]);
        if !constant_time_eq(&expected[..STATE_MAC_LEN], &mac) {
            return Err(StateError::Tampered);
        }
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&payload[1 + id_len..1 + id_len + 8]);
        let expires_at = u64::from_be_bytes(exp) as i64;
        let mut tag = [0u8; STATE_TAG_LEN];
        tag.copy_from_slice(&payload[1 + id_len + 8..1 + id_len + 8 + STATE_TAG_LEN]);
        if now >= expires_at {
            return Err(StateError::Expired);
        }
        let scope = match &payload[fixed..] {
            [] => None,
            bytes => Some(std::str::from_utf8(bytes).map_err(|_| StateError::Tampered)?.to_string()),
        };
        Ok(VerifiedState { expires_at, connection_tag: tag, hash: sha256_hex(state), scope })
    }
}

/// A state whose signature and expiry check out.
#[derive(Debug, Clone)]
pub struct VerifiedState {
    pub expires_at: i64,
    connection_tag: [u8; STATE_TAG_LEN],
    /// What the store keeps to find the pending authorization.
    pub hash: String,
    /// Where the connection lives, when not in this deployment's own store: the customer
    /// tenant it was started for.
    pub scope: Option<String>,
}

impl VerifiedState {
    /// Whether this state was issued for the given connection.
    pub fn is_for(&self, connection_id: &str) -> bool {
        constant_time_eq(&self.connection_tag, &connection_tag(connection_id))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the state was not issued by this service")]
    NotOurs,
    #[error("the state was altered or was signed with a key that is no longer configured")]
    Tampered,
    #[error("the state has expired")]
    Expired,
}

/// The prefix of a capture-mode state signed by Dynamics with the shared capture key.
pub const SIGNED_CAPTURE_STATE_PREFIX: &str = "dcx1.";

/// Why a signed capture-mode state was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignedStateError {
    #[error("the signed state is malformed or its signature does not match")]
    Invalid,
    #[error("the signed state has expired")]
    Expired,
}

/// Signs a capture-mode state the way Dynamics does: `dcx1.{expires}.{nonce}.{mac}`, where
/// `mac` is base64url (no padding) of HMAC-SHA256 over `dcx1.{expires}.{nonce}` with the
/// shared key's UTF-8 bytes. `nonce` is 16-128 characters of `A-Z a-z 0-9 - _`.
pub fn sign_capture_state(key: &[u8], expires_at: i64, nonce: &str) -> String {
    let signed = format!("{SIGNED_CAPTURE_STATE_PREFIX}{expires_at}.{nonce}");
    let mac = hmac(key, &[signed.as_bytes()]);
    format!("{signed}.{}", B64URL.encode(mac))
}

/// Checks a state signed with [`sign_capture_state`].
pub fn verify_capture_state(key: &[u8], state: &str, now: i64) -> Result<(), SignedStateError> {
    let rest = state.strip_prefix(SIGNED_CAPTURE_STATE_PREFIX).ok_or(SignedStateError::Invalid)?;
    let mut parts = rest.split('.');
    let (Some(expires), Some(nonce), Some(mac), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(SignedStateError::Invalid);
    };
    let expires_at: i64 = expires.parse().map_err(|_| SignedStateError::Invalid)?;
    let nonce_ok =
        (16..=128).contains(&nonce.len()) && nonce.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let given = B64URL.decode(mac).map_err(|_| SignedStateError::Invalid)?;
    let expected = hmac(key, &[format!("{SIGNED_CAPTURE_STATE_PREFIX}{expires}.{nonce}").as_bytes()]);
    if !nonce_ok || !constant_time_eq(&expected, &given) {
        return Err(SignedStateError::Invalid);
    }
    if now >= expires_at {
        return Err(SignedStateError::Expired);
    }
    Ok(())
}

fn connection_tag(connection_id: &str) -> [u8; STATE_TAG_LEN] {
    let digest = Sha256::digest(connection_id.as_bytes());
    let mut tag = [0u8; STATE_TAG_LEN];
    tag.copy_from_slice(&digest[..STATE_TAG_LEN]);
    tag
}
