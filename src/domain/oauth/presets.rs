//! Provider presets built into the binary (`presets.toml`): `preset = "xero"` in a
//! providers.toml entry fills in a provider's URLs, scopes, PKCE, issuer and response
//! quirks, so the entry adds only its client id and the secret's name.
//!
//! A preset's URLs may hold `{param}` placeholders (an account, an instance, a region),
//! filled from the entry's `params`. Each value must match the preset's pattern for it,
//! and each filled URL's host must match one of the preset's `hosts`: a value cannot
//! point the handler at another host, whatever characters it holds.

use std::sync::LazyLock;

use toml::{Table, Value};

static PRESETS: LazyLock<Table> = LazyLock::new(|| {
    let text = include_str!("presets.toml");
    let mut doc: Table = toml::from_str(text).unwrap_or_default();
    match doc.remove("presets") {
        Some(Value::Table(t)) => t,
        _ => Table::new(),
    }
});

/// The fields a preset has beyond a providers.toml entry's.
const PRESET_ONLY: [&str; 5] = ["docs", "checked", "notes", "params", "hosts"];
/// The fields that may hold `{param}` placeholders.
const URL_FIELDS: [&str; 6] =
    ["authorization_url", "token_url", "refresh_url", "revocation_url", "issuer", "api_base_url"];

/// One preset, for `handler providers`.
#[derive(Debug, Clone)]
pub struct PresetInfo {
    pub name: String,
    pub display_name: String,
    pub docs: String,
    /// When the preset was last checked against `docs` (`YYYY-MM-DD`).
    pub checked: String,
    pub params: Vec<String>,
    pub notes: Option<String>,
}

/// Every preset, by name.
pub fn list() -> Vec<PresetInfo> {
    PRESETS
        .iter()
        .map(|(name, v)| {
            let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
            PresetInfo {
                name: name.clone(),
                display_name: s("display_name").unwrap_or_else(|| name.clone()),
                docs: s("docs").unwrap_or_default(),
                checked: s("checked").unwrap_or_default(),
                params: v
                    .get("params")
                    .and_then(Value::as_table)
                    .map(|t| t.keys().cloned().collect())
                    .unwrap_or_default(),
                notes: s("notes"),
            }
        })
        .collect()
}

/// One preset as `handler providers NAME` prints it: every field with the defaults the
/// handler applies, `{param}` placeholders left in, each parameter's pattern.
pub fn describe(name: &str) -> Option<String> {
    let v = PRESETS.get(name)?.as_table()?;
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let list = |k: &str| {
        v.get(k).and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
    };
    let table = |k: &str| {
        v.get(k).and_then(Value::as_table).map(|t| {
            t.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
                .collect::<Vec<_>>()
                .join("&")
        })
    };
    let mut out = vec![format!("{name}: {}", s("display_name").unwrap_or_else(|| name.to_string()))];
    let mut row = |k: &str, v: Option<String>| out.push(format!("  {k:<26} {}", v.unwrap_or_else(|| "-".into())));
    row("authorization_url", s("authorization_url"));
    row("authorization_params", table("authorization_params"));
    row("token_url", s("token_url"));
    row("token_params", table("token_params"));
    row("refresh_url", s("refresh_url").or(Some("(token_url)".into())));
    row("revocation_url", s("revocation_url").or(Some("- (no RFC 7009 revocation)".into())));
    row("api_base_url", s("api_base_url"));
    row("scopes", list("scopes"));
    row("scope_separator", Some(format!("{:?}", s("scope_separator").unwrap_or_else(|| " ".into()))));
    row("client_auth", Some(s("client_auth").unwrap_or_else(|| "client_secret_basic".into())));
    row("pkce", Some(v.get("pkce").and_then(Value::as_bool).unwrap_or(true).to_string()));
    let required = v.get("issuer_required").and_then(Value::as_bool).unwrap_or(true);
    row(
        "issuer (RFC 9207 iss)",
        s("issuer").map(|i| format!("{i} ({})", if required { "required" } else { "checked when sent" })),
    );
    row("proxy_headers", list("proxy_headers"));
    row("hosts", list("hosts").or(Some("(the URLs' own hosts)".into())));
    if let Some(params) = v.get("params").and_then(Value::as_table) {
        for (p, spec) in params {
            let pattern = spec.get("pattern").and_then(Value::as_str).unwrap_or("");
            row(&format!("param {p}"), Some(format!("pattern {pattern}")));
        }
    }
    if let Some(t) = v.get("token_response").and_then(Value::as_table) {
        for (k, v) in t {
            row(&format!("token_response.{k}"), Some(v.to_string()));
        }
    }
    row("refresh_keepalive_seconds", v.get("refresh_keepalive_seconds").map(|n| n.to_string()));
    row("notes", s("notes"));
    row("docs", s("docs"));
    row("checked", s("checked"));
    Some(out.join("\n") + "\n")
}

/// A preset entry applied: complete, or waiting for parameters each connection names.
#[derive(Debug, Clone)]
pub enum Applied {
    Complete(Table),
    PerConnection(Template),
}

/// An entry whose preset takes parameters the entry does not fix (no value, no default):
/// each connection names them when it starts (`params` in the start request).
#[derive(Debug, Clone)]
pub struct Template {
    preset: String,
    table: Table,
    specs: Vec<(String, String)>,
    fixed: Vec<(String, String)>,
    hosts: Vec<String>,
}

impl Template {
    /// The parameters a connection must name.
    pub fn open_params(&self) -> Vec<&str> {
        self.specs.iter().map(|(p, _)| p.as_str()).filter(|p| !self.fixed.iter().any(|(f, _)| f == p)).collect()
    }

    /// The entry for one connection's parameters: each checked against its pattern, every
    /// filled URL against the preset's hosts.
    pub fn fill(&self, given: &[(String, String)]) -> Result<Table, PresetError> {
        let open = self.open_params();
        for (k, _) in given {
            if !open.contains(&k.as_str()) {
                return Err(PresetError::NoConnectionParam {
                    preset: self.preset.clone(),
                    param: k.clone(),
                    takes: none_if_empty(&open),
                });
            }
        }
        let mut values = self.fixed.clone();
        for p in &open {
            let v = given
                .iter()
                .find(|(k, _)| k == p)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| PresetError::NeedsParam { preset: self.preset.clone(), param: p.to_string() })?;
            values.push((p.to_string(), v));
        }
        check_values(&self.preset, &self.specs, &values)?;
        fill_urls(&self.preset, self.table.clone(), &values, &self.hosts)
    }

    /// A field of the entry (`client_secret`, `refresh_keepalive_seconds`), before filling.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.table.get(name)
    }
}

/// The entry with its preset applied: the preset's fields under the entry's own (tables
/// such as `authorization_params` merged key by key), placeholders filled and checked.
/// An entry without `preset` comes back as it was.
pub fn apply(mut entry: Table) -> Result<Applied, PresetError> {
    let Some(name) = entry.remove("preset") else { return Ok(Applied::Complete(entry)) };
    let name = name.as_str().ok_or(PresetError::NotAName)?.to_string();
    let preset = PRESETS.get(&name).and_then(Value::as_table).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.keys().map(String::as_str).collect();
        PresetError::NoPreset { name: name.clone(), known: names.join(", ") }
    })?;
    let params_spec = preset.get("params").and_then(Value::as_table).cloned().unwrap_or_default();
    let specs: Vec<(String, String)> = params_spec
        .iter()
        .map(|(p, spec)| {
            (p.clone(), spec.get("pattern").and_then(Value::as_str).unwrap_or("^[a-z0-9-]{1,63}$").to_string())
        })
        .collect();
    let hosts: Vec<String> = preset
        .get("hosts")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_ascii_lowercase).collect())
        .unwrap_or_default();
    let given = match entry.remove("params") {
        Some(Value::Table(t)) => t,
        None => Table::new(),
        Some(_) => return Err(PresetError::ParamsNotTable),
    };
    for key in given.keys() {
        if !params_spec.contains_key(key) {
            let known: Vec<&str> = params_spec.keys().map(String::as_str).collect();
            return Err(PresetError::NoParam { preset: name, param: key.clone(), takes: none_if_empty(&known) });
        }
    }
    let mut values = Vec::new();
    let mut missing = false;
    for (param, spec) in &params_spec {
        let value = match given.get(param) {
            Some(v) => Some(v.as_str().ok_or_else(|| PresetError::ParamNotString(param.clone()))?.to_string()),
            None => spec.get("default").and_then(Value::as_str).map(str::to_string),
        };
        match value {
            Some(v) => values.push((param.clone(), v)),
            None => missing = true,
        }
    }
    check_values(&name, &specs, &values)?;
    let mut merged: Table = preset
        .iter()
        .filter(|(k, _)| !PRESET_ONLY.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in entry {
        match (merged.get_mut(&k), v) {
            (Some(Value::Table(base)), Value::Table(over)) => base.extend(over),
            (_, v) => {
                merged.insert(k, v);
            }
        }
    }
    if missing {
        return Ok(Applied::PerConnection(Template { preset: name, table: merged, specs, fixed: values, hosts }));
    }
    Ok(Applied::Complete(fill_urls(&name, merged, &values, &hosts)?))
}

fn check_values(preset: &str, specs: &[(String, String)], values: &[(String, String)]) -> Result<(), PresetError> {
    for (param, value) in values {
        let pattern = specs.iter().find(|(p, _)| p == param).map(|(_, pat)| pat.as_str()).unwrap_or("^$");
        let re = regex::Regex::new(pattern).map_err(|e| PresetError::BadPattern {
            preset: preset.to_string(),
            param: param.clone(),
            reason: e.to_string(),
        })?;
        if !re.is_match(value) {
            // The preset's words for it when it has some (a NetSuite account id's host form),
            // then the pattern.
            let hint = PRESETS
                .get(preset)
                .and_then(|p| p.get("params"))
                .and_then(|p| p.get(param.as_str()))
                .and_then(|p| p.get("hint"))
                .and_then(Value::as_str)
                .map(|h| format!("{h}; "))
                .unwrap_or_default();
            return Err(PresetError::Invalid {
                preset: preset.to_string(),
                param: param.clone(),
                value: value.clone(),
                hint,
                pattern: pattern.to_string(),
            });
        }
    }
    Ok(())
}

fn fill_urls(
    preset: &str,
    mut table: Table,
    values: &[(String, String)],
    hosts: &[String],
) -> Result<Table, PresetError> {
    for field in URL_FIELDS {
        let Some(Value::String(url)) = table.get_mut(field) else { continue };
        if !url.contains('{') {
            continue;
        }
        for (param, value) in values {
            *url = url.replace(&format!("{{{param}}}"), value);
        }
        if url.contains('{') {
            return Err(PresetError::Unfilled { field, url: url.clone() });
        }
        let host = url::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
            .ok_or_else(|| PresetError::NotUrl { field, url: url.clone() })?;
        if !hosts.iter().any(|h| host_matches(h, &host)) {
            return Err(PresetError::Host { field, host, preset: preset.to_string(), hosts: hosts.join(", ") });
        }
    }
    Ok(table)
}

/// Why a preset cannot make an entry (the sentence follows `provider "name": `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresetError {
    #[error("preset must be a preset's name")]
    NotAName,
    #[error("there is no preset {name:?} (handler providers lists them: {known})")]
    NoPreset { name: String, known: String },
    #[error("params must be a table (params = {{ account = \"...\" }})")]
    ParamsNotTable,
    #[error("preset {preset:?} has no parameter {param:?} (it takes: {takes})")]
    NoParam { preset: String, param: String, takes: String },
    #[error("params.{0} must be a string")]
    ParamNotString(String),
    #[error("{preset} takes no connection parameter {param:?} (it takes: {takes})")]
    NoConnectionParam { preset: String, param: String, takes: String },
    #[error("{preset} needs the connection parameter {param:?} (params: {{\"{param}\": \"...\"}})")]
    NeedsParam { preset: String, param: String },
    #[error("preset {preset:?}: bad pattern for {param}: {reason}")]
    BadPattern { preset: String, param: String, reason: String },
    /// `hint`: the preset's words for the value when it has some, ending in "; ".
    #[error("params.{param} {value:?} is not a valid {param} for {preset} ({hint}expected {pattern})")]
    Invalid { preset: String, param: String, value: String, hint: String, pattern: String },
    #[error("{field} {url:?} has a placeholder no parameter fills")]
    Unfilled { field: &'static str, url: String },
    #[error("{field} {url:?} is not a URL")]
    NotUrl { field: &'static str, url: String },
    #[error("{field}: host {host:?} is not one of {preset}'s hosts ({hosts})")]
    Host { field: &'static str, host: String, preset: String, hosts: String },
}

fn none_if_empty(list: &[&str]) -> String {
    if list.is_empty() { "none".into() } else { list.join(", ") }
}

/// `*.example.com` matches any host under example.com (not example.com itself); other
/// patterns match exactly.
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::oauth::catalog::Catalog;

    /// An entry for every preset, with sample parameters.
    fn sample(name: &str) -> String {
        let info = list().into_iter().find(|p| p.name == name).unwrap();
        let params: Vec<String> = info
            .params
            .iter()
            .map(|p| {
                let v = match p.as_str() {
                    "shard" => "eu1",
                    "domain" => "contoso.okta.com",
                    "tenant" => "organizations",
                    _ => "contoso",
                };
                format!("{p} = \"{v}\"")
            })
            .collect();
        format!(
            "[providers.{name}]\npreset = \"{name}\"\nclient_id = \"c\"\nclient_secret = \"s\"\nparams = {{ {} }}\n",
            params.join(", ")
        )
    }

    #[test]
    fn every_preset_parses_cites_its_docs_and_uses_https() {
        let presets = list();
        assert!(presets.len() >= 20, "{} presets", presets.len());
        for p in &presets {
            assert!(p.docs.starts_with("https://"), "{}: docs {:?}", p.name, p.docs);
            assert!(p.checked.as_str() >= "2026-12-01" && p.checked.len() == 10, "{}: checked {:?}", p.name, p.checked);
            assert!(super::describe(&p.name).is_some_and(|d| d.contains(&p.docs)), "{}", p.name);
            let catalog = Catalog::parse(&sample(&p.name)).unwrap_or_else(|e| panic!("{}: {e}", p.name));
            let provider = catalog.get(&p.name).unwrap();
            let mut urls = vec![&provider.authorization_url, &provider.token_url];
            urls.extend(provider.revocation_url.iter());
            urls.extend(provider.refresh_url.iter());
            urls.extend(provider.api_base_url.iter());
            for u in urls {
                assert_eq!(u.scheme(), "https", "{}: {u}", p.name);
            }
        }
    }

    #[test]
    fn parameters_are_checked_and_cannot_move_the_host() {
        let entry = |params: &str| {
            format!(
                "[providers.n]\npreset = \"netsuite\"\nclient_id = \"c\"\nclient_secret = \"s\"\nparams = {{ {params} }}\n"
            )
        };
        let ok = Catalog::parse(&entry("account = \"1234567-sb1\"")).unwrap();
        let n = ok.get("n").unwrap();
        assert_eq!(n.token_url.host_str(), Some("1234567-sb1.suitetalk.api.netsuite.com"));
        assert_eq!(n.scopes, ["rest_webservices"]);
        for (params, needle) in [
            ("account = \"evil.example/x?\"", "not a valid account"),
            ("account = \"a.evil.com#\"", "not a valid account"),
            ("account = \"1234567_SB1\"", "write 1234567_SB1 as 1234567-sb1"),
            ("account = \"a\", region = \"eu\"", "no parameter \"region\""),
        ] {
            let err = Catalog::parse(&entry(params)).unwrap_err();
            assert!(err.to_string().contains(needle), "{params}: {err}");
        }
        let err = Catalog::parse("[providers.x]\npreset = \"nope\"\nclient_id = \"c\"\n").unwrap_err();
        assert!(err.to_string().contains("no preset \"nope\""), "{err}");
    }

    /// Issue [4/7]: what the providers document on 2026-12-03.
    #[test]
    fn presets_follow_their_providers_2026_changes() {
        let with = |preset: &str, params: &str| {
            let text = format!(
                "[providers.p]\npreset = \"{preset}\"\nclient_id = \"c\"\nclient_secret = \"s\"\nparams = {{ {params} }}\n"
            );
            Catalog::parse(&text)
        };
        // Salesforce: a sandbox, a Developer Edition and a scratch org's My Domain.
        for (domain, host) in [
            ("acme--uat.sandbox", "acme--uat.sandbox.my.salesforce.com"),
            ("acme-dev-ed.develop", "acme-dev-ed.develop.my.salesforce.com"),
            ("acme.scratch", "acme.scratch.my.salesforce.com"),
            ("acme", "acme.my.salesforce.com"),
        ] {
            let c = with("salesforce", &format!("my_domain = \"{domain}\"")).unwrap();
            assert_eq!(c.get("p").unwrap().token_url.host_str(), Some(host));
        }
        for evil in ["acme.evil.com", "acme--uat.evil", "acme.sandbox", "a/b"] {
            assert!(with("salesforce", &format!("my_domain = \"{evil}\"")).is_err(), "{evil}");
        }
        // HubSpot's dated token endpoints; Shopify's expiring offline tokens and API version;
        // Sign for Government on its own preset, not a shard of adobesign.com.
        let hubspot =
            Catalog::parse("[providers.h]\npreset = \"hubspot\"\nclient_id = \"c\"\nclient_secret = \"s\"\n").unwrap();
        let h = hubspot.get("h").unwrap();
        assert_eq!(h.token_url.as_str(), "https://api.hubapi.com/oauth/2026-03/token");
        assert_eq!(h.revocation_url.as_ref().unwrap().as_str(), "https://api.hubapi.com/oauth/2026-03/token/revoke");
        let shop = with("shopify", "shop = \"acme\"").unwrap();
        let s = shop.get("p").unwrap();
        assert_eq!(s.token_params, [("expiring".to_string(), "1".to_string())]);
        assert!(s.api_base_url.as_ref().unwrap().as_str().ends_with("/admin/api/2026-10/"));
        assert!(with("adobe-sign", "shard = \"gov1\"").is_err());
        let gov =
            Catalog::parse("[providers.g]\npreset = \"adobe-sign-gov\"\nclient_id = \"c\"\nclient_secret = \"s\"\n")
                .unwrap();
        assert_eq!(gov.get("g").unwrap().token_url.host_str(), Some("secure.na1.adobesign.us"));
        // Google's iss is checked when sent, not required.
        let google =
            Catalog::parse("[providers.g]\npreset = \"google\"\nclient_id = \"c\"\nclient_secret = \"s\"\n").unwrap();
        let g = google.get("g").unwrap();
        assert_eq!((g.issuer.as_deref(), g.issuer_required), (Some("https://accounts.google.com"), false));
    }

    #[test]
    fn parameters_left_to_each_connection_are_checked_when_it_starts() {
        let text = "[providers.ns]\npreset = \"netsuite\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
        let c = Catalog::parse(text).unwrap();
        assert!(c.get("ns").is_none(), "no provider without its account");
        assert_eq!(c.per_connection().collect::<Vec<_>>(), [("ns", vec!["account"])]);
        assert_eq!(c.secret_names(), ["s"]);
        let params = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let key = c.instance_key("ns", &params(&[("account", "1234567-sb1")])).unwrap();
        assert_eq!(key, "ns?account=1234567-sb1");
        let p = c.get(&key).unwrap();
        assert_eq!(p.token_url.host_str(), Some("1234567-sb1.suitetalk.api.netsuite.com"));
        assert_eq!(p.name, key);
        for (given, needle) in [
            (params(&[("account", "evil.example/x?")]), "not a valid account"),
            (params(&[]), "needs the connection parameter \"account\""),
            (params(&[("account", "a"), ("region", "eu")]), "no connection parameter \"region\""),
        ] {
            let err = c.instance_key("ns", &given).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
        // A key that did not come from instance_key is checked all the same.
        assert!(c.get("ns?account=evil.example%2Fx").is_none());
        let fixed = "[providers.x]\npreset = \"xero\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
        let err = Catalog::parse(fixed).unwrap().instance_key("x", &params(&[("a", "b")])).unwrap_err();
        assert!(err.to_string().contains("takes no connection parameters"), "{err}");
    }

    #[test]
    fn the_entry_overrides_and_adds_to_the_preset() {
        let text = "[providers.g]\npreset = \"google\"\nclient_id = \"c\"\nclient_secret = \"s\"\nscopes = [\"openid\"]\nauthorization_params = { login_hint = \"a@b.example\" }\n";
        let c = Catalog::parse(text).unwrap();
        let g = c.get("g").unwrap();
        assert_eq!(g.scopes, ["openid"]);
        let params: std::collections::BTreeMap<_, _> = g.authorization_params.iter().cloned().collect();
        assert_eq!(params["access_type"], "offline", "kept from the preset");
        assert_eq!(params["login_hint"], "a@b.example", "added by the entry");
        assert_eq!(g.display_name, "Google");
    }
}
