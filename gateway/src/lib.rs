//! The brewmesh gateway: REST/JSON to gRPC, driven by the `google.api.http`
//! options of whatever descriptors it is given — brewmesh's own (built in),
//! descriptor-set files, or backends' reflection services.
//!
//! Layout: [`template`] parses and matches path templates; [`routes`] turns
//! the descriptors' http rules into a route table; [`transcode`] builds
//! request messages from path, query and body and writes JSON; [`proxy`]
//! is the request path (route, transcode, call, answer); [`errors`] maps
//! gRPC statuses to HTTP; [`observe`] counts requests for `/metrics`;
//! [`cache`] keeps cacheable GET answers;
//! [`openapi`] writes the OpenAPI document; [`descriptors`] loads them.
//! [`run`] serves it all until shutdown.

#![forbid(unsafe_code)]

pub mod cache;
pub mod codec;
pub mod descriptors;
pub mod errors;
pub mod observe;
pub mod openapi;
pub mod proxy;
pub mod routes;
pub mod template;
pub mod transcode;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use axum::serve::ListenerExt as _;
use brewmesh::discovery::{Balanced, Source};
use brewmesh::server::{Drained, parse_duration};
use bytes::Bytes;
use prost_reflect::DescriptorPool;
use std::future::IntoFuture as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::routes::{MethodSettings, Route};

/// Where the gateway listens unless told otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";

/// The gateway's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to listen on [default: 127.0.0.1:8080]; port 0 picks a free
    /// port (the log says which).
    #[arg(long, env = "BREWMESH_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Registry replica addresses: services without a --backend are found
    /// through it.
    #[arg(long = "registry", env = "BREWMESH_REGISTRY", value_delimiter = ',')]
    pub registries: Vec<String>,

    /// A backend for one service: `package.Service=host:port[,host:port…]`,
    /// balanced. Repeat for each service.
    #[arg(long = "backend", env = "BREWMESH_GATEWAY_BACKENDS", value_delimiter = ';', value_parser = parse_backend)]
    pub backends: Vec<(String, Vec<String>)>,

    /// Also front the services in this descriptor set file (`protoc
    /// --include_imports -o`, `buf build -o`). Repeatable.
    #[arg(
        long = "descriptor-set",
        env = "BREWMESH_GATEWAY_DESCRIPTOR_SETS",
        value_delimiter = ','
    )]
    pub descriptor_sets: Vec<PathBuf>,

    /// Also front every service of the backend at this address, learnt from
    /// its reflection service at start; calls go to that address unless a
    /// --backend says otherwise. Repeatable.
    #[arg(
        long = "reflect",
        env = "BREWMESH_GATEWAY_REFLECT",
        value_delimiter = ','
    )]
    pub reflect: Vec<String>,

    /// Leave out brewmesh's own services (front only --descriptor-set and
    /// --reflect ones).
    #[arg(long, env = "BREWMESH_GATEWAY_NO_BUILTIN")]
    pub no_builtin: bool,

    /// Deadline of a unary call when the client sends no `Grpc-Timeout`.
    #[arg(long, env = "BREWMESH_GATEWAY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Largest request body accepted; larger ones get 413.
    #[arg(long, env = "BREWMESH_GATEWAY_MAX_BODY", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,

    /// RPCs that answer 201 Created (`package.Service.Method`).
    #[arg(
        long = "created",
        env = "BREWMESH_GATEWAY_CREATED",
        value_delimiter = ',',
        default_value = "brewmesh.barista.v1.Barista.PlaceOrder"
    )]
    pub created: Vec<String>,

    /// GET answers to cache: `package.Service.Method=TTL`. Repeatable.
    #[arg(
        long = "cache",
        env = "BREWMESH_GATEWAY_CACHE",
        value_delimiter = ',',
        default_value = "brewmesh.barista.v1.Barista.GetMenu=5s",
        value_parser = parse_cached
    )]
    pub cached: Vec<(String, Duration)>,

    /// Keep cached answers in this Redis (`redis://host:6379`), shared by
    /// every gateway replica, instead of in process.
    #[arg(long, env = "BREWMESH_GATEWAY_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Most answers the in-process cache holds.
    #[arg(long, env = "BREWMESH_GATEWAY_CACHE_ENTRIES", default_value_t = 10_000)]
    pub cache_entries: usize,

    /// How long requests in flight (streams too) may take to finish once
    /// draining starts.
    #[arg(long, env = "BREWMESH_DRAIN_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: None,
            registries: Vec::new(),
            backends: Vec::new(),
            descriptor_sets: Vec::new(),
            reflect: Vec::new(),
            no_builtin: false,
            timeout: Duration::from_secs(30),
            max_body_bytes: 1 << 20,
            created: vec!["brewmesh.barista.v1.Barista.PlaceOrder".to_owned()],
            cached: vec![(
                "brewmesh.barista.v1.Barista.GetMenu".to_owned(),
                Duration::from_secs(5),
            )],
            redis_url: None,
            cache_entries: 10_000,
            drain_timeout: Duration::from_secs(15),
        }
    }
}

fn parse_backend(value: &str) -> Result<(String, Vec<String>), String> {
    let (service, addresses) = value
        .split_once('=')
        .ok_or_else(|| format!("{value:?}: expected package.Service=host:port"))?;
    let addresses: Vec<String> = addresses
        .split(',')
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    if service.is_empty() || addresses.is_empty() {
        return Err(format!("{value:?}: expected package.Service=host:port"));
    }
    Ok((service.to_owned(), addresses))
}

fn parse_cached(value: &str) -> Result<(String, Duration), String> {
    let (method, ttl) = value
        .split_once('=')
        .ok_or_else(|| format!("{value:?}: expected package.Service.Method=TTL"))?;
    let ttl = parse_duration(ttl).map_err(|e| format!("{value:?}: {e}"))?;
    Ok((method.to_owned(), ttl))
}

/// Why the gateway could not start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Descriptors could not be loaded.
    #[error(transparent)]
    Descriptors(#[from] descriptors::DescriptorError),
    /// The http rules do not form a route table.
    #[error(transparent)]
    Routes(#[from] routes::RouteError),
    /// A service has no backend.
    #[error("no backend for {0}: pass --backend {0}=host:port, --reflect or --registry")]
    NoBackend(String),
    /// A backend address is invalid.
    #[error(transparent)]
    Address(#[from] brewmesh::client::InvalidAddress),
    /// The shared cache is configured but cannot be reached.
    #[error(transparent)]
    Cache(#[from] cache::SharedError),
    /// The listener failed.
    #[error("serving HTTP")]
    Serve(#[from] std::io::Error),
}

/// Everything the request path reads; built once at start.
#[derive(Debug)]
pub struct Gateway {
    pub(crate) pool: DescriptorPool,
    pub(crate) routes: HashMap<http::Method, Vec<Route>>,
    pub(crate) upstreams: BTreeMap<String, Balanced>,
    pub(crate) timeout: Duration,
    pub(crate) max_body_bytes: usize,
    pub(crate) cache: cache::Store,
    pub(crate) openapi: Bytes,
}

/// The default address of each brewmesh service when no registry is used.
fn builtin_address(service: &str) -> Option<&'static str> {
    match service {
        "brewmesh.registry.v1.Registry" => Some("127.0.0.1:50051"),
        "brewmesh.payment.v1.Payments" => Some("127.0.0.1:50052"),
        "brewmesh.barista.v1.Barista" => Some("127.0.0.1:50053"),
        _ => None,
    }
}

impl Gateway {
    /// Loads the descriptors, builds the routes and the upstream channels.
    /// Must be called inside a Tokio runtime.
    pub async fn build(config: &Config) -> Result<Self, RunError> {
        let mut pool = DescriptorPool::new();
        // Always loaded: google.rpc types make error details readable.
        descriptors::add_set(&mut pool, brewmesh::FILE_DESCRIPTOR_SET, "brewmesh")?;
        let mut services: Vec<String> = Vec::new();
        if !config.no_builtin {
            services.extend(
                pool.services()
                    .filter(|s| s.full_name().starts_with("brewmesh."))
                    .map(|s| s.full_name().to_owned()),
            );
        }
        for path in &config.descriptor_sets {
            let before: Vec<String> = pool.services().map(|s| s.full_name().to_owned()).collect();
            descriptors::add_file(&mut pool, path)?;
            services.extend(
                pool.services()
                    .map(|s| s.full_name().to_owned())
                    .filter(|s| !before.contains(s)),
            );
        }
        let mut reflected: Vec<(String, String)> = Vec::new();
        for address in &config.reflect {
            for service in descriptors::add_reflected(&mut pool, address).await? {
                reflected.push((service.clone(), address.clone()));
                services.push(service);
            }
        }
        services.sort();
        services.dedup();

        let settings = MethodSettings {
            created: config.created.clone(),
            cached: config.cached.clone(),
        };
        let table = routes::build(&pool, &services, &settings)?;

        let mut upstreams = BTreeMap::new();
        for service in &services {
            let source = if let Some((_, addresses)) =
                config.backends.iter().find(|(s, _)| s == service)
            {
                Source::Static(addresses.clone())
            } else if let Some((_, address)) = reflected.iter().find(|(s, _)| s == service) {
                Source::Static(vec![address.clone()])
            } else if service == "brewmesh.registry.v1.Registry" && !config.registries.is_empty() {
                Source::Static(config.registries.clone())
            } else if !config.registries.is_empty() {
                Source::Registry {
                    registries: config.registries.clone(),
                    service: service.clone(),
                }
            } else if let Some(address) = builtin_address(service) {
                Source::Static(vec![address.to_owned()])
            } else {
                return Err(RunError::NoBackend(service.clone()));
            };
            upstreams.insert(service.clone(), brewmesh::discovery::balanced(source)?);
        }

        let cache = match &config.redis_url {
            Some(url) => cache::Store::Shared(cache::Shared::connect(url).await?),
            None => cache::Store::Local(cache::Cache::new(config.cache_entries)),
        };
        let openapi = Bytes::from(openapi::document(&pool, &table).to_string());
        let mut routes: HashMap<http::Method, Vec<Route>> = HashMap::new();
        for route in table {
            routes.entry(route.method.clone()).or_default().push(route);
        }
        Ok(Self {
            pool,
            routes,
            upstreams,
            timeout: config.timeout,
            max_body_bytes: config.max_body_bytes,
            cache,
            openapi,
        })
    }

    /// The axum router: the REST routes, `/healthz` and `/openapi.json`.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/healthz", get(proxy::healthz))
            .route("/openapi.json", get(proxy::openapi))
            .route("/metrics", get(proxy::metrics))
            .fallback(proxy::handle)
            .with_state(self)
    }
}

/// Serves the gateway on `listener` until `shutdown`, then lets requests in
/// flight finish for `drain_timeout`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<Drained, RunError> {
    let gateway = Arc::new(Gateway::build(&config).await?);
    let addr = listener.local_addr()?;
    let services: Vec<&String> = gateway.upstreams.keys().collect();
    tracing::info!(%addr, ?services, "serving");
    let app = gateway.clone().router();
    let stopping = shutdown.clone();
    // Nagle's algorithm would hold small answers back for tens of ms.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let serve = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stopping.cancelled().await });
    let deadline = async {
        shutdown.cancelled().await;
        tracing::info!(deadline = ?config.drain_timeout, "draining");
        tokio::time::sleep(config.drain_timeout).await;
    };
    tokio::select! {
        served = serve.into_future() => {
            served?;
            tracing::info!("drained");
            Ok(Drained::Gracefully)
        }
        () = deadline => Ok(Drained::AtDeadline),
    }
}
