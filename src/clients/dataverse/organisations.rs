//! Customers' organisations as Dataverse environments: [`OrganisationAccess`] for the
//! domain's tenancy. Each organisation is reached with the app's token from its own
//! tenant (the multi-tenant app's credential, [`crate::clients::entra`]) and has a
//! request gate of its own: service-protection limits are per application user and
//! organisation, so one busy customer never slows another.

use std::sync::Arc;

use crate::domain::ids::OrgUrl;
use async_trait::async_trait;
use secrecy::SecretString;

use super::provision::{Schema, verify};
use super::{Dataverse, DataverseError};
use crate::clients::azure::StaticToken;
use crate::clients::entra::{OrgToken, TenantCredentials};
use crate::clients::store::dataverse::DataverseStore;
use crate::domain::tenants::onboarding::{OrgAddressError, OrgCheck, OrganisationAccess, SetupError, SetupReport};
use crate::domain::{ConnectionStore, Tenant};

pub struct DataverseOrganisations {
    pub http: reqwest::Client,
    pub credentials: Arc<TenantCredentials>,
    pub schema: Schema,
    /// `DATAVERSE_MAX_CONCURRENCY`, for each organisation's gate.
    pub max_concurrency: usize,
}

impl DataverseOrganisations {
    /// A client for the tenant's organisation with the app's token from that tenant.
    /// Its token is for the environment (`{Url}/.default`), its requests go to the Web
    /// API's host (`ApiUrl`): see [`OrgUrl`].
    fn dataverse(&self, t: &Tenant) -> Result<Arc<Dataverse>, OrgAddressError> {
        let org = OrgUrl::parse(t.org_url.as_deref().ok_or(OrgAddressError::NoUrl)?)?;
        let tokens =
            Arc::new(OrgToken { credentials: self.credentials.clone(), tenant: t.id.clone(), scope: org.scope() });
        Ok(Arc::new(Dataverse::new(&org.api(), self.http.clone(), tokens, None).with_concurrency(self.max_concurrency)))
    }
}

#[async_trait]
impl OrganisationAccess for DataverseOrganisations {
    fn store_for(&self, tenant: &Tenant) -> Result<Arc<dyn ConnectionStore>, OrgAddressError> {
        Ok(Arc::new(DataverseStore::new(self.dataverse(tenant)?, self.schema.clone())))
    }

    async fn check(&self, tenant: &Tenant) -> OrgCheck {
        let dv = match self.dataverse(tenant) {
            Ok(dv) => dv,
            Err(e) => return OrgCheck::Failed(e.to_string()),
        };
        match dv.who_am_i().await {
            Ok(_) => match verify(&dv, &self.schema).await {
                Ok(Ok(())) => OrgCheck::Ready,
                Ok(Err(missing)) => OrgCheck::MissingTables(missing.to_string()),
                Err(e) => OrgCheck::Failed(e.to_string()),
            },
            Err(DataverseError::Service { status: 403, message, code, .. }) => OrgCheck::Refused { code, message },
            Err(e) => OrgCheck::Failed(e.to_string()),
        }
    }

    async fn set_up(&self, org: &OrgUrl, admin_token: SecretString, app_id: &str) -> Result<SetupReport, SetupError> {
        let dv = Dataverse::new(&org.api(), self.http.clone(), Arc::new(StaticToken(admin_token)), None);
        let report = super::setup::onboard(&dv, &self.schema, app_id).await.map_err(|e| match e.status() {
            Some(403) => SetupError::Refused(e.to_string()),
            _ => SetupError::Organisation(e.to_string()),
        })?;
        Ok(SetupReport { lines: report.lines, changes: report.changes })
    }
}
