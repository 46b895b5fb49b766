//! `APPLICATIONINSIGHTS_CONNECTION_STRING` and `APPLICATIONINSIGHTS_AUTHENTICATION_STRING`:
//! where telemetry goes and how the upload authenticates.
//!
//! Both are the names the Functions host itself reads, so one pair of app settings serves
//! the host's telemetry and ours. The authentication string takes the host's two shapes:
//! `Authorization=AAD` (the system-assigned identity) and `ClientId=<id>;Authorization=AAD`
//! (a user-assigned one). Without it, uploads carry only the instrumentation key, which a
//! resource with local authentication turned off refuses.

use secrecy::SecretString;

use super::{ConfigError, Settings};

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Kept as a secret so it never reaches a log line: the instrumentation key is not a
    /// credential, but it lets anyone write into the resource when local auth is on.
    pub connection_string: SecretString,
    pub auth: IngestionAuth,
    /// The cloud role: the function app's name (`WEBSITE_SITE_NAME`), as the host's own
    /// telemetry uses, so the application map shows one node.
    pub role: String,
    /// The instance (`WEBSITE_INSTANCE_ID`), to tell scaled-out instances apart.
    pub instance: Option<String>,
}

/// How uploads to the ingestion endpoint authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestionAuth {
    /// The instrumentation key alone (resources with local authentication on).
    InstrumentationKey,
    /// A Microsoft Entra token from the managed identity (`client_id` for a user-assigned
    /// one), for the role "Monitoring Metrics Publisher".
    Entra { client_id: Option<String> },
}

impl TelemetryConfig {
    pub(super) fn from_settings(s: &Settings) -> Result<Option<TelemetryConfig>, ConfigError> {
        const NAME: &str = "APPLICATIONINSIGHTS_CONNECTION_STRING";
        let Some(cs) = s.get(NAME).map(str::trim).filter(|v| !v.is_empty()) else { return Ok(None) };
        let pairs = pairs(cs).map_err(|p| ConfigError::new(NAME, p))?;
        if !pairs.iter().any(|(k, v)| k.eq_ignore_ascii_case("InstrumentationKey") && !v.is_empty()) {
            return Err(ConfigError::new(
                NAME,
                "has no InstrumentationKey (copy it from the resource's Overview page)",
            ));
        }
        let auth = match s.get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING").map(str::trim).filter(|v| !v.is_empty()) {
            None => IngestionAuth::InstrumentationKey,
            Some(a) => {
                authentication(a).map_err(|p| ConfigError::new("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", p))?
            }
        };
        Ok(Some(TelemetryConfig {
            connection_string: SecretString::from(cs.to_string()),
            auth,
            role: s.get("WEBSITE_SITE_NAME").filter(|v| !v.is_empty()).unwrap_or("dynamics-companion").to_string(),
            instance: s.get("WEBSITE_INSTANCE_ID").filter(|v| !v.is_empty()).map(str::to_string),
        }))
    }
}

/// `Key=Value;Key=Value`, as both strings are written.
fn pairs(s: &str) -> Result<Vec<(&str, &str)>, PairsError> {
    s.split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').map(|(k, v)| (k.trim(), v.trim())).ok_or(PairsError::NotPairs))
        .collect()
}

fn authentication(s: &str) -> Result<IngestionAuth, PairsError> {
    let mut aad = false;
    let mut client_id = None;
    for (k, v) in pairs(s)? {
        if k.eq_ignore_ascii_case("Authorization") {
            if !v.eq_ignore_ascii_case("AAD") {
                return Err(PairsError::Authorization(v.to_string()));
            }
            aad = true;
        } else if k.eq_ignore_ascii_case("ClientId") {
            client_id = Some(v.to_string()).filter(|c| !c.is_empty());
        } else {
            return Err(PairsError::UnknownKey(k.to_string()));
        }
    }
    if !aad {
        return Err(PairsError::NoAuthorization);
    }
    Ok(IngestionAuth::Entra { client_id })
}

/// Why the connection string or the authentication string is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum PairsError {
    #[error("expected Key=Value pairs separated by ';'")]
    NotPairs,
    #[error("Authorization={0} is not supported; use Authorization=AAD")]
    Authorization(String),
    #[error("unknown key {0:?}; expected Authorization=AAD and optionally ClientId=<client id>")]
    UnknownKey(String),
    #[error("expected Authorization=AAD")]
    NoAuthorization,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_hosts_two_shapes() {
        assert_eq!(authentication("Authorization=AAD").unwrap(), IngestionAuth::Entra { client_id: None });
        assert_eq!(
            authentication("ClientId=abc;Authorization=AAD").unwrap(),
            IngestionAuth::Entra { client_id: Some("abc".into()) }
        );
        assert!(authentication("ClientId=abc").is_err());
        assert!(authentication("Authorization=ikey").is_err());
        assert!(authentication("Secret=x;Authorization=AAD").is_err());
    }
}
