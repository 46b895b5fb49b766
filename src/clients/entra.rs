//! The multi-tenant app's tokens from each customer's tenant.
//!
//! azure_identity caches tokens per credential, keyed only by scope, and takes no tenant
//! per call; so there is one credential per customer tenant, made on first use and kept.
//! With a managed identity, each is a `ClientAssertionCredential` whose assertion is the
//! one shared managed-identity token for `api://AzureADTokenExchange` (the identity is a
//! federated credential of the app: no secret anywhere); with a secret, a
//! `ClientSecretCredential` per tenant.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::http::ClientMethodOptions;
use azure_identity::{ClientAssertion, ClientAssertionCredential, ClientSecretCredential};
use secrecy::{ExposeSecret, SecretString};

use crate::clients::secrets::{SecretError, SecretSource};
use crate::support::config::{AppCredential, TenancyConfig};
use crate::support::outbound;

/// The audience of a managed-identity token used as a federated credential (global cloud).
const TOKEN_EXCHANGE_SCOPE: &str = "api://AzureADTokenExchange/.default";

/// Why no token could be had from a customer's tenant.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TenantTokenError {
    /// The `AADSTS` code Entra answered with, when it did (`7000229`).
    pub code: Option<u32>,
    pub message: String,
}

impl TenantTokenError {
    /// The app has no service principal in the tenant yet (no consent, or it has not
    /// propagated): worth a short retry right after consent.
    pub fn is_missing_consent(&self) -> bool {
        matches!(self.code, Some(700016 | 7000229))
    }
}

#[derive(Debug)]
struct ManagedIdentityAssertion {
    identity: Arc<dyn TokenCredential>,
}

#[async_trait]
impl ClientAssertion for ManagedIdentityAssertion {
    async fn secret(&self, _: Option<ClientMethodOptions<'_>>) -> azure_core::Result<String> {
        Ok(self.identity.get_token(&[TOKEN_EXCHANGE_SCOPE], None).await?.token.secret().to_string())
    }
}

enum Proof {
    ManagedIdentity(Arc<dyn TokenCredential>),
    Secret(SecretString),
    Certificate(Arc<Certificate>),
}

/// The app's certificate for `private_key_jwt`: the key signs, the certificate's SHA-1
/// thumbprint (`x5t`) tells Entra which registered certificate to check it with.
struct Certificate {
    key: jsonwebtoken::EncodingKey,
    x5t: String,
}

impl Certificate {
    /// From the PEM Key Vault keeps for a certificate of content type PEM: the private key
    /// (PKCS#8 or PKCS#1) and the certificate.
    fn from_pem(pem: &str) -> Result<Certificate, String> {
        use base64::Engine;
        use sha1::Digest;
        let block = |label: &str| {
            let begin = format!("-----BEGIN {label}-----");
            let start = pem.find(&begin)? + begin.len();
            let end = pem[start..].find(&format!("-----END {label}-----"))? + start;
            Some(pem[start..end].split_whitespace().collect::<String>())
        };
        let cert = block("CERTIFICATE").ok_or("no CERTIFICATE block (store the certificate as PEM, with its key)")?;
        let der = base64::engine::general_purpose::STANDARD
            .decode(cert)
            .map_err(|e| format!("the certificate is not base64: {e}"))?;
        let x5t = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(&der));
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes())
            .map_err(|e| format!("no RSA private key in the PEM ({e})"))?;
        Ok(Certificate { key, x5t })
    }

    /// A client assertion for `client_id` at `token_url` (RFC 7523; Entra's certificate
    /// credentials): short-lived, single-use by its `jti`.
    fn assertion(&self, client_id: &str, token_url: &str) -> Result<String, String> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.x5t = Some(self.x5t.clone());
        let now = crate::support::time::now();
        let claims = serde_json::json!({
            "aud": token_url, "iss": client_id, "sub": client_id,
            "jti": crate::support::crypto::random_hex::<16>(), "nbf": now - 30, "iat": now, "exp": now + 600,
        });
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| e.to_string())
    }
}

#[derive(Debug)]
struct CertificateAssertion {
    certificate: Arc<Certificate>,
    client_id: String,
    token_url: String,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate").field("x5t", &self.x5t).finish_non_exhaustive()
    }
}

#[async_trait]
impl ClientAssertion for CertificateAssertion {
    async fn secret(&self, _: Option<ClientMethodOptions<'_>>) -> azure_core::Result<String> {
        self.certificate.assertion(&self.client_id, &self.token_url).map_err(|e| {
            azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                format!("the client assertion could not be signed: {e}"),
            )
        })
    }
}

pub struct TenantCredentials {
    app_id: String,
    authority: url::Url,
    proof: Proof,
    by_tenant: Mutex<HashMap<String, Arc<dyn TokenCredential>>>,
}

impl TenantCredentials {
    pub async fn new(cfg: &TenancyConfig, secrets: &dyn SecretSource) -> Result<TenantCredentials, SecretError> {
        let proof = match &cfg.credential {
            AppCredential::ManagedIdentity { client_id } => {
                let identity = crate::clients::azure::managed_identity(Some(client_id.clone()))
                    .map_err(|e| SecretError::Client(e.to_string()))?;
                Proof::ManagedIdentity(identity)
            }
            AppCredential::ClientSecret { secret_name } => Proof::Secret(secrets.get(secret_name).await?),
            AppCredential::Certificate { secret_name } => {
                let pem = secrets.get(secret_name).await?;
                let certificate = Certificate::from_pem(pem.expose_secret())
                    .map_err(|reason| SecretError::Unavailable { name: secret_name.clone(), reason })?;
                Proof::Certificate(Arc::new(certificate))
            }
        };
        Ok(TenantCredentials {
            app_id: cfg.app_id.clone(),
            authority: cfg.authority.clone(),
            proof,
            by_tenant: Mutex::new(HashMap::new()),
        })
    }

    /// The customer tenant's token endpoint: a certificate assertion's audience.
    fn token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.authority.as_str().trim_end_matches('/'))
    }

    fn credential(&self, tenant: &str) -> Result<Arc<dyn TokenCredential>, TenantTokenError> {
        let mut map = self.by_tenant.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(tenant) {
            return Ok(c.clone());
        }
        let setup = |e: azure_core::Error| TenantTokenError {
            code: None,
            message: format!(
                "the credential for tenant {tenant} could not be set up: {}",
                outbound::one_line(&e.to_string())
            ),
        };
        let credential: Arc<dyn TokenCredential> = match &self.proof {
            Proof::ManagedIdentity(identity) => ClientAssertionCredential::new(
                tenant.to_string(),
                self.app_id.clone(),
                ManagedIdentityAssertion { identity: identity.clone() },
                None,
            )
            .map_err(setup)?,
            Proof::Secret(secret) => ClientSecretCredential::new(
                tenant,
                self.app_id.clone(),
                Secret::new(secret.expose_secret().to_string()),
                None,
            )
            .map_err(setup)?,
            Proof::Certificate(certificate) => ClientAssertionCredential::new(
                tenant.to_string(),
                self.app_id.clone(),
                CertificateAssertion {
                    certificate: certificate.clone(),
                    client_id: self.app_id.clone(),
                    token_url: self.token_url(tenant),
                },
                None,
            )
            .map_err(setup)?,
        };
        map.insert(tenant.to_string(), credential.clone());
        Ok(credential)
    }

    /// A client-credential token of the app from `tenant` for `scope` (`{org}/.default`).
    pub async fn token(&self, tenant: &str, scope: &str) -> Result<SecretString, TenantTokenError> {
        let credential = self.credential(tenant)?;
        match outbound::upstream(credential.get_token(&[scope], None)).await {
            Ok(t) => Ok(SecretString::from(t.token.secret().to_string())),
            Err(e) => {
                let text = outbound::one_line(&e.to_string());
                Err(TenantTokenError { code: aadsts_code(&text), message: text })
            }
        }
    }

    /// How the app authenticates itself at a customer tenant's token endpoint in a grant
    /// of its own making (the administrator's sign-in): the form fields to add.
    pub async fn client_auth(&self, tenant: &str) -> Result<Vec<(&'static str, String)>, TenantTokenError> {
        match &self.proof {
            Proof::Certificate(certificate) => {
                let assertion = certificate
                    .assertion(&self.app_id, &self.token_url(tenant))
                    .map_err(|message| TenantTokenError { code: None, message })?;
                Ok(vec![
                    ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into()),
                    ("client_assertion", assertion),
                ])
            }
            Proof::ManagedIdentity(identity) => {
                let token = identity.get_token(&[TOKEN_EXCHANGE_SCOPE], None).await.map_err(|e| TenantTokenError {
                    code: None,
                    message: format!(
                        "no managed-identity token for the app's assertion: {}",
                        outbound::one_line(&e.to_string())
                    ),
                })?;
                Ok(vec![
                    ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into()),
                    ("client_assertion", token.token.secret().to_string()),
                ])
            }
            Proof::Secret(secret) => Ok(vec![("client_secret", secret.expose_secret().to_string())]),
        }
    }

    /// The cached credential for an off-boarded tenant goes with it.
    pub fn forget(&self, tenant: &str) {
        self.by_tenant.lock().unwrap_or_else(|e| e.into_inner()).remove(tenant);
    }
}

/// Tokens for one customer organisation (`{org}/.default`) from its tenant: what the
/// tenant's Dataverse client uses.
pub struct OrgToken {
    pub credentials: Arc<TenantCredentials>,
    pub tenant: String,
    pub scope: String,
}

#[async_trait]
impl crate::clients::azure::TokenSource for OrgToken {
    async fn token(&self) -> Result<SecretString, crate::clients::azure::IdentityError> {
        self.credentials
            .token(&self.tenant, &self.scope)
            .await
            .map_err(|e| crate::clients::azure::IdentityError::Token { scope: self.scope.clone(), reason: e.message })
    }
}

/// The first `AADSTSnnnn` in Entra's message (for diagnosis and the propagation retry;
/// Entra's codes are stable, its wording is not).
fn aadsts_code(text: &str) -> Option<u32> {
    let at = text.find("AADSTS")?;
    let digits: String = text[at + 6..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_code_in_entras_message() {
        let m = "ClientAssertionCredential authentication failed. AADSTS7000229: The client application x is missing service principal";
        assert_eq!(super::aadsts_code(m), Some(7000229));
        assert_eq!(super::aadsts_code("connection refused"), None);
    }
}
