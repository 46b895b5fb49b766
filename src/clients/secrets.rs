//! Named secrets: provider client secrets, token encryption keys, and the like.
//!
//! Configuration names a secret (`acme-client-secret`), never writes its value. A
//! [`SecretSource`] resolves the name. Without Key Vault, the name resolves from the
//! settings (environment, then `local.settings.json`), first as written, then in
//! environment style (`ACME_CLIENT_SECRET`: upper case, `-` as `_`), so one name works
//! in Key Vault (which allows only letters, digits and dashes) and in app settings.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use secrecy::SecretString;
use tracing::Instrument;

use crate::support::cache::Cache;
use crate::support::config::Settings;
use crate::support::outbound::{self, one_line};

#[derive(Debug, Clone, thiserror::Error)]
pub enum SecretError {
    #[error("secret {name:?} is not set (looked for {looked_for})")]
    Missing { name: String, looked_for: String },
    #[error("secret {name:?} could not be read: {reason}")]
    Unavailable { name: String, reason: String },
    #[error("the Key Vault client could not be built: {0}")]
    Client(String),
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

/// Secrets from Azure Key Vault, cached for a TTL so a rotated secret is picked up
/// without a restart and each secret costs one vault call per TTL, not one per request.
///
/// When the vault cannot be reached after start-up, the last value read keeps being
/// served (with a warning) and the vault is tried again after another TTL: a short vault
/// outage must not take the product down. A secret the vault says does not exist is an
/// error, whatever the cache holds.
pub struct KeyVaultSecrets {
    client: azure_security_keyvault_secrets::SecretClient,
    vault: String,
    host: String,
    ttl: Duration,
    /// One fetch per name at a time: concurrent callers of an expired secret share it.
    cache: Cache<String, SecretString>,
    /// Vault reads made, for `check` and the tests.
    pub fetches: AtomicU64,
}

/// How long one secret read may take before the cached value is used instead.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Far more than any configuration names; the names come from configuration, not traffic.
const MAX_SECRETS: usize = 256;

impl KeyVaultSecrets {
    pub fn new(
        vault: &url::Url,
        credential: Arc<dyn azure_core::credentials::TokenCredential>,
        ttl: Duration,
    ) -> Result<KeyVaultSecrets, SecretError> {
        use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions};
        // The SDK's default retries last up to a minute; a request waiting on a secret
        // should fall back to the cached value much sooner.
        let retry = ExponentialRetryOptions {
            initial_delay: azure_core::time::Duration::milliseconds(200),
            max_retries: 2,
            max_total_elapsed: azure_core::time::Duration::seconds(5),
            max_delay: azure_core::time::Duration::seconds(2),
        };
        let options = azure_security_keyvault_secrets::SecretClientOptions {
            client_options: ClientOptions {
                retry: RetryOptions::exponential(retry),
                per_call_policies: vec![Arc::new(TraceContextPolicy)],
                ..Default::default()
            },
            ..Default::default()
        };
        let client = azure_security_keyvault_secrets::SecretClient::new(vault.as_str(), credential, Some(options))
            .map_err(|e| SecretError::Client(one_line(&e.to_string())))?;
        Ok(KeyVaultSecrets {
            client,
            vault: vault.to_string(),
            host: vault.host_str().unwrap_or_default().to_string(),
            ttl,
            cache: Cache::new(MAX_SECRETS),
            fetches: AtomicU64::new(0),
        })
    }

    async fn fetch(&self, name: &str) -> Result<SecretString, SecretError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let read = async {
            let resp = self.client.get_secret(name, None).await?;
            resp.into_model()
        };
        let span = tracing::info_span!(
            "dependency",
            otel.kind = "client",
            otel.name = %format_args!("GET {}", self.host),
            http.request.method = "GET",
            server.address = %self.host,
            url.full = %format_args!("{}secrets/{name}", self.vault),
        );
        let result = outbound::upstream(tokio::time::timeout(FETCH_TIMEOUT, read).instrument(span)).await;
        let unavailable = |reason: String| SecretError::Unavailable { name: name.to_string(), reason };
        match result {
            Ok(Ok(secret)) => secret
                .value
                .map(SecretString::from)
                .ok_or_else(|| unavailable("the vault returned the secret without a value".into())),
            Ok(Err(e)) if e.http_status().map(u16::from) == Some(404) => {
                Err(SecretError::Missing { name: name.to_string(), looked_for: format!("Key Vault {}", self.vault) })
            }
            Ok(Err(e)) => Err(unavailable(outbound::with_causes(&e))),
            Err(_) => Err(unavailable(format!("Key Vault did not answer within {} s", FETCH_TIMEOUT.as_secs()))),
        }
    }
}

/// Sends the current span's `traceparent` with each Key Vault call, which goes through the
/// SDK's pipeline rather than [`outbound::send`].
#[derive(Debug)]
struct TraceContextPolicy;

#[async_trait]
impl azure_core::http::policies::Policy for TraceContextPolicy {
    async fn send(
        &self,
        ctx: &azure_core::http::Context,
        request: &mut azure_core::http::Request,
        next: &[Arc<dyn azure_core::http::policies::Policy>],
    ) -> azure_core::http::policies::PolicyResult {
        let mut headers = reqwest::header::HeaderMap::new();
        crate::support::trace_context::inject(&mut headers);
        for (name, value) in &headers {
            if let Ok(v) = value.to_str() {
                request.insert_header(name.as_str().to_string(), v.to_string());
            }
        }
        match next.split_first() {
            Some((policy, rest)) => policy.send(ctx, request, rest).await,
            None => Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Other,
                "the Key Vault pipeline has no transport",
            )),
        }
    }
}

#[async_trait]
impl SecretSource for KeyVaultSecrets {
    fn describe(&self) -> String {
        format!("Azure Key Vault {}", self.vault)
    }

    async fn get(&self, name: &str) -> Result<SecretString, SecretError> {
        let key = name.to_string();
        self.cache
            .get_or_try_insert_with(&key, || async {
                match self.fetch(name).await {
                    Ok(value) => Ok((value, self.ttl)),
                    Err(e @ SecretError::Missing { .. }) => {
                        self.cache.remove(&key);
                        Err(e)
                    }
                    Err(e) => match self.cache.get_stale(&key) {
                        Some(stale) => {
                            tracing::warn!(secret = name, "Key Vault unavailable; using the cached value: {e}");
                            // Try the vault again after another TTL, not on every request.
                            Ok((stale.value, self.ttl))
                        }
                        None => Err(e),
                    },
                }
            })
            .await
    }
}
