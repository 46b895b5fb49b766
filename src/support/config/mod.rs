//! Configuration: every setting is read once at start-up into typed structs.
//!
//! Settings come from the process environment. Run outside the Functions host (no
//! `FUNCTIONS_CUSTOMHANDLER_PORT`), the handler also reads the `Values` of
//! `local.settings.json` the way Core Tools would, and a variable set in the real
//! environment wins over the file. A missing or malformed setting is a [`ConfigError`]
//! that names the setting, so start-up can stop with one readable line.

mod callers;
mod capture;
mod credential;
mod limits;
mod settings;
mod telemetry;
mod tenancy;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

pub use callers::{BackOfficeAuth, ContactLookup, IssuerConfig, PortalConfig, PortalOidcConfig, PowerPagesConfig, dev};
pub use capture::{CaptureMode, CapturePolicy, FnoConfig};
pub use credential::CredentialConfig;
pub use limits::Limits;
pub use settings::{ServiceUrlError, Settings, is_loopback, parse_service_url};
pub use telemetry::{IngestionAuth, TelemetryConfig};
pub use tenancy::{AppCredential, TenancyConfig, is_guid};

/// A setting that is missing or malformed. Displayed as one line for the operator.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {setting}: {problem}")]
pub struct ConfigError {
    pub setting: String,
    pub problem: String,
}

impl ConfigError {
    /// `problem` is anything that reads as the sentence after the setting's name: a
    /// message, or one of the typed errors below (`ServiceUrlError`, `SecretNameError`...).
    pub fn new(setting: impl Into<String>, problem: impl std::fmt::Display) -> Self {
        ConfigError { setting: setting.into(), problem: problem.to_string() }
    }
}

/// Checks a secret name against Key Vault's rules, which are the strictest we meet.
pub fn validate_secret_name(name: &str) -> Result<(), SecretNameError> {
    if name.is_empty() || name.len() > 127 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(SecretNameError(name.to_string()));
    }
    Ok(())
}

/// A secret name Key Vault would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secret name {0:?} must be 1-127 letters, digits or dashes (the Key Vault rule)")]
pub struct SecretNameError(pub String);

/// Everything the handler needs to know, parsed once.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub app_root: PathBuf,
    /// The fixed redirect URI registered with every provider.
    pub redirect_uri: Url,
    pub store: StoreConfig,
    /// The app's own Azure identity (Key Vault, and Dataverse / F&O unless overridden).
    pub azure_credential: CredentialConfig,
    /// When set, `handler provision` may run against it even with the SQLite store.
    pub dataverse: Option<DataverseConfig>,
    /// The product's tables in any Dataverse organisation (ours, and customers'):
    /// their prefix and the requests sent to one organisation at once.
    pub tables: DataverseTables,
    pub providers_file: PathBuf,
    /// Set explicitly (then a missing file is an error) or the default (then it is not).
    pub providers_file_required: bool,
    pub limits: Limits,
    pub oauth: OAuthConfig,
    /// The back-office API's bearer-token issuer; `None` leaves that API closed.
    pub back_office: Option<BackOfficeAuth>,
    /// `/api/mcp`: who may use it beyond the back-office checks, and the scopes its
    /// metadata advertises.
    pub mcp: McpConfig,
    pub portal: PortalConfig,
    pub secrets: SecretsConfig,
    pub log_filter: String,
    pub log_format: crate::support::logging::LogFormat,
    /// Where status-change events go, and the secret (by name) that signs them.
    pub webhook: Option<WebhookConfig>,
    /// Application Insights export; `None` when no connection string is set.
    pub telemetry: Option<TelemetryConfig>,
    /// Serving other organisations (`MULTITENANT_APP_ID`); `None`: single-tenant.
    pub tenancy: Option<TenancyConfig>,
}

#[derive(Debug, Clone, Default)]
pub struct McpConfig {
    /// `MCP_ALLOWED_ROLES`: a caller needs one of these app roles (none: any back-office caller).
    pub allowed_roles: Vec<String>,
    /// `MCP_SCOPES`: `scopes_supported` in the protected-resource metadata
    /// (`api://dynamics-companion/.default`).
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: Url,
    pub key_secret: String,
}

impl WebhookConfig {
    fn from_settings(s: &Settings) -> Result<Option<WebhookConfig>, ConfigError> {
        let Some(url) = s.url("WEBHOOK_URL")? else { return Ok(None) };
        let key_secret = s.get("WEBHOOK_SIGNING_KEY_SECRET").unwrap_or("webhook-signing-key").to_string();
        validate_secret_name(&key_secret).map_err(|e| ConfigError::new("WEBHOOK_SIGNING_KEY_SECRET", e))?;
        Ok(Some(WebhookConfig { url, key_secret }))
    }
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub addr: SocketAddr,
    /// True when the Functions host started us (`FUNCTIONS_CUSTOMHANDLER_PORT`).
    pub under_host: bool,
    pub worker_id: Option<String>,
}

#[derive(Debug, Clone)]
pub enum StoreConfig {
    Sqlite { path: PathBuf },
    Dataverse(DataverseConfig),
}

/// The product's tables wherever they are, and how hard one organisation is pushed:
/// read whether or not `DATAVERSE_URL` is set (a multi-tenant deployment with the SQLite
/// store still reaches customers' organisations).
#[derive(Debug, Clone)]
pub struct DataverseTables {
    /// Publisher prefix of the tables (`dc` gives `dc_connection`).
    pub prefix: String,
    /// Requests this instance sends one organisation at once, at most.
    pub max_concurrency: usize,
}

impl DataverseTables {
    fn from_settings(s: &Settings) -> Result<DataverseTables, ConfigError> {
        let prefix = s.get("DATAVERSE_PREFIX").unwrap_or("dc").to_string();
        if prefix.is_empty() || prefix.len() > 8 || !prefix.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(ConfigError::new("DATAVERSE_PREFIX", "must be the publisher's 1-8 letter or digit prefix"));
        }
        let max_concurrency = match s.parse("DATAVERSE_MAX_CONCURRENCY", 16usize, "a number")? {
            n @ 1..=52 => n,
            _ => {
                return Err(ConfigError::new(
                    "DATAVERSE_MAX_CONCURRENCY",
                    "must be 1-52 (Dataverse allows 52 concurrent requests per application user)",
                ));
            }
        };
        Ok(DataverseTables { prefix, max_concurrency })
    }
}

/// Where and how to reach Dataverse.
#[derive(Debug, Clone)]
pub struct DataverseConfig {
    /// The environment URL, `https://org.crm.dynamics.com`.
    pub url: Url,
    /// Publisher prefix of the tables (`dc` gives `dc_connection`).
    pub prefix: String,
    /// Unique name of the solution `provision` puts the tables in.
    pub solution: Option<String>,
    /// A Dataverse-specific credential; `None` uses the app's.
    pub credential: Option<CredentialConfig>,
    /// Requests this instance sends Dataverse at once, at most.
    pub max_concurrency: usize,
}

impl StoreConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            StoreConfig::Sqlite { .. } => "sqlite",
            StoreConfig::Dataverse(_) => "dataverse",
        }
    }
}

#[derive(Debug, Clone)]
pub struct OAuthConfig {
    pub state_ttl: Duration,
    pub refresh_margin: Duration,
    /// How long a process trusts its cached access token before re-reading the store.
    pub token_cache_ttl: Duration,
    /// A refresh lease older than this is considered abandoned by a crashed instance.
    pub lease_duration: Duration,
    /// The timer refreshes tokens that expire within this window.
    pub timer_lookahead: Duration,
    pub capture: CaptureMode,
    pub capture_policy: CapturePolicy,
    pub capture_retention: Duration,
    /// Origins (`https://host[:port]`) a `return_url` may point to.
    pub return_url_origins: Vec<url::Origin>,
    pub upstream_timeout: Duration,
    /// How long a write that must not be lost retries a store that is unavailable.
    pub store_retry: Duration,
    /// How often an instance asks the store what other instances changed; zero: never.
    pub change_feed: Duration,
}

#[derive(Debug, Clone)]
pub struct SecretsConfig {
    /// Key Vault to read secrets from; `None` reads them from the settings.
    pub key_vault: Option<Url>,
    /// How long a secret read from Key Vault is used before it is read again.
    pub cache_ttl: Duration,
    /// Comma-separated `id:base64key` list, or its secret name; see `crypto::Keyring`.
    pub token_keys_secret: String,
    /// Where a generated development key is kept when no key is configured (SQLite only).
    pub dev_key_file: Option<PathBuf>,
}

impl Config {
    /// Parses every section; the first bad setting stops it, named in the error.
    pub fn from_settings(s: &Settings) -> Result<Config, ConfigError> {
        let listen = Listen::from_settings(s)?;
        let redirect_uri = redirect_uri(s, &listen)?;
        let tenancy = TenancyConfig::from_settings(s, &redirect_uri)?;
        let tables = DataverseTables::from_settings(s)?;
        let dataverse = DataverseConfig::from_settings(s, &tables)?;
        let store = StoreConfig::from_settings(s, dataverse.as_ref())?;
        let secrets = SecretsConfig::from_settings(s, &store)?;
        Ok(Config {
            app_root: s.app_root().to_path_buf(),
            redirect_uri,
            azure_credential: CredentialConfig::from_settings(s, "AZURE")?.unwrap_or(CredentialConfig::DeveloperTools),
            providers_file: s.path("PROVIDERS_FILE", "providers.toml"),
            providers_file_required: s.get("PROVIDERS_FILE").is_some(),
            limits: Limits::from_settings(s)?,
            oauth: OAuthConfig::from_settings(s)?,
            back_office: BackOfficeAuth::from_settings(s)?,
            mcp: McpConfig { allowed_roles: s.list("MCP_ALLOWED_ROLES"), scopes: s.list("MCP_SCOPES") },
            portal: PortalConfig::from_settings(s)?,
            log_filter: log_filter(s)?,
            log_format: match s.get("LOG_FORMAT").map(str::to_ascii_lowercase).as_deref() {
                None | Some("text") => crate::support::logging::LogFormat::Text,
                Some("json") => crate::support::logging::LogFormat::Json,
                Some(other) => {
                    return Err(ConfigError::new("LOG_FORMAT", format!("expected text or json, got {other:?}")));
                }
            },
            webhook: WebhookConfig::from_settings(s)?,
            telemetry: TelemetryConfig::from_settings(s)?,
            tenancy,
            listen,
            store,
            dataverse,
            tables,
            secrets,
        })
    }
}

impl Listen {
    fn from_settings(s: &Settings) -> Result<Listen, ConfigError> {
        Ok(match s.get("FUNCTIONS_CUSTOMHANDLER_PORT") {
            Some(port) => {
                let port: u16 = port.parse().map_err(|_| {
                    ConfigError::new("FUNCTIONS_CUSTOMHANDLER_PORT", format!("expected a TCP port, got {port:?}"))
                })?;
                // The host always connects to 127.0.0.1.
                Listen {
                    addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
                    under_host: true,
                    worker_id: s.get("FUNCTIONS_CUSTOMHANDLER_WORKER_ID").map(str::to_string),
                }
            }
            None => {
                let port = s.parse("LOCAL_HTTP_PORT", s.local_host.port.unwrap_or(7071), "a TCP port")?;
                let ip = s.local_host.address.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
                Listen { addr: SocketAddr::new(ip, port), under_host: false, worker_id: None }
            }
        })
    }
}

/// `OAUTH_REDIRECT_URI`, else `PUBLIC_BASE_URL` + `/api/oauth/callback`, else localhost.
fn redirect_uri(s: &Settings, listen: &Listen) -> Result<Url, ConfigError> {
    let public_base = match s.url("PUBLIC_BASE_URL")? {
        Some(u) => u,
        None => {
            let port = if listen.under_host { 7071 } else { listen.addr.port() };
            Url::parse(&format!("http://localhost:{port}"))
                .map_err(|e| ConfigError::new("PUBLIC_BASE_URL", e.to_string()))?
        }
    };
    match s.url("OAUTH_REDIRECT_URI")? {
        Some(u) => Ok(u),
        None => public_base
            .join("/api/oauth/callback")
            .map_err(|e| ConfigError::new("PUBLIC_BASE_URL", format!("cannot build the callback URL: {e}"))),
    }
}

impl DataverseConfig {
    fn from_settings(s: &Settings, tables: &DataverseTables) -> Result<Option<DataverseConfig>, ConfigError> {
        let Some(url) = s.url("DATAVERSE_URL")? else {
            return Ok(None);
        };
        Ok(Some(DataverseConfig {
            url,
            prefix: tables.prefix.clone(),
            solution: s.get("DATAVERSE_SOLUTION").map(str::to_string),
            credential: CredentialConfig::from_settings(s, "DATAVERSE")?,
            max_concurrency: tables.max_concurrency,
        }))
    }
}

impl StoreConfig {
    fn from_settings(s: &Settings, dataverse: Option<&DataverseConfig>) -> Result<StoreConfig, ConfigError> {
        if s.choice("STORE", &[("sqlite", false), ("dataverse", true)])? {
            dataverse
                .cloned()
                .map(StoreConfig::Dataverse)
                .ok_or_else(|| ConfigError::new("DATAVERSE_URL", "is required with STORE=dataverse"))
        } else {
            Ok(StoreConfig::Sqlite { path: s.path("SQLITE_PATH", ".data/companion.db") })
        }
    }
}

impl OAuthConfig {
    fn from_settings(s: &Settings) -> Result<OAuthConfig, ConfigError> {
        let oauth = OAuthConfig {
            state_ttl: s.seconds("STATE_TTL_SECONDS", 600)?,
            refresh_margin: s.seconds("REFRESH_MARGIN_SECONDS", 300)?,
            token_cache_ttl: s.seconds("TOKEN_CACHE_SECONDS", 30)?,
            lease_duration: s.seconds("REFRESH_LEASE_SECONDS", 60)?,
            timer_lookahead: s.seconds("TIMER_LOOKAHEAD_SECONDS", 900)?,
            capture: CaptureMode::from_settings(s)?,
            capture_policy: CapturePolicy::from_settings(s)?,
            capture_retention: s.seconds("CAPTURE_RETENTION_SECONDS", 7 * 24 * 3600)?,
            return_url_origins: s.origins("RETURN_URL_ALLOWLIST")?,
            upstream_timeout: s.seconds("UPSTREAM_TIMEOUT_SECONDS", 30)?,
            store_retry: s.seconds("STORE_RETRY_SECONDS", 30)?,
            change_feed: s.seconds("CHANGE_FEED_SECONDS", 5)?,
        };
        if oauth.state_ttl.is_zero() {
            return Err(ConfigError::new("STATE_TTL_SECONDS", "must be at least 1"));
        }
        if oauth.lease_duration <= oauth.upstream_timeout {
            // A lease must outlive the refresh call it guards, or a slow provider lets a
            // second instance take over and replay the rotating refresh token.
            return Err(ConfigError::new(
                "REFRESH_LEASE_SECONDS",
                "must be longer than UPSTREAM_TIMEOUT_SECONDS, so a refresh cannot outlive its lease",
            ));
        }
        Ok(oauth)
    }
}

impl SecretsConfig {
    fn from_settings(s: &Settings, store: &StoreConfig) -> Result<SecretsConfig, ConfigError> {
        let key_vault = match s.get("KEY_VAULT_URL") {
            None => None,
            Some(v) => {
                let url = Url::parse(v)
                    .map_err(|e| ConfigError::new("KEY_VAULT_URL", format!("is not a valid URL ({e}): {v:?}")))?;
                if url.scheme() != "https" {
                    return Err(ConfigError::new(
                        "KEY_VAULT_URL",
                        format!("must be https (Key Vault requires TLS): {v:?}"),
                    ));
                }
                Some(url)
            }
        };
        Ok(SecretsConfig {
            key_vault,
            cache_ttl: s.seconds("SECRETS_CACHE_SECONDS", 300)?,
            token_keys_secret: s.get("TOKEN_ENCRYPTION_KEYS_SECRET").unwrap_or("token-encryption-keys").to_string(),
            dev_key_file: match store {
                StoreConfig::Sqlite { path } => Some(path.with_extension("key")),
                StoreConfig::Dataverse(_) => None,
            },
        })
    }
}

/// `LOG_LEVEL` (or `RUST_LOG`): a level, or comma-separated `target=level` directives. A bare
/// word that is not a level (`verbose`) would be read by the filter as a target name and
/// silence everything else, so it is refused here, naming the levels.
fn log_filter(s: &Settings) -> Result<String, ConfigError> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let (name, value) = match (s.get("LOG_LEVEL"), s.get("RUST_LOG")) {
        (Some(v), _) => ("LOG_LEVEL", v),
        (None, Some(v)) => ("RUST_LOG", v),
        (None, None) => return Ok("info".into()),
    };
    for directive in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(ConfigError::new(
                name,
                format!(
                    "{directive:?} is not a level: use one of {} (or target=level directives, e.g. info,dynamics_companion=debug)",
                    LEVELS.join(", ")
                ),
            ));
        }
    }
    Ok(value.to_string())
}
