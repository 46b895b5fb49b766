//! Issue [3/7], behaviour rather than speed: the list pages, and the timer pages through
//! everything due in one run. (The figures themselves
//! are in `scripts/bench`.)

use crate::support;

use reqwest::Method;
use serde_json::{Value, json};
use support::flow::{Setup, world};

#[tokio::test]
async fn the_connection_list_pages_with_an_opaque_next_link() {
    let w = world(Setup::default()).await;
    for i in 0..25 {
        w.start(json!({ "provider": "test", "connection_id": format!("paged-{i:02}"), "owner": "account:7" })).await;
    }
    let mut seen = Vec::new();
    let mut path = "/api/connections?owner=account%3A7&limit=10".to_string();
    let mut pages = 0;
    loop {
        let r = w.api(Method::GET, &path, Value::Null).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let body = r.json();
        let page = body["connections"].as_array().unwrap();
        pages += 1;
        seen.extend(page.iter().map(|c| c["connection_id"].as_str().unwrap().to_string()));
        match body["next"].as_str() {
            Some(next) => {
                assert_eq!(page.len(), 10);
                assert!(next.contains("owner=account%3A7"), "the filters carry over: {next}");
                path = next.to_string();
            }
            None => break,
        }
        assert!(pages < 5, "the pages never end");
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..25).map(|i| format!("paged-{i:02}")).collect();
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, expected, "every connection once: {seen:?}");
    w.api(Method::GET, "/api/connections?after=not-a-cursor", Value::Null).await.assert_problem(400, "invalid-cursor");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_timer_run_pages_through_everything_due() {
    use dynamics_companion::clients::store::sqlite::SqliteStore;
    use dynamics_companion::domain::ConnectionStore;
    use dynamics_companion::support::crypto::Keyring;
    use support::seed::{GrantingEndpoint, connection, now};

    let provider = GrantingEndpoint::start().await;
    let spec = support::test_keys();
    let keys = Keyring::parse(&spec).unwrap();
    let b = support::HandlerBuilder::new()
        .file("providers.toml", &provider.catalog("granting"))
        .env("GRANTING_SECRET", "s")
        .env("TOKEN_ENCRYPTION_KEYS", &spec);
    // 1,100 due (more than two of the timer's 500-row pages) and 300 that are not.
    let store = SqliteStore::open(&b.root().join(".data/companion.db")).unwrap();
    let t = now();
    for i in 0..1_400 {
        let expires = if i < 1_100 { t + 60 } else { t + 7_200 };
        store.insert(&connection(&keys, "granting", &format!("c-{i:04}"), expires)).await.unwrap();
    }
    drop(store);
    let h = b.start().await;

    let reply = h.invoke_timer(&support::timer_payload(false)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let logs = reply.json()["Logs"].to_string();
    assert!(logs.contains("refresh: 1100 due, 1100 refreshed, 0 need re-authorization, 0 failed"), "{logs}");
    assert_eq!(provider.grants(), 1_100, "each due connection refreshed once");
    // Nothing is due any more: the next run refreshes nothing.
    let again = h.invoke_timer(&support::timer_payload(false)).await.json()["Logs"].to_string();
    assert!(again.contains("refresh: 0 due, 0 refreshed"), "{again}");
    assert_eq!(provider.grants(), 1_100);
}
