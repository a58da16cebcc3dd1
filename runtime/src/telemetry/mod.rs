//! Logs, traces and their context, configured by the standard `OTEL_*`
//! variables.
//!
//! Logs are JSON lines by default (what `brewmesh up` and log stacks read)
//! with `service`, `instance` and, inside a traced request, `trace_id` and
//! `span_id`; or human-readable text. `RUST_LOG` filters them.
//!
//! Traces go over OTLP (gRPC, or HTTP/protobuf with
//! `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`) through the batch processor
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set, sampled
//! by `OTEL_TRACES_SAMPLER`/`_ARG` once per request before any span is
//! built (`sampling.rs`), described by `OTEL_SERVICE_NAME` and
//! `OTEL_RESOURCE_ATTRIBUTES`; `OTEL_SDK_DISABLED=true` turns it all off.
//! With nothing set no OpenTelemetry layer is installed at all, and the RPC
//! layers skip their spans: next to no cost. Logs also go over OTLP with
//! `OTEL_LOGS_EXPORTER=otlp`, and the RPC and HTTP metrics with
//! `OTEL_METRICS_EXPORTER=otlp` (beside `/metrics`, every
//! `OTEL_METRIC_EXPORT_INTERVAL`).
//!
//! Only brewmesh's own spans are exported: h2, hyper and tonic internals
//! would cost more CPU than the requests they describe.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::KeyValue;
use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithHttpConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::filter::{FilterExt as _, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

mod context;
mod logs;
mod sampling;

pub use context::{HeaderExtractor, HeaderInjector, extract, fail, inject};
use logs::{JsonLines, LossyStdout};
pub use sampling::{
    Sampler, Traced, Unsampled, child_or_root, request_span, sampler, trace_id_of, unsampled,
};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line: timestamp, level, target, message, fields,
    /// service, instance, trace and span ids.
    Json,
    /// Human-readable lines.
    Text,
}

/// The crates whose spans and logs are exported.
const OWN_TARGETS: &[&str] = &[
    "brewmesh",
    "brewmesh_payment",
    "brewmesh_barista",
    "brewmesh_registry",
    "brewmesh_gateway",
    "brewmesh_cli",
];

static TRACING: AtomicBool = AtomicBool::new(false);
static METRICS: AtomicBool = AtomicBool::new(false);

/// Whether metrics also go over OTLP (`OTEL_METRICS_EXPORTER=otlp`): the
/// RED metrics then record into OpenTelemetry instruments beside the
/// Prometheus ones.
pub fn metrics_exported() -> bool {
    METRICS.load(Ordering::Relaxed)
}

/// Whether spans are exported: the RPC layers skip their spans when not.
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Which RPC attribute names spans carry, from
/// `OTEL_SEMCONV_STABILITY_OPT_IN`: `rpc` the new ones, `rpc/dup` both, else
/// the old ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Semconv {
    /// `rpc.system`, `rpc.service`, `rpc.method` (short), `rpc.grpc.status_code`.
    pub old: bool,
    /// `rpc.system.name`, `rpc.method` (`package.Service/Method`),
    /// `rpc.response.status_code`.
    pub new: bool,
}

/// The attribute names to emit, read once.
pub fn semconv() -> Semconv {
    static SEMCONV: OnceLock<Semconv> = OnceLock::new();
    *SEMCONV.get_or_init(|| {
        let opt_in = std::env::var("OTEL_SEMCONV_STABILITY_OPT_IN").unwrap_or_default();
        let options: Vec<&str> = opt_in.split(',').map(str::trim).collect();
        if options.contains(&"rpc/dup") {
            Semconv {
                old: true,
                new: true,
            }
        } else if options.contains(&"rpc") {
            Semconv {
                old: false,
                new: true,
            }
        } else {
            Semconv {
                old: true,
                new: false,
            }
        }
    })
}

/// What this process is, for logs and the trace resource.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `service.name`: the role (`barista`), unless `OTEL_SERVICE_NAME`
    /// says otherwise.
    pub service: String,
    /// `service.instance.id`: `BREWMESH_INSTANCE`, else host and pid.
    pub instance: String,
}

impl Identity {
    /// The identity of a process running `role`.
    pub fn of(role: &str) -> Self {
        let service = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| role.to_owned());
        let instance = std::env::var("BREWMESH_INSTANCE")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| {
                let host = std::env::var("HOSTNAME")
                    .ok()
                    .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|| "localhost".to_owned());
                format!("{host}-{}", std::process::id())
            });
        Self { service, instance }
    }
}

/// Flushes what is still buffered when the process ends: call
/// [`Telemetry::shutdown`] after the last request.
#[derive(Debug, Default)]
#[must_use = "dropping it at once would stop exporting"]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    logger: Option<SdkLoggerProvider>,
    meter: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporters. Blocks: call it
    /// from a blocking context (`spawn_blocking`) in async code.
    pub fn shutdown(self) {
        if let Some(tracer) = self.tracer {
            let _ = tracer.shutdown();
        }
        if let Some(logger) = self.logger {
            let _ = logger.shutdown();
        }
        if let Some(meter) = self.meter {
            let _ = meter.shutdown();
        }
    }
}

/// Why telemetry could not be set up as configured.
#[derive(Debug, thiserror::Error)]
#[error("OpenTelemetry: {0}")]
pub struct TelemetryError(String);

fn env_is(name: &str, value: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Whether traces are configured to go anywhere.
fn traces_configured() -> bool {
    !env_is("OTEL_SDK_DISABLED", "true")
        && !env_is("OTEL_TRACES_EXPORTER", "none")
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn metrics_configured() -> bool {
    !env_is("OTEL_SDK_DISABLED", "true") && env_is("OTEL_METRICS_EXPORTER", "otlp")
}

fn logs_configured() -> bool {
    !env_is("OTEL_SDK_DISABLED", "true") && env_is("OTEL_LOGS_EXPORTER", "otlp")
}

/// TLS for the gRPC exporters, from the standard variables: the CA (PEM)
/// an `https://` collector's certificate must lead to,
/// `OTEL_EXPORTER_OTLP_CERTIFICATE`, and this process's certificate and key
/// for a collector that asks for one, `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`
/// and `OTEL_EXPORTER_OTLP_CLIENT_KEY`. Without them an `https://` endpoint
/// is checked against the public roots.
fn otlp_tls() -> Result<Option<tonic::transport::ClientTlsConfig>, TelemetryError> {
    let read = |var: &str| -> Result<Option<Vec<u8>>, TelemetryError> {
        match std::env::var_os(var) {
            Some(path) => std::fs::read(&path)
                .map(Some)
                .map_err(|e| TelemetryError(format!("{var} ({}): {e}", path.to_string_lossy()))),
            None => Ok(None),
        }
    };
    let ca = read("OTEL_EXPORTER_OTLP_CERTIFICATE")?;
    let cert = read("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")?;
    let key = read("OTEL_EXPORTER_OTLP_CLIENT_KEY")?;
    if ca.is_none() && cert.is_none() {
        return Ok(None);
    }
    // The CA given replaces the public roots, as the variable means.
    let mut tls = tonic::transport::ClientTlsConfig::new();
    tls = match ca {
        Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
        None => tls.with_webpki_roots(),
    };
    match (cert, key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        (None, None) => {}
        _ => {
            return Err(TelemetryError(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and _CLIENT_KEY go together".to_owned(),
            ));
        }
    }
    Ok(Some(tls))
}

fn http_protocol(signal_var: &str) -> bool {
    let protocol = std::env::var(signal_var)
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_default();
    protocol.trim().starts_with("http/")
}

fn resource(identity: &Identity) -> Resource {
    let mut builder = Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        builder = builder.with_service_name(identity.service.clone());
    }
    let from_env = std::env::var("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
    if !from_env.contains("service.instance.id=") {
        builder = builder.with_attribute(KeyValue::new(
            "service.instance.id",
            identity.instance.clone(),
        ));
    }
    if !from_env.contains("service.namespace=") {
        builder = builder.with_attribute(KeyValue::new("service.namespace", "brewmesh"));
    }
    builder.build()
}

/// Installs the global subscriber: logs to standard output as `format`,
/// and, when configured, traces (and logs) over OTLP. Must be called inside
/// a Tokio runtime when OTLP over gRPC is configured. A second call (as in
/// tests that start several servers) keeps the first.
pub fn init(format: LogFormat, identity: Identity) -> Result<Telemetry, TelemetryError> {
    // h2/hyper/tower at info would log every connection; keep them quiet
    // unless RUST_LOG asks for them.
    let filter = || {
        EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,hyper=warn,tower=warn,sqlx=warn"))
    };
    let own = |level: Level| {
        OWN_TARGETS
            .iter()
            .fold(Targets::new(), |t, target| t.with_target(*target, level))
    };

    let mut telemetry = Telemetry::default();
    let otel_traces = if traces_configured() {
        let exporter = if http_protocol("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(OnRuntime::current()?)
                .build()
        } else {
            let builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            match otlp_tls()? {
                Some(tls) => builder.with_tls_config(tls),
                None => builder,
            }
            .build()
        }
        .map_err(|e| TelemetryError(e.to_string()))?;
        // OTEL_TRACES_SAMPLER/_ARG decide before a span is made
        // (sampling.rs): what reaches the SDK is already sampled. The batch
        // settings come from OTEL_BSP_*.
        let provider = SdkTracerProvider::builder()
            .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
            .with_batch_exporter(exporter)
            .with_resource(resource(&identity))
            .build();
        let tracer = provider.tracer("brewmesh");
        opentelemetry::global::set_tracer_provider(provider.clone());
        opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(BaggagePropagator::new()),
        ]));
        telemetry.tracer = Some(provider);
        TRACING.store(true, Ordering::Relaxed);
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_error_events_to_status(true)
                // Per-span work that costs on every poll of an instrumented
                // future (busy/idle timing, making the OTel context current)
                // or per span (thread and source attributes): off. The
                // context is made current only for the OTLP log bridge,
                // which reads the trace ids from it.
                .with_tracked_inactivity(false)
                .with_threads(false)
                .with_location(false)
                .with_context_activation(logs_configured())
                // Spans, and of events only warnings and errors (a span's
                // failure): info lines are the logs' (with trace ids), and
                // a filter that can say "never" per call site costs an
                // unsampled request nothing for them.
                // Each part says its most verbose level: with no hint the
                // registry would ask every debug!/trace! call site of
                // every crate (h2's, hyper's) what it wants.
                .with_filter(
                    own(Level::INFO)
                        .and(
                            tracing_subscriber::filter::filter_fn(|m| {
                                m.is_span() || *m.level() <= Level::WARN
                            })
                            .with_max_level_hint(Level::INFO),
                        )
                        .and(
                            tracing_subscriber::filter::dynamic_filter_fn(sampling::otel_filter)
                                .with_max_level_hint(Level::INFO),
                        ),
                ),
        )
    } else {
        None
    };
    let otel_logs = if logs_configured() {
        let exporter = if http_protocol("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL") {
            opentelemetry_otlp::LogExporter::builder()
                .with_http()
                .with_http_client(OnRuntime::current()?)
                .build()
        } else {
            let builder = opentelemetry_otlp::LogExporter::builder().with_tonic();
            match otlp_tls()? {
                Some(tls) => builder.with_tls_config(tls),
                None => builder,
            }
            .build()
        }
        .map_err(|e| TelemetryError(e.to_string()))?;
        let provider = SdkLoggerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource(&identity))
            .build();
        let bridge =
            opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(&provider);
        telemetry.logger = Some(provider);
        Some(bridge.with_filter(filter()).with_filter(own(Level::TRACE)))
    } else {
        None
    };

    if metrics_configured() {
        let exporter = if http_protocol("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") {
            opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_http_client(OnRuntime::current()?)
                .build()
        } else {
            let builder = opentelemetry_otlp::MetricExporter::builder().with_tonic();
            match otlp_tls()? {
                Some(tls) => builder.with_tls_config(tls),
                None => builder,
            }
            .build()
        }
        .map_err(|e| TelemetryError(e.to_string()))?;
        // The interval comes from OTEL_METRIC_EXPORT_INTERVAL (60 s).
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_periodic_exporter(exporter)
            .with_resource(resource(&identity))
            .build();
        opentelemetry::global::set_meter_provider(provider.clone());
        telemetry.meter = Some(provider);
        METRICS.store(true, Ordering::Relaxed);
    }

    let lines = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(JsonLines {
                service: identity.service.clone(),
                instance: identity.instance.clone(),
                traced: tracing_enabled(),
            })
            .with_writer(|| LossyStdout)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(|| LossyStdout)
            .boxed(),
    };
    let _already_set = tracing_subscriber::registry()
        .with(lines.with_filter(filter()))
        .with(otel_traces)
        .with(otel_logs)
        .try_init();
    Ok(telemetry)
}

/// The OTLP/HTTP client: hyper, with each request run on the process's
/// Tokio runtime. The batch processors export from threads of their own,
/// where hyper would find no reactor.
#[derive(Debug)]
struct OnRuntime {
    client: opentelemetry_http::hyper::HyperClient,
    runtime: tokio::runtime::Handle,
}

impl OnRuntime {
    fn current() -> Result<Self, TelemetryError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| TelemetryError("OTLP over HTTP needs a Tokio runtime".to_owned()))?;
        let timeout = std::env::var("OTEL_EXPORTER_OTLP_TIMEOUT")
            .ok()
            .and_then(|ms| ms.trim().parse::<u64>().ok())
            .map_or(
                std::time::Duration::from_secs(10),
                std::time::Duration::from_millis,
            );
        Ok(Self {
            client: opentelemetry_http::hyper::HyperClient::with_default_connector(timeout, None),
            runtime,
        })
    }
}

#[tonic::async_trait]
impl opentelemetry_http::HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        self.runtime
            .spawn(async move { client.send_bytes(request).await })
            .await
            .map_err(|e| Box::new(e) as opentelemetry_http::HttpError)?
    }
}
