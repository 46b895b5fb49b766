//! Capture mode: what an OAuth redirect delivered for a `state` we did not issue, kept
//! for Dynamics to exchange itself (and delivered to Finance & Operations when
//! configured).
//!
//! Only expected states are kept: a state Dynamics registered beforehand
//! ([`Captures::expect`], `POST /api/captures`), or one it signed with the shared capture
//! key (`dcx1.` states, [`crate::crypto::sign_capture_state`]); `CAPTURE_STATES=any`
//! keeps every state, for operators who accept the risk. An unexpected state stores
//! nothing, so made-up callbacks cost no storage and no F&O call.
//!
//! The capture is kept in the store once per code (that is what makes it exactly-once);
//! the code is sealed there, bound to the capture's key. The first code for a state wins:
//! a different code for the same state is refused and recorded as a conflict. A delivery
//! to F&O that fails stays pending and the timer delivers it later; past
//! `CAPTURE_MAX_PENDING` undelivered captures new ones are refused.

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};

use crate::config::CapturePolicy;
use crate::crypto::{self, CryptoError, Keyring, SignedStateError};
use crate::fno::{Delivery, Fno};
use crate::oauth::AuthorizationCode;
use crate::store::{Capture, Store, StoreError};
use crate::time::Clock;

/// What the callback received for a foreign state.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    pub state: &'a str,
    pub code: Option<&'a AuthorizationCode>,
    pub iss: Option<&'a str>,
    pub error: Option<&'a str>,
    pub error_description: Option<&'a str>,
}

/// A capture with its code decrypted, for the back office.
#[derive(Debug, Clone)]
pub struct OpenedCapture {
    pub capture: Capture,
    pub code: Option<AuthorizationCode>,
}

/// What became of a callback for a foreign state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Kept (and delivered, or pending delivery).
    New,
    /// The same code again (a reload): nothing new.
    Duplicate,
    /// Another code for a state that already has one: refused, and recorded.
    Conflict,
}

/// The marker a conflict record carries in its `error` field.
pub const CONFLICT: &str = "conflicting_code";
/// How long a registration may ask to wait for its callback, at most.
pub const MAX_EXPECTATION_SECS: u64 = 24 * 3600;

/// Capture mode's parts, wired by the app.
pub struct Captures {
    pub store: Arc<dyn Store>,
    pub keys: Arc<Keyring>,
    pub clock: Arc<dyn Clock>,
    pub policy: CapturePolicy,
    /// The key Dynamics signs `dcx1.` states with, when configured.
    pub state_key: Option<SecretString>,
    /// Where captures go besides the store (Finance & Operations), if anywhere.
    pub fno: Option<Fno>,
}

impl Captures {
    /// Registers a state Dynamics issued, so its callback is kept; until `expires_in`.
    pub async fn expect(&self, state: &str, expires_in: u64) -> Result<i64, CaptureError> {
        if state.is_empty() || state.len() > 2048 || state.chars().any(char::is_control) {
            return Err(CaptureError::InvalidState("the state must be 1-2048 printable characters".into()));
        }
        if state.starts_with("dc1.") || state.starts_with(crypto::SIGNED_CAPTURE_STATE_PREFIX) {
            return Err(CaptureError::InvalidState("states starting dc1. or dcx1. are not registered".into()));
        }
        if !(1..=MAX_EXPECTATION_SECS).contains(&expires_in) {
            return Err(CaptureError::InvalidState(format!("expires_in must be 1-{MAX_EXPECTATION_SECS} seconds")));
        }
        let until = self.clock.now() + expires_in as i64;
        self.store.expect_state(&crypto::sha256_hex(state), until).await?;
        Ok(until)
    }

    /// Whether a callback for this state may be kept.
    async fn expected(&self, state: &str) -> Result<(), CaptureError> {
        if state.starts_with(crypto::SIGNED_CAPTURE_STATE_PREFIX)
            && let Some(key) = &self.state_key
        {
            return crypto::verify_capture_state(key.expose_secret().as_bytes(), state, self.clock.now()).map_err(
                |e| match e {
                    SignedStateError::Expired => CaptureError::Expired,
                    SignedStateError::Invalid => CaptureError::Unexpected,
                },
            );
        }
        match self.store.expected_until(&crypto::sha256_hex(state)).await? {
            Some(until) if until > self.clock.now() => Ok(()),
            Some(_) => Err(CaptureError::Expired),
            None if self.policy.any_state => Ok(()),
            None => Err(CaptureError::Unexpected),
        }
    }

    /// Keeps what the provider sent for an expected state, exactly once per code, and
    /// delivers it to Finance & Operations when configured.
    pub async fn capture(&self, r: Received<'_>) -> Result<Outcome, CaptureError> {
        self.expected(r.state).await?;
        if r.code.is_some() {
            let earlier = self.store.captures_by_state(r.state).await?;
            let key = r.code.map(|c| crypto::sha256_hex(&format!("code:{}", c.secret())));
            let first = earlier.iter().find(|c| c.code.is_some());
            if let (Some(first), Some(key)) = (first, key.as_deref())
                && first.key != key
            {
                self.record_conflict(r, key).await?;
                return Err(CaptureError::Conflict);
            }
        }
        if self.fno.is_some()
            && self.store.undelivered_captures(self.policy.max_pending).await?.len() >= self.policy.max_pending
        {
            return Err(CaptureError::Backlog);
        }
        let fresh = self.keep(r).await?;
        Ok(if fresh { Outcome::New } else { Outcome::Duplicate })
    }

    /// A second, different code for a state: kept as a record without the code, for the
    /// back office to see; never delivered anywhere.
    async fn record_conflict(&self, r: Received<'_>, code_key: &str) -> Result<(), StoreError> {
        let now = self.clock.now();
        let conflict = Capture {
            key: crypto::sha256_hex(&format!("conflict:{code_key}")),
            state: r.state.to_string(),
            code: None,
            iss: r.iss.map(str::to_string),
            error: Some(CONFLICT.into()),
            error_description: Some("A second, different code arrived for this state and was refused.".into()),
            received_at: now,
            delivered_at: Some(now),
        };
        self.store.insert_capture(&conflict).await?;
        tracing::warn!("a second code for a captured state was refused");
        Ok(())
    }

    /// Stores the capture; true when it was new.
    async fn keep(&self, r: Received<'_>) -> Result<bool, StoreError> {
        let key = match r.code {
            Some(code) => crypto::sha256_hex(&format!("code:{}", code.secret())),
            None => crypto::sha256_hex(&format!("error:{}:{}", r.state, r.error.unwrap_or_default())),
        };
        let received_at = self.clock.now();
        let capture = Capture {
            state: r.state.to_string(),
            code: r.code.map(|c| self.keys.seal(c.secret().as_bytes(), &capture_aad(&key))),
            key: key.clone(),
            iss: r.iss.map(str::to_string),
            error: r.error.map(str::to_string),
            error_description: r.error_description.map(str::to_string),
            received_at,
            delivered_at: if self.fno.is_some() { None } else { Some(received_at) },
        };
        let fresh = self.store.insert_capture(&capture).await?;
        tracing::info!(new = fresh, has_code = r.code.is_some(), "capture received");
        if let (true, Some(fno)) = (fresh, &self.fno) {
            let delivery = Delivery {
                code: r.code.map(AuthorizationCode::secret),
                state: r.state,
                iss: r.iss,
                error: r.error,
                error_description: r.error_description,
                received_at,
            };
            match fno.deliver(&delivery).await {
                Ok(()) => self.store.mark_capture_delivered(&key, self.clock.now()).await?,
                Err(e) => tracing::warn!(error = %e, "capture kept; delivery to F&O will be retried by the timer"),
            }
        }
        Ok(fresh)
    }

    /// Deletes registrations whose time is up; returns how many.
    pub async fn purge_expectations(&self) -> Result<u64, StoreError> {
        self.store.purge_expectations(self.clock.now()).await
    }

    /// Whether captures are delivered to Finance & Operations.
    pub fn delivers(&self) -> bool {
        self.fno.is_some()
    }

    /// Delivers captures that Finance & Operations did not take yet; returns (delivered,
    /// still pending). Nothing to do without F&O.
    pub async fn deliver_pending(&self) -> Result<(usize, usize), StoreError> {
        let Some(fno) = &self.fno else {
            return Ok((0, 0));
        };
        let (mut delivered, mut failed) = (0, 0);
        for c in self.store.undelivered_captures(100).await? {
            let Ok(code) = self.open_code(&c) else {
                failed += 1;
                tracing::error!("a pending capture's code cannot be decrypted; it is skipped");
                continue;
            };
            let delivery = Delivery {
                code: code.as_ref().map(AuthorizationCode::secret),
                state: &c.state,
                iss: c.iss.as_deref(),
                error: c.error.as_deref(),
                error_description: c.error_description.as_deref(),
                received_at: c.received_at,
            };
            match fno.deliver(&delivery).await {
                Ok(()) => {
                    self.store.mark_capture_delivered(&c.key, self.clock.now()).await?;
                    delivered += 1;
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(error = %e, "pending capture still not delivered to F&O");
                }
            }
        }
        Ok((delivered, failed))
    }

    /// The captures received for a state, with their codes decrypted.
    pub async fn for_state(&self, state: &str) -> Result<Vec<OpenedCapture>, CaptureError> {
        let captures = self.store.captures_by_state(state).await?;
        captures.into_iter().map(|c| Ok(OpenedCapture { code: self.open_code(&c)?, capture: c })).collect()
    }

    /// Deletes delivered captures received before `before`; returns how many.
    pub async fn purge(&self, before: i64) -> Result<u64, StoreError> {
        self.store.purge_captures(before).await
    }

    fn open_code(&self, c: &Capture) -> Result<Option<AuthorizationCode>, CryptoError> {
        c.code
            .as_deref()
            .map(|sealed| {
                let plain = self.keys.open(sealed, &capture_aad(&c.key))?;
                String::from_utf8(plain).map(AuthorizationCode::new).map_err(|_| CryptoError::Malformed)
            })
            .transpose()
    }
}

/// Why a capture was refused, or could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Neither registered nor validly signed (and `CAPTURE_STATES` is not `any`).
    #[error("the state was not registered by Dynamics")]
    Unexpected,
    /// Registered or signed, but its time is up.
    #[error("the state's registration has expired")]
    Expired,
    #[error("another code was already captured for this state")]
    Conflict,
    #[error("too many captures are waiting for delivery to F&O")]
    Backlog,
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("a captured code could not be decrypted: {0}")]
    Crypto(#[from] CryptoError),
}

fn capture_aad(key: &str) -> String {
    format!("capture:{key}:code")
}
