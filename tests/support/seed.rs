//! Connections written straight into a store, as another instance (or an import) would
//! write them, and a minimal token endpoint for them: for tests and benchmarks that need
//! many connections without as many OAuth consents.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dynamics_companion::domain::oauth::TokenSet;
use dynamics_companion::domain::{Connection, Status};
use dynamics_companion::support::crypto::Keyring;
use secrecy::SecretString;

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// An active connection of `provider` whose sealed tokens (`at-{id}`, `rt-{id}`) expire
/// at `expires_at`.
pub fn connection(keys: &Keyring, provider: &str, id: &str, expires_at: i64) -> Connection {
    let tokens = TokenSet {
        access_token: SecretString::from(format!("at-{id}")),
        token_type: "Bearer".into(),
        refresh_token: Some(SecretString::from(format!("rt-{id}"))),
        expires_at,
        scope: None,
    };
    let t = now();
    let mut c = Connection::new(id, provider, None, vec![], Status::Active, t - 86_400);
    c.tokens = Some(tokens.seal(keys, id));
    c.access_expires_at = Some(expires_at);
    c.has_refresh_token = true;
    c.updated_at = t;
    c.refreshed_at = Some(t - 3600);
    c
}

/// A token endpoint that grants every refresh: `{"access_token": "fresh-N", ...}` for an
/// hour, counting the grants.
pub struct GrantingEndpoint {
    pub url: String,
    pub grants: Arc<AtomicU64>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl GrantingEndpoint {
    pub async fn start() -> GrantingEndpoint {
        use warp::Filter;
        let grants = Arc::new(AtomicU64::new(0));
        let counter = grants.clone();
        let token = warp::post().and(warp::path("token")).and(warp::body::form()).map(
            move |form: std::collections::HashMap<String, String>| {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let ok = form.get("grant_type").is_some_and(|g| g == "refresh_token");
                let body = if ok {
                    serde_json::json!({ "access_token": format!("fresh-{n}"), "token_type": "Bearer", "expires_in": 3600 })
                } else {
                    serde_json::json!({ "error": "unsupported_grant_type" })
                };
                let status = if ok { warp::http::StatusCode::OK } else { warp::http::StatusCode::BAD_REQUEST };
                warp::reply::with_status(warp::reply::json(&body), status)
            },
        );
        let (url, tx) = super::serve(token).await;
        GrantingEndpoint { url, grants, _shutdown: tx }
    }

    /// A catalog entry for a provider whose token endpoint this is.
    pub fn catalog(&self, name: &str) -> String {
        format!(
            "[providers.{name}]\nauthorization_url = \"{u}/auth\"\ntoken_url = \"{u}/token\"\nclient_id = \"c\"\nclient_secret = \"granting-secret\"\nscopes = [\"api\"]\napi_base_url = \"{u}/\"\n",
            u = self.url
        )
    }

    pub fn grants(&self) -> u64 {
        self.grants.load(Ordering::SeqCst)
    }
}
