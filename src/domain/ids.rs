//! Ids of the model's records, each with one parse and one identity.
//!
//! Stores compare ids without regard to ASCII case (SQLite `COLLATE NOCASE`, Dataverse's
//! string comparison), so `ERP-1` and `erp-1` are one connection; an id type that hashes
//! and compares the same way keeps every map in the process agreeing with the store (one
//! cache entry, one refresh turn), instead of lowercasing by hand at each place
//! (lldap's `UserId(CaseInsensitiveString)` is the model).

use std::hash::{Hash, Hasher};

/// A connection's id, kept as the caller wrote it, compared without ASCII case.
#[derive(Debug, Clone)]
pub struct ConnectionId(String);

impl ConnectionId {
    pub fn new(id: impl Into<String>) -> ConnectionId {
        ConnectionId(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl PartialEq for ConnectionId {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }
}

impl Eq for ConnectionId {}

impl Hash for ConnectionId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        for b in self.0.bytes() {
            state.write_u8(b.to_ascii_lowercase());
        }
        state.write_u8(0xff);
    }
}

impl std::fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A customer's Entra tenant id: a GUID, in its one canonical (lower-case) form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

/// Why a text is not a tenant id.
#[derive(Debug, Clone, thiserror::Error)]
#[error("tenant id {0:?} must be the customer's Entra tenant id (a GUID, shown on the tenant's Overview page)")]
pub struct InvalidTenantId(pub String);

impl TenantId {
    pub fn parse(text: &str) -> Result<TenantId, InvalidTenantId> {
        if crate::support::config::is_guid(text) {
            Ok(TenantId(text.to_ascii_lowercase()))
        } else {
            Err(InvalidTenantId(crate::support::logging::clip(text, 64).into_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_one_whatever_their_case() {
        use std::collections::HashSet;
        let set: HashSet<ConnectionId> = ["ERP-1", "erp-1", "Erp-1"].into_iter().map(ConnectionId::new).collect();
        assert_eq!(set.len(), 1);
        assert!(set.contains(&ConnectionId::new("eRP-1")));
        assert_eq!(ConnectionId::new("ERP-1").to_string(), "ERP-1", "shown as written");
        let t = TenantId::parse("AAAAAAAA-1111-4111-8111-AAAAAAAAAAAA").unwrap();
        assert_eq!(t.as_str(), "aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa");
        assert!(TenantId::parse("contoso.onmicrosoft.com").is_err());
    }
}

/// A Dataverse organisation's URL in its one canonical form: the environment URL
/// (`https://org.crm.dynamics.com`), scheme and host in lower case, no path.
///
/// The Global Discovery Service lists each environment with two URLs: `Url`
/// (`https://org.crm.dynamics.com`, the environment) and `ApiUrl`
/// (`https://org.api.crm.dynamics.com`, where its Web API answers; Microsoft: "Use the
/// ApiUrl to connect to Dataverse"). Either form may be given wherever an organisation is
/// named; both parse to the same `OrgUrl`. A token is asked for the environment
/// (`{environment}/.default`, as Microsoft's server-to-server samples do, and valid for
/// both hosts); Web API calls go to [`OrgUrl::api`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OrgUrl(url::Url);

impl OrgUrl {
    /// Parses either form; `https` only (plain `http` only on a loopback address, for
    /// local work and tests).
    pub fn parse(text: &str) -> Result<OrgUrl, OrgUrlError> {
        let mut url = crate::support::config::parse_service_url(text.trim())?;
        if url.path() != "/" && !url.path().is_empty() || url.query().is_some() {
            return Err(OrgUrlError::HasPath(text.to_string()));
        }
        if let Some(host) = url.host_str().map(str::to_ascii_lowercase) {
            let labels: Vec<&str> = host.split('.').collect();
            // `org.api.crm4.dynamics.com` → `org.crm4.dynamics.com` (any cloud's domain).
            let host = if labels.len() > 3 && labels[1] == "api" {
                std::iter::once(labels[0]).chain(labels[2..].iter().copied()).collect::<Vec<_>>().join(".")
            } else {
                host
            };
            url.set_host(Some(&host)).map_err(|reason| OrgUrlError::Host { value: text.to_string(), reason })?;
        }
        url.set_path("");
        Ok(OrgUrl(url))
    }

    /// The environment URL, without a trailing slash (`https://org.crm.dynamics.com`).
    pub fn as_str(&self) -> &str {
        self.0.as_str().trim_end_matches('/')
    }

    /// Where the Web API answers: the `ApiUrl` form (`https://org.api.crm.dynamics.com`)
    /// for a Dataverse host, the URL itself for any other (a local double).
    pub fn api(&self) -> url::Url {
        let mut api = self.0.clone();
        if let Some(host) = self.0.host_str() {
            let labels: Vec<&str> = host.split('.').collect();
            if labels.len() >= 4 && labels[labels.len() - 2] == "dynamics" || host.ends_with(".microsoftdynamics.us") {
                let mut with_api = vec![labels[0], "api"];
                with_api.extend(&labels[1..]);
                let _ = api.set_host(Some(&with_api.join(".")));
            }
        }
        api
    }

    /// The scope of a token for this organisation (`https://org.crm.dynamics.com/.default`).
    pub fn scope(&self) -> String {
        format!("{}/.default", self.as_str())
    }
}

/// Why a text is not an organisation's URL (the sentence follows the field's name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrgUrlError {
    #[error(transparent)]
    Url(#[from] crate::support::config::ServiceUrlError),
    #[error("must be the organisation's URL without a path, like https://org.crm.dynamics.com (got {0:?})")]
    HasPath(String),
    #[error("is not a valid host ({reason}): {value:?}")]
    Host { value: String, reason: url::ParseError },
}

impl std::fmt::Display for OrgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod org_tests {
    use super::OrgUrl;

    #[test]
    fn both_forms_of_an_organisation_are_one() {
        let env = OrgUrl::parse("https://Org1.crm.dynamics.com/").unwrap();
        let api = OrgUrl::parse("https://org1.api.crm.dynamics.com").unwrap();
        assert_eq!(env, api);
        assert_eq!(env.as_str(), "https://org1.crm.dynamics.com");
        assert_eq!(env.api().as_str(), "https://org1.api.crm.dynamics.com/");
        assert_eq!(env.scope(), "https://org1.crm.dynamics.com/.default");
        let emea = OrgUrl::parse("https://contoso.api.crm4.dynamics.com").unwrap();
        assert_eq!(emea.as_str(), "https://contoso.crm4.dynamics.com");
        assert_eq!(emea.api().host_str(), Some("contoso.api.crm4.dynamics.com"));
        let gcc = OrgUrl::parse("https://contoso.api.crm9.dynamics.com").unwrap();
        assert_eq!(gcc.as_str(), "https://contoso.crm9.dynamics.com");
        let local = OrgUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((local.as_str(), local.api().as_str()), ("http://127.0.0.1:8080", "http://127.0.0.1:8080/"));
        assert!(OrgUrl::parse("http://org1.crm.dynamics.com").is_err(), "https only");
        assert!(OrgUrl::parse("https://org1.crm.dynamics.com/main.aspx").is_err(), "no path");
    }
}
