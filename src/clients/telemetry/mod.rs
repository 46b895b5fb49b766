//! Application Insights export through OpenTelemetry, when
//! `APPLICATIONINSIGHTS_CONNECTION_STRING` is set.
//!
//! The Functions host turns each stdout line into an Information trace and each stderr
//! line into an Error, unparsed and tied to no invocation. So the handler exports its
//! own telemetry: each request is a span (kind server) that continues the incoming
//! `traceparent` and carries the host's invocation id; each outbound call is a child span
//! ([`crate::support::outbound::send`], the Key Vault policy) that sends its `traceparent` on; every
//! log event inside them is a trace record of the same operation; and a few counters
//! (`crate::support::metrics`). The stdout lines stay as they are, for the host's log stream.
//!
//! The exporter is `opentelemetry-application-insights` (OpenTelemetry's data model mapped
//! to Application Insights' envelopes). It has no Microsoft Entra support, so uploads go
//! through [`ingestion::IngestionClient`], which adds the managed identity's bearer token
//! when `APPLICATIONINSIGHTS_AUTHENTICATION_STRING` asks for it and applies the log
//! redaction to every string in the payload before it leaves the process.

pub mod ingestion;

use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::clients::azure::{ResourceToken, TokenSource};
use crate::support::config::{IngestionAuth, TelemetryConfig};

/// The scope of a token for Application Insights ingestion: the resource is
/// `https://monitor.azure.com/`, trailing slash included, hence the double slash.
pub const INGESTION_SCOPE: &str = "https://monitor.azure.com//.default";

/// Why export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("APPLICATIONINSIGHTS_CONNECTION_STRING: {0}")]
    ConnectionString(String),
    #[error("the managed identity for APPLICATIONINSIGHTS_AUTHENTICATION_STRING could not be set up: {0}")]
    Identity(String),
    #[error("the HTTPS client for telemetry could not be built: {0}")]
    Client(String),
}

/// The running exporters. Dropping them loses what is buffered: call [`Telemetry::shutdown`].
pub struct Telemetry {
    tracer: SdkTracerProvider,
    logger: SdkLoggerProvider,
    meter: SdkMeterProvider,
}

impl Telemetry {
    /// Builds the exporters. `runtime` runs the uploads: the SDK exports from its own
    /// threads, and the HTTPS client needs the tokio runtime.
    pub fn start(config: &TelemetryConfig, runtime: tokio::runtime::Handle) -> Result<Telemetry, TelemetryError> {
        use secrecy::ExposeSecret;
        let token: Option<Arc<dyn TokenSource>> = match &config.auth {
            IngestionAuth::InstrumentationKey => None,
            IngestionAuth::Entra { client_id } => {
                let credential = crate::clients::azure::managed_identity(client_id.clone())
                    .map_err(|e| TelemetryError::Identity(e.to_string()))?;
                Some(Arc::new(ResourceToken::for_scope(credential, INGESTION_SCOPE)))
            }
        };
        let http = crate::support::outbound::client(std::time::Duration::from_secs(30))
            .map_err(|e| TelemetryError::Client(e.to_string()))?;
        let client = ingestion::IngestionClient::new(http, runtime, token);
        let exporter = opentelemetry_application_insights::Exporter::new_from_connection_string(
            config.connection_string.expose_secret(),
            client,
        )
        .map_err(|e| TelemetryError::ConnectionString(crate::support::logging::redact(&e.to_string()).into_owned()))?;

        let mut resource = Resource::builder()
            .with_service_name(config.role.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
        if let Some(instance) = &config.instance {
            resource = resource.with_attribute(KeyValue::new("service.instance.id", instance.clone()));
        }
        let resource = resource.build();
        let tracer =
            SdkTracerProvider::builder().with_resource(resource.clone()).with_batch_exporter(exporter.clone()).build();
        let logger =
            SdkLoggerProvider::builder().with_resource(resource.clone()).with_batch_exporter(exporter.clone()).build();
        let meter = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(PeriodicReader::builder(exporter).build())
            .build();
        opentelemetry::global::set_meter_provider(meter.clone());
        Ok(Telemetry { tracer, logger, meter })
    }

    /// The tracing layers that turn spans and events into exported spans and log
    /// records, filtered like the console (`LOG_LEVEL`).
    pub fn layer(&self, filter: &str) -> Box<dyn Layer<Registry> + Send + Sync> {
        use crate::support::logging::with_directives;
        let base = || EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
        // Audit events as custom events (span events named `ai.custom`), not as traces too.
        let span_filter = with_directives(base(), &["audit=off"]);
        let log_filter = with_directives(base(), &["appinsights_event=off"]);
        // Without source locations, thread names and busy/idle times: they are noise in
        // every envelope, and Application Insights has its own duration.
        let spans = tracing_opentelemetry::layer()
            .with_tracer(self.tracer.tracer("dynamics-companion"))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_target(false);
        let logs = opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(&self.logger);
        spans.with_filter(span_filter).and_then(logs.with_filter(log_filter)).boxed()
    }

    /// Exports what is buffered and stops. Blocks: call it outside async code.
    pub fn shutdown(self) {
        for (what, result) in
            [("spans", self.tracer.shutdown()), ("logs", self.logger.shutdown()), ("metrics", self.meter.shutdown())]
        {
            if let Err(e) = result {
                eprintln!("handler: telemetry {what} were not all exported at shutdown: {e}");
            }
        }
    }
}
