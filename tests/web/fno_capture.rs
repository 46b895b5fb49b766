//! Capture mode towards Finance & Operations: the callback for a state Dynamics issued is
//! kept once and POSTed to an F&O custom service or data entity with an Entra token
//! (client secret at the Entra double over TLS); when F&O is down, nothing is lost and
//! the timer delivers it later.

use crate::support;

use reqwest::Method;
use serde_json::{Value, json};
use support::azure::{AzureDoubles, DATAVERSE_APP, DATAVERSE_APP_SECRET, TENANT};
use support::fno::FnoDouble;
use support::issuer::Issuer;
use support::{Handler, HandlerBuilder};

async fn handler(
    azure: &AzureDoubles,
    fno: &FnoDouble,
    issuer: &Issuer,
    path: &str,
    extra: &[(&str, &str)],
) -> Handler {
    let mut b = HandlerBuilder::new()
        .env("CAPTURE_MODE", "fno")
        .env("FNO_URL", &fno.url)
        .env("FNO_CAPTURE_PATH", path)
        .env("FNO_CREDENTIAL", "client_secret")
        .env("FNO_TENANT_ID", TENANT)
        .env("FNO_CLIENT_ID", DATAVERSE_APP)
        .env("FNO_CLIENT_SECRET", DATAVERSE_APP_SECRET)
        .env("SSL_CERT_FILE", &azure.ca)
        .env("AZURE_AUTHORITY_HOST", azure.authority_host());
    for (k, v) in issuer.settings() {
        b = b.env(k, v);
    }
    for (k, v) in extra {
        b = b.env(k, *v);
    }
    b.start().await
}

async fn captures(h: &Handler, bearer: &str, state: &str) -> Vec<Value> {
    let r = h.json(Method::GET, &format!("/api/captures?state={state}"), Some(bearer), &Value::Null).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["captures"].as_array().cloned().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_reach_an_fno_custom_service_once_and_survive_an_outage() {
    let azure = AzureDoubles::start(json!({}));
    let fno = FnoDouble::start().await;
    let issuer = Issuer::start().await;
    let path = "/api/services/DCOAuthServices/DCOAuthCaptureService/capture";
    let h = handler(&azure, &fno, &issuer, path, &[]).await;
    let bearer = issuer.token();

    for state in ["fo-state-1", "fo-state-2"] {
        h.expect_state(&bearer, state).await;
    }
    let cb = "/api/oauth/callback?code=fo-code-1&state=fo-state-1&iss=https%3A%2F%2Ferp.example";
    h.get(cb, &[]).await.assert_html(200);
    h.get(cb, &[]).await.assert_html(200);
    let got = fno.received();
    assert_eq!(got.len(), 1, "one delivery for one code: {got:?}");
    let (p, token, body) = &got[0];
    assert_eq!(p, path);
    assert_eq!(body["capture"]["Code"], "fo-code-1");
    assert_eq!(body["capture"]["State"], "fo-state-1");
    assert_eq!(body["capture"]["Issuer"], "https://erp.example");
    assert!(azure.tokens_for(&fno.url).await.contains(token), "a token Entra issued for the F&O environment");

    // F&O is down: the person still gets the page, the capture is kept as pending.
    fno.fail_next(503, 1000);
    h.get("/api/oauth/callback?code=fo-code-2&state=fo-state-2", &[]).await.assert_html(200);
    assert_eq!(fno.received().len(), 1);
    let pending = captures(&h, &bearer, "fo-state-2").await;
    assert_eq!(pending[0]["code"], "fo-code-2");
    assert_eq!(pending[0]["delivered_at"], Value::Null);

    // It comes back: after the capture's next-attempt time (5 s after a failure with no
    // Retry-After), the timer delivers what was pending.
    fno.fail_next(503, 0);
    tokio::time::sleep(std::time::Duration::from_millis(5200)).await;
    let r = h.invoke_timer(&support::timer_payload(false)).await;
    assert!(r.json()["Logs"].to_string().contains("1 delivered to F&O"), "{}", r.body);
    let got = fno.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].2["capture"]["Code"], "fo-code-2");
    assert!(captures(&h, &bearer, "fo-state-2").await[0]["delivered_at"].is_string());
    // Each body carries the capture's id, for an X++ receiver to drop a repeat.
    let ids: Vec<&str> = got.iter().map(|g| g.2["capture"]["CaptureId"].as_str().unwrap()).collect();
    assert!(ids[0].len() == 64 && ids[0] != ids[1], "{ids:?}");
    let logs = h.logs.all();
    assert!(!logs.contains("fo-code-1") && !logs.contains("fo-code-2"), "codes never reach the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_reach_an_fno_data_entity_through_throttling() {
    let azure = AzureDoubles::start(json!({}));
    let fno = FnoDouble::start().await;
    let issuer = Issuer::start().await;
    let h = handler(&azure, &fno, &issuer, "/data/DCOAuthCaptures", &[("FNO_DATA_AREA_ID", "usmf")]).await;
    h.expect_state(&issuer.token(), "fo-state-3").await;
    fno.fail_next(429, 1);
    h.get("/api/oauth/callback?error=access_denied&error_description=User+declined&state=fo-state-3", &[])
        .await
        .assert_html(200);
    assert_eq!(fno.received().len(), 0, "throttled, with Retry-After: 1");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = h.invoke_timer(&support::timer_payload(false)).await;
    assert!(r.json()["Logs"].to_string().contains("1 delivered to F&O"), "{}", r.body);
    let got = fno.received();
    assert_eq!(got.len(), 1, "delivered after the 429: {got:?}");
    assert_eq!(got[0].0, "/data/DCOAuthCaptures");
    assert_eq!(got[0].2["Error"], "access_denied");
    assert_eq!(got[0].2["ErrorDescription"], "User declined");
    assert_eq!(got[0].2["dataAreaId"], "usmf");
    assert_eq!(got[0].2["Code"], Value::Null);
    assert!(got[0].2["CaptureId"].is_string());
}

/// Two instances on one store, F&O taking 2.5 s per answer: the callback delivers on one
/// while both run their timers every 200 ms. Each capture reaches F&O exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_capture_reaches_fno_once_under_concurrent_callbacks_and_timers() {
    let azure = AzureDoubles::start(json!({}));
    let fno = FnoDouble::start().await;
    let issuer = Issuer::start().await;
    let path = "/data/DCOAuthCaptures";
    let a = handler(&azure, &fno, &issuer, path, &[("UPSTREAM_TIMEOUT_SECONDS", "10")]).await;
    let b = HandlerBuilder::sharing(&a).start().await;
    let bearer = issuer.token();
    let states: Vec<String> = (0..3).map(|i| format!("fo-once-{i}")).collect();
    for s in &states {
        a.expect_state(&bearer, s).await;
    }
    fno.delay(std::time::Duration::from_millis(2500));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let timers = {
        let (stop, a_base, b_base) = (stop.clone(), a.base.clone(), b.base.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let payload = support::timer_payload(false);
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for base in [&a_base, &b_base] {
                    let r = http.post(format!("{base}/refresh")).json(&payload).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    runs += 1;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            runs
        })
    };
    let started = std::time::Instant::now();
    let pages = futures_util::future::join_all(
        states.iter().map(|s| a.get_owned(format!("/api/oauth/callback?code=code-{s}&state={s}"))),
    )
    .await;
    for p in &pages {
        p.assert_html(200);
    }
    assert!(started.elapsed() < std::time::Duration::from_millis(2700), "the person waited {:?}", started.elapsed());
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let runs = timers.await.unwrap();
    assert!(runs >= 10, "the timers ran meanwhile: {runs}");
    let got = fno.received();
    let mut ids: Vec<&str> = got.iter().map(|g| g.2["CaptureId"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((got.len(), ids.len()), (3, 3), "each capture once: {got:?}");
    for s in &states {
        assert!(captures(&a, &bearer, s).await[0]["delivered_at"].is_string());
    }
}

/// F&O answers 429 with Retry-After: 3. Nothing is sent to it for 3 s: not the next
/// capture's delivery, not a timer run's; then both are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_every_delivery_for_its_retry_after() {
    let azure = AzureDoubles::start(json!({}));
    let fno = FnoDouble::start().await;
    let issuer = Issuer::start().await;
    let h = handler(&azure, &fno, &issuer, "/data/DCOAuthCaptures", &[]).await;
    let bearer = issuer.token();
    for s in ["fo-pause-1", "fo-pause-2"] {
        h.expect_state(&bearer, s).await;
    }
    fno.fail_next_with(429, 1, Some(3));
    let t0 = std::time::Instant::now();
    h.get("/api/oauth/callback?code=c1&state=fo-pause-1", &[]).await.assert_html(200);
    h.get("/api/oauth/callback?code=c2&state=fo-pause-2", &[]).await.assert_html(200);
    let r = h.invoke_timer(&support::timer_payload(false)).await;
    assert!(r.json()["Logs"].to_string().contains("0 delivered to F&O, 2 still pending"), "{}", r.body);
    let arrivals = fno.arrivals();
    assert_eq!(arrivals.len(), 1, "only the request that drew the 429: {arrivals:?}");
    let window_start = arrivals[0].0;
    tokio::time::sleep(
        std::time::Duration::from_secs(3).saturating_sub(t0.elapsed()) + std::time::Duration::from_millis(200),
    )
    .await;
    let r = h.invoke_timer(&support::timer_payload(false)).await;
    assert!(r.json()["Logs"].to_string().contains("2 delivered to F&O"), "{}", r.body);
    let arrivals = fno.arrivals();
    assert_eq!(arrivals.len(), 3, "{arrivals:?}");
    for (at, _) in &arrivals[1..] {
        assert!(at.duration_since(window_start) >= std::time::Duration::from_secs(3), "sent inside the window");
    }
}

/// Whatever F&O does, the person's page answers within about 2 s; with F&O hanging, a
/// timer run with a dozen captures pending ends within its budget, having tried a few.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_waits_on_a_hanging_fno() {
    let azure = AzureDoubles::start(json!({}));
    let fno = FnoDouble::start().await;
    let issuer = Issuer::start().await;
    let h = handler(&azure, &fno, &issuer, "/data/DCOAuthCaptures", &[("UPSTREAM_TIMEOUT_SECONDS", "3")]).await;
    let bearer = issuer.token();
    let states: Vec<String> = (0..12).map(|i| format!("fo-hang-{i}")).collect();
    for s in &states {
        h.expect_state(&bearer, s).await;
    }
    fno.delay(std::time::Duration::from_secs(30));
    let t0 = std::time::Instant::now();
    h.get("/api/oauth/callback?code=c0&state=fo-hang-0", &[]).await.assert_html(200);
    let waited = t0.elapsed();
    assert!(waited < std::time::Duration::from_millis(2600), "the page took {waited:?}");
    // F&O refuses quickly for the others (down), so they pile up pending.
    fno.delay(std::time::Duration::ZERO);
    fno.fail_next_with(503, 100, None);
    for s in &states[1..] {
        h.get(&format!("/api/oauth/callback?code=c-{s}&state={s}"), &[]).await.assert_html(200);
    }
    // Then it hangs again, once every capture's next attempt is due.
    tokio::time::sleep(std::time::Duration::from_millis(5500)).await;
    fno.delay(std::time::Duration::from_secs(30));
    let before = fno.started();
    let t1 = std::time::Instant::now();
    let r = h.invoke_timer(&support::timer_payload(false)).await;
    let took = t1.elapsed();
    assert_eq!(r.status, 200);
    assert!(took < std::time::Duration::from_secs(5), "the run took {took:?}: {}", r.body);
    assert!(r.json()["Logs"].to_string().contains("0 delivered to F&O, 12 still pending"), "{}", r.body);
    // It tried a few at once, saw F&O failing and started no more.
    let tried = fno.started() - before;
    assert!((1..=4).contains(&tried), "{tried} deliveries tried");
}

#[test]
fn a_bad_fno_path_stops_start_up() {
    let (code, _, stderr) = HandlerBuilder::new()
        .env("CAPTURE_MODE", "fno")
        .env("FNO_URL", "https://env.operations.dynamics.com")
        .env("FNO_CAPTURE_PATH", "/services/Capture")
        .run_to_exit();
    assert_eq!(code, Some(1));
    assert!(stderr.contains("FNO_CAPTURE_PATH") && stderr.lines().count() == 1, "{stderr}");
}
