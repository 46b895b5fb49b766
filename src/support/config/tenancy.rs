//! `MULTITENANT_*`: serving many customers' Dataverse organisations from one deployment.
//!
//! Unset `MULTITENANT_APP_ID` leaves the deployment single-tenant, exactly as before.
//! Set, the app registration it names (multi-tenant, in the publisher's tenant) is the
//! identity every customer's administrator consents to, and whose client-credential
//! tokens from each customer's tenant reach that customer's organisation.

use url::Url;

use super::{ConfigError, Settings, validate_secret_name};

#[derive(Debug, Clone)]
pub struct TenancyConfig {
    /// The multi-tenant app's client id.
    pub app_id: String,
    pub credential: AppCredential,
    /// `https://login.microsoftonline.com` (or a sovereign cloud's): where the admin-consent
    /// link points. The token requests use the same host (`AZURE_AUTHORITY_HOST`).
    pub authority: Url,
    /// The `scope` of the admin-consent request: `/.default` of a resource consents to
    /// everything the app registration lists.
    pub consent_scope: String,
    /// `{PUBLIC_BASE_URL}/api/oauth/consent`, registered on the app as a redirect URI.
    pub consent_redirect_uri: Url,
    /// `{PUBLIC_BASE_URL}/api/oauth/onboard`, where the administrator's sign-in returns
    /// (registered on the app too).
    pub onboard_redirect_uri: Url,
    /// The Global Discovery Service (`https://globaldisco.crm.dynamics.com`, or a
    /// sovereign cloud's): the environments the signed-in administrator reaches.
    pub discovery_url: Url,
    /// How long an instance serves a customer tenant before reading its record again: an
    /// off-boarding on another instance takes effect here within it.
    pub recheck: std::time::Duration,
    /// How long a consent's confirming token is retried while Entra replicates the app's
    /// service principal into the customer's tenant (AADSTS7000229 / 700016).
    pub consent_wait: std::time::Duration,
}

/// How the multi-tenant app proves itself to each customer's tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppCredential {
    /// A user-assigned managed identity, set on the app as a federated identity
    /// credential: no secret anywhere. (System-assigned identities cannot be one.)
    ManagedIdentity { client_id: String },
    /// A client secret of the app, by name (Key Vault).
    ClientSecret { secret_name: String },
    /// A certificate of the app (`private_key_jwt`): the secret holds its PEM, private key
    /// and certificate, as Key Vault keeps a PEM certificate's secret.
    Certificate { secret_name: String },
}

impl TenancyConfig {
    pub(super) fn from_settings(s: &Settings, redirect_uri: &Url) -> Result<Option<TenancyConfig>, ConfigError> {
        let Some(app_id) = s.get("MULTITENANT_APP_ID") else { return Ok(None) };
        if !is_guid(app_id) {
            return Err(ConfigError::new("MULTITENANT_APP_ID", "must be the app registration's client id (a GUID)"));
        }
        let credential = match s.get("MULTITENANT_CREDENTIAL").unwrap_or("managed_identity") {
            "managed_identity" => AppCredential::ManagedIdentity {
                client_id: s
                    .get("MULTITENANT_MI_CLIENT_ID")
                    .ok_or_else(|| {
                        ConfigError::new(
                            "MULTITENANT_MI_CLIENT_ID",
                            "is required with MULTITENANT_CREDENTIAL=managed_identity: the client id of the user-assigned identity set as the app's federated credential",
                        )
                    })?
                    .to_string(),
            },
            "client_secret" => {
                let secret_name = s.get("MULTITENANT_CLIENT_SECRET_NAME").unwrap_or("multitenant-client-secret");
                validate_secret_name(secret_name).map_err(|e| ConfigError::new("MULTITENANT_CLIENT_SECRET_NAME", e))?;
                AppCredential::ClientSecret { secret_name: secret_name.to_string() }
            }
            "certificate" => {
                let secret_name = s.get("MULTITENANT_CERTIFICATE_SECRET_NAME").unwrap_or("multitenant-certificate");
                validate_secret_name(secret_name)
                    .map_err(|e| ConfigError::new("MULTITENANT_CERTIFICATE_SECRET_NAME", e))?;
                AppCredential::Certificate { secret_name: secret_name.to_string() }
            }
            other => {
                return Err(ConfigError::new(
                    "MULTITENANT_CREDENTIAL",
                    format!("expected managed_identity, certificate or client_secret, got {other:?}"),
                ));
            }
        };
        let authority = s
            .url("AZURE_AUTHORITY_HOST")?
            .map(Ok)
            .unwrap_or_else(|| Url::parse("https://login.microsoftonline.com"))
            .map_err(|e| ConfigError::new("AZURE_AUTHORITY_HOST", e.to_string()))?;
        let consent_redirect_uri = redirect_uri
            .join("consent")
            .map_err(|e| ConfigError::new("PUBLIC_BASE_URL", format!("cannot build the consent URL: {e}")))?;
        let onboard_redirect_uri = redirect_uri
            .join("onboard")
            .map_err(|e| ConfigError::new("PUBLIC_BASE_URL", format!("cannot build the onboarding URL: {e}")))?;
        let discovery_url = s
            .url("MULTITENANT_DISCOVERY_URL")?
            .map(Ok)
            .unwrap_or_else(|| Url::parse("https://globaldisco.crm.dynamics.com"))
            .map_err(|e| ConfigError::new("MULTITENANT_DISCOVERY_URL", e.to_string()))?;
        Ok(Some(TenancyConfig {
            recheck: s.seconds("MULTITENANT_RECHECK_SECONDS", 60)?,
            consent_wait: s.seconds("MULTITENANT_CONSENT_WAIT_SECONDS", 30)?,
            onboard_redirect_uri,
            discovery_url,
            app_id: app_id.to_ascii_lowercase(),
            credential,
            authority,
            consent_scope: s
                .get("MULTITENANT_CONSENT_SCOPE")
                .unwrap_or("https://graph.microsoft.com/.default")
                .to_string(),
            consent_redirect_uri,
        }))
    }
}

/// A GUID in its 8-4-4-4-12 hex form.
pub fn is_guid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts.iter().zip([8, 4, 4, 4, 12]).all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}
