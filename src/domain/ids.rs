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
