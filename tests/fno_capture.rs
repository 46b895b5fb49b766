//! Capture mode towards Finance & Operations: the callback for a state Dynamics issued is
//! kept once and POSTed to an F&O custom service or data entity with an Entra token
//! (client secret at the Entra double over TLS); when F&O is down, nothing is lost and
//! the timer delivers it later.

mod support;

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

    // It comes back: the timer delivers what was pending.
    fno.fail_next(503, 0);
    let r = h.invoke_timer(&support::timer_payload(false)).await;
    assert!(r.json()["Logs"].to_string().contains("1 delivered to F&O"), "{}", r.body);
    let got = fno.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].2["capture"]["Code"], "fo-code-2");
    assert!(captures(&h, &bearer, "fo-state-2").await[0]["delivered_at"].is_string());
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
    let got = fno.received();
    assert_eq!(got.len(), 1, "delivered after the 429: {got:?}");
    assert_eq!(got[0].0, "/data/DCOAuthCaptures");
    assert_eq!(got[0].2["Error"], "access_denied");
    assert_eq!(got[0].2["ErrorDescription"], "User declined");
    assert_eq!(got[0].2["dataAreaId"], "usmf");
    assert_eq!(got[0].2["Code"], Value::Null);
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
