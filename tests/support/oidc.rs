//! The external OAuth system: a real `oidc-provider` server (tests/peers/oidc.mjs),
//! spawned per test and driven through its control API.

use serde_json::{Value, json};

use super::peer::NodePeer;

pub const CLIENT_ID: &str = "dynamics-companion";
pub const CLIENT_SECRET: &str = "client-secret-for-tests-only";

pub struct OidcPeer {
    peer: NodePeer,
    pub issuer: String,
}

impl OidcPeer {
    /// Starts the server with one confidential client whose redirect URI is `redirect_uri`.
    pub fn start(redirect_uri: &str, extra: Value) -> OidcPeer {
        let mut config = json!({
            "clients": [{
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "redirect_uris": [redirect_uri],
                "token_endpoint_auth_method": "client_secret_basic"
            }],
            "scopes": ["api.read", "api.write"]
        });
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        let peer = NodePeer::start("oidc.mjs", "OIDC_PEER_CONFIG", &config);
        let issuer = peer.field("issuer");
        OidcPeer { peer, issuer }
    }

    /// A catalog entry for this server, named `name`.
    pub fn catalog(&self, name: &str, extra: &str) -> String {
        format!(
            r#"
[providers.{name}]
display_name = "Test Provider"
authorization_url = "{iss}/auth"
token_url = "{iss}/token"
revocation_url = "{iss}/token/revocation"
issuer = "{iss}"
client_id = "{CLIENT_ID}"
client_secret = "test-provider-secret"
client_auth = "client_secret_basic"
scopes = ["offline_access", "api.read"]
authorization_params = {{ prompt = "consent" }}
api_base_url = "{iss}/__api/"
{extra}
"#,
            iss = self.issuer
        )
    }

    async fn control(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        self.peer.control(&self.issuer, method, path, body).await
    }

    /// Plays the person: logs in and consents (or denies), returns the redirect to us.
    pub async fn consent(&self, authorization_url: &str, deny: bool) -> String {
        let v = self
            .control(reqwest::Method::POST, "consent", Some(json!({ "url": authorization_url, "deny": deny })))
            .await;
        v["location"].as_str().unwrap_or_else(|| panic!("no redirect from the provider: {v}")).to_string()
    }

    pub async fn stats(&self) -> Value {
        self.control(reqwest::Method::GET, "stats", None).await
    }

    pub async fn refresh_grants(&self) -> u64 {
        self.stats().await["token_requests"]["refresh_token"].as_u64().unwrap_or(0)
    }

    pub async fn faults(&self, faults: Value) {
        self.control(reqwest::Method::POST, "faults", Some(faults)).await;
    }

    /// Every access and refresh token the provider issued so far.
    pub async fn issued_tokens(&self) -> Vec<String> {
        let v = self.control(reqwest::Method::GET, "issued", None).await;
        let mut out = Vec::new();
        for t in v["tokens"].as_array().cloned().unwrap_or_default() {
            for k in ["access_token", "refresh_token"] {
                if let Some(s) = t[k].as_str() {
                    out.push(s.to_string());
                }
            }
        }
        out
    }

    /// The refresh tokens issued so far, oldest first.
    pub async fn issued_refresh_tokens(&self) -> Vec<String> {
        let v = self.control(reqwest::Method::GET, "issued", None).await;
        v["tokens"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|t| t["refresh_token"].as_str().map(str::to_string))
            .collect()
    }

    /// The protected resource (`/__api/`) answers 401 to its next `n` calls.
    pub async fn reject_api_calls(&self, n: u64) {
        self.control(reqwest::Method::POST, "api-faults", Some(json!({ "unauthorized": n }))).await;
    }

    /// Lets every `/__api/...?stream=1` answer waiting on its second chunk finish; how many.
    pub async fn release_api_streams(&self) -> u64 {
        self.control(reqwest::Method::POST, "api-release", None).await["released"].as_u64().unwrap_or(0)
    }

    pub async fn is_active(&self, token: &str) -> bool {
        self.control(reqwest::Method::POST, "introspect", Some(json!({ "token": token }))).await["active"] == true
    }
}
