//! One OAuth world for the flow tests: a strict `oidc-provider`, a back-office issuer, and
//! a handler between them, with a person's consent scripted and every secret seen kept
//! to look for in the logs.

use reqwest::Method;
use serde_json::{Value, json};

use super::issuer::Issuer;
use super::oidc::{CLIENT_SECRET, OidcPeer};
use super::{Handler, HandlerBuilder, Reply};

pub const PUBLIC: &str = "http://localhost:7071";
pub const CALLBACK: &str = "http://localhost:7071/api/oauth/callback";

pub struct World {
    pub peer: OidcPeer,
    pub issuer: Issuer,
    pub h: Handler,
    pub bearer: String,
    /// Codes and states seen in this test, to look for in the logs.
    pub seen: std::sync::Mutex<Vec<String>>,
}

pub struct Setup {
    pub peer: Value,
    pub env: Vec<(&'static str, String)>,
    pub catalog_extra: &'static str,
}

impl Setup {
    /// Access tokens that live `ttl` seconds, refreshed `margin` seconds before expiry.
    pub fn short_lived(ttl: u64, margin: u64) -> Setup {
        Setup {
            peer: json!({ "access_token_ttl": ttl }),
            env: vec![("REFRESH_MARGIN_SECONDS", margin.to_string())],
            ..Default::default()
        }
    }
}

impl Default for Setup {
    fn default() -> Self {
        Setup { peer: json!({}), env: Vec::new(), catalog_extra: "" }
    }
}

pub async fn world(setup: Setup) -> World {
    let peer = OidcPeer::start(CALLBACK, setup.peer);
    let issuer = Issuer::start().await;
    let mut b = HandlerBuilder::new()
        .file("providers.toml", &peer.catalog("test", setup.catalog_extra))
        .env("PUBLIC_BASE_URL", PUBLIC)
        .env("TEST_PROVIDER_SECRET", CLIENT_SECRET)
        .env("RETURN_URL_ALLOWLIST", "https://portal.example.com")
        .env("LOG_LEVEL", "debug");
    for (k, v) in issuer.settings() {
        b = b.env(k, v);
    }
    for (k, v) in setup.env {
        b = b.env(k, v);
    }
    let h = b.start().await;
    let bearer = issuer.token();
    World { peer, issuer, h, bearer, seen: Default::default() }
}

impl World {
    pub async fn api(&self, method: Method, path: &str, body: Value) -> Reply {
        self.h.json(method, path, Some(&self.bearer), &body).await
    }

    pub async fn start(&self, body: Value) -> Value {
        let r = self.api(Method::POST, "/api/connections", body).await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()
    }

    /// The person consents; returns the callback's path and query as the provider sent it.
    pub async fn consent(&self, authorization_url: &str) -> String {
        let location = self.peer.consent(authorization_url, false).await;
        self.remember(&location);
        location
            .strip_prefix(PUBLIC)
            .unwrap_or_else(|| panic!("redirect to an unexpected place: {location}"))
            .to_string()
    }

    pub fn remember(&self, location: &str) {
        let url = url::Url::parse(location).unwrap();
        for (k, v) in url.query_pairs() {
            if k == "code" || k == "state" {
                self.seen.lock().unwrap().push(v.into_owned());
            }
        }
    }

    pub async fn callback(&self, path_and_query: &str) -> Reply {
        self.h.get(path_and_query, &[("Accept", "text/html")]).await
    }

    /// Creates and authorizes a connection.
    pub async fn connect(&self, id: &str) -> Value {
        let started = self.start(json!({ "provider": "test", "connection_id": id, "owner": "account:42" })).await;
        let cb = self.consent(started["authorization_url"].as_str().unwrap()).await;
        let page = self.callback(&cb).await;
        page.assert_html(200);
        started
    }

    pub async fn status(&self, id: &str) -> Value {
        let r = self.api(Method::GET, &format!("/api/connections/{id}"), Value::Null).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }

    pub async fn token(&self, id: &str, force: bool) -> Reply {
        self.api(Method::POST, &format!("/api/connections/{id}/token"), json!({ "force_refresh": force })).await
    }

    pub async fn access_token(&self, id: &str) -> String {
        let r = self.token(id, false).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["access_token"].as_str().unwrap().to_string()
    }

    /// No code, state, token or secret of this test in the handler's logs.
    pub async fn assert_logs_clean(&self) {
        // The last request's line proves the reader thread has caught up.
        assert!(self.h.logs.wait_for_line(|l| l.contains("route=\"/api/oauth/callback\"")).is_some());
        let logs = self.h.logs.all();
        assert!(!logs.is_empty());
        let mut secrets = self.peer.issued_tokens().await;
        secrets.extend(self.seen.lock().unwrap().iter().cloned());
        secrets.push(CLIENT_SECRET.to_string());
        secrets.push(self.bearer.clone());
        for s in secrets {
            assert!(!logs.contains(&s), "a secret reached the logs: {s}\n{logs}");
        }
        // The logs are useful, not empty: the flow is visible without its secrets.
        assert!(logs.contains("route=\"/api/oauth/callback\""), "{logs}");
    }
}

pub fn query_param(url: &str, name: &str) -> Option<String> {
    url::Url::parse(url).ok()?.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

impl World {
    pub async fn assert_logs_clean_without_callback(&self) {
        let logs = self.h.logs.all();
        for s in [CLIENT_SECRET.to_string(), self.bearer.clone(), self.issuer.forged()] {
            assert!(!logs.contains(&s), "a secret reached the logs");
        }
    }
}
