//! How each domain error is said to an HTTP caller: its status, its problem slug, and
//! whether a retry may help. The domain names what went wrong; only this file decides
//! what that looks like on the wire.

use super::error::ApiError;
use crate::clients::auth::AuthError;
use crate::domain::StoreError;
use crate::domain::captures::CaptureError;
use crate::domain::connections::{ConnectionError, InvalidInput};
use crate::domain::oauth::OAuthError;
use crate::domain::portal::PortalError;

impl InvalidInput {
    fn slug(self) -> &'static str {
        match self {
            InvalidInput::UnknownProvider => "unknown-provider",
            InvalidInput::ProviderParams => "invalid-provider-params",
            InvalidInput::ConnectionId => "invalid-connection-id",
            InvalidInput::Owner => "invalid-owner",
            InvalidInput::Scopes => "invalid-scopes",
            InvalidInput::ReturnUrl => "invalid-return-url",
            InvalidInput::ImportedTokens => "invalid-imported-tokens",
        }
    }
}

impl From<ConnectionError> for ApiError {
    fn from(e: ConnectionError) -> ApiError {
        match e {
            ConnectionError::NotFound(id) => ApiError::not_found(format!("There is no connection {id:?}.")),
            ConnectionError::Invalid(what, detail) => ApiError::bad_request(what.slug(), detail),
            e @ ConnectionError::Exists(_) => ApiError::conflict("connection-exists", e.to_string()),
            e @ ConnectionError::NotAuthorized { .. } => ApiError::conflict("not-authorized", e.to_string()),
            e @ ConnectionError::NeedsReauth { .. } => ApiError::conflict("needs-reauth", e.to_string()),
            e @ ConnectionError::Backoff { retry_after, .. } => {
                ApiError::unavailable("provider-unavailable", e.to_string(), Some(retry_after))
            }
            ConnectionError::Provider(e @ OAuthError::Transient(_)) => {
                ApiError::unavailable("provider-unavailable", e.to_string(), Some(30))
            }
            ConnectionError::Provider(e @ OAuthError::Config(_)) => ApiError::internal(e),
            ConnectionError::Provider(e) => ApiError::bad_gateway("provider-error", e.to_string()),
            ConnectionError::Store(e) => e.into(),
            ConnectionError::Crypto(e) => sealed_unreadable(e),
            e @ ConnectionError::ImportRefused { .. } => {
                ApiError::new(warp::http::StatusCode::UNPROCESSABLE_ENTITY, "import-refused", e.to_string())
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Unavailable(m) => {
                ApiError::unavailable("store-unavailable", format!("The store is unavailable: {m}"), Some(5))
            }
            StoreError::Busy { detail, retry_after } => ApiError::unavailable(
                "store-throttled",
                format!(
                    "The store paused this app's requests (Dataverse's service-protection limits): {detail}. Try again after the Retry-After."
                ),
                Some(retry_after.as_secs().max(1)),
            ),
            StoreError::Refused(why) => ApiError::unavailable(
                "organisation-refuses-app",
                format!(
                    "The Dynamics 365 organisation refuses this app ({why}). An administrator of the organisation enables (or adds) the app's application user with the product's security role; the operator then checks it with POST /api/tenants/{{id}}/check."
                ),
                Some(60),
            ),
            other => ApiError::internal(other),
        }
    }
}

impl From<CaptureError> for ApiError {
    fn from(e: CaptureError) -> ApiError {
        match e {
            CaptureError::Unexpected => ApiError::bad_request(
                "unknown-state",
                "This authorization response was not expected: Dynamics did not register (or sign) its state, so nothing was kept. Start again from Dynamics.",
            ),
            CaptureError::Expired => ApiError::bad_request(
                "state-expired",
                "This authorization link has expired. Start again from Dynamics to get a new one.",
            ),
            CaptureError::Conflict => ApiError::conflict(
                "capture-conflict",
                "Another authorization was already received for this request; this one was refused and recorded.",
            ),
            CaptureError::AlreadyCaptured => ApiError::conflict(
                "capture-conflict",
                "An authorization was already received for this request; this answer was refused and not kept.",
            ),
            CaptureError::Backlog => ApiError::unavailable(
                "capture-backlog",
                "Too many authorizations are waiting to be delivered to Dynamics; try again in a minute.",
                Some(60),
            ),
            CaptureError::InvalidState(m) => ApiError::bad_request("invalid-state", m),
            CaptureError::Store(e) => e.into(),
            CaptureError::Crypto(e) => sealed_unreadable(e),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::Unauthenticated(m) => ApiError::unauthorized(m),
            AuthError::Forbidden(m) => ApiError::forbidden(m),
            AuthError::Unavailable(m) => ApiError::unavailable(
                "auth-unavailable",
                format!("Bearer tokens cannot be verified right now: {m}"),
                Some(10),
            ),
        }
    }
}

impl From<PortalError> for ApiError {
    fn from(e: PortalError) -> ApiError {
        match e {
            PortalError::ContactNotFound => ApiError::not_found("Your contact record was not found in Dynamics."),
            PortalError::Auth(e) => e.into(),
            PortalError::Ambiguous(detail) => {
                ApiError::new(warp::http::StatusCode::FORBIDDEN, "ambiguous-contact", detail)
            }
            PortalError::Dataverse(e) if e.is_transient() => {
                ApiError::unavailable("dataverse-unavailable", e.to_string(), Some(5))
            }
            PortalError::Dataverse(e) => ApiError::internal(e),
        }
    }
}

/// A sealed value that cannot be opened: with a key that is no longer configured, the
/// operator's configuration (503, naming the key); otherwise our fault (500).
fn sealed_unreadable(e: crate::support::crypto::CryptoError) -> ApiError {
    match e {
        crate::support::crypto::CryptoError::UnknownKey(key) => ApiError::unavailable(
            "key-not-configured",
            format!(
                "The stored tokens are sealed with key {key:?}, which is not in TOKEN_ENCRYPTION_KEYS: the operator must list it again (after the current key) and run `handler reseal` before removing it."
            ),
            Some(60),
        ),
        e => ApiError::internal(format!("stored data could not be decrypted: {e}")),
    }
}

/// A part of the API that stays closed until it is configured: 503 with what to set.
pub fn configured<T>(part: Option<&T>, closed: Closed) -> Result<&T, ApiError> {
    part.ok_or_else(|| closed_error(closed))
}

/// The 503 a closed part of the API answers, saying what to set.
pub fn closed_error(closed: Closed) -> ApiError {
    let (code, detail) = match closed {
        Closed::BackOffice => (
            "api-not-configured",
            "The back-office API is closed: set AUTH_ISSUER, AUTH_AUDIENCE and AUTH_ALLOWED_CLIENT_IDS (or AUTH_ALLOWED_ROLES).",
        ),
        Closed::Portal => (
            "portal-not-configured",
            "The portal API is closed: set PORTAL_URL and PORTAL_CLIENT_ID (Power Pages) or PORTAL_OIDC_ISSUER.",
        ),
        Closed::Tenants => (
            "tenants-not-configured",
            "This deployment serves one organisation: set MULTITENANT_APP_ID (and its credential) to serve others.",
        ),
    };
    ApiError::unavailable(code, detail, None)
}

#[derive(Debug, Clone, Copy)]
pub enum Closed {
    BackOffice,
    Portal,
    Tenants,
}

impl From<crate::domain::tenants::scope::ScopeError> for ApiError {
    fn from(e: crate::domain::tenants::scope::ScopeError) -> ApiError {
        use crate::domain::tenants::scope::ScopeError;
        match e {
            e @ (ScopeError::NotOnboarded { .. } | ScopeError::Unknown(_)) => {
                ApiError::new(warp::http::StatusCode::FORBIDDEN, "tenant-not-onboarded", e.to_string())
            }
            e @ ScopeError::Suspended { .. } => ApiError::unavailable("tenant-suspended", e.to_string(), Some(60)),
            e @ ScopeError::Org { .. } => ApiError::unavailable("organisation-unavailable", e.to_string(), Some(30)),
            ScopeError::Store(e) => e.into(),
        }
    }
}

impl From<crate::domain::tenants::TenantError> for ApiError {
    fn from(e: crate::domain::tenants::TenantError) -> ApiError {
        use crate::domain::tenants::TenantError;
        match e {
            TenantError::Invalid(detail) => ApiError::bad_request("invalid-tenant", detail),
            TenantError::NotFound(id) => ApiError::not_found(format!("There is no tenant {id:?}.")),
            TenantError::Store(e) => e.into(),
        }
    }
}
