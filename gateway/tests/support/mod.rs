//! What the gateway's test suites share: an HTTP client, a gateway started
//! on port 0, and the echo backend (a real gRPC server with reflection,
//! known to the gateway only through its descriptors).

#![allow(dead_code, clippy::unwrap_used)] // each suite uses part of it

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost_reflect::{DescriptorPool, DynamicMessage, Value};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{KeyAndValueRef, MetadataKey, MetadataMap};
use tonic::{Code, Status};

use brewmesh_gateway::codec::DynamicCodec;
use brewmesh_testing::{Running, spawn};

/// An answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{e}: {:?} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a JSON google.rpc.Status body with `code`, and `http`.
    pub fn assert_status(&self, http: u16, code: Code) -> serde_json::Value {
        assert_eq!(self.status.as_u16(), http, "{}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        let body = self.json();
        assert_eq!(body["code"], code as i32, "{body}");
        assert!(body["message"].is_string(), "{body}");
        assert!(body["details"].is_array(), "{body}");
        body
    }
}

/// A plain HTTP/1.1 client.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Http {
    /// A client of `http://addr`.
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
        }
    }

    /// Sends a request; `headers` as (name, value).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Answer {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body.into())).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(20), self.client.request(request))
            .await
            .expect("an answer within 20 s")
            .unwrap();
        let (parts, body) = response.into_parts();
        let body = tokio::time::timeout(Duration::from_secs(20), body.collect())
            .await
            .expect("a whole body within 20 s")
            .unwrap()
            .to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, &[], Bytes::new()).await
    }

    pub async fn post(&self, path: &str, body: &str) -> Answer {
        self.send(
            Method::POST,
            path,
            &[("content-type", "application/json")],
            body.to_owned(),
        )
        .await
    }
}

/// What each test server serves with: no faults, a 5 s drain.
pub fn serve_args() -> brewmesh_runtime::server::ServeArgs {
    brewmesh_runtime::server::ServeArgs {
        listen: None,
        drain_timeout: Duration::from_secs(5),
        inject_latency: None,
        faults: Vec::new(),
    }
}

pub type GatewayRun = Result<brewmesh_runtime::server::Drained, brewmesh_gateway::RunError>;
pub type PaymentRun = Result<brewmesh_runtime::server::Drained, brewmesh_payment::RunError>;
pub type BaristaRun = Result<brewmesh_runtime::server::Drained, brewmesh_barista::RunError>;

/// The shop behind a gateway: payment with no card delay and a barista
/// calling it, each on port 0 with its database in a directory.
pub struct Backends {
    pub payment: Running<PaymentRun>,
    pub barista: Running<BaristaRun>,
}

impl Backends {
    /// Payment, and a barista with 100 ms steps (`tweak` changes its
    /// settings), their data in `dir`.
    pub async fn start(
        dir: &std::path::Path,
        tweak: impl FnOnce(&mut brewmesh_barista::Config),
    ) -> Backends {
        let payment_config = brewmesh_payment::Config {
            serve: serve_args(),
            database: brewmesh_testing::database(dir, "payment").await,
            processing_delay: Duration::ZERO,
            registry: Default::default(),
        };
        let payment = spawn(|l, s| brewmesh_payment::run(l, payment_config, s)).await;
        let mut barista_config = brewmesh_barista::Config {
            serve: serve_args(),
            database: brewmesh_testing::database(dir, "barista").await,
            registry: Default::default(),
            payment_addrs: vec![payment.addr.to_string()],
            payment_dns: None,
            payment_timeout: Duration::from_secs(5),
            espresso_machines: 2,
            steam_wands: 2,
            queue_depth: 4,
            espresso_time: Duration::from_millis(100),
            milk_time: Duration::from_millis(100),
            brew_failure_rate: 0.0,
            remote: Default::default(),
            max_orders: brewmesh_barista::MaxOrders::Auto,
            order_lease: Duration::from_secs(2),
            watch_poll: Duration::from_millis(200),
        };
        tweak(&mut barista_config);
        let barista = spawn(|l, s| brewmesh_barista::run(l, barista_config, s)).await;
        Backends { payment, barista }
    }

    /// The gateway's `--backend`s for them; the registry's points at a
    /// port nothing listens on (it is not part of these suites).
    pub fn routes(&self) -> Vec<(String, Vec<String>)> {
        vec![
            (
                "brewmesh.barista.v1.Barista".into(),
                vec![self.barista.addr.to_string()],
            ),
            (
                "brewmesh.payment.v1.Payments".into(),
                vec![self.payment.addr.to_string()],
            ),
            (
                "brewmesh.registry.v1.Registry".into(),
                vec!["127.0.0.1:1".into()],
            ),
        ]
    }
}

/// A gateway on 127.0.0.1:0 with `config`.
pub async fn gateway(config: brewmesh_gateway::Config) -> (Running<GatewayRun>, Http) {
    let running = spawn(|l, s| brewmesh_gateway::run(l, config, s)).await;
    let http = Http::new(running.addr);
    (running, http)
}

/// A throwaway redis-server on a Unix socket in a temporary directory;
/// killed when dropped.
pub struct Redis {
    child: std::process::Child,
    /// `redis+unix:///…/redis.sock`, or `rediss://127.0.0.1:port`.
    pub url: String,
    /// Over TLS: the CA its certificate leads to.
    pub ca: Option<std::path::PathBuf>,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// Starts one and waits until it answers PING.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("redis.sock");
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        let url = format!("redis+unix://{}", socket.display());
        Redis::ready(Redis {
            child,
            url,
            ca: None,
            _dir: dir,
        })
        .await
    }

    /// One that speaks TLS only, on a free port of 127.0.0.1, with a
    /// certificate from a throwaway CA.
    pub async fn start_tls() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let authority = brewmesh_runtime::mtls::Authority::create().unwrap();
        // Any role: what matters is the name, 127.0.0.1.
        authority.issue("registry", &tls).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
            .arg("--tls-cert-file")
            .arg(tls.join("tls.crt"))
            .arg("--tls-key-file")
            .arg(tls.join("tls.key"))
            .arg("--tls-ca-cert-file")
            .arg(tls.join("ca.crt"))
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        Redis::ready(Redis {
            child,
            url: format!("rediss://127.0.0.1:{port}"),
            ca: Some(tls.join("ca.crt")),
            _dir: dir,
        })
        .await
    }

    async fn ready(redis: Redis) -> Redis {
        for _ in 0..200 {
            if redis.ping().await {
                return redis;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not answer within 5 s");
    }

    async fn ping(&self) -> bool {
        let client = match &self.ca {
            Some(ca) => redis::Client::build_with_tls(
                self.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca).unwrap()),
                },
            ),
            None => redis::Client::open(self.url.as_str()),
        };
        let Ok(client) = client else {
            return false;
        };
        let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .is_ok()
    }

    /// Kills it now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The echo service's descriptors, compiled from `tests/proto` (options
/// kept), encoded.
pub fn echo_descriptors() -> Vec<u8> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let mut compiler =
        protox::Compiler::new([format!("{dir}/tests/proto"), format!("{dir}/../proto")]).unwrap();
    compiler.include_imports(true).include_source_info(true);
    compiler.open_file("echo/v1/echo.proto").unwrap();
    compiler.encode_file_descriptor_set()
}

/// The echo backend on 127.0.0.1:0, with reflection (v1) and health.
pub async fn echo_backend() -> Running<()> {
    let set: &'static [u8] = Box::leak(echo_descriptors().into_boxed_slice());
    let pool = DescriptorPool::decode(set).unwrap();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(set)
        .build_v1()
        .unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("echo.v1.Echo", tonic_health::ServingStatus::Serving)
        .await;
    let echo = Echo {
        pool: Arc::new(pool),
    };
    let router = axum::Router::new()
        .route_service("/grpc.reflection.v1.ServerReflection/{*method}", reflection)
        .route_service("/grpc.health.v1.Health/{*method}", health)
        .route_service("/echo.v1.Echo/{*method}", echo);
    spawn(
        |listener: TcpListener, shutdown: CancellationToken| async move {
            let routes = tonic::service::Routes::from(router);
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await;
        },
    )
    .await
}

/// The echo service: any method of `echo.v1.Echo`, by its descriptor.
#[derive(Clone)]
struct Echo {
    pool: Arc<DescriptorPool>,
}

impl tower::Service<http::Request<axum::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<axum::body::Body>) -> Self::Future {
        let pool = Arc::clone(&self.pool);
        Box::pin(async move {
            let name = request.uri().path().rsplit('/').next().unwrap_or_default();
            let method = pool
                .get_service_by_name("echo.v1.Echo")
                .unwrap()
                .methods()
                .find(|m| m.name() == name);
            let Some(method) = method else {
                return Ok(Status::unimplemented(name.to_owned()).into_http());
            };
            let mut grpc = tonic::server::Grpc::new(DynamicCodec::new(method.input()));
            if method.is_server_streaming() {
                Ok(grpc.server_streaming(Repeat, request).await)
            } else {
                Ok(grpc.unary(Unary, request).await)
            }
        })
    }
}

/// Incoming metadata, each key as `seen-<key>` on the way back.
fn seen(metadata: &MetadataMap) -> MetadataMap {
    let mut out = MetadataMap::new();
    for entry in metadata.iter() {
        match entry {
            KeyAndValueRef::Ascii(name, value) => {
                let key = MetadataKey::from_bytes(format!("seen-{name}").as_bytes()).unwrap();
                out.insert(key, value.clone());
            }
            KeyAndValueRef::Binary(name, value) => {
                let key = MetadataKey::from_bytes(format!("seen-{name}").as_bytes()).unwrap();
                out.insert_bin(key, value.clone());
            }
        }
    }
    out
}

fn field_u32(message: &DynamicMessage, name: &str) -> u32 {
    match message.get_field_by_name(name).as_deref() {
        Some(Value::U32(n)) => *n,
        _ => 0,
    }
}

fn failure(message: &DynamicMessage) -> Option<Status> {
    let code = match message.get_field_by_name("fail_code").as_deref() {
        Some(Value::I32(n)) => *n,
        _ => 0,
    };
    (code != 0).then(|| {
        let mut metadata = MetadataMap::new();
        metadata.insert("failed-with", code.to_string().parse().unwrap());
        Status::with_metadata(
            Code::from_i32(code),
            format!("asked to fail with {code}"),
            metadata,
        )
    })
}

struct Unary;

impl tonic::server::UnaryService<DynamicMessage> for Unary {
    type Response = DynamicMessage;
    type Future = Pin<
        Box<dyn Future<Output = Result<tonic::Response<DynamicMessage>, Status>> + Send + 'static>,
    >;

    fn call(&mut self, request: tonic::Request<DynamicMessage>) -> Self::Future {
        Box::pin(async move {
            let metadata = seen(request.metadata());
            let message = request.into_inner();
            let delay = field_u32(&message, "delay_ms");
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay.into())).await;
            }
            if let Some(status) = failure(&message) {
                return Err(status);
            }
            let mut response = tonic::Response::new(message);
            *response.metadata_mut() = metadata;
            Ok(response)
        })
    }
}

struct Repeat;

type Messages = Pin<Box<dyn Stream<Item = Result<DynamicMessage, Status>> + Send + 'static>>;

impl tonic::server::ServerStreamingService<DynamicMessage> for Repeat {
    type Response = DynamicMessage;
    type ResponseStream = Messages;
    type Future =
        Pin<Box<dyn Future<Output = Result<tonic::Response<Messages>, Status>> + Send + 'static>>;

    fn call(&mut self, request: tonic::Request<DynamicMessage>) -> Self::Future {
        Box::pin(async move {
            let message = request.into_inner();
            let count = field_u32(&message, "count") as usize;
            let mut items: Vec<Result<DynamicMessage, Status>> =
                std::iter::repeat_n(Ok(message.clone()), count).collect();
            if let Some(status) = failure(&message) {
                if count == 0 {
                    return Err(status);
                }
                items.push(Err(status));
            }
            let stream: Messages = Box::pin(tokio_stream::iter(items));
            Ok(tonic::Response::new(stream))
        })
    }
}
