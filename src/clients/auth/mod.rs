//! Who may call the back-office API: bearer JWTs from one OIDC issuer (Entra ID in
//! production), typically client-credential tokens of Dynamics plug-ins, X++ or Power
//! Automate.
//!
//! The signature is checked against the issuer's JWKS, found through OpenID discovery
//! and cached ([`IssuerKeys`], also used for portal users of an OIDC issuer); a token
//! signed with a key id we have not seen triggers one re-fetch (at most every 30 s, so
//! garbage tokens cannot make us hammer the issuer). The algorithm is pinned to RS256,
//! and issuer, audience, expiry and not-before are checked. Finally the caller must be
//! on an allow-list of client ids (`azp`/`appid`) or hold an allowed app role (`roles`).

pub mod dev;
pub mod issuer_keys;
pub mod jwt;

use std::sync::Arc;

use jsonwebtoken::Validation;
use serde::Deserialize;

use crate::support::config::BackOfficeAuth;
pub use issuer_keys::{IssuerKeys, KeysError};
use jwt::{VerifiedTokens, rejection, rs256_header, rs256_validation};

const LEEWAY_SECS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    /// We cannot verify anything right now (the issuer's keys are unreachable).
    #[error("{0}")]
    Unavailable(String),
}

/// The verified caller. Its strings are shared: every request with a token already
/// verified gets a copy from the cache, and the audit record's [`Actor`] shares them too
/// (copied, they were five allocations on every proxied call).
///
/// [`Actor`]: crate::support::audit::Actor
#[derive(Debug, Clone)]
pub struct Caller {
    pub client_id: Option<Arc<str>>,
    pub subject: Option<Arc<str>>,
    pub roles: Arc<[String]>,
    /// The Entra tenant the token was issued in (`tid`); with several tenants accepted
    /// ([`BearerVerifier::accepting_other_tenants`]), the one whose issuer signed it.
    pub tenant: Option<Arc<str>>,
    /// Issued by `AUTH_ISSUER` itself: a caller of the deployment's own tenant.
    pub home: bool,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<i64>,
    /// Entra v2 tokens.
    azp: Option<String>,
    /// Entra v1 tokens.
    appid: Option<String>,
    /// Other issuers' client-credential tokens.
    client_id: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    iss: Option<String>,
    tid: Option<String>,
}

pub struct BearerVerifier {
    cfg: BackOfficeAuth,
    validation: Validation,
    keys: IssuerKeys,
    verified: VerifiedTokens<Caller>,
    /// `AUTH_ISSUER`'s tenant and the forms of its issuer around a tenant id (for Entra,
    /// v2.0 and v1.0: see [`issuer_forms`]).
    entra: Option<TenantIssuers>,
    /// Tokens of other Entra tenants are accepted too (a multi-tenant deployment).
    other_tenants: bool,
    /// `AUTH_ISSUER=dev`: the development issuer's key (or why it could not be read).
    dev: Option<Result<Vec<u8>, String>>,
}

/// An issuer split around its tenant segment: `https://sts.windows.net/` and `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IssuerForm {
    before: String,
    after: String,
}

impl IssuerForm {
    /// The tenant id `iss` names in this form, if it is this form.
    fn tenant_of<'a>(&self, iss: &'a str) -> Option<&'a str> {
        let tid = iss.strip_prefix(self.before.as_str())?.strip_suffix(self.after.as_str())?;
        crate::support::config::is_guid(tid).then_some(tid)
    }
}

#[derive(Debug, Clone)]
struct TenantIssuers {
    home_tenant: String,
    forms: Vec<IssuerForm>,
}

/// The forms of `AUTH_ISSUER` around its tenant segment (its first path segment), with
/// that tenant: the issuer as configured and, for an Entra v2.0 issuer
/// (`https://{login host}/{tenant}/v2.0`), the same tenant's v1.0 issuer. Entra issues
/// v1.0 access tokens to an API whose registration leaves `accessTokenAcceptedVersion`
/// unset (or 1), and v2.0 ones when it is 2; both are signed with the same keys. Their
/// `iss` per cloud (Entra's "Access token claims reference"; Microsoft Q&A 1190472, "What
/// are the token issuers for the sovereign cloud"): v2.0 `https://{login host}/{tid}/v2.0`;
/// v1.0 `https://sts.windows.net/{tid}/` in the global and US Government clouds and
/// `https://sts.chinacloudapi.cn/{tid}/` in the one operated by 21Vianet.
fn issuer_forms(issuer: &str) -> Option<TenantIssuers> {
    let url = url::Url::parse(issuer).ok()?;
    let tenant = url.path_segments()?.next().filter(|s| !s.is_empty())?.to_string();
    let at = issuer.find(&format!("/{tenant}"))?;
    let configured =
        IssuerForm { before: issuer[..=at].to_string(), after: issuer[at + 1 + tenant.len()..].to_string() };
    let v1 = match url.host_str().map(str::to_ascii_lowercase).as_deref() {
        _ if configured.after != "/v2.0" || !crate::support::config::is_guid(&tenant) => None,
        Some("login.microsoftonline.com" | "login.microsoftonline.us") => Some("https://sts.windows.net/"),
        Some("login.chinacloudapi.cn" | "login.partner.microsoftonline.cn") => Some("https://sts.chinacloudapi.cn/"),
        _ => None,
    };
    let mut forms = vec![configured];
    forms.extend(v1.map(|before| IssuerForm { before: before.into(), after: "/".into() }));
    Some(TenantIssuers { home_tenant: tenant, forms })
}

impl BearerVerifier {
    pub fn new(cfg: BackOfficeAuth, http: reqwest::Client) -> BearerVerifier {
        let entra = issuer_forms(&cfg.issuer.issuer);
        // `iss` is checked here against each form (jsonwebtoken takes one exact issuer);
        // with an issuer of no tenant segment, jsonwebtoken checks it.
        let issuer = if entra.is_some() { None } else { Some(cfg.issuer.issuer.as_str()) };
        let validation = rs256_validation(issuer, &cfg.issuer.audiences, LEEWAY_SECS);
        let keys = IssuerKeys::new(&cfg.issuer.issuer, cfg.issuer.jwks_url.clone(), http);
        let dev = cfg.dev_key.as_deref().map(|path| {
            dev::key(path).map_err(|e| format!("the development issuer's key {} cannot be read: {e}", path.display()))
        });
        BearerVerifier { cfg, validation, keys, verified: VerifiedTokens::new(), entra, other_tenants: false, dev }
    }

    /// Also accepts tokens issued in other Entra tenants, for a multi-tenant deployment
    /// whose customers call it: the issuer must be one of `AUTH_ISSUER`'s forms (v2.0 or
    /// v1.0) naming the token's own `tid` (Entra signs every tenant's tokens with the same
    /// keys, so `AUTH_ISSUER`'s key set serves). Which tenants may reach what is the
    /// caller's business, from [`Caller::tenant`].
    pub fn accepting_other_tenants(mut self) -> BearerVerifier {
        self.other_tenants = self.entra.is_some();
        self
    }

    /// Whether `iss` is one this verifier accepts for a token naming tenant `tid`, and
    /// whether it is the deployment's own tenant.
    fn issuer_accepted(&self, iss: Option<&str>, tid: Option<&str>) -> Option<bool> {
        let iss = iss?;
        if iss == self.cfg.issuer.issuer {
            return Some(true);
        }
        let entra = self.entra.as_ref()?;
        let named = entra.forms.iter().find_map(|f| f.tenant_of(iss))?;
        if named.eq_ignore_ascii_case(&entra.home_tenant) {
            return Some(true);
        }
        (self.other_tenants && tid.is_some_and(|t| t.eq_ignore_ascii_case(named))).then_some(false)
    }

    pub fn issuer(&self) -> &str {
        &self.cfg.issuer.issuer
    }

    /// Whether signing keys have been loaded (for health).
    pub fn keys_loaded(&self) -> bool {
        match &self.dev {
            Some(key) => key.is_ok(),
            None => self.keys.loaded(),
        }
    }

    /// Loads the signing keys now (for `handler check`); returns how many.
    pub async fn load_keys(&self) -> Result<usize, KeysError> {
        match &self.dev {
            Some(_) => Ok(1),
            None => self.keys.load().await,
        }
    }

    /// Verifies the `Authorization` header value.
    pub async fn verify(&self, authorization: Option<&str>) -> Result<Caller, AuthError> {
        let token = bearer(authorization)?;
        if let Some(key) = &self.dev {
            let key = key.as_ref().map_err(|e| AuthError::Unavailable(e.clone()))?;
            return dev::verify(key, token);
        }
        if let Some(caller) = self.verified.get(token) {
            return Ok(caller);
        }
        let kid = rs256_header(token)?
            .ok_or_else(|| AuthError::Unauthenticated("The bearer token has no key id (kid).".into()))?;
        // Boxed: fetching the issuer's keys is rare (a token not verified before) and its
        // future is large; inline it would make every caller's future as large.
        let key = Box::pin(self.keys.key(&kid)).await?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &self.validation)
            .map_err(|e| rejection(&e, &self.cfg.issuer.issuer))?
            .claims;
        let home = match self.issuer_accepted(claims.iss.as_deref(), claims.tid.as_deref()) {
            Some(home) => home,
            None => {
                let others = if self.other_tenants { " or an onboarded customer's" } else { "" };
                return Err(AuthError::Unauthenticated(format!(
                    "The bearer token was issued by {}, which is not {} (in its v2.0 or v1.0 form){others}.",
                    claims.iss.as_deref().unwrap_or("no issuer"),
                    self.cfg.issuer.issuer
                )));
            }
        };
        let client_id = claims.azp.or(claims.appid).or(claims.client_id);
        let by_client = client_id.as_ref().is_some_and(|c| self.cfg.allowed_client_ids.iter().any(|a| a == c));
        let by_role = claims.roles.iter().any(|r| self.cfg.allowed_roles.contains(r));
        if !by_client && !by_role {
            return Err(AuthError::Forbidden(format!(
                "The caller ({}) is not allowed: it is neither in AUTH_ALLOWED_CLIENT_IDS nor holds a role in AUTH_ALLOWED_ROLES.",
                client_id.as_deref().unwrap_or("no client id")
            )));
        }
        let caller = Caller {
            client_id: client_id.map(Arc::from),
            subject: claims.sub.map(Arc::from),
            roles: claims.roles.into(),
            tenant: claims.tid.map(Arc::from),
            home,
        };
        self.verified.put(token, caller.clone(), claims.exp);
        Ok(caller)
    }
}

/// Extracts the token from `Authorization: Bearer <token>`.
pub fn bearer(authorization: Option<&str>) -> Result<&str, AuthError> {
    let value = authorization.ok_or_else(|| {
        AuthError::Unauthenticated(
            "Send an access token in the Authorization header: `Authorization: Bearer <token>`.".into(),
        )
    })?;
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Unauthenticated("The Authorization header must use the Bearer scheme.".into()));
    }
    Ok(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::config::IssuerConfig;

    const HOME: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const CUSTOMER: &str = "0d9c1e4b-5a77-4b2f-9f0e-3c1d2e3f4a5b";

    fn verifier(issuer: &str) -> BearerVerifier {
        let cfg = BackOfficeAuth {
            issuer: IssuerConfig { issuer: issuer.into(), audiences: vec!["api://dc".into()], jwks_url: None },
            allowed_client_ids: vec![],
            allowed_roles: vec![],
            dev_key: None,
        };
        BearerVerifier::new(cfg, reqwest::Client::new())
    }

    /// A multi-tenant deployment accepts a customer's v1.0 and v2.0 tokens whose issuer
    /// names the token's own `tid`; home is only the configured tenant's.
    #[test]
    fn customers_tokens_in_either_version_name_their_own_tenant() {
        let v = verifier(&format!("https://login.microsoftonline.com/{HOME}/v2.0")).accepting_other_tenants();
        let v1 = format!("https://sts.windows.net/{CUSTOMER}/");
        let v2 = format!("https://login.microsoftonline.com/{CUSTOMER}/v2.0");
        assert_eq!(v.issuer_accepted(Some(&v1), Some(CUSTOMER)), Some(false));
        assert_eq!(v.issuer_accepted(Some(&v2), Some(CUSTOMER)), Some(false));
        assert_eq!(v.issuer_accepted(Some(&v1), Some(HOME)), None, "the issuer and tid disagree");
        assert_eq!(v.issuer_accepted(Some(&format!("https://sts.windows.net/{HOME}/")), Some(HOME)), Some(true));
        assert_eq!(v.issuer_accepted(Some("https://sts.windows.net/not-a-guid/"), Some("not-a-guid")), None);
        assert_eq!(v.issuer_accepted(None, Some(CUSTOMER)), None);
        // Single-tenant: the customer's tokens are not accepted in either version.
        let single = verifier(&format!("https://login.microsoftonline.com/{HOME}/v2.0"));
        assert_eq!(single.issuer_accepted(Some(&v1), Some(CUSTOMER)), None);
        // Another cloud's v1.0 issuer follows its v2.0 host.
        let china = verifier(&format!("https://login.chinacloudapi.cn/{HOME}/v2.0"));
        assert_eq!(china.issuer_accepted(Some(&format!("https://sts.chinacloudapi.cn/{HOME}/")), None), Some(true));
        assert_eq!(china.issuer_accepted(Some(&format!("https://sts.windows.net/{HOME}/")), None), None);
        // An issuer that is not Entra's v2.0 gets no v1.0 form.
        let other = verifier(&format!("https://issuer.example/{HOME}/"));
        assert_eq!(other.issuer_accepted(Some(&format!("https://sts.windows.net/{HOME}/")), None), None);
    }
}
