//! The Swagger 2.0 document for Power Platform custom connectors: it validates (a Swagger
//! 2.0 validator from npm), the committed connector copy is the one the binary writes,
//! and it describes exactly what the router serves: every described operation is routed,
//! and every path answers any other method with `405` and an `Allow` of the described ones.

use crate::support;

use std::collections::BTreeSet;
use std::process::Command;

use reqwest::Method;
use serde_json::Value;
use support::HandlerBuilder;

fn validate(files: &[&std::path::Path]) {
    let script = format!("{}/tests/peers/validate-swagger.mjs", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("node").arg(script).args(files).output().expect("node runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("valid Swagger 2.0").count(), files.len(), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_document_validates_and_describes_exactly_the_routes_served() {
    let h = HandlerBuilder::new().start().await;
    let r = h.get("/api/openapi.json", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let doc = r.json();
    assert_eq!(doc["swagger"], "2.0");

    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.json");
    std::fs::write(&served, &r.body).unwrap();
    let committed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("connector/apiDefinition.swagger.json");
    validate(&[&served, &committed]);

    // The committed connector definition is what `handler openapi` writes now.
    let (code, out, err) = HandlerBuilder::new().args(&["openapi"]).run_to_exit();
    assert_eq!(code, Some(0), "{err}");
    let written: Value = serde_json::from_str(&out).unwrap();
    let on_disk: Value = serde_json::from_str(&std::fs::read_to_string(&committed).unwrap()).unwrap();
    assert_eq!(
        written, on_disk,
        "connector/apiDefinition.swagger.json is stale: run `handler openapi > connector/apiDefinition.swagger.json`"
    );

    // Every path and method: routed (neither 404 nor 405), and nothing else allowed.
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 20, "{}", paths.len());
    for (template, item) in paths {
        let path = template.replace("{id}", "probe").replace("{path}", "a/b");
        let described: BTreeSet<String> = item.as_object().unwrap().keys().map(|m| m.to_ascii_uppercase()).collect();
        for method in &described {
            let m = Method::from_bytes(method.as_bytes()).unwrap();
            let r = h.forward(m, &path, &[], None).await;
            assert!(r.status != 404 && r.status != 405, "{method} {path}: {} {}", r.status, r.body);
            assert!(!r.body.contains("has no handler"), "{method} {path}: {}", r.body);
        }
        let r = h.forward(Method::OPTIONS, &path, &[], None).await;
        assert_eq!(r.status, 405, "OPTIONS {path}: {}", r.body);
        let allow: BTreeSet<String> = r.header("allow").split(',').map(|m| m.trim().to_string()).collect();
        assert_eq!(allow, described, "{path}");
        for op in item.as_object().unwrap().values() {
            assert!(op["operationId"].is_string() && op["summary"].is_string(), "{path}: {op}");
            assert!(["important", "advanced", "internal"].contains(&op["x-ms-visibility"].as_str().unwrap()), "{op}");
        }
    }
    assert_eq!(h.get("/api/nothing-here", &[]).await.status, 404);
}
