//! Named secrets: provider client secrets, token encryption keys, and the like.
//!
//! Configuration names a secret (`acme-client-secret`), never writes its value. A
//! [`SecretSource`] resolves the name. Without Key Vault, the name resolves from the
//! settings (environment, then `local.settings.json`), first as written, then in
//! environment style (`ACME_CLIENT_SECRET`: upper case, `-` as `_`), so one name works
//! in Key Vault (which allows only letters, digits and dashes) and in app settings.

use async_trait::async_trait;
use secrecy::SecretString;

use crate::config::Settings;

#[derive(Debug, Clone, thiserror::Error)]
pub enum SecretError {
    #[error("secret {name:?} is not set (looked for {looked_for})")]
    Missing { name: String, looked_for: String },
    #[error("secret {name:?} could not be read: {reason}")]
    Unavailable { name: String, reason: String },
}

/// Checks a secret name against Key Vault's rules, which are the strictest we meet.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 127 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(format!("secret name {name:?} must be 1-127 letters, digits or dashes (the Key Vault rule)"));
    }
    Ok(())
}

/// The environment-style spelling of a secret name.
pub fn env_name(name: &str) -> String {
    name.replace('-', "_").to_ascii_uppercase()
}

#[async_trait]
pub trait SecretSource: Send + Sync {
    /// Where secrets come from, for logs and health (never a value).
    fn describe(&self) -> String;

    async fn get(&self, name: &str) -> Result<SecretString, SecretError>;
}

/// Secrets from the settings the handler started with.
pub struct SettingsSecrets {
    settings: Settings,
}

impl SettingsSecrets {
    pub fn new(settings: Settings) -> SettingsSecrets {
        SettingsSecrets { settings }
    }
}

#[async_trait]
impl SecretSource for SettingsSecrets {
    fn describe(&self) -> String {
        "app settings (environment / local.settings.json)".into()
    }

    async fn get(&self, name: &str) -> Result<SecretString, SecretError> {
        let alt = env_name(name);
        self.settings
            .get(name)
            .or_else(|| self.settings.get(&alt))
            .map(|v| SecretString::from(v.to_string()))
            .ok_or_else(|| SecretError::Missing {
                name: name.to_string(),
                looked_for: if alt == name { alt.clone() } else { format!("{name} and {alt}") },
            })
    }
}
