//! Regression tests for what an outside security review and an end-to-end fuzz run found
//! (issue [2/7]). Each test names the fault it pins down; each failed before its fix.

use crate::support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::HandlerBuilder;
use support::flow::{Setup, world};
use support::issuer::Issuer;

// ----- 2. capture mode keeps expected states only ----------------------------------

fn captures_in(root: &std::path::Path) -> i64 {
    let db = rusqlite::Connection::open(root.join(".data/companion.db")).unwrap();
    db.query_row("SELECT COUNT(*) FROM captures", [], |r| r.get(0)).unwrap()
}

#[tokio::test]
async fn a_flood_of_made_up_callbacks_stores_nothing() {
    let issuer = Issuer::start().await;
    let h = HandlerBuilder::new().envs(issuer.settings()).env("CALLBACK_RATE_PER_MINUTE", "100000").start().await;
    let started = std::time::Instant::now();
    for batch in 0..15 {
        let paths: Vec<String> =
            (0..100).map(|i| format!("/api/oauth/callback?state=made-up-{batch}-{i}&code=junk-{batch}-{i}")).collect();
        let replies = futures_util::future::join_all(paths.iter().map(|p| h.get(p, &[]))).await;
        for r in replies {
            r.assert_html(400);
        }
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(captures_in(&h.root), 0, "1,500 made-up callbacks stored nothing");
}

#[tokio::test]
async fn registered_and_signed_states_are_kept_and_the_first_code_wins() {
    use dynamics_companion::support::crypto::sign_capture_state;
    let issuer = Issuer::start().await;
    let key = "a-key-shared-with-dynamics-0123456789";
    let h = HandlerBuilder::new()
        .envs(issuer.settings())
        .env("CAPTURE_STATE_KEY_SECRET", "capture-state-key")
        .env("CAPTURE_STATE_KEY", key)
        .start()
        .await;
    let bearer = issuer.token();
    let captured = |state: String| {
        let (h, bearer) = (&h, &bearer);
        async move {
            let r = h.json(Method::GET, &format!("/api/captures?state={state}"), Some(bearer), &Value::Null).await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["captures"].as_array().unwrap().clone()
        }
    };

    // Registered by Dynamics through the back office.
    h.expect_state(&bearer, "erp-state-1").await;
    h.get("/api/oauth/callback?state=erp-state-1&code=first-code", &[]).await.assert_html(200);
    assert_eq!(captured("erp-state-1".into()).await[0]["code"], "first-code");

    // Signed by Dynamics with the shared key: no registration needed.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let signed = sign_capture_state(key.as_bytes(), now + 600, "xpp-nonce-0123456789");
    h.get(&format!("/api/oauth/callback?state={signed}&code=signed-code"), &[]).await.assert_html(200);
    assert_eq!(captured(signed.clone()).await[0]["code"], "signed-code");
    // Signed with another key, or expired: refused.
    let forged = sign_capture_state(b"not-the-key", now + 600, "xpp-nonce-0123456789");
    h.get(&format!("/api/oauth/callback?state={forged}&code=x"), &[]).await.assert_html(400);
    let stale = sign_capture_state(key.as_bytes(), now - 1, "xpp-nonce-0123456789");
    h.get(&format!("/api/oauth/callback?state={stale}&code=x"), &[]).await.assert_html(400);

    // A second, different code for a state is refused and shown as a conflict.
    let second = h.get("/api/oauth/callback?state=erp-state-1&code=second-code", &[]).await;
    second.assert_html(409);
    let caps = captured("erp-state-1".into()).await;
    assert_eq!(caps.len(), 2, "{caps:?}");
    assert_eq!(caps[0]["code"], "first-code", "the first code still wins");
    assert_eq!(caps[1]["error"], "conflicting_code");
    assert!(!h.logs.all().contains("second-code"));
    assert_eq!(captures_in(&h.root), 3);
}

/// "First code wins" must hold when two codes for one state arrive at the same moment
/// (30 pairs, each sent together): exactly one is kept and answered 200, the other is
/// refused 409 and noted as a conflict. And one known state cannot grow the store: after
/// its code, 100 other codes and 100 errors add one conflict record in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_state_keeps_one_code_whatever_arrives_and_however_fast() {
    let issuer = Issuer::start().await;
    let h = HandlerBuilder::new().envs(issuer.settings()).env("CALLBACK_RATE_PER_MINUTE", "100000").start().await;
    let bearer = issuer.token();
    for pair in 0..30 {
        let state = format!("race-state-{pair}");
        h.expect_state(&bearer, &state).await;
        let (real, other) = (
            format!("/api/oauth/callback?state={state}&code=real-{pair}"),
            format!("/api/oauth/callback?state={state}&code=other-{pair}"),
        );
        let (a, b) = tokio::join!(h.get(&real, &[]), h.get(&other, &[]));
        let mut statuses = [a.status, b.status];
        statuses.sort();
        assert_eq!(statuses, [200, 409], "pair {pair}: {} / {}", a.body, b.body);
        let r = h.json(Method::GET, &format!("/api/captures?state={state}"), Some(&bearer), &Value::Null).await;
        let caps = r.json()["captures"].as_array().unwrap().clone();
        let codes: Vec<&Value> = caps.iter().filter(|c| !c["code"].is_null()).collect();
        assert_eq!(codes.len(), 1, "pair {pair}: {caps:?}");
        assert_eq!(caps.iter().filter(|c| c["error"] == "conflicting_code").count(), 1, "pair {pair}: {caps:?}");
    }
    assert_eq!(captures_in(&h.root), 60);

    h.expect_state(&bearer, "one-known-state").await;
    h.get("/api/oauth/callback?state=one-known-state&code=the-real-code", &[]).await.assert_html(200);
    for i in 0..100 {
        h.get(&format!("/api/oauth/callback?state=one-known-state&code=junk-{i}"), &[]).await.assert_html(409);
        let error = format!("/api/oauth/callback?state=one-known-state&error=access_denied&error_description=x{i}");
        h.get(&error, &[]).await.assert_html(409);
    }
    assert_eq!(captures_in(&h.root), 62, "the code and one conflict record, nothing else");
    let r = h.json(Method::GET, "/api/captures?state=one-known-state", Some(&bearer), &Value::Null).await;
    assert_eq!(r.json()["captures"][0]["code"], "the-real-code");
}

#[tokio::test]
async fn callback_hits_are_limited_per_client_address() {
    let h = HandlerBuilder::new().env("CALLBACK_RATE_PER_MINUTE", "5").start().await;
    let from = |ip: &'static str| [("X-Forwarded-For", ip)];
    for _ in 0..5 {
        h.get("/api/oauth/callback?state=s&code=c", &from("203.0.113.9")).await.assert_html(400);
    }
    let limited = h.get("/api/oauth/callback?state=s&code=c", &from("203.0.113.9")).await;
    limited.assert_html(429);
    assert!(limited.header("retry-after").parse::<u64>().unwrap() >= 1);
    // Another address has its own allowance; the last hop of a forwarded chain counts.
    h.get("/api/oauth/callback?state=s&code=c", &from("203.0.113.10")).await.assert_html(400);
    h.get("/api/oauth/callback?state=s&code=c", &[("X-Forwarded-For", "203.0.113.9, 198.51.100.4")])
        .await
        .assert_html(400);
}

#[tokio::test]
async fn capture_states_any_keeps_foreign_states_and_says_so() {
    let h = HandlerBuilder::new().env("CAPTURE_STATES", "any").start().await;
    assert!(h.logs.wait_for_line(|l| l.contains("CAPTURE_STATES=any")).is_some(), "{}", h.logs.all());
    h.get("/api/oauth/callback?state=anything&code=c1", &[]).await.assert_html(200);
    assert_eq!(captures_in(&h.root), 1);
}

// ----- 3. what the proxies forward -------------------------------------------------

#[tokio::test]
async fn the_proxy_forwards_an_allow_list_of_headers_and_none_that_reroute() {
    let w = world(Setup::default()).await;
    w.connect("p1").await;
    let bearer = format!("Bearer {}", w.bearer);
    let sent = [
        ("Authorization", bearer.as_str()),
        ("Accept-Language", "de-CH"),
        ("If-Match", "\"v1\""),
        ("X-HTTP-Method-Override", "DELETE"),
        ("X-HTTP-Method", "DELETE"),
        ("X-Method-Override", "DELETE"),
        ("X-Rewrite-URL", "/admin"),
        ("X-Original-URL", "/admin"),
        ("Forwarded", "for=203.0.113.7;host=evil.example"),
        ("X-Real-IP", "203.0.113.7"),
        ("X-Custom", "from-the-caller"),
        ("Cookie", "session=ours"),
    ];
    let r = w.h.forward(Method::GET, "/api/connections/p1/proxy/items", &sent, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let got = &r.json()["headers"];
    assert_eq!(got["accept-language"], "de-CH");
    assert_eq!(got["if-match"], "\"v1\"");
    for name in [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-rewrite-url",
        "x-original-url",
        "forwarded",
        "x-real-ip",
        "x-custom",
        "cookie",
    ] {
        assert!(got.get(name).is_none(), "{name} reached the provider: {got}");
    }
    // A header named in Connection is hop-by-hop, even when it is on the allow-list.
    let r =
        w.h.forward(
            Method::GET,
            "/api/connections/p1/proxy/items",
            &[("Authorization", &bearer), ("Connection", "accept-language"), ("Accept-Language", "fr")],
            None,
        )
        .await;
    assert!(r.json()["headers"].get("accept-language").is_none(), "{}", r.body);
}

/// The provider's answer is streamed through, not buffered: the first chunk reaches the
/// caller while the provider still holds back the second. An answer with a length keeps
/// it (sent length-delimited, not re-chunked); one without stays chunked.
#[tokio::test]
async fn the_proxy_streams_the_providers_answer_and_keeps_its_length() {
    let w = world(Setup::default()).await;
    w.connect("p5").await;
    let bearer = format!("Bearer {}", w.bearer);
    let r = w.h.forward(Method::GET, "/api/connections/p5/proxy/items", &[("Authorization", &bearer)], None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["content-length"].to_str().unwrap(), r.body.len().to_string(), "{:?}", r.headers);
    assert!(r.headers.get("transfer-encoding").is_none(), "{:?}", r.headers);
    // HEAD: the provider's length comes back without a body (and without a hang).
    let head = tokio::time::timeout(
        Duration::from_secs(10),
        w.h.forward(Method::HEAD, "/api/connections/p5/proxy/items", &[("Authorization", &bearer)], None),
    )
    .await
    .expect("HEAD answered");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty(), "{}", head.body);
    assert!(head.headers.get("content-length").is_some(), "{:?}", head.headers);

    let mut resp = reqwest::Client::new()
        .get(format!("{}/api/connections/p5/proxy/items?stream=1", w.h.base))
        .header("Authorization", &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("content-length").is_none(), "{:?}", resp.headers());
    let first = tokio::time::timeout(Duration::from_secs(10), resp.chunk()).await;
    let first = first.expect("the first chunk came before the provider finished").unwrap().unwrap();
    assert_eq!(&first[..], b"first chunk\n");
    assert_eq!(w.peer.release_api_streams().await, 1, "the provider was still holding its second chunk");
    let rest = tokio::time::timeout(Duration::from_secs(10), resp.bytes()).await.unwrap().unwrap();
    assert_eq!(&rest[..], b"second chunk\n");
}

#[tokio::test]
async fn the_proxy_refuses_paths_a_server_behind_it_could_read_differently() {
    let w = world(Setup::default()).await;
    w.connect("p2").await;
    let bearer = format!("Bearer {}", w.bearer);
    for path in ["items/..;/admin", "items;x=1", "items/%252e%252e/admin", "a%2Fb", "a%5Cb"] {
        let r =
            w.h.forward(Method::GET, &format!("/api/connections/p2/proxy/{path}"), &[("Authorization", &bearer)], None)
                .await;
        r.assert_problem(400, "invalid-proxy-path");
    }
}

/// Issue [4/7]: Power Automate's "Call the provider's API" as the platform sends it. A
/// custom connector URL-encodes a path parameter (`x-ms-url-encoding: single`), so the API
/// path `invoices/123` arrives as `invoices%2F123`, and the query is its own parameter,
/// encoded as any query value. The provider gets `invoices/123?status=open`; `..` hidden
/// by the encoding is refused after decoding.
#[tokio::test]
async fn the_connectors_call_reaches_a_nested_path_with_a_query_and_no_further() {
    let w = world(Setup::default()).await;
    w.connect("flow").await;
    let bearer = format!("Bearer {}", w.bearer);
    let auth = [("Authorization", bearer.as_str())];
    // What the connector sends for API path `invoices/123`, Query `status=open&limit=5`.
    let path = "/api/connections/flow/call/invoices%2F123?query=status%3Dopen%26limit%3D5";
    let r = w.h.forward(Method::GET, path, &auth, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let got = r.json();
    assert!(got["path"].as_str().unwrap().ends_with("/invoices/123"), "{got}");
    assert_eq!(got["query"], "status=open&limit=5");
    // The README's old form (the query inside the path) works too; a space is escaped once.
    let r = w.h.forward(Method::GET, "/api/connections/flow/call/invoices%3Fstatus%3Dopen", &auth, None).await;
    assert_eq!(
        (r.json()["path"].as_str().unwrap().ends_with("/invoices"), r.json()["query"].as_str()),
        (true, Some("status=open"))
    );
    let r = w.h.forward(Method::GET, "/api/connections/flow/call/files%2Fmy%20report.pdf", &auth, None).await;
    assert!(r.json()["path"].as_str().unwrap().ends_with("/files/my%20report.pdf"), "{}", r.body);
    // A POST with a body, as the connector's POST action sends it.
    let r =
        w.h.forward(
            Method::POST,
            "/api/connections/flow/call/invoices?query=draft%3Dtrue",
            &[("Authorization", &bearer), ("Content-Type", "application/json")],
            Some(br#"{"amount":12}"#.to_vec()),
        )
        .await;
    assert_eq!((r.json()["method"].as_str(), r.json()["body"].as_str()), (Some("POST"), Some(r#"{"amount":12}"#)));
    // Traversal and tricks, as a connector would encode them: all refused after decoding.
    for evil in [
        "..%2Fadmin",
        "invoices%2F..%2F..%2Fadmin",
        "invoices%2F%252e%252e%2Fadmin",
        "%2E%2E%2Fadmin",
        "invoices%2F.%2Fx",
        "a%5Cb",
        "items%3Bx%3D1",
        "invoices%2F%2Fdouble",
        "",
        "a%0Ab",
    ] {
        let r = w.h.forward(Method::GET, &format!("/api/connections/flow/call/{evil}"), &auth, None).await;
        r.assert_problem(400, "invalid-proxy-path");
    }
    let r = w.h.forward(Method::GET, "/api/connections/flow/call/a%3Fx%3D1?query=y%3D2", &auth, None).await;
    r.assert_problem(400, "invalid-proxy-path");
    // The Swagger document offers this form to the connector designer.
    let doc = w.h.get("/api/openapi.json", &[]).await.json();
    let call = &doc["paths"]["/api/connections/{id}/call/{path}"]["get"];
    assert_eq!(call["x-ms-visibility"], "important", "{call}");
    let names: Vec<&str> = call["parameters"].as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["id", "path", "query"]);
    assert_eq!(doc["paths"]["/api/connections/{id}/proxy/{path}"]["get"]["x-ms-visibility"], "internal");
}

#[tokio::test]
async fn the_providers_cors_headers_cookies_and_hop_by_hop_headers_stay_behind() {
    let w = world(Setup::default()).await;
    w.connect("p3").await;
    let bearer = format!("Bearer {}", w.bearer);
    let r =
        w.h.forward(Method::GET, "/api/connections/p3/proxy/items?hostile=1", &[("Authorization", &bearer)], None)
            .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-api-kept"), "yes");
    for name in ["access-control-allow-origin", "access-control-allow-credentials", "set-cookie", "x-hop"] {
        assert_eq!(r.header(name), "", "{name} reached the caller");
    }
}

// ----- 4. the server does not wait forever --------------------------------------------

async fn raw(port: u16, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

/// What the server sends before closing, or until `wait` runs out (then `None`).
async fn read_until_closed(s: &mut tokio::net::TcpStream, wait: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&got).contains("\r\n\r\n") && got.starts_with(b"HTTP/1.1 408") {
                    return Some(String::from_utf8_lossy(&got).into_owned());
                }
            }
        }
    }
}

#[tokio::test]
async fn half_sent_headers_are_cut_off_after_the_header_timeout() {
    let h = HandlerBuilder::new().env("HEADER_READ_TIMEOUT_SECONDS", "1").start().await;
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(raw(h.port, b"GET /api/health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").await);
    }
    for c in &mut conns {
        assert!(read_until_closed(c, Duration::from_secs(4)).await.is_some(), "a half-sent request was kept open");
    }
    assert_eq!(h.get("/api/health", &[]).await.status, 200);
    assert!(h.logs.stderr().is_empty(), "{:?}", h.logs.stderr());
}

#[tokio::test]
async fn a_body_that_stops_arriving_gets_408_after_the_body_timeout() {
    let h = HandlerBuilder::new().env("BODY_READ_TIMEOUT_SECONDS", "1").start().await;
    let mut s = raw(
        h.port,
        b"POST /api/oauth/callback HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\ncode=abc",
    )
    .await;
    let answer = read_until_closed(&mut s, Duration::from_secs(4)).await.expect("an answer within the timeout");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

#[tokio::test]
async fn anonymous_requests_have_a_bounded_number_of_places() {
    let issuer = Issuer::start().await;
    let h = HandlerBuilder::new()
        .envs(issuer.settings())
        .env("MAX_ANONYMOUS_REQUESTS", "3")
        .env("BODY_READ_TIMEOUT_SECONDS", "2")
        .start()
        .await;
    let slow = b"POST /api/oauth/callback HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\ncode=";
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(raw(h.port, slow).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.get("/api/health", &[]).await.assert_problem(503, "busy");
    // Callers with credentials are not held up by the anonymous ones.
    let r = h.json(Method::GET, "/api/connections", Some(&issuer.token()), &Value::Null).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // When the slow bodies time out, their places are free again.
    for s in &mut held {
        read_until_closed(s, Duration::from_secs(5)).await.expect("the slow request was answered");
    }
    assert_eq!(h.get("/api/health", &[]).await.status, 200);
}

#[tokio::test]
async fn a_head_request_on_the_callback_spends_nothing() {
    let w = world(Setup::default()).await;
    let started = w.start(json!({ "provider": "test", "connection_id": "scanned" })).await;
    let cb = w.consent(started["authorization_url"].as_str().unwrap()).await;
    let probe = w.h.forward(Method::HEAD, &cb, &[], None).await;
    assert_eq!(probe.status, 200);
    // The person's own visit still completes the connection.
    w.callback(&cb).await.assert_html(200);
    assert_eq!(w.status("scanned").await["status"], "active");
}

// ----- 5. correctness faults found by fuzzing ---------------------------------------

#[tokio::test]
async fn a_case_variant_id_is_the_same_connection_for_every_verb() {
    let w = world(Setup::default()).await;
    w.connect("erp-1").await;
    let token = w.access_token("erp-1").await;
    // Warm the cache under the variant too, as a caller spelling it differently would.
    assert_eq!(w.access_token("ERP-1").await, token);

    let deleted = w.api(Method::DELETE, "/api/connections/ERP-1", Value::Null).await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.json()["revoked_at_provider"], true);
    // Gone under every spelling at once, not after the token cache's 30 s.
    for id in ["erp-1", "ERP-1", "Erp-1"] {
        w.token(id, false).await.assert_problem(404, "not-found");
    }
}

#[tokio::test]
async fn an_issuer_that_is_down_costs_one_key_fetch_not_one_per_bad_token() {
    let issuer = Issuer::start().await;
    issuer.fail_jwks(true);
    let h = HandlerBuilder::new().envs(issuer.settings()).start().await;

    let started = std::time::Instant::now();
    let bad: Vec<String> =
        (0..50).map(|i| issuer.sign_with_kid(&issuer.claims(), &format!("unknown-kid-{i}"))).collect();
    let replies = futures_util::future::join_all(
        bad.iter().map(|t| h.json(Method::GET, "/api/connections", Some(t), &Value::Null)),
    )
    .await;
    for r in replies {
        r.assert_problem(503, "auth-unavailable");
    }
    // A valid token is answered at once too, with the same clear 503, not after a queue.
    let t = std::time::Instant::now();
    h.json(Method::GET, "/api/connections", Some(&issuer.token()), &Value::Null)
        .await
        .assert_problem(503, "auth-unavailable");
    assert!(t.elapsed() < Duration::from_millis(500), "a valid token waited {:?}", t.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5));
    let fetches = issuer.jwks_requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(fetches, 1, "the failed fetch is remembered");

    // The issuer comes back: after the failure is forgotten, keys load and tokens verify.
    issuer.fail_jwks(false);
    tokio::time::sleep(Duration::from_millis(5200)).await;
    let ok = h.json(Method::GET, "/api/connections", Some(&issuer.token()), &Value::Null).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
}

/// The losing branch of this race is pinned by a unit test (`app::tests`); here, real
/// processes started together must all come up on one key.
#[tokio::test]
async fn handlers_started_together_on_a_fresh_root_share_one_local_key() {
    for _ in 0..4 {
        let root = tempfile::tempdir().unwrap();
        let starting =
            (0..4).map(|_| HandlerBuilder::in_root(root.path()).without_env("TOKEN_ENCRYPTION_KEYS").start());
        let handlers = futures_util::future::join_all(starting).await;
        for h in &handlers {
            assert!(h.logs.wait_for_line(|l| l.contains("local development key")).is_some(), "{}", h.logs.all());
        }
        let key = std::fs::read_to_string(root.path().join(".data/companion.key")).unwrap();
        assert!(key.starts_with("local1:"), "one whole key: {key:?}");
        let leftovers: Vec<_> = std::fs::read_dir(root.path().join(".data"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "no temporary key files are left: {leftovers:?}");
    }
}

#[tokio::test]
async fn a_forged_schedule_does_not_refresh_tokens_beyond_an_hour() {
    // Tokens live two hours; a payload claiming the next run is in 9999 must not
    // refresh them all.
    let w = world(Setup { peer: json!({ "access_token_ttl": 7200 }), ..Default::default() }).await;
    w.connect("two-hours").await;
    let payload = json!({
        "Data": { "timer": { "Schedule": {}, "ScheduleStatus": { "Next": "9999-12-31T00:00:00+00:00" }, "IsPastDue": false } },
        "Metadata": {}
    });
    let r = w.h.invoke_timer(&payload).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("0 due"), "{}", r.body);
    assert_eq!(w.peer.refresh_grants().await, 0);
}

// ----- [3/7] a cold instance ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_instance_prefetches_the_issuers_keys_without_delaying_readiness() {
    let issuer = Issuer::start().await;
    let h = HandlerBuilder::new().envs(issuer.settings()).start().await;
    assert!(h.logs.wait_for_line(|l| l.contains("prefetch done")).is_some(), "{}", h.logs.all());
    assert_eq!(issuer.jwks_requests.load(std::sync::atomic::Ordering::SeqCst), 1, "loaded once, before any request");
    let r = h.json(Method::GET, "/api/connections", Some(&issuer.token()), &Value::Null).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(issuer.jwks_requests.load(std::sync::atomic::Ordering::SeqCst), 1, "the first request fetched nothing");
}

// ----- 7. honest health and logs ---------------------------------------------------------

#[tokio::test]
async fn caller_mistakes_are_warnings_on_stdout_with_their_problem_named() {
    let issuer = Issuer::start().await;
    let h = HandlerBuilder::new().envs(issuer.settings()).start().await;
    let good = issuer.token();
    for _ in 0..10 {
        let r = h
            .forward(
                Method::POST,
                "/api/connections",
                &[("Authorization", &format!("Bearer {good}")), ("Content-Type", "application/json")],
                Some(b"{not json".to_vec()),
            )
            .await;
        r.assert_problem(400, "malformed-json");
        h.json(Method::GET, "/api/connections", Some("not-a-jwt"), &Value::Null)
            .await
            .assert_problem(401, "unauthorized");
        h.get("/api/oauth/callback?state=dc1.AAAA.BBBB&code=x", &[]).await.assert_html(400);
    }
    let line = h.logs.wait_for_line(|l| l.contains("problem=\"state-tampered\"")).unwrap_or_else(|| h.logs.all());
    assert!(line.contains("WARN"), "{line}");
    assert!(h.logs.wait_for_line(|l| l.contains("problem=\"malformed-json\"")).is_some(), "{}", h.logs.all());
    assert!(h.logs.wait_for_line(|l| l.contains("problem=\"unauthorized\"")).is_some(), "{}", h.logs.all());
    assert!(h.logs.stderr().is_empty(), "caller mistakes wrote to stderr: {:?}", h.logs.stderr());
}
