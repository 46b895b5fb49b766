//! Application Insights export: a request span continues the caller's trace and carries
//! the host's invocation id, outbound calls are its children and send the trace on, log
//! records join the operation, counters are exported, uploads authenticate with the
//! managed identity, and nothing secret leaves. The ingestion endpoint is the double in
//! tests/peers/azure.mjs with local authentication disabled, as the Bicep sets it.

use crate::support;

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use support::azure::AzureDoubles;
use support::flow::{Setup, world};

const UAMI: &str = "4c6f1b0e-2a3d-4e5f-8a9b-0c1d2e3f4a5b";

fn base_type(item: &Value) -> &str {
    item["data"]["baseType"].as_str().unwrap_or_default()
}

fn operation(item: &Value) -> &str {
    item["tags"]["ai.operation.id"].as_str().unwrap_or_default()
}

fn parent(item: &Value) -> &str {
    item["tags"]["ai.operation.parentId"].as_str().unwrap_or_default()
}

fn find<'a>(items: &'a [Value], kind: &str, trace: &str) -> Vec<&'a Value> {
    items.iter().filter(|i| base_type(i) == kind && operation(i) == trace).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_and_their_outbound_calls_are_exported_as_one_operation() {
    let azure = AzureDoubles::start(json!({
        "user_assigned_client_ids": [UAMI],
        "ingestion": { "disable_local_auth": true },
    }));
    let env = vec![
        (
            "APPLICATIONINSIGHTS_CONNECTION_STRING",
            format!("InstrumentationKey={};IngestionEndpoint={}", azure.instrumentation_key, azure.ingestion),
        ),
        ("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", format!("ClientId={UAMI};Authorization=AAD")),
        ("IDENTITY_ENDPOINT", azure.identity.clone()),
        ("IDENTITY_HEADER", "test-identity-header".into()),
        ("SSL_CERT_FILE", azure.ca.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ("OTEL_BLRP_SCHEDULE_DELAY", "100".into()),
    ];
    let mut w = world(Setup { env, ..Default::default() }).await;

    // The callback, reached with the host's trace context and invocation id.
    let (trace1, caller1, invocation1) =
        ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "0b9f3c2e-6d4a-4f1b-9e8d-7c6b5a493827");
    let started = w.start(json!({ "provider": "test", "connection_id": "erp-t", "owner": "account:42" })).await;
    let callback = w.consent(started["authorization_url"].as_str().unwrap()).await;
    let traceparent1 = format!("00-{trace1}-{caller1}-01");
    w.h.get(
        &callback,
        &[("Accept", "text/html"), ("traceparent", &traceparent1), ("X-Azure-Functions-InvocationId", invocation1)],
    )
    .await
    .assert_html(200);

    // A proxied call: the provider's API echoes the headers it received.
    let (trace2, caller2) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let traceparent2 = format!("00-{trace2}-{caller2}-01");
    let auth = format!("Bearer {}", w.bearer);
    let proxied =
        w.h.forward(
            Method::GET,
            "/api/connections/erp-t/proxy/items/7?api_key=never-exported",
            &[("Authorization", &auth), ("traceparent", &traceparent2)],
            None,
        )
        .await;
    assert_eq!(proxied.status, 200, "{}", proxied.body);
    let sent = proxied.json()["headers"]["traceparent"].as_str().expect("the upstream got a traceparent").to_string();
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts.len(), 4, "{sent}");
    assert_eq!((parts[0], parts[1], parts[3]), ("00", trace2, "01"), "the trace goes on: {sent}");
    assert_ne!(parts[2], caller2, "the upstream's parent is our outbound span, not the caller's: {sent}");

    // A refresh, for the counter, with the access token it returns kept to look for.
    let token = w.token("erp-t", true).await;
    assert_eq!(token.status, 200, "{}", token.body);
    let access_token = token.json()["access_token"].as_str().unwrap().to_string();

    // Spans and logs are exported within a second or so; wait for what we look for.
    let deadline = Instant::now() + Duration::from_secs(20);
    let items = loop {
        let items = azure.telemetry().await["items"].as_array().cloned().unwrap_or_default();
        let ready = !find(&items, "RequestData", trace1).is_empty()
            && !find(&items, "RequestData", trace2).is_empty()
            && items.iter().any(|i| base_type(i) == "RemoteDependencyData" && i["data"]["baseData"]["id"] == parts[2])
            && !find(&items, "MessageData", trace1).is_empty();
        if ready {
            break items;
        }
        assert!(Instant::now() < deadline, "telemetry did not arrive: {}", Value::Array(items));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // The callback's request: the caller's trace, parented on the caller's span, with the
    // host's invocation id, named by route, without its query.
    let requests = find(&items, "RequestData", trace1);
    assert_eq!(requests.len(), 1, "{requests:?}");
    let request = requests[0];
    let data = &request["data"]["baseData"];
    assert_eq!(parent(request), caller1);
    assert_eq!(data["properties"]["faas.invocation_id"], invocation1, "{data}");
    assert_eq!(data["name"], "GET /api/oauth/callback", "{data}");
    assert_eq!(data["responseCode"], "200", "{data}");
    assert_eq!(request["tags"]["ai.operation.name"], "GET /api/oauth/callback", "{request}");
    let request_id = data["id"].as_str().unwrap();

    // Its outbound call (the code exchange at the provider's token endpoint) is its child.
    let deps = find(&items, "RemoteDependencyData", trace1);
    let exchange = deps
        .iter()
        .find(|d| d["data"]["baseData"]["data"].as_str().is_some_and(|u| u.ends_with("/token")))
        .unwrap_or_else(|| panic!("no token-endpoint dependency in {deps:?}"));
    assert_eq!(parent(exchange), request_id, "{exchange}");
    assert_eq!(exchange["data"]["baseData"]["resultCode"], "200", "{exchange}");
    assert_eq!(exchange["data"]["baseData"]["type"], "HTTP", "{exchange}");
    // Named by the method and host (recorded on the span after it was opened).
    let name = exchange["data"]["baseData"]["name"].as_str().unwrap_or_default();
    assert!(name.starts_with("POST ") && !name.contains("/token"), "{exchange}");

    // The request's log line is a trace record of the same operation, under the request.
    let logs = find(&items, "MessageData", trace1);
    assert!(logs.iter().any(|l| parent(l) == request_id), "{logs:?}");

    // The proxied call: its dependency is the span whose id the upstream received.
    let request2 = find(&items, "RequestData", trace2)[0];
    assert_eq!(parent(request2), caller2);
    let dep2 = items.iter().find(|i| i["data"]["baseData"]["id"] == parts[2]).unwrap();
    assert_eq!(operation(dep2), trace2);
    assert_eq!(parent(dep2), request2["data"]["baseData"]["id"].as_str().unwrap(), "{dep2}");

    // Counters are exported when the handler stops (and every minute while it runs).
    assert_eq!(w.h.terminate(), Some(0));
    let telemetry = azure.telemetry().await;
    let all = telemetry["items"].as_array().cloned().unwrap_or_default();
    let refreshes: Vec<&Value> = all
        .iter()
        .filter(|i| base_type(i) == "MetricData")
        .filter(|i| i["data"]["baseData"]["metrics"][0]["name"] == "dc.token.refreshes")
        .collect();
    assert!(
        refreshes.iter().any(|m| m["data"]["baseData"]["properties"]["outcome"] == "granted"),
        "no refresh counter in {}",
        Value::Array(all.clone())
    );

    // Every upload carried the managed identity's token (local auth is off) and was taken.
    let uploads = telemetry["uploads"].as_array().unwrap();
    assert!(!uploads.is_empty());
    for u in uploads {
        assert_eq!(u["authorization"], "bearer", "{u}");
        assert_eq!(u["client_id"], UAMI, "{u}");
        assert_eq!(u["status"], 200, "{u}");
    }

    // Nothing secret left the process: codes, states, tokens, the proxied query.
    let text = Value::Array(all).to_string();
    let mut secrets = w.seen.lock().unwrap().clone();
    secrets.extend([access_token, w.bearer.clone(), "never-exported".to_string()]);
    for secret in secrets {
        assert!(!text.contains(&secret), "{secret} was exported");
    }
}
