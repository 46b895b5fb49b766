//! What only a browser decides, in headless Chromium: a page on an allowed origin calls
//! the companion with the portal token and gets the contact; the same page on another
//! origin is blocked by the browser; the connect popup completes against oidc-provider
//! and the page learns the result from the callback page's postMessage; an authorization
//! link opened in another browser is refused; a foreign opener hears nothing.

use crate::support;

use serde_json::{Value, json};
use support::HandlerBuilder;
use support::oidc::{CLIENT_SECRET, OidcPeer};
use support::portal::{CLIENT_ID, CONTACT_A, CONTACT_B, PortalDouble};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_page_in_chromium() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's chromium (.ci/run does)"
    );
    let allowed = PortalDouble::start().await;
    let other = PortalDouble::start().await;
    // The browser reaches the handler directly, so the redirect URI is its real address.
    let builder = HandlerBuilder::new();
    let base = builder.base_url();
    let peer = OidcPeer::start(&format!("{base}/api/oauth/callback"), json!({}));
    let portal_section = "[providers.test.portal]\nenabled = true\n";
    // The same provider once more, answering with response_mode=form_post.
    let form_post = peer
        .catalog("testfp", "[providers.testfp.portal]\nenabled = true\n")
        .replace("prompt = \"consent\" }", "prompt = \"consent\", response_mode = \"form_post\" }");
    assert!(form_post.contains("form_post"));
    let catalog = format!("{}\n{form_post}", peer.catalog("test", portal_section));
    let h = builder
        .file("providers.toml", &catalog)
        .env("PUBLIC_BASE_URL", &base)
        .env("TEST_PROVIDER_SECRET", CLIENT_SECRET)
        .env("PORTAL_URL", &allowed.url)
        .env("PORTAL_CLIENT_ID", CLIENT_ID)
        .start()
        .await;

    let page =
        |site: &PortalDouble| format!("{}/companion?api={base}/api&client_id={CLIENT_ID}&provider=test", site.url);
    // Another portal user starts a connection and sends its authorization link to a victim;
    // the same user also tries to plant its own secret in a victim's browser (login CSRF).
    let (secret, hash) = support::portal::binding();
    let started = h
        .forward(
            reqwest::Method::POST,
            "/api/portal/connections",
            &[
                ("Authorization", &format!("Bearer {}", allowed.token(CONTACT_B))),
                ("Origin", allowed.url.trim_end_matches('/')),
                ("Content-Type", "application/json"),
            ],
            Some(serde_json::to_vec(&json!({ "provider": "test", "binding": hash })).unwrap()),
        )
        .await;
    assert_eq!(started.status, 201, "{}", started.body);
    let stolen = started.json()["authorization_url"].as_str().unwrap().to_string();
    let scenario = json!({
        "form_post_page": page(&allowed).replace("provider=test", "provider=testfp"),
        "csrf": {
            "bind_url": format!("{base}/api/oauth/bind"),
            "secret": secret,
            "authorization_url": stolen,
            "origin": allowed.url.trim_end_matches('/'),
        },
        "allowed": page(&allowed),
        "other": page(&other),
        "user": "alice",
        "stolen_link": stolen,
        "bind_url": format!("{base}/api/oauth/bind"),
    });
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(format!("{}/tests/peers/browser.mjs", env!("CARGO_MANIFEST_DIR")))
            .env("BROWSER_SCENARIO", scenario.to_string())
            .env("CHROMIUM", chromium)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("browser driver output ({e}): {stdout}\n{}", String::from_utf8_lossy(&output.stderr))
    });
    assert!(seen.get("error").is_none(), "{seen:#}\nhandler logs:\n{}", h.logs.all());

    // Allowed origin: the contact (from the token's claims: no Dataverse in this test).
    assert_eq!(seen["me"]["ok"], true, "{seen:#}");
    assert_eq!(seen["me"]["value"]["contact_id"], CONTACT_A);
    // Another origin: the request is refused and the browser blocks the answer.
    assert_eq!(seen["other"]["ok"], false, "{seen:#}");
    assert!(seen["other"]["message"].as_str().unwrap().contains("Failed to fetch"), "{seen:#}");
    // The popup completed the flow; the page saw the new connection.
    assert_eq!(seen["connect"]["ok"], true, "{seen:#}");
    let connections = seen["connect"]["value"].as_array().unwrap();
    assert_eq!(connections.len(), 1, "{seen:#}");
    assert_eq!(connections[0]["status"], "active");
    assert_eq!(connections[0]["owner"], format!("contact:{CONTACT_A}"));
    assert_eq!(seen["popup_closed"], true, "the result page closes itself");
    // A provider answering with a cross-site form post completes the same way.
    let after_form_post = seen["connect_form_post"]["value"].as_array().expect("the form_post flow ended");
    assert_eq!(after_form_post.len(), 2, "{seen:#}");
    assert!(after_form_post.iter().all(|c| c["status"] == "active"), "{seen:#}");

    // The cross-site form is refused before anything is looked at: the browser sent the
    // attacker's origin, nothing was set, and the attacker's connection is untouched.
    assert_eq!(seen["csrf"]["status"], 403, "{seen:#}");
    assert_eq!(seen["csrf"]["sent_origin"], "http://attacker.test", "{seen:#}");
    assert_eq!(seen["csrf"]["set_cookie"], Value::Null, "{seen:#}");
    assert_eq!(seen["csrf"]["cookies"], json!([]), "{seen:#}");
    assert!(seen["csrf"]["text"].as_str().unwrap().contains("another site"), "{seen:#}");
    assert!(h.logs.all().contains("route=\"(cors)\" status=403"), "the other origin was refused before any work");

    // The stolen link, completed in another browser, is refused and changes nothing.
    assert_eq!(seen["stolen"]["status"], 400, "{seen:#}");
    assert!(seen["stolen"]["text"].as_str().unwrap().contains("another browser"), "{seen:#}");
    let theirs = h
        .forward(
            reqwest::Method::GET,
            "/api/portal/connections",
            &[("Authorization", &format!("Bearer {}", allowed.token(CONTACT_B)))],
            None,
        )
        .await
        .json();
    assert_eq!(theirs["connections"][0]["status"], "pending", "{theirs}");
    assert_eq!(theirs["connections"][0]["authorization_pending"], true, "nothing was spent: {theirs}");

    // A page on an origin that is not a portal's opens the bind page: it hears nothing,
    // and the popup posts nothing (the one bind in the logs is the allowed page's).
    assert_eq!(seen["foreign_opener"]["messages"], json!([]), "{seen:#}");
    // The binds that reached the route: the allowed page's two popups (query and form_post)
    // succeeded, and the attacker's form was refused.
    let lines = h.logs.stdout();
    let binds: Vec<&String> = lines.iter().filter(|l| l.contains("method=POST route=\"/api/oauth/bind\"")).collect();
    assert_eq!(binds.iter().filter(|l| l.contains("status=303")).count(), 2, "{}", h.logs.all());
    assert_eq!(binds.iter().filter(|l| l.contains("status=403")).count(), 1, "{}", h.logs.all());
    assert_eq!(binds.len(), 3, "{}", h.logs.all());
}
