//! Capture mode towards Dynamics 365 Finance & Operations: each captured authorization
//! response is POSTed to a custom service (`/api/services/{group}/{service}/{operation}`)
//! or a data entity (`/data/{Entity}`), with an Entra token for the environment, as F&O
//! integrations receive their OAuth callbacks today.
//!
//! The capture is first kept in the store (that is what makes it exactly-once per code);
//! a delivery that fails stays pending there and the `refresh` timer delivers it later.
//!
//! Bodies, with PascalCase members as F&O data contracts and entities use:
//! - custom service: `{"capture": {"Code", "State", "Issuer", "Error", "ErrorDescription", "ReceivedAt"}}`,
//!   for an X++ operation `capture(DCOAuthCaptureContract capture)`;
//! - data entity: the same members at the top level, plus `dataAreaId` when configured.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use url::Url;

use crate::azure::{IdentityError, TokenSource};
use crate::outbound::{self, Backoff};

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
    #[error("F&O did not answer: {0}")]
    Unreachable(String),
}

/// A capture in clear, as delivered.
#[derive(Debug, Clone)]
pub struct Delivery<'a> {
    pub code: Option<&'a str>,
    pub state: &'a str,
    pub iss: Option<&'a str>,
    pub error: Option<&'a str>,
    pub error_description: Option<&'a str>,
    pub received_at: i64,
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
}

const ATTEMPTS: u32 = 4;
/// 1 s, 2 s, 4 s, and never longer than 5 s, `Retry-After` included: the timer retries
/// later beyond that.
const RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));

impl Fno {
    /// `base` is the environment URL; `path` starts with `/api/services/` or `/data/`.
    pub fn new(
        base: &Url,
        path: &str,
        data_area: Option<String>,
        http: reqwest::Client,
        tokens: Arc<dyn TokenSource>,
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
        Ok(Fno { endpoint, target, data_area, http, tokens })
    }

    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    pub fn body(&self, d: &Delivery<'_>) -> Value {
        let capture = json!({
            "Code": d.code,
            "State": d.state,
            "Issuer": d.iss,
            "Error": d.error,
            "ErrorDescription": d.error_description,
            "ReceivedAt": crate::time::rfc3339(d.received_at),
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

    /// Delivers one capture; retries throttling and transient failures a few times,
    /// honouring `Retry-After` (the timer retries later beyond that).
    pub async fn deliver(&self, d: &Delivery<'_>) -> Result<(), FnoError> {
        let body = self.body(d);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let token = self.tokens.token().await?;
            let result = outbound::upstream(outbound::send(
                self.http
                    .post(self.endpoint.clone())
                    .header(header::AUTHORIZATION, format!("Bearer {}", token.expose_secret()))
                    .header(header::ACCEPT, "application/json")
                    .json(&body),
            ))
            .await;
            let (retry_after, error) = match result {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                Ok(resp) => {
                    let status = resp.status();
                    let retry_after = outbound::retry_after(resp.headers());
                    let text = outbound::upstream(resp.text()).await.unwrap_or_default();
                    let message = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_string))
                        .unwrap_or_else(|| text.chars().take(200).collect());
                    let error = FnoError::Refused { status, message };
                    if !(status.as_u16() == 429 || status.is_server_error()) {
                        return Err(error);
                    }
                    (retry_after, error)
                }
                Err(e) => (None, FnoError::Unreachable(outbound::error_text(e))),
            };
            if attempt >= ATTEMPTS {
                return Err(error);
            }
            RETRY.sleep(attempt, retry_after).await;
        }
    }
}
