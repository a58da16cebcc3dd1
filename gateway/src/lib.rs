//! The brewmesh gateway: REST/JSON to gRPC, driven by the `google.api.http`
//! options of whatever descriptors it is given — brewmesh's own (built in),
//! descriptor-set files, or backends' reflection services.
//!
//! Layout: [`template`] parses and matches path templates; [`routes`] turns
//! the descriptors' http rules into a route table; [`transcode`] builds
//! request messages from path, query and body and writes JSON; [`proxy`]
//! is the request path (route, transcode, call, answer), [`metadata`] its
//! headers ⇄ gRPC metadata, [`streaming`] its NDJSON and SSE answers;
//! [`errors`] is every way a request fails, as one `GatewayError` answered
//! as a JSON `google.rpc.Status`; [`observe`] is the layer that finds the
//! route, counts the request and spans it; [`admin`] serves `/healthz` and
//! `/openapi.json` (`/metrics` is the runtime's); [`web`] is the shop's
//! page at `/`, and [`mesh`] the `/mesh` view of every process it shows,
//! read by [`scrape`];
//! [`cache`] keeps cacheable GET answers; [`openapi`] writes the OpenAPI
//! document; [`descriptors`] loads them. [`config`] is the flags, [`state`]
//! what is built from them once. [`run`] serves it all until shutdown.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod auth;
pub mod cache;
pub mod codec;
pub mod compression;
pub mod config;
pub mod cors;
pub mod descriptors;
pub mod envelope;
pub mod errors;
pub mod issuer;
pub mod jsonplan;
pub mod listen;
pub mod mesh;
pub mod metadata;
pub mod observe;
pub mod openapi;
pub mod protocols;
pub mod proxy;
pub mod routes;
pub mod rpc;
pub mod scrape;
pub mod state;
pub mod streaming;
pub mod template;
pub mod transcode;
pub mod translate;
pub mod web;

use std::sync::Arc;

use axum::Router;
use axum::routing::{any, get};
use brewmesh_runtime::server::Drained;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{Config, DEFAULT_ADDR};
pub use state::{Gateway, RunError};

/// The axum router: the REST routes, `/healthz`, `/openapi.json`,
/// `/metrics`, `/mesh`, and the web page at `/` with its files under
/// `/web/`.
pub fn router(gateway: Arc<Gateway>) -> Router {
    // Registered now: the families show on /metrics before a request.
    let _ = observe::http();
    let rest = any(proxy::handle)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&gateway),
            observe::layer,
        ))
        .with_state(Arc::clone(&gateway));
    Router::new()
        .route("/healthz", get(admin::healthz))
        .route("/openapi.json", get(admin::openapi))
        .route("/metrics", get(brewmesh_runtime::metrics::scrape))
        .route("/mesh", get(mesh::handle))
        .route("/", get(web::index))
        .route("/web/config.json", get(web::config))
        .route("/web/{file}", get(web::asset))
        .with_state(Arc::clone(&gateway))
        .fallback_service(rest)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&gateway),
            rpc::intercept,
        ))
        .layer(axum::middleware::from_fn_with_state(gateway, origins))
}

/// In front of everything: requests from other origins as `--cors-origin`
/// says ([`cors`]), a refusal in the request's protocol's own form; and
/// the answers' compression.
async fn origins(
    axum::extract::State(gateway): axum::extract::State<Arc<Gateway>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match gateway.cors.check(&request) {
        cors::Verdict::Pass => compressed(&gateway, request, next).await,
        cors::Verdict::Preflight(answer) => answer,
        cors::Verdict::Allowed(origin) => {
            let mut response = compressed(&gateway, request, next).await;
            gateway.cors.decorate(&origin, response.headers_mut());
            response
        }
        cors::Verdict::Refused(message) => {
            let protocol =
                rpc::Protocol::of(request.method(), request.headers(), request.uri().query());
            match protocol {
                Some(protocol) if rpc::rpc_path(request.uri().path()).is_some() => {
                    protocol.error(&gateway.pool, &tonic::Status::permission_denied(message))
                }
                _ => cors::Cors::refusal(message),
            }
        }
    }
}

/// The answer, compressed as the request's `Accept-Encoding` asks
/// ([`compression::answer`]).
async fn compressed(
    gateway: &Gateway,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let encoding = compression::negotiate(request.headers(), "accept-encoding");
    let response = next.run(request).await;
    compression::answer(response, encoding, usize::from(gateway.compress_min_bytes)).await
}

/// Serves the gateway on `listener` until `shutdown`, then lets requests in
/// flight finish for `drain_timeout`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<Drained, RunError> {
    let gateway = Arc::new(Gateway::build(&config).await?);
    if !gateway.auth.on() {
        tracing::warn!(
            "no --jwks: every client is anonymous and may call every route, \
             payments and the registry included"
        );
    }
    let addr = listener.local_addr()?;
    let _ = gateway.address.set(addr);
    let services: Vec<&str> = gateway.upstreams.keys().map(String::as_str).collect();
    brewmesh_runtime::ready::serving(addr, &services);
    let app = router(gateway.clone());
    let limits = listen::Limits {
        header_timeout: config.header_timeout,
        idle_timeout: config.idle_timeout,
        max_streams: config.max_streams,
    };
    let connections = listen::serve(
        listener,
        app,
        Arc::clone(&gateway),
        limits,
        shutdown.cancelled(),
    )
    .await;
    gateway.drain();
    tracing::info!(deadline = ?config.drain_timeout, "draining");
    match tokio::time::timeout(config.drain_timeout, connections.finish()).await {
        Ok(()) => {
            tracing::info!("drained");
            Ok(Drained::Gracefully)
        }
        Err(_) => Ok(Drained::AtDeadline),
    }
}
