//! Signed event notifications to a URL (`WEBHOOK_URL`): a connection changed status.
//!
//! Each event is a JSON object POSTed with
//! `X-DC-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>.<raw body>")>`, the
//! scheme Stripe-style receivers know: the receiver recomputes the MAC over the raw body,
//! refuses a `t` older than a few minutes (a replayed request), and keeps the event `id`s
//! it has seen (a replay inside that window).
//!
//! Delivery never holds a request or a refresh, and one dead receiver route or one
//! refused event never holds back the others: each connection's events form a lane,
//! delivered in order (a connection's `sequence` only grows), while lanes run side by
//! side, at most [`AT_ONCE`] requests in flight; an event being retried waits on its own
//! schedule (1 s doubling to 60 s, 8 attempts) without taking a place, and at once when
//! another delivery succeeds (the receiver is back). At most [`QUEUE`] events wait in
//! all; past that new ones are dropped and logged.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio::sync::Semaphore;
use url::Url;

use crate::support::crypto;
use crate::support::outbound::{Backoff, one_line};
use crate::support::time::rfc3339;

/// Events waiting for delivery, in all lanes, past which new ones are dropped (and logged).
const QUEUE: usize = 1000;
/// Deliveries in flight at once.
pub const AT_ONCE: usize = 8;
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
    /// The customer tenant whose organisation keeps the connection (multi-tenant
    /// deployments); `null` for the deployment's own.
    pub tenant: Option<String>,
    /// Grows with each event of this connection (microseconds since the epoch, made
    /// strictly increasing per connection): a receiver orders one connection's events by it.
    pub sequence: u64,
    pub provider: String,
    pub owner: Option<String>,
    pub previous_status: Option<&'static str>,
    /// `active`, `needs_reauth`, `failed`, `pending` or `deleted`.
    pub status: &'static str,
    pub detail: Option<String>,
}

impl Event {
    #[allow(clippy::too_many_arguments)]
    pub fn status_changed(
        connection_id: String,
        tenant: Option<String>,
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
            tenant,
            sequence: 0,
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
    shared: Arc<Shared>,
}

struct Shared {
    http: reqwest::Client,
    url: Url,
    key: SecretString,
    places: Semaphore,
    lanes: Mutex<Lanes>,
    /// Raised when a delivery succeeds: lanes waiting to retry try again at once (the
    /// receiver is back), rather than each at the end of its own back-off.
    recovered: tokio::sync::Notify,
}

#[derive(Default)]
struct Lanes {
    /// Each connection's events not delivered yet; a lane is here while its task runs.
    waiting: HashMap<String, VecDeque<Event>>,
    /// Events waiting in all lanes.
    count: usize,
    /// The last sequence given to each connection's event.
    last: HashMap<String, u64>,
}

impl Webhook {
    /// Ready to deliver; lanes are spawned on the current runtime as events come.
    pub fn start(url: Url, key: SecretString, http: reqwest::Client) -> Webhook {
        Webhook {
            shared: Arc::new(Shared {
                http,
                url,
                key,
                places: Semaphore::new(AT_ONCE),
                lanes: Mutex::default(),
                recovered: tokio::sync::Notify::new(),
            }),
        }
    }

    pub fn send(&self, mut event: Event) {
        let lane = format!("{}/{}", event.tenant.as_deref().unwrap_or(""), event.connection_id.to_ascii_lowercase());
        let start = {
            let mut lanes = self.shared.lanes.lock().unwrap_or_else(|e| e.into_inner());
            if lanes.count >= QUEUE {
                tracing::warn!(event = %event.id, "webhook queue full: event dropped");
                return;
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0);
            if lanes.last.len() > 100_000 {
                lanes.last.clear(); // time alone still orders them
            }
            let last = lanes.last.entry(lane.clone()).or_insert(0);
            event.sequence = now.max(*last + 1);
            *last = event.sequence;
            lanes.count += 1;
            match lanes.waiting.get_mut(&lane) {
                Some(queue) => {
                    queue.push_back(event);
                    false
                }
                None => {
                    lanes.waiting.insert(lane.clone(), VecDeque::from([event]));
                    true
                }
            }
        };
        if start {
            let shared = self.shared.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move { shared.run_lane(lane).await });
                }
                Err(_) => tracing::warn!("webhook event raised outside the runtime: not delivered"),
            }
        }
    }
}

impl Shared {
    /// Delivers one connection's events in order until its lane is empty.
    async fn run_lane(self: Arc<Self>, lane: String) {
        loop {
            let next = {
                let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
                match lanes.waiting.get_mut(&lane).and_then(VecDeque::pop_front) {
                    Some(event) => Some(event),
                    None => {
                        lanes.waiting.remove(&lane);
                        None
                    }
                }
            };
            let Some(event) = next else { return };
            deliver(&self, &event).await;
            let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
            lanes.count = lanes.count.saturating_sub(1);
        }
    }
}

async fn deliver(shared: &Shared, event: &Event) {
    let Ok(body) = serde_json::to_vec(event) else { return };
    let key = shared.key.expose_secret().as_bytes();
    for attempt in 1..=ATTEMPTS {
        // A place only while the request is in flight, not while waiting to retry.
        let place = shared.places.acquire().await.ok();
        let t = crate::support::time::now();
        let sent = crate::support::outbound::send(
            shared
                .http
                .post(shared.url.clone())
                .header("Content-Type", "application/json")
                .header("X-DC-Event-Id", &event.id)
                .header("X-DC-Signature", signature(key, t, &body))
                .body(body.clone()),
        )
        .await;
        drop(place);
        let retry_after = match sent {
            Ok(r) if r.status().is_success() => {
                tracing::debug!(event = %event.id, connection = %event.connection_id, "webhook delivered");
                shared.recovered.notify_waiters();
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
            tokio::select! {
                () = tokio::time::sleep(RETRY.wait(attempt, retry_after)) => {}
                () = shared.recovered.notified() => {}
            }
        }
    }
    tracing::error!(event = %event.id, connection = %event.connection_id, "webhook not delivered after {ATTEMPTS} attempts");
}
