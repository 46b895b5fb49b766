//! Which Azure identity the handler uses, as configured: `AZURE_CREDENTIAL` for the
//! app, `DATAVERSE_CREDENTIAL` / `FNO_CREDENTIAL` for one resource. Only the choice
//! lives here; building the azure_identity credential from it is [`crate::clients::azure`]'s.

use super::ConfigError;
use super::settings::Settings;

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
}
