//! Customer tenants, as rows of their Dataverse table (the deployment's own store only).

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{DataverseStore, map_err};
use crate::clients::dataverse::{Condition, Key, Record};
use crate::domain::{StoreError, StoreResult, Tenant, TenantStatus, TenantStore, Version};

impl DataverseStore {
    fn tenant_fields(&self, t: &Tenant) -> Value {
        json!({
            self.c("orgurl"): t.org_url,
            self.c("status"): t.status.as_str(),
            self.c("statusdetail"): t.status_detail,
            self.c("statehash"): t.state_hash,
            self.c("stateexpiresat"): t.state_expires_at,
            self.c("startedby"): t.started_by,
            self.c("consentedat"): t.consented_at,
            self.c("onboardedat"): t.onboarded_at,
            self.c("createdat"): t.created_at,
            self.c("updatedat"): t.updated_at,
        })
    }

    fn tenant_from(&self, r: Record) -> Tenant {
        let s = |n: &str| r.str(&self.c(n)).map(str::to_string);
        let i = |n: &str| r.i64(&self.c(n));
        Tenant {
            id: s("name").unwrap_or_default(),
            org_url: s("orgurl"),
            status: s("status").and_then(|v| TenantStatus::parse(&v)).unwrap_or(TenantStatus::Failed),
            status_detail: s("statusdetail"),
            state_hash: s("statehash"),
            state_expires_at: i("stateexpiresat"),
            started_by: s("startedby"),
            consented_at: i("consentedat"),
            onboarded_at: i("onboardedat"),
            created_at: i("createdat").unwrap_or(0),
            updated_at: i("updatedat").unwrap_or(0),
            version: Version(r.etag),
        }
    }
}

#[async_trait]
impl TenantStore for DataverseStore {
    /// Six small requests (a count per status, the back-off count, the oldest refresh);
    /// the caller caches the answer.
    async fn get_tenant(&self, id: &str) -> StoreResult<Option<Tenant>> {
        let rec = self
            .dv
            .get(&self.tenants, &Key::Alternate(&self.key, id), &Self::select(&self.tenant_columns))
            .await
            .map_err(map_err)?;
        Ok(rec.map(|r| self.tenant_from(r)))
    }

    async fn list_tenants(&self) -> StoreResult<Vec<Tenant>> {
        let rows = self
            .dv
            .query(&self.tenants, "", &Self::select(&self.tenant_columns), Some(&self.key), 5000)
            .await
            .map_err(map_err)?;
        Ok(rows.into_iter().map(|r| self.tenant_from(r)).collect())
    }

    async fn insert_tenant(&self, t: &Tenant) -> StoreResult<Version> {
        let rec = self
            .dv
            .write(
                &self.tenants,
                &Key::Alternate(&self.key, &t.id),
                &self.tenant_fields(t),
                Condition::NotExists,
                &[&self.key],
            )
            .await
            .map_err(|e| match map_err(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!("tenant {:?} already exists", t.id)),
                other => other,
            })?;
        Ok(Version(rec.etag))
    }

    async fn update_tenant(&self, t: &Tenant, expected: &Version) -> StoreResult<Version> {
        let rec = self
            .dv
            .write(
                &self.tenants,
                &Key::Alternate(&self.key, &t.id),
                &self.tenant_fields(t),
                Condition::Version(&expected.0),
                &[&self.key],
            )
            .await
            .map_err(map_err)?;
        Ok(Version(rec.etag))
    }

    async fn delete_tenant(&self, id: &str) -> StoreResult<bool> {
        self.dv.delete(&self.tenants, &Key::Alternate(&self.key, id), None).await.map_err(map_err)
    }
}
