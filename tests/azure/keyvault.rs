//! Secrets from Azure Key Vault through a managed identity: the Key Vault double over
//! TLS under its real host name (`dctest.vault.azure.net`, test CA in `SSL_CERT_FILE`),
//! answering the first request with the 401 challenge, and the App Service identity
//! endpoint. The handler's settings hold no secret at all.

use crate::support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::azure::AzureDoubles;
use support::issuer::Issuer;
use support::oidc::{CLIENT_SECRET, OidcPeer};
use support::{Handler, HandlerBuilder};

const PUBLIC: &str = "http://localhost:7071";
const CALLBACK: &str = "http://localhost:7071/api/oauth/callback";

struct World {
    azure: AzureDoubles,
    peer: OidcPeer,
    issuer: Issuer,
    keys: String,
}

async fn world() -> World {
    let keys = support::test_keys();
    let azure = AzureDoubles::start(json!({
        "secrets": { "token-encryption-keys": keys, "test-provider-secret": CLIENT_SECRET }
    }));
    World { azure, peer: OidcPeer::start(CALLBACK, json!({})), issuer: Issuer::start().await, keys }
}

impl World {
    fn builder(&self, ttl_secs: u64) -> HandlerBuilder {
        let mut b = HandlerBuilder::new()
            .without_env("TOKEN_ENCRYPTION_KEYS")
            .file("providers.toml", &self.peer.catalog("test", ""))
            .env("PUBLIC_BASE_URL", PUBLIC)
            .env("KEY_VAULT_URL", &self.azure.keyvault)
            .env("SECRETS_CACHE_SECONDS", ttl_secs.to_string())
            .env("AZURE_CREDENTIAL", "managed_identity")
            .env("IDENTITY_ENDPOINT", &self.azure.identity)
            .env("IDENTITY_HEADER", "test-identity-header")
            .env("SSL_CERT_FILE", &self.azure.ca);
        for (k, v) in self.issuer.settings() {
            b = b.env(k, v);
        }
        b
    }

    async fn connect(&self, h: &Handler, id: &str) {
        let bearer = self.issuer.token();
        let r = h
            .json(Method::POST, "/api/connections", Some(&bearer), &json!({ "provider": "test", "connection_id": id }))
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        let location = self.peer.consent(r.json()["authorization_url"].as_str().unwrap(), false).await;
        h.get(location.strip_prefix(PUBLIC).unwrap(), &[]).await.assert_html(200);
    }

    async fn refresh(&self, h: &Handler, id: &str) -> support::Reply {
        let bearer = self.issuer.token();
        h.json(Method::POST, &format!("/api/connections/{id}/token"), Some(&bearer), &json!({ "force_refresh": true }))
            .await
    }

    async fn secret_gets(&self, name: &str) -> u64 {
        self.azure.stats().await["keyvault"]["secret_gets"][name].as_u64().unwrap_or(0)
    }

    async fn rotate(&self, name: &str, value: &str) {
        self.azure.control(Method::POST, "secrets", Some(json!({ "name": name, "value": value }))).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oauth_flow_with_every_secret_from_key_vault() {
    let w = world().await;
    let h = w.builder(300).start().await;
    w.connect(&h, "kv-1").await;
    // Ten refreshes: each uses the client secret; the vault is read once per TTL.
    for _ in 0..10 {
        let r = w.refresh(&h, "kv-1").await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(w.peer.refresh_grants().await, 10);
    assert_eq!(w.secret_gets("test-provider-secret").await, 1);
    assert_eq!(w.secret_gets("token-encryption-keys").await, 1);
    let stats = w.azure.stats().await;
    assert!(stats["keyvault"]["challenges"].as_u64().unwrap() >= 1, "the SDK met the 401 challenge: {stats}");
    assert!(stats["identity"]["token_requests"].as_u64().unwrap() >= 1, "through the managed identity: {stats}");
    let health = h.get("/api/health", &[("Authorization", &format!("Bearer {}", w.issuer.token()))]).await.json();
    assert!(health["dependencies"]["secrets"]["source"].as_str().unwrap().contains("Key Vault"));
    let logs = h.logs.all();
    assert!(!logs.contains(CLIENT_SECRET) && !logs.contains(&w.keys), "no secret in the logs");
    assert!(logs.contains("managed identity"), "the credential choice is logged: {logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_is_used_after_the_ttl_without_a_restart() {
    let w = world().await;
    let h = w.builder(2).start().await;
    w.connect(&h, "kv-rot").await;

    // A wrong client secret in the vault: still the cached one until the TTL passes...
    w.rotate("test-provider-secret", "not-the-secret").await;
    assert_eq!(w.refresh(&h, "kv-rot").await.status, 200);
    // ...then the new value is used (the provider refuses it: proof it was picked up).
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = w.refresh(&h, "kv-rot").await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("invalid_client"), "{}", r.body);
    // The right secret again, picked up after the TTL, and the connection works.
    w.rotate("test-provider-secret", CLIENT_SECRET).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = w.refresh(&h, "kv-rot").await;
    assert_eq!(r.status, 200, "{}", r.body);

    // The token encryption keys rotate too: a new current key, the old one kept for
    // decryption. New tokens are sealed with the new key.
    let new_keys = format!("{},{}", support::test_keys().replacen("t1:", "t2:", 1), w.keys);
    w.rotate("token-encryption-keys", &new_keys).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = w.refresh(&h, "kv-rot").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let health = h.get("/api/health", &[("Authorization", &format!("Bearer {}", w.issuer.token()))]).await.json();
    assert_eq!(health["dependencies"]["encryption"]["current_key_id"], "t2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_vault_outage_after_start_keeps_the_app_working() {
    let w = world().await;
    let h = w.builder(1).start().await;
    w.connect(&h, "kv-out").await;
    w.azure.control(Method::POST, "outage", Some(json!({ "keyvault": { "mode": "503" } }))).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = w.refresh(&h, "kv-out").await;
    assert_eq!(r.status, 200, "the cached secret is used: {}", r.body);
    assert!(h.logs.wait_for_line(|l| l.contains("Key Vault unavailable; using the cached value")).is_some());
    w.azure.control(Method::POST, "outage", Some(json!({}))).await;
    assert_eq!(w.refresh(&h, "kv-out").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_missing_at_start_up_is_named_in_one_line() {
    let w = world().await;
    w.azure.control(Method::DELETE, "secrets/test-provider-secret", None).await;
    let (code, _, stderr) = w.builder(300).run_to_exit();
    assert_eq!(code, Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("test-provider-secret") && stderr.contains("Key Vault"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_the_table_and_fails_when_something_is_wrong() {
    let w = world().await;
    let (code, stdout, stderr) = w.builder(300).args(&["check"]).run_to_exit();
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    for row in ["secrets source", "secret token-encryption-keys", "secret test-provider-secret", "back-office issuer"] {
        let line = stdout.lines().find(|l| l.starts_with(row)).unwrap_or_else(|| panic!("no {row} row:\n{stdout}"));
        assert!(line.contains("  ok  "), "{line}");
    }
    assert!(stdout.contains("All ") && stdout.contains("checks passed"), "{stdout}");
    assert!(!stdout.contains(CLIENT_SECRET) && !stdout.contains(&w.keys), "no secret value is printed");

    w.azure.control(Method::DELETE, "secrets/test-provider-secret", None).await;
    let (code, stdout, _) = w.builder(300).args(&["check"]).run_to_exit();
    assert_eq!(code, Some(1), "{stdout}");
    let line = stdout.lines().find(|l| l.starts_with("secret test-provider-secret")).unwrap();
    assert!(line.contains("FAIL") && line.contains("not set"), "{line}");
    assert!(stdout.contains("1 of "), "{stdout}");
    let _: Value = Value::Null;
}

/// The outbound client's certificate check (one shared TLS configuration whose system
/// roots load on the first handshake): a server whose certificate no system root signed
/// (the doubles' test CA, which this test process does not trust) is refused at the
/// handshake, with rustls' reason, and nothing is sent to it.
#[tokio::test(flavor = "multi_thread")]
async fn the_outbound_client_refuses_a_certificate_no_system_root_signed() {
    let azure = AzureDoubles::start(json!({}));
    let client = dynamics_companion::support::outbound::client(std::time::Duration::from_secs(10)).unwrap();
    for _ in 0..2 {
        let err = client.get(&azure.ingestion).send().await.expect_err("an untrusted certificate is refused");
        assert!(err.is_connect(), "{err:?}");
        let chain = format!("{err:?}");
        assert!(chain.contains("UnknownIssuer") || chain.contains("certificate"), "{chain}");
    }
}
