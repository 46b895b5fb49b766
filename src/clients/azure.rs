//! Azure identities: the azure_identity credential for the configured choice, and a
//! cached access token per resource (Dataverse, Finance & Operations).
//!
//! azure_identity 1.x has no `DefaultAzureCredential`, and guessing is not what a
//! production service should do anyway: the credential is chosen explicitly (see
//! [`CredentialConfig`]) and the choice is logged. `auto` picks the managed identity when
//! the platform provides one (`IDENTITY_ENDPOINT`), workload identity when a federated
//! token file is mounted, and the developer's Azure CLI login otherwise.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::{Secret, TokenCredential};
use azure_identity::{
    ClientSecretCredential, DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use secrecy::{ExposeSecret, SecretString};

use crate::clients::secrets::{SecretError, SecretSource};
use crate::support::cache::Cache;
use crate::support::config::CredentialConfig;
use crate::support::outbound;

/// Why no Azure credential or token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    /// The credential could not be built (a missing client secret, a bad option).
    #[error("the Azure credential could not be set up: {0}")]
    Setup(String),
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// Entra (or the managed-identity endpoint) refused or did not answer.
    #[error("could not get a token for {scope}: {reason}")]
    Token { scope: String, reason: String },
}

/// Builds the azure_identity credential. A client secret is resolved through `secrets`.
pub async fn credential(
    config: &CredentialConfig,
    secrets: &dyn SecretSource,
) -> Result<Arc<dyn TokenCredential>, IdentityError> {
    let setup = |e: azure_core::Error| IdentityError::Setup(outbound::one_line(&e.to_string()));
    let credential: Arc<dyn TokenCredential> = match config {
        CredentialConfig::ManagedIdentity { client_id } => managed_identity(client_id.clone())?,
        CredentialConfig::ClientSecret { tenant_id, client_id, secret_name } => {
            let secret = secrets.get(secret_name).await?;
            ClientSecretCredential::new(
                tenant_id,
                client_id.clone(),
                Secret::new(secret.expose_secret().to_string()),
                None,
            )
            .map_err(setup)?
        }
        CredentialConfig::WorkloadIdentity { tenant_id, client_id } => {
            let options = WorkloadIdentityCredentialOptions {
                tenant_id: tenant_id.clone(),
                client_id: client_id.clone(),
                ..Default::default()
            };
            WorkloadIdentityCredential::new(Some(options)).map_err(setup)?
        }
        CredentialConfig::DeveloperTools => DeveloperToolsCredential::new(None).map_err(setup)?,
    };
    Ok(credential)
}

/// The platform's managed identity: the system-assigned one, or the user-assigned one
/// with this client id.
pub fn managed_identity(client_id: Option<String>) -> Result<Arc<dyn TokenCredential>, IdentityError> {
    let options = ManagedIdentityCredentialOptions {
        user_assigned_id: client_id.map(UserAssignedId::ClientId),
        ..Default::default()
    };
    let credential: Arc<dyn TokenCredential> = ManagedIdentityCredential::new(Some(options))
        .map_err(|e| IdentityError::Setup(outbound::one_line(&e.to_string())))?;
    Ok(credential)
}

/// Something that hands out bearer tokens for one resource.
#[async_trait]
pub trait TokenSource: Send + Sync {
    async fn token(&self) -> Result<SecretString, IdentityError>;
}

/// A fixed token (tests and tools pointed at a double).
pub struct StaticToken(pub SecretString);

#[async_trait]
impl TokenSource for StaticToken {
    async fn token(&self) -> Result<SecretString, IdentityError> {
        Ok(self.0.clone())
    }
}

/// Tokens for `{resource}/.default` from a credential, cached until five minutes
/// before they expire and fetched by one caller at a time.
pub struct ResourceToken {
    credential: Arc<dyn TokenCredential>,
    scope: String,
    cached: Cache<(), SecretString>,
}

const EARLY_RENEWAL: Duration = Duration::from_secs(300);

impl ResourceToken {
    /// `resource` is the service's base URL (`https://org.crm.dynamics.com`).
    pub fn new(credential: Arc<dyn TokenCredential>, resource: &str) -> ResourceToken {
        ResourceToken::for_scope(credential, &format!("{}/.default", resource.trim_end_matches('/')))
    }

    /// Tokens for exactly this scope (`https://monitor.azure.com//.default`).
    pub fn for_scope(credential: Arc<dyn TokenCredential>, scope: &str) -> ResourceToken {
        ResourceToken { credential, scope: scope.to_string(), cached: Cache::new(1) }
    }
}

#[async_trait]
impl TokenSource for ResourceToken {
    async fn token(&self) -> Result<SecretString, IdentityError> {
        self.cached
            .get_or_try_insert_with(&(), || async {
                let token =
                    outbound::upstream(self.credential.get_token(&[self.scope.as_str()], None)).await.map_err(|e| {
                        IdentityError::Token {
                            scope: self.scope.clone(),
                            reason: token_failure(&outbound::with_causes(&e)),
                        }
                    })?;
                let value = SecretString::from(token.token.secret().to_string());
                let lifetime = token.expires_on.unix_timestamp() - crate::support::time::now();
                let fresh_for = Duration::from_secs(lifetime.max(0) as u64).saturating_sub(EARLY_RENEWAL);
                Ok((value, fresh_for))
            })
            .await
    }
}

/// A credential's failure as an operator reads it: the developer tools' long list of
/// tools not found becomes what to do; anything else is kept, clipped.
fn token_failure(text: &str) -> String {
    let no_login = ["az not found", "azd not found", "Please run 'az login'", "not logged in", "azd auth login"];
    if text.contains("AzureCliCredential") && no_login.iter().any(|m| text.contains(m)) {
        return "no Azure login on this machine: run `az login` (or `azd auth login`), or set AZURE_CREDENTIAL to managed_identity, client_secret (with AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET_NAME) or workload_identity".into();
    }
    crate::support::logging::clip(text, 400).into_owned()
}
