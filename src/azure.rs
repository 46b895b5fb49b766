//! Azure identities: which credential the handler uses to reach Azure resources
//! (Dataverse, Finance & Operations, Key Vault), and a cached access token per resource.
//!
//! azure_identity 1.x has no `DefaultAzureCredential`, and guessing is not what a
//! production service should do anyway: the credential is chosen explicitly with
//! `AZURE_CREDENTIAL` (or `DATAVERSE_CREDENTIAL` / `FNO_CREDENTIAL` for one resource),
//! and the choice is logged. `auto` picks the managed identity when the platform
//! provides one (`IDENTITY_ENDPOINT`), workload identity when a federated token file is
//! mounted, and the developer's Azure CLI login otherwise.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::{Secret, TokenCredential};
use azure_identity::{
    ClientSecretCredential, DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;

use crate::config::{ConfigError, Settings};
use crate::secrets::SecretSource;

/// Which credential to use, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialConfig {
    /// The platform's managed identity: system-assigned, or user-assigned by client id.
    ManagedIdentity { client_id: Option<String> },
    /// An app registration's client secret; the secret is named, not written.
    ClientSecret { tenant_id: String, client_id: String, secret_name: String },
    /// A federated token file (AKS workload identity, or any OIDC federation).
    WorkloadIdentity { tenant_id: Option<String>, client_id: Option<String> },
    /// The developer's `az` / `azd` login (local work only).
    DeveloperTools,
}

impl CredentialConfig {
    /// Reads `{PREFIX}_CREDENTIAL` and its companions. For a resource prefix
    /// (`DATAVERSE`, `FNO`), an unset `{PREFIX}_CREDENTIAL` means "the app's credential"
    /// and `None` is returned.
    pub fn from_settings(s: &Settings, prefix: &str) -> Result<Option<CredentialConfig>, ConfigError> {
        let name = format!("{prefix}_CREDENTIAL");
        let kind = match s.get(&name) {
            Some(k) => k.to_ascii_lowercase(),
            None if prefix != "AZURE" => return Ok(None),
            None => "auto".to_string(),
        };
        let client_id = s.get(&format!("{prefix}_CLIENT_ID")).map(str::to_string);
        let tenant_id = s.get(&format!("{prefix}_TENANT_ID")).map(str::to_string);
        let config = match kind.as_str() {
            "auto" => {
                if s.get("IDENTITY_ENDPOINT").is_some() {
                    CredentialConfig::ManagedIdentity { client_id }
                } else if s.get("AZURE_FEDERATED_TOKEN_FILE").is_some() {
                    CredentialConfig::WorkloadIdentity { tenant_id, client_id }
                } else {
                    CredentialConfig::DeveloperTools
                }
            }
            "managed_identity" => CredentialConfig::ManagedIdentity { client_id },
            "client_secret" => {
                let tenant_key = format!("{prefix}_TENANT_ID");
                let client_key = format!("{prefix}_CLIENT_ID");
                CredentialConfig::ClientSecret {
                    tenant_id: tenant_id.ok_or_else(|| {
                        ConfigError::new(&tenant_key, format!("is required with {name}=client_secret"))
                    })?,
                    client_id: client_id.ok_or_else(|| {
                        ConfigError::new(&client_key, format!("is required with {name}=client_secret"))
                    })?,
                    secret_name: s
                        .get(&format!("{prefix}_CLIENT_SECRET_NAME"))
                        .unwrap_or(&format!("{}-client-secret", prefix.to_ascii_lowercase()))
                        .to_string(),
                }
            }
            "workload_identity" => CredentialConfig::WorkloadIdentity { tenant_id, client_id },
            "developer_tools" | "azure_cli" => CredentialConfig::DeveloperTools,
            other => {
                return Err(ConfigError::new(
                    name,
                    format!(
                        "expected auto, managed_identity, client_secret, workload_identity or developer_tools, got {other:?}"
                    ),
                ));
            }
        };
        Ok(Some(config))
    }

    /// What the log line says: the kind and the public identifiers, never a secret.
    pub fn describe(&self) -> String {
        match self {
            CredentialConfig::ManagedIdentity { client_id: None } => "managed identity (system-assigned)".into(),
            CredentialConfig::ManagedIdentity { client_id: Some(c) } => {
                format!("managed identity (user-assigned, client id {c})")
            }
            CredentialConfig::ClientSecret { tenant_id, client_id, secret_name } => {
                format!("client secret (tenant {tenant_id}, client id {client_id}, secret named {secret_name})")
            }
            CredentialConfig::WorkloadIdentity { .. } => "workload identity (federated token file)".into(),
            CredentialConfig::DeveloperTools => "developer tools (Azure CLI / azd login)".into(),
        }
    }

    /// Builds the azure_identity credential. A client secret is resolved through `secrets`.
    pub async fn build(&self, secrets: &dyn SecretSource) -> Result<Arc<dyn TokenCredential>, String> {
        let credential: Arc<dyn TokenCredential> = match self {
            CredentialConfig::ManagedIdentity { client_id } => {
                let options = ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    ..Default::default()
                };
                ManagedIdentityCredential::new(Some(options)).map_err(|e| e.to_string())?
            }
            CredentialConfig::ClientSecret { tenant_id, client_id, secret_name } => {
                let secret = secrets.get(secret_name).await.map_err(|e| e.to_string())?;
                ClientSecretCredential::new(
                    tenant_id,
                    client_id.clone(),
                    Secret::new(secret.expose_secret().to_string()),
                    None,
                )
                .map_err(|e| e.to_string())?
            }
            CredentialConfig::WorkloadIdentity { tenant_id, client_id } => {
                let options = WorkloadIdentityCredentialOptions {
                    tenant_id: tenant_id.clone(),
                    client_id: client_id.clone(),
                    ..Default::default()
                };
                WorkloadIdentityCredential::new(Some(options)).map_err(|e| e.to_string())?
            }
            CredentialConfig::DeveloperTools => DeveloperToolsCredential::new(None).map_err(|e| e.to_string())?,
        };
        Ok(credential)
    }
}

/// Something that hands out bearer tokens for one resource.
#[async_trait]
pub trait TokenSource: Send + Sync {
    async fn token(&self) -> Result<SecretString, String>;
}

/// A fixed token (tests and tools pointed at a double).
pub struct StaticToken(pub SecretString);

#[async_trait]
impl TokenSource for StaticToken {
    async fn token(&self) -> Result<SecretString, String> {
        Ok(self.0.clone())
    }
}

/// Tokens for `{resource}/.default` from a credential, cached until five minutes
/// before they expire and fetched by one caller at a time.
pub struct ResourceToken {
    credential: Arc<dyn TokenCredential>,
    scope: String,
    /// Read on every call; written only after a fetch.
    cached: std::sync::RwLock<Option<(SecretString, i64)>>,
    /// Held only while fetching, so concurrent callers wait for one fetch.
    fetching: Mutex<()>,
}

const EARLY_RENEWAL: Duration = Duration::from_secs(300);

impl ResourceToken {
    /// `resource` is the service's base URL (`https://org.crm.dynamics.com`).
    pub fn new(credential: Arc<dyn TokenCredential>, resource: &str) -> ResourceToken {
        ResourceToken {
            credential,
            scope: format!("{}/.default", resource.trim_end_matches('/')),
            cached: std::sync::RwLock::new(None),
            fetching: Mutex::new(()),
        }
    }

    fn fresh(&self) -> Option<SecretString> {
        let cached = self.cached.read().unwrap_or_else(|e| e.into_inner());
        let (token, expires) = cached.as_ref()?;
        (*expires - EARLY_RENEWAL.as_secs() as i64 > crate::time::now()).then(|| token.clone())
    }
}

#[async_trait]
impl TokenSource for ResourceToken {
    async fn token(&self) -> Result<SecretString, String> {
        if let Some(token) = self.fresh() {
            return Ok(token);
        }
        let _fetch = self.fetching.lock().await;
        if let Some(token) = self.fresh() {
            return Ok(token);
        }
        let token = crate::http::upstream(self.credential.get_token(&[self.scope.as_str()], None))
            .await
            .map_err(|e| format!("could not get a token for {}: {}", self.scope, one_line(&e.to_string())))?;
        let value = SecretString::from(token.token.secret().to_string());
        *self.cached.write().unwrap_or_else(|e| e.into_inner()) =
            Some((value.clone(), token.expires_on.unix_timestamp()));
        Ok(value)
    }
}

/// azure_identity errors can span lines (Entra puts `\r\n` in descriptions).
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
