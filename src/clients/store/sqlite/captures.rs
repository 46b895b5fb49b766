//! Captures and the states Dynamics registered, in the embedded store.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Row, params};

use super::SqliteStore;
use crate::domain::{Capture, CaptureStore, ExpectationStore, StoreResult};

pub(super) fn capture_from_row(row: &Row<'_>) -> rusqlite::Result<Capture> {
    Ok(Capture {
        key: row.get(0)?,
        state: row.get(1)?,
        code: row.get(2)?,
        iss: row.get(3)?,
        error: row.get(4)?,
        error_description: row.get(5)?,
        received_at: row.get(6)?,
        delivered_at: row.get(7)?,
        claim_until_ms: row.get(8)?,
        attempts: row.get::<_, i64>(9)?.clamp(0, u32::MAX as i64) as u32,
    })
}

pub(super) const CAPTURE_COLUMNS: &str =
    "key, state, code, iss, error, error_description, received_at, delivered_at, claim_until_ms, attempts";

#[async_trait]
impl CaptureStore for SqliteStore {
    async fn insert_capture(&self, cap: &Capture) -> StoreResult<bool> {
        let cap = cap.clone();
        self.with(move |c| {
            let n = c
                .prepare_cached(
                    "INSERT INTO captures (key, state, code, iss, error, error_description, received_at, delivered_at, \
                     claim_until_ms, attempts) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (key) DO NOTHING",
                )?
                .execute(params![
                    cap.key,
                    cap.state,
                    cap.code,
                    cap.iss,
                    cap.error,
                    cap.error_description,
                    cap.received_at,
                    cap.delivered_at,
                    cap.claim_until_ms,
                    cap.attempts
                ])?;
            Ok(n == 1)
        })
        .await
    }

    async fn captures_by_state(&self, state: &str) -> StoreResult<Vec<Capture>> {
        let state = state.to_string();
        self.with(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {CAPTURE_COLUMNS} FROM captures WHERE state = ?1 ORDER BY received_at"
            ))?;
            let rows = stmt.query_map([state], capture_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn undelivered_captures(&self, limit: usize, ready_at_ms: Option<i64>) -> StoreResult<Vec<Capture>> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {CAPTURE_COLUMNS} FROM captures WHERE delivered_at IS NULL \
                 AND (?2 IS NULL OR claim_until_ms IS NULL OR claim_until_ms <= ?2) ORDER BY received_at LIMIT ?1"
            ))?;
            let rows = stmt.query_map(params![limit as i64, ready_at_ms], capture_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn claim_capture(&self, key: &str, now_ms: i64, until_ms: i64) -> StoreResult<bool> {
        let key = key.to_string();
        self.with(move |c| {
            c.execute(
                "UPDATE captures SET claim_until_ms = ?3 WHERE key = ?1 AND delivered_at IS NULL \
                 AND (claim_until_ms IS NULL OR claim_until_ms <= ?2)",
                params![key, now_ms, until_ms],
            )
            .map(|n| n == 1)
        })
        .await
    }

    async fn release_capture(&self, key: &str, not_before_ms: i64, attempts: u32) -> StoreResult<()> {
        let key = key.to_string();
        self.with(move |c| {
            c.execute(
                "UPDATE captures SET claim_until_ms = ?2, attempts = ?3 WHERE key = ?1 AND delivered_at IS NULL",
                params![key, not_before_ms, attempts],
            )
            .map(|_| ())
        })
        .await
    }

    async fn mark_capture_delivered(&self, key: &str, at: i64) -> StoreResult<()> {
        let key = key.to_string();
        self.with(move |c| {
            c.execute("UPDATE captures SET delivered_at = ?2, claim_until_ms = NULL WHERE key = ?1", params![key, at])
                .map(|_| ())
        })
        .await
    }

    async fn purge_captures(&self, before: i64) -> StoreResult<u64> {
        self.with(move |c| {
            c.execute("DELETE FROM captures WHERE received_at < ?1 AND delivered_at IS NOT NULL", [before])
                .map(|n| n as u64)
        })
        .await
    }
}

#[async_trait]
impl ExpectationStore for SqliteStore {
    async fn expect_state(&self, state_hash: &str, expires_at: i64) -> StoreResult<()> {
        let key = state_hash.to_string();
        self.with(move |c| {
            c.execute(
                "INSERT INTO expectations (key, expires_at) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at",
                params![key, expires_at],
            )
            .map(|_| ())
        })
        .await
    }

    async fn expected_until(&self, state_hash: &str) -> StoreResult<Option<i64>> {
        let key = state_hash.to_string();
        self.with(move |c| {
            c.prepare_cached("SELECT expires_at FROM expectations WHERE key = ?1")?
                .query_row([key], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn purge_expectations(&self, now: i64) -> StoreResult<u64> {
        self.with(move |c| c.execute("DELETE FROM expectations WHERE expires_at < ?1", [now]).map(|n| n as u64)).await
    }
}
