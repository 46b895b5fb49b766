//! The function app foundation, tested as the Azure Functions host drives it: start-up
//! and readiness, proxied HTTP (host.json's mode) and the legacy forwarding mode, the timer payload protocol, configuration errors,
//! the error model, and the function.json layout the host discovers.

use crate::support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::issuer::Issuer;
use support::{HandlerBuilder, HostMode, host_rebuilt_query, timer_payload};

#[tokio::test]
async fn answers_readiness_and_health_as_the_host_starts_it() {
    let issuer = Issuer::start().await;
    let h = HandlerBuilder::new().envs(issuer.settings()).start().await;
    // Measured in the debug build the tests run; BENCHMARKS.md has release figures.
    assert!(h.ready_after < Duration::from_secs(5), "ready after {:?}", h.ready_after);
    let root = h.get("/", &[]).await;
    assert_eq!(root.status, 200);
    let health = h.get("/api/health", &[]).await;
    assert_eq!(health.status, 200, "{}", health.body);
    assert!(health.content_type().starts_with("application/json"));
    let v = health.json();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["uptime_seconds"].is_u64());
    assert_eq!(v["under_functions_host"], true);
    // A probe without a token: liveness only. The operator also sees readiness.
    assert!(v.get("dependencies").is_none(), "{v}");
    let operator = format!("Bearer {}", issuer.token());
    let health = h.get("/api/health", &[("Authorization", &operator)]).await;
    assert_eq!(health.status, 200, "{}", health.body);
    let v = health.json();
    assert_eq!(v["dependencies"]["store"]["ready"], true);
    assert_eq!(v["dependencies"]["store"]["kind"], "sqlite");
    assert_eq!(v["dependencies"]["back_office_auth"]["configured"], true);
    // Nothing secret: not the key material, not a path to it.
    let keys = h.root.join(".data");
    assert!(!health.body.contains("TOKEN_ENCRYPTION_KEYS"));
    assert!(!health.body.contains(&keys.display().to_string()));
    // One log line per request, with route, status and duration.
    let line = h.logs.wait_for_line(|l| l.contains("route=\"/api/health\"")).expect("a request log line");
    assert!(line.contains("status=200") && line.contains("method=GET") && line.contains("ms="), "{line}");
}

#[tokio::test]
async fn without_the_host_it_serves_port_7071_and_reads_local_settings() {
    // local.settings.json names a bad store; the environment overrides it, as Core Tools does.
    let settings = json!({
        "IsEncrypted": false,
        "Values": { "FUNCTIONS_WORKER_RUNTIME": "custom", "STORE": "bogus", "STATE_TTL_SECONDS": "300" }
    });
    let b = HandlerBuilder::new().standalone().file("local.settings.json", &settings.to_string());
    let (code, _, stderr) = HandlerBuilder::new()
        .standalone()
        .env("LOCAL_HTTP_PORT", support::free_port().to_string())
        .file("local.settings.json", &settings.to_string())
        .run_to_exit();
    assert_ne!(code, Some(0));
    assert!(stderr.contains("STORE"), "the file's value is read: {stderr}");

    // 7071 may be taken on a developer's machine (`cargo run`, the demo): then the handler
    // must say so and name the setting, which is what this checks instead.
    if std::net::TcpListener::bind("127.0.0.1:7071").is_err() {
        let (code, _, stderr) = b.env("STORE", "sqlite").run_to_exit();
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("in use") && stderr.contains("LOCAL_HTTP_PORT"), "{stderr}");
        return;
    }
    let h = b.env("STORE", "sqlite").start().await;
    assert_eq!(h.port, 7071);
    let direct = reqwest::get("http://127.0.0.1:7071/api/health").await.unwrap();
    assert_eq!(direct.status(), 200);
    let v: Value = direct.json().await.unwrap();
    assert_eq!(v["under_functions_host"], false);
    assert!(h.logs.wait_for_line(|l| l.contains("local.settings.json")).is_some());
}

#[tokio::test]
async fn a_secret_kept_in_local_settings_is_warned_about_by_name_only() {
    let settings = json!({
        "IsEncrypted": false,
        "Values": {
            "FUNCTIONS_WORKER_RUNTIME": "custom",
            "XERO_CLIENT_SECRET": "s3cr3t-value-never-logged",
            "TOKEN_ENCRYPTION_KEYS_SECRET": "token-encryption-keys"
        }
    });
    // Under the host (Core Tools reads the file) and without it.
    for b in [
        HandlerBuilder::new(),
        HandlerBuilder::new().standalone().env("LOCAL_HTTP_PORT", support::free_port().to_string()),
    ] {
        let h = b.file("local.settings.json", &settings.to_string()).start().await;
        let warned = h.logs.wait_for_line(|l| l.contains("local.settings.json holds a value for"));
        assert!(warned.as_deref().is_some_and(|l| l.contains("XERO_CLIENT_SECRET")), "{}", h.logs.all());
        assert!(!h.logs.all().contains("s3cr3t-value"), "{}", h.logs.all());
        assert!(!h.logs.all().contains("value for TOKEN_ENCRYPTION_KEYS_SECRET"), "it names a secret, holds none");
    }
}

#[tokio::test]
async fn timer_invocation_gets_the_payload_reply() {
    let h = HandlerBuilder::new().start().await;
    for payload in [
        timer_payload(false),
        timer_payload(true),
        // Plain strings arrive JSON-encoded twice.
        json!({ "Data": { "timer": "{\"Schedule\":{\"AdjustForDST\":true},\"ScheduleStatus\":null,\"IsPastDue\":false}" }, "Metadata": {} }),
    ] {
        let r = h.invoke_timer(&payload).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.content_type().starts_with("application/json"));
        let v = r.json();
        assert_eq!(v["Outputs"], json!({}));
        assert_eq!(v["ReturnValue"], Value::Null);
        let logs = v["Logs"].as_array().expect("Logs is an array");
        assert!(logs.iter().any(|l| l.as_str().unwrap().starts_with("refresh:")), "{v}");
    }
}

#[tokio::test]
async fn bad_configuration_stops_start_up_with_one_line() {
    let cases = [
        ("STATE_TTL_SECONDS", "ten minutes"),
        ("FUNCTIONS_CUSTOMHANDLER_PORT", "not-a-port"),
        ("PUBLIC_BASE_URL", "http://companion.example.com"),
        ("TOKEN_ENCRYPTION_KEYS", "k1:too-short"),
        ("AUTH_ISSUER", "https://login.example/tenant/v2.0"),
        ("PROVIDERS_FILE", "missing.toml"),
        // A word the log filter would read as a target name, silencing everything else.
        ("LOG_LEVEL", "verbose"),
    ];
    for (setting, value) in cases {
        let (code, stdout, stderr) = HandlerBuilder::new().env(setting, value).run_to_exit();
        assert_eq!(code, Some(1), "{setting}: {stdout}{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{setting}: one line expected, got {stderr:?}");
        let expected_name = if setting == "AUTH_ISSUER" { "AUTH_AUDIENCE" } else { setting };
        assert!(lines[0].contains(expected_name), "{setting}: {stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
    }
    // A catalog that names a secret nobody set: the secret's name, nothing else.
    let catalog = r#"
[providers.acme]
authorization_url = "https://a.example/authorize"
token_url = "https://a.example/token"
client_id = "c"
client_secret = "acme-client-secret"
"#;
    let (code, _, stderr) = HandlerBuilder::new().file("providers.toml", catalog).run_to_exit();
    assert_eq!(code, Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("acme-client-secret") && stderr.contains("ACME_CLIENT_SECRET"), "{stderr}");
}

#[tokio::test]
async fn caller_errors_are_clear_and_the_process_keeps_serving() {
    let h = HandlerBuilder::new().start().await;

    // Unknown route and wrong method.
    h.get("/api/nowhere", &[]).await.assert_problem(404, "not-found");
    let wrong = h.forward(Method::DELETE, "/api/health", &[], None).await;
    wrong.assert_problem(405, "method-not-allowed");
    assert_eq!(wrong.header("allow"), "GET");

    // A 2 MB body, with a length (forwarded) and chunked (as the host sends payloads).
    let big = vec![b'x'; 2 * 1024 * 1024];
    h.forward(Method::POST, "/refresh", &[("Content-Type", "application/json")], Some(big.clone()))
        .await
        .assert_problem(413, "body-too-large");
    h.post_chunked("/refresh", big.clone(), "application/json").await.assert_problem(413, "body-too-large");
    // Browser-facing: the callback answers with a page, not JSON.
    let page = h
        .forward(
            Method::POST,
            "/api/oauth/callback",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            Some(big),
        )
        .await;
    page.assert_html(413);

    // Broken JSON.
    let broken = h.post_chunked("/refresh", b"{\"Data\": {".to_vec(), "application/json").await;
    let p = broken.assert_problem(400, "malformed-json");
    assert!(p["detail"].as_str().unwrap().contains("not valid JSON"));

    // The callback without a state is a readable page.
    let page = h.get("/api/oauth/callback?code=abc", &[]).await;
    page.assert_html(400);
    assert!(page.body.contains("no state"), "{}", page.body);
    assert_eq!(page.header("cache-control"), "no-store");
    assert_eq!(page.header("referrer-policy"), "no-referrer");
    assert!(page.header("content-security-policy").contains("default-src 'none'"));

    // Still serving.
    assert_eq!(h.get("/api/health", &[]).await.status, 200);
}

#[tokio::test]
async fn back_office_api_is_closed_until_configured() {
    let h = HandlerBuilder::new().start().await;
    let r = h.json(Method::POST, "/api/connections", None, &json!({ "provider": "x" })).await;
    let p = r.assert_problem(503, "api-not-configured");
    assert!(p["detail"].as_str().unwrap().contains("AUTH_ISSUER"));
}

#[tokio::test]
async fn sigterm_stops_it_gracefully() {
    let mut h = HandlerBuilder::new().start().await;
    assert_eq!(h.get("/api/health", &[]).await.status, 200);
    assert_eq!(h.terminate(), Some(0));
    assert!(h.logs.wait_for_line(|l| l.contains("SIGTERM received")).is_some(), "{}", h.logs.all());
}

/// What a provider's redirect looks like on the wire, and what Dynamics reads back: the
/// capture of `state`'s callback through the back office.
async fn captured_code(h: &support::Handler, bearer: &str, state: &str) -> Value {
    let r = h.json(Method::GET, &format!("/api/captures?state={state}"), Some(bearer), &Value::Null).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["captures"][0].clone()
}

#[tokio::test]
async fn proxying_mode_hands_the_callback_its_query_as_the_provider_sent_it() {
    let issuer = Issuer::start().await;
    let h = HandlerBuilder::new().envs(issuer.settings()).start().await;
    assert_eq!(h.mode, HostMode::Proxying, "the harness drives host.json's mode by default");
    let bearer = issuer.token();
    // Encoded bytes arrive as sent: the code is the provider's, byte for byte.
    h.expect_state(&bearer, "st-1").await;
    let page = h.get("/api/oauth/callback?code=a%2Bb%2F%3D~c+d&state=st-1&iss=https%3A%2F%2Fop.example", &[]).await;
    page.assert_html(200);
    let cap = captured_code(&h, &bearer, "st-1").await;
    assert_eq!(cap["code"], "a+b/=~c d");
    assert_eq!(cap["iss"], "https://op.example");
    // A parameter sent twice with different values reaches the handler as two, so RFC
    // 6749 §3.1 can be enforced (the legacy mode joins them, see below).
    h.expect_state(&bearer, "st-2").await;
    let twice = h.get("/api/oauth/callback?state=st-2&code=one&code=two", &[]).await;
    twice.assert_html(400);
    assert!(twice.body.contains("twice"), "{}", twice.body);
    // A form_post callback with a chunked body (no Content-Length) is read in full.
    h.expect_state(&bearer, "st-3").await;
    let posted = h
        .post_chunked(
            "/api/oauth/callback",
            b"state=st-3&code=posted-code".to_vec(),
            "application/x-www-form-urlencoded",
        )
        .await;
    posted.assert_html(200);
    assert_eq!(captured_code(&h, &bearer, "st-3").await["code"], "posted-code");
}

#[tokio::test]
async fn legacy_forwarding_mode_still_works_with_its_known_losses() {
    let issuer = Issuer::start().await;
    let h = HandlerBuilder::new().envs(issuer.settings()).legacy_forwarding().start().await;
    let bearer = issuer.token();
    h.expect_state(&bearer, "st-1").await;
    h.get("/api/oauth/callback?code=a%2Bb%2F%3D&state=st-1", &[]).await.assert_html(200);
    assert_eq!(captured_code(&h, &bearer, "st-1").await["code"], "a+b/=");
    // The host joined the repeated key before the handler saw it: a comma-joined value.
    h.expect_state(&bearer, "st-2").await;
    h.get("/api/oauth/callback?state=st-2&code=one&code=two", &[]).await.assert_html(200);
    assert_eq!(captured_code(&h, &bearer, "st-2").await["code"], "one,two");
    assert_eq!(h.get("/api/health", &[]).await.status, 200);
}

#[test]
fn host_query_rebuilding_is_emulated() {
    assert_eq!(host_rebuilt_query("a=1&a=2&b=x+y"), "a=1%2C2&b=x%20y");
    assert_eq!(host_rebuilt_query("flag"), "flag=");
    assert_eq!(host_rebuilt_query("state=a%2Bb%3D"), "state=a%2Bb%3D");
}

/// The function.json files as the host discovers them: direct children of the root.
#[test]
fn function_json_files_are_valid_and_routes_do_not_collide() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let host: Value = serde_json::from_str(&std::fs::read_to_string(root.join("host.json")).unwrap()).unwrap();
    assert_eq!(host["version"], "2.0");
    assert_eq!(host["customHandler"]["description"]["defaultExecutablePath"], "handler");
    assert_eq!(host["customHandler"]["enableProxyingHttpRequest"], true);
    assert!(host["customHandler"].get("enableForwardingHttpRequest").is_none(), "one mode, not both");
    assert!(host["extensionBundle"]["id"].is_string());
    let local: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("local.settings.json")).unwrap()).unwrap();
    assert_eq!(local["IsEncrypted"], false);
    assert!(local["Values"]["FUNCTIONS_WORKER_RUNTIME"].as_str().unwrap().eq_ignore_ascii_case("custom"));
    for (k, v) in local["Values"].as_object().unwrap() {
        let lower = k.to_ascii_lowercase();
        assert!(
            !(lower.contains("secret") || lower.contains("key") && lower != "azurewebjobsstorage"),
            "{k} looks secret: {v}"
        );
    }

    let name_ok = |n: &str| {
        let mut chars = n.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            && n.len() <= 128
            && !n.eq_ignore_ascii_case("host")
    };
    let mut routes: Vec<(String, Vec<String>)> = Vec::new();
    let mut functions = Vec::new();
    for entry in std::fs::read_dir(root).unwrap() {
        let dir = entry.unwrap().path();
        let fj = dir.join("function.json");
        if !fj.is_file() {
            continue;
        }
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        assert!(name_ok(&name), "invalid function name {name}");
        let doc: Value =
            serde_json::from_str(&std::fs::read_to_string(&fj).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let bindings = doc["bindings"].as_array().unwrap_or_else(|| panic!("{name}: no bindings"));
        assert!(!bindings.is_empty(), "{name}: at least one binding");
        functions.push(name.clone());
        if let Some(trigger) =
            bindings.iter().find(|b| b["type"].as_str().is_some_and(|t| t.eq_ignore_ascii_case("httpTrigger")))
        {
            // The host proxies (or forwards) only a function with exactly one httpTrigger in
            // and one http out; any other shape silently gets the JSON payload instead.
            assert_eq!(bindings.len(), 2, "{name}: proxying needs exactly httpTrigger + http");
            assert!(bindings.iter().any(|b| b["type"] == "http" && b["direction"] == "out"), "{name}");
            assert_eq!(
                trigger["authLevel"], "anonymous",
                "{name}: the handler authenticates; a key would swallow ?code="
            );
            let route = trigger["route"].as_str().unwrap_or(&name).to_ascii_lowercase();
            assert!(!route.starts_with("admin") && !route.starts_with("runtime"), "{name}: reserved route {route}");
            let methods: Vec<String> = trigger["methods"]
                .as_array()
                .map(|m| m.iter().map(|x| x.as_str().unwrap().to_ascii_lowercase()).collect())
                .unwrap_or_default();
            routes.push((route.trim_end_matches('/').to_string(), methods));
        }
    }
    for i in 0..routes.len() {
        for j in i + 1..routes.len() {
            let (ra, ma) = &routes[i];
            let (rb, mb) = &routes[j];
            let overlap = ma.is_empty() || mb.is_empty() || ma.iter().any(|m| mb.contains(m));
            assert!(!(ra == rb && overlap), "routes collide: {ra}");
        }
    }
    functions.sort();
    assert_eq!(
        functions,
        ["captures", "connections", "health", "mcp", "oauth", "openapi", "portal", "refresh", "tenants"]
    );
    // The host forwards only what a function.json declares: every /api route the router
    // serves is declared, with each of its methods.
    for route in dynamics_companion::web::routes::ROUTES {
        let Some(path) = route.template.strip_prefix("/api/") else { continue };
        let path = path.to_ascii_lowercase();
        let covered = routes.iter().find(|(r, _)| match r.strip_suffix("/{*rest}") {
            Some(prefix) => path == prefix || path.starts_with(&format!("{prefix}/")),
            None => &path == r,
        });
        let (_, methods) = covered.unwrap_or_else(|| panic!("no function.json forwards {}", route.template));
        for m in route.methods() {
            assert!(methods.contains(&m.to_ascii_lowercase()), "{}: {m} is not forwarded", route.template);
        }
    }
    // The callback is anonymous and takes GET and POST (form_post responses).
    let oauth: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("oauth/function.json")).unwrap()).unwrap();
    assert_eq!(oauth["bindings"][0]["route"], "oauth/{*rest}");
    assert_eq!(oauth["bindings"][0]["methods"], json!(["get", "post"]));
    let refresh: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("refresh/function.json")).unwrap()).unwrap();
    assert_eq!(refresh["bindings"][0]["type"], "timerTrigger");
}
