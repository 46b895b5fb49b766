//! The file's tables, and the columns added to them since the first release.

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS connections (
    id                TEXT PRIMARY KEY COLLATE NOCASE,
    provider          TEXT NOT NULL COLLATE NOCASE,
    owner             TEXT COLLATE NOCASE,
    scopes            TEXT NOT NULL,
    status            TEXT NOT NULL,
    status_detail     TEXT,
    tokens            TEXT,
    access_expires_at INTEGER,
    has_refresh_token INTEGER NOT NULL DEFAULT 0,
    state_hash        TEXT UNIQUE,
    pending_sealed    TEXT,
    state_expires_at  INTEGER,
    lease_owner       TEXT,
    lease_until_ms    INTEGER,
    failures          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   INTEGER,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    refreshed_at      INTEGER,
    version           INTEGER NOT NULL,
    last_used_at      INTEGER,
    last_used_by      TEXT
) STRICT;
CREATE INDEX IF NOT EXISTS connections_expiry ON connections (status, access_expires_at);
CREATE INDEX IF NOT EXISTS connections_owner ON connections (owner);
CREATE INDEX IF NOT EXISTS connections_idle ON connections (status, refreshed_at);
CREATE INDEX IF NOT EXISTS connections_state_expiry ON connections (state_expires_at) WHERE state_expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS connections_created ON connections (created_at, id);
CREATE TABLE IF NOT EXISTS captures (
    key               TEXT PRIMARY KEY,
    state             TEXT NOT NULL,
    code              TEXT,
    iss               TEXT,
    error             TEXT,
    error_description TEXT,
    received_at       INTEGER NOT NULL,
    delivered_at      INTEGER,
    claim_until_ms    INTEGER,
    attempts          INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX IF NOT EXISTS captures_state ON captures (state);
CREATE TABLE IF NOT EXISTS expectations (
    key               TEXT PRIMARY KEY,
    expires_at        INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS expectations_expiry ON expectations (expires_at);
CREATE TABLE IF NOT EXISTS tenants (
    id                TEXT PRIMARY KEY COLLATE NOCASE,
    org_url           TEXT,
    status            TEXT NOT NULL,
    status_detail     TEXT,
    state_hash        TEXT,
    state_expires_at  INTEGER,
    started_by        TEXT,
    consented_at      INTEGER,
    onboarded_at      INTEGER,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    version           INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS captures_received ON captures (received_at);
"#;

/// Columns added after the first release, for files created before them.
pub(super) fn migrate(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let has = |table: &str, column: &str| -> rusqlite::Result<bool> {
        let mut stmt = conn.prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?;
        stmt.exists([column])
    };
    if !has("connections", "last_used_at")? {
        conn.execute_batch(
            "ALTER TABLE connections ADD COLUMN last_used_at INTEGER; \
             ALTER TABLE connections ADD COLUMN last_used_by TEXT",
        )?;
    }
    if !has("captures", "delivered_at")? {
        conn.execute_batch("ALTER TABLE captures ADD COLUMN delivered_at INTEGER")?;
    }
    if !has("captures", "claim_until_ms")? {
        conn.execute_batch(
            "ALTER TABLE captures ADD COLUMN claim_until_ms INTEGER; \
             ALTER TABLE captures ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    Ok(())
}
