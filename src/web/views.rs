//! What callers send and receive, as serde types: the wire shape of the API, kept apart
//! from the domain's types so either can change without the other noticing.

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::domain::captures::OpenedCapture;
use crate::domain::connections::import::Import;
use crate::domain::connections::{CachedToken, NewConnection, StartedAuthorization};
use crate::domain::{Connection, Status};
use crate::support::time::{now, rfc3339};

/// `POST /api/connections`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub provider: String,
    #[serde(default)]
    pub connection_id: Option<String>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    #[serde(default)]
    pub return_url: Option<String>,
    /// The connection's values for its provider entry's parameters (`{"account": "..."}`).
    #[serde(default)]
    pub params: std::collections::BTreeMap<String, String>,
}

impl From<StartRequest> for NewConnection {
    fn from(r: StartRequest) -> NewConnection {
        NewConnection {
            provider: r.provider,
            connection_id: r.connection_id,
            owner: r.owner,
            scopes: r.scopes,
            return_url: r.return_url,
            params: r.params,
            portal: Default::default(),
        }
    }
}

/// `POST /api/connections/import`: a connection another token keeper held.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    pub provider: String,
    #[serde(default)]
    pub connection_id: Option<String>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    pub refresh_token: String,
    #[serde(default)]
    pub access_token: Option<String>,
    /// With `access_token`: Unix seconds, or an RFC 3339 date-time.
    #[serde(default)]
    pub expires_at: Option<Instant>,
}

/// A point in time as a caller may write it: Unix seconds, or RFC 3339.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Instant {
    Seconds(i64),
    Text(String),
}

impl Instant {
    /// Unix seconds; `None` for text that is not an RFC 3339 date-time.
    pub fn unix(&self) -> Option<i64> {
        match self {
            Instant::Seconds(s) => Some(*s),
            Instant::Text(t) => time::OffsetDateTime::parse(t.trim(), &time::format_description::well_known::Rfc3339)
                .ok()
                .map(|d| d.unix_timestamp()),
        }
    }
}

impl TryFrom<ImportRequest> for Import {
    type Error = super::ApiError;

    fn try_from(r: ImportRequest) -> Result<Import, super::ApiError> {
        let expires_at = match &r.expires_at {
            None => None,
            Some(at) => Some(at.unix().ok_or_else(|| {
                super::ApiError::bad_request(
                    "invalid-imported-tokens",
                    "expires_at must be Unix seconds (1798761600) or an RFC 3339 date-time (2027-01-01T00:00:00Z).",
                )
            })?),
        };
        Ok(Import {
            provider: r.provider,
            connection_id: r.connection_id,
            owner: r.owner,
            scopes: r.scopes,
            refresh_token: SecretString::from(r.refresh_token),
            access_token: r.access_token.map(SecretString::from),
            expires_at,
        })
    }
}

/// The answer to a start or reconnect: where to send the person.
#[derive(Debug, Serialize)]
pub struct Started {
    pub connection_id: String,
    pub provider: String,
    pub status: Status,
    pub authorization_url: String,
    pub authorization_expires_at: String,
}

impl From<&StartedAuthorization> for Started {
    fn from(s: &StartedAuthorization) -> Started {
        Started {
            connection_id: s.connection.id.clone(),
            provider: s.connection.provider.clone(),
            status: s.connection.status,
            authorization_url: s.authorization_url.to_string(),
            authorization_expires_at: rfc3339(s.expires_at),
        }
    }
}

/// A connection as callers may see it: status, never a token.
#[derive(Debug, Serialize)]
pub struct ConnectionView {
    pub connection_id: String,
    pub provider: String,
    pub owner: Option<String>,
    pub scopes: Vec<String>,
    pub status: Status,
    pub status_detail: Option<String>,
    pub authorization_pending: bool,
    pub has_refresh_token: bool,
    pub access_token_expires_at: Option<String>,
    pub last_refreshed_at: Option<String>,
    /// The last use of its token and by whom (kept at most once a minute).
    pub last_used_at: Option<String>,
    pub last_used_by: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&Connection> for ConnectionView {
    fn from(c: &Connection) -> Self {
        ConnectionView {
            connection_id: c.id.clone(),
            provider: c.provider.clone(),
            owner: c.owner.clone(),
            scopes: c.scopes.clone(),
            status: c.status,
            status_detail: c.status_detail.clone(),
            authorization_pending: c.pending.as_ref().is_some_and(|p| p.expires_at > now()),
            has_refresh_token: c.has_refresh_token,
            access_token_expires_at: c.access_expires_at.map(rfc3339),
            last_refreshed_at: c.refreshed_at.map(rfc3339),
            last_used_at: c.last_used_at.map(rfc3339),
            last_used_by: c.last_used_by.clone(),
            created_at: rfc3339(c.created_at),
            updated_at: rfc3339(c.updated_at),
        }
    }
}

/// `POST /api/connections/{id}/token`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    #[serde(default)]
    pub force_refresh: bool,
}

/// A valid access token, the one place a token leaves the handler.
#[derive(Serialize)]
pub struct TokenResponse<'a> {
    pub connection_id: &'a str,
    pub access_token: &'a str,
    pub token_type: &'a str,
    pub expires_at: String,
    pub expires_in: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<&'a str>,
}

impl<'a> TokenResponse<'a> {
    pub fn new(id: &'a str, t: &'a CachedToken) -> TokenResponse<'a> {
        TokenResponse {
            connection_id: id,
            access_token: t.secret(),
            token_type: &t.token_type,
            expires_at: rfc3339(t.expires_at),
            expires_in: t.expires_at.saturating_sub(now()).max(0),
            scope: t.scope.as_deref(),
        }
    }
}

/// `POST /api/connections/{id}/reconnect`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectRequest {
    #[serde(default)]
    pub return_url: Option<String>,
}

/// `POST /api/captures`: a state Dynamics issued, to be kept when its callback comes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectRequest {
    pub state: String,
    /// Seconds; 600 when not given, at most a day.
    #[serde(default)]
    pub expires_in: Option<u64>,
}

/// A capture as the back office reads it.
#[derive(Debug, Serialize)]
pub struct CaptureView {
    pub state: String,
    pub code: Option<String>,
    pub iss: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
    pub received_at: String,
    pub delivered_at: Option<String>,
}

impl From<OpenedCapture> for CaptureView {
    fn from(o: OpenedCapture) -> CaptureView {
        let c = o.capture;
        CaptureView {
            state: c.state,
            code: o.code.map(|code| code.secret().to_string()),
            iss: c.iss,
            error: c.error,
            error_description: c.error_description,
            received_at: rfc3339(c.received_at),
            delivered_at: c.delivered_at.map(rfc3339),
        }
    }
}

/// `POST /api/portal/connections`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectBody {
    pub provider: String,
    /// SHA-256 (64 hex digits) of a random secret the page keeps, see `web::binding`.
    pub binding: String,
}

/// The answer to a portal connect: a start, plus the page the popup opens first.
#[derive(Debug, Serialize)]
pub struct PortalStarted {
    #[serde(flatten)]
    pub started: Started,
    /// Our own page that takes the secret from the opener before going to the provider.
    pub bind_url: String,
}
