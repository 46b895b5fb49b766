//! The record of one customer organisation served by a multi-tenant deployment.
//!
//! It lives in the deployment's own store (SQLite, or the publisher's Dataverse), not in
//! the customer's: it says where the customer's organisation is and how far its
//! onboarding got, before anything can be written there.

use serde::{Deserialize, Serialize};

use super::model::Version;

/// How far a customer tenant's onboarding got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantStatus {
    /// The administrator's consent link was issued; no answer yet.
    ConsentPending,
    /// Entra answered with consent, and a client-credential token for the tenant was had.
    Consented,
    /// The app's application user answers in the organisation (`WhoAmI` with our token).
    Onboarded,
    /// Consent was refused or could not be confirmed; `status_detail` says why.
    Failed,
    /// Onboarded once, but the last check found the organisation refusing the app or
    /// without the product's tables: not served until a check passes again;
    /// `status_detail` says why and what to do.
    Suspended,
}

impl TenantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TenantStatus::ConsentPending => "consent_pending",
            TenantStatus::Consented => "consented",
            TenantStatus::Onboarded => "onboarded",
            TenantStatus::Failed => "failed",
            TenantStatus::Suspended => "suspended",
        }
    }

    pub fn parse(s: &str) -> Option<TenantStatus> {
        Some(match s {
            "consent_pending" => TenantStatus::ConsentPending,
            "consented" => TenantStatus::Consented,
            "onboarded" => TenantStatus::Onboarded,
            "failed" => TenantStatus::Failed,
            "suspended" => TenantStatus::Suspended,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// The Entra tenant id (a GUID, lower case).
    pub id: String,
    /// The customer's Dataverse organisation, `https://org.crm.dynamics.com`.
    pub org_url: Option<String>,
    pub status: TenantStatus,
    pub status_detail: Option<String>,
    /// SHA-256 of the outstanding admin-consent `state`, cleared when it is used.
    pub state_hash: Option<String>,
    pub state_expires_at: Option<i64>,
    /// The back-office caller that started the onboarding. Entra's admin-consent answer
    /// does not say which administrator consented.
    pub started_by: Option<String>,
    pub consented_at: Option<i64>,
    pub onboarded_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    pub version: Version,
}
