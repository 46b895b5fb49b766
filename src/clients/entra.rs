//! The multi-tenant app's tokens from each customer's tenant.
//!
//! A client-credential grant at each customer tenant's token endpoint, the app proving
//! itself with the managed identity's token for `api://AzureADTokenExchange` (the
//! identity is a federated credential of the app: no secret anywhere), a certificate's
//! signed assertion, or a secret. Tokens are kept per tenant and scope.

use std::sync::Arc;

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use secrecy::{ExposeSecret, SecretString};

use crate::clients::secrets::{SecretError, SecretSource};
use crate::domain::tenants::TenantTokenError;
use crate::domain::tenants::TenantTokens;
use crate::support::cache::Cache;
use crate::support::config::{AppCredential, TenancyConfig};
use crate::support::outbound;

/// Customer tenants' tokens kept at once (a tenant has one or two scopes).
const TOKENS_KEPT: usize = 4096;

/// The audience of a managed-identity token used as a federated credential (global cloud).
const TOKEN_EXCHANGE_SCOPE: &str = "api://AzureADTokenExchange/.default";

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
    fn from_pem(pem: &str) -> Result<Certificate, CertificateError> {
        use base64::Engine;
        use sha1::Digest;
        let block = |label: &str| {
            let begin = format!("-----BEGIN {label}-----");
            let start = pem.find(&begin)? + begin.len();
            let end = pem[start..].find(&format!("-----END {label}-----"))? + start;
            Some(pem[start..end].split_whitespace().collect::<String>())
        };
        let cert = block("CERTIFICATE").ok_or(CertificateError::NoCertificate)?;
        let der = base64::engine::general_purpose::STANDARD.decode(cert).map_err(CertificateError::NotBase64)?;
        let x5t = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(&der));
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(CertificateError::NoKey)?;
        Ok(Certificate { key, x5t })
    }

    /// A client assertion for `client_id` at `token_url` (RFC 7523; Entra's certificate
    /// credentials): short-lived, single-use by its `jti`.
    fn assertion(&self, client_id: &str, token_url: &str) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.x5t = Some(self.x5t.clone());
        let now = crate::support::time::now();
        let claims = serde_json::json!({
            "aud": token_url, "iss": client_id, "sub": client_id,
            "jti": crate::support::crypto::random_hex::<16>(), "nbf": now - 30, "iat": now, "exp": now + 600,
        });
        jsonwebtoken::encode(&header, &claims, &self.key)
    }
}

/// Why a certificate secret cannot sign client assertions.
#[derive(Debug, thiserror::Error)]
enum CertificateError {
    #[error("no CERTIFICATE block (store the certificate as PEM, with its key)")]
    NoCertificate,
    #[error("the certificate is not base64: {0}")]
    NotBase64(base64::DecodeError),
    #[error("no RSA private key in the PEM ({0})")]
    NoKey(jsonwebtoken::errors::Error),
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate").field("x5t", &self.x5t).finish_non_exhaustive()
    }
}

pub struct TenantCredentials {
    app_id: String,
    authority: url::Url,
    proof: Proof,
    http: reqwest::Client,
    tokens: Cache<(String, String), SecretString>,
}

impl TenantCredentials {
    pub async fn new(
        cfg: &TenancyConfig,
        secrets: &dyn SecretSource,
        http: reqwest::Client,
    ) -> Result<TenantCredentials, SecretError> {
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
                    .map_err(|e| SecretError::Unavailable { name: secret_name.clone(), reason: e.to_string() })?;
                Proof::Certificate(Arc::new(certificate))
            }
        };
        Ok(TenantCredentials {
            app_id: cfg.app_id.clone(),
            authority: cfg.authority.clone(),
            proof,
            http,
            tokens: Cache::new(TOKENS_KEPT),
        })
    }

    /// The customer tenant's token endpoint: a certificate assertion's audience.
    fn token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.authority.as_str().trim_end_matches('/'))
    }

    /// A client-credential token of the app from `tenant` for `scope` (`{org}/.default`),
    /// kept until five minutes before it expires; one request per tenant and scope at a time.
    ///
    /// The request is made here rather than through azure_identity's credentials: those
    /// (1.0 and 1.1) read Entra's error body into a borrowed `&str`, which fails on the
    /// `\r\n` every real `error_description` carries ("AADSTS7000229: …\r\nTrace ID: …"),
    /// so Entra's code and words were lost exactly when they matter. The protocol is
    /// Microsoft identity platform's client-credentials grant (POST
    /// `{authority}/{tenant}/oauth2/v2.0/token`, `grant_type=client_credentials`, the
    /// app's secret or a client assertion); its error body is
    /// `{error, error_description, error_codes: [..]}`.
    pub async fn token(&self, tenant: &str, scope: &str) -> Result<SecretString, TenantTokenError> {
        let key = (tenant.to_ascii_lowercase(), scope.to_string());
        self.tokens
            .get_or_try_insert_with(&key, || async {
                let (token, lifetime) = self.request(tenant, scope).await?;
                let keep = lifetime.saturating_sub(std::time::Duration::from_secs(300));
                Ok((token, keep.max(std::time::Duration::from_secs(1))))
            })
            .await
    }

    async fn request(
        &self,
        tenant: &str,
        scope: &str,
    ) -> Result<(SecretString, std::time::Duration), TenantTokenError> {
        let mut form: Vec<(&str, String)> = vec![
            ("client_id", self.app_id.clone()),
            ("scope", scope.to_string()),
            ("grant_type", "client_credentials".into()),
        ];
        form.extend(self.client_auth(tenant).await?);
        let sent = outbound::upstream(self.http.post(self.token_url(tenant)).form(&form).send()).await;
        let response = sent.map_err(|e| TenantTokenError {
            code: None,
            message: format!("Entra's token endpoint could not be reached: {}", outbound::error_text(e)),
        })?;
        let status = response.status();
        let body = outbound::upstream(response.bytes()).await.map_err(|e| TenantTokenError {
            code: None,
            message: format!("Entra's answer could not be read: {}", outbound::error_text(e)),
        })?;
        entra_answer(status.as_u16(), &body)
    }
    /// How the app authenticates itself at a customer tenant's token endpoint in a grant
    /// of its own making (the administrator's sign-in): the form fields to add.
    pub async fn client_auth(&self, tenant: &str) -> Result<Vec<(&'static str, String)>, TenantTokenError> {
        match &self.proof {
            Proof::Certificate(certificate) => {
                let assertion = certificate
                    .assertion(&self.app_id, &self.token_url(tenant))
                    .map_err(|e| TenantTokenError { code: None, message: e.to_string() })?;
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

    /// The tokens kept for an off-boarded tenant go with it.
    pub fn forget(&self, tenant: &str) {
        let tenant = tenant.to_ascii_lowercase();
        self.tokens.remove_where(|(t, _)| *t == tenant);
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

/// Entra's answer to a token request: the token and how long it lives, or Entra's code
/// and description (its first line; the rest is trace and correlation ids), whatever
/// the body's shape.
fn entra_answer(status: u16, body: &[u8]) -> Result<(SecretString, std::time::Duration), TenantTokenError> {
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Answer {
        access_token: Option<String>,
        expires_in: Option<serde_json::Value>,
        error: Option<String>,
        error_description: Option<String>,
        error_codes: Vec<u32>,
    }
    let parsed: Option<Answer> = serde_json::from_slice(body).ok();
    if (200..300).contains(&status) {
        if let Some(Answer { access_token: Some(token), expires_in, .. }) = parsed {
            // Entra sends a number; some proxies and older endpoints a string.
            let secs = match expires_in {
                Some(serde_json::Value::Number(n)) => n.as_u64(),
                Some(serde_json::Value::String(s)) => s.parse().ok(),
                _ => None,
            };
            return Ok((SecretString::from(token), std::time::Duration::from_secs(secs.unwrap_or(3600))));
        }
        return Err(TenantTokenError {
            code: None,
            message: format!("Entra answered {status} without an access_token"),
        });
    }
    match parsed {
        Some(a) if a.error.is_some() || a.error_description.is_some() => {
            let description = a.error_description.unwrap_or_default();
            let first = outbound::one_line(description.lines().next().unwrap_or_default());
            let code = a.error_codes.first().copied().or_else(|| aadsts_code(&description));
            let error = a.error.unwrap_or_else(|| "error".into());
            Err(TenantTokenError { code, message: format!("Entra answered {status} {error}: {first}") })
        }
        _ => {
            let text = String::from_utf8_lossy(&body[..body.len().min(160)]).into_owned();
            Err(TenantTokenError {
                code: aadsts_code(&text),
                message: format!("Entra answered {status}, not with its JSON error: {}", outbound::one_line(&text)),
            })
        }
    }
}

/// The first `AADSTSnnnn` in Entra's message (for diagnosis and the propagation retry;
/// Entra's codes are stable, its wording is not).
fn aadsts_code(text: &str) -> Option<u32> {
    let at = text.find("AADSTS")?;
    let digits: String = text[at + 6..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[async_trait]
impl TenantTokens for TenantCredentials {
    async fn token(&self, tenant: &str, scope: &str) -> Result<SecretString, TenantTokenError> {
        TenantCredentials::token(self, tenant, scope).await
    }

    async fn client_auth(&self, tenant: &str) -> Result<Vec<(&'static str, String)>, TenantTokenError> {
        TenantCredentials::client_auth(self, tenant).await
    }

    fn forget(&self, tenant: &str) {
        TenantCredentials::forget(self, tenant)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_code_in_entras_message() {
        let m = "ClientAssertionCredential authentication failed. AADSTS7000229: The client application x is missing service principal";
        assert_eq!(super::aadsts_code(m), Some(7000229));
        assert_eq!(super::aadsts_code("connection refused"), None);
    }

    /// Entra's real error body: its description carries `\r\n` and trace lines.
    #[test]
    fn keeps_entras_code_and_first_line() {
        let body = br#"{"error":"invalid_client","error_description":"AADSTS7000229: The client application x is missing service principal in the tenant t.\r\nTrace ID: 1\r\nCorrelation ID: 2\r\nTimestamp: 2026-12-03 08:00:00Z","error_codes":[7000229],"timestamp":"2026-12-03 08:00:00Z"}"#;
        let e = super::entra_answer(401, body).unwrap_err();
        assert_eq!(e.code, Some(7000229));
        assert!(e.is_missing_consent());
        assert_eq!(
            e.message,
            "Entra answered 401 invalid_client: AADSTS7000229: The client application x is missing service principal in the tenant t."
        );
        let e = super::entra_answer(502, b"<html>Bad gateway</html>").unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (None, "Entra answered 502, not with its JSON error: <html>Bad gateway</html>")
        );
        let (_, life) =
            super::entra_answer(200, br#"{"access_token":"t","expires_in":"3599","token_type":"Bearer"}"#).unwrap();
        assert_eq!(life.as_secs(), 3599);
        assert!(super::entra_answer(200, b"{}").is_err());
    }
}
