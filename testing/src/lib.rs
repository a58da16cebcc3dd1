//! Starting a server in-process for integration tests: bound to port 0 on
//! 127.0.0.1, stopped (and drained) when the handle is dropped or stopped.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A server running in this process.
#[derive(Debug)]
pub struct Running<T> {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Cancel to start its drain.
    pub shutdown: CancellationToken,
    task: Option<JoinHandle<T>>,
}

impl<T> Running<T> {
    /// `http://addr`, for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts the drain and waits for the server to return.
    pub async fn stop(mut self) -> T {
        self.shutdown.cancel();
        let task = self.task.take().expect("a running server has its task");
        task.await.expect("the server task panicked")
    }
}

impl<T> Drop for Running<T> {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Binds 127.0.0.1:0 and spawns `run(listener, shutdown)`.
pub async fn spawn<F, Fut, T>(run: F) -> Running<T>
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding 127.0.0.1:0");
    spawn_on(listener, run)
}

/// Spawns `run(listener, shutdown)` on a listener the test bound itself
/// (to come back on the same address, say).
pub fn spawn_on<F, Fut, T>(listener: TcpListener, run: F) -> Running<T>
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(listener, shutdown.clone()));
    Running {
        addr,
        shutdown,
        task: Some(task),
    }
}

/// Set to a PostgreSQL server URL (`postgres://user@host:port`) to run the
/// service suites against PostgreSQL instead of SQLite; `scripts/postgres.sh`
/// starts a throwaway cluster and sets it.
pub const POSTGRES_ENV: &str = "BREWMESH_TEST_POSTGRES_URL";

/// Database flags for `service` in a test using `dir`: a SQLite file under
/// `dir/service`, or, when [`POSTGRES_ENV`] is set, a PostgreSQL database of
/// its own named after `dir` and `service`, so the service's replicas in one
/// test share it and no two tests do.
pub async fn database(dir: &std::path::Path, service: &str) -> brewmesh_runtime::db::DatabaseArgs {
    let mut args = brewmesh_runtime::db::DatabaseArgs {
        data_dir: dir.join(service),
        database_url: None,
        sqlite_synchronous: brewmesh_runtime::db::Synchronous::Normal,
    };
    if let Ok(server) = std::env::var(POSTGRES_ENV) {
        args.database_url = Some(postgres_database(&server, dir, service).await);
    }
    args
}

async fn postgres_database(server: &str, dir: &std::path::Path, service: &str) -> String {
    use sqlx::{Connection as _, Executor as _};
    let tag: String = dir
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .collect()
        })
        .unwrap_or_default();
    let name = format!("bm_{tag}_{service}");
    sqlx::any::install_default_drivers();
    let admin = format!("{}/postgres", server.trim_end_matches('/'));
    let mut conn = sqlx::AnyConnection::connect(&admin)
        .await
        .expect("connecting to the test PostgreSQL server");
    let exists = sqlx::query("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_optional(&mut conn)
        .await
        .expect("listing databases");
    if exists.is_none() {
        conn.execute(format!("CREATE DATABASE \"{name}\"").as_str())
            .await
            .expect("creating a test database");
    }
    format!("{}/{name}", server.trim_end_matches('/'))
}

/// A span as an OTLP receiver got it, with the `service.name` of its
/// resource.
#[derive(Debug, Clone)]
pub struct CollectedSpan {
    /// `service.name` of the process that sent it.
    pub service: String,
    /// The span.
    pub span: opentelemetry_proto::tonic::trace::v1::Span,
}

impl CollectedSpan {
    /// A string attribute of the span.
    pub fn attribute(&self, key: &str) -> Option<String> {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        self.span
            .attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref())
            .and_then(|v| v.value.as_ref())
            .map(|v| match v {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                Value::DoubleValue(d) => d.to_string(),
                other => format!("{other:?}"),
            })
    }

    /// The trace id, in hex.
    pub fn trace_id(&self) -> String {
        brewmesh_runtime::idempotency::to_hex(&self.span.trace_id)
    }

    /// The span id, in hex.
    pub fn span_id(&self) -> String {
        brewmesh_runtime::idempotency::to_hex(&self.span.span_id)
    }

    /// The parent's span id, in hex (empty for a root).
    pub fn parent_id(&self) -> String {
        brewmesh_runtime::idempotency::to_hex(&self.span.parent_span_id)
    }

    /// Whether its status is ERROR.
    pub fn is_error(&self) -> bool {
        self.span.status.as_ref().is_some_and(|s| s.code == 2)
    }
}

/// A log record as an OTLP receiver got it.
#[derive(Debug, Clone)]
pub struct CollectedLog {
    /// `service.name` of the process that sent it.
    pub service: String,
    /// The record.
    pub record: opentelemetry_proto::tonic::logs::v1::LogRecord,
}

/// A metric as an OTLP receiver got it (one export's data points).
#[derive(Debug, Clone)]
pub struct CollectedMetric {
    /// `service.name` of the process that sent it.
    pub service: String,
    /// The metric.
    pub metric: opentelemetry_proto::tonic::metrics::v1::Metric,
}

impl CollectedMetric {
    /// The data points of a sum (a counter), each as its attributes
    /// (`key=value`, strings and integers) and value.
    pub fn sum_points(&self) -> Vec<(Vec<String>, i64)> {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        use opentelemetry_proto::tonic::metrics::v1::metric::Data;
        use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as Number;
        let Some(Data::Sum(sum)) = &self.metric.data else {
            return Vec::new();
        };
        sum.data_points
            .iter()
            .map(|point| {
                let attributes = point
                    .attributes
                    .iter()
                    .map(|a| {
                        let value = match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                            Some(Value::StringValue(s)) => s.clone(),
                            Some(Value::IntValue(i)) => i.to_string(),
                            other => format!("{other:?}"),
                        };
                        format!("{}={value}", a.key)
                    })
                    .collect();
                let value = match point.value {
                    Some(Number::AsInt(i)) => i,
                    #[allow(clippy::cast_possible_truncation)]
                    Some(Number::AsDouble(d)) => d as i64,
                    None => 0,
                };
                (attributes, value)
            })
            .collect()
    }

    /// The sum of the data points that have every one of `attributes`
    /// (`key=value`).
    pub fn sum_where(&self, attributes: &[&str]) -> i64 {
        self.sum_points()
            .into_iter()
            .filter(|(have, _)| attributes.iter().all(|a| have.iter().any(|h| h == a)))
            .map(|(_, value)| value)
            .sum()
    }
}

mod otlp {
    pub use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
        LogsService, LogsServiceServer,
    };
    pub use opentelemetry_proto::tonic::collector::logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse,
    };
    pub use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
        MetricsService, MetricsServiceServer,
    };
    pub use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    pub use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    pub use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    pub use opentelemetry_proto::tonic::resource::v1::Resource;
}

/// An OTLP receiver on 127.0.0.1:0 (gRPC for traces, logs and metrics, and
/// HTTP/protobuf at `/v1/traces` and `/v1/logs` on the same port) that
/// keeps what it gets:
/// the test collector, and the benchmarks' local receiver.
#[derive(Debug, Clone, Default)]
pub struct Collector {
    spans: std::sync::Arc<std::sync::Mutex<Vec<CollectedSpan>>>,
    logs: std::sync::Arc<std::sync::Mutex<Vec<CollectedLog>>>,
    metrics: std::sync::Arc<std::sync::Mutex<Vec<CollectedMetric>>>,
}

fn service_name(resource: Option<&otlp::Resource>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    resource
        .iter()
        .flat_map(|r| r.attributes.iter())
        .find(|a| a.key == "service.name")
        .and_then(|a| a.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

impl Collector {
    /// Starts one; it runs until the runtime ends. Returns it and its
    /// `http://127.0.0.1:port` endpoint (for either protocol).
    pub async fn start() -> (Collector, String) {
        Collector::start_with(None).await
    }

    /// [`Collector::start`] over TLS, OTLP/gRPC only: its certificate is
    /// `tls/tls.crt` under `dir`, for 127.0.0.1, from the throwaway CA in
    /// `tls/ca.crt` (what `OTEL_EXPORTER_OTLP_CERTIFICATE` names). Returns
    /// its `https://127.0.0.1:port` endpoint.
    pub async fn start_tls(dir: &std::path::Path) -> (Collector, String) {
        let tls = dir.join("tls");
        let authority = brewmesh_runtime::mtls::Authority::create().expect("a CA");
        authority.issue("registry", &tls).expect("a certificate");
        let read = |name: &str| std::fs::read(tls.join(name)).expect("the certificate files");
        let identity = tonic::transport::Identity::from_pem(read("tls.crt"), read("tls.key"));
        Collector::start_with(Some(
            tonic::transport::ServerTlsConfig::new().identity(identity),
        ))
        .await
    }

    async fn start_with(tls: Option<tonic::transport::ServerTlsConfig>) -> (Collector, String) {
        use prost::Message as _;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let collector = Collector::default();
        let routes = tonic::service::Routes::new(
            otlp::TraceServiceServer::new(collector.clone()).max_decoding_message_size(64 << 20),
        )
        .add_service(
            otlp::LogsServiceServer::new(collector.clone()).max_decoding_message_size(64 << 20),
        )
        .add_service(
            otlp::MetricsServiceServer::new(collector.clone()).max_decoding_message_size(64 << 20),
        );
        let (traces, logs) = (collector.clone(), collector.clone());
        let router = routes
            .into_axum_router()
            .route(
                "/v1/traces",
                axum::routing::post(move |body: axum::body::Bytes| async move {
                    match otlp::ExportTraceServiceRequest::decode(body) {
                        Ok(request) => {
                            traces.keep_spans(request);
                            http::StatusCode::OK
                        }
                        Err(_) => http::StatusCode::BAD_REQUEST,
                    }
                }),
            )
            .route(
                "/v1/logs",
                axum::routing::post(move |body: axum::body::Bytes| async move {
                    match otlp::ExportLogsServiceRequest::decode(body) {
                        Ok(request) => {
                            logs.keep_logs(request);
                            http::StatusCode::OK
                        }
                        Err(_) => http::StatusCode::BAD_REQUEST,
                    }
                }),
            );
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls).expect("the collector's TLS");
        }
        tokio::spawn(
            server
                .accept_http1(true)
                .add_routes(tonic::service::Routes::from(router))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (collector, format!("{scheme}://{addr}"))
    }

    fn keep_spans(&self, request: otlp::ExportTraceServiceRequest) {
        let mut received = Vec::new();
        for resource_spans in request.resource_spans {
            let service = service_name(resource_spans.resource.as_ref());
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.push(CollectedSpan {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(received);
    }

    fn keep_logs(&self, request: otlp::ExportLogsServiceRequest) {
        let mut received = Vec::new();
        for resource_logs in request.resource_logs {
            let service = service_name(resource_logs.resource.as_ref());
            for scope in resource_logs.scope_logs {
                for record in scope.log_records {
                    received.push(CollectedLog {
                        service: service.clone(),
                        record,
                    });
                }
            }
        }
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(received);
    }

    fn keep_metrics(&self, request: otlp::ExportMetricsServiceRequest) {
        let mut received = Vec::new();
        for resource_metrics in request.resource_metrics {
            let service = service_name(resource_metrics.resource.as_ref());
            for scope in resource_metrics.scope_metrics {
                for metric in scope.metrics {
                    received.push(CollectedMetric {
                        service: service.clone(),
                        metric,
                    });
                }
            }
        }
        self.metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(received);
    }

    /// Every metric export received so far, in order.
    pub fn metrics(&self) -> Vec<CollectedMetric> {
        self.metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every log record received so far.
    pub fn logs(&self) -> Vec<CollectedLog> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many spans were received so far.
    pub fn count(&self) -> usize {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[tonic::async_trait]
impl otlp::TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<otlp::ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<otlp::ExportTraceServiceResponse>, tonic::Status> {
        self.keep_spans(request.into_inner());
        Ok(tonic::Response::new(otlp::ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl otlp::LogsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<otlp::ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<otlp::ExportLogsServiceResponse>, tonic::Status> {
        self.keep_logs(request.into_inner());
        Ok(tonic::Response::new(otlp::ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl otlp::MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<otlp::ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<otlp::ExportMetricsServiceResponse>, tonic::Status> {
        self.keep_metrics(request.into_inner());
        Ok(tonic::Response::new(otlp::ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}
