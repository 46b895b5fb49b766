//! The raw name/value settings, read once: the process environment, over the `Values`
//! of `local.settings.json` when the handler runs without the Functions host (as Core
//! Tools would read them). Typed parsing is in the section constructors of
//! [`super::Config`]; the helpers here turn one value into one type and name the
//! setting when it is wrong.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use super::ConfigError;

/// The raw name/value settings: the environment, over `local.settings.json` when the
/// handler runs on its own.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    values: HashMap<String, String>,
    /// Where the file values came from, for the start-up log line.
    pub local_settings_file: Option<PathBuf>,
    /// Settings in the app root's `local.settings.json` whose names say they hold a
    /// secret and that have a value there: start-up warns about each (names only).
    pub secrets_in_local_file: Vec<String>,
    /// `Host.LocalHttpPort` / `Host.LocalHttpAddress` from local.settings.json.
    pub(super) local_host: LocalHost,
    /// The function app's root (`FUNCTIONS_APP_ROOT_PATH`, else the working directory):
    /// resolved once, here, for every relative path.
    app_root: PathBuf,
}

#[derive(Debug, Clone, Default)]
pub(super) struct LocalHost {
    pub(super) port: Option<u16>,
    pub(super) address: Option<IpAddr>,
}

impl Settings {
    /// Reads the environment, plus `local.settings.json` from the app root when the
    /// Functions host did not start us.
    pub fn load() -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let under_host = env.contains_key("FUNCTIONS_CUSTOMHANDLER_PORT");
        let root = app_root_from(&env);
        let mut settings = Settings { app_root: root.clone(), ..Settings::default() };
        let path = root.join("local.settings.json");
        if path.is_file() {
            // Under the host (Core Tools) the file's values arrive as the environment;
            // it is still read for the warning about secrets kept in it.
            match settings.read_local_settings(&path, !under_host) {
                // The host read the file already; a file it accepted is not ours to refuse.
                Err(_) if under_host => {}
                other => other?,
            }
            if !under_host {
                settings.local_settings_file = Some(path);
            }
        }
        // The real environment wins over the file, as in Core Tools.
        settings.values.extend(env);
        Ok(settings)
    }

    /// Settings from an explicit map (tests and sub-commands).
    pub fn from_map(values: HashMap<String, String>) -> Settings {
        let app_root = app_root_from(&values);
        Settings { values, app_root, ..Settings::default() }
    }

    /// The function app's root directory.
    pub fn app_root(&self) -> &Path {
        &self.app_root
    }

    /// A path setting's value, relative paths taken from the app root.
    pub fn path(&self, name: &str, default: &str) -> PathBuf {
        let p = PathBuf::from(self.get(name).unwrap_or(default));
        if p.is_absolute() { p } else { self.app_root.join(p) }
    }

    fn read_local_settings(&mut self, path: &Path, apply: bool) -> Result<(), ConfigError> {
        let setting = "local.settings.json";
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(setting, format!("cannot read {}: {e}", path.display())))?;
        let doc: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ConfigError::new(setting, format!("is not valid JSON: {e}")))?;
        if doc.get("IsEncrypted").and_then(|v| v.as_bool()) == Some(true) {
            return Err(ConfigError::new(setting, "IsEncrypted is true; the handler reads plain values only"));
        }
        if let Some(values) = doc.get("Values").and_then(|v| v.as_object()) {
            for (name, value) in values {
                let value = match value {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => continue,
                    other => other.to_string(),
                };
                if holds_secret(name, &value) {
                    self.secrets_in_local_file.push(name.clone());
                }
                if apply {
                    self.values.insert(name.clone(), value);
                }
            }
        }
        if !apply {
            return Ok(());
        }
        if let Some(host) = doc.get("Host") {
            self.local_host.port =
                host.get("LocalHttpPort").and_then(|v| v.as_u64()).and_then(|p| u16::try_from(p).ok());
            self.local_host.address =
                host.get("LocalHttpAddress").and_then(|v| v.as_str()).and_then(|a| a.parse().ok());
        }
        Ok(())
    }

    /// The value of a setting; empty strings count as unset.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(|s| s.trim()).filter(|s| !s.is_empty())
    }

    pub fn require(&self, name: &str) -> Result<&str, ConfigError> {
        self.get(name).ok_or_else(|| ConfigError::new(name, "is required but not set"))
    }

    pub(super) fn parse<T: std::str::FromStr>(&self, name: &str, default: T, what: &str) -> Result<T, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| ConfigError::new(name, format!("expected {what}, got {v:?}"))),
        }
    }

    /// One of a setting's words (any case), the first being its default: the value paired
    /// with it, or an error listing the words (`expected "a", "b" or "c", got "x"`).
    pub(super) fn choice<T: Copy>(&self, name: &str, choices: &[(&str, T)]) -> Result<T, ConfigError> {
        let default = choices.first().map_or("", |(word, _)| *word);
        let given = self.get(name).unwrap_or(default).to_ascii_lowercase();
        if let Some(&(_, value)) = choices.iter().find(|(word, _)| *word == given) {
            return Ok(value);
        }
        let words: Vec<String> = choices.iter().map(|(word, _)| format!("{word:?}")).collect();
        let expected = match words.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => words.join(""),
        };
        Err(ConfigError::new(name, format!("expected {expected}, got {given:?}")))
    }

    pub(super) fn seconds(&self, name: &str, default: u64) -> Result<Duration, ConfigError> {
        self.parse(name, default, "a whole number of seconds").map(Duration::from_secs)
    }

    pub(super) fn list(&self, name: &str) -> Vec<String> {
        self.get(name)
            .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    }

    /// A comma-separated list of origins (`https://host[:port]`).
    pub(super) fn origins(&self, name: &str) -> Result<Vec<url::Origin>, ConfigError> {
        self.list(name)
            .iter()
            .map(|o| parse_service_url(o).map(|u| u.origin()).map_err(|p| ConfigError::new(name, p)))
            .collect()
    }

    pub(super) fn url(&self, name: &str) -> Result<Option<Url>, ConfigError> {
        self.get(name).map(|v| parse_service_url(v).map_err(|p| ConfigError::new(name, p))).transpose()
    }
}

/// Whether a setting with this name and value holds a secret: its name says so
/// (`..._SECRET`, `...PASSWORD...`, `..._KEY(S)`) and it is not one of the settings that
/// *name* a secret or a vault; or it is a storage connection string with an account key.
fn holds_secret(name: &str, value: &str) -> bool {
    const NAMES_A_SECRET: [&str; 5] = [
        "TOKEN_ENCRYPTION_KEYS_SECRET",
        "CAPTURE_STATE_KEY_SECRET",
        "WEBHOOK_SIGNING_KEY_SECRET",
        "SECRETS_CACHE_SECONDS",
        "KEY_VAULT_URL",
    ];
    let n = name.to_ascii_uppercase();
    if value.trim().is_empty() || NAMES_A_SECRET.contains(&n.as_str()) || n.ends_with("_SECRET_NAME") {
        return false;
    }
    n.contains("SECRET")
        || n.contains("PASSWORD")
        || n.ends_with("_KEY")
        || n.ends_with("_KEYS")
        || value.contains("AccountKey=")
}

/// Parses a URL the handler will call or hand out. HTTPS is required except for
/// loopback hosts, which local development and the tests use.
pub fn parse_service_url(v: &str) -> Result<Url, ServiceUrlError> {
    let url = Url::parse(v).map_err(|reason| ServiceUrlError::Invalid { value: v.to_string(), reason })?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(ServiceUrlError::PlainHttp(v.to_string())),
        other => Err(ServiceUrlError::Scheme { scheme: other.to_string(), value: v.to_string() }),
    }
}

/// Why a URL the handler would call or hand out is refused (the sentence follows the
/// setting's or field's name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceUrlError {
    #[error("is not a valid URL ({reason}): {value:?}")]
    Invalid { value: String, reason: url::ParseError },
    #[error("must use https (plain http is accepted only for localhost): {0:?}")]
    PlainHttp(String),
    #[error("must be an https URL, not {scheme}: {value:?}")]
    Scheme { scheme: String, value: String },
}

pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

fn app_root_from(env: &HashMap<String, String>) -> PathBuf {
    match env.get("FUNCTIONS_APP_ROOT_PATH").filter(|s| !s.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
    }
}

#[cfg(test)]
mod tests {
    use super::{Settings, holds_secret};

    #[test]
    fn a_choice_takes_its_first_word_by_default_any_case_and_names_every_word_when_wrong() {
        let with = |v: Option<&str>| {
            Settings::from_map(v.map(|v| [("MODE".to_string(), v.to_string())].into()).unwrap_or_default())
        };
        let three = [("store", 1), ("fno", 2), ("off", 3)];
        assert_eq!(with(None).choice("MODE", &three).unwrap(), 1);
        assert_eq!(with(Some("FNO")).choice("MODE", &three).unwrap(), 2);
        let e = with(Some("Nope")).choice("MODE", &three).unwrap_err();
        assert_eq!(e.to_string(), r#"configuration error: MODE: expected "store", "fno" or "off", got "nope""#);
        let e = with(Some("x")).choice("MODE", &[("handler", true), ("platform", false)]).unwrap_err();
        assert_eq!(e.problem, r#"expected "handler" or "platform", got "x""#);
    }

    #[test]
    fn secret_named_settings_are_told_from_settings_that_name_a_secret() {
        assert!(holds_secret("TOKEN_ENCRYPTION_KEYS", "k1:AAAA"));
        assert!(holds_secret("XERO_CLIENT_SECRET", "s"));
        assert!(holds_secret("AzureWebJobsStorage", "DefaultEndpointsProtocol=https;AccountKey=abc"));
        assert!(!holds_secret("AzureWebJobsStorage", "UseDevelopmentStorage=true"));
        assert!(!holds_secret("TOKEN_ENCRYPTION_KEYS_SECRET", "token-encryption-keys"));
        assert!(!holds_secret("WEBHOOK_SIGNING_KEY_SECRET", "webhook-signing-key"));
        assert!(!holds_secret("KEY_VAULT_URL", "https://v.vault.azure.net"));
        assert!(!holds_secret("XERO_CLIENT_SECRET", ""));
        assert!(!holds_secret("PUBLIC_BASE_URL", "http://localhost:7071"));
    }
}
