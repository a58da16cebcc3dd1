//! Prometheus metrics of this process, written as text at `/metrics` (every
//! gRPC server serves it on its own port, over HTTP/1.1).
//!
//! One registry per process; the RPC families are here, the services
//! register their own (saga outcomes, stations, registry counts) through
//! [`register`].

use std::sync::{Mutex, OnceLock};

use std::sync::atomic::AtomicU64;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

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

/// Every metric in the Prometheus text format.
pub fn render() -> String {
    let mut out = String::new();
    let registry = registry().lock().unwrap_or_else(|p| p.into_inner());
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// `/metrics`: this process's metrics in the Prometheus text format (every
/// role's metrics server and the gateway serve this one handler).
pub async fn scrape() -> impl axum::response::IntoResponse {
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render(),
    )
}

/// A latency histogram from 0.5 ms to about 16 s.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

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
/// requests are both measured with it.
#[derive(Debug, Clone)]
pub struct Red<L, O> {
    /// Finished requests, by outcome.
    pub requests: Family<O, Counter>,
    /// Time to the answer.
    pub duration: Family<L, Histogram>,
    /// Requests being answered now.
    pub in_flight: Family<L, Gauge>,
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
    pub fn register(prefix: &str, help: RedHelp) -> Self {
        let red = Red {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            in_flight: Family::default(),
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

    /// A request `labels` has begun.
    pub fn begin(&self, labels: &L) {
        self.in_flight.get_or_create(labels).inc();
    }

    /// A request `labels` that began `elapsed` ago ended as `outcome`.
    pub fn end(&self, labels: &L, elapsed: std::time::Duration, outcome: &O) {
        self.in_flight.get_or_create(labels).dec();
        self.duration
            .get_or_create(labels)
            .observe(elapsed.as_secs_f64());
        self.requests.get_or_create(outcome).inc();
    }
}

/// The server side of every gRPC call this process answers.
pub type RpcMetrics = Red<RpcLabels, RpcCodeLabels>;

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
        )
    })
}

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
