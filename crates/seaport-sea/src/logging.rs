//! Logs and traces of the `seaport` binary: `tracing` spans and events to stderr, and, when asked
//! (`--otlp-endpoint` / `OTEL_EXPORTER_OTLP_ENDPOINT`, binary built with the `otlp` feature),
//! the spans to an OpenTelemetry collector over OTLP/HTTP (protobuf).
//!
//! Export is off by default: without an endpoint nothing is built, nothing is sent. With one,
//! the `request` and `consume` spans join the W3C trace they carry (see
//! `seaport::http::correlation::adopt_span`), so a collector shows request → consumers → the
//! events they emit as one tree.

use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes the spans still queued.
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

/// Whether this binary can export OTLP (built with the `otlp` feature).
pub const OTLP_BUILT_IN: bool = cfg!(feature = "otlp");

/// Install the process-wide subscriber. `otlp_endpoint` is the collector's base URL (e.g.
/// `http://127.0.0.1:4318`); spans go to `<base>/v1/traces`, as OTLP/HTTP specifies. A build
/// without OTLP refuses an endpoint given on the command line, and only warns about one
/// inherited from the environment (`from_env`: set for some other program, say).
pub fn init(otlp_endpoint: Option<&str>, from_env: bool) -> anyhow::Result<Telemetry> {
    #[cfg(not(feature = "otlp"))]
    let otlp_endpoint = match otlp_endpoint {
        Some(_) if from_env => {
            eprintln!(
                "seaport: warning: OTEL_EXPORTER_OTLP_ENDPOINT is set, but this binary was built without OTLP export (`--features otlp`); not exporting traces"
            );
            None
        }
        other => other,
    };
    #[cfg(feature = "otlp")]
    let _ = from_env;
    // SEAPORT_LOG filters what is printed only: quiet logs must not switch off exported spans.
    let filter = tracing_subscriber::EnvFilter::try_from_env("SEAPORT_LOG").unwrap_or_else(|_| "info,sqlx=warn".into());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let registry = tracing_subscriber::registry().with(fmt);
    match otlp_endpoint {
        None => {
            registry.try_init()?;
            Ok(Telemetry {
                #[cfg(feature = "otlp")]
                provider: None,
            })
        }
        #[cfg(feature = "otlp")]
        Some(endpoint) => {
            use opentelemetry::trace::TracerProvider as _;
            use opentelemetry_otlp::WithExportConfig;
            let url = traces_url(endpoint)?;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(url)
                .with_timeout(std::time::Duration::from_secs(10))
                .build()?;
            let mut resource = opentelemetry_sdk::Resource::builder();
            // OTEL_SERVICE_NAME, when set, names the service; otherwise "seaport".
            if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
                resource = resource.with_service_name("seaport");
            }
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_resource(resource.build())
                .with_batch_exporter(exporter)
                .build();
            let tracer = provider.tracer("seaport");
            // Our own spans (request, consume, relay...), not those of the libraries beneath.
            let ours = tracing_subscriber::filter::Targets::new()
                .with_target("seaport", tracing::Level::INFO)
                .with_target("seaport_sea", tracing::Level::INFO);
            registry
                .with(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(ours))
                .try_init()?;
            Ok(Telemetry {
                provider: Some(provider),
            })
        }
        #[cfg(not(feature = "otlp"))]
        Some(_) => anyhow::bail!(
            "--otlp-endpoint asks for OTLP trace export, but this binary was built without it; build with `cargo build --features otlp`"
        ),
    }
}

/// `<base>/v1/traces`, after checking that `base` is an http(s) URL.
#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
fn traces_url(base: &str) -> anyhow::Result<String> {
    let url = reqwest::Url::parse(base).map_err(|e| anyhow::anyhow!("OTLP endpoint {base:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        anyhow::bail!(
            "OTLP endpoint {base:?} must be an http:// or https:// URL of the collector, e.g. http://127.0.0.1:4318"
        );
    }
    Ok(format!("{}/v1/traces", base.trim_end_matches('/')))
}

impl Telemetry {
    /// Send what is still queued (bounded wait); call once the runtime has stopped.
    pub fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown_with_timeout(std::time::Duration::from_secs(10)) {
                eprintln!("seaport: flushing traces to the OTLP collector failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::traces_url;

    #[test]
    fn traces_go_to_the_signal_path_of_the_base_url() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318").unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otel.example/").unwrap(),
            "https://otel.example/v1/traces"
        );
        assert!(traces_url("127.0.0.1:4318").is_err());
        assert!(traces_url("grpc://x:4317").is_err());
    }
}
