//! The builders of the long-lived parts, shared by the running app and `handler check`
//! (so a check exercises exactly the wiring production runs), and the token encryption
//! keys: loading them, the local development key, and the rule that a key still sealing
//! something is never dropped.

use std::sync::Arc;

use secrecy::ExposeSecret;
use url::Url;

use super::StartupError;
use crate::clients::azure::{self, ResourceToken};
use crate::clients::dataverse::Dataverse;
use crate::clients::fno::Fno;
use crate::clients::secrets::{KeyVaultSecrets, SecretError, SecretSource, SettingsSecrets};
use crate::clients::store::sqlite::SqliteStore;
use crate::clients::webhooks::{Event, Webhook};
use crate::domain::Store;
use crate::domain::connections::events::{Events, StatusChange};
use crate::support::config::{Config, ConfigError, CredentialConfig, DataverseConfig, FnoConfig, Settings};
use crate::support::crypto::Keyring;
use crate::support::outbound;

/// The one pooled HTTPS client, with the configured upstream timeout.
pub fn http_client(config: &Config) -> Result<reqwest::Client, StartupError> {
    Ok(outbound::client(config.oauth.upstream_timeout)?)
}

/// Where named secrets come from: Key Vault when `KEY_VAULT_URL` is set (read with the
/// app's Azure identity), the settings otherwise.
pub async fn secret_source(config: &Config, settings: Settings) -> Result<Arc<dyn SecretSource>, StartupError> {
    let local = SettingsSecrets::new(settings);
    let Some(vault) = &config.secrets.key_vault else {
        tracing::info!("secrets: from app settings (no KEY_VAULT_URL)");
        return Ok(Arc::new(local));
    };
    tracing::info!(vault = %vault, "secrets: Key Vault, authenticating with {}", config.azure_credential.describe());
    let credential = azure::credential(&config.azure_credential, &local).await?;
    Ok(Arc::new(KeyVaultSecrets::new(vault, credential, config.secrets.cache_ttl)?))
}

/// Tokens for an Azure resource with a credential (a resource's own, or the app's).
pub async fn resource_token(
    credential: Option<&CredentialConfig>,
    config: &Config,
    secrets: &dyn SecretSource,
    resource: &Url,
) -> Result<Arc<ResourceToken>, StartupError> {
    let credential = credential.unwrap_or(&config.azure_credential);
    let built = azure::credential(credential, secrets).await?;
    Ok(Arc::new(ResourceToken::new(built, resource.as_str())))
}

/// A Dataverse client with the configured identity (Dataverse's own, or the app's).
pub async fn dataverse_client(
    dv: &DataverseConfig,
    config: &Config,
    secrets: &dyn SecretSource,
    http: reqwest::Client,
) -> Result<Arc<Dataverse>, StartupError> {
    let credential = dv.credential.as_ref().unwrap_or(&config.azure_credential);
    // Either of the organisation's URLs may be set: the token is for the environment, the
    // requests go to its Web API host.
    let org = crate::domain::ids::OrgUrl::parse(dv.url.as_str()).map_err(|e| ConfigError::new("DATAVERSE_URL", e))?;
    tracing::info!(url = %org, "Dataverse: authenticating with {}", credential.describe());
    let resource = Url::parse(org.as_str()).map_err(|e| ConfigError::new("DATAVERSE_URL", e.to_string()))?;
    let tokens = resource_token(dv.credential.as_ref(), config, secrets, &resource).await?;
    Ok(Arc::new(Dataverse::new(&org.api(), http, tokens, dv.solution.clone()).with_concurrency(dv.max_concurrency)))
}

/// The Finance & Operations capture target with the configured identity.
pub async fn fno_client(
    f: &FnoConfig,
    config: &Config,
    secrets: &dyn SecretSource,
    http: reqwest::Client,
) -> Result<Fno, StartupError> {
    let credential = f.credential.as_ref().unwrap_or(&config.azure_credential);
    tracing::info!(url = %f.url, path = %f.path, "F&O capture: authenticating with {}", credential.describe());
    let tokens = resource_token(f.credential.as_ref(), config, secrets, &f.url).await?;
    Fno::new(&f.url, &f.path, f.data_area.clone(), http, tokens, config.oauth.upstream_timeout)
        .map_err(|e| ConfigError::new("FNO_CAPTURE_PATH", e.to_string()).into())
}

/// The token encryption keys. Without a configured key and with the SQLite store, a
/// key is generated once and kept beside the database file, so the embedded defaults
/// work; any other store requires a configured key.
pub(super) async fn load_keys(config: &Config, secrets: &dyn SecretSource) -> Result<Keyring, StartupError> {
    let name = &config.secrets.token_keys_secret;
    let setting = crate::clients::secrets::env_name(name);
    match secrets.get(name).await {
        Ok(spec) => Keyring::parse(spec.expose_secret()).map_err(|e| ConfigError::new(setting, e.0).into()),
        Err(SecretError::Missing { .. })
            if config.secrets.dev_key_file.is_some() && config.secrets.key_vault.is_none() =>
        {
            let path = config.secrets.dev_key_file.clone().unwrap_or_default();
            let spec = local_key(&path).map_err(|e| {
                let why = read_only(&path).map(|why| format!("; {why}")).unwrap_or_default();
                ConfigError::new(
                    &setting,
                    format!("is not set and a local key could not be written to {}: {e}{why}", path.display()),
                )
            })?;
            tracing::warn!(
                "{setting} is not set: using the local development key in {} (set {setting} for any shared or deployed instance)",
                path.display()
            );
            Keyring::parse(spec.trim()).map_err(|e| ConfigError::new(format!("{}", path.display()), e.0).into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Status changes as signed webhook events.
pub(super) struct WebhookEvents(pub(super) Webhook);

impl Events for WebhookEvents {
    fn status_changed(&self, c: StatusChange) {
        let status = c.to.map(|s| s.as_str()).unwrap_or("deleted");
        self.0.send(Event::status_changed(
            c.connection_id,
            c.tenant,
            c.provider,
            c.owner,
            c.from.map(|s| s.as_str()),
            status,
            c.detail,
            c.at,
        ));
    }
}

/// Why nothing can be written next to `path`, when the reason is a read-only folder: a
/// deployed package (Flex Consumption runs the zip mounted read-only) has no place for
/// the embedded defaults, so the answer says what to set instead.
pub(super) fn read_only(path: &std::path::Path) -> Option<String> {
    let dir = path.parent()?;
    let probe = dir.join(format!(".write-probe-{}", crate::support::crypto::random_hex::<4>()));
    let written = std::fs::create_dir_all(dir).and_then(|()| std::fs::File::create_new(&probe).map(drop));
    let _ = std::fs::remove_file(&probe);
    match written {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied) => {
            Some(format!(
                "{} cannot be written: the app folder is read-only (a deployed package is mounted read-only): set STORE=dataverse with TOKEN_ENCRYPTION_KEYS or KEY_VAULT_URL for production, or SQLITE_PATH to a writable file such as /tmp/companion.db (lost when the instance stops)",
                dir.display()
            ))
        }
        _ => None,
    }
}

/// The local development key in `path`, created on first use. Several handler processes
/// can start at once on a fresh app root (the host runs several workers), so the key is
/// written whole to a private temporary file and then linked into place, which fails if
/// another process got there first: the loser reads the winner's key, never half of it.
fn local_key(path: &std::path::Path) -> std::io::Result<String> {
    if let Ok(spec) = std::fs::read_to_string(path) {
        return Ok(spec);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    store_new_key(path, &Keyring::generate_spec("local1"))
}

/// Puts `spec` at `path` unless another process did first; returns the key in force.
fn store_new_key(path: &std::path::Path, spec: &str) -> std::io::Result<String> {
    use std::io::Write;
    let tmp = path.with_extension(format!("key-{}.tmp", crate::support::crypto::random_hex::<8>()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = opts.open(&tmp).and_then(|mut f| f.write_all(spec.as_bytes()).and_then(|()| f.sync_all()));
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(spec.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read_to_string(path),
        Err(e) => Err(e),
    }
}

/// Opens the embedded store, saying what to set when its folder is read-only.
pub(super) fn open_sqlite(path: &std::path::Path) -> Result<Arc<dyn Store>, StartupError> {
    Ok(Arc::new(SqliteStore::open(path).map_err(|e| match read_only(path) {
        Some(why) => ConfigError::new("SQLITE_PATH", format!("{e}: {why}")).into(),
        None => StartupError::from(e),
    })?))
}

/// A key may leave `TOKEN_ENCRYPTION_KEYS` only once nothing is sealed with it. The
/// embedded store counts in place, in milliseconds; a Dataverse store is checked in the
/// background once serving (see `App::check_keys_in_use`).
pub(super) async fn refuse_dropped_keys(
    config: &Config,
    keys: &Keyring,
    store: &dyn Store,
) -> Result<(), StartupError> {
    if store.kind() != "sqlite" {
        return Ok(());
    }
    let missing = missing_keys(keys, &store.sealed_key_counts().await?);
    if missing.is_empty() {
        return Ok(());
    }
    Err(ConfigError::new(
        crate::clients::secrets::env_name(&config.secrets.token_keys_secret),
        format!(
            "{} still seal{} values in the store ({}); list the key again after the current one, run `handler reseal`, and remove it once that reports none",
            describe_missing(&missing),
            if missing.len() == 1 { "s" } else { "" },
            store.kind()
        ),
    )
    .into())
}

/// The keys `counts` names that the keyring does not have, with their counts.
pub(super) fn missing_keys(keys: &Keyring, counts: &std::collections::BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let known = keys.ids();
    counts.iter().filter(|(k, _)| !known.contains(k)).map(|(k, n)| (k.clone(), *n)).collect()
}

pub(super) fn describe_missing(missing: &[(String, u64)]) -> String {
    let parts: Vec<String> = missing.iter().map(|(k, n)| format!("key {k} ({n} sealed values)")).collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_that_loses_the_key_race_uses_the_winners_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("companion.key");
        assert_eq!(store_new_key(&path, "first").unwrap(), "first");
        // The loser read nothing, generated its own key, and finds the winner's in place.
        assert_eq!(store_new_key(&path, "second").unwrap(), "first");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "first");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");
    }
}
