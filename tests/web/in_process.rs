//! The in-process tier (zero-to-production's `spawn_app`, mini-redis's `tests/server.rs`):
//! the app is built from a test's own settings and `web::serve`d on `127.0.0.1:0` inside
//! this test process, so the web layer's behaviour is tested in milliseconds, without a
//! process to start: routing from the table (404, 405 with `Allow`), body limits,
//! liveness, CORS, the anonymous cap, the bind step's refusals.

use std::collections::HashMap;
use std::sync::Arc;

use dynamics_companion::app::App;
use dynamics_companion::support::config::{Config, Settings};
use reqwest::Method;
use serde_json::Value;

use crate::support::issuer::Issuer;

/// An app served in this process; it stops when dropped.
pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

/// Builds the app from `settings` (over safe defaults: a temporary SQLite file and key)
/// and serves it on a free port of 127.0.0.1.
pub async fn spawn_app(settings: &[(&str, String)]) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut values: HashMap<String, String> = HashMap::from([
        ("FUNCTIONS_APP_ROOT_PATH".into(), dir.path().to_string_lossy().into_owned()),
        ("TOKEN_ENCRYPTION_KEYS".into(), crate::support::test_keys()),
        ("PUBLIC_BASE_URL".into(), "http://localhost:7071".into()),
    ]);
    for (k, v) in settings {
        values.insert(k.to_string(), v.clone());
    }
    let settings = Settings::from_map(values);
    let config = Config::from_settings(&settings).expect("the test's settings are valid");
    let app = App::build(settings, config).await.expect("the app builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let services = app.services().clone();
    tokio::spawn(async move {
        let _app = Arc::new(app);
        dynamics_companion::web::serve(services, listener, async {
            let _ = stopped.await;
        })
        .await;
    });
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    TestApp { base, http, _stop: stop, _dir: dir }
}

impl TestApp {
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.unwrap();
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        (status, headers, resp.text().await.unwrap_or_default())
    }
}

fn problem(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn routes_come_from_the_table_and_unknown_or_wrong_methods_are_said_so() {
    let issuer = Issuer::start().await;
    let app = spawn_app(&issuer.settings()).await;
    let bearer = format!("Bearer {}", issuer.token());
    // Unknown path: 404 problem naming the route.
    let (status, _, body) = app.send(Method::GET, "/api/nothing-here", &[], None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(problem(&body)["type"], "urn:dynamics-companion:problem:not-found");
    // Known path, wrong method: 405 with Allow.
    let (status, headers, body) = app.send(Method::DELETE, "/api/health", &[], None).await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(headers["allow"], "GET");
    let (status, headers, _) =
        app.send(Method::PUT, "/api/connections/import", &[("Authorization", &bearer)], None).await;
    assert_eq!(status, 405);
    assert_eq!(headers["allow"], "POST", "the first route with this path names its methods");
    // The first route that takes the method wins: GET on /import reads a connection of that name.
    let (status, _, body) = app.send(Method::GET, "/api/connections/import", &[("Authorization", &bearer)], None).await;
    assert_eq!(status, 404, "{body}");
    assert!(problem(&body)["detail"].as_str().unwrap().contains("\"import\""), "{body}");
    // An id is decoded once; a percent-encoded id is the same connection.
    let (status, _, body) = app.send(Method::GET, "/api/connections/a%2Db", &[("Authorization", &bearer)], None).await;
    assert_eq!(status, 404);
    assert!(problem(&body)["detail"].as_str().unwrap().contains("\"a-b\""), "{body}");
    // The host's readiness probe and liveness.
    assert_eq!(app.send(Method::GET, "/", &[], None).await.0, 200);
    let (status, _, body) = app.send(Method::GET, "/api/health", &[], None).await;
    assert_eq!(status, 200);
    assert!(problem(&body).get("dependencies").is_none(), "liveness only: {body}");
    // The browser audience gets pages, not problems.
    let (status, headers, _) = app.send(Method::GET, "/api/oauth/nowhere", &[], None).await;
    assert_eq!(status, 404);
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/html"));
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_chunked_or_not() {
    let issuer = Issuer::start().await;
    let mut settings = issuer.settings();
    settings.push(("MAX_BODY_BYTES", "1024".into()));
    let app = spawn_app(&settings).await;
    let bearer = format!("Bearer {}", issuer.token());
    let big = vec![b'a'; 64 * 1024];
    let (status, _, body) = app
        .send(
            Method::POST,
            "/api/connections",
            &[("Authorization", &bearer), ("Content-Type", "application/json")],
            Some(big.clone()),
        )
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(problem(&body)["type"], "urn:dynamics-companion:problem:body-too-large");
    // Chunked, with no Content-Length (as the host sends invocations).
    let chunks =
        futures_util::stream::iter(big.chunks(4096).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>());
    let resp = app
        .http
        .post(format!("{}/api/connections", app.base))
        .header("Authorization", &bearer)
        .header("Content-Type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
}

#[tokio::test]
async fn cors_is_answered_for_portal_origins_only() {
    let app = spawn_app(&[
        ("PORTAL_OIDC_ISSUER", "https://login.example/tenant/v2.0".into()),
        ("PORTAL_OIDC_AUDIENCE", "portal-app".into()),
        ("PORTAL_ORIGINS", "https://portal.example".into()),
    ])
    .await;
    let preflight = [
        ("Origin", "https://portal.example"),
        ("Access-Control-Request-Method", "GET"),
        ("Access-Control-Request-Headers", "authorization"),
    ];
    let (status, headers, _) = app.send(Method::OPTIONS, "/api/portal/me", &preflight, None).await;
    assert_eq!(status, 204);
    assert_eq!(headers["access-control-allow-origin"], "https://portal.example");
    let foreign = [("Origin", "https://evil.example"), ("Access-Control-Request-Method", "GET")];
    let (status, headers, _) = app.send(Method::OPTIONS, "/api/portal/me", &foreign, None).await;
    assert_eq!(status, 403);
    assert!(headers.get("access-control-allow-origin").is_none());
}

/// Issue [3/7]: an API registration left at `accessTokenAcceptedVersion` null receives
/// Entra v1.0 access tokens (`iss` `https://sts.windows.net/{tid}/`, `appid`, `aud` the
/// App ID URI); one set to 2 receives v2.0 tokens (`iss`
/// `https://login.microsoftonline.com/{tid}/v2.0`, `azp`, `aud` the client id). Both are
/// signed with the tenant's same keys. Both of the configured tenant are accepted with
/// the same audience list and allow-list; the attacker's variations are not.
#[tokio::test]
async fn entra_v1_and_v2_tokens_of_the_configured_tenant_are_both_accepted() {
    const TID: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const OTHER: &str = "0d9c1e4b-5a77-4b2f-9f0e-3c1d2e3f4a5b";
    const API_CLIENT: &str = "aaaabbbb-0000-1111-2222-ccccddddeeee";
    let issuer = Issuer::start().await;
    let v2_issuer = format!("https://login.microsoftonline.com/{TID}/v2.0");
    let settings = [
        ("AUTH_ISSUER", v2_issuer.clone()),
        ("AUTH_JWKS_URL", format!("{}/discovery/v2.0/keys", issuer.url)),
        ("AUTH_AUDIENCE", format!("{API_CLIENT},{}", crate::support::issuer::AUDIENCE)),
        ("AUTH_ALLOWED_CLIENT_IDS", crate::support::issuer::CLIENT_ID.into()),
        ("AUTH_ALLOWED_ROLES", "Connections.Use".into()),
    ];
    let app = spawn_app(&settings).await;
    let client = crate::support::issuer::CLIENT_ID;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let v2 = serde_json::json!({ "iss": v2_issuer, "aud": API_CLIENT, "azp": client, "sub": client, "tid": TID,
        "ver": "2.0", "iat": now, "nbf": now - 5, "exp": now + 3600 });
    let v1 = serde_json::json!({ "iss": format!("https://sts.windows.net/{TID}/"), "aud": crate::support::issuer::AUDIENCE,
        "appid": client, "sub": client, "tid": TID, "ver": "1.0", "iat": now, "nbf": now - 5, "exp": now + 3600 });
    let call = |claims: Value| {
        let token = issuer.sign(&claims);
        let app = &app;
        async move {
            let (status, _, body) =
                app.send(Method::GET, "/api/connections", &[("Authorization", &format!("Bearer {token}"))], None).await;
            (status, body)
        }
    };
    assert_eq!(call(v2.clone()).await.0, 200, "v2.0");
    assert_eq!(call(v1.clone()).await.0, 200, "v1.0");
    let with = |base: &Value, k: &str, v: Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    // Another tenant's tokens, in either form (a single-tenant deployment): 401.
    for (claims, what) in [
        (
            with(&with(&v1, "iss", format!("https://sts.windows.net/{OTHER}/").into()), "tid", OTHER.into()),
            "v1 other tenant",
        ),
        (
            with(
                &with(&v2, "iss", format!("https://login.microsoftonline.com/{OTHER}/v2.0").into()),
                "tid",
                OTHER.into(),
            ),
            "v2 other tenant",
        ),
        (with(&v1, "iss", format!("https://sts.windows.net/{TID}").into()), "v1 issuer without its slash"),
        (with(&v1, "iss", format!("https://sts.windows.net.evil.example/{TID}/").into()), "look-alike host"),
        (with(&v1, "iss", format!("https://sts.chinacloudapi.cn/{TID}/").into()), "another cloud's v1 issuer"),
        (with(&v1, "iss", format!("https://login.microsoftonline.com/{TID}/").into()), "the v2 host in v1 form"),
        (with(&v1, "aud", "api://someone-else".into()), "another audience"),
    ] {
        let (status, body) = call(claims).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(problem(&body)["type"], "urn:dynamics-companion:problem:unauthorized", "{what}: {body}");
    }
    // The allow-list reads `appid` as it reads `azp`.
    let (status, body) = call(with(&v1, "appid", "99999999-0000-0000-0000-000000000000".into())).await;
    assert_eq!(status, 403, "{body}");
    // A Dataverse plug-in's managed identity (IManagedIdentityService.AcquireToken for
    // `api://.../.default`): an app-only v1.0 token whose appid is the identity's client id,
    // not on the client allow-list, holding an app role the API registration assigned it.
    let plugin = with(
        &with(
            &with(&v1, "appid", "5d2c9e1a-7b3f-4c8d-9e0a-1b2c3d4e5f60".into()),
            "oid",
            "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0".into(),
        ),
        "roles",
        serde_json::json!(["Connections.Use"]),
    );
    assert_eq!(call(plugin.clone()).await.0, 200, "a plug-in's identity with the role");
    assert_eq!(call(with(&plugin, "roles", serde_json::json!([]))).await.0, 403, "without it");
}
