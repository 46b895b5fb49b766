//! Capture mode towards Dynamics 365 Finance & Operations: each captured authorization
//! response is POSTed to a custom service (`/api/services/{group}/{service}/{operation}`)
//! or a data entity (`/data/{Entity}`), with an Entra token for the environment, as F&O
//! integrations receive their OAuth callbacks today.
//!
//! The capture is first kept in the store (that is what makes it exactly-once per code);
//! a delivery that fails stays pending there and the `refresh` timer delivers it later.
//!
//! Bodies, with PascalCase members as F&O data contracts and entities use:
//! - custom service: `{"capture": {"CaptureId", "Code", "State", "Issuer", "Error", "ErrorDescription", "ReceivedAt"}}`,
//!   for an X++ operation `capture(DCOAuthCaptureContract capture)`;
//! - data entity: the same members at the top level, plus `dataAreaId` when configured.
//!
//! One delivery is one request: the retries, and the pause a `429` asks for, are the
//! caller's ([`crate::domain::captures`]), which records them on the capture so that every
//! instance honours them. The body carries the capture's id (`CaptureId`), stable across
//! attempts, so an X++ receiver can drop a repeat of a delivery whose answer was lost.
//!
//! Throttling: F&O answers `429 Too Many Requests` with `Retry-After` (resource-based
//! service protection; Microsoft's guidance is to wait as long as it says, and 30 s when
//! it says nothing: learn.microsoft.com/dynamics365/fin-ops-core/dev-itpro/data-entities/
//! priority-based-throttling). The window covers every request to the environment, so
//! this client pauses all its deliveries until it has passed: none is sent inside it.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use url::Url;

use crate::clients::azure::{IdentityError, TokenSource};
use crate::domain::captures::Delivery;
use crate::domain::captures::{CaptureDelivery, DeliveryFailure};
use crate::support::outbound;

/// Why a capture did not reach Finance & Operations.
#[derive(Debug, thiserror::Error)]
pub enum FnoError {
    #[error("{0:?} is neither a custom service (/api/services/...) nor a data entity (/data/...)")]
    Path(String),
    #[error("{path:?} cannot be joined to {base}: {reason}")]
    Join { path: String, base: String, reason: String },
    #[error(transparent)]
    Token(#[from] IdentityError),
    #[error("F&O answered {status}: {message}")]
    Refused { status: reqwest::StatusCode, message: String },
    #[error("F&O is throttling this client for {} s more", .0.as_secs().max(1))]
    Throttled(Duration),
    #[error("F&O did not answer: {0}")]
    Unreachable(String),
}

impl FnoError {
    /// How long nothing may be sent to the environment, when F&O said so.
    pub fn wait(&self) -> Option<Duration> {
        match self {
            FnoError::Throttled(d) => Some(*d),
            _ => None,
        }
    }

    /// Whether the environment itself is failing (down, overloaded, throttling), rather
    /// than this one capture being refused: a delivery pass stops starting new ones.
    pub fn environment_failing(&self) -> bool {
        match self {
            FnoError::Refused { status, .. } => status.is_server_error(),
            FnoError::Throttled(_) | FnoError::Unreachable(_) | FnoError::Token(_) => true,
            FnoError::Path(_) | FnoError::Join { .. } => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    CustomService,
    DataEntity,
}

pub struct Fno {
    endpoint: Url,
    target: Target,
    data_area: Option<String>,
    http: reqwest::Client,
    tokens: Arc<dyn TokenSource>,
    /// How long one request may take.
    timeout: Duration,
    /// No request before this (a `Retry-After` F&O sent).
    paused_until: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// A `429` without `Retry-After` pauses this long (Microsoft's own sample waits 30 s).
const DEFAULT_THROTTLE: Duration = Duration::from_secs(30);
/// A `Retry-After` longer than this is cut to it, and said in the log.
const MAX_THROTTLE: Duration = Duration::from_secs(15 * 60);

impl Fno {
    /// `base` is the environment URL; `path` starts with `/api/services/` or `/data/`.
    pub fn new(
        base: &Url,
        path: &str,
        data_area: Option<String>,
        http: reqwest::Client,
        tokens: Arc<dyn TokenSource>,
        timeout: Duration,
    ) -> Result<Fno, FnoError> {
        let target = if path.starts_with("/api/services/") {
            Target::CustomService
        } else if path.starts_with("/data/") {
            Target::DataEntity
        } else {
            return Err(FnoError::Path(path.to_string()));
        };
        let endpoint = base.join(path).map_err(|e| FnoError::Join {
            path: path.to_string(),
            base: base.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Fno { endpoint, target, data_area, http, tokens, timeout, paused_until: Default::default() })
    }

    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    /// How long one delivery may take, at most.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn body(&self, d: &Delivery<'_>) -> Value {
        let capture = json!({
            "CaptureId": d.id,
            "Code": d.code,
            "State": d.state,
            "Issuer": d.iss,
            "Error": d.error,
            "ErrorDescription": d.error_description,
            "ReceivedAt": crate::support::time::rfc3339(d.received_at),
        });
        match self.target {
            Target::CustomService => json!({ "capture": capture }),
            Target::DataEntity => {
                let mut body = capture;
                if let (Some(area), Some(obj)) = (&self.data_area, body.as_object_mut()) {
                    obj.insert("dataAreaId".into(), Value::String(area.clone()));
                }
                body
            }
        }
    }

    /// What is left of a pause F&O asked for, if any.
    pub fn paused_for(&self) -> Option<Duration> {
        let until = (*self.paused_until.lock().unwrap_or_else(|e| e.into_inner()))?;
        let now = tokio::time::Instant::now();
        (until > now).then(|| until - now)
    }

    fn pause(&self, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        let mut paused = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        if paused.is_none_or(|p| p < until) {
            *paused = Some(until);
        }
    }

    /// One delivery: one request within `timeout` (at most the client's own), or none at
    /// all while a pause F&O asked for lasts.
    pub async fn deliver(&self, d: &Delivery<'_>, timeout: Duration) -> Result<(), FnoError> {
        if let Some(left) = self.paused_for() {
            return Err(FnoError::Throttled(left));
        }
        let body = self.body(d);
        let token = self.tokens.token().await?;
        let result = outbound::upstream(outbound::send(
            self.http
                .post(self.endpoint.clone())
                .timeout(timeout.min(self.timeout).max(Duration::from_millis(1)))
                .header(header::AUTHORIZATION, format!("Bearer {}", token.expose_secret()))
                .header(header::ACCEPT, "application/json")
                .json(&body),
        ))
        .await;
        let resp = match result {
            Ok(resp) if resp.status().is_success() => return Ok(()),
            Ok(resp) => resp,
            Err(e) => return Err(FnoError::Unreachable(outbound::error_text(e))),
        };
        let status = resp.status();
        let retry_after = outbound::retry_after(resp.headers());
        if status.as_u16() == 429 || (status.as_u16() == 503 && retry_after.is_some()) {
            let asked = retry_after.unwrap_or(DEFAULT_THROTTLE);
            if asked > MAX_THROTTLE {
                tracing::warn!(
                    retry_after_s = asked.as_secs(),
                    "F&O asked to wait longer than {} s; waiting that long",
                    MAX_THROTTLE.as_secs()
                );
            }
            let wait = asked.min(MAX_THROTTLE);
            self.pause(wait);
            tracing::warn!(
                wait_s = wait.as_secs(),
                status = status.as_u16(),
                "F&O is throttling: every delivery waits"
            );
            return Err(FnoError::Throttled(wait));
        }
        let text = outbound::upstream(resp.text()).await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| text.chars().take(200).collect());
        Err(FnoError::Refused { status, message })
    }
}

impl DeliveryFailure for FnoError {
    fn wait(&self) -> Option<Duration> {
        FnoError::wait(self)
    }

    fn environment_failing(&self) -> bool {
        FnoError::environment_failing(self)
    }
}

#[async_trait::async_trait]
impl CaptureDelivery for Fno {
    fn timeout(&self) -> Duration {
        Fno::timeout(self)
    }

    fn paused_for(&self) -> Option<Duration> {
        Fno::paused_for(self)
    }

    async fn deliver(&self, delivery: &Delivery<'_>, timeout: Duration) -> Result<(), Box<dyn DeliveryFailure>> {
        Fno::deliver(self, delivery, timeout).await.map_err(|e| Box::new(e) as Box<dyn DeliveryFailure>)
    }
}
