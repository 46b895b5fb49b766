//! OAuth connections end to end, against a real authorization server (`oidc-provider`,
//! strict: PKCE S256 required, exact redirect URI, refresh-token rotation with replay
//! detection, revocation, RFC 9207 `iss`), with the handler driven as the Functions host
//! drives it and a person's consent scripted.
//!
//! Every test ends by checking that none of the secrets it saw (codes, states, tokens,
//! the client secret, the encryption key) reached the handler's logs.

use crate::support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::HandlerBuilder;
use support::flow::{CALLBACK, PUBLIC, Setup, query_param, world};

#[tokio::test]
async fn the_whole_flow_create_consent_refresh_delete_revoke() {
    // Access tokens live 3 s; with a 1 s margin a token is served for at least 1 s and must
    // be refreshed 2 s after it was issued (expiry is kept in whole seconds).
    let w = world(Setup::short_lived(3, 1)).await;

    let started = w.start(json!({ "provider": "test", "connection_id": "erp-1", "owner": "account:42" })).await;
    assert_eq!(started["status"], "pending");
    let auth_url = started["authorization_url"].as_str().unwrap();
    assert!(auth_url.starts_with(&format!("{}/auth?", w.peer.issuer)));
    assert_eq!(query_param(auth_url, "code_challenge_method").as_deref(), Some("S256"));
    assert_eq!(query_param(auth_url, "redirect_uri").as_deref(), Some(CALLBACK));
    let state = query_param(auth_url, "state").unwrap();
    assert!(state.len() >= 43, "state carries at least 128 random bits: {state}");
    assert_eq!(w.status("erp-1").await["status"], "pending");

    // The person consents; the provider redirects to our fixed callback.
    let cb = w.consent(auth_url).await;
    assert!(cb.starts_with("/api/oauth/callback?"));
    assert_eq!(query_param(&format!("{PUBLIC}{cb}"), "iss").as_deref(), Some(w.peer.issuer.as_str()));
    let page = w.callback(&cb).await;
    page.assert_html(200);
    assert!(page.body.contains("Connected to Test Provider"), "{}", page.body);

    let status = w.status("erp-1").await;
    assert_eq!(status["status"], "active");
    assert_eq!(status["has_refresh_token"], true);
    assert_eq!(status["owner"], "account:42");
    assert!(!status.to_string().contains("token\":\""), "status carries no token: {status}");

    // A valid token, the same one while it stays valid.
    let first = w.token("erp-1", false).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("cache-control"), "no-store");
    let t1 = first.json()["access_token"].as_str().unwrap().to_string();
    assert!(w.peer.is_active(&t1).await);
    assert_eq!(w.access_token("erp-1").await, t1);
    assert_eq!(w.peer.refresh_grants().await, 0);

    // Let it expire: the next request gets a refreshed token.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let t2 = w.access_token("erp-1").await;
    assert_ne!(t2, t1);
    assert!(w.peer.is_active(&t2).await);
    assert_eq!(w.peer.refresh_grants().await, 1);
    assert_eq!(w.status("erp-1").await["status"], "active");

    // Stored tokens are ciphertext: neither token is in the SQLite file in clear.
    let db = std::fs::read(w.h.root.join(".data/companion.db")).unwrap();
    let wal = std::fs::read(w.h.root.join(".data/companion.db-wal")).unwrap_or_default();
    let refresh_tokens = w.peer.issued_refresh_tokens().await;
    assert_eq!(refresh_tokens.len(), 2, "the code exchange and one rotation");
    for secret in refresh_tokens.iter().chain([&t1, &t2]) {
        for bytes in [&db, &wal] {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "a token is stored in clear");
        }
    }

    // The proxy calls the provider's API with the token.
    let proxied =
        w.h.forward(
            Method::GET,
            "/api/connections/erp-1/proxy/items/7?expand=all",
            &[("Authorization", &format!("Bearer {}", w.bearer))],
            None,
        )
        .await;
    assert_eq!(proxied.status, 200, "{}", proxied.body);
    assert_eq!(proxied.json()["path"], "/__api/items/7");
    assert_eq!(proxied.json()["query"], "expand=all");

    // Delete: revoked at the provider, then gone.
    let deleted = w.api(Method::DELETE, "/api/connections/erp-1", Value::Null).await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.json()["revoked_at_provider"], true);
    assert!(!w.peer.is_active(&t2).await, "the access token is revoked");
    assert!(!w.peer.is_active(refresh_tokens.last().unwrap()).await, "the refresh token is revoked");
    assert!(w.peer.stats().await["revocations"].as_u64().unwrap() >= 1);
    w.api(Method::GET, "/api/connections/erp-1", Value::Null).await.assert_problem(404, "not-found");
    w.token("erp-1", false).await.assert_problem(404, "not-found");
    w.assert_logs_clean().await;
}

#[tokio::test]
async fn a_connection_from_a_preset_entry_completes_the_flow() {
    // The `zoom` preset under an entry whose URLs point at the test provider (the real
    // Zoom is out of reach here): what the preset adds must not get in the way.
    let w = world(Setup { catalog_extra: "preset = \"zoom\"", ..Default::default() }).await;
    w.connect("zoom-1").await;
    assert_eq!(w.status("zoom-1").await["status"], "active");
    let token = w.token("zoom-1", true).await;
    assert_eq!(token.status, 200, "{}", token.body);
    let proxied =
        w.h.forward(
            Method::GET,
            "/api/connections/zoom-1/proxy/users/me",
            &[("Authorization", &format!("Bearer {}", w.bearer))],
            None,
        )
        .await;
    assert_eq!(proxied.status, 200, "{}", proxied.body);
}

#[tokio::test]
async fn a_connection_names_its_instance_and_cannot_move_the_host() {
    // An entry that leaves NetSuite's account to each connection.
    let extra =
        "\n[providers.netsuite]\npreset = \"netsuite\"\nclient_id = \"dc\"\nclient_secret = \"test-provider-secret\"\n";
    let w = world(Setup { catalog_extra: extra, ..Default::default() }).await;
    let start = |params: Value| {
        let w = &w;
        async move {
            w.api(
                Method::POST,
                "/api/connections",
                json!({ "provider": "netsuite", "connection_id": "ns-1", "params": params }),
            )
            .await
        }
    };
    for (params, code) in [
        (json!({ "account": "evil.example/x?" }), "invalid-provider-params"),
        (json!({ "account": "a.evil.example" }), "invalid-provider-params"),
        (json!({}), "invalid-provider-params"),
        (json!({ "account": "a", "host": "evil.example" }), "invalid-provider-params"),
    ] {
        start(params).await.assert_problem(400, code);
    }
    let r = w.api(Method::POST, "/api/connections", json!({ "provider": "test", "params": { "a": "b" } })).await;
    r.assert_problem(400, "invalid-provider-params");
    // The provider key spelled out by the caller: only its one canonical spelling is taken;
    // a duplicate, an unknown or an over-long parameter is refused, and nothing is stored.
    let huge = "1".repeat(200_000);
    for provider in [
        format!("netsuite?account=1234567-sb1&account={huge}"),
        "netsuite?account=1234567-sb1&account=7654321".to_string(),
        format!("netsuite?account=1234567-sb1&junk={}", "x".repeat(120)),
        "netsuite?account=1234567%2Dsb1".to_string(),
    ] {
        let r = w.api(Method::POST, "/api/connections", json!({ "provider": provider, "connection_id": "ns-x" })).await;
        let p = r.assert_problem(400, "unknown-provider");
        assert!(p["detail"].as_str().unwrap().len() < 400, "the refusal does not echo the value: {}", r.body.len());
    }
    assert_eq!(w.api(Method::GET, "/api/connections/ns-x", json!(null)).await.status, 404, "nothing was stored");

    let r = start(json!({ "account": "1234567-sb1" })).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let link = url::Url::parse(r.json()["authorization_url"].as_str().unwrap()).unwrap();
    assert_eq!(link.host_str(), Some("1234567-sb1.app.netsuite.com"));
    assert_eq!(w.status("ns-1").await["provider"], "netsuite?account=1234567-sb1");
}

#[tokio::test]
async fn bad_callbacks_are_rejected_without_changing_anything() {
    let w = world(Setup { env: vec![("STATE_TTL_SECONDS", "2".into())], ..Default::default() }).await;
    w.connect("done").await;
    let done_token = w.access_token("done").await;

    // A replayed state.
    let started = w.start(json!({ "provider": "test", "connection_id": "replay" })).await;
    let cb = w.consent(started["authorization_url"].as_str().unwrap()).await;
    w.callback(&cb).await.assert_html(200);
    let before = w.status("replay").await;
    let replay = w.callback(&cb).await;
    replay.assert_html(400);
    assert!(replay.body.contains("already used"), "{}", replay.body);
    assert_eq!(w.status("replay").await, before);

    // A tampered state (one character of the payload changed).
    let started = w.start(json!({ "provider": "test", "connection_id": "tamper" })).await;
    let cb = w.consent(started["authorization_url"].as_str().unwrap()).await;
    let state = query_param(&format!("{PUBLIC}{cb}"), "state").unwrap();
    let mut chars: Vec<char> = state.chars().collect();
    chars[10] = if chars[10] == 'A' { 'B' } else { 'A' };
    let tampered: String = chars.into_iter().collect();
    let page = w.callback(&cb.replace(&state, &tampered)).await;
    page.assert_html(400);
    assert!(page.body.contains("altered"), "{}", page.body);
    assert_eq!(w.status("tamper").await["status"], "pending");

    // A wrong iss (RFC 9207 mix-up defence), then none at all: nothing changes, and the
    // genuine response still completes afterwards.
    let iss = query_param(&format!("{PUBLIC}{cb}"), "iss").unwrap();
    let evil = w.callback(&cb.replace(&urlencode(&iss), &urlencode("https://evil.example"))).await;
    evil.assert_html(400);
    assert!(evil.body.contains("issuer"), "{}", evil.body);
    let no_iss: String = cb.split('&').filter(|p| !p.starts_with("iss=")).collect::<Vec<_>>().join("&");
    w.callback(&no_iss).await.assert_html(400);
    // No code.
    let page = w.callback(&format!("/api/oauth/callback?state={}&iss={}", urlencode(&state), urlencode(&iss))).await;
    page.assert_html(400);
    assert!(page.body.contains("neither a code"), "{}", page.body);
    assert_eq!(w.status("tamper").await["status"], "pending");
    w.callback(&cb).await.assert_html(200);
    assert_eq!(w.status("tamper").await["status"], "active");

    // A state for another connection: B's state with the code issued for A's request.
    // PKCE binds the code to A's verifier, so the provider refuses it; A is untouched.
    let a = w.start(json!({ "provider": "test", "connection_id": "a" })).await;
    let b = w.start(json!({ "provider": "test", "connection_id": "b" })).await;
    let cb_a = w.consent(a["authorization_url"].as_str().unwrap()).await;
    let state_a = query_param(&format!("{PUBLIC}{cb_a}"), "state").unwrap();
    let state_b = query_param(b["authorization_url"].as_str().unwrap(), "state").unwrap();
    let crossed = w.callback(&cb_a.replace(&urlencode(&state_a), &urlencode(&state_b))).await;
    crossed.assert_html(400);
    assert!(crossed.body.contains("did not accept the authorization code"), "{}", crossed.body);
    assert_eq!(w.status("a").await["status"], "pending");
    assert_ne!(w.status("b").await["status"], "active");

    // An oversized parameter.
    let huge = "x".repeat(9000);
    let page = w.callback(&format!("/api/oauth/callback?code={huge}&state={}", urlencode(&state_a))).await;
    page.assert_html(400);
    assert!(page.body.contains("limit"), "{}", page.body);
    assert_eq!(w.status("a").await["status"], "pending");

    // An expired state (the TTL here is 2 s).
    let late = w.start(json!({ "provider": "test", "connection_id": "late" })).await;
    let cb_late = w.consent(late["authorization_url"].as_str().unwrap()).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let page = w.callback(&cb_late).await;
    page.assert_html(400);
    assert!(page.body.contains("expired"), "{}", page.body);
    assert_eq!(w.status("late").await["status"], "pending");

    // The connection that was fine before is still fine.
    assert_eq!(w.access_token("done").await, done_token);
    w.assert_logs_clean().await;
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
}

#[tokio::test]
async fn api_callers_must_present_a_valid_token() {
    let w = world(Setup::default()).await;
    let body = json!({ "provider": "test" });
    let cases: Vec<(Option<String>, u16, &str)> = vec![
        (None, 401, "Authorization header"),
        (Some("not-a-jwt".into()), 401, "well-formed"),
        (Some(w.issuer.forged()), 401, "signature"),
        (
            Some(w.issuer.sign(&{
                let mut c = w.issuer.claims();
                c["exp"] = json!(1_000_000);
                c
            })),
            401,
            "expired",
        ),
        (
            Some(w.issuer.sign(&{
                let mut c = w.issuer.claims();
                c["aud"] = json!("api://someone-else");
                c
            })),
            401,
            "audience",
        ),
        (
            Some(w.issuer.sign(&{
                let mut c = w.issuer.claims();
                c["iss"] = json!("https://login.example/other/v2.0");
                c
            })),
            401,
            "issued by",
        ),
        (
            Some(w.issuer.sign(&{
                let mut c = w.issuer.claims();
                c["azp"] = json!("another-app");
                c["sub"] = json!("another-app");
                c
            })),
            403,
            "not allowed",
        ),
        (
            Some(format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&w.issuer.claims().to_string()))),
            401,
            "RS256",
        ),
    ];
    for (token, status, needle) in cases {
        let r = w.h.json(Method::POST, "/api/connections", token.as_deref(), &body).await;
        assert_eq!(r.status, status, "{needle}: {}", r.body);
        assert_eq!(r.content_type(), "application/problem+json");
        assert!(r.json()["detail"].as_str().unwrap().contains(needle), "{needle}: {}", r.body);
        if status == 401 {
            assert_eq!(r.header("www-authenticate"), "Bearer");
        }
    }
    let list = w.api(Method::GET, "/api/connections", Value::Null).await;
    assert_eq!(list.status, 200, "{}", list.body);
    assert_eq!(list.json()["connections"], json!([]));

    // Caller mistakes get clear 4xx.
    w.api(Method::POST, "/api/connections", json!({ "provider": "nope" }))
        .await
        .assert_problem(400, "unknown-provider");
    w.api(Method::POST, "/api/connections", json!({ "provider": "test", "connection_id": "../x" }))
        .await
        .assert_problem(400, "invalid-connection-id");
    w.api(Method::POST, "/api/connections", json!({ "provider": "test", "return_url": "https://evil.example/x" }))
        .await
        .assert_problem(400, "invalid-return-url");
    w.api(Method::POST, "/api/connections", json!({ "provider": "test", "surprise": 1 }))
        .await
        .assert_problem(400, "malformed-json");
    let broken =
        w.h.forward(
            Method::POST,
            "/api/connections",
            &[("Authorization", &format!("Bearer {}", w.bearer)), ("Content-Type", "application/json")],
            Some(b"{\"provider\":".to_vec()),
        )
        .await;
    broken.assert_problem(400, "malformed-json");
    w.start(json!({ "provider": "test", "connection_id": "dup" })).await;
    w.api(Method::POST, "/api/connections", json!({ "provider": "test", "connection_id": "dup" }))
        .await
        .assert_problem(409, "connection-exists");
    w.token("dup", false).await.assert_problem(409, "not-authorized");
    w.token("missing", false).await.assert_problem(404, "not-found");
    // The JWKS was fetched once for all of this.
    assert_eq!(w.issuer.jwks_requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    w.assert_logs_clean_without_callback().await;
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test]
async fn fifty_concurrent_requests_on_an_expired_token_cause_one_refresh() {
    let w = world(Setup::short_lived(3, 1)).await;
    w.connect("busy").await;
    let old = w.access_token("busy").await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // Slow the provider down so the requests really overlap the refresh.
    w.peer.faults(json!({ "token_endpoint": { "count": 0, "delay_ms": 300 } })).await;
    let replies = futures_util::future::join_all((0..50).map(|_| w.token("busy", false))).await;
    let mut tokens = std::collections::HashSet::new();
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.body);
        tokens.insert(r.json()["access_token"].as_str().unwrap().to_string());
    }
    assert_eq!(w.peer.refresh_grants().await, 1, "exactly one refresh at the provider");
    assert_eq!(tokens.len(), 1, "everyone got the refreshed token");
    let fresh = tokens.into_iter().next().unwrap();
    assert_ne!(fresh, old);
    assert!(w.peer.is_active(&fresh).await, "no request got a revoked token");
    w.assert_logs_clean().await;
}

#[tokio::test]
async fn two_processes_sharing_one_store_refresh_once() {
    let w = world(Setup::short_lived(3, 1)).await;
    let second = HandlerBuilder::sharing(&w.h).start().await;
    w.connect("shared").await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    w.peer.faults(json!({ "token_endpoint": { "count": 0, "delay_ms": 300 } })).await;
    let auth = format!("Bearer {}", w.bearer);
    let headers = [("Authorization", auth.as_str())];
    let one = (0..25).map(|_| w.token("shared", false));
    let two = (0..25).map(|_| second.forward(Method::POST, "/api/connections/shared/token", &headers, None));
    let (a, b) = tokio::join!(futures_util::future::join_all(one), futures_util::future::join_all(two));
    let mut tokens = std::collections::HashSet::new();
    for r in a.iter().chain(b.iter()) {
        assert_eq!(r.status, 200, "{}", r.body);
        tokens.insert(r.json()["access_token"].as_str().unwrap().to_string());
    }
    assert_eq!(w.peer.refresh_grants().await, 1, "one refresh across both processes");
    for t in &tokens {
        assert!(w.peer.is_active(t).await, "no request got a revoked token");
    }
    assert_eq!(w.status("shared").await["status"], "active");
    // A rotated-out refresh token was never replayed (the provider would have revoked the grant).
    assert_eq!(w.peer.stats().await["token_errors"]["invalid_grant"], Value::Null);
    w.assert_logs_clean().await;
}

#[tokio::test]
async fn refresh_failures_back_off_or_ask_for_reauthorization() {
    // Tokens live 6 s and are due 4 s before expiry: 3 s after issue a token is due but
    // still valid, 6.2 s after issue it is expired (expiry is kept in whole seconds).
    let w = world(Setup::short_lived(6, 4)).await;
    w.connect("flaky").await;
    let issued = w.access_token("flaky").await;
    tokio::time::sleep(Duration::from_millis(3000)).await;

    // A transient failure while the token is still valid: it keeps being served.
    w.peer.faults(json!({ "token_endpoint": { "status": 503, "count": 1 } })).await;
    assert_eq!(w.access_token("flaky").await, issued);
    let status = w.status("flaky").await;
    assert_eq!(status["status"], "active");
    assert!(status["status_detail"].as_str().unwrap().contains("Refresh failed"), "{status}");

    // Once it has expired, callers get 503 with Retry-After, and the provider is not
    // called again while the back-off lasts.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let faults_before = w.peer.stats().await["faults_injected"].as_u64().unwrap();
    let grants_before = w.peer.refresh_grants().await;
    let r = w.token("flaky", false).await;
    r.assert_problem(503, "provider-unavailable");
    let retry_after: u64 = r.header("retry-after").parse().unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    w.token("flaky", false).await.assert_problem(503, "provider-unavailable");
    assert_eq!(w.peer.stats().await["faults_injected"].as_u64().unwrap(), faults_before, "no call during back-off");
    assert_eq!(w.peer.refresh_grants().await, grants_before);

    // force_refresh goes through the back-off; the provider is back.
    let t = w.token("flaky", true).await;
    assert_eq!(t.status, 200, "{}", t.body);
    assert_eq!(w.status("flaky").await["status_detail"], Value::Null);

    // invalid_grant: the connection needs a person to reconnect, with the provider's message.
    w.peer.faults(json!({ "token_endpoint": { "status": 400, "count": 1, "body": { "error": "invalid_grant", "error_description": "refresh token revoked by the user" } } })).await;
    let r = w.token("flaky", true).await;
    r.assert_problem(409, "needs-reauth");
    assert!(r.body.contains("refresh token revoked by the user"), "{}", r.body);
    let status = w.status("flaky").await;
    assert_eq!(status["status"], "needs_reauth");
    assert!(status["status_detail"].as_str().unwrap().contains("refresh token revoked by the user"));
    w.token("flaky", false).await.assert_problem(409, "needs-reauth");

    // Reconnecting brings it back.
    let again = w.api(Method::POST, "/api/connections/flaky/reconnect", Value::Null).await;
    assert_eq!(again.status, 200, "{}", again.body);
    let cb = w.consent(again.json()["authorization_url"].as_str().unwrap()).await;
    w.callback(&cb).await.assert_html(200);
    assert_eq!(w.status("flaky").await["status"], "active");
    assert_eq!(w.token("flaky", false).await.status, 200);
    w.assert_logs_clean().await;
}

#[tokio::test]
async fn provider_errors_return_urls_and_form_posts() {
    let w = world(Setup::default()).await;

    // The person denies: recorded on the connection and shown.
    let s = w.start(json!({ "provider": "test", "connection_id": "denied" })).await;
    let location = w.peer.consent(s["authorization_url"].as_str().unwrap(), true).await;
    w.remember(&location);
    let page = w.callback(location.strip_prefix(PUBLIC).unwrap()).await;
    page.assert_html(400);
    assert!(page.body.contains("access_denied"), "{}", page.body);
    let status = w.status("denied").await;
    assert_eq!(status["status"], "failed");
    assert!(status["status_detail"].as_str().unwrap().contains("access_denied"));

    // A return_url on the allow-list: the browser goes back there.
    let s = w
        .start(
            json!({ "provider": "test", "connection_id": "back", "return_url": "https://portal.example.com/done?x=1" }),
        )
        .await;
    let cb = w.consent(s["authorization_url"].as_str().unwrap()).await;
    let r = w.callback(&cb).await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.header("location"), "https://portal.example.com/done?x=1&connection_id=back&status=active");

    // response_mode=form_post: the same callback as a POST.
    let s = w.start(json!({ "provider": "test", "connection_id": "posted" })).await;
    let cb = w.consent(s["authorization_url"].as_str().unwrap()).await;
    let form = cb.split_once('?').unwrap().1.to_string();
    let r =
        w.h.forward(
            Method::POST,
            "/api/oauth/callback",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            Some(form.into_bytes()),
        )
        .await;
    r.assert_html(200);
    assert_eq!(w.status("posted").await["status"], "active");
    w.assert_logs_clean().await;
}

#[tokio::test]
async fn capture_mode_keeps_foreign_callbacks_once() {
    let w = world(Setup::default()).await;
    // Dynamics registers the states it issued; only those are kept.
    for state in ["fo-state-123", "fo-state-456"] {
        w.h.expect_state(&w.bearer, state).await;
    }
    let cb = "/api/oauth/callback?code=dyn-code-1&state=fo-state-123&iss=https%3A%2F%2Ferp.example";
    w.seen.lock().unwrap().extend(["dyn-code-1".to_string()]);
    let first = w.callback(cb).await;
    first.assert_html(200);
    assert!(first.body.contains("Authorization received"));
    let again = w.callback(cb).await;
    again.assert_html(200);
    assert!(again.body.contains("already received"));
    // JSON body too; a second, different code for the same state is refused (the first
    // code wins) and recorded as a conflict.
    let r =
        w.h.json(Method::POST, "/api/oauth/callback", None, &json!({ "code": "dyn-code-2", "state": "fo-state-123" }))
            .await;
    r.assert_html(409);
    w.seen.lock().unwrap().push("dyn-code-2".into());
    // An error for another state.
    w.callback("/api/oauth/callback?error=access_denied&error_description=User+said+no&state=fo-state-456")
        .await
        .assert_html(200);

    let r = w.api(Method::GET, "/api/captures?state=fo-state-123", Value::Null).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let caps = r.json()["captures"].as_array().unwrap().clone();
    assert_eq!(caps.len(), 2, "the code, and the refused one as a conflict: {caps:?}");
    assert_eq!(caps[0]["code"], "dyn-code-1");
    assert_eq!(caps[0]["iss"], "https://erp.example");
    assert_eq!(caps[1]["code"], Value::Null, "a refused code is not kept");
    assert_eq!(caps[1]["error"], "conflicting_code");
    let r = w.api(Method::GET, "/api/captures?state=fo-state-456", Value::Null).await;
    assert_eq!(r.json()["captures"][0]["error_description"], "User said no");
    w.api(Method::GET, "/api/captures?state=unknown", Value::Null).await.assert_problem(404, "not-found");
    // Codes are sealed at rest too.
    let db = std::fs::read(w.h.root.join(".data/companion.db")).unwrap();
    let wal = std::fs::read(w.h.root.join(".data/companion.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(!bytes.windows(10).any(|x| x == b"dyn-code-1"));
    }
    w.assert_logs_clean().await;
}

#[tokio::test]
async fn the_timer_refreshes_what_expires_before_its_next_run() {
    let w = world(Setup {
        peer: json!({ "access_token_ttl": 600 }),
        env: vec![("REFRESH_MARGIN_SECONDS", "60".into()), ("TIMER_LOOKAHEAD_SECONDS", "900".into())],
        ..Default::default()
    })
    .await;
    w.connect("timed").await;
    let before = w.access_token("timed").await;
    // Expires in 600 s, before the next run (900 s ahead): refreshed now.
    let r = w.h.invoke_timer(&support::timer_payload(false)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let logs = r.json()["Logs"].to_string();
    assert!(logs.contains("1 due, 1 refreshed"), "{logs}");
    assert_eq!(w.peer.refresh_grants().await, 1);
    let after = w.access_token("timed").await;
    assert_ne!(after, before);
    // With the next run announced 60 s ahead, nothing is due.
    let next = time::OffsetDateTime::now_utc() + time::Duration::seconds(60);
    let payload = json!({ "Data": { "timer": { "Schedule": {}, "ScheduleStatus": { "Next": next.format(&time::format_description::well_known::Rfc3339).unwrap() }, "IsPastDue": false } } });
    let r = w.h.invoke_timer(&payload).await;
    assert!(r.json()["Logs"].to_string().contains("0 due"), "{}", r.body);
    assert_eq!(w.peer.refresh_grants().await, 1);
    w.assert_logs_clean().await;
}

#[tokio::test]
async fn tokens_shorter_than_the_margin_are_not_refreshed_on_every_call() {
    // 4 s tokens under the default 300 s margin: refreshed at half their lifetime, once.
    let w = world(Setup::short_lived(4, 300)).await;
    w.connect("short").await;
    let first = w.access_token("short").await;
    for _ in 0..20 {
        assert_eq!(w.access_token("short").await, first);
    }
    assert_eq!(w.peer.refresh_grants().await, 0, "a fresh token is not due yet");
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let replies = futures_util::future::join_all((0..20).map(|_| w.token("short", false))).await;
    let tokens: std::collections::HashSet<String> =
        replies.iter().map(|r| r.json()["access_token"].as_str().unwrap().to_string()).collect();
    assert_eq!(tokens.len(), 1);
    assert_ne!(tokens.into_iter().next().unwrap(), first);
    assert_eq!(w.peer.refresh_grants().await, 1, "one refresh, not one per call");
    for _ in 0..10 {
        w.access_token("short").await;
    }
    assert_eq!(w.peer.refresh_grants().await, 1);
    w.assert_logs_clean().await;
}

#[tokio::test]
async fn the_proxy_refreshes_and_retries_once_when_the_provider_says_401() {
    let w = world(Setup::default()).await;
    w.connect("proxied").await;
    let stale = w.access_token("proxied").await;
    // The provider's API rejects the (still valid) token once, as when it was revoked early.
    w.peer.reject_api_calls(1).await;
    let bearer = format!("Bearer {}", w.bearer);
    let r = w.h.forward(Method::GET, "/api/connections/proxied/proxy/items", &[("Authorization", &bearer)], None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["path"], "/__api/items");
    assert_eq!(w.peer.refresh_grants().await, 1, "one refresh, then the call was retried once");
    let fresh = w.access_token("proxied").await;
    assert_ne!(fresh, stale, "the retry used a refreshed token");
    assert!(w.peer.is_active(&fresh).await);
    // A second 401 in a row is passed through rather than retried again.
    w.peer.reject_api_calls(2).await;
    let r = w.h.forward(Method::GET, "/api/connections/proxied/proxy/items", &[("Authorization", &bearer)], None).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(w.peer.refresh_grants().await, 2);
    w.assert_logs_clean_without_callback().await;
}

/// Issue [4/7]: a provider that sends `iss` only sometimes (Google since 2026, not
/// advertised) is configured with `issuer_required = false`: a callback without `iss`
/// completes, one with a wrong `iss` is still refused (RFC 9207 §2.4).
#[tokio::test]
async fn an_issuer_sent_only_sometimes_is_checked_when_sent() {
    let w = world(Setup { catalog_extra: "issuer_required = false", ..Default::default() }).await;
    let started = w.start(json!({ "provider": "test", "connection_id": "sometimes" })).await;
    let cb = w.consent(started["authorization_url"].as_str().unwrap()).await;
    let iss = query_param(&format!("{PUBLIC}{cb}"), "iss").unwrap();
    let evil = w.callback(&cb.replace(&urlencode(&iss), &urlencode("https://evil.example"))).await;
    evil.assert_html(400);
    assert_eq!(w.status("sometimes").await["status"], "pending");
    let no_iss: String = cb.split('&').filter(|p| !p.starts_with("iss=")).collect::<Vec<_>>().join("&");
    w.callback(&no_iss).await.assert_html(200);
    assert_eq!(w.status("sometimes").await["status"], "active");
}

/// Issue [5/7]: the newcomer's path from the demo to their own `cargo run`, without an
/// Entra tenant: `AUTH_ISSUER=dev`, a token from `handler dev-token`, a provider entry
/// from a preset (its URLs pointed at the test provider, the real one being out of reach),
/// a connection, and a call of the provider's API. The development issuer is refused
/// anywhere but a loopback PUBLIC_BASE_URL, and accepts its own tokens only.
#[tokio::test]
async fn a_newcomer_calls_a_providers_api_with_development_tokens() {
    use support::oidc::{CLIENT_SECRET, OidcPeer};
    let peer = OidcPeer::start(CALLBACK, json!({}));
    let h = HandlerBuilder::new()
        .file("providers.toml", &peer.catalog("erp", "preset = \"zoom\""))
        .env("TEST_PROVIDER_SECRET", CLIENT_SECRET)
        .env("AUTH_ISSUER", "dev")
        .start()
        .await;
    assert!(h.logs.all().contains("development tokens (AUTH_ISSUER=dev"), "{}", h.logs.all());
    let (code, out, err) = HandlerBuilder::sharing(&h).args(&["dev-token"]).run_to_exit();
    assert_eq!(code, Some(0), "{out}{err}");
    let token = out.trim().to_string();
    let r = h
        .json(Method::POST, "/api/connections", Some(&token), &json!({ "provider": "erp", "connection_id": "mine" }))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let location = peer.consent(r.json()["authorization_url"].as_str().unwrap(), false).await;
    h.get(location.strip_prefix(PUBLIC).unwrap(), &[("Accept", "text/html")]).await.assert_html(200);
    let called = h
        .forward(
            Method::GET,
            "/api/connections/mine/call/users%2Fme",
            &[("Authorization", &format!("Bearer {token}"))],
            None,
        )
        .await;
    assert_eq!(called.status, 200, "{}", called.body);
    assert!(called.json()["path"].as_str().unwrap().ends_with("/users/me"), "{}", called.body);

    // Not a token of this machine's key, or altered, or none: 401.
    let mut altered = token.clone();
    altered.pop();
    altered.push(if token.ends_with('A') { 'B' } else { 'A' });
    for bad in [altered.as_str(), "not-a-token"] {
        assert_eq!(h.json(Method::GET, "/api/connections", Some(bad), &Value::Null).await.status, 401, "{bad}");
    }
    let other = HandlerBuilder::new().env("AUTH_ISSUER", "dev").args(&["dev-token"]).run_to_exit();
    assert_eq!(other.0, Some(0), "{}{}", other.1, other.2);
    let r = h.json(Method::GET, "/api/connections", Some(other.1.trim()), &Value::Null).await;
    assert_eq!(r.status, 401, "another machine's (app root's) key: {}", r.body);

    // Anywhere but this machine, the handler refuses to start with it, saying why.
    let (code, out, err) = HandlerBuilder::new()
        .env("AUTH_ISSUER", "dev")
        .env("PUBLIC_BASE_URL", "https://contoso-dc.azurewebsites.net")
        .run_to_exit();
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("AUTH_ISSUER") && err.contains("loopback"), "{err}");
}
