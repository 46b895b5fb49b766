//! The records the product keeps: connections (with their pending authorizations and
//! refresh leases) and captures, each with its store's concurrency [`Version`]. Secrets
//! in them are always sealed ([`crate::support::crypto::Keyring`]).

use serde::{Deserialize, Serialize};

/// The store's concurrency token for one connection record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Version(pub String);

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Created; the user has not completed the authorization yet.
    Pending,
    /// Tokens are stored and refreshable.
    Active,
    /// The provider refused the refresh token (`invalid_grant`): a person must reconnect.
    NeedsReauth,
    /// The authorization failed (the provider sent an error, or the code exchange failed).
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Active => "active",
            Status::NeedsReauth => "needs_reauth",
            Status::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "pending" => Status::Pending,
            "active" => Status::Active,
            "needs_reauth" => Status::NeedsReauth,
            "failed" => Status::Failed,
            _ => return None,
        })
    }
}

/// An authorization the user has been sent to and has not finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAuth {
    /// SHA-256 of the `state` (the state itself is never stored).
    pub state_hash: String,
    /// Sealed JSON: the PKCE verifier and the validated `return_url`.
    pub sealed: String,
    pub expires_at: i64,
}

/// A connection's claim on the right to refresh its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    /// Unix milliseconds after which the lease is abandoned.
    pub until_ms: i64,
}

/// One OAuth connection: a provider, an owner, and (once authorized) sealed tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub id: String,
    pub provider: String,
    pub owner: Option<String>,
    pub scopes: Vec<String>,
    pub status: Status,
    /// The provider's message for the last failure, for people to read.
    pub status_detail: Option<String>,
    /// Sealed token set (see `oauth::TokenSet`).
    pub tokens: Option<String>,
    pub access_expires_at: Option<i64>,
    pub has_refresh_token: bool,
    pub pending: Option<PendingAuth>,
    pub lease: Option<Lease>,
    /// Consecutive transient refresh failures, and when the next try is allowed.
    pub failures: u32,
    pub next_attempt_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    pub refreshed_at: Option<i64>,
    /// The last use of the connection's token (handed out, proxied, an agent's call) and
    /// who used it (the audit record's actor), kept at most once a minute per connection
    /// and instance. Stores write these only through `record_use`, never with the record.
    pub last_used_at: Option<i64>,
    pub last_used_by: Option<String>,
    pub version: Version,
}

impl Connection {
    /// A record not stored yet, created at `now`: no tokens, no pending authorization, no
    /// lease, no failures. Callers set what their kind of record adds.
    pub fn new(id: &str, provider: &str, owner: Option<String>, scopes: Vec<String>, status: Status, now: i64) -> Self {
        Connection {
            id: id.into(),
            provider: provider.into(),
            owner,
            scopes,
            status,
            status_detail: None,
            tokens: None,
            access_expires_at: None,
            has_refresh_token: false,
            pending: None,
            lease: None,
            failures: 0,
            next_attempt_at: None,
            created_at: now,
            updated_at: now,
            refreshed_at: None,
            last_used_at: None,
            last_used_by: None,
            version: Version::default(),
        }
    }
}

/// What an OAuth redirect delivered for a `state` we did not issue (capture mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    /// De-duplication key: a fingerprint of the code (or of state + error).
    pub key: String,
    pub state: String,
    /// Sealed authorization code.
    pub code: Option<String>,
    pub iss: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
    pub received_at: i64,
    /// When it reached its destination (the store itself, or Finance & Operations).
    pub delivered_at: Option<i64>,
    /// Until when (Unix ms) nobody else may deliver it: an instance's claim while it
    /// delivers, or after a failed delivery the earliest next attempt (`Retry-After`).
    pub claim_until_ms: Option<i64>,
    /// Deliveries tried and failed so far.
    pub attempts: u32,
}
