//! The embedded store: one SQLite file, the default for local work and first runs.
//!
//! It behaves like the Dataverse store, concurrency included: every update is
//! `UPDATE ... WHERE id = ? AND version = ?`, so two handler processes sharing the file
//! race exactly as two instances racing on a Dataverse ETag. WAL mode lets readers
//! run beside a writer; a busy timeout absorbs short write contention.
//!
//! Ids, owners and providers compare case-insensitively, as Dataverse strings do, so a
//! connection id means the same thing in both stores.
//!
//! rusqlite is synchronous, so each call runs on tokio's blocking pool with the single
//! connection behind a mutex. Token reads are served from the in-memory cache in
//! `connections`, so the store is off the hot path.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Row, params};

use crate::domain::{
    Census, ChangeFeed, Changes, Connection, ConnectionStore, Due, Lease, ListFilter, PendingAuth, Status, StoreError,
    StoreResult, Version,
};

/// Due for refresh: expiring before ?1, or (keep-alive) last refreshed before ?2. Two
/// branches so each uses its index (`connections_expiry`, `connections_idle`): with an
/// `OR` the query would scan the table. An active connection always has `refreshed_at`.
fn due_query() -> String {
    format!(
        "SELECT {READ_COLUMNS} FROM connections WHERE status = 'active' AND access_expires_at < ?1 AND has_refresh_token = 1 \
         AND (next_attempt_at IS NULL OR next_attempt_at <= ?4) \
         UNION \
         SELECT {READ_COLUMNS} FROM connections WHERE status = 'active' AND refreshed_at < ?2 AND has_refresh_token = 1 \
         AND (next_attempt_at IS NULL OR next_attempt_at <= ?4) \
         ORDER BY access_expires_at LIMIT ?3"
    )
}

/// The list's filters and its page cursor (?5, ?6: created at, id).
const LIST_WHERE: &str = "(?1 IS NULL OR provider = ?1) AND (?2 IS NULL OR owner = ?2) AND (?3 IS NULL OR status = ?3) \
AND (?5 IS NULL OR created_at > ?5 OR (created_at = ?5 AND id > ?6))";

const COLUMNS: &str = "id, provider, owner, scopes, status, status_detail, tokens, access_expires_at, \
has_refresh_token, state_hash, pending_sealed, state_expires_at, lease_owner, lease_until_ms, failures, \
next_attempt_at, created_at, updated_at, refreshed_at, version";
/// What a read returns: the written columns, then the last use (written by `record_use` only).
const READ_COLUMNS: &str = "id, provider, owner, scopes, status, status_detail, tokens, access_expires_at, \
has_refresh_token, state_hash, pending_sealed, state_expires_at, lease_owner, lease_until_ms, failures, \
next_attempt_at, created_at, updated_at, refreshed_at, version, last_used_at, last_used_by";

mod captures;
mod schema;
mod tenants;

use schema::{SCHEMA, migrate};

pub struct SqliteStore {
    conn: Arc<Mutex<rusqlite::Connection>>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and its tables.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Open(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = rusqlite::Connection::open(path)
            .map_err(|e| StoreError::Open(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(|e| StoreError::Open(e.to_string()))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| StoreError::Open(e.to_string()))?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(|e| StoreError::Open(e.to_string()))?;
        conn.execute_batch(SCHEMA)
            .map_err(|e| StoreError::Open(format!("cannot create the tables in {}: {e}", path.display())))?;
        migrate(&conn)
            .map_err(|e| StoreError::Open(format!("cannot upgrade the tables in {}: {e}", path.display())))?;
        Ok(SqliteStore { conn: Arc::new(Mutex::new(conn)), path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection on the blocking pool.
    pub(super) async fn with<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard =
                conn.lock().map_err(|_| StoreError::Other("the SQLite connection lock is poisoned".into()))?;
            f(&mut guard).map_err(map_err)
        })
        .await
        .map_err(|e| StoreError::Other(format!("the SQLite task failed: {e}")))?
    }
}

impl SqliteStore {
    /// The connection whose unique `column` equals `value`.
    async fn one_where(&self, column: &'static str, value: &str) -> StoreResult<Option<Connection>> {
        let value = value.to_string();
        self.with(move |c| {
            c.prepare_cached(&format!("SELECT {READ_COLUMNS} FROM connections WHERE {column} = ?1"))?
                .query_row([value], from_row)
                .optional()
        })
        .await
    }
}

pub(super) fn map_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) =>
        {
            StoreError::Unavailable(format!("SQLite is busy: {e}"))
        }
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
            StoreError::Conflict(format!("a record with the same key ({e})"))
        }
        _ => StoreError::Other(format!("SQLite: {e}")),
    }
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<Connection> {
    let scopes: String = row.get(3)?;
    let status: String = row.get(4)?;
    let state_hash: Option<String> = row.get(9)?;
    let pending = match (state_hash, row.get::<_, Option<String>>(10)?, row.get::<_, Option<i64>>(11)?) {
        (Some(state_hash), Some(sealed), Some(expires_at)) => Some(PendingAuth { state_hash, sealed, expires_at }),
        _ => None,
    };
    let lease = match (row.get::<_, Option<String>>(12)?, row.get::<_, Option<i64>>(13)?) {
        (Some(owner), Some(until_ms)) => Some(Lease { owner, until_ms }),
        _ => None,
    };
    Ok(Connection {
        id: row.get(0)?,
        provider: row.get(1)?,
        owner: row.get(2)?,
        scopes: serde_json::from_str(&scopes).unwrap_or_default(),
        status: Status::parse(&status).unwrap_or(Status::Failed),
        status_detail: row.get(5)?,
        tokens: row.get(6)?,
        access_expires_at: row.get(7)?,
        has_refresh_token: row.get::<_, i64>(8)? != 0,
        pending,
        lease,
        failures: row.get::<_, i64>(14)?.clamp(0, u32::MAX as i64) as u32,
        next_attempt_at: row.get(15)?,
        created_at: row.get(16)?,
        updated_at: row.get(17)?,
        refreshed_at: row.get(18)?,
        version: Version(row.get::<_, i64>(19)?.to_string()),
        last_used_at: row.get(20)?,
        last_used_by: row.get(21)?,
    })
}

/// The column values of a connection, in `COLUMNS` order minus `version`.
fn values(c: &Connection) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value as V;
    let opt_s = |v: &Option<String>| v.clone().map(V::Text).unwrap_or(V::Null);
    let opt_i = |v: Option<i64>| v.map(V::Integer).unwrap_or(V::Null);
    vec![
        V::Text(c.id.clone()),
        V::Text(c.provider.clone()),
        opt_s(&c.owner),
        V::Text(serde_json::to_string(&c.scopes).unwrap_or_else(|_| "[]".into())),
        V::Text(c.status.as_str().into()),
        opt_s(&c.status_detail),
        opt_s(&c.tokens),
        opt_i(c.access_expires_at),
        V::Integer(c.has_refresh_token as i64),
        opt_s(&c.pending.as_ref().map(|p| p.state_hash.clone())),
        opt_s(&c.pending.as_ref().map(|p| p.sealed.clone())),
        opt_i(c.pending.as_ref().map(|p| p.expires_at)),
        opt_s(&c.lease.as_ref().map(|l| l.owner.clone())),
        opt_i(c.lease.as_ref().map(|l| l.until_ms)),
        V::Integer(c.failures as i64),
        opt_i(c.next_attempt_at),
        V::Integer(c.created_at),
        V::Integer(c.updated_at),
        opt_i(c.refreshed_at),
    ]
}

pub(super) fn parse_version(v: &Version) -> i64 {
    v.0.parse().unwrap_or(-1)
}

#[async_trait]
impl ConnectionStore for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> StoreResult<()> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(()))).await
    }

    async fn get(&self, id: &str) -> StoreResult<Option<Connection>> {
        self.one_where("id", id).await
    }

    async fn find_by_state(&self, state_hash: &str) -> StoreResult<Option<Connection>> {
        self.one_where("state_hash", state_hash).await
    }

    async fn insert(&self, conn: &Connection) -> StoreResult<Version> {
        let mut vals = values(conn);
        vals.push(rusqlite::types::Value::Integer(1));
        let id = conn.id.clone();
        self.with(move |c| {
            let placeholders = (1..=vals.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
            c.prepare_cached(&format!("INSERT INTO connections ({COLUMNS}) VALUES ({placeholders})"))?
                .execute(rusqlite::params_from_iter(vals))
        })
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => StoreError::Conflict(format!("connection {id:?} already exists")),
            other => other,
        })?;
        Ok(Version("1".into()))
    }

    async fn update(&self, conn: &Connection, expected: &Version) -> StoreResult<Version> {
        let mut vals = values(conn);
        let expected = parse_version(expected);
        let id = conn.id.clone();
        vals.push(rusqlite::types::Value::Integer(expected + 1));
        vals.push(rusqlite::types::Value::Integer(expected));
        let id_for_query = id.clone();
        let changed = self
            .with(move |c| {
                let sets = COLUMNS
                    .split(", ")
                    .enumerate()
                    .skip(1)
                    .map(|(i, col)| format!("{col} = ?{}", i + 1))
                    .collect::<Vec<_>>()
                    .join(", ");
                let n = vals.len();
                let changed = c
                    .prepare_cached(&format!("UPDATE connections SET {sets} WHERE id = ?1 AND version = ?{n}"))?
                    .execute(rusqlite::params_from_iter(vals))?;
                let exists = changed == 1
                    || c.prepare_cached("SELECT 1 FROM connections WHERE id = ?1")?.exists([&id_for_query])?;
                Ok((changed, exists))
            })
            .await;
        match changed {
            Ok((1, _)) => Ok(Version((expected + 1).to_string())),
            Ok((_, true)) => Err(StoreError::Conflict(format!("connection {id:?}"))),
            Ok((_, false)) => Err(StoreError::NotFound(format!("connection {id:?}"))),
            Err(StoreError::Conflict(_)) => {
                Err(StoreError::Conflict(format!("connection {id:?} (state already in use)")))
            }
            Err(e) => Err(e),
        }
    }

    async fn record_use(&self, id: &str, at: i64, by: &str) -> StoreResult<()> {
        let (id, by) = (id.to_string(), by.to_string());
        self.with(move |c| {
            c.prepare_cached("UPDATE connections SET last_used_at = ?2, last_used_by = ?3 WHERE id = ?1")?
                .execute(params![id, at, by])?;
            Ok(())
        })
        .await
    }

    async fn delete(&self, id: &str, expected: &Version) -> StoreResult<()> {
        let id = id.to_string();
        let expected = parse_version(expected);
        let id2 = id.clone();
        let (deleted, exists) = self
            .with(move |c| {
                let n = c.execute("DELETE FROM connections WHERE id = ?1 AND version = ?2", params![id2, expected])?;
                let exists = n == 1 || c.prepare_cached("SELECT 1 FROM connections WHERE id = ?1")?.exists([&id2])?;
                Ok((n, exists))
            })
            .await?;
        match (deleted, exists) {
            (1, _) => Ok(()),
            (_, true) => Err(StoreError::Conflict(format!("connection {id:?}"))),
            (_, false) => Err(StoreError::NotFound(format!("connection {id:?}"))),
        }
    }

    async fn list(&self, filter: &ListFilter) -> StoreResult<Vec<Connection>> {
        let f = filter.clone();
        self.with(move |c| {
            let limit = if f.limit == 0 { 1000 } else { f.limit } as i64;
            let (after_created, after_id) = f.after.clone().unzip();
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {READ_COLUMNS} FROM connections WHERE {LIST_WHERE} ORDER BY created_at, id LIMIT ?4"
            ))?;
            let args = params![f.provider, f.owner, f.status.map(Status::as_str), limit, after_created, after_id];
            let rows = stmt.query_map(args, from_row)?;
            rows.collect()
        })
        .await
    }

    async fn due_for_refresh(&self, due: &Due) -> StoreResult<Vec<Connection>> {
        let Due { before, idle_before, ready_at, limit } = *due;
        self.with(move |c| {
            let mut stmt = c.prepare_cached(&due_query())?;
            let rows = stmt.query_map(params![before, idle_before, limit as i64, ready_at], from_row)?;
            rows.collect()
        })
        .await
    }

    async fn expired_pending(&self, now: i64, limit: usize) -> StoreResult<Vec<Connection>> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {READ_COLUMNS} FROM connections WHERE state_expires_at < ?1 LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![now, limit as i64], from_row)?;
            rows.collect()
        })
        .await
    }

    /// SQLite cannot say which rows another process changed, only that one did:
    /// `PRAGMA data_version` moves when another connection commits (our own writes update
    /// our cache directly).
    async fn census(&self, now: i64) -> StoreResult<Census> {
        self.with(move |c| {
            let mut census = Census::default();
            let mut stmt = c.prepare("SELECT status, COUNT(*) FROM connections GROUP BY status")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (status, n) = row?;
                if let Some(s) = Status::parse(&status) {
                    census.by_status.insert(s.as_str(), n as u64);
                }
            }
            census.in_backoff = c.query_row(
                "SELECT COUNT(*) FROM connections WHERE status = 'active' AND next_attempt_at > ?1",
                [now],
                |r| r.get::<_, i64>(0),
            )? as u64;
            census.oldest_token_at = c.query_row(
                "SELECT MIN(COALESCE(refreshed_at, created_at)) FROM connections WHERE status = 'active'",
                [],
                |r| r.get::<_, Option<i64>>(0),
            )?;
            Ok(census)
        })
        .await
    }

    async fn sealed_key_counts(&self) -> StoreResult<std::collections::BTreeMap<String, u64>> {
        // `v1.<key id>.<data>`: the id is between the first and second dots.
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT substr(v, 4, instr(substr(v, 4), '.') - 1) AS k, COUNT(*) FROM (\
                   SELECT tokens AS v FROM connections WHERE tokens LIKE 'v1.%' \
                   UNION ALL SELECT pending_sealed FROM connections WHERE pending_sealed LIKE 'v1.%'\
                 ) GROUP BY k",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            rows.map(|r| r.map(|(k, n)| (k, n as u64))).collect()
        })
        .await
    }
}

#[async_trait]
impl ChangeFeed for SqliteStore {
    async fn connection_changes(&self, cursor: Option<&str>) -> StoreResult<Option<(Changes, String)>> {
        let version: i64 = self.with(|c| c.query_row("PRAGMA data_version", [], |r| r.get(0))).await?;
        let now = version.to_string();
        let changes = match cursor {
            Some(before) if before != now => Changes::All,
            _ => Changes::Ids(Vec::new()),
        };
        Ok(Some((changes, now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What SQLite plans for a query: every line of `EXPLAIN QUERY PLAN`.
    fn plan(conn: &rusqlite::Connection, sql: &str, args: impl rusqlite::Params) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt.query_map(args, |r| r.get::<_, String>(3)).unwrap();
        rows.map(Result::unwrap).collect::<Vec<_>>().join("\n")
    }

    #[tokio::test]
    async fn the_timer_and_list_queries_use_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("plan.db")).unwrap();
        let conn = store.conn.lock().unwrap();
        let due = plan(&conn, &due_query(), params![100, 50, 500, 100]);
        assert!(!due.contains("SCAN connections"), "the due query scans: {due}");
        assert!(due.contains("connections_expiry") && due.contains("connections_idle"), "{due}");
        let expired = plan(
            &conn,
            &format!("SELECT {READ_COLUMNS} FROM connections WHERE state_expires_at < ?1 LIMIT ?2"),
            params![1, 5],
        );
        assert!(expired.contains("connections_state_expiry") && !expired.contains("SCAN"), "{expired}");
        let list = plan(
            &conn,
            &format!("SELECT {READ_COLUMNS} FROM connections WHERE {LIST_WHERE} ORDER BY created_at, id LIMIT ?4"),
            params![None::<String>, None::<String>, None::<String>, 10, None::<i64>, None::<String>],
        );
        assert!(!list.contains("TEMP B-TREE"), "the list sorts: {list}");
    }
}
