//! What the Dataverse client speaks in: its errors, record keys, write conditions, delta
//! pages and records.

use serde_json::{Map, Value};

use crate::clients::azure::IdentityError;

/// How a Dataverse call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DataverseError {
    /// Dataverse answered with an error (after retries, for transient ones).
    #[error("Dataverse {operation} on {table} failed: {message} (HTTP {status}{})", code_suffix(code))]
    Service { table: String, operation: &'static str, status: u16, code: String, message: String },
    /// No answer (connection, timeout), after retries.
    #[error("Dataverse {operation} on {table} failed: {reason}")]
    Unreachable { table: String, operation: &'static str, reason: String },
    /// No token for Dataverse.
    #[error("no Dataverse access token: {0}")]
    Token(IdentityError),
    /// Dataverse's service protection paused this client (a `429`'s `Retry-After`) for
    /// longer than this request waits.
    #[error("Dataverse {operation} on {table} waits out a service-protection pause ({} s left)", retry_after.as_secs().max(1))]
    Throttled { table: String, operation: &'static str, retry_after: std::time::Duration },
}

fn code_suffix(code: &str) -> String {
    if code.is_empty() { String::new() } else { format!(", code {code}") }
}

impl DataverseError {
    pub fn status(&self) -> Option<u16> {
        match self {
            DataverseError::Service { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Throttling and service unavailability: worth trying again later.
    pub fn is_transient(&self) -> bool {
        match self {
            DataverseError::Service { status, .. } => matches!(status, 429 | 502 | 503 | 504),
            DataverseError::Unreachable { .. } | DataverseError::Token(_) | DataverseError::Throttled { .. } => true,
        }
    }
}

/// How a record is addressed.
#[derive(Debug, Clone)]
pub enum Key<'a> {
    /// The primary key (a GUID).
    Id(&'a str),
    /// An alternate key of one string column.
    Alternate(&'a str, &'a str),
}

impl Key<'_> {
    pub(super) fn segment(&self) -> String {
        match self {
            Key::Id(id) => format!("({id})"),
            // OData string literal: single quotes doubled; then percent-encoded for the path.
            Key::Alternate(column, value) => {
                let literal = value.replace('\'', "''");
                let encoded: String =
                    percent_encoding::utf8_percent_encode(&literal, percent_encoding::NON_ALPHANUMERIC).to_string();
                format!("({column}='{encoded}')")
            }
        }
    }
}

/// A condition on a write.
#[derive(Debug, Clone)]
pub enum Condition<'a> {
    /// Upsert: create or update.
    None,
    /// Update only if the record exists (`If-Match: *`).
    Exists,
    /// Create only (`If-None-Match: *`).
    NotExists,
    /// Update only this version (`If-Match: W/"n"`).
    Version(&'a str),
}

/// What changed in a tracked table since a delta link.
#[derive(Debug, Default)]
pub struct Delta {
    pub changed: Vec<Record>,
    /// Primary ids of deleted rows.
    pub deleted: Vec<String>,
    /// Where to ask next time.
    pub link: String,
}

/// A record and its ETag.
#[derive(Debug, Clone)]
pub struct Record {
    pub fields: Map<String, Value>,
    pub etag: String,
}

impl Record {
    pub(super) fn from_body(mut fields: Map<String, Value>, header_etag: Option<String>) -> Record {
        let etag = fields
            .remove("@odata.etag")
            .and_then(|v| v.as_str().map(str::to_string))
            .or(header_etag)
            .unwrap_or_default();
        fields.retain(|k, _| !k.starts_with("@odata"));
        Record { fields, etag }
    }

    pub fn str(&self, name: &str) -> Option<&str> {
        self.fields.get(name).and_then(Value::as_str)
    }

    pub fn i64(&self, name: &str) -> Option<i64> {
        match self.fields.get(name) {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.parse().ok(),
            _ => None,
        }
    }

    pub fn bool(&self, name: &str) -> bool {
        self.fields.get(name).and_then(Value::as_bool).unwrap_or(false)
    }
}
