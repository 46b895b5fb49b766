//! An Entra ID-like token issuer for the back-office API: OpenID discovery and a JWKS
//! over HTTP, and RS256 client-credential tokens signed with a committed test key.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use warp::Filter;

pub const KID: &str = "test-signing-key-1";
pub const AUDIENCE: &str = "api://dynamics-companion";
pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";

pub struct Issuer {
    pub url: String,
    key: EncodingKey,
    pub jwks_requests: Arc<AtomicUsize>,
    /// While set, the JWKS endpoint answers 500 (an issuer outage).
    jwks_failing: Arc<std::sync::atomic::AtomicBool>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

impl Issuer {
    pub async fn start() -> Issuer {
        let key = EncodingKey::from_rsa_pem(&fixture("issuer-key.pem")).unwrap();
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
        jwk.common.key_id = Some(KID.into());
        let jwks = serde_json::to_value(JwkSet { keys: vec![jwk] }).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://127.0.0.1:{}/tenant-1/v2.0", listener.local_addr().unwrap().port());
        let jwks_requests = Arc::new(AtomicUsize::new(0));
        let counter = jwks_requests.clone();
        let jwks_failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let failing = jwks_failing.clone();
        let issuer = url.clone();
        let discovery = warp::path!("tenant-1" / "v2.0" / ".well-known" / "openid-configuration").map(move || {
            warp::reply::json(&json!({ "issuer": issuer, "jwks_uri": format!("{issuer}/discovery/v2.0/keys") }))
        });
        let keys = warp::path!("tenant-1" / "v2.0" / "discovery" / "v2.0" / "keys").map(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let status = if failing.load(Ordering::SeqCst) {
                warp::http::StatusCode::INTERNAL_SERVER_ERROR
            } else {
                warp::http::StatusCode::OK
            };
            warp::reply::with_status(warp::reply::json(&jwks), status)
        });
        let tx = super::serve_on(listener, discovery.or(keys));
        Issuer { url, key, jwks_requests, jwks_failing, _shutdown: tx }
    }

    /// Makes the JWKS endpoint fail (500) or answer again.
    pub fn fail_jwks(&self, failing: bool) {
        self.jwks_failing.store(failing, Ordering::SeqCst);
        if failing {
            self.jwks_requests.store(0, Ordering::SeqCst);
        }
    }

    /// Claims of a valid app-only token for the allowed client.
    pub fn claims(&self) -> Value {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        json!({ "iss": self.url, "aud": AUDIENCE, "azp": CLIENT_ID, "sub": CLIENT_ID, "iat": now, "nbf": now - 5, "exp": now + 3600, "roles": [] })
    }

    /// A token of the same client issued in another Entra tenant (a multi-tenant
    /// deployment's customer): the issuer names that tenant, and `tid` says it.
    pub fn token_in_tenant(&self, tenant: &str) -> String {
        let mut claims = self.claims();
        claims["iss"] = json!(self.url.replace("/tenant-1/", &format!("/{tenant}/")));
        claims["tid"] = json!(tenant);
        self.sign(&claims)
    }

    pub fn token(&self) -> String {
        self.sign(&self.claims())
    }

    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_kid(claims, KID)
    }

    /// Signed with the issuer's key but naming another key id.
    pub fn sign_with_kid(&self, claims: &Value, kid: &str) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }

    /// A token with the right kid and claims, signed by a key the issuer never published.
    pub fn forged(&self) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(KID.into());
        jsonwebtoken::encode(&header, &self.claims(), &EncodingKey::from_rsa_pem(&fixture("attacker-key.pem")).unwrap())
            .unwrap()
    }

    /// The settings that point the handler's back-office API at this issuer.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AUTH_ISSUER", self.url.clone()),
            ("AUTH_AUDIENCE", AUDIENCE.into()),
            ("AUTH_ALLOWED_CLIENT_IDS", CLIENT_ID.into()),
        ]
    }
}
