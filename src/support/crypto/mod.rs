//! Encryption of stored secrets and the signed OAuth `state`.
//!
//! Tokens are sealed with AES-256-GCM before they reach any store. The sealed text is
//! `v1.<key id>.<base64url(nonce ‖ ciphertext ‖ tag)>`: the key id travels with the
//! ciphertext so keys can rotate (encrypt with the current key, decrypt with any key
//! still configured). The associated data binds a ciphertext to its record and field,
//! so a sealed value copied onto another connection does not decrypt.
//!
//! The `state` we issue is `dc1.<payload>.<mac>`. Its HMAC lets the callback tell a
//! state that was altered or expired from one we never issued (capture mode) before
//! touching the store; single use is enforced by the store (only a hash is kept).

mod state;

pub use state::{
    SIGNED_CAPTURE_STATE_PREFIX, SignedStateError, StateError, VerifiedState, sign_capture_state, verify_capture_state,
};

use std::collections::HashMap;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64URL};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("the sealed value is not in the expected format")]
    Malformed,
    #[error("the sealed value was encrypted with key {0:?}, which is not configured")]
    UnknownKey(String),
    #[error("the sealed value does not decrypt with its key (altered, or bound to another record)")]
    Tampered,
}

/// A malformed key list, reported against the setting that holds it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyFormatError(pub String);

struct Key {
    id: String,
    aead: Aes256Gcm,
    state_mac: Vec<u8>,
}

/// The token encryption keys: the first is current, all decrypt. The set can be replaced
/// while running (a key rotated in Key Vault), so callers never hold it across awaits.
pub struct Keyring {
    ring: std::sync::RwLock<std::sync::Arc<Ring>>,
}

struct Ring {
    keys: Vec<Key>,
    by_id: HashMap<String, usize>,
    /// A fingerprint of the spec, to tell whether a reload changes anything.
    spec_hash: [u8; 32],
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ring = self.ring();
        let ids: Vec<&str> = ring.keys.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("Keyring").field("key_ids", &ids).finish()
    }
}

impl Keyring {
    /// Parses `id:base64key[,id:base64key...]`; each key is 32 random bytes in standard
    /// or URL-safe base64. The first entry encrypts.
    pub fn parse(spec: &str) -> Result<Keyring, KeyFormatError> {
        Ok(Keyring { ring: std::sync::RwLock::new(std::sync::Arc::new(Ring::parse(spec)?)) })
    }

    /// Replaces the keys with a new spec; `Ok(true)` when they changed.
    pub fn reload(&self, spec: &str) -> Result<bool, KeyFormatError> {
        let next = Ring::parse(spec)?;
        let mut ring = self.ring.write().unwrap_or_else(|e| e.into_inner());
        if ring.spec_hash == next.spec_hash {
            return Ok(false);
        }
        *ring = std::sync::Arc::new(next);
        Ok(true)
    }

    fn ring(&self) -> std::sync::Arc<Ring> {
        self.ring.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Ring {
    fn parse(spec: &str) -> Result<Ring, KeyFormatError> {
        let mut keys = Vec::new();
        let mut by_id = HashMap::new();
        for (i, entry) in spec.split(',').map(str::trim).filter(|e| !e.is_empty()).enumerate() {
            let (id, material) = entry
                .split_once(':')
                .ok_or_else(|| KeyFormatError(format!("entry {} is not `id:base64key`", i + 1)))?;
            let id = id.trim();
            if id.is_empty()
                || id.len() > 32
                || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                // Not echoed: written the wrong way round (`<key>:k1`), the "id" is the key.
                return Err(KeyFormatError(format!(
                    "entry {}: the part before ':' must be a key id of 1-32 letters, digits, '-' or '_' (the value is not shown; the format is id:base64key)",
                    i + 1
                )));
            }
            let material = material.trim();
            let bytes = STANDARD
                .decode(material)
                .or_else(|_| B64URL.decode(material.trim_end_matches('=')))
                .map_err(|_| KeyFormatError(format!("key {id:?} is not valid base64")))?;
            if bytes.len() != 32 {
                return Err(KeyFormatError(format!("key {id:?} must be 32 bytes, found {}", bytes.len())));
            }
            let aead =
                Aes256Gcm::new_from_slice(&bytes).map_err(|_| KeyFormatError(format!("key {id:?} is unusable")))?;
            let state_mac = hmac(&bytes, &[b"dynamics-companion/state/v1"]).to_vec();
            if by_id.insert(id.to_string(), keys.len()).is_some() {
                return Err(KeyFormatError(format!("key id {id:?} appears twice")));
            }
            keys.push(Key { id: id.to_string(), aead, state_mac });
        }
        if keys.is_empty() {
            return Err(KeyFormatError("no key given".into()));
        }
        Ok(Ring { keys, by_id, spec_hash: Sha256::digest(spec.trim().as_bytes()).into() })
    }
}

impl Keyring {
    /// A new random key in the format [`Keyring::parse`] reads.
    pub fn generate_spec(id: &str) -> String {
        format!("{id}:{}", STANDARD.encode(random_bytes::<32>()))
    }

    /// Every configured key id, the current one first.
    pub fn ids(&self) -> Vec<String> {
        self.ring().keys.iter().map(|k| k.id.clone()).collect()
    }

    /// The key ids a new spec would no longer have (without parsing errors: `None`).
    pub fn dropped_by(&self, spec: &str) -> Option<Vec<String>> {
        let next = Ring::parse(spec).ok()?;
        Some(self.ids().into_iter().filter(|id| !next.by_id.contains_key(id)).collect())
    }

    pub fn current_id(&self) -> String {
        self.ring().keys[0].id.clone()
    }

    /// The id of the key `sealed` was sealed with (`v1.<id>.<data>`).
    pub fn sealed_with(sealed: &str) -> Option<&str> {
        let mut parts = sealed.splitn(3, '.');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("v1"), Some(id), Some(_)) => Some(id),
            _ => None,
        }
    }

    /// `sealed` sealed again with the current key, or `None` when it already is.
    pub fn reseal(&self, sealed: &str, aad: &str) -> Result<Option<String>, CryptoError> {
        if Keyring::sealed_with(sealed) == Some(self.current_id().as_str()) {
            return Ok(None);
        }
        let plain = self.open(sealed, aad)?;
        Ok(Some(self.seal(&plain, aad)))
    }

    /// Encrypts with the current key. `aad` names the record and field.
    pub fn seal(&self, plaintext: &[u8], aad: &str) -> String {
        let ring = self.ring();
        let key = &ring.keys[0];
        let nonce = random_bytes::<NONCE_LEN>();
        // Encryption with a valid key and a 12-byte nonce does not fail for inputs
        // below the GCM limit (64 GiB); tokens are a few kilobytes.
        let ct = key.aead.encrypt((&nonce).into(), Payload { msg: plaintext, aad: aad.as_bytes() }).unwrap_or_default();
        let mut blob = Vec::with_capacity(NONCE_LEN + ct.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ct);
        format!("v1.{}.{}", key.id, B64URL.encode(blob))
    }

    pub fn open(&self, sealed: &str, aad: &str) -> Result<Vec<u8>, CryptoError> {
        let mut parts = sealed.splitn(3, '.');
        let (Some("v1"), Some(id), Some(data)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(CryptoError::Malformed);
        };
        let ring = self.ring();
        let key = ring.by_id.get(id).map(|&i| &ring.keys[i]).ok_or_else(|| CryptoError::UnknownKey(id.to_string()))?;
        let blob = B64URL.decode(data).map_err(|_| CryptoError::Malformed)?;
        if blob.len() < NONCE_LEN + 16 {
            return Err(CryptoError::Malformed);
        }
        let (nonce, ct) = blob.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Malformed)?;
        key.aead.decrypt((&nonce).into(), Payload { msg: ct, aad: aad.as_bytes() }).map_err(|_| CryptoError::Tampered)
    }
}

/// A stable, non-reversible key for a value: how the store finds a state (never the
/// state itself) and tells one capture's code from another. Lower-case hex, because
/// Dataverse compares strings case-insensitively.
pub fn sha256_hex(value: &str) -> String {
    hex(&Sha256::digest(value.as_bytes()))
}

/// `N` random bytes as lower-case hex (generated ids).
pub fn random_hex<const N: usize>() -> String {
    hex(&random_bytes::<N>())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// HMAC-SHA256 of the concatenated `parts` (webhook signatures, signed states).
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    hmac(key, parts)
}

pub(crate) fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Compares without revealing, through timing, where two values differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // getrandom fails only when the OS has no entropy source at all; nothing secure
    // can be done then, and continuing with zeros would be worse than stopping.
    if let Err(e) = getrandom::fill(&mut buf) {
        panic!("the operating system's random number generator failed: {e}");
    }
    buf
}

/// A random URL-safe string carrying `N` bytes of entropy.
pub fn random_token<const N: usize>() -> String {
    B64URL.encode(random_bytes::<N>())
}

/// RFC 7636 S256: `BASE64URL(SHA256(ASCII(code_verifier)))`.
pub fn pkce_challenge(verifier: &str) -> String {
    B64URL.encode(Sha256::digest(verifier.as_bytes()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_key_list_written_backwards_is_refused_without_showing_the_key() {
        let spec = Keyring::generate_spec("k1");
        let material = spec.split_once(':').unwrap().1;
        for wrong in [format!("{material}:k1"), format!("k0:{},{material}:k1", material), format!("{material}")] {
            let err = Keyring::parse(&wrong).unwrap_err().0;
            assert!(!err.contains(material) && !err.contains(&material[..12]), "{err}");
        }
    }

    use super::state::STATE_PREFIX;
    use super::*;

    fn ring(spec: &str) -> Keyring {
        Keyring::parse(spec).unwrap()
    }

    #[test]
    fn a_scoped_state_carries_its_scope_under_the_signature() {
        let keys = ring(&Keyring::generate_spec("k1"));
        let plain = keys.issue_state("erp-1", 2_000);
        assert_eq!(keys.verify_state(&plain, 1_000).unwrap().scope, None);
        let scoped = keys.issue_scoped_state(Some("aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa"), "erp-1", 2_000);
        let v = keys.verify_state(&scoped, 1_000).unwrap();
        assert_eq!(v.scope.as_deref(), Some("aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa"));
        assert!(v.is_for("erp-1"));
        // Changing the scope in the payload breaks the signature.
        let (payload, mac) = scoped.strip_prefix(STATE_PREFIX).unwrap().split_once('.').unwrap();
        let mut bytes = B64URL.decode(payload).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let forged = format!("{STATE_PREFIX}{}.{mac}", B64URL.encode(&bytes));
        assert_eq!(keys.verify_state(&forged, 1_000).unwrap_err(), StateError::Tampered);
    }

    #[test]
    fn seals_and_opens_with_rotation() {
        let old = Keyring::generate_spec("k1");
        let new = Keyring::generate_spec("k2");
        let before = ring(&old).seal(b"refresh-token", "conn:a/tokens");
        let rotated = ring(&format!("{new},{old}"));
        assert_eq!(rotated.open(&before, "conn:a/tokens").unwrap(), b"refresh-token");
        let after = rotated.seal(b"x", "conn:a/tokens");
        assert!(after.starts_with("v1.k2."));
        assert_eq!(ring(&old).open(&after, "conn:a/tokens"), Err(CryptoError::UnknownKey("k2".into())));
    }

    #[test]
    fn ciphertext_is_bound_to_its_record() {
        let r = ring(&Keyring::generate_spec("k1"));
        let sealed = r.seal(b"secret", "conn:a/tokens");
        assert_eq!(r.open(&sealed, "conn:b/tokens"), Err(CryptoError::Tampered));
        assert!(!sealed.contains("secret"));
    }

    #[test]
    fn rejects_bad_key_specs() {
        assert!(Keyring::parse("").is_err());
        let r = ring(&Keyring::generate_spec("k1"));
        let spec2 = Keyring::generate_spec("k2");
        assert!(r.reload(&spec2).unwrap());
        assert!(!r.reload(&spec2).unwrap(), "the same keys again change nothing");
        assert_eq!(r.current_id(), "k2");
        assert!(Keyring::parse("k1").is_err());
        assert!(Keyring::parse("k1:c2hvcnQ=").is_err());
        assert!(Keyring::parse("bad id:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").is_err());
    }

    #[test]
    fn state_round_trip_and_failures() {
        let r = ring(&Keyring::generate_spec("k1"));
        let s = r.issue_state("conn-a", 1_000);
        let v = r.verify_state(&s, 999).unwrap();
        assert!(v.is_for("conn-a"));
        assert!(!v.is_for("conn-b"));
        assert_eq!(v.hash, sha256_hex(&s));
        assert_eq!(r.verify_state(&s, 1_000).unwrap_err(), StateError::Expired);
        assert_eq!(r.verify_state("some-state-from-dynamics", 0).unwrap_err(), StateError::NotOurs);
        // Flip one character of the payload.
        let mut chars: Vec<char> = s.chars().collect();
        chars[6] = if chars[6] == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.into_iter().collect();
        assert_eq!(r.verify_state(&tampered, 0).unwrap_err(), StateError::Tampered);
        // A state from another deployment's key is not accepted.
        let other = ring(&Keyring::generate_spec("k1"));
        assert_eq!(other.verify_state(&s, 0).unwrap_err(), StateError::Tampered);
    }

    #[test]
    fn signed_capture_states_round_trip_and_refuse_tampering() {
        let key = b"shared-with-dynamics";
        let s = sign_capture_state(key, 2_000, "nonce-0123456789abcdef");
        assert!(s.starts_with("dcx1.2000.nonce-0123456789abcdef."));
        assert_eq!(verify_capture_state(key, &s, 1_999), Ok(()));
        assert_eq!(verify_capture_state(key, &s, 2_000), Err(SignedStateError::Expired));
        assert_eq!(verify_capture_state(b"another-key", &s, 0), Err(SignedStateError::Invalid));
        let later = s.replace("dcx1.2000.", "dcx1.9000.");
        assert_eq!(verify_capture_state(key, &later, 0), Err(SignedStateError::Invalid));
        assert_eq!(verify_capture_state(key, "dcx1.2000.short.AAAA", 0), Err(SignedStateError::Invalid));
    }

    #[test]
    fn pkce_matches_rfc_7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }
}
