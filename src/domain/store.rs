//! The store's ports: one small trait per kind of record ([`ConnectionStore`],
//! [`ChangeFeed`], [`CaptureStore`], [`ExpectationStore`], [`TenantStore`]), each taken
//! by the rules that use it, and implemented by `clients::store`.
//!
//! Every store offers them with the same concurrency rule: each
//! connection carries an opaque [`Version`] (a version counter in SQLite, the ETag in
//! Dataverse), and an update names the version it read. An update against a changed
//! record fails with [`StoreError::Conflict`] instead of overwriting it. That one rule
//! is what makes the refresh lease safe across scaled-out instances.
//!
//! Secrets are sealed by [`crate::support::crypto::Keyring`] before they get here; a store only
//! ever sees ciphertext.

use async_trait::async_trait;

use super::model::{Capture, Connection, Status, Version};
use super::tenant::Tenant;
use serde::Serialize;

/// What the timer asks for: active connections with a refresh token that expire before
/// `before`, or that were last refreshed before `idle_before` (keep-alive), leaving out
/// those backing off past `ready_at` (their next attempt is later), at most `limit`, the
/// soonest to expire first.
#[derive(Debug, Clone, Copy)]
pub struct Due {
    pub before: i64,
    pub idle_before: i64,
    pub ready_at: i64,
    pub limit: usize,
}

/// Filters for listing connections.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub provider: Option<String>,
    pub owner: Option<String>,
    pub status: Option<Status>,
    pub limit: usize,
    /// Only connections after this one in the list's order (created, then id): the next
    /// page after a page that ended there.
    pub after: Option<(i64, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} was not found")]
    NotFound(String),
    /// The record changed since it was read (or already exists, on insert).
    #[error("{0} was changed by someone else")]
    Conflict(String),
    /// Worth retrying: the store is busy, throttled or unreachable.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("store error: {0}")]
    Other(String),
    /// The store could not be opened at start-up (a path, a permission, a schema).
    #[error("{0}")]
    Open(String),
    /// The store's tables are not there (yet): `handler provision` creates them.
    #[error("the store's tables are not provisioned: {0}; run `handler provision`")]
    NotProvisioned(String),
    /// The store asked us to wait (Dataverse's service protection) longer than a request
    /// waits: try again after `retry_after`.
    #[error("the store is busy: {detail}")]
    Busy { detail: String, retry_after: std::time::Duration },
    /// The organisation refuses the app (its application user is missing, disabled or
    /// without a role): the organisation's state, not ours. Its code and message.
    #[error("the organisation refuses the app ({0})")]
    Refused(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Busy { .. })
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Connections: the records the refresh lease and the callback rely on.
#[async_trait]
pub trait ConnectionStore: Send + Sync + 'static {
    /// A short name for logs and health (`sqlite`, `dataverse`).
    fn kind(&self) -> &'static str;

    /// Cheap round trip proving the store answers.
    async fn ping(&self) -> StoreResult<()>;

    /// Counts for operators, at `now` (Unix seconds).
    async fn census(&self, now: i64) -> StoreResult<Census>;

    /// Whether the tables and keys the store needs exist ([`StoreError::NotProvisioned`]
    /// if not). Cheap enough for every health probe: a store that reads metadata caches
    /// the answer. The embedded store creates its tables when it opens.
    async fn check_schema(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn get(&self, id: &str) -> StoreResult<Option<Connection>>;

    /// The connection whose pending authorization has this state hash.
    async fn find_by_state(&self, state_hash: &str) -> StoreResult<Option<Connection>>;

    /// Creates a connection; [`StoreError::Conflict`] when the id exists.
    async fn insert(&self, conn: &Connection) -> StoreResult<Version>;

    /// Replaces a connection if it still has `expected`; returns the new version.
    async fn update(&self, conn: &Connection, expected: &Version) -> StoreResult<Version>;

    /// Deletes a connection if it still has `expected`.
    async fn delete(&self, id: &str, expected: &Version) -> StoreResult<()>;

    /// Records a use of the connection: `last_used_at` and `last_used_by` alone, without
    /// the record's version (a use must not make a refresh's write conflict for long: the
    /// writer re-reads and writes again, keeping these two fields). `Ok` when the record
    /// is gone (nothing to note).
    async fn record_use(&self, id: &str, at: i64, by: &str) -> StoreResult<()>;

    async fn list(&self, filter: &ListFilter) -> StoreResult<Vec<Connection>>;

    /// The connections the timer should refresh (see [`Due`]).
    async fn due_for_refresh(&self, due: &Due) -> StoreResult<Vec<Connection>>;

    /// Connections whose pending authorization expired before `now`.
    async fn expired_pending(&self, now: i64, limit: usize) -> StoreResult<Vec<Connection>>;

    /// How many sealed values (token sets and pending authorizations) each key id seals,
    /// read from the store itself: what decides whether a key may be removed. The default
    /// pages through every connection; a store that can count in place does so.
    async fn sealed_key_counts(&self) -> StoreResult<std::collections::BTreeMap<String, u64>> {
        let mut counts = std::collections::BTreeMap::new();
        let mut after = None;
        loop {
            let page = self.list(&ListFilter { limit: 500, after: after.clone(), ..Default::default() }).await?;
            after = page.last().map(|c| (c.created_at, c.id.clone()));
            for c in &page {
                let sealed = [c.tokens.as_deref(), c.pending.as_ref().map(|p| p.sealed.as_str())];
                for id in sealed.into_iter().flatten().filter_map(crate::support::crypto::Keyring::sealed_with) {
                    *counts.entry(id.to_string()).or_default() += 1;
                }
            }
            if page.len() < 500 {
                return Ok(counts);
            }
        }
    }
}

/// What other instances change in the connections: followed so cached tokens stay true.
#[async_trait]
pub trait ChangeFeed: Send + Sync + 'static {
    /// The connections other instances changed (or deleted) since `cursor`, and the cursor
    /// to ask with next time; `cursor` `None` starts following now. `Ok(None)`: this store
    /// cannot tell.
    async fn connection_changes(&self, cursor: Option<&str>) -> StoreResult<Option<(Changes, String)>> {
        let _ = cursor;
        Ok(None)
    }
}

/// Captures (capture mode): once per key, claimed for delivery.
#[async_trait]
pub trait CaptureStore: Send + Sync + 'static {
    /// Stores a capture unless one with the same key exists; true when it was new. The
    /// key is unique in the store (SQLite's primary key, Dataverse's alternate key), so two
    /// callers inserting one key at once get one `true`.
    async fn insert_capture(&self, capture: &Capture) -> StoreResult<bool>;

    async fn captures_by_state(&self, state: &str) -> StoreResult<Vec<Capture>>;

    /// Captures not delivered yet, oldest first; with `ready_at_ms`, only those nobody
    /// holds a claim on at that time (Unix ms).
    async fn undelivered_captures(&self, limit: usize, ready_at_ms: Option<i64>) -> StoreResult<Vec<Capture>>;

    /// Claims an undelivered capture until `until_ms` if nobody holds it at `now_ms`:
    /// true for exactly one of any number of instances asking at once (a conditional
    /// update in SQLite, a version-checked one in Dataverse).
    async fn claim_capture(&self, key: &str, now_ms: i64, until_ms: i64) -> StoreResult<bool>;

    /// After a failed delivery by the claim's holder: nobody tries again before
    /// `not_before_ms`; `attempts` failed so far.
    async fn release_capture(&self, key: &str, not_before_ms: i64, attempts: u32) -> StoreResult<()>;

    /// Records the delivery (and ends any claim).
    async fn mark_capture_delivered(&self, key: &str, at: i64) -> StoreResult<()>;

    /// Deletes delivered captures received before `before`; returns how many.
    async fn purge_captures(&self, before: i64) -> StoreResult<u64>;
}

/// The capture-mode states Dynamics registered (by their hash).
#[async_trait]
pub trait ExpectationStore: Send + Sync + 'static {
    /// Registers a capture-mode state (by its hash) as expected until `expires_at`.
    async fn expect_state(&self, state_hash: &str, expires_at: i64) -> StoreResult<()>;

    /// Until when a state (by its hash) is expected, if it was registered.
    async fn expected_until(&self, state_hash: &str) -> StoreResult<Option<i64>>;

    /// Deletes expectations that ended before `now`, at most a batch; returns how many.
    async fn purge_expectations(&self, now: i64) -> StoreResult<u64>;
}

/// Customer tenants (multi-tenant deployments): only in the deployment's own store.
#[async_trait]
pub trait TenantStore: Send + Sync + 'static {
    async fn get_tenant(&self, id: &str) -> StoreResult<Option<Tenant>>;
    /// Every tenant, by id (a deployment serves tens to thousands, never millions).
    async fn list_tenants(&self) -> StoreResult<Vec<Tenant>>;
    /// Creates the record; [`StoreError::Conflict`] when the tenant is already there.
    async fn insert_tenant(&self, t: &Tenant) -> StoreResult<Version>;
    /// Replaces the record if it still has version `expected`.
    async fn update_tenant(&self, t: &Tenant, expected: &Version) -> StoreResult<Version>;
    /// Whether there was a record to delete.
    async fn delete_tenant(&self, id: &str) -> StoreResult<bool>;
}

/// The deployment's own store: everything. A customer's organisation is reached only
/// as a [`ConnectionStore`] (it holds connections, and nothing else of ours).
pub trait Store: ConnectionStore + ChangeFeed + CaptureStore + ExpectationStore + TenantStore {}

impl<T: ConnectionStore + ChangeFeed + CaptureStore + ExpectationStore + TenantStore> Store for T {}

/// Counts for operators (`/api/health`): nothing that names a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Census {
    /// Connections by status (`pending`, `active`, `needs_reauth`, `failed`).
    pub by_status: std::collections::BTreeMap<&'static str, u64>,
    /// Active connections whose refresh failed and waits for its next attempt.
    pub in_backoff: u64,
    /// When the least recently refreshed active connection got its tokens (Unix seconds).
    pub oldest_token_at: Option<i64>,
    /// Counts stop at this (Dataverse counts up to 5,000); `None` when exact.
    pub capped_at: Option<u64>,
}

/// What a change feed says changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// These connections, each with the version it has now (`None`: deleted, or not
    /// known). A cached entry of that very version is the instance's own write coming
    /// back through the feed, and stays.
    Ids(Vec<(String, Option<Version>)>),
    /// Something changed; the store cannot say what.
    All,
}
