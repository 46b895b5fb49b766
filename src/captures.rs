//! Capture mode: what an OAuth redirect delivered for a `state` we did not issue, kept
//! for Dynamics to exchange itself (and delivered to Finance & Operations when
//! configured).
//!
//! The capture is first kept in the store, once per code (that is what makes it
//! exactly-once); the code is sealed there, bound to the capture's key. A delivery to
//! F&O that fails stays pending and the timer delivers it later.

use std::sync::Arc;

use crate::crypto::{self, CryptoError, Keyring};
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

pub struct Captures {
    store: Arc<dyn Store>,
    keys: Arc<Keyring>,
    clock: Arc<dyn Clock>,
    /// Where captures go besides the store (Finance & Operations), if anywhere.
    fno: Option<Fno>,
}

impl Captures {
    pub fn new(store: Arc<dyn Store>, keys: Arc<Keyring>, clock: Arc<dyn Clock>, fno: Option<Fno>) -> Captures {
        Captures { store, keys, clock, fno }
    }

    /// Keeps what the provider sent, exactly once per code, and delivers it to Finance &
    /// Operations when configured. Returns whether the capture was new.
    pub async fn capture(&self, r: Received<'_>) -> Result<bool, StoreError> {
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

/// Why captures could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("a captured code could not be decrypted: {0}")]
    Crypto(#[from] CryptoError),
}

fn capture_aad(key: &str) -> String {
    format!("capture:{key}:code")
}
