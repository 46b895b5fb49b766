//! The portal companion over HTTP: portal users verified with the Power Pages site's key,
//! their contact read from Dataverse with our S2S identity, their own connections only,
//! the proxy allow-list, and CORS answered by the handler. (What only a browser decides
//! is in portal_browser.rs.)

use crate::support;

use reqwest::Method;
use serde_json::{Value, json};
use support::azure::AzureDoubles;
use support::dataverse::DataverseDouble;
use support::oidc::{CLIENT_SECRET, OidcPeer};
use support::portal::{CLIENT_ID, CONTACT_A, CONTACT_B, PortalDouble};
use support::{Handler, HandlerBuilder, Reply};

const PUBLIC: &str = "http://localhost:7071";
const CALLBACK: &str = "http://localhost:7071/api/oauth/callback";
const PORTAL_SECTION: &str =
    "[providers.test.portal]\nenabled = true\nproxy = [{ methods = [\"GET\"], paths = [\"items\", \"items/*\"] }]\n";

pub struct World {
    pub portal: PortalDouble,
    pub dataverse: DataverseDouble,
    pub azure: AzureDoubles,
    pub peer: OidcPeer,
    pub h: Handler,
}

async fn world(extra: &[(&str, &str)]) -> World {
    let portal = PortalDouble::start().await;
    let dataverse = DataverseDouble::with_config(json!({
        "tables": [{
            "logical_name": "contact", "entity_set": "contacts", "primary_id": "contactid", "primary_name": "fullname",
            "columns": ["firstname", "lastname", "emailaddress1"]
        }, {
            // Power Pages' external identities: which sign-in (provider, subject) is which contact.
            "logical_name": "adx_externalidentity", "entity_set": "adx_externalidentities",
            "primary_id": "adx_externalidentityid", "primary_name": "adx_username",
            "columns": ["adx_identityprovidername", { "name": "adx_contactid", "type": "lookup", "target": "contact" }]
        }]
    }));
    dataverse_seed(&dataverse).await;
    let azure = AzureDoubles::start(json!({}));
    let peer = OidcPeer::start(CALLBACK, json!({}));
    let mut b = HandlerBuilder::new()
        .file("providers.toml", &peer.catalog("test", PORTAL_SECTION))
        .env("PUBLIC_BASE_URL", PUBLIC)
        .env("TEST_PROVIDER_SECRET", CLIENT_SECRET)
        .env("PORTAL_URL", &portal.url)
        .env("PORTAL_CLIENT_ID", CLIENT_ID)
        .env("DATAVERSE_URL", &dataverse.url);
    for (k, v) in azure.dataverse_client_secret_settings() {
        b = b.env(k, v);
    }
    for (k, v) in extra {
        b = b.env(k, *v);
    }
    let h = b.start().await;
    World { portal, dataverse, azure, peer, h }
}

async fn dataverse_seed(dv: &DataverseDouble) {
    let rows = json!({ "rows": [
        { "contactid": CONTACT_A, "fullname": "Ada Lovelace", "firstname": "Ada", "lastname": "Lovelace", "emailaddress1": "ada@example.com" },
        { "contactid": CONTACT_B, "fullname": "Charles Babbage", "firstname": "Charles", "lastname": "Babbage", "emailaddress1": "charles@example.com" }
    ]});
    reqwest::Client::new().post(format!("{}/__control/tables/contacts", dv.url)).json(&rows).send().await.unwrap();
}

impl World {
    async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Reply {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Origin", self.portal.url.as_str()), ("Content-Type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        self.h.forward(method, path, &headers, body.map(|b| serde_json::to_vec(&b).unwrap())).await
    }

    /// A contact connects the test provider as the portal page does: registers the hash
    /// of its secret, binds the popup with the secret (which sets the cookie), and the
    /// person consents at the provider in that same browser.
    async fn connect(&self, contact: &str) -> (String, Reply) {
        let token = self.portal.token(contact);
        let (secret, hash) = support::portal::binding();
        let body = json!({ "provider": "test", "binding": hash });
        let r = self.call(Method::POST, "/api/portal/connections", Some(&token), Some(body)).await;
        assert_eq!(r.status, 201, "{}", r.body);
        let started = r.json();
        let auth_url = started["authorization_url"].as_str().unwrap();
        let origin = self.portal.url.trim_end_matches('/');
        let bind_url = started["bind_url"].as_str().unwrap();
        let cookie = support::portal::bind(&self.h, bind_url, &secret, auth_url, origin).await;
        let location = self.peer.consent(auth_url, false).await;
        let page = self.h.get(location.strip_prefix(PUBLIC).unwrap(), &[("Cookie", &cookie)]).await;
        (started["connection_id"].as_str().unwrap().to_string(), page)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn me_is_the_contact_read_from_dataverse() {
    let w = world(&[]).await;
    let token = w.portal.token(CONTACT_A);
    let r = w.call(Method::GET, "/api/portal/me", Some(&token), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let me = r.json();
    assert_eq!(me["contact_id"], CONTACT_A);
    assert_eq!(me["name"], "Ada Lovelace");
    assert_eq!(me["email"], "ada@example.com");
    assert_eq!(me["source"], "dataverse");
    // Read with our S2S identity: a token Entra issued for this Dataverse.
    let issued = w.azure.tokens_for(&w.dataverse.url).await;
    let used: Vec<String> = w.dataverse.stats().await["tokens"].as_object().unwrap().keys().cloned().collect();
    assert!(!used.is_empty() && used.iter().all(|t| issued.contains(t)));
    // Cached: the next calls cost Dataverse nothing, and the portal key was read once.
    let before = w.dataverse.requests().await;
    for _ in 0..5 {
        assert_eq!(w.call(Method::GET, "/api/portal/me", Some(&token), None).await.status, 200);
    }
    assert_eq!(w.dataverse.requests().await, before);
    assert_eq!(w.portal.publickey_requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    // A contact that is not in Dynamics.
    let stranger = w.portal.token("11111111-2222-4333-8444-555555555555");
    w.call(Method::GET, "/api/portal/me", Some(&stranger), None).await.assert_problem(404, "not-found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_portal_tokens_get_401_with_a_clear_message() {
    let w = world(&[]).await;
    let claims = |f: &dyn Fn(&mut Value)| {
        let mut c = w.portal.claims(CONTACT_A);
        f(&mut c);
        c
    };
    let expired = w.portal.sign(&claims(&|c| {
        c["exp"] = json!(1_000_000);
        c["nbf"] = json!(999_000);
    }));
    let other_aud = w.portal.sign(&claims(&|c| c["aud"] = json!("some-other-client")));
    let other_iss = w.portal.sign(&claims(&|c| c["iss"] = json!("contoso.powerappsportals.com")));
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let alg_none =
        format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&w.portal.claims(CONTACT_A).to_string()));
    // The classic confusion: HS256 with the site's *public* key as the HMAC secret.
    let pem = std::fs::read(format!("{}/tests/fixtures/issuer-pub.pem", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &w.portal.claims(CONTACT_A),
        &jsonwebtoken::EncodingKey::from_secret(&pem),
    )
    .unwrap();
    // A genuine token whose payload was changed to another contact.
    let genuine = w.portal.token(CONTACT_A);
    let parts: Vec<&str> = genuine.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], b64(&claims(&|c| c["sub"] = json!(CONTACT_B)).to_string()), parts[2]);

    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "Authorization header"),
        (Some(expired), "expired"),
        (Some(other_aud), "another audience"),
        (Some(other_iss), "not issued by this portal"),
        (Some(alg_none), "\"none\""),
        (Some(hs256), "\"HS256\""),
        (Some(tampered), "signature is not valid"),
    ];
    for (token, needle) in cases {
        let r = w.call(Method::GET, "/api/portal/me", token.as_deref(), None).await;
        let p = r.assert_problem(401, "unauthorized");
        assert!(p["detail"].as_str().unwrap().contains(needle), "{needle}: {}", r.body);
    }
    // A bad signature may mean a new site certificate: the key is re-read, but at most
    // once a minute however many bad tokens arrive.
    assert!(w.portal.publickey_requests.load(std::sync::atomic::Ordering::SeqCst) <= 2);
    assert_eq!(w.call(Method::GET, "/api/portal/me", Some(&genuine), None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_never_reaches_another_contacts_connection() {
    let w = world(&[]).await;
    let (b_id, page) = w.connect(CONTACT_B).await;
    page.assert_html(200);
    // The popup tells the portal page, and only the portal's origin.
    assert!(
        page.body.contains("postMessage(") && page.body.contains(&format!("\"{}\"", w.portal.url)),
        "{}",
        page.body
    );
    assert!(page.header("content-security-policy").contains("script-src 'sha256-"));

    let a = w.portal.token(CONTACT_A);
    let b = w.portal.token(CONTACT_B);
    let own = w.call(Method::GET, "/api/portal/connections", Some(&b), None).await.json();
    assert_eq!(own["connections"][0]["connection_id"], b_id.as_str());
    assert_eq!(own["connections"][0]["status"], "active");
    assert_eq!(w.call(Method::GET, "/api/portal/connections", Some(&a), None).await.json()["connections"], json!([]));

    let item = format!("/api/portal/connections/{b_id}");
    let proxied = format!("/api/portal/connections/{b_id}/proxy/items/1");
    for (method, path) in [
        (Method::GET, &item),
        (Method::DELETE, &item),
        (Method::GET, &proxied),
        (Method::POST, &proxied),
        (Method::PUT, &proxied),
        (Method::PATCH, &proxied),
        (Method::DELETE, &proxied),
    ] {
        w.call(method.clone(), path, Some(&a), Some(json!({}))).await.assert_problem(404, "not-found");
    }
    // B's own: the proxy within the allow-list only, and never a token.
    let ok = w.call(Method::GET, &proxied, Some(&b), None).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json()["path"], "/__api/items/1");
    w.call(Method::POST, &proxied, Some(&b), Some(json!({}))).await.assert_problem(403, "forbidden");
    w.call(Method::GET, &format!("/api/portal/connections/{b_id}/proxy/admin"), Some(&b), None)
        .await
        .assert_problem(403, "forbidden");
    let status = w.call(Method::GET, &item, Some(&b), None).await;
    assert_eq!(status.status, 200);
    for body in [&status.body, &own.to_string()] {
        assert!(!body.contains("\"access_token\"") && !body.contains("\"refresh_token\""), "{body}");
    }
    for t in w.peer.issued_tokens().await {
        assert!(!status.body.contains(&t) && !own.to_string().contains(&t));
    }
    // B disconnects: revoked at the provider and gone.
    assert_eq!(w.call(Method::DELETE, &item, Some(&b), None).await.status, 200);
    w.call(Method::GET, &item, Some(&b), None).await.assert_problem(404, "not-found");
    // Providers not opened to portal users cannot be connected.
    let r = w
        .call(
            Method::POST,
            "/api/portal/connections",
            Some(&b),
            Some(json!({ "provider": "nope", "binding": support::portal::binding().1 })),
        )
        .await;
    r.assert_problem(400, "unknown-provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_answered_for_listed_origins_only() {
    let w = world(&[]).await;
    let origin = w.portal.url.clone();
    let token = format!("Bearer {}", w.portal.token(CONTACT_A));
    let preflight = |o: String| {
        let h = &w.h;
        async move {
            h.forward(
                Method::OPTIONS,
                "/api/portal/me",
                &[
                    ("Origin", o.as_str()),
                    ("Access-Control-Request-Method", "GET"),
                    ("Access-Control-Request-Headers", "authorization"),
                ],
                None,
            )
            .await
        }
    };
    let ok = preflight(origin.clone()).await;
    assert_eq!(ok.status, 204);
    assert_eq!(ok.header("access-control-allow-origin"), origin);
    assert_eq!(ok.header("access-control-allow-credentials"), "true");
    assert!(ok.header("access-control-allow-headers").contains("authorization"));
    assert!(ok.header("access-control-allow-methods").contains("POST"));
    assert_eq!(ok.header("vary"), "Origin");
    let denied = preflight("https://evil.example".into()).await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.header("access-control-allow-origin"), "");

    let get =
        w.h.forward(Method::GET, "/api/portal/me", &[("Origin", origin.as_str()), ("Authorization", &token)], None)
            .await;
    assert_eq!(get.status, 200);
    assert_eq!(get.header("access-control-allow-origin"), origin);
    assert_eq!(get.header("vary"), "Origin");
    let evil = w
        .h
        .forward(Method::GET, "/api/portal/me", &[("Origin", "https://evil.example"), ("Authorization", &token)], None)
        .await;
    evil.assert_problem(403, "forbidden");
    assert_eq!(evil.header("access-control-allow-origin"), "");
    // Server-to-server calls (no Origin) are not CORS.
    assert_eq!(w.h.forward(Method::GET, "/api/portal/me", &[("Authorization", &token)], None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_platform_cors_the_handler_adds_none() {
    let w = world(&[("CORS_LAYER", "platform")]).await;
    let token = format!("Bearer {}", w.portal.token(CONTACT_A));
    let get = w
        .h
        .forward(Method::GET, "/api/portal/me", &[("Origin", w.portal.url.as_str()), ("Authorization", &token)], None)
        .await;
    assert_eq!(get.status, 200);
    assert_eq!(get.header("access-control-allow-origin"), "", "the platform adds it, not the handler");
    let preflight = w.h.forward(Method::OPTIONS, "/api/portal/me", &[("Origin", w.portal.url.as_str())], None).await;
    preflight.assert_problem(405, "method-not-allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_of_an_oidc_issuer_are_mapped_to_their_contact() {
    // A site signing users in with B2C / External ID: the issuer's JWKS, a contact claim.
    let issuer = support::issuer::Issuer::start().await;
    let w = world(&[
        ("PORTAL_OIDC_ISSUER", issuer.url.as_str()),
        ("PORTAL_OIDC_AUDIENCE", "portal-spa"),
        ("PORTAL_OIDC_CONTACT_CLAIM", "extension_contactid"),
    ])
    .await;
    let mut claims = issuer.claims();
    claims["aud"] = json!("portal-spa");
    claims["extension_contactid"] = json!(CONTACT_B.to_uppercase());
    let token = issuer.sign(&claims);
    let r = w.call(Method::GET, "/api/portal/me", Some(&token), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["contact_id"], CONTACT_B);
    assert_eq!(r.json()["name"], "Charles Babbage");
    // Without the claim, or for another audience: 401 with the reason.
    let mut no_claim = issuer.claims();
    no_claim["aud"] = json!("portal-spa");
    let r = w.call(Method::GET, "/api/portal/me", Some(&issuer.sign(&no_claim)), None).await;
    assert!(r.assert_problem(401, "unauthorized")["detail"].as_str().unwrap().contains("extension_contactid"));
    let r = w.call(Method::GET, "/api/portal/me", Some(&issuer.token()), None).await;
    assert!(r.assert_problem(401, "unauthorized")["detail"].as_str().unwrap().contains("audience"));
    // The Power Pages tokens keep working beside it.
    assert_eq!(w.call(Method::GET, "/api/portal/me", Some(&w.portal.token(CONTACT_A)), None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b2c_users_without_a_contact_claim_are_found_by_lookup_and_refused_when_ambiguous() {
    let issuer = support::issuer::Issuer::start().await;
    let w = world(&[
        ("PORTAL_OIDC_ISSUER", issuer.url.as_str()),
        ("PORTAL_OIDC_AUDIENCE", "portal-spa"),
        ("PORTAL_OIDC_CONTACT_CLAIM", "extension_contactid"),
        ("PORTAL_OIDC_LOOKUP_CLAIM", "email"),
    ])
    .await;
    let twin_1 = "3c1d2e3f-0000-4000-8000-00000000aaa1";
    let twin_2 = "3c1d2e3f-0000-4000-8000-00000000aaa2";
    let seed = |set: &str, rows: Value| {
        let url = format!("{}/__control/tables/{set}", w.dataverse.url);
        async move { reqwest::Client::new().post(url).json(&json!({ "rows": rows })).send().await.unwrap() }
    };
    seed(
        "contacts",
        json!([
            { "contactid": twin_1, "fullname": "Twin One", "emailaddress1": "twin@example.com" },
            { "contactid": twin_2, "fullname": "Twin Two", "emailaddress1": "twin@example.com" },
        ]),
    )
    .await;
    let link = |sub: &str, contact: &str| {
        json!({
            "adx_username": sub, "adx_identityprovidername": issuer.url, "adx_contactid@odata.bind": format!("/contacts({contact})"),
        })
    };
    seed(
        "adx_externalidentities",
        json!([link("b2c-linked", CONTACT_B), link("b2c-twice", twin_1), link("b2c-twice", twin_2)]),
    )
    .await;
    let token = |sub: &str, email: Option<&str>| {
        let mut claims = issuer.claims();
        claims["aud"] = json!("portal-spa");
        claims["sub"] = json!(sub);
        if let Some(e) = email {
            claims["email"] = json!(e);
        }
        issuer.sign(&claims)
    };
    let me = |t: String| {
        let w = &w;
        async move { w.call(Method::GET, "/api/portal/me", Some(&t), None).await }
    };

    // Linked by the portal's external identity record (the issuer and subject).
    let r = me(token("b2c-linked", Some("someone@example.com"))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["contact_id"], CONTACT_B);
    // The mapping and the contact are cached: the same person again reads nothing.
    let before = w.dataverse.requests().await;
    assert_eq!(me(token("b2c-linked", None)).await.json()["contact_id"], CONTACT_B);
    assert_eq!(w.dataverse.requests().await, before);

    // No record: found by the lookup claim (email → emailaddress1).
    let r = me(token("b2c-new", Some("ada@example.com"))).await;
    assert_eq!(r.json()["contact_id"], CONTACT_A, "{}", r.body);

    // Ambiguous either way: refused, nobody is guessed.
    me(token("b2c-twice", None)).await.assert_problem(403, "ambiguous-contact");
    me(token("b2c-other", Some("twin@example.com"))).await.assert_problem(403, "ambiguous-contact");

    // Nothing fits: not authenticated as a contact, and the message says why.
    let r = me(token("b2c-stranger", Some("nobody@example.com"))).await;
    assert!(
        r.assert_problem(401, "unauthorized")["detail"].as_str().unwrap().contains("no contact in Dynamics"),
        "{}",
        r.body
    );
}

/// Login CSRF through the bind step, as an attacker sends it: portal user B registers the
/// hash of a secret B chose, then makes a victim's browser post that secret and B's link
/// to the bind route. Every request the bind page itself never sends is refused with 403,
/// sets no cookie, and leaves B's connection pending with its authorization unspent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bind_step_accepts_only_its_own_pages_form() {
    let w = world(&[]).await;
    let token = w.portal.token(CONTACT_B);
    let (secret, hash) = support::portal::binding();
    let r = w
        .call(
            Method::POST,
            "/api/portal/connections",
            Some(&token),
            Some(json!({ "provider": "test", "binding": hash })),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let started = r.json();
    let link = started["authorization_url"].as_str().unwrap().to_string();
    let bind_url = started["bind_url"].as_str().unwrap().to_string();
    let portal_origin = w.portal.url.trim_end_matches('/').to_string();
    // What loading the real page would give (the attacker can load it too, in its own browser).
    let page = support::portal::bind_page(&w.h, &bind_url).await;
    let form = |with_page: bool| {
        let mut f = url::form_urlencoded::Serializer::new(String::new());
        f.append_pair("secret", &secret).append_pair("authorization_url", &link).append_pair("origin", &portal_origin);
        if with_page {
            f.append_pair("page", &page.value);
        }
        f.finish().into_bytes()
    };
    let ct = ("Content-Type", "application/x-www-form-urlencoded");
    let cookie = ("Cookie", page.cookie.as_str());
    let attempts: Vec<(&str, Vec<(&str, &str)>, bool)> = vec![
        // A form another site auto-submits: the browser sends that site's Origin.
        ("cross-site form", vec![ct, ("Origin", "https://attacker.example"), ("Sec-Fetch-Site", "cross-site")], false),
        // The portal's own origin is not ours either (the form field is not evidence).
        ("portal origin", vec![ct, ("Origin", portal_origin.as_str())], true),
        // No Origin at all (a raw request, or a browser behind no-referrer: "null").
        ("no origin", vec![ct, cookie], true),
        ("null origin", vec![ct, ("Origin", "null"), cookie], true),
        // Our origin claimed, but the browser says the request is cross-site.
        ("sec-fetch-site", vec![ct, ("Origin", page.origin.as_str()), ("Sec-Fetch-Site", "same-site"), cookie], true),
        // Our origin (a raw request can say anything) without the page's value or cookie.
        ("no page value", vec![ct, ("Origin", page.origin.as_str()), cookie], false),
        ("no page cookie", vec![ct, ("Origin", page.origin.as_str())], true),
    ];
    for (what, headers, with_page) in attempts {
        let r = w.h.forward(Method::POST, "/api/oauth/bind", &headers, Some(form(with_page))).await;
        assert_eq!(r.status, 403, "{what}: {}", r.body);
        r.assert_html(403);
        assert!(r.body.contains("Nothing was changed"), "{what}: {}", r.body);
        assert!(r.headers.get("set-cookie").is_none(), "{what}: nothing is set");
    }
    // A page value that is not the cookie's.
    let other = support::portal::bind_page(&w.h, &bind_url).await;
    let mixed = ("Cookie", other.cookie.as_str());
    let r =
        w.h.forward(Method::POST, "/api/oauth/bind", &[ct, ("Origin", &page.origin), mixed], Some(form(true))).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.headers.get("set-cookie").is_none());
    let theirs = w.call(Method::GET, "/api/portal/connections", Some(&token), None).await.json();
    assert_eq!(theirs["connections"][0]["status"], "pending", "{theirs}");
    assert_eq!(theirs["connections"][0]["authorization_pending"], true, "nothing was spent: {theirs}");
    // The page's own post still works, once: its value is spent with it.
    let cookie = support::portal::bind(&w.h, &bind_url, &secret, &link, &portal_origin).await;
    assert!(cookie.contains("dcb-"), "{cookie}");
}
