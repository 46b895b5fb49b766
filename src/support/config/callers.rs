//! Who may call: the back office's bearer-token issuer (`AUTH_*`) and the portal's
//! (`PORTAL_*`: a Power Pages site, or an OIDC issuer such as B2C).

use url::Url;

use super::{ConfigError, Settings, parse_service_url};

/// The development issuer's names (`AUTH_ISSUER=dev`).
pub mod dev {
    pub const ISSUER: &str = "dynamics-companion-dev";
    pub const AUDIENCE: &str = "dynamics-companion-dev";
    /// The client id every development token carries (the allow-list's one entry).
    pub const CLIENT: &str = "dev-client";
}

/// An OIDC issuer of bearer tokens we accept: the back office's (Entra ID) and the
/// portal's (B2C, Entra External ID) are configured alike.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub issuer: String,
    pub audiences: Vec<String>,
    /// Explicit JWKS URL; otherwise found through OpenID discovery on the issuer.
    pub jwks_url: Option<Url>,
}

#[derive(Debug, Clone)]
pub struct BackOfficeAuth {
    pub issuer: IssuerConfig,
    pub allowed_client_ids: Vec<String>,
    pub allowed_roles: Vec<String>,
    /// `AUTH_ISSUER=dev`: where the development issuer's key is (the auth client's
    /// development issuer reads it).
    pub dev_key: Option<std::path::PathBuf>,
}

/// The portal companion: who the portal users are, and which origins call us.
#[derive(Debug, Clone, Default)]
pub struct PortalConfig {
    pub power_pages: Option<PowerPagesConfig>,
    pub oidc: Option<PortalOidcConfig>,
    /// Origins (`https://host[:port]`) whose pages may call the portal API and receive
    /// the connect popup's result.
    pub origins: Vec<url::Origin>,
    /// Whether this handler answers CORS (off where the platform does: Azure's CORS list).
    pub handler_cors: bool,
}

impl PortalConfig {
    pub fn enabled(&self) -> bool {
        self.power_pages.is_some() || self.oidc.is_some()
    }
}

/// A Power Pages site issuing implicit-grant tokens.
#[derive(Debug, Clone)]
pub struct PowerPagesConfig {
    /// `https://contoso.powerappsportals.com`
    pub url: Url,
    /// The token's `iss`: the site's host name, without scheme.
    pub host: String,
    /// The registered client id (`ImplicitGrantFlow/RegisteredClientId`): the token's `aud`.
    pub client_id: String,
}

/// An OIDC issuer for portal users (Azure AD B2C, Entra External ID).
#[derive(Debug, Clone)]
pub struct PortalOidcConfig {
    pub issuer: IssuerConfig,
    /// The claim whose value is the user's Dataverse contact id.
    pub contact_claim: String,
    /// Without that claim: a claim to find the contact by (`PORTAL_OIDC_LOOKUP_CLAIM`),
    /// after the portal's external identity records.
    pub lookup: Option<ContactLookup>,
}

/// Find a contact whose `column` equals the token's `claim` (`email` → `emailaddress1`).
#[derive(Debug, Clone)]
pub struct ContactLookup {
    pub claim: String,
    pub column: String,
}

impl IssuerConfig {
    /// `{ISSUER}`, `{AUDIENCE}` (required with it) and `{JWKS}`: `None` when the issuer
    /// setting is unset.
    pub(super) fn from_settings(
        s: &Settings,
        issuer: &str,
        audience: &str,
        jwks: &str,
    ) -> Result<Option<Self>, ConfigError> {
        let Some(value) = s.get(issuer) else {
            return Ok(None);
        };
        parse_service_url(value).map_err(|p| ConfigError::new(issuer, p))?;
        let audiences = s.list(audience);
        if audiences.is_empty() {
            return Err(ConfigError::new(audience, format!("is required when {issuer} is set")));
        }
        Ok(Some(IssuerConfig { issuer: value.to_string(), audiences, jwks_url: s.url(jwks)? }))
    }
}

impl BackOfficeAuth {
    pub(super) fn from_settings(s: &Settings) -> Result<Option<BackOfficeAuth>, ConfigError> {
        if s.get("AUTH_ISSUER") == Some("dev") {
            return Self::development(s).map(Some);
        }
        let Some(issuer) = IssuerConfig::from_settings(s, "AUTH_ISSUER", "AUTH_AUDIENCE", "AUTH_JWKS_URL")? else {
            return Ok(None);
        };
        let allowed_client_ids = s.list("AUTH_ALLOWED_CLIENT_IDS");
        let allowed_roles = s.list("AUTH_ALLOWED_ROLES");
        if allowed_client_ids.is_empty() && allowed_roles.is_empty() {
            return Err(ConfigError::new(
                "AUTH_ALLOWED_CLIENT_IDS",
                "set it or AUTH_ALLOWED_ROLES: without an allow-list any application of the tenant could read tokens",
            ));
        }
        Ok(Some(BackOfficeAuth { issuer, allowed_client_ids, allowed_roles, dev_key: None }))
    }

    /// `AUTH_ISSUER=dev`: only where `PUBLIC_BASE_URL` is this machine.
    fn development(s: &Settings) -> Result<BackOfficeAuth, ConfigError> {
        let public = s.get("PUBLIC_BASE_URL").unwrap_or("http://localhost:7071");
        let local = url::Url::parse(public).is_ok_and(|u| super::is_loopback(&u));
        if !local {
            return Err(ConfigError::new(
                "AUTH_ISSUER",
                format!(
                    "dev is for a developer's own machine: PUBLIC_BASE_URL must be a loopback address (http://localhost:7071), not {public}; set AUTH_ISSUER to your Entra tenant's issuer"
                ),
            ));
        }
        Ok(BackOfficeAuth {
            issuer: IssuerConfig { issuer: dev::ISSUER.into(), audiences: vec![dev::AUDIENCE.into()], jwks_url: None },
            allowed_client_ids: vec![dev::CLIENT.into()],
            allowed_roles: s.list("AUTH_ALLOWED_ROLES"),
            dev_key: Some(s.path("AUTH_DEV_KEY_PATH", ".data/dev-issuer.key")),
        })
    }
}

impl PortalConfig {
    pub(super) fn from_settings(s: &Settings) -> Result<PortalConfig, ConfigError> {
        let power_pages = PowerPagesConfig::from_settings(s)?;
        let oidc =
            IssuerConfig::from_settings(s, "PORTAL_OIDC_ISSUER", "PORTAL_OIDC_AUDIENCE", "PORTAL_OIDC_JWKS_URL")?.map(
                |issuer| PortalOidcConfig {
                    issuer,
                    contact_claim: s.get("PORTAL_OIDC_CONTACT_CLAIM").unwrap_or("contactid").to_string(),
                    lookup: s.get("PORTAL_OIDC_LOOKUP_CLAIM").map(|claim| ContactLookup {
                        claim: claim.to_string(),
                        column: s
                            .get("PORTAL_OIDC_LOOKUP_COLUMN")
                            .unwrap_or(if claim == "email" || claim == "emails" { "emailaddress1" } else { claim })
                            .to_string(),
                    }),
                },
            );
        if let Some(l) = oidc.as_ref().and_then(|o| o.lookup.as_ref())
            && (l.column.is_empty()
                || !l.column.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
        {
            return Err(ConfigError::new(
                "PORTAL_OIDC_LOOKUP_COLUMN",
                "must be a contact column's logical name (emailaddress1)",
            ));
        }
        let mut origins = s.origins("PORTAL_ORIGINS")?;
        if let Some(pp) = &power_pages
            && !origins.contains(&pp.url.origin())
        {
            origins.push(pp.url.origin());
        }
        let handler_cors = s.choice("CORS_LAYER", &[("handler", true), ("platform", false)])?;
        Ok(PortalConfig { power_pages, oidc, origins, handler_cors })
    }
}

impl PowerPagesConfig {
    pub(super) fn from_settings(s: &Settings) -> Result<Option<PowerPagesConfig>, ConfigError> {
        let Some(url) = s.url("PORTAL_URL")? else {
            return Ok(None);
        };
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let client_id = s.require("PORTAL_CLIENT_ID")?.to_string();
        if client_id.len() > 36 || !client_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(ConfigError::new(
                "PORTAL_CLIENT_ID",
                "must be the registered client id: at most 36 letters, digits or '-'",
            ));
        }
        Ok(Some(PowerPagesConfig { url, host, client_id }))
    }
}
