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
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::support::config::{parse_service_url, validate_secret_name};

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
    pub fn load(path: &Path, required: bool) -> Result<Catalog, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(Catalog::default()),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Catalog::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Catalog, String> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        // Presets first (`preset = "xero"`): each entry is the preset under its own fields.
        let mut templates = BTreeMap::new();
        if let Some(toml::Value::Table(entries)) = doc.get_mut("providers") {
            let names: Vec<String> = entries.keys().cloned().collect();
            for name in names {
                let Some(toml::Value::Table(t)) = entries.get_mut(&name) else { continue };
                match super::presets::apply(std::mem::take(t)).map_err(|e| format!("provider {name:?}: {e}"))? {
                    super::presets::Applied::Complete(table) => *t = table,
                    super::presets::Applied::PerConnection(template) => {
                        // Check now what can be checked: the entry with sample values.
                        entries.remove(&name);
                        templates.insert(name, template);
                    }
                }
            }
        }
        let file: CatalogFile = toml::Value::Table(doc).try_into().map_err(|e: toml::de::Error| e.to_string())?;
        let mut providers = BTreeMap::new();
        for (name, spec) in file.providers {
            let provider = validate(&name, spec).map_err(|e| format!("provider {name:?}: {e}"))?;
            providers.insert(name, Arc::new(provider));
        }
        for name in templates.keys() {
            valid_name(name).map_err(|e| format!("provider {name:?}: {e}"))?;
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
    pub fn instance_key(&self, name: &str, params: &BTreeMap<String, String>) -> Result<String, String> {
        if self.providers.contains_key(name) {
            if !params.is_empty() {
                return Err(format!("provider {name:?} takes no connection parameters"));
            }
            return Ok(name.to_string());
        }
        let template = self.templates.get(name).ok_or_else(|| format!("there is no provider {name:?}"))?;
        let pairs: Vec<(String, String)> = params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let table = template.fill(&pairs)?;
        let spec: ProviderSpec = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| e.to_string())?;
        let key = canonical_key(name, params);
        if key.len() > MAX_PROVIDER_KEY {
            return Err(format!(
                "the provider with its parameters ({key}) is longer than {MAX_PROVIDER_KEY} characters"
            ));
        }
        validate_named(&key, spec).map_err(|e| format!("provider {name:?}: {e}"))?;
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

/// `name?k1=v1&k2=v2`, the parameters in name order and form-encoded: the one spelling of
/// a per-connection provider.
fn canonical_key(name: &str, params: &BTreeMap<String, String>) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        q.append_pair(k, v);
    }
    format!("{name}?{}", q.finish())
}

fn valid_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err("the name must be 1-64 lower-case letters, digits, '-' or '_'".into());
    }
    Ok(())
}

fn validate(name: &str, spec: ProviderSpec) -> Result<Provider, String> {
    valid_name(name)?;
    validate_named(name, spec)
}

/// Validates an entry under any key (a per-connection one carries its parameters).
fn validate_named(name: &str, spec: ProviderSpec) -> Result<Provider, String> {
    let url = |field: &str, v: &str| parse_service_url(v).map_err(|e| format!("{field} {e}"));
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
        return Err("client_id is empty".into());
    }
    let client_auth = spec.client_auth.unwrap_or(if spec.client_secret.is_some() {
        ClientAuth::ClientSecretBasic
    } else {
        ClientAuth::None
    });
    match (&spec.client_secret, client_auth) {
        (Some(secret), ClientAuth::None) => {
            return Err(format!("client_auth is \"none\" but client_secret names {secret:?}"));
        }
        (None, ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost) => {
            return Err("client_auth needs a client_secret (the name of the secret, not its value)".into());
        }
        (Some(secret), _) => validate_secret_name(secret).map_err(|e| format!("client_secret: {e}"))?,
        (None, ClientAuth::None) => {}
    }
    for key in spec.authorization_params.keys() {
        if RESERVED_AUTH_PARAMS.contains(&key.as_str()) {
            return Err(format!("authorization_params may not set {key:?}; the handler sets it"));
        }
    }
    for key in spec.token_params.keys() {
        if RESERVED_TOKEN_PARAMS.contains(&key.as_str()) {
            return Err(format!("token_params may not set {key:?}; the handler sets it"));
        }
    }
    let mut proxy_headers = Vec::new();
    for h in &spec.proxy_headers {
        let lower = h.trim().to_ascii_lowercase();
        if lower.is_empty() || !lower.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(format!("proxy_headers: {h:?} is not a header name"));
        }
        if never_proxied(&lower) {
            return Err(format!("proxy_headers may not pass {h:?}: the proxy never forwards it"));
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

#[cfg(test)]
#[path = "catalog_tests.rs"]
mod tests;
