//! `handler check`: proves a configuration works before it is deployed or while it runs.
//!
//! It loads the configuration, resolves every secret it names, gets a token for every
//! Azure resource it uses (and calls Dataverse's `WhoAmI`), loads the back-office
//! issuer's signing keys and opens the store, and prints one row per check. It never
//! prints a secret value. Every check runs even after a failure, so one run shows all
//! that is wrong.

use std::sync::Arc;

use secrecy::ExposeSecret;

use crate::app;
use crate::clients::auth::BearerVerifier;
use crate::clients::azure::TokenSource;
use crate::clients::dataverse::Dataverse;
use crate::clients::secrets::{SecretSource, SettingsSecrets};
use crate::domain::oauth::catalog::Catalog;
use crate::support::config::{CaptureMode, Config, CredentialConfig, Settings, StoreConfig};
use crate::support::crypto::Keyring;
use crate::support::outbound::one_line;

pub struct Row {
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
}

impl Report {
    fn add(&mut self, check: impl Into<String>, result: Result<String, String>) -> bool {
        let ok = result.is_ok();
        let detail = result.unwrap_or_else(|e| e);
        self.rows.push(Row { check: check.into(), ok, detail: one_line(&detail) });
        ok
    }

    pub fn ok(&self) -> bool {
        self.rows.iter().all(|r| r.ok)
    }

    /// The table, aligned for a terminal.
    pub fn render(&self) -> String {
        let width = self.rows.iter().map(|r| r.check.len()).max().unwrap_or(5).max(5);
        let mut out = format!("{:width$}  {:6}  {}\n", "CHECK", "RESULT", "DETAIL");
        for r in &self.rows {
            out.push_str(&format!("{:width$}  {:6}  {}\n", r.check, if r.ok { "ok" } else { "FAIL" }, r.detail));
        }
        let failed = self.rows.iter().filter(|r| !r.ok).count();
        out.push_str(&if failed == 0 {
            format!("All {} checks passed.\n", self.rows.len())
        } else {
            format!("{failed} of {} checks failed.\n", self.rows.len())
        });
        out
    }
}

pub async fn run(settings: Settings, config: Config) -> Report {
    let mut report = Report::default();
    report.add(
        "configuration",
        Ok(format!(
            "store {}, capture {}, listening on {}",
            config.store.kind(),
            config.oauth.capture.name(),
            config.listen.addr
        )),
    );
    let catalog = match Catalog::load(&config.providers_file, config.providers_file_required) {
        Ok(c) => {
            report
                .add("provider catalog", Ok(format!("{} provider(s) in {}", c.len(), config.providers_file.display())));
            c
        }
        Err(e) => {
            report.add("provider catalog", Err(e.to_string()));
            Catalog::default()
        }
    };
    // Where secrets come from, chosen as the running app chooses.
    let http = match app::build::http_client(&config) {
        Ok(h) => h,
        Err(e) => {
            report.add("HTTPS client", Err(e.to_string()));
            return report;
        }
    };
    let secrets = secret_source(&mut report, &config, settings).await;
    named_secrets(&mut report, &config, &catalog, secrets.as_ref()).await;
    let dataverse = dataverse(&mut report, &config, secrets.as_ref(), &http).await;
    fno(&mut report, &config, secrets.as_ref()).await;
    issuer(&mut report, &config, &http).await;
    store(&mut report, &config, dataverse.as_ref()).await;
    report
}

async fn secret_source(report: &mut Report, config: &Config, settings: Settings) -> Arc<dyn SecretSource> {
    match app::build::secret_source(config, settings.clone()).await {
        Ok(source) => {
            report.add(
                "secrets source",
                Ok(match &config.secrets.key_vault {
                    None => "app settings (no KEY_VAULT_URL)".to_string(),
                    Some(vault) => format!("Key Vault {vault} with {}", config.azure_credential.describe()),
                }),
            );
            source
        }
        Err(e) => {
            report.add("secrets source", Err(e.to_string()));
            Arc::new(SettingsSecrets::new(settings))
        }
    }
}

/// Every secret the configuration names.
async fn named_secrets(report: &mut Report, config: &Config, catalog: &Catalog, secrets: &dyn SecretSource) {
    let keys_name = config.secrets.token_keys_secret.clone();
    match secrets.get(&keys_name).await {
        Ok(spec) => {
            let parsed =
                Keyring::parse(spec.expose_secret()).map(|k| format!("present; current key {}", k.current_id()));
            report.add(format!("secret {keys_name}"), parsed.map_err(|e| format!("malformed: {e}")));
        }
        Err(e) if config.secrets.key_vault.is_none() && matches!(config.store, StoreConfig::Sqlite { .. }) => {
            report.add(format!("secret {keys_name}"), Ok(format!("not set; a local key file is used ({e})")));
        }
        Err(e) => {
            report.add(format!("secret {keys_name}"), Err(e.to_string()));
        }
    }
    let mut names: Vec<String> = catalog.secret_names().into_iter().map(str::to_string).collect();
    for cred in credentials(config).into_iter().flatten() {
        if let CredentialConfig::ClientSecret { secret_name, .. } = cred {
            names.push(secret_name.clone());
        }
    }
    names.sort();
    names.dedup();
    for name in names {
        let r = secrets.get(&name).await.map(|_| "present".to_string()).map_err(|e| e.to_string());
        report.add(format!("secret {name}"), r);
    }
}

/// A Dataverse token and a `WhoAmI` that proves it is accepted; the client when it is.
async fn dataverse(
    report: &mut Report,
    config: &Config,
    secrets: &dyn SecretSource,
    http: &reqwest::Client,
) -> Option<(Dataverse, String)> {
    let dv = config.dataverse.clone()?;
    let cred = dv.credential.as_ref().unwrap_or(&config.azure_credential);
    let tokens = match app::build::resource_token(dv.credential.as_ref(), config, secrets, &dv.url).await {
        Ok(tokens) => tokens,
        Err(e) => {
            report.add(format!("token for Dataverse {}", dv.url), Err(e.to_string()));
            return None;
        }
    };
    let got = tokens.token().await;
    let ok = report.add(
        format!("token for Dataverse {}", dv.url),
        got.map(|_| format!("acquired with {}", cred.describe())).map_err(|e| e.to_string()),
    );
    if !ok {
        return None;
    }
    let client = Dataverse::new(&dv.url, http.clone(), tokens, dv.solution.clone());
    let who = client
        .who_am_i()
        .await
        .map(|v| format!("application user {}", v.get("UserId").and_then(|u| u.as_str()).unwrap_or("?")));
    report.add("Dataverse WhoAmI", who.map_err(|e| e.to_string())).then_some((client, dv.prefix.clone()))
}

async fn fno(report: &mut Report, config: &Config, secrets: &dyn SecretSource) {
    let CaptureMode::Fno(f) = &config.oauth.capture else { return };
    let cred = f.credential.as_ref().unwrap_or(&config.azure_credential);
    let result = match app::build::resource_token(f.credential.as_ref(), config, secrets, &f.url).await {
        Ok(tokens) => {
            tokens.token().await.map(|_| format!("acquired with {}", cred.describe())).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    report.add(format!("token for F&O {}", f.url), result);
}

async fn issuer(report: &mut Report, config: &Config, http: &reqwest::Client) {
    if let Some(auth) = &config.back_office {
        let verifier = BearerVerifier::new(auth.clone(), http.clone());
        report.add(
            format!("back-office issuer {}", auth.issuer.issuer),
            verifier.load_keys().await.map(|n| format!("{n} signing key(s)")).map_err(|e| e.to_string()),
        );
    } else {
        report.add("back-office issuer", Ok("not configured: the back-office API is closed".into()));
    }
}

async fn store(report: &mut Report, config: &Config, dataverse: Option<&(Dataverse, String)>) {
    match &config.store {
        StoreConfig::Sqlite { path } => {
            let opened = crate::clients::store::sqlite::SqliteStore::open(path)
                .map(|_| format!("{} opens", path.display()))
                .map_err(|e| e.to_string());
            report.add("store (SQLite)", opened);
        }
        StoreConfig::Dataverse(_) => {
            let verdict = match dataverse {
                None => Err("not checked: Dataverse did not accept the identity above".to_string()),
                Some((client, prefix)) => {
                    let schema = crate::clients::dataverse::provision::Schema::new(prefix);
                    match crate::clients::dataverse::provision::verify(client, &schema).await {
                        Ok(Ok(())) => Ok("the tables and their keys exist".to_string()),
                        Ok(Err(missing)) => Err(format!("{missing}: run `handler provision`")),
                        Err(e) => Err(e.to_string()),
                    }
                }
            };
            report.add("store (Dataverse)", verdict);
        }
    }
}

fn credentials(config: &Config) -> Vec<Option<&CredentialConfig>> {
    let mut v = vec![Some(&config.azure_credential)];
    v.push(config.dataverse.as_ref().and_then(|d| d.credential.as_ref()));
    if let CaptureMode::Fno(f) = &config.oauth.capture {
        v.push(f.credential.as_ref());
    }
    v
}
