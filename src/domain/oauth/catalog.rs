//! The provider catalog (`providers.toml`): what we need to know about each external
//! OAuth system, including the ways it departs from RFC 6749.
//!
//! ```toml
//! [providers.acme]
//! display_name = "Acme ERP"
//! authorization_url = "https://login.acme.example/oauth2/authorize"
//! token_url = "https://login.acme.example/oauth2/token"
//! revocation_url = "https://login.acme.example/oauth2/revoke"   # RFC 7009, optional
//! issuer = "https://login.acme.example"                           # RFC 9207 `iss` check, optional
//! issuer_required = false                  # check `iss` only when sent (default: required)
//! client_id = "dynamics-companion"
//! client_secret = "acme-client-secret"        # a secret NAME, resolved by the secrets layer
//! client_auth = "client_secret_basic"         # or "client_secret_post"
//! scopes = ["offline_access", "api.read"]
//! scope_separator = " "
//! pkce = true
//! authorization_params = { prompt = "consent" }
//! token_params = {}
//! api_base_url = "https://api.acme.example/v1/"
//! proxy_headers = ["x-acme-tenant"]   # extra request headers the proxy passes on
//! [providers.acme.token_response]
//! path = "data"                 # tokens nested under this object path
//! default_expires_in = 3600     # when the provider sends no expires_in
//! expires_in_unit = "seconds"   # or "milliseconds"
//! ```
//!
//! Client secrets are never written in the catalog, only named.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

mod validate;

pub use validate::EntryError;
use validate::{canonical_key, valid_name, validate, validate_named};

use super::presets::PresetError;

/// How the client authenticates at the token and revocation endpoints (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// HTTP Basic with the form-encoded id and secret.
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the form body.
    ClientSecretPost,
    /// A public client: `client_id` in the body, no secret.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExpiresInUnit {
    #[default]
    Seconds,
    Milliseconds,
}

/// Where a provider's token response departs from RFC 6749 §5.1.
///
/// Some departures need no configuration: `expires_in` sent as a string, a missing
/// `token_type` (taken as `Bearer`), form-encoded responses (recognised by their content
/// type), and refresh responses without a new refresh token (the old one is kept).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenResponseQuirks {
    /// Dotted path to the object holding the token fields, e.g. `data` or `result.token`.
    #[serde(default)]
    pub path: Option<String>,
    /// Lifetime to assume when the provider sends no `expires_in` and the access token
    /// is not a JWT with `exp`.
    #[serde(default)]
    pub default_expires_in: Option<u64>,
    #[serde(default)]
    pub expires_in_unit: ExpiresInUnit,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderSpec {
    display_name: Option<String>,
    authorization_url: String,
    token_url: String,
    /// Where refresh grants go, for providers that take them elsewhere (Adobe Acrobat Sign).
    refresh_url: Option<String>,
    revocation_url: Option<String>,
    issuer: Option<String>,
    issuer_required: Option<bool>,
    client_id: String,
    client_secret: Option<String>,
    client_auth: Option<ClientAuth>,
    #[serde(default)]
    scopes: Vec<String>,
    scope_separator: Option<String>,
    pkce: Option<bool>,
    #[serde(default)]
    authorization_params: BTreeMap<String, String>,
    #[serde(default)]
    token_params: BTreeMap<String, String>,
    api_base_url: Option<String>,
    #[serde(default)]
    token_response: TokenResponseQuirks,
    /// Refresh at least this often even when the access token is still valid, for
    /// providers that expire idle refresh tokens.
    refresh_keepalive_seconds: Option<u64>,
    #[serde(default)]
    portal: Option<PortalAccess>,
    #[serde(default)]
    agents: Option<AgentAccess>,
    /// Request headers, besides the standard ones, that the proxy passes to this API.
    #[serde(default)]
    proxy_headers: Vec<String>,
}

/// Which AI agents (MCP callers) may use this provider's connections: by the caller's
/// client id (`azp`/`appid`) or by an app role it holds. Without it, none may.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentAccess {
    #[serde(default)]
    pub callers: Vec<String>,
    #[serde(default)]
    pub roles: Vec<String>,
}

impl AgentAccess {
    pub fn allows(&self, client_id: Option<&str>, roles: &[String]) -> bool {
        client_id.is_some_and(|c| self.callers.iter().any(|a| a.eq_ignore_ascii_case(c)))
            || roles.iter().any(|r| self.roles.contains(r))
    }
}

/// What portal users may do with a provider: connect their own account, and call the
/// provider's API through the proxy only for the listed methods and paths.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalAccess {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub proxy: Vec<ProxyRule>,
}

/// `methods = ["GET"]`, `paths = ["items", "items/*"]`: a path matches exactly, or by a
/// trailing `*` standing for the rest of the path.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyRule {
    pub methods: Vec<String>,
    pub paths: Vec<String>,
}

impl PortalAccess {
    /// Whether a portal user may send `method` to `path` (relative to `api_base_url`).
    pub fn allows(&self, method: &str, path: &str) -> bool {
        let path = path.trim_start_matches('/');
        self.proxy.iter().any(|rule| {
            rule.methods.iter().any(|m| m.eq_ignore_ascii_case(method))
                && rule.paths.iter().any(|p| match p.trim_start_matches('/').strip_suffix('*') {
                    Some(prefix) => path.starts_with(prefix),
                    None => path == p.trim_start_matches('/'),
                })
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    providers: BTreeMap<String, ProviderSpec>,
}

/// One provider, validated.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub display_name: String,
    pub authorization_url: Url,
    pub token_url: Url,
    /// Refresh grants go here instead of `token_url` when set.
    pub refresh_url: Option<Url>,
    pub revocation_url: Option<Url>,
    pub issuer: Option<String>,
    /// Whether the callback must carry `iss` (RFC 9207 §2.4: required where the provider
    /// always sends it; otherwise checked when present). Default: required when `issuer`
    /// is set.
    pub issuer_required: bool,
    pub client_id: String,
    /// The secret's name; see [`crate::clients::secrets`].
    pub client_secret: Option<String>,
    pub client_auth: ClientAuth,
    pub scopes: Vec<String>,
    pub scope_separator: String,
    pub pkce: bool,
    pub authorization_params: Vec<(String, String)>,
    pub token_params: Vec<(String, String)>,
    pub api_base_url: Option<Url>,
    pub token_response: TokenResponseQuirks,
    pub refresh_keepalive: Option<Duration>,
    pub portal: PortalAccess,
    /// Which agents may use this provider's connections over MCP (`None`: none).
    pub agents: Option<AgentAccess>,
    /// Extra request headers the proxy passes on (lower case).
    pub proxy_headers: Vec<String>,
}

impl Provider {
    /// The authorization request (RFC 6749 §4.1.1) a person's browser is sent to: our
    /// callback, the state, the PKCE challenge (RFC 7636 §4.3, S256) and the entry's own
    /// parameters, which may not set any of ours ([`RESERVED_AUTH_PARAMS`]).
    pub fn authorization_request(
        &self,
        redirect_uri: &Url,
        state: &super::State,
        code_challenge: Option<&str>,
        scopes: &[String],
    ) -> Url {
        let mut url = self.authorization_url.clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("response_type", "code");
            q.append_pair("client_id", &self.client_id);
            q.append_pair("redirect_uri", redirect_uri.as_str());
            if !scopes.is_empty() {
                q.append_pair("scope", &scopes.join(&self.scope_separator));
            }
            q.append_pair("state", state.secret());
            if let Some(challenge) = code_challenge {
                q.append_pair("code_challenge", challenge);
                q.append_pair("code_challenge_method", "S256");
            }
            for (k, v) in &self.authorization_params {
                q.append_pair(k, v);
            }
        }
        url
    }
}

/// Parameters the handler sets itself; a catalog entry may not override them.
const RESERVED_AUTH_PARAMS: &[&str] =
    &["response_type", "client_id", "redirect_uri", "state", "code_challenge", "code_challenge_method", "scope"];
const RESERVED_TOKEN_PARAMS: &[&str] =
    &["grant_type", "code", "redirect_uri", "code_verifier", "refresh_token", "client_id", "client_secret"];

/// Headers no provider entry may have the proxy pass on: credentials, routing and
/// forwarding, method override and URL rewriting, and hop-by-hop headers.
fn never_proxied(name: &str) -> bool {
    matches!(
        name,
        "authorization"
            | "cookie"
            | "host"
            | "connection"
            | "content-length"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "keep-alive"
            | "forwarded"
            | "x-real-ip"
            | "x-http-method-override"
            | "x-http-method"
            | "x-method-override"
            | "x-rewrite-url"
            | "x-functions-key"
            | "origin"
            | "referer"
    ) || ["proxy-", "x-forwarded-", "x-original-", "x-azure-", "x-arr-"].iter().any(|p| name.starts_with(p))
}

/// All providers, by name.
///
/// A preset entry whose parameters each connection names (an instance, a region) is kept
/// as a template; a connection's provider is then the entry's name with its parameters,
/// `netsuite?account=1234567`, resolved (checked, filled, validated) on first use and kept.
#[derive(Debug, Default)]
pub struct Catalog {
    providers: BTreeMap<String, Arc<Provider>>,
    templates: BTreeMap<String, super::presets::Template>,
    resolved: Mutex<HashMap<String, Arc<Provider>>>,
}

/// Resolved per-connection providers kept at most; past it the map starts again.
const MAX_RESOLVED: usize = 10_000;
/// The store keeps a connection's provider in 64 characters (name and parameters).
const MAX_PROVIDER_KEY: usize = 64;

impl Catalog {
    /// Loads the catalog file. A missing file is an empty catalog when `required` is
    /// false (the embedded defaults), an error otherwise.
    pub fn load(path: &Path, required: bool) -> Result<Catalog, CatalogError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(Catalog::default()),
            Err(e) => return Err(CatalogError::Read { path: path.to_path_buf(), reason: e.to_string() }),
        };
        Catalog::parse(&text).map_err(|e| CatalogError::In { path: path.to_path_buf(), error: Box::new(e) })
    }

    pub fn parse(text: &str) -> Result<Catalog, CatalogError> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| CatalogError::Syntax(e.to_string()))?;
        // Presets first (`preset = "xero"`): each entry is the preset under its own fields.
        let mut templates = BTreeMap::new();
        if let Some(toml::Value::Table(entries)) = doc.get_mut("providers") {
            let names: Vec<String> = entries.keys().cloned().collect();
            for name in names {
                let Some(toml::Value::Table(t)) = entries.get_mut(&name) else { continue };
                match super::presets::apply(std::mem::take(t)).map_err(|e| CatalogError::entry(&name, e.into()))? {
                    super::presets::Applied::Complete(table) => *t = table,
                    super::presets::Applied::PerConnection(template) => {
                        // Check now what can be checked: the entry with sample values.
                        entries.remove(&name);
                        templates.insert(name, template);
                    }
                }
            }
        }
        let file: CatalogFile =
            toml::Value::Table(doc).try_into().map_err(|e: toml::de::Error| CatalogError::Syntax(e.to_string()))?;
        let mut providers = BTreeMap::new();
        for (name, spec) in file.providers {
            let provider = validate(&name, spec).map_err(|e| CatalogError::entry(&name, e))?;
            providers.insert(name, Arc::new(provider));
        }
        for name in templates.keys() {
            valid_name(name).map_err(|e| CatalogError::entry(name, e))?;
        }
        Ok(Catalog { providers, templates, resolved: Mutex::default() })
    }

    /// The provider a connection names: an entry's name, or a per-connection entry's
    /// name with its parameters (`netsuite?account=1234567`).
    ///
    /// A key with parameters is resolved only when it is exactly what [`Catalog::instance_key`]
    /// would have made: at most [`MAX_PROVIDER_KEY`] characters, each parameter the entry
    /// takes named once, in order, encoded the one way. Anything else is refused before
    /// anything is kept, so what callers send cannot fill the map of resolved entries with
    /// spellings of one provider (or with keys no connection could store).
    pub fn get(&self, key: &str) -> Option<Arc<Provider>> {
        if let Some(p) = self.providers.get(key) {
            return Some(p.clone());
        }
        if key.len() > MAX_PROVIDER_KEY {
            return None;
        }
        if let Some(p) = self.resolved.lock().unwrap_or_else(|e| e.into_inner()).get(key) {
            return Some(p.clone());
        }
        let (name, query) = key.split_once('?')?;
        let template = self.templates.get(name)?;
        let mut params = BTreeMap::new();
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()).into_owned() {
            if params.insert(k, v).is_some() {
                return None;
            }
        }
        if canonical_key(name, &params) != key {
            return None;
        }
        let pairs: Vec<(String, String)> = params.into_iter().collect();
        let table = template.fill(&pairs).ok()?;
        let spec: ProviderSpec = toml::Value::Table(table).try_into().ok()?;
        let provider = Arc::new(validate_named(key, spec).ok()?);
        let mut resolved = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        if resolved.len() >= MAX_RESOLVED {
            resolved.clear();
        }
        resolved.insert(key.to_string(), provider.clone());
        Some(provider)
    }

    /// The key a new connection stores as its provider: the name alone, or the name with
    /// the connection's parameters (checked against the preset's patterns and hosts).
    pub fn instance_key(&self, name: &str, params: &BTreeMap<String, String>) -> Result<String, CatalogError> {
        if self.providers.contains_key(name) {
            if !params.is_empty() {
                return Err(CatalogError::TakesNoParams(name.to_string()));
            }
            return Ok(name.to_string());
        }
        let template = self.templates.get(name).ok_or_else(|| CatalogError::Unknown(name.to_string()))?;
        let pairs: Vec<(String, String)> = params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        // The preset's own words (which parameter, which pattern), not the entry's name.
        let table = template.fill(&pairs).map_err(|e| CatalogError::Params(Box::new(e)))?;
        let spec: ProviderSpec = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| CatalogError::entry(name, EntryError::Shape(e.to_string())))?;
        let key = canonical_key(name, params);
        if key.len() > MAX_PROVIDER_KEY {
            return Err(CatalogError::KeyTooLong(key));
        }
        validate_named(&key, spec).map_err(|e| CatalogError::entry(name, e))?;
        Ok(key)
    }

    /// The entries whose connections name parameters, with the parameters they take.
    pub fn per_connection(&self) -> impl Iterator<Item = (&str, Vec<&str>)> {
        self.templates.iter().map(|(n, t)| (n.as_str(), t.open_params()))
    }

    /// Every entry's name.
    pub fn names(&self) -> Vec<&str> {
        self.providers.keys().chain(self.templates.keys()).map(String::as_str).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Provider> {
        self.providers.values().map(|p| p.as_ref())
    }

    pub fn len(&self) -> usize {
        self.providers.len() + self.templates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shortest keep-alive refresh interval of any entry.
    pub fn min_keepalive(&self) -> Option<Duration> {
        let of_templates = self
            .templates
            .values()
            .filter_map(|t| t.field("refresh_keepalive_seconds").and_then(toml::Value::as_integer))
            .filter_map(|s| u64::try_from(s).ok())
            .map(Duration::from_secs);
        self.iter().filter_map(|p| p.refresh_keepalive).chain(of_templates).min()
    }

    /// The names of every secret the catalog refers to.
    pub fn secret_names(&self) -> Vec<&str> {
        self.providers
            .values()
            .filter_map(|p| p.client_secret.as_deref())
            .chain(self.templates.values().filter_map(|t| t.field("client_secret").and_then(toml::Value::as_str)))
            .collect()
    }
}

/// Why the catalog, or a connection's provider in it, cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{}: {error}", path.display())]
    In { path: PathBuf, error: Box<CatalogError> },
    /// Not TOML, or not the catalog's shape (TOML's own words, with the line).
    #[error("{0}")]
    Syntax(String),
    #[error("provider {name:?}: {error}")]
    Entry { name: String, error: Box<EntryError> },
    #[error("there is no provider {0:?}")]
    Unknown(String),
    #[error("provider {0:?} takes no connection parameters")]
    TakesNoParams(String),
    #[error(transparent)]
    Params(Box<PresetError>),
    #[error("the provider with its parameters ({0}) is longer than {MAX_PROVIDER_KEY} characters")]
    KeyTooLong(String),
}

impl CatalogError {
    fn entry(name: &str, error: EntryError) -> CatalogError {
        CatalogError::Entry { name: name.to_string(), error: Box::new(error) }
    }
}

#[cfg(test)]
#[path = "catalog_tests.rs"]
mod tests;
