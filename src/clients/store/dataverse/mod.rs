//! The store in Dataverse: connections and captures as rows of two custom tables (see
//! [`crate::clients::dataverse::provision`]), addressed by their alternate key.
//!
//! The record's ETag is the [`Version`]: every update sends `If-Match: W/"n"`, so a lost
//! race answers 412 and becomes [`StoreError::Conflict`], exactly as the SQLite version
//! column does. That is the refresh lease across scaled-out instances.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use crate::clients::dataverse::provision::{CAPTURES, CONNECTIONS, EXPECTATIONS, Schema, TENANTS, verify};
use crate::domain::{
    Census, ChangeFeed, Changes, Connection, ConnectionStore, Due, Lease, ListFilter, PendingAuth, Status, StoreError,
    StoreResult, Version,
};
use crate::support::cache::Cache;

const SCHEMA_OK_FOR: std::time::Duration = std::time::Duration::from_secs(600);
const SCHEMA_MISSING_FOR: std::time::Duration = std::time::Duration::from_secs(10);
use crate::clients::dataverse::{Condition, Dataverse, DataverseError, Key, Record, literal};

mod captures;
mod tenants;

/// The connections table's last-use columns, written by `record_use` only.
const USAGE_COLUMNS: [&str; 2] = ["lastusedat", "lastusedby"];

pub struct DataverseStore {
    pub(super) dv: Arc<Dataverse>,
    pub(super) schema: Schema,
    pub(super) connections: String,
    pub(super) captures: String,
    pub(super) expectations: String,
    pub(super) tenants: String,
    pub(super) key: String,
    pub(super) connection_columns: Vec<String>,
    /// The same without `lastusedat`/`lastusedby`, for a table made before them.
    connection_columns_unused: Vec<String>,
    /// Whether the connections table has the last-use columns. A table made by an older
    /// `handler provision` has not (Dataverse answers 400 `0x80060888` "Could not find a
    /// property named ..." for them): reads then leave them out and uses are not kept,
    /// with one warning naming the fix, instead of every read failing.
    usage_columns: std::sync::atomic::AtomicBool,
    pub(super) capture_columns: Vec<String>,
    pub(super) tenant_columns: Vec<String>,
    /// The last answer of [`verify`]: whether the tables and keys exist.
    pub(super) schema_checked: Cache<(), Result<(), crate::clients::dataverse::provision::SchemaGap>>,
    /// Connection names by primary id, as the change feed saw them: deletions come back
    /// by primary id only.
    pub(super) feed_names: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

impl DataverseStore {
    pub fn new(dv: Arc<Dataverse>, schema: Schema) -> DataverseStore {
        let key = schema.column("name");
        let with_key = |cols: &[crate::clients::dataverse::provision::Column]| {
            std::iter::once(key.clone()).chain(cols.iter().map(|c| schema.column(c.name))).collect::<Vec<_>>()
        };
        DataverseStore {
            connections: schema.entity_set(&CONNECTIONS),
            captures: schema.entity_set(&CAPTURES),
            expectations: schema.entity_set(&EXPECTATIONS),
            tenants: schema.entity_set(&TENANTS),
            tenant_columns: with_key(TENANTS.columns),
            connection_columns: with_key(CONNECTIONS.columns),
            connection_columns_unused: with_key(CONNECTIONS.columns)
                .into_iter()
                .filter(|c| !USAGE_COLUMNS.iter().any(|u| *c == schema.column(u)))
                .collect(),
            usage_columns: std::sync::atomic::AtomicBool::new(true),
            capture_columns: with_key(CAPTURES.columns),
            key,
            schema,
            dv,
            schema_checked: Cache::new(1),
            feed_names: Default::default(),
        }
    }

    pub fn client(&self) -> &Arc<Dataverse> {
        &self.dv
    }

    /// Deletes the rows of `set` that match `filter`, a batch of at most 500 (the timer
    /// comes back for the rest); returns how many.
    async fn delete_where(&self, set: &str, filter: &str) -> StoreResult<u64> {
        let rows = self.dv.query(set, filter, &[self.key.as_str()], None, 500).await.map_err(map_err)?;
        let mut deleted = 0;
        for r in rows {
            if let Some(key) = r.str(&self.key)
                && self.dv.delete(set, &Key::Alternate(&self.key, key), None).await.map_err(map_err)?
            {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    pub(super) fn c(&self, name: &str) -> String {
        self.schema.column(name)
    }

    pub(super) fn select(cols: &[String]) -> Vec<&str> {
        cols.iter().map(String::as_str).collect()
    }

    /// A connection as a row of this store's table, its alternate key included: what a
    /// bulk load (the benchmarks' seeding) writes.
    pub fn connection_row(&self, conn: &Connection) -> Value {
        let mut row = self.connection_fields(conn);
        row[self.key.as_str()] = json!(conn.id);
        row
    }

    /// The connections table's entity set (`dc_connections`).
    pub fn connections_set(&self) -> &str {
        &self.connections
    }

    fn connection_fields(&self, conn: &Connection) -> Value {
        let mut m = Map::new();
        let mut put = |name: &str, v: Value| {
            m.insert(self.c(name), v);
        };
        put("provider", json!(conn.provider));
        put("owner", json!(conn.owner));
        put("scopes", json!(serde_json::to_string(&conn.scopes).unwrap_or_else(|_| "[]".into())));
        put("status", json!(conn.status.as_str()));
        put("statusdetail", json!(conn.status_detail));
        put("tokens", json!(conn.tokens));
        put("accessexpiresat", json!(conn.access_expires_at));
        put("hasrefreshtoken", json!(conn.has_refresh_token));
        put("statehash", json!(conn.pending.as_ref().map(|p| &p.state_hash)));
        put("pendingsealed", json!(conn.pending.as_ref().map(|p| &p.sealed)));
        put("stateexpiresat", json!(conn.pending.as_ref().map(|p| p.expires_at)));
        put("leaseowner", json!(conn.lease.as_ref().map(|l| &l.owner)));
        put("leaseuntilms", json!(conn.lease.as_ref().map(|l| l.until_ms)));
        put("failures", json!(conn.failures));
        put("nextattemptat", json!(conn.next_attempt_at));
        put("createdat", json!(conn.created_at));
        put("updatedat", json!(conn.updated_at));
        put("refreshedat", json!(conn.refreshed_at));
        Value::Object(m)
    }

    fn connection_from(&self, r: Record) -> Connection {
        let s = |n: &str| r.str(&self.c(n)).map(str::to_string);
        let i = |n: &str| r.i64(&self.c(n));
        let pending = match (s("statehash"), s("pendingsealed"), i("stateexpiresat")) {
            (Some(state_hash), Some(sealed), Some(expires_at)) => Some(PendingAuth { state_hash, sealed, expires_at }),
            _ => None,
        };
        let lease = match (s("leaseowner"), i("leaseuntilms")) {
            (Some(owner), Some(until_ms)) => Some(Lease { owner, until_ms }),
            _ => None,
        };
        Connection {
            id: s("name").unwrap_or_default(),
            provider: s("provider").unwrap_or_default(),
            owner: s("owner"),
            scopes: s("scopes").and_then(|v| serde_json::from_str(&v).ok()).unwrap_or_default(),
            status: s("status").and_then(|v| Status::parse(&v)).unwrap_or(Status::Failed),
            status_detail: s("statusdetail"),
            tokens: s("tokens"),
            access_expires_at: i("accessexpiresat"),
            has_refresh_token: r.bool(&self.c("hasrefreshtoken")),
            pending,
            lease,
            failures: i("failures").unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
            next_attempt_at: i("nextattemptat"),
            created_at: i("createdat").unwrap_or(0),
            updated_at: i("updatedat").unwrap_or(0),
            refreshed_at: i("refreshedat"),
            last_used_at: i("lastusedat"),
            last_used_by: s("lastusedby"),
            version: Version(r.etag),
        }
    }

    async fn query_connections(
        &self,
        filter: &str,
        orderby: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<Connection>> {
        let rows = match self.dv.query(&self.connections, filter, &self.read_columns(), orderby, limit).await {
            Err(e) if self.lacks_usage_columns(&e) => {
                self.dv.query(&self.connections, filter, &self.read_columns(), orderby, limit).await
            }
            other => other,
        }
        .map_err(map_err)?;
        Ok(rows.into_iter().map(|r| self.connection_from(r)).collect())
    }

    /// The columns a read of connections selects.
    fn read_columns(&self) -> Vec<&str> {
        if self.usage_columns.load(std::sync::atomic::Ordering::Relaxed) {
            Self::select(&self.connection_columns)
        } else {
            Self::select(&self.connection_columns_unused)
        }
    }

    /// Whether `e` says the table has no last-use columns; if so, reads leave them out
    /// from now on (the caller reads again).
    fn lacks_usage_columns(&self, e: &DataverseError) -> bool {
        let DataverseError::Service { status: 400, message, .. } = e else { return false };
        if !USAGE_COLUMNS.iter().any(|u| message.contains(&format!("'{}'", self.c(u)))) {
            return false;
        }
        if self.usage_columns.swap(false, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                table = %self.connections,
                "the connections table has no last-use columns ({}, {}): run `handler provision` to add them; until then the last use of a connection is not kept",
                self.c("lastusedat"),
                self.c("lastusedby")
            );
        }
        true
    }
}

pub(super) fn map_err(e: DataverseError) -> StoreError {
    if let DataverseError::Throttled { retry_after, .. } = &e {
        return StoreError::Busy { retry_after: *retry_after, detail: e.to_string() };
    }
    match e.status() {
        _ if e.is_transient() => StoreError::Unavailable(e.to_string()),
        Some(412) => StoreError::Conflict(e.to_string()),
        Some(404) => StoreError::NotFound(e.to_string()),
        // 0x80072560 "not a member", 0x80040225 "disabled", 0x80042f09 "no roles": the
        // organisation's application user, not a fault of ours.
        Some(403) => StoreError::Refused(match &e {
            DataverseError::Service { code, message, .. } => format!("{code}: {message}"),
            other => other.to_string(),
        }),
        _ => StoreError::Other(e.to_string()),
    }
}

#[async_trait]
impl ConnectionStore for DataverseStore {
    fn kind(&self) -> &'static str {
        "dataverse"
    }

    async fn ping(&self) -> StoreResult<()> {
        self.dv.who_am_i().await.map(|_| ()).map_err(map_err)
    }

    async fn check_schema(&self) -> StoreResult<()> {
        let verdict = self
            .schema_checked
            .get_or_try_insert_with(&(), || async {
                let verdict = verify(&self.dv, &self.schema).await.map_err(map_err)?;
                // Provisioned stays provisioned; a missing table is asked about again soon.
                let ttl = if verdict.is_ok() { SCHEMA_OK_FOR } else { SCHEMA_MISSING_FOR };
                Ok::<_, StoreError>((verdict, ttl))
            })
            .await?;
        verdict.map_err(|gap| StoreError::NotProvisioned(gap.to_string()))
    }

    async fn get(&self, id: &str) -> StoreResult<Option<Connection>> {
        let key = Key::Alternate(&self.key, id);
        let rec = match self.dv.get(&self.connections, &key, &self.read_columns()).await {
            Err(e) if self.lacks_usage_columns(&e) => self.dv.get(&self.connections, &key, &self.read_columns()).await,
            other => other,
        }
        .map_err(map_err)?;
        Ok(rec.map(|r| self.connection_from(r)))
    }

    async fn record_use(&self, id: &str, at: i64, by: &str) -> StoreResult<()> {
        if !self.usage_columns.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let fields = json!({ self.c("lastusedat"): at, self.c("lastusedby"): by });
        match self
            .dv
            .write(&self.connections, &Key::Alternate(&self.key, id), &fields, Condition::Exists, &[&self.key])
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) if self.lacks_usage_columns(&e) => Ok(()),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn find_by_state(&self, state_hash: &str) -> StoreResult<Option<Connection>> {
        let filter = format!("{} eq {}", self.c("statehash"), literal(state_hash));
        let found = self.query_connections(&filter, None, 2).await?;
        // Dataverse compares strings case-insensitively; the hash must match exactly.
        Ok(found.into_iter().find(|c| c.pending.as_ref().is_some_and(|p| p.state_hash == state_hash)))
    }

    async fn insert(&self, conn: &Connection) -> StoreResult<Version> {
        let fields = self.connection_fields(conn);
        let rec = self
            .dv
            .write(&self.connections, &Key::Alternate(&self.key, &conn.id), &fields, Condition::NotExists, &[&self.key])
            .await
            .map_err(|e| match map_err(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!("connection {:?} already exists", conn.id)),
                other => other,
            })?;
        Ok(Version(rec.etag))
    }

    async fn update(&self, conn: &Connection, expected: &Version) -> StoreResult<Version> {
        let fields = self.connection_fields(conn);
        let rec = self
            .dv
            .write(
                &self.connections,
                &Key::Alternate(&self.key, &conn.id),
                &fields,
                Condition::Version(&expected.0),
                &[&self.key],
            )
            .await
            .map_err(map_err)?;
        Ok(Version(rec.etag))
    }

    async fn delete(&self, id: &str, expected: &Version) -> StoreResult<()> {
        match self.dv.delete(&self.connections, &Key::Alternate(&self.key, id), Some(&expected.0)).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(StoreError::NotFound(format!("connection {id:?}"))),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn list(&self, f: &ListFilter) -> StoreResult<Vec<Connection>> {
        let mut clauses = Vec::new();
        if let Some(p) = &f.provider {
            clauses.push(format!("{} eq {}", self.c("provider"), literal(p)));
        }
        if let Some(o) = &f.owner {
            clauses.push(format!("{} eq {}", self.c("owner"), literal(o)));
        }
        if let Some(s) = f.status {
            clauses.push(format!("{} eq {}", self.c("status"), literal(s.as_str())));
        }
        if let Some((created, id)) = &f.after {
            let (c, k) = (self.c("createdat"), &self.key);
            clauses.push(format!("({c} gt {created} or ({c} eq {created} and {k} gt {}))", literal(id)));
        }
        let limit = if f.limit == 0 { 1000 } else { f.limit };
        let order = format!("{} asc,{} asc", self.c("createdat"), self.key);
        self.query_connections(&clauses.join(" and "), Some(&order), limit).await
    }

    async fn due_for_refresh(&self, due: &Due) -> StoreResult<Vec<Connection>> {
        let Due { before, idle_before, ready_at, limit } = *due;
        let mut filter = format!(
            "{status} eq 'active' and {has} eq true and ({exp} lt {before}",
            status = self.c("status"),
            has = self.c("hasrefreshtoken"),
            exp = self.c("accessexpiresat"),
        );
        if idle_before > i64::MIN {
            filter.push_str(&format!(
                " or {r} lt {idle_before} or ({r} eq null and {c} lt {idle_before})",
                r = self.c("refreshedat"),
                c = self.c("createdat"),
            ));
        }
        filter.push(')');
        if ready_at < i64::MAX {
            let next = self.c("nextattemptat");
            filter.push_str(&format!(" and ({next} eq null or {next} le {ready_at})"));
        }
        let order = format!("{} asc", self.c("accessexpiresat"));
        self.query_connections(&filter, Some(&order), limit).await
    }

    async fn expired_pending(&self, now: i64, limit: usize) -> StoreResult<Vec<Connection>> {
        let filter = format!("{} lt {now}", self.c("stateexpiresat"));
        self.query_connections(&filter, None, limit).await
    }

    async fn census(&self, now: i64) -> StoreResult<Census> {
        const CAP: u64 = 5000;
        let status = self.c("status");
        let mut census = Census::default();
        for s in [Status::Pending, Status::Active, Status::NeedsReauth, Status::Failed] {
            let filter = format!("{status} eq {}", literal(s.as_str()));
            let n = self.dv.count(&self.connections, &filter, &self.key).await.map_err(map_err)?;
            census.by_status.insert(s.as_str(), n);
        }
        let backoff = format!("{status} eq 'active' and {} gt {now}", self.c("nextattemptat"));
        census.in_backoff = self.dv.count(&self.connections, &backoff, &self.key).await.map_err(map_err)?;
        let refreshed = self.c("refreshedat");
        let oldest = self
            .dv
            .query(
                &self.connections,
                &format!("{status} eq 'active' and {refreshed} ne null"),
                &[refreshed.as_str()],
                Some(&format!("{refreshed} asc")),
                1,
            )
            .await
            .map_err(map_err)?;
        census.oldest_token_at = oldest.first().and_then(|r| r.i64(&refreshed));
        if census.by_status.values().chain([&census.in_backoff]).any(|n| *n >= CAP) {
            census.capped_at = Some(CAP);
        }
        Ok(census)
    }
}

#[async_trait]
impl ChangeFeed for DataverseStore {
    async fn connection_changes(&self, cursor: Option<&str>) -> StoreResult<Option<(Changes, String)>> {
        let id_col = self.schema.primary_id(&CONNECTIONS);
        let delta = self.dv.changes(&self.connections, &[&self.key, &id_col], cursor).await.map_err(map_err)?;
        let mut names = self.feed_names.lock().unwrap_or_else(|e| e.into_inner());
        if cursor.is_none() {
            names.clear();
        }
        let mut ids = Vec::new();
        for r in &delta.changed {
            if let (Some(guid), Some(name)) = (r.str(&id_col), r.str(&self.key)) {
                names.insert(guid.to_ascii_lowercase(), name.to_string());
                ids.push((name.to_string(), Some(Version(r.etag.clone())).filter(|v| !v.0.is_empty())));
            }
        }
        let mut unknown = false;
        for guid in &delta.deleted {
            match names.remove(&guid.to_ascii_lowercase()) {
                Some(name) => ids.push((name, None)),
                None => unknown = true,
            }
        }
        // The first answer is everything there is: nothing has changed yet.
        let changes = match (cursor, unknown) {
            (None, _) => Changes::Ids(Vec::new()),
            (Some(_), true) => Changes::All,
            (Some(_), false) => Changes::Ids(ids),
        };
        Ok(Some((changes, delta.link)))
    }
}
