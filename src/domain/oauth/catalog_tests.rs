//! Tests of the module that includes this file.
use super::*;

const GOOD: &str = r#"
    [providers.acme]
    authorization_url = "https://login.acme.example/authorize"
    token_url = "https://login.acme.example/token"
    client_id = "dc"
    client_secret = "acme-client-secret"
    scopes = ["offline_access", "api.read"]
    api_base_url = "https://api.acme.example/v1"
    [providers.acme.token_response]
    path = "data"
"#;

#[test]
fn parses_a_provider_with_defaults() {
    let c = Catalog::parse(GOOD).unwrap();
    let p = c.get("acme").unwrap();
    assert_eq!(p.client_auth, ClientAuth::ClientSecretBasic);
    assert!(p.pkce);
    assert_eq!(p.scope_separator, " ");
    assert_eq!(p.api_base_url.as_ref().unwrap().as_str(), "https://api.acme.example/v1/");
    assert_eq!(p.token_response.path.as_deref(), Some("data"));
    assert_eq!(c.secret_names(), vec!["acme-client-secret"]);
}

#[test]
fn portal_proxy_rules_match_methods_and_paths() {
    let text = format!(
        "{GOOD}\n[providers.acme.portal]\nenabled = true\nproxy = [{{ methods = [\"GET\"], paths = [\"items\", \"items/*\"] }}]\n"
    );
    let c = Catalog::parse(&text).unwrap();
    let portal = &c.get("acme").unwrap().portal;
    assert!(portal.enabled);
    assert!(portal.allows("GET", "items"));
    assert!(portal.allows("get", "/items/42/lines"));
    assert!(!portal.allows("POST", "items/42"));
    assert!(!portal.allows("GET", "admin/users"));
    assert!(!portal.allows("GET", "itemsx"));
}

#[test]
fn a_per_connection_key_resolves_only_in_its_one_spelling_and_nothing_else_is_kept() {
    let c =
        Catalog::parse("[providers.ns]\npreset = \"netsuite\"\nclient_id = \"dc\"\nclient_secret = \"s\"\n").unwrap();
    let long = "1".repeat(900_000);
    let refused = [
        format!("ns?account=1234567-sb1&account={long}"),
        "ns?account=1234567-sb1&account=7654321".to_string(),
        "ns?account=1234567-sb1&host=evil.example".to_string(),
        "ns?account=1234567%2Dsb1".to_string(),
        format!("ns?account={}", "1".repeat(70)),
        "ns?account=1234567-sb1&".to_string(),
        "ns?account=evil.example%2Fx".to_string(),
    ];
    for key in &refused {
        assert!(c.get(key).is_none(), "{} is refused", &key[..key.len().min(80)]);
    }
    assert_eq!(c.resolved.lock().unwrap().len(), 0, "nothing refused was kept");
    let key = c.instance_key("ns", &BTreeMap::from([("account".into(), "1234567-sb1".into())])).unwrap();
    assert_eq!(key, "ns?account=1234567-sb1");
    assert!(c.get(&key).is_some());
    assert_eq!(c.resolved.lock().unwrap().len(), 1);
}

#[test]
fn rejects_what_would_be_unsafe_or_ambiguous() {
    let cases = [
        (GOOD.replace("https://login.acme.example/token", "http://login.acme.example/token"), "https"),
        (GOOD.replace("client_secret = \"acme-client-secret\"", "client_secret = \"s3cr3t value!\""), "secret name"),
        (GOOD.replace("scopes =", "authorization_params = { state = \"x\" }\nscopes ="), "state"),
        (GOOD.replace("client_id = \"dc\"", "client_id = \"dc\"\nclient_secrett = \"x\""), "unknown field"),
        (GOOD.replace("scopes =", "proxy_headers = [\"X-HTTP-Method-Override\"]\nscopes ="), "never forwards"),
        (GOOD.replace("scopes =", "proxy_headers = [\"X-Forwarded-Host\"]\nscopes ="), "never forwards"),
    ];
    for (text, needle) in cases {
        let err = Catalog::parse(&text).unwrap_err();
        assert!(err.to_string().contains(needle), "{err:?} should mention {needle:?}");
    }
}

#[test]
fn the_authorization_request_carries_pkce_state_and_extra_params() {
    let text = GOOD.replace(
        "api_base_url",
        "scope_separator = \",\"\nauthorization_params = { prompt = \"consent\" }\napi_base_url",
    );
    let p = Catalog::parse(&text).unwrap().get("acme").unwrap();
    let url = p.authorization_request(
        &Url::parse("https://dc.example/api/oauth/callback").unwrap(),
        &crate::domain::oauth::State::new("st"),
        Some("ch"),
        &["a".into(), "b".into()],
    );
    let q: HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], "dc");
    assert_eq!(q["scope"], "a,b");
    assert_eq!(q["state"], "st");
    assert_eq!((q["code_challenge"].as_ref(), q["code_challenge_method"].as_ref()), ("ch", "S256"));
    assert_eq!(q["prompt"], "consent");
    assert_eq!(q["redirect_uri"], "https://dc.example/api/oauth/callback");
}
