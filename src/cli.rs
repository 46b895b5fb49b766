//! The command line: `handler` serves (what the Functions host runs); sub-commands are
//! operator tools.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::app::App;
use crate::config::{Config, Settings};

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
    /// Print a new token encryption key entry (`id:base64`) for TOKEN_ENCRYPTION_KEYS.
    NewKey {
        /// The key id to write in front of the key.
        #[arg(long, default_value = "k1")]
        id: String,
    },
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(),
        Command::Provision { key_timeout_seconds } => provision(key_timeout_seconds),
        Command::Check => check(),
        Command::Reseal => reseal(),
        Command::NewKey { id } => {
            println!("{}", crate::crypto::Keyring::generate_spec(&id));
            ExitCode::SUCCESS
        }
    }
}

/// Prints a start-up failure as one line and returns a failing exit code. No panic,
/// no backtrace: the Functions host shows the last stderr lines as the exit reason.
fn fail(message: impl std::fmt::Display) -> ExitCode {
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
        Some(t) => match crate::telemetry::Telemetry::start(t, runtime.handle().clone()) {
            Ok(t) => Some(t),
            Err(e) => return fail(e),
        },
        None => None,
    };
    crate::logging::init(
        &config.log_filter,
        config.log_format,
        telemetry.as_ref().map(|t| t.layer(&config.log_filter)),
    );
    let code = runtime.block_on(async move {
        let listener = match crate::web::bind(config.listen.addr).await {
            Ok(l) => l,
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
        tracing::info!(
            %addr,
            under_host,
            store = app.connections.store().kind(),
            providers = app.connections.catalog().len(),
            startup_ms = format_args!("{:.1}", app.started.elapsed().as_secs_f64() * 1000.0),
            "Dynamics Companion {} listening",
            env!("CARGO_PKG_VERSION")
        );
        // Warm what the first requests would otherwise wait for, in series, without
        // holding readiness back: the issuer's keys, the Dataverse token and connection.
        tokio::spawn(app.clone().prefetch());
        tokio::spawn(app.clone().follow_changes());
        if app.config.secrets.key_vault.is_some() {
            let app = app.clone();
            let every = app.config.secrets.cache_ttl.max(std::time::Duration::from_secs(1));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    app.reload_keys().await;
                }
            });
        }
        crate::web::serve(app, listener, shutdown_signal()).await;
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
    crate::logging::init("warn", config.log_format, None);
    Ok((settings, config, runtime()?))
}

fn check() -> ExitCode {
    let (settings, config, rt) = match tool() {
        Ok(v) => v,
        Err(code) => return code,
    };
    let report = rt.block_on(crate::check::run(settings, config));
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
        match app.connections.reseal(usize::MAX).await {
            Ok(report) => {
                println!("{}", report.line());
                if report.done() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
            }
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
        let secrets = crate::secrets::SettingsSecrets::new(settings);
        let http = match crate::app::http_client(&config) {
            Ok(h) => h,
            Err(e) => return fail(e),
        };
        let client = match crate::app::dataverse_client(&dv, &config, &secrets, http).await {
            Ok(c) => c,
            Err(e) => return fail(e),
        };
        let schema = crate::dataverse::provision::Schema::new(&dv.prefix);
        println!("Provisioning Dataverse tables with prefix {}_ in {}", schema.prefix(), dv.url);
        match crate::dataverse::provision::provision(
            &client,
            &schema,
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
