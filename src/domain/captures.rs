//! Capture mode: what an OAuth redirect delivered for a `state` we did not issue, kept
//! for Dynamics to exchange itself (and delivered to Finance & Operations when
//! configured).
//!
//! Only expected states are kept: a state Dynamics registered beforehand
//! ([`Captures::expect`], `POST /api/captures`), or one it signed with the shared capture
//! key (`dcx1.` states, [`crate::support::crypto::sign_capture_state`]); `CAPTURE_STATES=any`
//! keeps every state, for operators who accept the risk. An unexpected state stores
//! nothing, so made-up callbacks cost no storage and no F&O call.
//!
//! **What one state can record is bounded**: a capture's key is derived from its state and
//! kind, and the store keeps keys unique, so a state holds at most one code, one provider
//! error and one conflict record. The first code for a state wins in one atomic step
//! (the insert): a different code is refused and noted once; after a code, nothing else
//! for that state is stored. The code is sealed, bound to the capture's key.
//!
//! **Delivery to F&O, at most once at a time across all instances**: a capture is stored
//! already claimed by the instance that received it; the timer (on any instance) claims
//! what is ready with a version-checked write before it delivers ([`Store::claim_capture`]).
//! A claim lasts as long as a delivery can take, so nobody delivers a capture another is
//! delivering. A failed delivery records the earliest next attempt on the capture (F&O's
//! `Retry-After`, else a back-off), which every instance honours; a `429` also pauses
//! this instance's every delivery to the environment ([`crate::clients::fno`]). The person's page
//! waits at most [`CALLBACK_WAIT`] for the first attempt, which goes on in the background.
//! The body carries the capture's id, so an X++ receiver can drop a repeat after a lost
//! answer. Past `CAPTURE_MAX_PENDING` undelivered captures new ones are refused.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use secrecy::{ExposeSecret, SecretString};

use crate::domain::oauth::AuthorizationCode;
use crate::domain::{Capture, CaptureStore, ExpectationStore, StoreError};
use crate::support::config::CapturePolicy;
use crate::support::crypto::{self, CryptoError, Keyring, SignedStateError};
use crate::support::outbound::Backoff;
use crate::support::time::Clock;

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
    /// The same code (or an error) again: nothing new.
    Duplicate,
}

/// The marker a conflict record carries in its `error` field.
pub const CONFLICT: &str = "conflicting_code";
/// How long a registration may ask to wait for its callback, at most.
pub const MAX_EXPECTATION_SECS: u64 = 24 * 3600;
/// How long the person's page waits for the first delivery to F&O; it goes on after.
pub const CALLBACK_WAIT: Duration = Duration::from_secs(2);
/// Deliveries one timer pass runs at once.
const PASS_CONCURRENCY: usize = 4;
/// Captures one timer pass looks at.
const PASS_BATCH: usize = 100;
/// After a failed delivery: 5 s, doubling, at most an hour (unless F&O said how long).
const REDELIVERY: Backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(3600));

/// Capture mode's parts, wired by the app.
pub struct Captures {
    pub store: Arc<dyn CaptureStore>,
    /// The states Dynamics registered.
    pub expectations: Arc<dyn ExpectationStore>,
    pub keys: Arc<Keyring>,
    pub clock: Arc<dyn Clock>,
    pub policy: CapturePolicy,
    /// The key Dynamics signs `dcx1.` states with, when configured.
    pub state_key: Option<SecretString>,
    /// Where captures go besides the store (Finance & Operations), if anywhere.
    pub fno: Option<Arc<dyn CaptureDelivery>>,
}

/// What one delivery pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    pub delivered: usize,
    /// Tried and not delivered (they wait for their next attempt).
    pub failed: usize,
    /// Not tried: F&O asked to wait, was failing, or the run's time was spent.
    pub deferred: usize,
    /// Still waiting for F&O after the pass (up to a batch), due or not.
    pub pending: usize,
}

impl Captures {
    /// Registers a state Dynamics issued, so its callback is kept; until `expires_in`.
    /// A registration is accepted whatever the backlog of deliveries: it stores no code.
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
        self.expectations.expect_state(&crypto::sha256_hex(state), until).await?;
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
        match self.expectations.expected_until(&crypto::sha256_hex(state)).await? {
            Some(until) if until > self.clock.now() => Ok(()),
            Some(_) => Err(CaptureError::Expired),
            None if self.policy.any_state => Ok(()),
            None => Err(CaptureError::Unexpected),
        }
    }

    /// Keeps what the provider sent for an expected state (see the module's doc for what
    /// one state may record), and delivers it to Finance & Operations when configured.
    pub async fn capture(&self, r: Received<'_>) -> Result<Outcome, CaptureError> {
        self.expected(r.state).await?;
        let code_key = key_for("code", r.state);
        if r.code.is_none() {
            // A provider's error after the code arrived is refused, and not stored.
            let earlier = self.store.captures_by_state(r.state).await?;
            if earlier.iter().any(|c| c.key == code_key) {
                return Err(CaptureError::AlreadyCaptured);
            }
        }
        if self.fno.is_some()
            && self.store.undelivered_captures(self.policy.max_pending, None).await?.len() >= self.policy.max_pending
        {
            return Err(CaptureError::Backlog);
        }
        let key = if r.code.is_some() { code_key } else { key_for("error", r.state) };
        if self.keep(r, &key).await? {
            return Ok(Outcome::New);
        }
        let Some(code) = r.code else { return Ok(Outcome::Duplicate) };
        // The state has a code: the same one again (a reload) or another (refused, noted).
        let earlier = self.store.captures_by_state(r.state).await?;
        let first = earlier.iter().find(|c| c.key == key).map(|c| self.open_code(c)).transpose()?.flatten();
        if first.is_some_and(|f| crypto::constant_time_eq(f.secret().as_bytes(), code.secret().as_bytes())) {
            return Ok(Outcome::Duplicate);
        }
        self.record_conflict(r).await?;
        Err(CaptureError::Conflict)
    }

    /// A second, different code for a state: noted once per state as a record without the
    /// code, for the back office to see; never delivered anywhere.
    async fn record_conflict(&self, r: Received<'_>) -> Result<(), StoreError> {
        let now = self.clock.now();
        let conflict = Capture {
            key: key_for("conflict", r.state),
            state: r.state.to_string(),
            code: None,
            iss: r.iss.map(str::to_string),
            error: Some(CONFLICT.into()),
            error_description: Some("A second, different code arrived for this state and was refused.".into()),
            received_at: now,
            delivered_at: Some(now),
            claim_until_ms: None,
            attempts: 0,
        };
        self.store.insert_capture(&conflict).await?;
        tracing::warn!("a second code for a captured state was refused");
        Ok(())
    }

    /// Stores the capture under `key` (claimed by this instance when it goes to F&O);
    /// true when it was new. A new one is delivered, the person waiting at most
    /// [`CALLBACK_WAIT`].
    async fn keep(&self, r: Received<'_>, key: &str) -> Result<bool, StoreError> {
        let received_at = self.clock.now();
        let now_ms = self.clock.now_millis();
        let capture = Capture {
            state: r.state.to_string(),
            code: r.code.map(|c| self.keys.seal(c.secret().as_bytes(), &capture_aad(key))),
            key: key.to_string(),
            iss: r.iss.map(str::to_string),
            error: r.error.map(str::to_string),
            error_description: r.error_description.map(str::to_string),
            received_at,
            delivered_at: if self.fno.is_some() { None } else { Some(received_at) },
            claim_until_ms: self.fno.as_ref().map(|f| now_ms + claim_for(f.as_ref()).as_millis() as i64),
            attempts: 0,
        };
        let fresh = self.store.insert_capture(&capture).await?;
        tracing::info!(new = fresh, has_code = r.code.is_some(), "capture received");
        if let (true, Some(fno)) = (fresh, &self.fno) {
            let courier = Courier { store: self.store.clone(), clock: self.clock.clone(), fno: fno.clone() };
            let code = r.code.cloned();
            let attempt = tokio::spawn(async move {
                let timeout = courier.fno.timeout();
                courier.deliver_claimed(&capture, code.as_ref(), timeout).await
            });
            if tokio::time::timeout(CALLBACK_WAIT, attempt).await.is_err() {
                tracing::info!("F&O is slow to answer; the person is not kept waiting, the delivery goes on");
            }
        }
        Ok(fresh)
    }

    /// Deletes registrations whose time is up; returns how many.
    pub async fn purge_expectations(&self) -> Result<u64, StoreError> {
        self.expectations.purge_expectations(self.clock.now()).await
    }

    /// Whether captures are delivered to Finance & Operations.
    pub fn delivers(&self) -> bool {
        self.fno.is_some()
    }

    /// Delivers what waits for F&O and is due, claiming each first, a few at a time, and
    /// starting none after `deadline_ms` (Unix ms) nor while F&O asks to wait or is failing:
    /// the pass ends within its budget whatever the number pending.
    pub async fn deliver_pending(&self, deadline_ms: i64) -> Result<PassReport, StoreError> {
        let Some(fno) = &self.fno else {
            return Ok(PassReport::default());
        };
        let ready = self.store.undelivered_captures(PASS_BATCH, Some(self.clock.now_millis())).await?;
        let courier = Courier { store: self.store.clone(), clock: self.clock.clone(), fno: fno.clone() };
        let failing = std::sync::atomic::AtomicBool::new(false);
        let results: Vec<Result<Option<bool>, StoreError>> = futures_util::stream::iter(ready)
            .map(|c| {
                let (courier, failing) = (&courier, &failing);
                async move {
                    let now_ms = self.clock.now_millis();
                    let left = deadline_ms - now_ms;
                    if left <= 0 || failing.load(std::sync::atomic::Ordering::Relaxed) || fno.paused_for().is_some() {
                        return Ok(None);
                    }
                    let until = now_ms + claim_for(fno.as_ref()).as_millis() as i64;
                    if !self.store.claim_capture(&c.key, now_ms, until).await? {
                        return Ok(None);
                    }
                    let Ok(code) = self.open_code(&c) else {
                        tracing::error!("a pending capture's code cannot be decrypted; it is skipped");
                        courier.release(&c, None).await?;
                        return Ok(Some(false));
                    };
                    let timeout = Duration::from_millis(left as u64);
                    let outcome = courier.deliver_claimed(&c, code.as_ref(), timeout).await?;
                    if let Err(e) = &outcome
                        && e.environment_failing()
                    {
                        failing.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(Some(outcome.is_ok()))
                }
            })
            .buffer_unordered(PASS_CONCURRENCY)
            .collect()
            .await;
        let mut report = PassReport::default();
        for r in results {
            match r? {
                Some(true) => report.delivered += 1,
                Some(false) => report.failed += 1,
                None => report.deferred += 1,
            }
        }
        report.pending = self.store.undelivered_captures(PASS_BATCH, None).await?.len();
        Ok(report)
    }

    /// The captures received for a state, with their codes decrypted.
    pub async fn for_state(&self, state: &str) -> Result<Vec<OpenedCapture>, CaptureError> {
        let captures = self.store.captures_by_state(state).await?;
        captures.into_iter().map(|c| Ok(OpenedCapture { code: self.open_code(&c)?, capture: c })).collect()
    }

    /// Deletes delivered captures received before `before`; returns how many. Captures
    /// still waiting for F&O are never deleted.
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

/// Where captures go besides the store: the port Finance & Operations' client
/// (`clients::fno`) implements. One call is one delivery; retries, claims and pauses are
/// the rules' (above).
#[async_trait::async_trait]
pub trait CaptureDelivery: Send + Sync {
    /// How long one delivery may take.
    fn timeout(&self) -> Duration;
    /// How long nothing may be sent, when the environment said so (a `429`'s wait).
    fn paused_for(&self) -> Option<Duration>;
    /// Delivers one capture within `timeout`.
    async fn deliver(&self, delivery: &Delivery<'_>, timeout: Duration) -> Result<(), Box<dyn DeliveryFailure>>;
}

/// Why a delivery did not happen: the client's own error, with what the rules need of it.
pub trait DeliveryFailure: std::error::Error + Send + Sync {
    /// How long the environment asked that nothing be sent, when it did.
    fn wait(&self) -> Option<Duration>;
    /// Whether the environment as a whole is failing (not this capture): the pass stops.
    fn environment_failing(&self) -> bool;
}

/// A capture in clear, as delivered.
#[derive(Debug, Clone)]
pub struct Delivery<'a> {
    /// The capture's id: the idempotency key the receiver gets.
    pub id: &'a str,
    pub code: Option<&'a str>,
    pub state: &'a str,
    pub iss: Option<&'a str>,
    pub error: Option<&'a str>,
    pub error_description: Option<&'a str>,
    pub received_at: i64,
}

/// Delivers captures this instance holds a claim on, and records how it went.
struct Courier {
    store: Arc<dyn CaptureStore>,
    clock: Arc<dyn Clock>,
    fno: Arc<dyn CaptureDelivery>,
}

impl Courier {
    /// One delivery of a claimed capture within `timeout`; then delivered, or released
    /// until its next attempt. The store's error is the only `Err`: F&O's is in the `Ok`.
    async fn deliver_claimed(
        &self,
        c: &Capture,
        code: Option<&AuthorizationCode>,
        timeout: Duration,
    ) -> Result<Result<(), Box<dyn DeliveryFailure>>, StoreError> {
        let delivery = Delivery {
            id: &c.key,
            code: code.map(AuthorizationCode::secret),
            state: &c.state,
            iss: c.iss.as_deref(),
            error: c.error.as_deref(),
            error_description: c.error_description.as_deref(),
            received_at: c.received_at,
        };
        let outcome = self.fno.deliver(&delivery, timeout).await;
        match &outcome {
            Ok(()) => self.store.mark_capture_delivered(&c.key, self.clock.now()).await?,
            Err(e) => {
                tracing::warn!(error = %e, attempts = c.attempts + 1, "capture kept; F&O did not take it yet");
                self.release(c, Some(e.as_ref())).await?;
            }
        }
        Ok(outcome)
    }

    /// Gives a claim up after a failed delivery: the next attempt waits as long as F&O
    /// asked, or a back-off by the attempts so far.
    async fn release(&self, c: &Capture, error: Option<&dyn DeliveryFailure>) -> Result<(), StoreError> {
        let attempts = c.attempts.saturating_add(1);
        let wait = error.and_then(DeliveryFailure::wait).unwrap_or_else(|| REDELIVERY.delay(attempts));
        let not_before = self.clock.now_millis().saturating_add(wait.as_millis() as i64);
        self.store.release_capture(&c.key, not_before, attempts).await
    }
}

/// How long a claim lasts: one delivery, its token, and a margin.
fn claim_for(fno: &dyn CaptureDelivery) -> Duration {
    fno.timeout() * 2 + Duration::from_secs(30)
}

/// A capture's key: its kind and its state, so a state has one of each kind at most.
fn key_for(kind: &str, state: &str) -> String {
    crypto::sha256_hex(&format!("{kind}:{state}"))
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
    /// Another code was captured for this state first; this one was refused and noted.
    #[error("another code was already captured for this state")]
    Conflict,
    /// The state has its code already; what came now (an error) was not kept.
    #[error("an authorization was already captured for this state")]
    AlreadyCaptured,
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
