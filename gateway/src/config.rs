//! The gateway's settings: flags and `BREWMESH_*` variables, parsed once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use brewmesh_runtime::server::parse_duration;

/// Where the gateway listens unless told otherwise.
pub const DEFAULT_ADDR: &str = brewmesh_runtime::defaults::GATEWAY_ADDR;

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

    /// How long a server stream (WatchOrder, a registry Watch) may last when
    /// the client sends no `Grpc-Timeout`; it then ends with
    /// DEADLINE_EXCEEDED in its last line, and the client watches again from
    /// where it was. A client that wants longer sends a longer Grpc-Timeout.
    #[arg(long, env = "BREWMESH_GATEWAY_STREAM_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub stream_timeout: Duration,

    /// Largest request body accepted, and the most a compressed body or
    /// message may inflate to; larger ones get 413 (RESOURCE_EXHAUSTED for
    /// RPCs).
    #[arg(long, env = "BREWMESH_GATEWAY_MAX_BODY", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,

    /// Answers (and streamed messages) smaller than this many bytes are sent
    /// uncompressed whatever the client accepts: below it, gzip and zstd
    /// cost more time than the bytes they save.
    #[arg(
        long,
        env = "BREWMESH_GATEWAY_COMPRESS_MIN_BYTES",
        default_value_t = 1024
    )]
    pub compress_min_bytes: u16,

    /// RPCs that answer 201 Created (`package.Service.Method`).
    #[arg(
        long = "created",
        env = "BREWMESH_GATEWAY_CREATED",
        value_delimiter = ',',
        default_value = "brewmesh.barista.v1.Barista.PlaceOrder,brewmesh.barista.v1.Barista.BatchPlaceOrders"
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

    /// With a `rediss://` URL: the CA certificates (PEM) Redis's
    /// certificate must lead to, instead of the system's.
    #[arg(long, env = "BREWMESH_GATEWAY_REDIS_CA", requires = "redis_url")]
    pub redis_ca: Option<PathBuf>,

    /// Most answers the in-process cache holds.
    #[arg(long, env = "BREWMESH_GATEWAY_CACHE_ENTRIES", default_value_t = 10_000)]
    pub cache_entries: usize,

    /// Jaeger's UI (`http://127.0.0.1:16686`): the web page links each
    /// order's trace there. Without it the page shows the trace id only.
    #[arg(long, env = "BREWMESH_JAEGER_UI", value_parser = parse_web_url)]
    pub jaeger_ui: Option<String>,

    /// An origin (`https://shop.example`) whose pages may call the gateway
    /// from a browser: REST, gRPC-Web and Connect. Repeatable; `*` allows
    /// any origin. None by default: only the gateway's own page may, and a
    /// request from any other origin is refused with 403.
    #[arg(long = "cors-origin", env = "BREWMESH_GATEWAY_CORS_ORIGINS", value_delimiter = ',', value_parser = parse_origin)]
    pub cors_origins: Vec<String>,

    /// Let those origins' pages send cookies and HTTP authentication
    /// (`Access-Control-Allow-Credentials`); not with `*`.
    #[arg(long, env = "BREWMESH_GATEWAY_CORS_CREDENTIALS")]
    pub cors_credentials: bool,

    /// How long a client may take to send a request's headers (HTTP/1.1);
    /// then the connection is closed.
    #[arg(long, env = "BREWMESH_GATEWAY_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// How long a connection may stay open with no request in flight;
    /// then it is closed (HTTP/2: with a GOAWAY).
    #[arg(long, env = "BREWMESH_GATEWAY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// How long a client may take to send a request's whole body; then
    /// 408.
    #[arg(long, env = "BREWMESH_GATEWAY_BODY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// HTTP/2 streams open at once on one connection.
    #[arg(long, env = "BREWMESH_GATEWAY_MAX_STREAMS", default_value_t = 256)]
    pub max_streams: u32,

    /// Requests a second each client IP may make (a token bucket); over
    /// it, 429 with `Retry-After`. Off by default: behind a proxy every
    /// client has the proxy's address, so limit there instead.
    #[arg(long, env = "BREWMESH_GATEWAY_RATE_LIMIT")]
    pub rate_limit: Option<std::num::NonZeroU32>,

    /// Requests a client IP may make at once, in a burst [default: the
    /// rate].
    #[arg(long, env = "BREWMESH_GATEWAY_RATE_BURST")]
    pub rate_burst: Option<std::num::NonZeroU32>,

    /// Requests in flight at once, streams included; more are refused at
    /// once with 503 and `Retry-After` (shed, never queued).
    #[arg(long, env = "BREWMESH_GATEWAY_MAX_IN_FLIGHT", default_value_t = 10_000)]
    pub max_in_flight: usize,

    /// Bytes of answers made and not yet taken by their clients, all of
    /// them together; past it, new requests are refused at once with 503
    /// and `Retry-After` until clients read (or go).
    #[arg(long, env = "BREWMESH_GATEWAY_MAX_HELD_BYTES", default_value_t = 64 << 20)]
    pub max_held_bytes: usize,

    /// Clients must send a bearer JWT signed by a key of this JSON Web Key
    /// Set file (an OIDC provider's `jwks_uri` document), read again when
    /// it changes; its scopes decide what they may call. Without it every
    /// client is anonymous and may call everything (`brewmesh gateway`
    /// then wants `--no-auth`).
    #[arg(long, env = "BREWMESH_GATEWAY_JWKS")]
    pub jwks: Option<PathBuf>,

    /// No --jwks, on purpose: every client is anonymous and may call every
    /// route, payments and the registry included. Logged as a warning.
    #[arg(long, conflicts_with = "jwks")]
    pub no_auth: bool,

    /// The `iss` every token must carry.
    #[arg(long, env = "BREWMESH_GATEWAY_JWT_ISSUER", requires = "jwks")]
    pub jwt_issuer: Option<String>,

    /// An `aud` every token must carry.
    #[arg(long, env = "BREWMESH_GATEWAY_JWT_AUDIENCE", requires = "jwks")]
    pub jwt_audience: Option<String>,

    /// Clock skew allowed on a token's `exp` and `nbf`.
    #[arg(long, env = "BREWMESH_GATEWAY_JWT_LEEWAY", default_value = "60s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,

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
            stream_timeout: Duration::from_secs(300),
            max_body_bytes: 1 << 20,
            compress_min_bytes: 1024,
            created: vec![
                "brewmesh.barista.v1.Barista.PlaceOrder".to_owned(),
                "brewmesh.barista.v1.Barista.BatchPlaceOrders".to_owned(),
            ],
            cached: vec![(
                "brewmesh.barista.v1.Barista.GetMenu".to_owned(),
                Duration::from_secs(5),
            )],
            redis_url: None,
            redis_ca: None,
            cache_entries: 10_000,
            jaeger_ui: None,
            cors_origins: Vec::new(),
            cors_credentials: false,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            max_streams: 256,
            rate_limit: None,
            rate_burst: None,
            max_in_flight: 10_000,
            max_held_bytes: 64 << 20,
            jwks: None,
            no_auth: false,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(15),
        }
    }
}

/// What the web page learns from `/web/config.json`.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PageConfig {
    /// Jaeger's UI, to link traces to.
    pub jaeger_url: Option<String>,
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

fn parse_web_url(value: &str) -> Result<String, String> {
    let uri: http::Uri = value.parse().map_err(|e| format!("{value:?}: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(value.trim_end_matches('/').to_owned()),
        _ => Err(format!("{value:?}: expected an http:// or https:// URL")),
    }
}

fn parse_cached(value: &str) -> Result<(String, Duration), String> {
    let (method, ttl) = value
        .split_once('=')
        .ok_or_else(|| format!("{value:?}: expected package.Service.Method=TTL"))?;
    let ttl = parse_duration(ttl).map_err(|e| format!("{value:?}: {e}"))?;
    Ok((method.to_owned(), ttl))
}

/// An origin as browsers send it: `scheme://host[:port]`, no path; or `*`.
fn parse_origin(value: &str) -> Result<String, String> {
    if value == "*" {
        return Ok(value.to_owned());
    }
    let uri: http::Uri = value
        .parse()
        .map_err(|e| format!("{value:?} is not an origin: {e}"))?;
    match (uri.scheme_str(), uri.authority(), uri.path()) {
        (Some("http" | "https"), Some(_), "" | "/") if uri.query().is_none() => {
            Ok(value.trim_end_matches('/').to_ascii_lowercase())
        }
        _ => Err(format!(
            "{value:?} is not an origin: expected scheme://host[:port], as a browser sends it"
        )),
    }
}
