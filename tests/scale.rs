//! Issue [3/7], behaviour rather than speed: the list pages. (The figures themselves
//! are in `scripts/bench`.)

mod support;

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
