//! An entry's rules: its name, its URLs, its client authentication, what it may set
//! and pass on. Each refusal is an [`EntryError`].

use std::collections::BTreeMap;
use std::time::Duration;

use super::super::presets::PresetError;
use super::{ClientAuth, Provider, ProviderSpec, RESERVED_AUTH_PARAMS, RESERVED_TOKEN_PARAMS, never_proxied};
use crate::support::config::{SecretNameError, ServiceUrlError, parse_service_url, validate_secret_name};

/// Why an entry of the catalog is refused (the sentence follows `provider "name": `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("the name must be 1-64 lower-case letters, digits, '-' or '_'")]
    Name,
    #[error("{field} {reason}")]
    Url { field: &'static str, reason: ServiceUrlError },
    #[error("client_id is empty")]
    EmptyClientId,
    #[error("client_auth is \"none\" but client_secret names {0:?}")]
    SecretWithoutAuth(String),
    #[error("client_auth needs a client_secret (the name of the secret, not its value)")]
    AuthWithoutSecret,
    #[error("client_secret: {0}")]
    SecretName(#[from] SecretNameError),
    #[error("authorization_params may not set {0:?}; the handler sets it")]
    ReservedAuthParam(String),
    #[error("token_params may not set {0:?}; the handler sets it")]
    ReservedTokenParam(String),
    #[error("proxy_headers: {0:?} is not a header name")]
    HeaderName(String),
    #[error("proxy_headers may not pass {0:?}: the proxy never forwards it")]
    NeverProxied(String),
    #[error(transparent)]
    Preset(#[from] PresetError),
    /// A field of the wrong type, an unknown field (TOML's own words).
    #[error("{0}")]
    Shape(String),
}

/// `name?k1=v1&k2=v2`, the parameters in name order and form-encoded: the one spelling of
/// a per-connection provider.
pub(super) fn canonical_key(name: &str, params: &BTreeMap<String, String>) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        q.append_pair(k, v);
    }
    format!("{name}?{}", q.finish())
}

pub(super) fn valid_name(name: &str) -> Result<(), EntryError> {
    if name.is_empty()
        || name.len() > 64
        || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(EntryError::Name);
    }
    Ok(())
}

pub(super) fn validate(name: &str, spec: ProviderSpec) -> Result<Provider, EntryError> {
    valid_name(name)?;
    validate_named(name, spec)
}

/// Validates an entry under any key (a per-connection one carries its parameters).
pub(super) fn validate_named(name: &str, spec: ProviderSpec) -> Result<Provider, EntryError> {
    let url = |field: &'static str, v: &str| parse_service_url(v).map_err(|reason| EntryError::Url { field, reason });
    let authorization_url = url("authorization_url", &spec.authorization_url)?;
    let token_url = url("token_url", &spec.token_url)?;
    let revocation_url = spec.revocation_url.as_deref().map(|v| url("revocation_url", v)).transpose()?;
    let refresh_url = spec.refresh_url.as_deref().map(|v| url("refresh_url", v)).transpose()?;
    let mut api_base_url = spec.api_base_url.as_deref().map(|v| url("api_base_url", v)).transpose()?;
    if let Some(base) = api_base_url.as_mut() {
        // Joining relative paths onto the base must not drop its last segment.
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
    }
    if spec.client_id.trim().is_empty() {
        return Err(EntryError::EmptyClientId);
    }
    let client_auth = spec.client_auth.unwrap_or(if spec.client_secret.is_some() {
        ClientAuth::ClientSecretBasic
    } else {
        ClientAuth::None
    });
    match (&spec.client_secret, client_auth) {
        (Some(secret), ClientAuth::None) => {
            return Err(EntryError::SecretWithoutAuth(secret.clone()));
        }
        (None, ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost) => {
            return Err(EntryError::AuthWithoutSecret);
        }
        (Some(secret), _) => validate_secret_name(secret)?,
        (None, ClientAuth::None) => {}
    }
    for key in spec.authorization_params.keys() {
        if RESERVED_AUTH_PARAMS.contains(&key.as_str()) {
            return Err(EntryError::ReservedAuthParam(key.clone()));
        }
    }
    for key in spec.token_params.keys() {
        if RESERVED_TOKEN_PARAMS.contains(&key.as_str()) {
            return Err(EntryError::ReservedTokenParam(key.clone()));
        }
    }
    let mut proxy_headers = Vec::new();
    for h in &spec.proxy_headers {
        let lower = h.trim().to_ascii_lowercase();
        if lower.is_empty() || !lower.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(EntryError::HeaderName(h.clone()));
        }
        if never_proxied(&lower) {
            return Err(EntryError::NeverProxied(h.clone()));
        }
        proxy_headers.push(lower);
    }
    Ok(Provider {
        name: name.to_string(),
        display_name: spec.display_name.unwrap_or_else(|| name.to_string()),
        authorization_url,
        token_url,
        refresh_url,
        revocation_url,
        issuer_required: spec.issuer_required.unwrap_or(true),
        issuer: spec.issuer.filter(|s| !s.is_empty()),
        client_id: spec.client_id,
        client_secret: spec.client_secret,
        client_auth,
        scopes: spec.scopes,
        scope_separator: spec.scope_separator.unwrap_or_else(|| " ".into()),
        pkce: spec.pkce.unwrap_or(true),
        authorization_params: spec.authorization_params.into_iter().collect(),
        token_params: spec.token_params.into_iter().collect(),
        api_base_url,
        token_response: spec.token_response,
        refresh_keepalive: spec.refresh_keepalive_seconds.map(Duration::from_secs),
        portal: spec.portal.unwrap_or_default(),
        agents: spec.agents,
        proxy_headers,
    })
}
