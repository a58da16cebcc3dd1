//! Prometheus metrics of this process, written as text at `/metrics` (every
//! gRPC server serves it on its own port, over HTTP/1.1).
//!
//! One registry per process; the RPC families are here, the services
//! register their own (saga outcomes, stations, registry counts) through
//! [`register`].
//!
//! `--metrics off` ([`switch_off`]) stops the per-request RED metrics (the
//! servers' and the gateway's) and answers `/metrics` with 404: for
//! measuring what they cost, or a process whose metrics nobody reads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::{Metric, Registry};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Whether the per-request metrics are recorded (on unless switched off).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Stops the per-request metrics and the `/metrics` answer, for the rest
/// of the process's life (`--metrics off`).
pub fn switch_off() {
    ENABLED.store(false, Ordering::Relaxed);
}

/// Whether the per-request metrics are on, as `--metrics` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Switch {
    /// Recorded, and served at `/metrics`.
    #[default]
    On,
    /// Not recorded; `/metrics` answers 404.
    Off,
}

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Registry::default()))
}

/// Adds `metric` to this process's registry. Register each name once.
pub fn register(name: &str, help: &str, metric: impl Metric) {
    registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .register(name, help, metric);
}

/// Label pairs, for gauges read at scrape time.
pub type Labels = Vec<(String, String)>;

/// Registers a gauge family whose values `read` gives at each scrape: for
/// figures another structure already keeps (semaphores, maps), so nothing
/// has to be updated on the hot path.
pub fn register_gauges<F>(name: &'static str, help: &'static str, read: F)
where
    F: Fn() -> Vec<(Labels, f64)> + Send + Sync + 'static,
{
    registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .register_collector(Box::new(GaugesAtScrape { name, help, read }));
}

struct GaugesAtScrape<F> {
    name: &'static str,
    help: &'static str,
    read: F,
}

impl<F> std::fmt::Debug for GaugesAtScrape<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl<F> Collector for GaugesAtScrape<F>
where
    F: Fn() -> Vec<(Labels, f64)> + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for (labels, value) in (self.read)() {
            family.get_or_create(&labels).set(value);
        }
        let metric = encoder.encode_descriptor(self.name, self.help, None, family.metric_type())?;
        family.encode(metric)
    }
}

/// Every metric in the OpenMetrics text format, exemplars included.
pub fn render() -> String {
    let mut out = String::new();
    let registry = registry().lock().unwrap_or_else(|p| p.into_inner());
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// OpenMetrics text as the Prometheus text format 0.0.4 has it: no
/// exemplars, no `# UNIT` or `# EOF`, and a counter's `# HELP` and
/// `# TYPE` under its `_total` name.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# EOF") || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) && !name.ends_with("_total") {
                    out.push_str(&format!("{prefix}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            // A sample: its exemplar, if any, follows " # ".
            None => out.push_str(line.split_once(" # ").map_or(line, |(sample, _)| sample)),
        }
        out.push('\n');
    }
    out
}

/// `/metrics`: this process's metrics (every role's gRPC port and the
/// gateway serve this one handler) — OpenMetrics, with exemplars, when the
/// scraper accepts `application/openmetrics-text`, as Prometheus does;
/// else the Prometheus text format.
pub async fn scrape(headers: http::HeaderMap) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if !enabled() {
        return (
            http::StatusCode::NOT_FOUND,
            "metrics are switched off in this process (--metrics off)\n",
        )
            .into_response();
    }
    let openmetrics = headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let text = render();
    if openmetrics {
        (
            [(
                http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response()
    } else {
        (
            [(
                http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            to_prometheus_text(&text),
        )
            .into_response()
    }
}

/// A latency histogram from 0.5 ms to about 16 s, each bucket keeping the
/// trace of its latest sampled observation as an OpenMetrics exemplar.
pub fn latency_histogram() -> LatencyHistogram {
    HistogramWithExemplars::new(exponential_buckets(0.0005, 2.0, 16))
}

/// A latency's exemplar: the trace of a sampled request, so a dashboard
/// can go from a slow bucket to that trace.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceExemplar {
    /// The W3C trace id, 32 hex digits.
    pub trace_id: String,
}

/// A latency histogram with exemplars.
pub type LatencyHistogram = HistogramWithExemplars<TraceExemplar>;

/// Labels of an RPC.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// `package.Service`.
    pub service: String,
    /// `Method`.
    pub method: String,
}

/// Labels of a finished RPC.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcCodeLabels {
    /// `package.Service`.
    pub service: String,
    /// `Method`.
    pub method: String,
    /// The gRPC status code's name (`OK`, `NOT_FOUND`, …).
    pub code: String,
}

/// The three metrics of one kind of request, by the RED method: finished
/// requests by outcome (rate and errors), time taken (duration), and the
/// requests being answered now. gRPC calls and the gateway's HTTP
/// requests are both measured with it, through [`Handles`] resolved once
/// per label set.
#[derive(Debug, Clone)]
pub struct Red<L, O> {
    /// Finished requests, by outcome.
    pub requests: Family<O, Counter>,
    /// Time to the answer.
    pub duration: Family<L, LatencyHistogram>,
    /// Requests being answered now.
    pub in_flight: Family<L, Gauge>,
    /// The same over OTLP, when metrics are exported.
    otel: Option<OtelRed>,
}

/// The OpenTelemetry names of a [`Red`]: its duration histogram (seconds),
/// its request counter, and the attribute its outcome is recorded under.
#[derive(Debug, Clone, Copy)]
pub struct OtelNames {
    /// E.g. `rpc.server.call.duration`.
    pub duration: &'static str,
    /// E.g. `rpc.server.requests`.
    pub requests: &'static str,
    /// E.g. `rpc.grpc.status_code`.
    pub outcome: &'static str,
}

#[derive(Debug, Clone)]
struct OtelRed {
    duration: opentelemetry::metrics::Histogram<f64>,
    requests: opentelemetry::metrics::Counter<u64>,
    outcome: &'static str,
}

/// The help texts of a [`Red`]'s families.
#[derive(Debug, Clone, Copy)]
pub struct RedHelp {
    /// Of `{prefix}_requests`.
    pub requests: &'static str,
    /// Of `{prefix}_duration_seconds`.
    pub duration: &'static str,
    /// Of `{prefix}_in_flight_requests`.
    pub in_flight: &'static str,
}

impl<L, O> Red<L, O>
where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    O: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
{
    /// `{prefix}_requests`, `{prefix}_duration_seconds` and
    /// `{prefix}_in_flight_requests`, registered.
    pub fn register(prefix: &str, help: RedHelp, otel: OtelNames) -> Self {
        let otel = crate::telemetry::metrics_exported().then(|| {
            let meter = opentelemetry::global::meter("brewmesh");
            OtelRed {
                duration: meter
                    .f64_histogram(otel.duration)
                    .with_unit("s")
                    .with_description(help.duration)
                    .build(),
                requests: meter
                    .u64_counter(otel.requests)
                    .with_description(help.requests)
                    .build(),
                outcome: otel.outcome,
            }
        });
        let red = Red {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            in_flight: Family::default(),
            otel,
        };
        register(
            &format!("{prefix}_requests"),
            help.requests,
            red.requests.clone(),
        );
        register(
            &format!("{prefix}_duration_seconds"),
            help.duration,
            red.duration.clone(),
        );
        register(
            &format!("{prefix}_in_flight_requests"),
            help.in_flight,
            red.in_flight.clone(),
        );
        red
    }

    /// The metrics of `labels`, resolved now, so that a request reaches
    /// them without a look-up or an owned label: `outcome` makes an
    /// outcome's labels from its number (a gRPC code, an HTTP status), the
    /// first time that outcome is seen; `attributes` are the same labels
    /// as OpenTelemetry names them, for OTLP.
    pub fn handles(
        &self,
        labels: &L,
        outcome: impl Fn(u16) -> O + Send + Sync + 'static,
        attributes: impl FnOnce() -> Vec<opentelemetry::KeyValue>,
    ) -> Handles<O> {
        Handles {
            in_flight: self.in_flight.get_or_create(labels).clone(),
            duration: self.duration.get_or_create(labels).clone(),
            outcomes: RwLock::new(Vec::new()),
            family: self.requests.clone(),
            outcome: Box::new(outcome),
            otel: self.otel.clone().map(|otel| (otel, attributes())),
        }
    }
}

/// One label set's metrics, resolved once (see [`Red::handles`]).
pub struct Handles<O> {
    in_flight: Gauge,
    duration: LatencyHistogram,
    /// The outcomes seen so far: a handful each, scanned.
    outcomes: RwLock<Vec<Outcome>>,
    family: Family<O, Counter>,
    outcome: Box<dyn Fn(u16) -> O + Send + Sync>,
    /// The OTLP instruments and this label set's attributes.
    otel: Option<(OtelRed, Vec<opentelemetry::KeyValue>)>,
}

/// One outcome of a label set: its counter and, over OTLP, its attributes
/// (the label set's and the outcome's), both made the first time it is
/// seen.
struct Outcome {
    code: u16,
    counter: Counter,
    attributes: Vec<opentelemetry::KeyValue>,
}

impl<O> std::fmt::Debug for Handles<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handles").finish_non_exhaustive()
    }
}

impl<O> Handles<O>
where
    O: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
{
    /// A request has begun.
    pub fn begin(&self) {
        self.in_flight.inc();
    }

    /// A request that began `elapsed` ago ended as `outcome`; `trace` is
    /// its trace when it was sampled, kept as the bucket's exemplar.
    pub fn end(
        &self,
        elapsed: std::time::Duration,
        outcome: u16,
        trace: Option<opentelemetry::trace::TraceId>,
    ) {
        self.in_flight.dec();
        let exemplar = trace.map(|t| TraceExemplar {
            trace_id: t.to_string(),
        });
        self.duration.observe(elapsed.as_secs_f64(), exemplar, None);
        if let Some((otel, attributes)) = &self.otel {
            otel.duration.record(elapsed.as_secs_f64(), attributes);
        }
        let count = |seen: &Outcome| {
            seen.counter.inc();
            if let Some((otel, _)) = &self.otel {
                otel.requests.add(1, &seen.attributes);
            }
        };
        let seen = self.outcomes.read().unwrap_or_else(|p| p.into_inner());
        if let Some(seen) = seen.iter().find(|o| o.code == outcome) {
            return count(seen);
        }
        drop(seen);
        let mut seen = self.outcomes.write().unwrap_or_else(|p| p.into_inner());
        if !seen.iter().any(|o| o.code == outcome) {
            let attributes = match &self.otel {
                Some((otel, attributes)) => {
                    let mut with_outcome = attributes.clone();
                    with_outcome.push(opentelemetry::KeyValue::new(
                        otel.outcome,
                        i64::from(outcome),
                    ));
                    with_outcome
                }
                None => Vec::new(),
            };
            seen.push(Outcome {
                code: outcome,
                counter: self.family.get_or_create(&(self.outcome)(outcome)).clone(),
                attributes,
            });
        }
        if let Some(seen) = seen.iter().find(|o| o.code == outcome) {
            count(seen);
        }
    }
}

/// The server side of every gRPC call this process answers.
pub type RpcMetrics = Red<RpcLabels, RpcCodeLabels>;

/// Most methods whose handles are kept; past it (a client inventing
/// paths) each call resolves its own.
const MAX_METHODS: usize = 4096;

/// The [`Handles`] of the RPC at `path` (`/package.Service/Method`): a
/// look-up by the borrowed path; labels are made once per method.
pub fn rpc_handles(path: &str) -> Arc<Handles<RpcCodeLabels>> {
    type ByPath = HashMap<Box<str>, Arc<Handles<RpcCodeLabels>>>;
    static BY_PATH: OnceLock<RwLock<ByPath>> = OnceLock::new();
    let by_path = BY_PATH.get_or_init(Default::default);
    if let Some(handles) = by_path.read().unwrap_or_else(|p| p.into_inner()).get(path) {
        return Arc::clone(handles);
    }
    let trimmed = path.trim_start_matches('/');
    let (service, method) = trimmed.split_once('/').unwrap_or((trimmed, ""));
    let labels = RpcLabels {
        service: service.to_owned(),
        method: method.to_owned(),
    };
    let made = {
        let labels = labels.clone();
        let (service, method) = (labels.service.clone(), labels.method.clone());
        Arc::new(rpc().handles(
            &labels.clone(),
            move |code| RpcCodeLabels {
                service: labels.service.clone(),
                method: labels.method.clone(),
                code: code_name(tonic::Code::from_i32(i32::from(code))).to_owned(),
            },
            || {
                vec![
                    opentelemetry::KeyValue::new("rpc.system", "grpc"),
                    opentelemetry::KeyValue::new("rpc.service", service),
                    opentelemetry::KeyValue::new("rpc.method", method),
                ]
            },
        ))
    };
    let mut by_path = by_path.write().unwrap_or_else(|p| p.into_inner());
    if by_path.len() >= MAX_METHODS {
        return made;
    }
    Arc::clone(by_path.entry(path.into()).or_insert(made))
}

/// The process's [`RpcMetrics`], registered on first use.
pub fn rpc() -> &'static RpcMetrics {
    static RPC: OnceLock<RpcMetrics> = OnceLock::new();
    RPC.get_or_init(|| {
        Red::register(
            "rpc_server",
            RedHelp {
                requests: "gRPC calls answered, by service, method and status code",
                duration: "gRPC call latency, request to the end of the response",
                in_flight: "gRPC calls being answered",
            },
            OtelNames {
                duration: "rpc.server.call.duration",
                requests: "rpc.server.requests",
                outcome: "rpc.grpc.status_code",
            },
        )
    })
}

/// The codes that say the server failed, not the request (OpenTelemetry's
/// gRPC conventions for a server span's error status).
pub const SERVER_FAULTS: [tonic::Code; 6] = [
    tonic::Code::Unknown,
    tonic::Code::DeadlineExceeded,
    tonic::Code::Unimplemented,
    tonic::Code::Internal,
    tonic::Code::Unavailable,
    tonic::Code::DataLoss,
];

/// The name of a gRPC code as the status proto spells it (`NOT_FOUND`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prometheus_text_drops_exemplars_units_and_eof() {
        let openmetrics = "# HELP rpc_server_requests gRPC calls.\n\
# TYPE rpc_server_requests counter\n\
rpc_server_requests_total{code=\"OK\"} 3\n\
# HELP lat Latency.\n\
# TYPE lat histogram\n\
# UNIT lat seconds\n\
lat_bucket{le=\"0.5\"} 2 # {trace_id=\"ab\"} 0.25\n\
lat_count 2\n\
# EOF\n";
        assert_eq!(
            to_prometheus_text(openmetrics),
            "# HELP rpc_server_requests_total gRPC calls.\n\
# TYPE rpc_server_requests_total counter\n\
rpc_server_requests_total{code=\"OK\"} 3\n\
# HELP lat Latency.\n\
# TYPE lat histogram\n\
lat_bucket{le=\"0.5\"} 2\n\
lat_count 2\n"
        );
    }
}
