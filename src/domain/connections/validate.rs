//! What a caller may name a connection, its owner and its scopes.

use super::{ConnectionError, InvalidInput};
use crate::domain::oauth::catalog::Provider;

const MAX_ID_LEN: usize = 128;

pub(super) fn validate_owner(owner: Option<&str>) -> Result<(), ConnectionError> {
    match owner {
        Some(o) if o.is_empty() || o.len() > 200 || o.chars().any(char::is_control) => {
            Err(ConnectionError::Invalid(InvalidInput::Owner, "owner must be 1-200 printable characters.".into()))
        }
        _ => Ok(()),
    }
}

pub(super) fn validate_id(id: &str) -> Result<String, ConnectionError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(id.to_string())
    } else {
        Err(ConnectionError::Invalid(
            InvalidInput::ConnectionId,
            format!(
                "connection_id must be 1-{MAX_ID_LEN} letters, digits, '-', '_' or '.', starting with a letter or digit."
            ),
        ))
    }
}

pub(super) fn validate_scopes(scopes: Vec<String>, provider: &Provider) -> Result<Vec<String>, ConnectionError> {
    if scopes.len() > 50 {
        return Err(ConnectionError::Invalid(InvalidInput::Scopes, "At most 50 scopes may be requested.".into()));
    }
    for s in &scopes {
        if s.is_empty()
            || s.len() > 200
            || s.chars().any(|c| c.is_whitespace() || c.is_control())
            || s.contains(provider.scope_separator.as_str())
        {
            return Err(ConnectionError::Invalid(
                InvalidInput::Scopes,
                format!(
                    "Scope {s:?} is not valid: scopes are 1-200 characters without spaces or the provider's separator."
                ),
            ));
        }
    }
    Ok(scopes)
}
