//! Serving one brewmesh service: its routes plus `grpc.health.v1`, reflection
//! (v1 and v1alpha — grpcurl 1.8.6 speaks only v1alpha), TCP_NODELAY on every
//! accepted connection, and a graceful drain under a deadline.
//!
//! The drain follows the order a load balancer needs: health turns
//! NOT_SERVING first, then the listener stops accepting and the calls in
//! flight finish, and whatever is still open at the deadline is dropped.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::discovery::{Registration, RegistrationError, RegistryArgs};
use crate::health::HealthStatuses;
use crate::mtls::{Access, AccessLayer};

/// Parses flag durations such as `2s`, `150ms` or `1m 30s`.
pub use humantime::parse_duration;

/// Flags every server takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (the log says which).
    #[arg(long, env = "BREWMESH_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Fault injection: delay every call by this much before handling it
    /// (e.g. `50ms`, to play a slow replica); short for `--fault '*=delay:50ms'`.
    #[arg(long, env = "BREWMESH_INJECT_LATENCY", value_parser = parse_duration)]
    pub inject_latency: Option<Duration>,

    /// Fault injection per RPC, from the start (repeat the flag; `;`
    /// between specs in the variable): `package.Service/Method=abort:CODE`
    /// or `=delay:50ms`, `@PERCENT%` for a share of the calls. Switched
    /// while running at `/admin/faults` (see `brewmesh_runtime::fault`).
    #[arg(long = "fault", env = "BREWMESH_FAULTS", value_delimiter = ';')]
    pub faults: Vec<crate::fault::Fault>,

    /// How long calls in flight may take to finish once draining starts.
    #[arg(long, env = "BREWMESH_DRAIN_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every call in flight finished before the deadline.
    Gracefully,
    /// The deadline passed; calls still open were dropped.
    AtDeadline,
}

/// Why a server could not start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The descriptor set could not be loaded into reflection.
    #[error("building the reflection service")]
    Reflection(#[from] prost_reflect::DescriptorError),
    /// The listener or a connection failed.
    #[error("serving gRPC")]
    Transport(#[from] tonic::transport::Error),
    /// The listener's address could not be read.
    #[error("reading the listener's address")]
    Io(#[from] std::io::Error),
    /// Registration with the registry could not start.
    #[error(transparent)]
    Registration(#[from] RegistrationError),
}

/// Serves `routes` on `listener` until `shutdown` is cancelled, then drains
/// for at most `args.drain_timeout`.
///
/// `services` are the fully qualified names reported by `grpc.health.v1`
/// (besides the server-wide `""`). With this process's identity installed
/// ([`crate::mtls::install`]) the port takes mutual TLS and `access` says
/// which roles may call what; without one it is plaintext and open.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    services: &[&str],
    access: Access,
    args: &ServeArgs,
    shutdown: CancellationToken,
) -> Result<Drained, ServeError> {
    serve_registered(
        listener,
        routes,
        services,
        access,
        args,
        &RegistryArgs::default(),
        shutdown,
    )
    .await
}

/// [`serve`], and registered with the registry replicas in `registry` (if
/// any) while serving: the drain turns health NOT_SERVING, deregisters,
/// then stops accepting.
pub async fn serve_registered(
    listener: TcpListener,
    routes: Routes,
    services: &[&str],
    access: Access,
    args: &ServeArgs,
    registry: &RegistryArgs,
    shutdown: CancellationToken,
) -> Result<Drained, ServeError> {
    let drain_timeout = args.drain_timeout;
    let addr = listener.local_addr()?;
    // The RPC families exist (at 0) from the start, not from the first call.
    let _ = crate::metrics::rpc();
    let health = HealthStatuses::new();
    set_health(&health, services, ServingStatus::Serving);
    let draining = CancellationToken::new();
    let (reflection_v1, reflection_v1alpha) = crate::reflection::services(services)?;
    let routes = routes
        .add_service(health.service(draining.clone()))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let mut faults = args.faults.clone();
    if let Some(by) = args.inject_latency {
        faults.push(crate::fault::Fault {
            method: "*".to_owned(),
            action: crate::fault::Action::Delay(by),
            percent: 100.0,
        });
    }
    let faults = crate::fault::Faults::new(faults);
    // Prometheus scrapes the same port, over HTTP/1.1; faults are switched
    // there too.
    let routes = Routes::from(
        routes
            .into_axum_router()
            .route("/metrics", axum::routing::get(crate::metrics::scrape))
            .merge(crate::fault::admin(
                std::sync::Arc::clone(&faults),
                registry.token.clone(),
            )),
    );

    let stop_accepting = CancellationToken::new();
    let tls = crate::mtls::installed().cloned();
    let router = Server::builder()
        .accept_http1(true)
        // Outermost: the span and the latency include injected faults, and
        // refused callers are counted.
        .layer(crate::instrument::ServerLayer)
        .layer(AccessLayer(tls.is_some().then_some(access)))
        .layer(crate::fault::FaultLayer(faults))
        .add_routes(routes);
    let stopped = stop_accepting.clone().cancelled_owned();
    let server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
        match tls {
            Some(tls) => Box::pin(
                router.serve_with_incoming_shutdown(crate::mtls::incoming(listener, tls), stopped),
            ),
            None => {
                // tonic leaves Nagle on for a listener handed to it; small
                // gRPC frames would then wait for ACKs (tens of
                // milliseconds a call).
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
            }
        };
    tokio::pin!(server);

    crate::ready::serving(addr, services);
    let maintenance = tokio::spawn(maintenance_mode(
        health.clone(),
        services.iter().map(|s| s.to_string()).collect(),
        draining.clone(),
    ));
    let registration = match registry.enabled() {
        true => Some(Registration::start(registry, addr, services)?),
        false => None,
    };
    tokio::select! {
        result = &mut server => {
            result?;
            return Ok(Drained::Gracefully);
        }
        () = shutdown.cancelled() => {}
    }

    draining.cancel();
    maintenance.abort();
    set_health(&health, services, ServingStatus::NotServing);
    if let Some(registration) = registration {
        registration.deregister().await;
    }
    tracing::info!(deadline = ?drain_timeout, "draining");
    stop_accepting.cancel();
    match tokio::time::timeout(drain_timeout, server).await {
        Ok(result) => {
            result?;
            tracing::info!("drained");
            Ok(Drained::Gracefully)
        }
        Err(_) => {
            tracing::warn!("drain deadline passed; dropping the calls still open");
            Ok(Drained::AtDeadline)
        }
    }
}

/// Maintenance mode, as Consul and Eureka have it: SIGUSR1 turns health
/// NOT_SERVING so registries and balancers take the instance out of
/// rotation while it keeps answering the calls that still reach it;
/// SIGUSR2 turns it SERVING again. Ends when draining starts.
async fn maintenance_mode(
    health: HealthStatuses,
    services: Vec<String>,
    draining: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut off), Ok(mut on)) = (
        signal(SignalKind::user_defined1()),
        signal(SignalKind::user_defined2()),
    ) else {
        return;
    };
    let names: Vec<&str> = services.iter().map(String::as_str).collect();
    loop {
        let status = tokio::select! {
            _ = off.recv() => ServingStatus::NotServing,
            _ = on.recv() => ServingStatus::Serving,
            () = draining.cancelled() => return,
        };
        tracing::info!(?status, "maintenance mode: health changed by signal");
        set_health(&health, &names, status);
    }
}

fn set_health(health: &HealthStatuses, services: &[&str], status: ServingStatus) {
    for name in services.iter().copied().chain([""]) {
        health.set(name, status);
    }
}
