//! The customer administrator's own sign-in, for onboarding their organisation.
//!
//! Authorization code with PKCE at the customer's tenant, the app as a confidential
//! client (its federated credential or secret). The first token is for the Global
//! Discovery Service (which environments this administrator reaches); its refresh token
//! then buys one token for the chosen organisation. Both are used for this one
//! onboarding and never stored: the PKCE verifier is derived from the state by the key
//! that signed it, so nothing about the sign-in is kept between the two requests but the
//! state's hash on the tenant record (single use).

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use super::{Tenant, TenantError, Tenants};
use crate::domain::{StoreError, TenantStatus};
use crate::support::crypto::StateError;
use crate::support::outbound;

/// How long the administrator has to sign in once the link is issued.
const SIGN_IN_SECONDS: i64 = 3600;
const DISCOVERY_SCOPE: &str = "https://globaldisco.crm.dynamics.com/user_impersonation";
const PKCE_LABEL: &str = "onboarding-pkce";

/// What Entra's authorization response carried.
#[derive(Debug, Default)]
pub struct SignInAnswer {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

/// Why an onboarding sign-in went no further; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    #[error("the answer carries no state")]
    NoState,
    #[error("{0}")]
    State(StateError),
    #[error("this sign-in link was already used or replaced; ask for a new one")]
    Used,
    #[error("the sign-in was not completed ({error}): {description}")]
    Refused { error: String, description: String },
    #[error("Microsoft Entra did not issue the administrator's token: {0}")]
    Token(String),
    #[error("the Global Discovery Service did not answer: {0}")]
    Discovery(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An environment the administrator reaches.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Instance {
    /// The environment URL (`https://org.crm.dynamics.com`).
    #[serde(default)]
    pub url: Option<String>,
    /// Where its Web API answers (`https://org.api.crm.dynamics.com`).
    pub api_url: String,
    #[serde(default)]
    pub friendly_name: Option<String>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub is_user_sys_admin: Option<bool>,
}

impl Instance {
    /// The organisation, from whichever of its two URLs parses.
    pub fn org(&self) -> Option<crate::domain::ids::OrgUrl> {
        let url = self.url.as_deref().and_then(|u| crate::domain::ids::OrgUrl::parse(u).ok());
        url.or_else(|| crate::domain::ids::OrgUrl::parse(&self.api_url).ok())
    }

    /// Whether this environment is `org`, by either of its URLs.
    pub fn is(&self, org: &crate::domain::ids::OrgUrl) -> bool {
        let by = |u: &str| crate::domain::ids::OrgUrl::parse(u).is_ok_and(|o| &o == org);
        self.url.as_deref().is_some_and(by) || by(&self.api_url)
    }
}

/// The administrator's delegated tokens, for this onboarding only.
pub struct Delegated {
    pub tenant: Tenant,
    discovery: SecretString,
    refresh: Option<SecretString>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    refresh_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

fn tag(tenant: &str) -> String {
    format!("onboard:{tenant}")
}

impl Tenants {
    /// The link that has the customer's administrator sign in to set their organisation
    /// up. Only once consent is confirmed.
    pub async fn onboarding_link(&self, id: &str) -> Result<Url, TenantError> {
        let mut issued = None;
        let t = self
            .modify(id, |t| {
                if !matches!(t.status, TenantStatus::Consented | TenantStatus::Onboarded) {
                    return Err(TenantError::Invalid(format!(
                        "tenant {} has not consented (status {}): send its administrator the consent link first",
                        t.id,
                        t.status.as_str()
                    )));
                }
                let expires_at = self.clock.now() + SIGN_IN_SECONDS;
                let state = self.keys.issue_state(&tag(&t.id), expires_at);
                let verifier = self
                    .keys
                    .derive_from_state(&state, PKCE_LABEL)
                    .ok_or_else(|| TenantError::Invalid("the state key is not available".into()))?;
                t.state_hash = Some(crate::support::crypto::sha256_hex(&state));
                t.state_expires_at = Some(expires_at);
                issued = Some((state, verifier));
                Ok(())
            })
            .await?;
        let (state, verifier) = issued.ok_or_else(|| TenantError::NotFound(id.to_string()))?;
        let mut url = self.cfg.authority.clone();
        url.set_path(&format!("/{}/oauth2/v2.0/authorize", t.id));
        url.query_pairs_mut()
            .append_pair("client_id", &self.cfg.app_id)
            .append_pair("response_type", "code")
            .append_pair("redirect_uri", self.cfg.onboard_redirect_uri.as_str())
            .append_pair("scope", &format!("{DISCOVERY_SCOPE} offline_access"))
            .append_pair("state", &state)
            .append_pair("code_challenge", &crate::support::crypto::pkce_challenge(&verifier))
            .append_pair("code_challenge_method", "S256")
            .append_pair("prompt", "select_account");
        Ok(url)
    }

    /// Checks the sign-in's answer, uses up its state and redeems the code.
    pub async fn signed_in(&self, a: SignInAnswer) -> Result<Delegated, SignInError> {
        let state = a.state.as_deref().filter(|s| !s.is_empty()).ok_or(SignInError::NoState)?;
        let verified = self.keys.verify_state(state, self.clock.now()).map_err(SignInError::State)?;
        let mut t = self
            .store
            .list_tenants()
            .await?
            .into_iter()
            .find(|t| t.state_hash.as_deref() == Some(verified.hash.as_str()))
            .filter(|t| verified.is_for(&tag(&t.id)))
            .ok_or(SignInError::Used)?;
        let expected = t.version.clone();
        t.state_hash = None;
        t.state_expires_at = None;
        t.updated_at = self.clock.now();
        t.version = match self.store.update_tenant(&t, &expected).await {
            Ok(v) => v,
            Err(StoreError::Conflict(_) | StoreError::NotFound(_)) => return Err(SignInError::Used),
            Err(e) => return Err(e.into()),
        };
        if let Some(error) = a.error.filter(|e| !e.is_empty()) {
            let description = a.error_description.unwrap_or_default().lines().next().unwrap_or_default().to_string();
            return Err(SignInError::Refused { error, description });
        }
        let code = a.code.filter(|c| !c.is_empty()).ok_or_else(|| SignInError::Refused {
            error: "no_code".into(),
            description: "the answer has neither a code nor an error".into(),
        })?;
        let verifier = self.keys.derive_from_state(state, PKCE_LABEL).ok_or(SignInError::Used)?;
        let answer = self
            .grant(
                &t.id,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", self.cfg.onboard_redirect_uri.as_str()),
                    ("code_verifier", &verifier),
                    ("scope", &format!("{DISCOVERY_SCOPE} offline_access")),
                ],
            )
            .await?;
        Ok(Delegated { tenant: t, discovery: answer.0, refresh: answer.1 })
    }

    /// The environments the signed-in administrator reaches in this tenant.
    pub async fn discover(&self, d: &Delegated) -> Result<Vec<Instance>, SignInError> {
        let mut url = self.cfg.discovery_url.clone();
        url.set_path("/api/discovery/v2.0/Instances");
        url.set_query(Some("$select=Url,ApiUrl,FriendlyName,TenantId,IsUserSysAdmin"));
        let resp = outbound::upstream(outbound::send(self.http.get(url).bearer_auth(d.discovery.expose_secret())))
            .await
            .map_err(|e| SignInError::Discovery(outbound::error_text(e)))?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            return Err(SignInError::Discovery(format!("HTTP {status}: {}", outbound::one_line(&body))));
        }
        #[derive(Deserialize)]
        struct List {
            value: Vec<Instance>,
        }
        let list: List = resp.json().await.map_err(|e| SignInError::Discovery(outbound::error_text(e)))?;
        // Only this tenant's environments, whatever else the account reaches.
        Ok(list
            .value
            .into_iter()
            .filter(|i| i.tenant_id.as_deref().is_none_or(|tid| tid.eq_ignore_ascii_case(&d.tenant.id)))
            .collect())
    }

    /// The administrator's token for one organisation, from the sign-in's refresh token.
    pub async fn org_token_for_admin(&self, d: &Delegated, org: &str) -> Result<SecretString, SignInError> {
        let refresh = d.refresh.as_ref().ok_or_else(|| SignInError::Token("no refresh token was issued".into()))?;
        let scope = format!("{}/user_impersonation", org.trim_end_matches('/'));
        let answer = self
            .grant(
                &d.tenant.id,
                &[("grant_type", "refresh_token"), ("refresh_token", refresh.expose_secret()), ("scope", &scope)],
            )
            .await?;
        Ok(answer.0)
    }

    async fn grant(
        &self,
        tenant: &str,
        fields: &[(&str, &str)],
    ) -> Result<(SecretString, Option<SecretString>), SignInError> {
        let mut url = self.cfg.authority.clone();
        url.set_path(&format!("/{tenant}/oauth2/v2.0/token"));
        let auth = self.credentials.client_auth(tenant).await.map_err(|e| SignInError::Token(e.message))?;
        let mut form: Vec<(&str, &str)> = vec![("client_id", self.cfg.app_id.as_str())];
        form.extend_from_slice(fields);
        form.extend(auth.iter().map(|(k, v)| (*k, v.as_str())));
        let resp = outbound::upstream(outbound::send(self.http.post(url).form(&form)))
            .await
            .map_err(|e| SignInError::Token(outbound::error_text(e)))?;
        let answer: TokenAnswer = resp.json().await.map_err(|e| SignInError::Token(outbound::error_text(e)))?;
        match (answer.access_token, answer.error) {
            (Some(at), None) => Ok((SecretString::from(at), answer.refresh_token.map(SecretString::from))),
            (_, error) => Err(SignInError::Token(format!(
                "{}: {}",
                error.unwrap_or_else(|| "no access token".into()),
                answer.error_description.unwrap_or_default().lines().next().unwrap_or_default()
            ))),
        }
    }

    /// Records the organisation the administrator set up.
    pub async fn set_org(&self, id: &str, org: &str) -> Result<Tenant, TenantError> {
        self.modify(id, |t| {
            t.org_url = Some(org.trim_end_matches('/').to_string());
            Ok(())
        })
        .await
    }
}
