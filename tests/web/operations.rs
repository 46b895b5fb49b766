//! Operations (issue [7/7]): JSON log lines, signed status-change events, key rotation to
//! the end (`handler reseal`) under a refresh storm, and importing a connection from
//! another token keeper.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::Sha256;
use support::flow::{Setup, world};

#[tokio::test]
async fn json_log_lines_parse_and_carry_no_secret() {
    let w =
        world(Setup { env: vec![("LOG_FORMAT", "json".into()), ("LOG_LEVEL", "debug".into())], ..Default::default() })
            .await;
    w.connect("json-logs").await;
    let token = w.access_token("json-logs").await;
    // The callback's request line has arrived once some line names its route.
    let seen_route = w.h.logs.wait_for_line(|l| l.contains("/api/oauth/callback"));
    assert!(seen_route.is_some(), "{}", w.h.logs.all());
    let logs = w.h.logs.all();
    let mut lines = 0;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{line}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "every line has a message: {line}");
        lines += 1;
    }
    assert!(lines > 5, "{logs}");
    let mut secrets = w.peer.issued_tokens().await;
    secrets.extend(w.seen.lock().unwrap().iter().cloned());
    secrets.push(token);
    secrets.push(w.bearer.clone());
    for s in secrets {
        assert!(!logs.contains(&s), "a secret reached the logs: {s}");
    }
}

/// One delivery: the signature header, the event id header, the raw body.
type Delivery = (String, String, Vec<u8>);

/// A receiver of the handler's webhook: every request's signature header, event id and
/// raw body, in arrival order.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Delivery>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        use warp::Filter;
        let got: Arc<Mutex<Vec<Delivery>>> = Default::default();
        let sink = got.clone();
        let route = warp::post()
            .and(warp::header::<String>("x-dc-signature"))
            .and(warp::header::<String>("x-dc-event-id"))
            .and(warp::body::bytes())
            .map(move |sig: String, id: String, body: bytes::Bytes| {
                sink.lock().unwrap().push((sig, id, body.to_vec()));
                warp::reply()
            });
        let (base, tx) = support::serve(route).await;
        Receiver { url: format!("{base}/hook"), got, _stop: tx }
    }

    async fn wait_for(&self, n: usize) -> Vec<Delivery> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.got.lock().unwrap().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.got.lock().unwrap().clone()
    }
}

/// What a receiver does: the MAC over `t.body` with the shared key, a timestamp no older
/// than five minutes, and an id it has not seen before.
fn verify(key: &[u8], header: &str, body: &[u8], now: i64, seen: &mut Vec<String>) -> Result<Value, &'static str> {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = x.parse::<i64>().ok(),
            Some(("v1", x)) => v1 = Some(x.to_string()),
            _ => {}
        }
    }
    let (t, v1) = (t.ok_or("no t")?, v1.ok_or("no v1")?);
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    if expected != v1 {
        return Err("bad signature");
    }
    if (now - t).abs() > 300 {
        return Err("stale");
    }
    let event: Value = serde_json::from_slice(body).map_err(|_| "not JSON")?;
    let id = event["id"].as_str().ok_or("no id")?.to_string();
    if seen.contains(&id) {
        return Err("replayed");
    }
    seen.push(id);
    Ok(event)
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_grant_sends_exactly_one_signed_needs_reauth_event() {
    let receiver = Receiver::start().await;
    let key = "a-webhook-signing-key-shared-with-the-flow";
    let w = world(Setup {
        env: vec![("WEBHOOK_URL", receiver.url.clone()), ("WEBHOOK_SIGNING_KEY", key.into())],
        ..Default::default()
    })
    .await;
    w.connect("hooked").await;
    w.peer
        .faults(json!({ "token_endpoint": { "status": 400, "count": 1, "body": { "error": "invalid_grant", "error_description": "revoked by the user" } } }))
        .await;
    let r = w.token("hooked", true).await;
    assert_eq!(r.status, 409, "{}", r.body);
    // Twice more: the connection is already needs_reauth, so no further event.
    assert_eq!(w.token("hooked", true).await.status, 409);
    assert_eq!(w.token("hooked", false).await.status, 409);

    let got = receiver.wait_for(2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_after = receiver.got.lock().unwrap().clone();
    assert_eq!(got_after.len(), 2, "active, then needs_reauth, and nothing else: {got_after:?}");
    let now = support::seed::now();
    let mut seen = Vec::new();
    let events: Vec<Value> =
        got.iter().map(|(sig, _, body)| verify(key.as_bytes(), sig, body, now, &mut seen).unwrap()).collect();
    assert_eq!(events[0]["status"], "active");
    assert_eq!(events[0]["previous_status"], "pending");
    let reauth = &events[1];
    assert_eq!(reauth["type"], "connection.status_changed");
    assert_eq!(reauth["connection_id"], "hooked");
    assert_eq!(reauth["status"], "needs_reauth");
    assert_eq!(reauth["previous_status"], "active");
    assert!(reauth["detail"].as_str().unwrap().contains("revoked by the user"), "{reauth}");
    assert_eq!(got[1].1, reauth["id"].as_str().unwrap(), "the id header names the body's event");
    // The same request delivered again is told apart; so is a body someone changed.
    let (sig, _, body) = &got[1];
    assert_eq!(verify(key.as_bytes(), sig, body, now, &mut seen), Err("replayed"));
    let mut forged = body.clone();
    forged.extend_from_slice(b" ");
    assert_eq!(verify(key.as_bytes(), sig, &forged, now, &mut Vec::new()), Err("bad signature"));
    assert_eq!(verify(key.as_bytes(), sig, body, now + 3600, &mut Vec::new()), Err("stale"));
    assert_eq!(verify(b"another key", sig, body, now, &mut Vec::new()), Err("bad signature"));

    // A refused import: the caller is told it does not exist, and nobody hears of it.
    let refused = w
        .api(
            Method::POST,
            "/api/connections/import",
            json!({ "provider": "test", "connection_id": "junk", "refresh_token": "junk" }),
        )
        .await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    // A marker event after it: the next event the receiver gets is the marker's.
    let gone = w.api(Method::DELETE, "/api/connections/hooked?skip_revocation=true", Value::Null).await;
    assert_eq!(gone.status, 200, "{}", gone.body);
    let got = receiver.wait_for(3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = receiver.got.lock().unwrap().clone().split_off(2.min(got.len()));
    let tail: Vec<Value> = got.iter().map(|(_, _, b)| serde_json::from_slice(b).unwrap()).collect();
    let said: Vec<(&str, &str)> =
        tail.iter().map(|e| (e["connection_id"].as_str().unwrap(), e["status"].as_str().unwrap())).collect();
    assert_eq!(said, [("hooked", "deleted")], "nothing about the refused import");
}

#[tokio::test(flavor = "multi_thread")]
async fn reseal_moves_every_record_to_the_current_key_during_a_refresh_storm() {
    use dynamics_companion::support::crypto::Keyring;
    let old = Keyring::generate_spec("k1");
    let new = Keyring::generate_spec("k2");
    let w = world(Setup { env: vec![("TOKEN_ENCRYPTION_KEYS", old.clone())], ..Default::default() }).await;
    let ids: Vec<String> = (0..12).map(|i| format!("rot-{i:02}")).collect();
    for id in &ids {
        w.connect(id).await;
    }
    let db = w.h.root.join(".data/companion.db");
    let under = |key: &str| -> i64 {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.query_row("SELECT COUNT(*) FROM connections WHERE tokens LIKE ?1", [format!("v1.{key}.%")], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(under("k1"), 12);

    // Dropping k1 now would lose every token: an instance configured so refuses to start,
    // saying which key, how much it seals and what to do.
    let (code, _, err) = support::HandlerBuilder::sharing(&w.h).env("TOKEN_ENCRYPTION_KEYS", &new).run_to_exit();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("TOKEN_ENCRYPTION_KEYS") && err.contains("key k1 (12 sealed values)"), "{err}");
    assert!(err.contains("handler reseal") && !err.contains(new.split(':').nth(1).unwrap()), "{err}");

    // Rotation: every instance now has k2 first and k1 still listed.
    let rotated = format!("{new},{old}");
    let h2 = support::HandlerBuilder::sharing(&w.h).env("TOKEN_ENCRYPTION_KEYS", &rotated).start().await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = {
        let (stop, base, bearer, ids) = (stop.clone(), h2.base.clone(), w.bearer.clone(), ids.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut ok = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let calls = ids.iter().map(|id| {
                    http.post(format!("{base}/api/connections/{id}/token"))
                        .bearer_auth(&bearer)
                        .json(&json!({ "force_refresh": true }))
                        .send()
                });
                for r in futures_util::future::join_all(calls).await {
                    let r = r.unwrap();
                    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
                    ok += 1;
                }
            }
            ok
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, out, err) =
        support::HandlerBuilder::sharing(&w.h).env("TOKEN_ENCRYPTION_KEYS", &rotated).args(&["reseal"]).run_to_exit();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let refreshed = storm.await.unwrap();
    assert!(refreshed >= 12, "the storm ran: {refreshed}");
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("12 connections scanned") && out.contains("still under an older key: none"), "{out}");
    assert_eq!(under("k1"), 0, "nothing left under the old key");
    assert_eq!(under("k2"), 12);
    // An instance that did not run the pass reads the count from the store.
    let health = h2.get("/api/health", &[("Authorization", &format!("Bearer {}", w.bearer))]).await.json();
    assert_eq!(health["dependencies"]["encryption"]["records_under_older_keys"], json!({}), "{health}");

    // The old key can go: an instance that knows only k2 serves every connection.
    let h3 = support::HandlerBuilder::sharing(&w.h).env("TOKEN_ENCRYPTION_KEYS", &new).start().await;
    for id in &ids {
        let r = h3.json(Method::POST, &format!("/api/connections/{id}/token"), Some(&w.bearer), &json!({})).await;
        assert_eq!(r.status, 200, "{id}: {}", r.body);
    }
    let health = h3.get("/api/health", &[("Authorization", &format!("Bearer {}", w.bearer))]).await.json();
    assert_eq!(health["dependencies"]["encryption"]["current_key_id"], "k2");
}

#[tokio::test]
async fn an_imported_refresh_token_is_verified_then_served() {
    let w = world(Setup::default()).await;
    // Another keeper's connection: here, one of ours, whose refresh token we take over.
    w.connect("elsewhere").await;
    let rt = w.peer.issued_refresh_tokens().await.pop().expect("a refresh token was issued");
    let gone = w.api(Method::DELETE, "/api/connections/elsewhere?skip_revocation=true", Value::Null).await;
    assert_eq!(gone.status, 200, "{}", gone.body);

    let r = w
        .api(
            Method::POST,
            "/api/connections/import",
            json!({ "provider": "test", "connection_id": "moved", "owner": "account:42", "refresh_token": rt }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["status"], "active");
    assert!(!r.body.contains(&rt), "no token in the answer");
    let before = w.peer.refresh_grants().await;
    let token = w.access_token("moved").await;
    assert!(w.peer.is_active(&token).await, "the token is the provider's");
    assert_eq!(w.peer.refresh_grants().await, before, "verified once, at import; then served from the cache");

    // A refresh token the provider refuses: 422, and nothing is kept.
    let refused = w
        .api(
            Method::POST,
            "/api/connections/import",
            json!({ "provider": "test", "connection_id": "junk", "refresh_token": "not-a-real-refresh-token" }),
        )
        .await;
    refused.assert_problem(422, "import-refused");
    assert_eq!(w.api(Method::GET, "/api/connections/junk", Value::Null).await.status, 404);
    // Bad input is a 400 and creates nothing either.
    let empty =
        w.api(Method::POST, "/api/connections/import", json!({ "provider": "test", "refresh_token": "" })).await;
    empty.assert_problem(400, "invalid-imported-tokens");
    let unknown =
        w.api(Method::POST, "/api/connections/import", json!({ "provider": "nope", "refresh_token": "x" })).await;
    unknown.assert_problem(400, "unknown-provider");
    let dup = w
        .api(
            Method::POST,
            "/api/connections/import",
            json!({ "provider": "test", "connection_id": "moved", "refresh_token": "x" }),
        )
        .await;
    assert_eq!(dup.status, 409, "{}", dup.body);

    // An expiry outside any sane range (i64::MIN wrapped into a year-292-billion token):
    // refused, nothing created. Text that is not a date-time: said what is expected.
    for expires_at in [json!(i64::MIN), json!(i64::MAX), json!(-1), json!("next tuesday")] {
        let r = w
            .api(
                Method::POST,
                "/api/connections/import",
                json!({ "provider": "test", "connection_id": "bad-expiry", "refresh_token": "x",
                        "access_token": "caller-access-token", "expires_at": expires_at }),
            )
            .await;
        let p = r.assert_problem(400, "invalid-imported-tokens");
        assert!(p["detail"].as_str().unwrap().contains("expires_at"), "{p}");
    }
    assert_eq!(w.api(Method::GET, "/api/connections/bad-expiry", Value::Null).await.status, 404);

    // The provider cannot be reached while the import verifies it: the record stays (the
    // provider may have rotated the token already), but the caller's own access token is
    // never served, and the record is due for the timer at once.
    w.connect("elsewhere-2").await;
    let rt = w.peer.issued_refresh_tokens().await.pop().unwrap();
    w.api(Method::DELETE, "/api/connections/elsewhere-2?skip_revocation=true", Value::Null).await;
    w.peer.faults(json!({ "token_endpoint": { "status": 503, "count": 1 } })).await;
    let r = w
        .api(
            Method::POST,
            "/api/connections/import",
            json!({ "provider": "test", "connection_id": "unverified", "refresh_token": rt,
                    "access_token": "caller-access-token", "expires_at": "2030-01-01T00:00:00Z" }),
        )
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    let token = w.api(Method::POST, "/api/connections/unverified/token", json!({})).await;
    assert!(!token.body.contains("caller-access-token"), "the imported token is not served: {}", token.body);
    let db = rusqlite::Connection::open(w.h.root.join(".data/companion.db")).unwrap();
    let (expires, refreshed): (i64, Option<i64>) = db
        .query_row("SELECT access_expires_at, refreshed_at FROM connections WHERE id = 'unverified'", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert!(expires <= support::seed::now() && refreshed.is_none(), "due at once: expires {expires}");
    // Once the provider answers, the next refresh verifies it and serves the provider's token.
    let token = w.token("unverified", true).await;
    assert_eq!(token.status, 200, "{}", token.body);
    assert!(w.peer.is_active(token.json()["access_token"].as_str().unwrap()).await);
}

#[tokio::test]
async fn health_gives_a_back_office_caller_the_operators_counters() {
    let w = world(Setup::default()).await;
    w.connect("fine").await;
    w.connect("broken").await;
    w.peer
        .faults(json!({ "token_endpoint": { "status": 400, "count": 1, "body": { "error": "invalid_grant" } } }))
        .await;
    assert_eq!(w.token("broken", true).await.status, 409);
    assert_eq!(w.token("fine", true).await.status, 200);

    // A probe without credentials sees no counts; a bad token is refused.
    let anonymous = w.h.get("/api/health", &[]).await;
    assert_eq!(anonymous.status, 200);
    assert!(anonymous.json().get("connections").is_none(), "{}", anonymous.body);
    assert!(anonymous.json().get("dependencies").is_none(), "liveness only: {}", anonymous.body);
    let forged = format!("Bearer {}", w.issuer.forged());
    assert_eq!(w.h.get("/api/health", &[("Authorization", &forged)]).await.status, 401);

    let bearer = format!("Bearer {}", w.bearer);
    let health = w.h.get("/api/health", &[("Authorization", &bearer)]).await;
    assert_eq!(health.status, 200, "{}", health.body);
    let c = &health.json()["connections"];
    assert_eq!(c["by_status"]["active"], 1, "{c}");
    assert_eq!(c["by_status"]["needs_reauth"], 1, "{c}");
    assert_eq!(c["in_backoff"], 0);
    assert!(c["oldest_token_age_seconds"].as_i64().is_some_and(|a| (0..60).contains(&a)), "{c}");
    assert_eq!(c["refreshes_last_hour"]["granted"], 1, "{c}");
    assert_eq!(c["refreshes_last_hour"]["failed"], 1, "{c}");
    assert!(!health.body.contains("fine") && !health.body.contains("broken"), "no connection named");
}

/// A receiver that answers 503 to events of the connections in `refused`, and to every
/// event while `down`; it records what it accepted.
struct Picky {
    url: String,
    accepted: Arc<Mutex<Vec<(Value, Instant)>>>,
    refused: Arc<Mutex<Vec<String>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Picky {
    async fn start() -> Picky {
        use warp::Filter;
        let accepted: Arc<Mutex<Vec<(Value, Instant)>>> = Default::default();
        let refused: Arc<Mutex<Vec<String>>> = Default::default();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (a, r, d) = (accepted.clone(), refused.clone(), down.clone());
        let route = warp::post().and(warp::body::bytes()).map(move |body: bytes::Bytes| {
            let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let id = event["connection_id"].as_str().unwrap_or("").to_string();
            if d.load(std::sync::atomic::Ordering::SeqCst) || r.lock().unwrap().contains(&id) {
                return warp::http::StatusCode::SERVICE_UNAVAILABLE;
            }
            a.lock().unwrap().push((event, Instant::now()));
            warp::http::StatusCode::OK
        });
        let (base, tx) = support::serve(route).await;
        Picky { url: format!("{base}/hook"), accepted, refused, down, _stop: tx }
    }

    fn statuses_of(&self, id: &str) -> Vec<String> {
        let got = self.accepted.lock().unwrap();
        got.iter()
            .filter(|(e, _)| e["connection_id"] == id)
            .map(|(e, _)| e["status"].as_str().unwrap().to_string())
            .collect()
    }

    async fn wait_for(&self, id: &str, status: &str, within: Duration) -> Instant {
        let deadline = Instant::now() + within;
        loop {
            if let Some((_, at)) =
                self.accepted.lock().unwrap().iter().find(|(e, _)| e["connection_id"] == id && e["status"] == status)
            {
                return *at;
            }
            assert!(Instant::now() < deadline, "{id} {status} not delivered: {:?}", self.accepted.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Issue [4/7]: an event the receiver keeps refusing holds back only its own connection's
/// later events (their order is kept), not another connection's; when the receiver comes
/// back after an outage, what waited arrives within seconds; each event names its tenant
/// and a sequence that grows per connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_event_does_not_hold_back_the_others() {
    let receiver = Picky::start().await;
    let w = world(Setup {
        env: vec![("WEBHOOK_URL", receiver.url.clone()), ("WEBHOOK_SIGNING_KEY", "k".repeat(32))],
        ..Default::default()
    })
    .await;
    receiver.refused.lock().unwrap().push("stuck".into());
    w.connect("stuck").await;
    let t0 = Instant::now();
    w.connect("free").await;
    let at = receiver.wait_for("free", "active", Duration::from_secs(5)).await;
    assert!(at - t0 < Duration::from_secs(3), "free waited {:?} behind stuck", at - t0);
    assert!(receiver.statuses_of("stuck").is_empty());

    // stuck's later event waits behind its first (order kept); once the receiver takes
    // stuck again, both arrive, in order.
    let r = w.api(Method::DELETE, "/api/connections/stuck?skip_revocation=true", Value::Null).await;
    assert_eq!(r.status, 200, "{}", r.body);
    receiver.refused.lock().unwrap().clear();
    // A success elsewhere wakes the waiting retries: free's deletion is that success.
    let r = w.api(Method::DELETE, "/api/connections/free?skip_revocation=true", Value::Null).await;
    assert_eq!(r.status, 200, "{}", r.body);
    receiver.wait_for("stuck", "deleted", Duration::from_secs(10)).await;
    assert_eq!(receiver.statuses_of("stuck"), ["active", "deleted"]);

    // An outage of the receiver: events wait; when it is back, they arrive within seconds.
    receiver.down.store(true, std::sync::atomic::Ordering::SeqCst);
    for id in ["o1", "o2", "o3"] {
        w.connect(id).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await; // a few failed attempts each
    receiver.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let back = Instant::now();
    for id in ["o1", "o2", "o3"] {
        let at = receiver.wait_for(id, "active", Duration::from_secs(15)).await;
        assert!(at.saturating_duration_since(back) < Duration::from_secs(10), "{id} arrived {:?} after", at - back);
    }
    let got = receiver.accepted.lock().unwrap().clone();
    for (e, _) in &got {
        assert!(e.get("tenant").is_some_and(Value::is_null), "the deployment's own connection: {e}");
        assert!(e["sequence"].as_u64().unwrap() > 0, "{e}");
    }
    let seq: Vec<u64> = got
        .iter()
        .filter(|(e, _)| e["connection_id"] == "stuck")
        .map(|(e, _)| e["sequence"].as_u64().unwrap())
        .collect();
    assert!(seq.windows(2).all(|w| w[0] < w[1]), "{seq:?}");
}

/// Issue [7/7]: every use of a credential leaves exactly one audit event naming who did
/// it: the authorization (the callback), a token handed out, a forced refresh (the
/// caller's), a proxied call, the timer's refresh, an import and a deletion with
/// revocation. No token in any of them.
#[tokio::test(flavor = "multi_thread")]
async fn every_use_of_a_credential_leaves_one_audit_event() {
    let w = world(Setup {
        env: vec![("LOG_FORMAT", "json".into()), ("REFRESH_MARGIN_SECONDS", "300".into())],
        peer: json!({ "access_token_ttl": 120 }),
        ..Default::default()
    })
    .await;
    w.connect("audited").await;
    let r = w.token("audited", false).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The connection shows who used it: the caller's app, not "a caller".
    let deadline = Instant::now() + Duration::from_secs(5);
    let shown = loop {
        let c = w.api(Method::GET, "/api/connections/audited", Value::Null).await;
        if !c.json()["last_used_by"].is_null() || Instant::now() > deadline {
            break c.json();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(shown["last_used_by"], format!("app {}", support::issuer::CLIENT_ID), "{shown}");
    let r = w.token("audited", true).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let bearer = format!("Bearer {}", w.bearer);
    let proxied =
        w.h.forward(Method::GET, "/api/connections/audited/proxy/items", &[("Authorization", &bearer)], None).await;
    assert_eq!(proxied.status, 200, "{}", proxied.body);
    let timer = w.h.invoke_timer(&support::timer_payload(false)).await;
    assert_eq!(timer.status, 200, "{}", timer.body);
    let r = w.api(Method::DELETE, "/api/connections/audited", Value::Null).await;
    assert_eq!(r.status, 200, "{}", r.body);

    let deadline = Instant::now() + Duration::from_secs(5);
    let audit = loop {
        let lines: Vec<Value> =
            w.h.logs
                .all()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v["target"] == "audit")
                .collect();
        if lines.iter().any(|v| v["action"] == "revocation") || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let said: Vec<(String, String)> = audit
        .iter()
        .map(|v| (v["action"].as_str().unwrap_or("").to_string(), v["actor"].as_str().unwrap_or("").to_string()))
        .collect();
    let app = support::issuer::CLIENT_ID;
    let expect = [
        ("authorization", "callback"),
        ("token_handed_out", ""),
        ("refresh", ""),
        ("token_handed_out", ""),
        ("proxied_call", ""),
        ("refresh", "timer"),
        ("revocation", ""),
    ];
    assert_eq!(said, expect.map(|(a, k)| (a.to_string(), k.to_string())), "{audit:#?}");
    for v in &audit {
        assert_eq!(v["connection"], "audited", "{v}");
        assert_eq!(v["provider"], "test", "{v}");
        if v["actor"] == "" {
            assert_eq!(v["app_id"], app, "the caller's app id: {v}");
            assert_eq!(v["who"], format!("app {app}"), "{v}");
        }
        assert_eq!(v["message"], "audit", "{v}");
    }
    let mut secrets = w.peer.issued_tokens().await;
    secrets.push(w.bearer.clone());
    let logs = w.h.logs.all();
    for s in secrets {
        assert!(!logs.contains(&s), "a secret reached the logs");
    }
}
