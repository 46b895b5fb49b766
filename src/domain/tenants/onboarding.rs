//! A customer's organisation as the product needs it: reachable with the app's own token
//! (its application user answers), with the product's tables; set up once with the
//! customer administrator's token.
//!
//! What an organisation is (a Dataverse environment) is the port's business
//! ([`OrganisationAccess`], implemented in `clients::dataverse`); the rules are here:
//! what a check records on the tenant, and the order of a set-up.

use std::sync::Arc;

use async_trait::async_trait;
use secrecy::SecretString;

use super::{CheckFailure, TenantError, Tenants};
use crate::domain::ids::OrgUrl;
use crate::domain::{ConnectionStore, Tenant, TenantStatus};

/// What a check of an organisation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrgCheck {
    Ready,
    /// The app is let in, but the product's tables are not (all) there.
    MissingTables(String),
    /// The organisation refuses the app (no application user, disabled, no role):
    /// Dataverse's code and message.
    Refused {
        code: String,
        message: String,
    },
    /// The organisation could not be reached or answered an error.
    Failed(String),
}

/// What a set-up created or found, a line each.
#[derive(Debug, Clone, Default)]
pub struct SetupReport {
    pub lines: Vec<String>,
    /// How many things were created (0 on a second run).
    pub changes: usize,
}

/// Why a set-up stopped.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("not a multi-tenant deployment")]
    NotMultiTenant,
    #[error("{0}")]
    Tenant(#[from] TenantError),
    #[error("the administrator's token for the organisation could not be had: {0}")]
    AdminToken(String),
    /// The organisation refused the administrator's token (not an administrator there).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Organisation(String),
}

/// A tenant record that does not say where its organisation is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrgAddressError {
    #[error("no org_url was given")]
    NoUrl,
    #[error("org_url {0}")]
    Url(#[from] crate::domain::ids::OrgUrlError),
}

/// The port to customers' organisations.
#[async_trait]
pub trait OrganisationAccess: Send + Sync {
    /// The store in the tenant's organisation, reached with the app's token from that
    /// tenant (made once per organisation and kept by the caller).
    fn store_for(&self, tenant: &Tenant) -> Result<Arc<dyn ConnectionStore>, OrgAddressError>;

    /// Checks the organisation with the app's own token.
    async fn check(&self, tenant: &Tenant) -> OrgCheck;

    /// Creates what is missing (tables, the product's role with its privileges, the
    /// application user and its role) with an administrator's token, used once.
    async fn set_up(&self, org: &OrgUrl, admin_token: SecretString, app_id: &str) -> Result<SetupReport, SetupError>;
}

impl Tenants {
    /// Checks a consented tenant's organisation with the app's own token and records the
    /// outcome on the tenant: `onboarded`, or what is missing.
    pub async fn check(&self, access: &dyn OrganisationAccess, id: &str) -> Result<Tenant, TenantError> {
        let t = self.get(id).await?;
        if t.status == TenantStatus::ConsentPending {
            return Err(TenantError::Invalid(format!(
                "tenant {id} has not consented yet: send its administrator the link"
            )));
        }
        let failure = |detail: String, suspends| Err(CheckFailure { detail, suspends });
        let outcome = match access.check(&t).await {
            OrgCheck::Ready => Ok(()),
            OrgCheck::MissingTables(missing) => failure(
                format!(
                    "the organisation does not have the product's tables yet ({missing}): open a new set-up link, or run `handler onboard --org` against it"
                ),
                true,
            ),
            OrgCheck::Refused { code, message } => failure(
                format!(
                    "the organisation refuses the app ({code}: {message}): an administrator enables (or adds) the application user for app {} with the product's security role, then POST /api/tenants/{id}/check",
                    self.config().app_id
                ),
                true,
            ),
            OrgCheck::Failed(e) => failure(format!("the organisation could not be checked: {e}"), false),
        };
        self.record_check(id, outcome).await
    }

    /// Sets the product up in the organisation the administrator signed in for (with
    /// their token, used for this and dropped), records it on the tenant, then checks it
    /// with the app's own token.
    pub async fn onboard(
        &self,
        access: &dyn OrganisationAccess,
        signed_in: &super::signin::Delegated,
        org: &OrgUrl,
    ) -> Result<(SetupReport, Tenant), SetupError> {
        let token = self
            .org_token_for_admin(signed_in, org.as_str())
            .await
            .map_err(|e| SetupError::AdminToken(e.to_string()))?;
        let report = access.set_up(org, token, &self.config().app_id).await?;
        let id = signed_in.tenant.id.clone();
        self.set_org(&id, org.as_str()).await?;
        let t = self.check(access, &id).await?;
        Ok((report, t))
    }
}
