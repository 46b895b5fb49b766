//! The OAuth 2.0 client side: authorization URLs (RFC 6749 §4.1.1 with RFC 7636 PKCE),
//! the code exchange (§4.1.3), refresh (§6) and revocation (RFC 7009).
//!
//! Written by hand on reqwest rather than with the `oauth2` crate, because the providers
//! Dynamics projects connect to do not all answer RFC 6749 §5.1 JSON: some send the
//! token response form-encoded or as `text/plain`, some nest it under an object
//! (`data.token`), some give `expires_in` as a string or in milliseconds or not at all,
//! and some join scopes with `,` instead of a space. A typed token-response client would
//! need each body rewritten in an adapter before it could parse it; here the catalog's
//! quirks drive one small parser. What we need of the RFCs is small and is tested
//! against a strict `oidc-provider`.
//!
//! The HTTP client never follows redirects: a token endpoint that redirects is
//! misconfigured, and following it would send the client secret somewhere unchecked.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use url::Url;

use crate::clients::auth::jwt::{Segment, unverified};
use crate::clients::secrets::SecretSource;
use crate::domain::oauth::catalog::{ClientAuth, ExpiresInUnit, Provider};
use crate::domain::oauth::{CodeGrant, ErrorCode, OAuthError, TokenEndpoint, TokenHint, TokenSet};
use crate::support::outbound::{self, Backoff};

/// The token endpoint over HTTPS, with the client secret from the secrets layer. `http`
/// should be [`outbound::unpooled_client`]: codes and rotating refresh tokens are single-use.
pub struct HttpTokenEndpoint {
    pub http: reqwest::Client,
    pub secrets: Arc<dyn SecretSource>,
}

/// The longest lifetime believed: a provider's `expires_in` of 10^16 would overflow the
/// arithmetic on expiry and make every call a refresh.
const MAX_EXPIRES_IN: i64 = 365 * 24 * 3600;

/// One retry, after 200 ms, of a request whose connection could not be made.
const CONNECT_RETRY: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_millis(200));

#[async_trait]
impl TokenEndpoint for HttpTokenEndpoint {
    async fn exchange_code(&self, provider: &Provider, grant: CodeGrant<'_>, now: i64) -> Result<TokenSet, OAuthError> {
        let mut form = vec![
            ("grant_type".to_string(), "authorization_code".to_string()),
            ("code".to_string(), grant.code.secret().to_string()),
            ("redirect_uri".to_string(), grant.redirect_uri.to_string()),
        ];
        if let Some(v) = grant.verifier {
            form.push(("code_verifier".into(), v.secret().into()));
        }
        let body = self.post_token(provider, form).await?;
        parse_token_response(provider, &body, None, now)
    }

    async fn refresh(
        &self,
        provider: &Provider,
        refresh_token: &SecretString,
        now: i64,
    ) -> Result<TokenSet, OAuthError> {
        let form = vec![
            ("grant_type".to_string(), "refresh_token".to_string()),
            ("refresh_token".to_string(), refresh_token.expose_secret().to_string()),
        ];
        let body = self.post_token(provider, form).await?;
        parse_token_response(provider, &body, Some(refresh_token), now)
    }

    /// The server answers 200 for unknown tokens too (RFC 7009 §2.2).
    async fn revoke(&self, provider: &Provider, token: &SecretString, hint: TokenHint) -> Result<(), OAuthError> {
        let Some(url) = &provider.revocation_url else {
            return Ok(());
        };
        let form = vec![
            ("token".to_string(), token.expose_secret().to_string()),
            ("token_type_hint".to_string(), hint.as_str().to_string()),
        ];
        let resp = outbound::upstream(self.send(provider, url, form)).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = outbound::upstream(resp.bytes()).await.unwrap_or_default();
        Err(classify_error(status, &body))
    }
}

impl HttpTokenEndpoint {
    async fn post_token(
        &self,
        provider: &Provider,
        mut form: Vec<(String, String)>,
    ) -> Result<RawResponse, OAuthError> {
        for (k, v) in &provider.token_params {
            form.push((k.clone(), v.clone()));
        }
        let refreshing = form.iter().any(|(k, v)| k == "grant_type" && v == "refresh_token");
        let url = match (&provider.refresh_url, refreshing) {
            (Some(refresh_url), true) => refresh_url,
            _ => &provider.token_url,
        };
        let resp = outbound::upstream(self.send(provider, url, form)).await?;
        let status = resp.status();
        let content_type =
            resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
        let body = outbound::upstream(resp.bytes()).await.map_err(|e| {
            OAuthError::Transient(format!("the token response could not be read: {}", outbound::error_text(e)))
        })?;
        if !status.is_success() {
            return Err(classify_error(status, &body));
        }
        Ok(RawResponse { content_type, body: body.to_vec() })
    }

    /// Sends a form with client authentication, retrying once when the connection
    /// could not be made (the request never reached the provider, so a single-use code
    /// is not spent).
    async fn send(
        &self,
        provider: &Provider,
        url: &Url,
        mut form: Vec<(String, String)>,
    ) -> Result<reqwest::Response, OAuthError> {
        let secret = match &provider.client_secret {
            Some(name) => Some(self.secrets.get(name).await.map_err(|e| OAuthError::Config(e.to_string()))?),
            None => None,
        };
        let mut basic = None;
        match (provider.client_auth, &secret) {
            (ClientAuth::ClientSecretBasic, Some(secret)) => {
                // RFC 6749 §2.3.1: form-encode both parts before base64.
                let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                let pair = format!("{}:{}", enc(&provider.client_id), enc(secret.expose_secret()));
                basic = Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)));
            }
            (ClientAuth::ClientSecretPost, Some(secret)) => {
                form.push(("client_id".into(), provider.client_id.clone()));
                form.push(("client_secret".into(), secret.expose_secret().to_string()));
            }
            _ => form.push(("client_id".into(), provider.client_id.clone())),
        }
        let body = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(&form).finish();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self
                .http
                .post(url.clone())
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header(ACCEPT, "application/json")
                .body(body.clone());
            if let Some(b) = &basic {
                req = req.header(AUTHORIZATION, b);
            }
            match outbound::send(req).await {
                Ok(resp) => return Ok(resp),
                Err(e) if e.is_connect() && attempt < 2 => CONNECT_RETRY.sleep(attempt, None).await,
                Err(e) => {
                    return Err(OAuthError::Transient(format!(
                        "{} at {} did not answer: {}",
                        provider.display_name,
                        url.host_str().unwrap_or("?"),
                        outbound::error_text(e)
                    )));
                }
            }
        }
    }
}

struct RawResponse {
    content_type: String,
    body: Vec<u8>,
}

/// Turns a non-2xx token/revocation response into an error (RFC 6749 §5.2).
fn classify_error(status: reqwest::StatusCode, body: &[u8]) -> OAuthError {
    let fields = decode_body("", body).unwrap_or_default();
    let error = fields.get("error").and_then(Value::as_str).map(str::to_string);
    let description =
        fields.get("error_description").and_then(Value::as_str).map(|s| s.chars().take(500).collect::<String>());
    if status.as_u16() == 429 || status.is_server_error() {
        let what = error.map(|e| format!(" ({e})")).unwrap_or_default();
        return OAuthError::Transient(format!("the provider answered {status}{what}"));
    }
    match error {
        Some(error) => OAuthError::Rejected { error: ErrorCode::parse(&error), description, status: status.as_u16() },
        None => OAuthError::Protocol(format!("the provider answered {status} without an OAuth error code")),
    }
}

/// Parses JSON, or form-encoded text, into a JSON object.
fn decode_body(content_type: &str, body: &[u8]) -> Option<Map<String, Value>> {
    let json_first = !content_type.contains("x-www-form-urlencoded") && !content_type.starts_with("text/plain");
    let as_json = || serde_json::from_slice::<Value>(body).ok().and_then(|v| v.as_object().cloned());
    let as_form = || {
        let text = std::str::from_utf8(body).ok()?;
        if !text.contains('=') {
            return None;
        }
        Some(
            url::form_urlencoded::parse(text.trim().as_bytes())
                .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
                .collect(),
        )
    };
    if json_first { as_json().or_else(as_form) } else { as_form().or_else(as_json) }
}

fn parse_token_response(
    provider: &Provider,
    raw: &RawResponse,
    previous_refresh: Option<&SecretString>,
    now: i64,
) -> Result<TokenSet, OAuthError> {
    let root = decode_body(&raw.content_type, &raw.body)
        .ok_or_else(|| OAuthError::Protocol("the token response is neither JSON nor form-encoded".into()))?;
    let quirks = &provider.token_response;
    let mut obj = &root;
    if let Some(path) = quirks.path.as_deref() {
        for part in path.split('.').filter(|p| !p.is_empty()) {
            obj = obj.get(part).and_then(Value::as_object).ok_or_else(|| {
                OAuthError::Protocol(format!("the token response has no object at {path:?} (token_response.path)"))
            })?;
        }
    }
    let text = |name: &str| obj.get(name).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
    let access_token =
        text("access_token").ok_or_else(|| OAuthError::Protocol("the token response has no access_token".into()))?;
    let token_type = text("token_type").unwrap_or_else(|| "Bearer".into());
    let number = |name: &str| match obj.get(name) {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    let expires_in = number("expires_in").map(|v| match quirks.expires_in_unit {
        ExpiresInUnit::Seconds => v,
        ExpiresInUnit::Milliseconds => v / 1000.0,
    });
    let expires_at = match expires_in {
        Some(secs) if secs.is_finite() && secs >= 0.0 => {
            if secs > MAX_EXPIRES_IN as f64 {
                tracing::warn!(
                    provider = %provider.name,
                    "the token response's expires_in ({secs} s) is beyond a year; using a year"
                );
            }
            now + secs.min(MAX_EXPIRES_IN as f64) as i64
        }
        // A JWT's own `exp`, within the same year's bound as `expires_in`.
        _ => match jwt_exp(&access_token) {
            Some(exp) => exp.min(now.saturating_add(MAX_EXPIRES_IN)),
            None => {
                let default = quirks.default_expires_in.unwrap_or(3600);
                if quirks.default_expires_in.is_none() {
                    tracing::warn!(
                        provider = %provider.name,
                        "the token response has no expires_in; assuming {default} s (set token_response.default_expires_in)"
                    );
                }
                now + default as i64
            }
        },
    };
    let refresh_token = text("refresh_token").map(SecretString::from).or_else(|| previous_refresh.cloned());
    Ok(TokenSet {
        access_token: SecretString::from(access_token),
        token_type,
        refresh_token,
        expires_at,
        scope: text("scope"),
    })
}

/// The `exp` of a JWT access token, read without verification: it only decides when
/// to refresh, never whom to trust.
fn jwt_exp(token: &str) -> Option<i64> {
    unverified(token, Segment::Payload)?.get("exp")?.as_i64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::oauth::catalog::Catalog;

    fn provider(extra: &str) -> Provider {
        let text = format!(
            "[providers.p]\nauthorization_url = \"https://a.example/auth\"\ntoken_url = \"https://a.example/token\"\nclient_id = \"c\"\n{extra}"
        );
        (*Catalog::parse(&text).unwrap().get("p").unwrap()).clone()
    }

    fn parse(p: &Provider, ct: &str, body: &str, prev: Option<&str>) -> Result<TokenSet, OAuthError> {
        let prev = prev.map(|s| SecretString::from(s.to_string()));
        parse_token_response(
            p,
            &RawResponse { content_type: ct.into(), body: body.as_bytes().to_vec() },
            prev.as_ref(),
            1000,
        )
    }

    #[test]
    fn standard_json_response() {
        let t = parse(
            &provider(""),
            "application/json",
            r#"{"access_token":"a","token_type":"bearer","expires_in":60,"refresh_token":"r","scope":"x y"}"#,
            None,
        )
        .unwrap();
        assert_eq!(t.access_token.expose_secret(), "a");
        assert_eq!(t.expires_at, 1060);
        assert_eq!(t.refresh_token.unwrap().expose_secret(), "r");
        assert_eq!(t.scope.as_deref(), Some("x y"));
    }

    #[test]
    fn quirks_string_expiry_missing_type_and_kept_refresh_token() {
        let t = parse(&provider(""), "application/json", r#"{"access_token":"a","expires_in":"120"}"#, Some("old"))
            .unwrap();
        assert_eq!(t.expires_at, 1120);
        assert_eq!(t.token_type, "Bearer");
        assert_eq!(t.refresh_token.unwrap().expose_secret(), "old");
    }

    #[test]
    fn quirks_form_encoded_and_nested_and_milliseconds() {
        let t = parse(&provider(""), "application/x-www-form-urlencoded", "access_token=a%2Bb&expires_in=30", None)
            .unwrap();
        assert_eq!(t.access_token.expose_secret(), "a+b");
        assert_eq!(t.expires_at, 1030);
        let nested =
            provider("[providers.p.token_response]\npath = \"data.token\"\nexpires_in_unit = \"milliseconds\"");
        let t =
            parse(&nested, "application/json", r#"{"data":{"token":{"access_token":"n","expires_in":5000}}}"#, None)
                .unwrap();
        assert_eq!(t.access_token.expose_secret(), "n");
        assert_eq!(t.expires_at, 1005);
    }

    #[test]
    fn missing_expiry_uses_jwt_exp_then_the_default() {
        let jwt_payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"exp":5000}"#);
        let body = format!(r#"{{"access_token":"eyJhbGciOiJub25lIn0.{jwt_payload}.x"}}"#);
        assert_eq!(parse(&provider(""), "application/json", &body, None).unwrap().expires_at, 5000);
        let p = provider("[providers.p.token_response]\ndefault_expires_in = 600");
        assert_eq!(parse(&p, "application/json", r#"{"access_token":"a"}"#, None).unwrap().expires_at, 1600);
    }

    #[test]
    fn an_absurd_lifetime_is_clamped_to_a_year() {
        let t = parse(&provider(""), "application/json", r#"{"access_token":"a","expires_in":1e16}"#, None).unwrap();
        assert_eq!(t.expires_at, 1000 + 365 * 24 * 3600);
    }

    #[test]
    fn errors_are_classified() {
        let e = classify_error(
            reqwest::StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_grant","error_description":"grant request is invalid"}"#,
        );
        assert!(e.is_invalid_grant(), "{e:?}");
        assert!(matches!(classify_error(reqwest::StatusCode::SERVICE_UNAVAILABLE, b""), OAuthError::Transient(_)));
        assert!(matches!(classify_error(reqwest::StatusCode::TOO_MANY_REQUESTS, b""), OAuthError::Transient(_)));
        assert!(matches!(classify_error(reqwest::StatusCode::FORBIDDEN, b"<html>"), OAuthError::Protocol(_)));
        assert!(parse(&provider(""), "application/json", r#"{"token_type":"bearer"}"#, None).is_err());
    }
}
