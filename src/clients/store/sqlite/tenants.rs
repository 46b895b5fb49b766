//! Customer tenants, in the embedded store.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Row, params};

use super::{SqliteStore, parse_version};
use crate::domain::{StoreError, StoreResult, Tenant, TenantStatus, TenantStore, Version};

const TENANT_COLUMNS: &str = "id, org_url, status, status_detail, state_hash, state_expires_at, started_by, \
consented_at, onboarded_at, created_at, updated_at, version";

type TenantParams = (
    String,
    Option<String>,
    &'static str,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    i64,
    i64,
);

fn tenant_params(t: &Tenant) -> TenantParams {
    (
        t.id.clone(),
        t.org_url.clone(),
        t.status.as_str(),
        t.status_detail.clone(),
        t.state_hash.clone(),
        t.state_expires_at,
        t.started_by.clone(),
        t.consented_at,
        t.onboarded_at,
        t.created_at,
        t.updated_at,
    )
}

fn tenant_from_row(row: &Row<'_>) -> rusqlite::Result<Tenant> {
    let status: String = row.get(2)?;
    Ok(Tenant {
        id: row.get(0)?,
        org_url: row.get(1)?,
        status: TenantStatus::parse(&status).unwrap_or(TenantStatus::Failed),
        status_detail: row.get(3)?,
        state_hash: row.get(4)?,
        state_expires_at: row.get(5)?,
        started_by: row.get(6)?,
        consented_at: row.get(7)?,
        onboarded_at: row.get(8)?,
        created_at: row.get(9)?,
        updated_at: row.get(10)?,
        version: Version(row.get::<_, i64>(11)?.to_string()),
    })
}

#[async_trait]
impl TenantStore for SqliteStore {
    async fn get_tenant(&self, id: &str) -> StoreResult<Option<Tenant>> {
        let id = id.to_string();
        self.with(move |c| {
            c.prepare_cached(&format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id = ?1"))?
                .query_row([id], tenant_from_row)
                .optional()
        })
        .await
    }

    async fn list_tenants(&self) -> StoreResult<Vec<Tenant>> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(&format!("SELECT {TENANT_COLUMNS} FROM tenants ORDER BY id"))?;
            let rows = stmt.query_map([], tenant_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn insert_tenant(&self, t: &Tenant) -> StoreResult<Version> {
        let t = t.clone();
        let id = t.id.clone();
        let inserted = self
            .with(move |c| {
                c.prepare_cached(&format!(
                    "INSERT INTO tenants ({TENANT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 1)"
                ))?
                .execute(tenant_params(&t))
            })
            .await;
        match inserted {
            Ok(_) => Ok(Version("1".into())),
            Err(StoreError::Conflict(_)) => Err(StoreError::Conflict(format!("tenant {id:?} already exists"))),
            Err(e) => Err(e),
        }
    }

    async fn update_tenant(&self, t: &Tenant, expected: &Version) -> StoreResult<Version> {
        let t = t.clone();
        let id = t.id.clone();
        let expected = parse_version(expected);
        let (changed, exists) = self
            .with(move |c| {
                let p = tenant_params(&t);
                let n = c
                    .prepare_cached(
                        "UPDATE tenants SET org_url = ?2, status = ?3, status_detail = ?4, state_hash = ?5, \
                         state_expires_at = ?6, started_by = ?7, consented_at = ?8, onboarded_at = ?9, \
                         created_at = ?10, updated_at = ?11, version = ?12 + 1 WHERE id = ?1 AND version = ?12",
                    )?
                    .execute(params![p.0, p.1, p.2, p.3, p.4, p.5, p.6, p.7, p.8, p.9, p.10, expected])?;
                let exists = n == 1 || c.prepare_cached("SELECT 1 FROM tenants WHERE id = ?1")?.exists([&t.id])?;
                Ok((n, exists))
            })
            .await?;
        match (changed, exists) {
            (1, _) => Ok(Version((expected + 1).to_string())),
            (_, true) => Err(StoreError::Conflict(format!("tenant {id:?}"))),
            (_, false) => Err(StoreError::NotFound(format!("tenant {id:?}"))),
        }
    }

    async fn delete_tenant(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_string();
        self.with(move |c| c.execute("DELETE FROM tenants WHERE id = ?1", [id]).map(|n| n == 1)).await
    }
}
