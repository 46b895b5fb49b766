//! `/api/mcp` with a real peer: the official MCP TypeScript SDK client
//! (`tests/peers/mcp-client.mjs`), and the attacker's raw requests.

use crate::support;

use reqwest::Method;
use serde_json::{Value, json};
use support::issuer::Issuer;
use support::oidc::{CLIENT_SECRET, OidcPeer};
use support::{Handler, HandlerBuilder};

const AGENT_ROLE: &str = "Agents.Use";

struct Setup {
    h: Handler,
    issuer: Issuer,
    peer: OidcPeer,
    base: String,
}

/// A handler reachable at its public URL (the metadata names it), one provider whose
/// connections agents holding `Agents.Use` may use, and one connection made by the back office.
async fn setup(extra_env: &[(&str, &str)]) -> Setup {
    let b = HandlerBuilder::new();
    let base = b.base_url();
    let peer = OidcPeer::start(&format!("{base}/api/oauth/callback"), json!({}));
    let issuer = Issuer::start().await;
    let catalog =
        peer.catalog("test", &format!("agents = {{ roles = [\"{AGENT_ROLE}\"] }}")) + &peer.catalog("private", "");
    let mut b =
        b.file("providers.toml", &catalog).env("PUBLIC_BASE_URL", &base).env("TEST_PROVIDER_SECRET", CLIENT_SECRET);
    for (k, v) in issuer.settings().into_iter().chain(extra_env.iter().map(|(k, v)| (*k, v.to_string()))) {
        b = b.env(k, v);
    }
    let h = b.start().await;
    let s = Setup { h, issuer, peer, base };
    for (provider, id) in [("test", "erp-1"), ("private", "hr-1")] {
        s.connect(provider, id).await;
    }
    s
}

impl Setup {
    async fn connect(&self, provider: &str, id: &str) {
        let bearer = self.issuer.token();
        let r = self
            .h
            .json(
                Method::POST,
                "/api/connections",
                Some(&bearer),
                &json!({ "provider": provider, "connection_id": id }),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        let location = self.peer.consent(r.json()["authorization_url"].as_str().unwrap(), false).await;
        let path = location.strip_prefix(&self.base).unwrap_or_else(|| panic!("{location}"));
        self.h.get(path, &[("Accept", "text/html")]).await.assert_html(200);
    }

    fn agent_token(&self, roles: &[&str]) -> String {
        let mut c = self.issuer.claims();
        c["roles"] = json!(roles);
        self.issuer.sign(&c)
    }

    /// Runs the SDK client; returns what it printed.
    fn sdk(&self, token: &str, calls: Value) -> Value {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers");
        let out = std::process::Command::new("node")
            .arg(format!("{dir}/mcp-client.mjs"))
            .current_dir(dir)
            .env("MCP_URL", format!("{}/api/mcp", self.base))
            .env("MCP_TOKEN", token)
            .env("MCP_CALLS", calls.to_string())
            .output()
            .expect("node runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    }
}

/// The text of a tool result.
fn text(result: &Value) -> String {
    result["content"][0]["text"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sdk_client_discovers_lists_and_calls_through_a_kept_connection() {
    let s = setup(&[]).await;
    let token = s.agent_token(&[AGENT_ROLE]);
    let calls = json!([
        ["list_connections", {}],
        ["call_provider_api", { "connection_id": "erp-1", "path": "items/42", "query": "expand=lines&limit=5" }],
        ["call_provider_api", { "connection_id": "erp-1", "method": "POST", "path": "items", "body": { "name": "x" } }],
        ["get_connection", { "connection_id": "erp-1" }],
        ["call_provider_api", { "connection_id": "hr-1", "path": "items" }],
        ["call_provider_api", { "connection_id": "erp-1", "path": "../../admin" }],
        ["start_connection", { "provider": "test", "connection_id": "erp-2" }],
        ["get_connection", { "connection_id": "nobody" }],
    ]);
    let out = s.sdk(&token, calls);
    // Discovery from the 401: the metadata names this resource and the issuer.
    assert_eq!(out["unauthenticated_status"], 401, "{out}");
    assert_eq!(out["resource_metadata_url"], format!("{}/api/mcp/.well-known/oauth-protected-resource", s.base));
    assert_eq!(out["resource"], format!("{}/api/mcp", s.base));
    assert_eq!(out["authorization_servers"], json!([s.issuer.url]));
    // Initialize at the SDK's latest revision; the four tools.
    assert!(out.get("connect_error").is_none(), "{out}");
    assert_eq!(out["protocol_version"], "2025-11-25", "{out}");
    assert_eq!(out["server"]["name"], "dynamics-companion");
    assert_eq!(out["tools"], json!(["list_connections", "get_connection", "call_provider_api", "start_connection"]));
    let calls = out["calls"].as_array().unwrap();
    // Only the provider agents may use is listed.
    let listed = &calls[0]["structuredContent"]["connections"];
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["connection_id"], "erp-1");
    // The provider's API through the connection: path and query as given.
    let got = &calls[1]["structuredContent"];
    assert_eq!(got["status"], 200, "{}", calls[1]);
    assert!(got["body"]["path"].as_str().unwrap().ends_with("/items/42"), "{got}");
    assert_eq!(got["body"]["query"], "expand=lines&limit=5");
    assert_eq!(calls[2]["structuredContent"]["body"]["method"], "POST");
    assert_eq!(calls[2]["structuredContent"]["body"]["body"], r#"{"name":"x"}"#);
    assert_eq!(calls[3]["structuredContent"]["status"], "active");
    // Refusals are tool errors the agent reads.
    assert_eq!(calls[4]["isError"], true);
    assert!(text(&calls[4]).contains("may not use connections of provider \"private\""), "{}", calls[4]);
    assert_eq!(calls[5]["isError"], true, "{}", calls[5]);
    assert_eq!(calls[6]["isError"], false, "{}", calls[6]);
    assert!(calls[6]["structuredContent"]["authorization_url"].as_str().unwrap().contains("code_challenge="));
    assert_eq!(calls[7]["isError"], true);
    // No access token in any result, nor in the logs.
    let tokens = s.peer.issued_tokens().await;
    assert!(!tokens.is_empty());
    for t in &tokens {
        assert!(!out.to_string().contains(t.as_str()), "a token in a tool result");
        assert!(!s.h.logs.all().contains(t.as_str()), "a token in the logs");
    }
    // Each tool call left an audit line with the caller.
    let audit = s.h.logs.all().lines().filter(|l| l.contains("mcp_tool_call")).count();
    assert!(audit >= 8, "{}", s.h.logs.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_requests_get_the_specifications_answers() {
    let s = setup(&[("MCP_ALLOWED_ROLES", AGENT_ROLE)]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/mcp", s.base);
    let init = json!({ "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": { "protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": { "name": "raw", "version": "0" } } });
    let post = |token: Option<String>, body: Value, headers: Vec<(&'static str, String)>| {
        let mut r = http.post(&url).json(&body).header("accept", "application/json, text/event-stream");
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        for (k, v) in headers {
            r = r.header(k, v);
        }
        r.send()
    };
    // A forged token: 401 with invalid_token and the metadata URL.
    let r = post(Some(s.issuer.forged()), init.clone(), vec![]).await.unwrap();
    assert_eq!(r.status(), 401);
    let www = r.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert!(www.contains("error=\"invalid_token\"") && www.contains("resource_metadata=\""), "{www}");
    // A valid token without the role MCP_ALLOWED_ROLES names: 403 insufficient_scope.
    let r = post(Some(s.agent_token(&[])), init.clone(), vec![]).await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("insufficient_scope"));
    // Another tenant's token (a single-tenant deployment): 401.
    let r = post(Some(s.issuer.token_in_tenant("aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa")), init.clone(), vec![])
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let agent = s.agent_token(&[AGENT_ROLE]);
    // An older revision is answered in kind; an unknown one with the latest.
    let v: Value = post(Some(agent.clone()), init.clone(), vec![]).await.unwrap().json().await.unwrap();
    assert_eq!(v["result"]["protocolVersion"], "2025-03-26", "{v}");
    let mut newer = init.clone();
    newer["params"]["protocolVersion"] = json!("2099-01-01");
    let v: Value = post(Some(agent.clone()), newer, vec![]).await.unwrap().json().await.unwrap();
    assert_eq!(v["result"]["protocolVersion"], "2025-11-25", "{v}");
    // A request naming an unsupported MCP-Protocol-Version header: 400.
    let list = json!({ "jsonrpc": "2.0", "id": 2, "method": "tools/list" });
    let r = post(Some(agent.clone()), list.clone(), vec![("mcp-protocol-version", "1999-01-01".into())]).await.unwrap();
    assert_eq!(r.status(), 400);
    // A notification: 202, no body. A batch, junk, an unknown method: JSON-RPC errors.
    let r = post(Some(agent.clone()), json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }), vec![])
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = post(Some(agent.clone()), json!([list.clone()]), vec![]).await.unwrap().json().await.unwrap();
    assert_eq!(v["error"]["code"], -32600);
    let v: Value = post(Some(agent.clone()), json!({ "jsonrpc": "2.0", "id": 3, "method": "resources/list" }), vec![])
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["error"]["code"], -32601);
    let v: Value = post(
        Some(agent.clone()),
        json!({ "jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": { "name": "drop_tables" } }),
        vec![],
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(v["error"]["code"], -32602);
    // Another site's page (DNS rebinding): 403. GET (no server stream): 405.
    let r = post(Some(agent.clone()), list.clone(), vec![("origin", "https://evil.example".into())]).await.unwrap();
    assert_eq!(r.status(), 403);
    let r = http.get(&url).bearer_auth(&agent).send().await.unwrap();
    assert_eq!(r.status(), 405);
    // A body over the limit: 413, nothing read.
    let big = json!({ "jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": { "name": "call_provider_api",
        "arguments": { "connection_id": "erp-1", "path": "items", "method": "POST", "body": "x".repeat(2 * 1024 * 1024) } } });
    let r = post(Some(agent.clone()), big, vec![]).await.unwrap();
    assert_eq!(r.status(), 413);
    // The metadata at both paths, without a token.
    for path in ["/api/mcp/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/api/mcp"] {
        let v: Value = http.get(format!("{}{path}", s.base)).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["resource"], url, "{path}");
    }
}
