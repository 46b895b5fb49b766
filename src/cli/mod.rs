//! The command line: `handler` serves (what the Functions host runs); sub-commands are
//! operator tools.

pub mod check;

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::app::App;
use crate::support::config::{Config, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "handler",
    version,
    about = "Dynamics Companion: OAuth callback, token keeper and portal companion for Dynamics 365"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve HTTP (the default; what the Functions host runs).
    Serve,
    /// Create the Dataverse tables, columns and alternate keys (idempotent), and wait for
    /// the keys to become active.
    Provision {
        /// How long to wait for Dataverse to build the alternate-key indexes.
        #[arg(long, default_value_t = 600)]
        key_timeout_seconds: u64,
    },
    /// Check the configuration: every secret it names, a token for every Azure resource,
    /// the back-office issuer's keys and the store. Exits non-zero when something fails.
    Check,
    /// Seal every stored token set and pending authorization again with the current
    /// (first) key of TOKEN_ENCRYPTION_KEYS, then say how many records still need each
    /// older key. Safe while the app runs. Exits non-zero when some remain.
    Reseal,
    /// Set the product up in a customer's organisation (multi-tenant deployments): the
    /// tables, the product's security role with its privileges, the application user of
    /// the multi-tenant app and its role, each only when missing. Run it signed in as an
    /// administrator of that organisation: the default credential is the Azure CLI login
    /// (`az login --use-device-code` works on any terminal); AZURE_CREDENTIAL chooses
    /// another.
    Onboard {
        /// The organisation, `https://org.crm.dynamics.com`.
        #[arg(long)]
        org: String,
        /// The multi-tenant app's client id (default: MULTITENANT_APP_ID).
        #[arg(long)]
        app_id: Option<String>,
    },
    /// List the provider presets built in (`preset = "NAME"` in providers.toml), with the
    /// parameters each needs and the documentation it follows; with NAME, everything that
    /// preset resolves to (URLs, scopes, client authentication, PKCE, issuer, quirks).
    Providers {
        /// One preset to show in full.
        name: Option<String>,
    },
    /// Print the API as Swagger 2.0 for a Power Platform custom connector
    /// (connector/apiDefinition.swagger.json), for the given public host.
    Openapi {
        /// The function app's host, `contoso-dc.azurewebsites.net`.
        #[arg(long, default_value = "contoso-dc.azurewebsites.net")]
        host: String,
    },
    /// Print a back-office token of the development issuer (AUTH_ISSUER=dev), for trying
    /// the API on this machine without an Entra tenant.
    DevToken {
        /// App roles the token carries, comma-separated.
        #[arg(long, default_value = "")]
        roles: String,
        /// How long it is valid, in minutes (at most a day).
        #[arg(long, default_value_t = 60)]
        minutes: i64,
    },
    /// Print a new token encryption key entry (`id:base64`) for TOKEN_ENCRYPTION_KEYS.
    NewKey {
        /// The key id to write in front of the key.
        #[arg(long, default_value = "k1")]
        id: String,
    },
}

pub fn run(cli: Cli) -> ExitCode {
    let code = run_command(cli);
    crate::support::logging::flush();
    code
}

fn run_command(cli: Cli) -> ExitCode {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(),
        Command::Provision { key_timeout_seconds } => provision(key_timeout_seconds),
        Command::Check => check(),
        Command::Reseal => reseal(),
        Command::Onboard { org, app_id } => onboard(&org, app_id),
        Command::Openapi { host } => {
            let doc = crate::web::openapi::document(&host, "https");
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Command::Providers { name: None } => {
            print!("{}", providers_listing());
            ExitCode::SUCCESS
        }
        Command::Providers { name: Some(name) } => match crate::domain::oauth::presets::describe(&name) {
            Some(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            None => fail(format!("there is no preset {name:?}; `handler providers` lists them")),
        },
        Command::DevToken { roles, minutes } => dev_token(&roles, minutes),
        Command::NewKey { id } => {
            println!("{}", crate::support::crypto::Keyring::generate_spec(&id));
            ExitCode::SUCCESS
        }
    }
}

/// Prints a start-up failure as one line and returns a failing exit code. No panic,
/// no backtrace: the Functions host shows the last stderr lines as the exit reason.
fn fail(message: impl std::fmt::Display) -> ExitCode {
    crate::support::logging::flush();
    eprintln!("handler: {message}");
    ExitCode::FAILURE
}

fn serve() -> ExitCode {
    let (settings, config) = match load() {
        Ok(v) => v,
        Err(code) => return code,
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let telemetry = match &config.telemetry {
        Some(t) => match crate::clients::telemetry::Telemetry::start(t, runtime.handle().clone()) {
            Ok(t) => Some(t),
            Err(e) => return fail(e),
        },
        None => None,
    };
    crate::support::logging::init(
        &config.log_filter,
        config.log_format,
        telemetry.as_ref().map(|t| t.layer(&config.log_filter)),
    );
    let code = runtime.block_on(async move {
        let listener = match crate::web::bind(config.listen.addr).await {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && !config.listen.under_host => {
                return fail(format!(
                    "cannot listen on {}: the port is in use (is another `cargo run` or the demo still running?); stop it, or set LOCAL_HTTP_PORT to another port",
                    config.listen.addr
                ));
            }
            Err(e) => return fail(format!("cannot listen on {}: {e}", config.listen.addr)),
        };
        if let Some(file) = &settings.local_settings_file {
            tracing::info!("read settings from {}", file.display());
        }
        for name in &settings.secrets_in_local_file {
            tracing::warn!(
                "local.settings.json holds a value for {name}: keep secrets out of files in the app folder (use Key Vault, or the environment)"
            );
        }
        let addr = config.listen.addr;
        let under_host = config.listen.under_host;
        let app = match App::build(settings, config).await {
            Ok(app) => Arc::new(app),
            Err(e) => return fail(e),
        };
        let home = app.organisations().home();
        tracing::info!(
            %addr,
            under_host,
            store = home.store().kind(),
            providers = home.catalog().len(),
            startup_ms = format_args!("{:.1}", app.startup_ms()),
            "Dynamics Companion {} listening",
            env!("CARGO_PKG_VERSION")
        );
        app.start_background();
        crate::web::serve(app.services().clone(), listener, shutdown_signal()).await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    });
    // After the server, before the runtime goes: the last uploads still need it.
    if let Some(t) = telemetry {
        t.shutdown();
    }
    code
}

/// Loads settings and configuration, or says in one line what is wrong.
fn load() -> Result<(Settings, Config), ExitCode> {
    let settings = Settings::load().map_err(fail)?;
    let config = Config::from_settings(&settings).map_err(fail)?;
    Ok((settings, config))
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("cannot start the async runtime: {e}")))
}

/// An operator sub-command's settings, configuration and runtime, or its exit code. Tools
/// log warnings only.
fn tool() -> Result<(Settings, Config, tokio::runtime::Runtime), ExitCode> {
    let (settings, config) = load()?;
    crate::support::logging::init("warn", config.log_format, None);
    Ok((settings, config, runtime()?))
}

fn check() -> ExitCode {
    let (settings, config, rt) = match tool() {
        Ok(v) => v,
        Err(code) => return code,
    };
    let report = rt.block_on(check::run(settings, config));
    print!("{}", report.render());
    if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn reseal() -> ExitCode {
    let (settings, config, rt) = match tool() {
        Ok(v) => v,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let app = match App::build(settings, config).await {
            Ok(app) => app,
            Err(e) => return fail(e),
        };
        let orgs = match app.organisations().all().await {
            Ok(orgs) => orgs,
            Err(e) => return fail(format!("the customer organisations could not be listed: {e}")),
        };
        let mut done = true;
        for (org, connections) in orgs {
            let label = org.map(|t| format!("tenant {t}: ")).unwrap_or_default();
            match connections.reseal(usize::MAX).await {
                Ok(report) => {
                    println!("{label}{}", report.line());
                    done &= report.done();
                }
                Err(e) => {
                    println!("{label}reseal failed: {e}");
                    done = false;
                }
            }
        }
        if let Some(tenants) = app.organisations().tenants()
            && let Some(line) = tenants.open_links().await
        {
            println!("{line}");
        }
        if done { ExitCode::SUCCESS } else { ExitCode::FAILURE }
    })
}

fn dev_token(roles: &str, minutes: i64) -> ExitCode {
    let (settings, config) = match load() {
        Ok(v) => v,
        Err(code) => return code,
    };
    let Some(path) = config.back_office.as_ref().and_then(|b| b.dev_key.clone()) else {
        return fail(
            "the handler accepts development tokens only with AUTH_ISSUER=dev (on this machine, PUBLIC_BASE_URL on localhost); set it in local.settings.json or the environment",
        );
    };
    drop(settings);
    let key = match crate::clients::auth::dev::key(&path) {
        Ok(k) => k,
        Err(e) => return fail(format!("the development key {}: {e}", path.display())),
    };
    let roles: Vec<String> = roles.split(',').map(str::trim).filter(|r| !r.is_empty()).map(str::to_string).collect();
    match crate::clients::auth::dev::mint(&key, &roles, None, minutes) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// The presets as `handler providers` prints them.
fn providers_listing() -> String {
    let presets = crate::domain::oauth::presets::list();
    let mut out = format!(
        "{} provider presets (providers.toml: preset = \"NAME\", client_id, client_secret):\n\n",
        presets.len()
    );
    for p in presets {
        out.push_str(&format!("{:<16} {}\n", p.name, p.display_name));
        if !p.params.is_empty() {
            out.push_str(&format!("{:<16} params: {}\n", "", p.params.join(", ")));
        }
        if let Some(notes) = &p.notes {
            out.push_str(&format!("{:<16} {notes}\n", ""));
        }
        out.push_str(&format!("{:<16} {} (checked {})\n", "", p.docs, p.checked));
    }
    out
}

fn onboard(org: &str, app_id: Option<String>) -> ExitCode {
    let (settings, config, rt) = match tool() {
        Ok(v) => v,
        Err(code) => return code,
    };
    let Some(app_id) = app_id.or_else(|| config.tenancy.as_ref().map(|t| t.app_id.clone())) else {
        return fail("give --app-id or set MULTITENANT_APP_ID: the app whose application user to create");
    };
    if !crate::support::config::is_guid(&app_id) {
        return fail(format!("--app-id {app_id:?} must be the app's client id (a GUID)"));
    }
    // Either form the Discovery Service lists (Url or ApiUrl) names the organisation.
    let org = match crate::domain::ids::OrgUrl::parse(org) {
        Ok(o) => o,
        Err(e) => return fail(format!("--org: {e}")),
    };
    let url = match url::Url::parse(org.as_str()) {
        Ok(u) => u,
        Err(e) => return fail(format!("--org: {e}")),
    };
    rt.block_on(async move {
        let secrets = crate::clients::secrets::SettingsSecrets::new(settings);
        let http = match crate::app::build::http_client(&config) {
            Ok(h) => h,
            Err(e) => return fail(e),
        };
        let credential = config.dataverse.as_ref().and_then(|d| d.credential.as_ref());
        let tokens = match crate::app::build::resource_token(credential, &config, &secrets, &url).await {
            Ok(t) => t,
            Err(e) => return fail(e),
        };
        let prefix = config.tables.prefix.as_str();
        let dv = crate::clients::dataverse::Dataverse::new(&org.api(), http, tokens, None);
        println!("Setting up {url} for app {app_id}");
        match crate::clients::dataverse::setup::onboard(&dv, &crate::clients::dataverse::provision::Schema::new(prefix), &app_id).await {
            Ok(report) => {
                for line in &report.lines {
                    println!("  {line}");
                }
                println!(
                    "{}",
                    if report.changes == 0 {
                        "Nothing to do: everything exists.".to_string()
                    } else {
                        format!("Done: {} change(s). The provider can now check the tenant (POST /api/tenants/{{id}}/check).", report.changes)
                    }
                );
                ExitCode::SUCCESS
            }
            Err(e) if e.status() == Some(403) => fail(format!(
                "{e}: sign in as a System Administrator of the organisation (az login --use-device-code) and run it again"
            )),
            Err(e) => fail(e),
        }
    })
}

fn provision(key_timeout_seconds: u64) -> ExitCode {
    let (settings, config, rt) = match tool() {
        Ok(v) => v,
        Err(code) => return code,
    };
    let Some(dv) = config.dataverse.clone() else {
        return fail("configuration error: DATAVERSE_URL: is required for provision");
    };
    rt.block_on(async move {
        let secrets = crate::clients::secrets::SettingsSecrets::new(settings);
        let http = match crate::app::build::http_client(&config) {
            Ok(h) => h,
            Err(e) => return fail(e),
        };
        let client = match crate::app::build::dataverse_client(&dv, &config, &secrets, http).await {
            Ok(c) => c,
            Err(e) => return fail(e),
        };
        let schema = crate::clients::dataverse::provision::Schema::new(&dv.prefix);
        println!("Provisioning Dataverse tables with prefix {}_ in {}", schema.prefix(), dv.url);
        match crate::clients::dataverse::provision::provision(
            &client,
            &schema,
            &crate::clients::dataverse::provision::TABLES,
            std::time::Duration::from_secs(key_timeout_seconds),
        )
        .await
        {
            Ok(report) => {
                for line in &report.lines {
                    println!("  {line}");
                }
                println!(
                    "{}",
                    if report.changes == 0 {
                        "Nothing to do: everything exists.".to_string()
                    } else {
                        format!("Done: {} change(s).", report.changes)
                    }
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        }
    })
}

/// Completes on SIGTERM (the host or the platform stopping us) or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received; finishing open requests"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received; finishing open requests"),
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
