//! Signed event notifications to a URL (`WEBHOOK_URL`): a connection changed status.
//!
//! Each event is a JSON object POSTed with
//! `X-DC-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>.<raw body>")>`, the
//! scheme Stripe-style receivers know: the receiver recomputes the MAC over the raw body,
//! refuses a `t` older than a few minutes (a replayed request), and keeps the event `id`s
//! it has seen (a replay inside that window). Deliveries run on a background task
//! through a bounded queue, so a slow receiver never holds a request or a refresh;
//! failures are retried with backoff, each attempt signed afresh.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio::sync::mpsc;
use url::Url;

use crate::support::crypto;
use crate::support::outbound::{Backoff, one_line};
use crate::support::time::rfc3339;

/// Events waiting for delivery past which new ones are dropped (and logged).
const QUEUE: usize = 1000;
/// Attempts per event, and the waits between them (1 s, 2 s, ... 60 s).
const ATTEMPTS: u32 = 8;
const RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60)).jittered();

/// One event as sent.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub occurred_at: String,
    pub connection_id: String,
    pub provider: String,
    pub owner: Option<String>,
    pub previous_status: Option<&'static str>,
    /// `active`, `needs_reauth`, `failed`, `pending` or `deleted`.
    pub status: &'static str,
    pub detail: Option<String>,
}

impl Event {
    pub fn status_changed(
        connection_id: String,
        provider: String,
        owner: Option<String>,
        previous: Option<&'static str>,
        status: &'static str,
        detail: Option<String>,
        at: i64,
    ) -> Event {
        Event {
            id: format!("evt_{}", crypto::random_hex::<16>()),
            kind: "connection.status_changed",
            occurred_at: rfc3339(at),
            connection_id,
            provider,
            owner,
            previous_status: previous,
            status,
            detail,
        }
    }
}

/// The signature header's value for `body` sent at `t`.
pub fn signature(key: &[u8], t: i64, body: &[u8]) -> String {
    let mac = crypto::hmac_sha256(key, &[t.to_string().as_bytes(), b".", body]);
    format!("t={t},v1={}", mac.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

pub struct Webhook {
    queue: mpsc::Sender<Event>,
}

impl Webhook {
    /// Starts the delivery task. Call inside the runtime.
    pub fn start(url: Url, key: SecretString, http: reqwest::Client) -> Webhook {
        let (queue, mut rx) = mpsc::channel::<Event>(QUEUE);
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                deliver(&http, &url, key.expose_secret().as_bytes(), &event).await;
            }
        });
        Webhook { queue }
    }

    pub fn send(&self, event: Event) {
        if let Err(e) = self.queue.try_send(event) {
            let id = match &e {
                mpsc::error::TrySendError::Full(ev) | mpsc::error::TrySendError::Closed(ev) => ev.id.clone(),
            };
            tracing::warn!(event = %id, "webhook queue full: event dropped");
        }
    }
}

async fn deliver(http: &reqwest::Client, url: &Url, key: &[u8], event: &Event) {
    let Ok(body) = serde_json::to_vec(event) else { return };
    for attempt in 1..=ATTEMPTS {
        let t = crate::support::time::now();
        let sent = crate::support::outbound::send(
            http.post(url.clone())
                .header("Content-Type", "application/json")
                .header("X-DC-Event-Id", &event.id)
                .header("X-DC-Signature", signature(key, t, &body))
                .body(body.clone()),
        )
        .await;
        let retry_after = match sent {
            Ok(r) if r.status().is_success() => {
                tracing::debug!(event = %event.id, connection = %event.connection_id, "webhook delivered");
                return;
            }
            // The receiver refused this event for good (bad signature, unknown route).
            Ok(r) if r.status().is_client_error() && !matches!(r.status().as_u16(), 408 | 429) => {
                tracing::warn!(event = %event.id, status = r.status().as_u16(), "webhook refused; not retried");
                return;
            }
            Ok(r) => {
                tracing::warn!(event = %event.id, status = r.status().as_u16(), attempt, "webhook failed; retrying");
                crate::support::outbound::retry_after(r.headers())
            }
            Err(e) => {
                tracing::warn!(event = %event.id, attempt, error = %one_line(&e.to_string()), "webhook unreachable; retrying");
                None
            }
        };
        if attempt < ATTEMPTS {
            tokio::time::sleep(RETRY.wait(attempt, retry_after)).await;
        }
    }
    tracing::error!(event = %event.id, connection = %event.connection_id, "webhook not delivered after {ATTEMPTS} attempts");
}
