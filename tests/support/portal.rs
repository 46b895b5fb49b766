//! A Power Pages site double: `/_services/auth/publickey` (the site's RSA key as PEM),
//! `/_services/auth/token` (the implicit-grant endpoint: the JWT as the body for a
//! signed-in user, `X-Responded-JSON` 401 for anyone else, `PortalSTS0001` for an
//! unregistered client id), and the example page with the client script, as a site would
//! serve its web files.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use warp::Filter;
use warp::http::{Response, StatusCode};

pub const CLIENT_ID: &str = "companion-portal-app";
pub const CONTACT_A: &str = "6e2f0d4a-1b2c-4d5e-8f90-0a1b2c3d4e5f";
pub const CONTACT_B: &str = "0b9a8c7d-6e5f-4a3b-9c2d-1e0f9a8b7c6d";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

pub struct PortalDouble {
    /// `http://127.0.0.1:PORT`, the site's URL (its origin) and `PORTAL_URL`.
    pub url: String,
    key: EncodingKey,
    /// Who is signed in to the site (`None`: anonymous).
    pub signed_in: Arc<Mutex<Option<String>>>,
    pub publickey_requests: Arc<AtomicUsize>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl PortalDouble {
    pub async fn start() -> PortalDouble {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let key = EncodingKey::from_rsa_pem(&fixture("issuer-key.pem")).unwrap();
        let signed_in = Arc::new(Mutex::new(Some(CONTACT_A.to_string())));
        let publickey_requests = Arc::new(AtomicUsize::new(0));

        let pem = String::from_utf8(fixture("issuer-pub.pem")).unwrap();
        let counter = publickey_requests.clone();
        let publickey = warp::path!("_services" / "auth" / "publickey").and(warp::get()).map(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            Response::builder().header("content-type", "text/plain").body(pem.clone()).unwrap()
        });
        let (who, mint_key) = (signed_in.clone(), key.clone());
        let token = warp::path!("_services" / "auth" / "token")
            .and(warp::post())
            .and(warp::query::<std::collections::HashMap<String, String>>())
            .map(move |q: std::collections::HashMap<String, String>| {
                if q.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
                    let body = json!({"ErrorId": "PortalSTS0001", "ErrorMessage": "Client Id provided in the request is not a valid client Id registered for this portal. Please check the parameter and try again.", "Timestamp": "4/5/2019 10:02:11 AM", "CorrelationId": "00000000-0000-0000-0000-000000000000"});
                    return Response::builder().status(StatusCode::BAD_REQUEST).header("content-type", "application/json").body(body.to_string()).unwrap();
                }
                match who.lock().unwrap().clone() {
                    None => Response::builder()
                        .header("X-Responded-JSON", r#"{"status":401,"headers":{"location":"/SignIn"}}"#)
                        .body(String::new())
                        .unwrap(),
                    Some(contact) => {
                        let jwt = mint(&mint_key, &claims_for("127.0.0.1", &contact));
                        Response::builder().header("content-type", "text/html").header("expires_in", "900").body(jwt).unwrap()
                    }
                }
            });
        // The page: client/companion.liquid rendered as Power Pages renders a web template,
        // `user` the signed-in contact, `settings` the site settings (from the query here).
        let page_who = signed_in.clone();
        let page = warp::path("companion")
            .and(warp::path::end())
            .and(warp::get())
            .and(warp::query::<std::collections::HashMap<String, String>>())
            .map(move |q: std::collections::HashMap<String, String>| {
                let text =
                    std::fs::read_to_string(format!("{}/client/companion.liquid", env!("CARGO_MANIFEST_DIR"))).unwrap();
                let template = liquid::ParserBuilder::with_stdlib().build().unwrap().parse(&text).unwrap();
                let setting = |k: &str| q.get(k).cloned().unwrap_or_default();
                let mut globals = liquid::object!({
                    "settings": {
                        "DynamicsCompanion/ApiUrl": setting("api"),
                        "ImplicitGrantFlow/RegisteredClientId": setting("client_id"),
                        "DynamicsCompanion/Provider": setting("provider"),
                    },
                    "request": { "path": "/companion" },
                });
                if let Some(contact) = page_who.lock().unwrap().clone() {
                    globals.insert(
                        "user".into(),
                        liquid::model::Value::Object(liquid::object!({ "id": contact, "fullname": "Ada Lovelace" })),
                    );
                }
                let html = template.render(&globals).unwrap();
                Response::builder().header("content-type", "text/html; charset=utf-8").body(html).unwrap()
            });
        let files = warp::path::param().and(warp::get()).and_then(|name: String| async move {
            let path = format!("{}/client/{name}", env!("CARGO_MANIFEST_DIR"));
            match (name.as_str(), std::fs::read_to_string(&path)) {
                ("dynamics-companion.js", Ok(text)) => {
                    Ok(Response::builder().header("content-type", "text/javascript").body(text).unwrap())
                }
                _ => Err(warp::reject::not_found()),
            }
        });
        let tx = super::serve_on(listener, publickey.or(token).or(page).or(files));
        PortalDouble { url, key, signed_in, publickey_requests, _shutdown: tx }
    }

    /// A token as the site issues it for `contact`.
    pub fn token(&self, contact: &str) -> String {
        mint(&self.key, &claims_for("127.0.0.1", contact))
    }

    pub fn sign(&self, claims: &Value) -> String {
        mint(&self.key, claims)
    }

    pub fn claims(&self, contact: &str) -> Value {
        claims_for("127.0.0.1", contact)
    }
}

/// Claims shaped like a real Power Pages token (see shared/reference/dataverse.md §8).
fn claims_for(host: &str, contact: &str) -> Value {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    json!({
        "sub": contact, "preferred_username": contact, "given_name": "Ada", "family_name": "Lovelace",
        "email": "ada@example.com", "aud": CLIENT_ID, "appid": CLIENT_ID, "scp": "00000000-0000-0000-0000-000000000000",
        "iat": now, "nbf": now, "exp": now + 900, "iss": host, "nonce": ""
    })
}

fn mint(key: &EncodingKey, claims: &Value) -> String {
    let header = Header::new(Algorithm::RS256);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// A portal page's binding: a random secret and the SHA-256 (hex) it registers.
pub fn binding() -> (String, String) {
    use base64::Engine;
    use sha2::Digest;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).unwrap();
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hash = sha2::Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    (secret, hash)
}

/// The popup's bind step, as the bind page does it: the page is loaded first (it sets
/// its one-time value as a cookie and carries it in its form), then posts the form from
/// the handler's own origin. Returns the cookie (`name=value`) the browser then holds,
/// and checks that the popup is sent on to the provider. `bind_url` is the page the
/// start answer named; `origin` is the portal page's, as the bind page reads it from the
/// message.
pub async fn bind(h: &super::Handler, bind_url: &str, secret: &str, authorization_url: &str, origin: &str) -> String {
    let page = bind_page(h, bind_url).await;
    let form = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("secret", secret)
        .append_pair("authorization_url", authorization_url)
        .append_pair("origin", origin)
        .append_pair("page", &page.value)
        .finish();
    let r = h
        .forward(
            reqwest::Method::POST,
            "/api/oauth/bind",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Origin", &page.origin),
                ("Sec-Fetch-Site", "same-origin"),
                ("Cookie", &page.cookie),
            ],
            Some(form.into_bytes()),
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.header("location"), authorization_url);
    let set: Vec<&str> = r.headers.get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).collect();
    let binding = set.iter().find(|c| c.contains("dcb-")).expect("the binding cookie is set");
    assert!(binding.contains("HttpOnly") && binding.contains("SameSite=Lax"), "{binding}");
    binding.split(';').next().unwrap().to_string()
}

/// What loading the bind page gives a browser: the page's origin, its one-time value (in
/// its form) and the cookie holding it.
pub struct BindPage {
    pub origin: String,
    pub value: String,
    pub cookie: String,
}

pub async fn bind_page(h: &super::Handler, bind_url: &str) -> BindPage {
    let url = url::Url::parse(bind_url).unwrap();
    let r = h.get(url.path(), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("referrer-policy"), "same-origin", "the page's own post must carry its Origin");
    let set = r.header("set-cookie").to_string();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
    let cookie = set.split(';').next().unwrap().to_string();
    let value = r.body.split("['page',\"").nth(1).and_then(|rest| rest.split('"').next()).unwrap().to_string();
    assert!(cookie.ends_with(&format!("={value}")), "{cookie} holds {value}");
    BindPage { origin: url.origin().ascii_serialization(), value, cookie }
}
