//! Multi-tenant onboarding by admin consent: the link, Entra's answers (consent, refusal,
//! forged), confirmation by a federated-credential token from the customer's tenant, and
//! off-boarding. Entra and the managed identity are the doubles in tests/peers/azure.mjs.

use crate::support;

use reqwest::Method;
use serde_json::{Value, json};
use support::azure::{AzureDoubles, TENANT};
use support::issuer::Issuer;
use support::{Handler, HandlerBuilder};

const PUBLIC: &str = "http://localhost:7071";
const APP: &str = "6a7b8c9d-0e1f-4a2b-9c3d-4e5f6a7b8c9d";
const UAMI: &str = "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9";
const UAMI_OBJECT: &str = "9e8d7c6b-5a49-4382-9170-6f5e4d3c2b1a";
const OTHER_UAMI: &str = "2a3b4c5d-6e7f-4081-9293-a4b5c6d7e8f9";
const TENANT_A: &str = "aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa";
const TENANT_B: &str = "bbbbbbbb-2222-4222-8222-bbbbbbbbbbbb";
const TENANT_C: &str = "cccccccc-3333-4333-8333-cccccccccccc";

fn doubles() -> AzureDoubles {
    doubles_with(json!({}))
}

fn doubles_with(extra: Value) -> AzureDoubles {
    let mut config = json!({
        "tenants": [TENANT_A, TENANT_B, TENANT_C],
        "user_assigned": [
            { "client_id": UAMI, "object_id": UAMI_OBJECT },
            { "client_id": OTHER_UAMI },
        ],
        "multitenant_apps": [{
            "client_id": APP,
            "redirect_uris": [format!("{PUBLIC}/api/oauth/consent"), format!("{PUBLIC}/api/oauth/onboard")],
            "federated_credentials": [{
                "issuer": format!("https://login.microsoftonline.com/{TENANT}/v2.0"),
                "subject": UAMI_OBJECT,
                "audience": "api://AzureADTokenExchange",
            }],
        }],
    });
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    AzureDoubles::start(config)
}

async fn handler(azure: &AzureDoubles, issuer: &Issuer, identity: &str) -> Handler {
    handler_waiting(azure, issuer, identity, 3).await
}

/// With `MULTITENANT_CONSENT_WAIT_SECONDS` at `wait`.
async fn handler_waiting(azure: &AzureDoubles, issuer: &Issuer, identity: &str, wait: u32) -> Handler {
    let mut b = HandlerBuilder::new()
        .env("MULTITENANT_CONSENT_WAIT_SECONDS", &wait.to_string())
        .env("PUBLIC_BASE_URL", PUBLIC)
        .env("MULTITENANT_APP_ID", APP)
        .env("MULTITENANT_MI_CLIENT_ID", identity)
        .env("AZURE_AUTHORITY_HOST", azure.authority_host())
        .env("IDENTITY_ENDPOINT", &azure.identity)
        .env("IDENTITY_HEADER", "test-identity-header")
        .env("SSL_CERT_FILE", &azure.ca);
    for (k, v) in issuer.settings() {
        b = b.env(k, v);
    }
    b.start().await
}

/// Starts onboarding; returns the consent link.
async fn start(h: &Handler, bearer: &str, tenant: &str) -> String {
    let r = h.json(Method::POST, "/api/tenants", Some(bearer), &json!({ "tenant_id": tenant })).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["tenant"]["status"], "consent_pending");
    r.json()["consent_url"].as_str().unwrap().to_string()
}

/// Plays the administrator's browser at Entra: returns where Entra redirects, as a path
/// and query on the handler.
async fn at_entra(azure: &AzureDoubles, link: &str) -> String {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&azure.ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let r = http.get(link).send().await.unwrap();
    assert_eq!(r.status(), 302, "{}", r.text().await.unwrap_or_default());
    let location = r.headers()["location"].to_str().unwrap().to_string();
    location.strip_prefix(PUBLIC).unwrap_or_else(|| panic!("Entra sent the admin elsewhere: {location}")).to_string()
}

async fn tenant(h: &Handler, bearer: &str, id: &str) -> support::Reply {
    h.json(Method::GET, &format!("/api/tenants/{id}"), Some(bearer), &Value::Null).await
}

fn state_of(link: &str) -> String {
    url::Url::parse(link).unwrap().query_pairs().find(|(k, _)| k == "state").unwrap().1.into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_consent_are_confirmed_by_a_token_and_forged_answers_are_refused() {
    let azure = doubles();
    let issuer = Issuer::start().await;
    let h = handler(&azure, &issuer, UAMI).await;
    let bearer = issuer.token();

    // The link points at the customer's tenant, with our app, scope, redirect and state.
    let link_a = start(&h, &bearer, TENANT_A).await;
    let url = url::Url::parse(&link_a).unwrap();
    assert_eq!(url.path(), format!("/{TENANT_A}/v2.0/adminconsent"));
    let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(q["client_id"], APP);
    assert_eq!(q["redirect_uri"], format!("{PUBLIC}/api/oauth/consent"));
    assert!(q["scope"].ends_with("/.default"), "{q:?}");

    // A forged answer naming another tenant with A's state: refused, nothing changes.
    let forged = format!("/api/oauth/consent?admin_consent=True&tenant={TENANT_C}&state={}", state_of(&link_a));
    let r = h.get(&forged, &[("Accept", "text/html")]).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("another tenant"), "{}", r.body);
    assert_eq!(tenant(&h, &bearer, TENANT_A).await.json()["status"], "consent_pending");

    // An answer typed by hand for a tenant that never consented (its own valid state):
    // Entra has no service principal there, so no token, so no consent.
    let link_c = start(&h, &bearer, TENANT_C).await;
    let typed = format!("/api/oauth/consent?admin_consent=True&tenant={TENANT_C}&state={}", state_of(&link_c));
    let r = h.get(&typed, &[("Accept", "text/html")]).await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("AADSTS7000229"), "{}", r.body);
    let c = tenant(&h, &bearer, TENANT_C).await.json();
    assert_eq!(c["status"], "failed", "{c}");
    // Entra's own code and words, as its error body gives them (its description's first
    // line; the trace lines after `\r\n` are not kept).
    let detail = c["status_detail"].as_str().unwrap();
    assert!(
        detail.contains("invalid_client: AADSTS7000229: The client application")
            && detail.contains("is missing service principal in the tenant")
            && !detail.contains("Trace ID"),
        "{c}"
    );

    // The administrator of A consents at Entra: confirmed by a token from tenant A.
    let answer = at_entra(&azure, &link_a).await;
    let r = h.get(&answer, &[("Accept", "text/html")]).await;
    r.assert_html(200);
    assert!(r.body.contains("Consent recorded"), "{}", r.body);
    let a = tenant(&h, &bearer, TENANT_A).await.json();
    assert_eq!(a["status"], "consented", "{a}");
    assert!(a["consented_at"].is_string(), "{a}");
    assert_eq!(a["started_by"], support::issuer::CLIENT_ID);

    // The same answer again: the state was used.
    let r = h.get(&answer, &[("Accept", "text/html")]).await;
    assert_eq!(r.status, 400, "{}", r.body);

    // B's administrator declines first: Entra's error answer (with admin_consent=True).
    azure.control(Method::POST, "consent_decisions", Some(json!({ TENANT_B: "decline" }))).await;
    let link_b = start(&h, &bearer, TENANT_B).await;
    let answer = at_entra(&azure, &link_b).await;
    assert!(answer.contains("admin_consent=True") && answer.contains("error=consent_required"), "{answer}");
    let r = h.get(&answer, &[("Accept", "text/html")]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("AADSTS65004"), "{}", r.body);
    let b = tenant(&h, &bearer, TENANT_B).await.json();
    assert_eq!(b["status"], "failed", "{b}");
    // ... and then consents through a new link.
    azure.control(Method::POST, "consent_decisions", Some(json!({ TENANT_B: "approve" }))).await;
    let link_b = start(&h, &bearer, TENANT_B).await;
    h.get(&at_entra(&azure, &link_b).await, &[("Accept", "text/html")]).await.assert_html(200);
    assert_eq!(tenant(&h, &bearer, TENANT_B).await.json()["status"], "consented");

    // The confirmations were client-credential tokens with the managed identity's token
    // as the assertion (the federated credential), from each customer's tenant.
    let stats = azure.stats().await;
    assert!(stats["entra"]["tokens_by_client"][APP].as_u64().unwrap_or(0) >= 2, "{stats}");
    assert!(
        stats["identity"]["by_resource"]["api://azureadtokenexchange"].as_u64().unwrap_or(0) >= 1,
        "{}",
        stats["identity"]
    );

    // Off-boarding C leaves A and B as they were.
    let list = h.json(Method::GET, "/api/tenants", Some(&bearer), &Value::Null).await.json();
    assert_eq!(list["tenants"].as_array().unwrap().len(), 3, "{list}");
    let r = h.json(Method::DELETE, &format!("/api/tenants/{TENANT_C}"), Some(&bearer), &Value::Null).await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(tenant(&h, &bearer, TENANT_C).await.status, 404);
    assert_eq!(tenant(&h, &bearer, TENANT_A).await.json()["status"], "consented");
    assert_eq!(tenant(&h, &bearer, TENANT_B).await.json()["status"], "consented");
}

/// Entra replicates the app's service principal into the customer's tenant after consent;
/// until then its token endpoint answers AADSTS7000229. A consent whose service principal
/// appears 5 s late is confirmed within the default 30 s wait.
#[tokio::test(flavor = "multi_thread")]
async fn a_consent_whose_service_principal_replicates_late_is_confirmed() {
    let azure = doubles_with(json!({ "service_principal_delay_ms": 5000 }));
    let issuer = Issuer::start().await;
    let h = handler_waiting(&azure, &issuer, UAMI, 30).await;
    let bearer = issuer.token();
    let link = start(&h, &bearer, TENANT_A).await;
    let answer = at_entra(&azure, &link).await;
    let t0 = std::time::Instant::now();
    let r = h.get(&answer, &[("Accept", "text/html")]).await;
    r.assert_html(200);
    assert!(t0.elapsed() >= std::time::Duration::from_secs(4), "it waited for the replication: {:?}", t0.elapsed());
    assert_eq!(tenant(&h, &bearer, TENANT_A).await.json()["status"], "consented");
    let stats = azure.stats().await;
    let refused = stats["entra"]["errors"]["invalid_client/AADSTS7000229"].as_u64().unwrap_or(0);
    assert!(refused >= 2, "Entra refused while replicating: {stats}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identity_that_is_not_the_apps_federated_credential_cannot_confirm_consent() {
    let azure = doubles();
    let issuer = Issuer::start().await;
    let h = handler(&azure, &issuer, OTHER_UAMI).await;
    let bearer = issuer.token();
    let link = start(&h, &bearer, TENANT_A).await;
    let r = h.get(&at_entra(&azure, &link).await, &[("Accept", "text/html")]).await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("AADSTS700213"), "the subject is not the federated one: {}", r.body);
    assert_eq!(tenant(&h, &bearer, TENANT_A).await.json()["status"], "failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_clear_and_a_single_tenant_deployment_has_no_tenants_api() {
    let azure = doubles();
    let issuer = Issuer::start().await;
    let h = handler(&azure, &issuer, UAMI).await;
    let bearer = issuer.token();
    let r = h.json(Method::POST, "/api/tenants", Some(&bearer), &json!({ "tenant_id": "contoso.com" })).await;
    r.assert_problem(400, "invalid-tenant");
    let r = h.json(Method::POST, "/api/tenants", Some(&bearer), &json!({ "tenant_id": TENANT_A, "org": "x" })).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = h.get("/api/oauth/consent?admin_consent=True", &[("Accept", "text/html")]).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = h.get("/api/oauth/consent?state=a&state=b", &[("Accept", "text/html")]).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(h.json(Method::POST, "/api/tenants", None, &json!({ "tenant_id": TENANT_A })).await.status, 401);

    let single = HandlerBuilder::new().envs(issuer.settings()).start().await;
    let r = single.json(Method::GET, "/api/tenants", Some(&bearer), &Value::Null).await;
    r.assert_problem(503, "tenants-not-configured");
}

/// A customer organisation (a Dataverse double) with the product's tables, checking
/// tokens as Dataverse does; without the app's application user until `add_application_user`.
async fn organisation() -> support::dataverse::DataverseDouble {
    use dynamics_companion::clients::dataverse::Dataverse;
    use dynamics_companion::clients::dataverse::provision::{CORE_TABLES, Schema, provision};
    let dv = support::dataverse::DataverseDouble::with_config(json!({ "key_activation_ms": 20 }));
    let client = Dataverse::new(
        &url::Url::parse(&dv.url).unwrap(),
        reqwest::Client::new(),
        std::sync::Arc::new(dynamics_companion::clients::azure::StaticToken("admin".to_string().into())),
        None,
    );
    provision(&client, &Schema::new("dc"), &CORE_TABLES, std::time::Duration::from_secs(30)).await.unwrap();
    dv.enforce_application_users(true).await;
    dv
}

#[tokio::test(flavor = "multi_thread")]
async fn each_tenants_callers_reach_only_their_own_organisations_connections() {
    use support::oidc::{CLIENT_SECRET, OidcPeer};
    let azure = doubles();
    let issuer = Issuer::start().await;
    let (org_a, org_b) = (organisation().await, organisation().await);
    let peer = OidcPeer::start(&format!("{PUBLIC}/api/oauth/callback"), json!({ "access_token_ttl": 120 }));
    let mut b = HandlerBuilder::new()
        .file("providers.toml", &peer.catalog("test", ""))
        .env("TEST_PROVIDER_SECRET", CLIENT_SECRET)
        .env("REFRESH_MARGIN_SECONDS", "300")
        .env("MULTITENANT_RECHECK_SECONDS", "1")
        .env("DATAVERSE_MAX_CONCURRENCY", "4")
        .env("PUBLIC_BASE_URL", PUBLIC)
        .env("MULTITENANT_APP_ID", APP)
        .env("MULTITENANT_MI_CLIENT_ID", UAMI)
        .env("AZURE_AUTHORITY_HOST", azure.authority_host())
        .env("IDENTITY_ENDPOINT", &azure.identity)
        .env("IDENTITY_HEADER", "test-identity-header")
        .env("SSL_CERT_FILE", &azure.ca);
    for (k, v) in issuer.settings() {
        b = b.env(k, v);
    }
    let h = b.start().await;
    let operator = issuer.token();

    // Onboard A and B: consent, then the check finds the application user missing, then
    // (once an administrator added it) onboarded.
    for (tenant, org) in [(TENANT_A, &org_a), (TENANT_B, &org_b)] {
        let r = h
            .json(Method::POST, "/api/tenants", Some(&operator), &json!({ "tenant_id": tenant, "org_url": org.url }))
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        let link = r.json()["consent_url"].as_str().unwrap().to_string();
        h.get(&at_entra(&azure, &link).await, &[("Accept", "text/html")]).await.assert_html(200);
        let check = h.json(Method::POST, &format!("/api/tenants/{tenant}/check"), Some(&operator), &json!({})).await;
        assert_eq!(check.status, 200, "{}", check.body);
        assert_eq!(check.json()["status"], "consented", "{}", check.body);
        assert!(check.json()["status_detail"].as_str().unwrap().contains("0x80072560"), "{}", check.body);
        // The administrator adds the application user but forgets its role: Dataverse
        // refuses a user without any role (0x80042F09), and the check says so.
        let user = org.add_application_user_without_role(APP).await;
        let check = h.json(Method::POST, &format!("/api/tenants/{tenant}/check"), Some(&operator), &json!({})).await;
        assert_eq!(check.json()["status"], "consented", "{}", check.body);
        assert!(check.json()["status_detail"].as_str().unwrap().contains("0x80042F09"), "{}", check.body);
        org.make_system_administrator(&user).await;
        let check = h.json(Method::POST, &format!("/api/tenants/{tenant}/check"), Some(&operator), &json!({})).await;
        assert_eq!(check.json()["status"], "onboarded", "{}", check.body);
    }

    // Each tenant's caller starts a connection; it completes in that tenant's organisation.
    let (caller_a, caller_b) = (issuer.token_in_tenant(TENANT_A), issuer.token_in_tenant(TENANT_B));
    for (caller, id) in [(&caller_a, "erp-a"), (&caller_b, "erp-b")] {
        let r = h
            .json(Method::POST, "/api/connections", Some(caller), &json!({ "provider": "test", "connection_id": id }))
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        let location = peer.consent(r.json()["authorization_url"].as_str().unwrap(), false).await;
        h.get(location.strip_prefix(PUBLIC).unwrap(), &[("Accept", "text/html")]).await.assert_html(200);
    }
    let names =
        |rows: Vec<Value>| rows.iter().filter_map(|r| r["dc_name"].as_str().map(str::to_string)).collect::<Vec<_>>();
    assert_eq!(names(org_a.rows("dc_connections").await), ["erp-a"]);
    assert_eq!(names(org_b.rows("dc_connections").await), ["erp-b"]);

    // Nobody reaches another tenant's connection: 404, as for any connection not theirs.
    let get = |caller: &str, id: &str| {
        let (h, caller, path) = (&h, caller.to_string(), format!("/api/connections/{id}"));
        async move { h.json(Method::GET, &path, Some(&caller), &Value::Null).await }
    };
    assert_eq!(get(&caller_a, "erp-a").await.json()["status"], "active");
    assert_eq!(get(&caller_a, "erp-b").await.status, 404);
    assert_eq!(get(&caller_b, "erp-a").await.status, 404);
    assert_eq!(get(&operator, "erp-a").await.status, 404, "the deployment's own store does not have it either");
    let token = h.json(Method::POST, "/api/connections/erp-a/token", Some(&caller_a), &json!({})).await;
    assert_eq!(token.status, 200, "{}", token.body);

    // DATAVERSE_MAX_CONCURRENCY holds for a customer's organisation too (the deployment's
    // own store is SQLite here): 24 callers at once, each read answered after 40 ms.
    org_a.reset().await;
    org_a.faults(json!({ "rate": 0.0, "delay_ms": 40 })).await;
    let ids: Vec<String> = (0..24).map(|i| format!("missing-{i}")).collect();
    let reads: Vec<_> = futures_util::future::join_all(ids.iter().map(|id| get(&caller_a, id))).await;
    assert!(reads.iter().all(|r| r.status == 404), "{:?}", reads.iter().map(|r| r.status).collect::<Vec<_>>());
    let stats = org_a.stats().await;
    let peak = stats["peak_in_flight"].as_u64().unwrap();
    assert_eq!(peak, 4, "4 in flight at most, and the limit reached: {stats}");
    org_a.faults(json!({ "rate": 0.0 })).await;

    // The operator asks A's administrator to consent again, who cancels: A stays served,
    // and the refusal is on its record.
    azure.control(Method::POST, "consent_decisions", Some(json!({ TENANT_A: "decline" }))).await;
    let r = h.json(Method::POST, "/api/tenants", Some(&operator), &json!({ "tenant_id": TENANT_A })).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let link = r.json()["consent_url"].as_str().unwrap().to_string();
    let r = h.get(&at_entra(&azure, &link).await, &[("Accept", "text/html")]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let a = h.json(Method::GET, &format!("/api/tenants/{TENANT_A}"), Some(&operator), &Value::Null).await.json();
    assert_eq!(a["status"], "onboarded", "{a}");
    assert!(a["status_detail"].as_str().unwrap().contains("consent was not given"), "{a}");
    let token = h.json(Method::POST, "/api/connections/erp-a/token", Some(&caller_a), &json!({})).await;
    assert_eq!(token.status, 200, "{}", token.body);
    azure.control(Method::POST, "consent_decisions", Some(json!({ TENANT_A: "approve" }))).await;

    // A customer's token sees what a probe sees in health: the census is the operator's.
    let health = h.json(Method::GET, "/api/health", Some(&caller_a), &Value::Null).await;
    assert_eq!(health.status, 200, "{}", health.body);
    assert!(
        health.json().get("connections").is_none() && health.json().get("dependencies").is_none(),
        "{}",
        health.body
    );
    let health = h.json(Method::GET, "/api/health", Some(&operator), &Value::Null).await;
    assert!(health.json()["connections"]["by_status"].is_object(), "{}", health.body);

    // A tenant that is not onboarded, and a customer trying to manage tenants: refused.
    let r = h.json(Method::GET, "/api/connections", Some(&issuer.token_in_tenant(TENANT_C)), &Value::Null).await;
    r.assert_problem(403, "tenant-not-onboarded");
    let r = h.json(Method::GET, "/api/tenants", Some(&caller_a), &Value::Null).await;
    r.assert_problem(403, "operator-only");

    // The timer refreshes in both organisations (the tokens live 120 s, the margin is 300 s).
    let r = h.invoke_timer(&support::timer_payload(false)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let logs = r.json()["Logs"].to_string();
    for tenant in [TENANT_A, TENANT_B] {
        assert!(logs.contains(&format!("tenant {tenant}: refresh: 1 due, 1 refreshed")), "{logs}");
    }

    // Service-protection limits count per organisation: A answering 429 with Retry-After
    // pauses A's requests, not B's.
    org_a.faults(json!({ "rate": 1.0, "statuses": [429], "retry_after_seconds": 2, "count": 1 })).await;
    let t0 = std::time::Instant::now();
    let force = json!({ "force_refresh": true });
    let (ra, rb) = tokio::join!(
        async { (h.json(Method::POST, "/api/connections/erp-a/token", Some(&caller_a), &force).await, t0.elapsed()) },
        async {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            (h.json(Method::POST, "/api/connections/erp-b/token", Some(&caller_b), &force).await, t0.elapsed())
        },
    );
    assert_eq!((ra.0.status, rb.0.status), (200, 200), "{} {}", ra.0.body, rb.0.body);
    assert!(ra.1 >= std::time::Duration::from_secs(2), "A waited out its Retry-After: {:?}", ra.1);
    assert!(rb.1 < ra.1, "B did not wait for A's pause: A {:?}, B {:?}", ra.1, rb.1);
    assert_eq!(org_a.stats().await["faults_by_status"]["429"], 1);

    // A's administrator disables the app's application user: A's callers get a 503 that
    // names the cause and the fix (never a 500), the timer reports A in health, a check
    // suspends A, and once the user is enabled again a check serves A again.
    org_a.set_application_user_disabled(APP, true).await;
    let r = h.json(Method::POST, "/api/connections/erp-a/token", Some(&caller_a), &force).await;
    r.assert_problem(503, "organisation-refuses-app");
    assert!(r.body.contains("0x80040225") && r.body.contains("/check"), "{}", r.body);
    assert!(!r.body.contains("eyJ"), "no token in the problem: {}", r.body);
    let run = h.invoke_timer(&support::timer_payload(false)).await;
    assert_eq!(run.status, 200, "{}", run.body);
    let health = h.json(Method::GET, "/api/health", Some(&operator), &Value::Null).await.json();
    let failing = health["timer"]["tenants_failing"][TENANT_A].as_str().unwrap_or_else(|| panic!("{health}"));
    assert!(failing.contains("0x80040225"), "{health}");
    assert!(health["timer"]["tenants_failing"].get(TENANT_B).is_none(), "B is fine: {health}");
    let check = h.json(Method::POST, &format!("/api/tenants/{TENANT_A}/check"), Some(&operator), &json!({})).await;
    assert_eq!(check.json()["status"], "suspended", "{}", check.body);
    assert!(check.json()["status_detail"].as_str().unwrap().contains("0x80040225"), "{}", check.body);
    let r = get(&caller_a, "erp-a").await;
    r.assert_problem(503, "tenant-suspended");
    assert!(r.body.contains("0x80040225"), "{}", r.body);
    assert_eq!(get(&caller_b, "erp-b").await.status, 200, "B is served throughout");
    org_a.set_application_user_disabled(APP, false).await;
    let check = h.json(Method::POST, &format!("/api/tenants/{TENANT_A}/check"), Some(&operator), &json!({})).await;
    assert_eq!(check.json()["status"], "onboarded", "{}", check.body);
    assert!(check.json()["status_detail"].is_null(), "{}", check.body);
    assert_eq!(get(&caller_a, "erp-a").await.status, 200);

    // Key rotation covers every organisation: with k2 first, `handler reseal` seals A's and
    // B's rows again in their own organisations, and then k1 can go.
    let k1 = h.env["TOKEN_ENCRYPTION_KEYS"].clone();
    let k2 = support::test_keys().replace("t1:", "t2:");
    let rotated = format!("{k2},{k1}");
    let (code, out, err) =
        HandlerBuilder::sharing(&h).env("TOKEN_ENCRYPTION_KEYS", &rotated).args(&["reseal"]).run_to_exit();
    assert_eq!(code, Some(0), "{out}{err}");
    for tenant in [TENANT_A, TENANT_B] {
        assert!(
            out.contains(&format!("tenant {tenant}: reseal: 1 connections scanned, 1 sealed again with t2")),
            "{out}"
        );
    }
    assert!(out.contains("links: "), "open consent links are named: {out}");
    let only_k2 = HandlerBuilder::sharing(&h).env("TOKEN_ENCRYPTION_KEYS", &k2).start().await;
    let r = only_k2.json(Method::POST, "/api/connections/erp-a/token", Some(&caller_a), &json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Off-boarding B: its callers are refused, A's carry on, B's rows stay B's.
    let r = h.json(Method::DELETE, &format!("/api/tenants/{TENANT_B}"), Some(&operator), &Value::Null).await;
    assert_eq!(r.status, 204, "{}", r.body);
    get(&caller_b, "erp-b").await.assert_problem(403, "tenant-not-onboarded");
    assert_eq!(get(&caller_a, "erp-a").await.status, 200);
    assert_eq!(names(org_b.rows("dc_connections").await), ["erp-b"]);

    // Off-boarding A on another instance (same store) reaches this one once its record is
    // read again (MULTITENANT_RECHECK_SECONDS, 1 s here).
    let other = HandlerBuilder::sharing(&h).start().await;
    let r = other.json(Method::DELETE, &format!("/api/tenants/{TENANT_A}"), Some(&operator), &Value::Null).await;
    assert_eq!(r.status, 204, "{}", r.body);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    get(&caller_a, "erp-a").await.assert_problem(403, "tenant-not-onboarded");
}

/// The `href` of the page's one link.
fn link_in(page: &str) -> String {
    let at = page.find("<a href=\"").expect("the page has a link") + 9;
    let end = page[at..].find('"').unwrap();
    page[at..at + end].replace("&amp;", "&")
}

/// The README's three ways to name the organisation on the link: not at all (the only
/// environment the administrator reaches), its environment URL, or its Web API URL. The
/// Discovery Service lists each environment with both (`Url`, `ApiUrl`); here the
/// organisation double answers on both of its names (`localhost` and `127.0.0.1`).
#[tokio::test(flavor = "multi_thread")]
async fn the_administrators_sign_in_sets_the_environment_up_once() {
    let cases: [fn(&str, &str) -> Option<String>; 3] =
        [|_, _| None, |url, _| Some(url.to_string()), |_, api| Some(api.to_string())];
    for named in cases {
        onboard_by_link(named).await;
    }
}

async fn onboard_by_link(named: fn(&str, &str) -> Option<String>) {
    // An empty organisation that checks tokens as Dataverse does.
    let org = support::dataverse::DataverseDouble::with_config(json!({ "key_activation_ms": 20 }));
    org.enforce_application_users(true).await;
    let api_url = org.url.trim_end_matches('/').to_string();
    let env_url = api_url.replace("127.0.0.1", "localhost");
    let instance = json!({ "Url": env_url, "ApiUrl": api_url, "FriendlyName": "Contoso" });
    let azure = doubles_with(json!({ "instances": { TENANT_A: [instance] } }));
    let issuer = Issuer::start().await;
    let mut b = HandlerBuilder::new()
        .env("PUBLIC_BASE_URL", PUBLIC)
        .env("MULTITENANT_APP_ID", APP)
        .env("MULTITENANT_MI_CLIENT_ID", UAMI)
        .env("MULTITENANT_DISCOVERY_URL", &azure.discovery)
        .env("AZURE_AUTHORITY_HOST", azure.authority_host())
        .env("IDENTITY_ENDPOINT", &azure.identity)
        .env("IDENTITY_HEADER", "test-identity-header")
        .env("SSL_CERT_FILE", &azure.ca);
    for (k, v) in issuer.settings() {
        b = b.env(k, v);
    }
    let h = b.start().await;
    let operator = issuer.token();

    // One link for the administrator: consent, then the page's link to sign in.
    let r = h
        .json(
            Method::POST,
            "/api/tenants",
            Some(&operator),
            &json!({ "tenant_id": TENANT_A, "org_url": named(&env_url, &api_url) }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["tenant"]["org_url"].as_str(), named(&env_url, &api_url).as_deref());
    let link = r.json()["consent_url"].as_str().unwrap().to_string();
    let consented = h.get(&at_entra(&azure, &link).await, &[("Accept", "text/html")]).await;
    consented.assert_html(200);
    let sign_in = link_in(&consented.body);
    let q: std::collections::HashMap<_, _> = url::Url::parse(&sign_in).unwrap().query_pairs().into_owned().collect();
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["redirect_uri"], format!("{PUBLIC}/api/oauth/onboard"));
    assert!(q["scope"].contains("globaldisco.crm.dynamics.com/user_impersonation"), "{q:?}");

    // Signed in: the environment is found and set up with the administrator's token.
    let done = h.get(&at_entra(&azure, &sign_in).await, &[("Accept", "text/html")]).await;
    done.assert_html(200);
    assert!(done.body.contains("is set up"), "{}", done.body);
    let t = tenant(&h, &operator, TENANT_A).await.json();
    assert_eq!(t["status"], "onboarded", "{t}");
    assert_eq!(t["org_url"], env_url, "the environment URL is kept");
    let tables = org.tables().await;
    assert!(tables["dc_connection"].is_object(), "the tables were created");
    assert!(tables.get("dc_tenant").is_none(), "a customer's organisation has no tenants table: {tables}");
    let roles = org.rows("roles").await;
    let role = roles.iter().find(|r| r["name"] == "Dynamics Companion").expect("the role was created");
    let users = org.rows("systemusers").await;
    assert!(users.iter().any(|u| u["applicationid"].as_str() == Some(APP) && u["accessmode"] == 4), "{users:?}");
    let stats = org.stats().await;
    assert_eq!(stats["role_privilege_writes"], 1, "{stats}");
    assert!(role["businessunitid"].is_string(), "{role}");
    // Exactly the product's tables (six verbs each, organisation-wide) and the baseline reads.
    let mut held = org.role_privileges(role["roleid"].as_str().unwrap()).await;
    held.sort();
    let mut want: Vec<(String, String)> = ["dc_Connection", "dc_Capture", "dc_Expectation"]
        .iter()
        .flat_map(|t| {
            ["Create", "Read", "Write", "Delete", "Append", "AppendTo"]
                .map(|v| (format!("prv{v}{t}"), "Global".to_string()))
        })
        .chain([
            ("prvReadOrganization".to_string(), "Global".to_string()),
            ("prvReadUser".to_string(), "Local".to_string()),
            ("prvReadBusinessUnit".to_string(), "Local".to_string()),
        ])
        .collect();
    want.sort();
    assert_eq!(held, want);

    // The same again (a new link): nothing is written.
    let writes = |s: &Value| {
        ["POST", "PATCH", "PUT", "DELETE"].iter().map(|m| s["by_method"][m].as_u64().unwrap_or(0)).sum::<u64>()
    };
    let before = writes(&stats);
    let r = h.json(Method::POST, &format!("/api/tenants/{TENANT_A}/onboard"), Some(&operator), &json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let again =
        h.get(&at_entra(&azure, r.json()["onboarding_url"].as_str().unwrap()).await, &[("Accept", "text/html")]).await;
    again.assert_html(200);
    assert!(again.body.contains("nothing needed changing"), "{}", again.body);
    assert_eq!(writes(&org.stats().await), before, "a second onboarding writes nothing");

    // The sign-in's answer cannot be replayed.
    let replay = h.get(&at_entra(&azure, &sign_in).await, &[("Accept", "text/html")]).await;
    assert_eq!(replay.status, 400, "{}", replay.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn handler_onboard_sets_an_organisation_up_from_a_terminal_once() {
    let azure = AzureDoubles::start(json!({}));
    let org = support::dataverse::DataverseDouble::with_config(json!({ "key_activation_ms": 20 }));
    let run = || {
        let mut b = HandlerBuilder::new().args(&["onboard", "--org", &org.url, "--app-id", APP]);
        // Stands for the administrator's sign-in (`az login`): an identity the organisation
        // lets in, through AZURE_CREDENTIAL as on an operator's terminal.
        for (k, v) in azure.dataverse_client_secret_settings() {
            b = b.env(&k.replace("DATAVERSE_", "AZURE_"), v);
        }
        b.run_to_exit()
    };
    let (code, out, err) = run();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("created role \"Dynamics Companion\"") && out.contains("created the application user"),
        "{out}"
    );
    assert!(out.contains("Done:"), "{out}");
    let users = org.rows("systemusers").await;
    assert!(users.iter().any(|u| u["applicationid"].as_str() == Some(APP)), "{users:?}");
    let (code, out, err) = run();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("Nothing to do"), "{out}");

    let (code, _, err) = HandlerBuilder::new().args(&["onboard", "--org", &org.url]).run_to_exit();
    assert_eq!(code, Some(1));
    assert!(err.contains("--app-id or set MULTITENANT_APP_ID"), "{err}");
}

/// A self-signed certificate and its key, as PEM (openssl, which the doubles use too).
fn certificate(dir: &std::path::Path, name: &str) -> (String, String) {
    let (key, cert) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.crt")));
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=dynamics-companion-test"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (std::fs::read_to_string(key).unwrap(), std::fs::read_to_string(cert).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_of_the_app_confirms_consent_and_another_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let (key, cert) = certificate(dir.path(), "app");
    let (other_key, other_cert) = certificate(dir.path(), "other");
    let azure = AzureDoubles::start(json!({
        "tenants": [TENANT_A],
        "multitenant_apps": [{
            "client_id": APP,
            "redirect_uris": [format!("{PUBLIC}/api/oauth/consent"), format!("{PUBLIC}/api/oauth/onboard")],
            "certificates": [cert],
        }],
    }));
    let issuer = Issuer::start().await;
    let run = |pem: String| {
        let (azure, issuer) = (&azure, &issuer);
        async move {
            let mut b = HandlerBuilder::new()
                .env("PUBLIC_BASE_URL", PUBLIC)
                .env("MULTITENANT_APP_ID", APP)
                .env("MULTITENANT_CREDENTIAL", "certificate")
                // The secret `multitenant-certificate`, from the settings (Key Vault in Azure).
                .env("MULTITENANT_CERTIFICATE", pem)
                .env("AZURE_AUTHORITY_HOST", azure.authority_host())
                .env("SSL_CERT_FILE", &azure.ca);
            for (k, v) in issuer.settings() {
                b = b.env(k, v);
            }
            let h = b.start().await;
            let link = start(&h, &issuer.token(), TENANT_A).await;
            h.get(&at_entra(azure, &link).await, &[("Accept", "text/html")]).await
        }
    };
    let ok = run(format!("{key}{cert}")).await;
    ok.assert_html(200);
    assert!(ok.body.contains("Consent recorded"), "{}", ok.body);
    let refused = run(format!("{other_key}{other_cert}")).await;
    assert_eq!(refused.status, 502, "{}", refused.body);
    assert!(refused.body.contains("AADSTS700027"), "{}", refused.body);
}
