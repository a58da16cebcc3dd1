//! brewmesh's service registry, served as `brewmesh.registry.v1.Registry`:
//! which instances exist and whether they are healthy.
//!
//! Soft state only: instances register with a lease and keep it alive; the
//! registry follows each one's `grpc.health.v1` status; a lease that runs
//! out, or an instance that stops answering, leaves the healthy set.
//!
//! # Several replicas
//!
//! Replicas do not talk to each other: every instance registers with every
//! replica (the runtime's registration client does this), so each replica
//! holds the whole picture on its own and health-checks it itself. Losing a
//! replica loses nothing a client needs; a replica that restarts is refilled
//! by the next heartbeats. No replication protocol, no quorum to lose.
//!
//! # Layout
//!
//! - [`run`] serves the registry until shutdown; start here.
//! - [`service`]: the gRPC handlers, the token check, the health follower.
//! - [`registry`]: leases, health and the per-service watch channels.

pub mod registry;
pub mod service;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use brewmesh::pb::registry::v1::registry_server::RegistryServer;
use brewmesh_runtime::mtls::{Access, role};
use brewmesh_runtime::secret::Secret;
use brewmesh_runtime::server::{Drained, ServeArgs, ServeError, parse_duration};

pub use brewmesh::pb::registry::v1 as pb;
pub use service::{RegistryService, Ttl};

/// The gRPC service name.
pub const SERVICE_NAME: &str = brewmesh::pb::registry::v1::registry_server::SERVICE_NAME;

/// The registry's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub serve: ServeArgs,

    /// The shared token that Register, KeepAlive and Deregister need.
    #[arg(
        long = "registry-token",
        env = "BREWMESH_REGISTRY_TOKEN",
        hide_env_values = true
    )]
    pub token: Secret,

    /// Lease length granted when an instance asks for none.
    #[arg(long, env = "BREWMESH_DEFAULT_TTL", default_value = "10s", value_parser = parse_duration)]
    pub default_ttl: Duration,

    /// The longest lease granted.
    #[arg(long, env = "BREWMESH_MAX_TTL", default_value = "60s", value_parser = parse_duration)]
    pub max_ttl: Duration,

    /// How soon an unreachable instance is checked again.
    #[arg(long, env = "BREWMESH_HEALTH_RETRY", default_value = "500ms", value_parser = parse_duration)]
    pub health_retry: Duration,
}

/// Who may call the registry: every role finds its peers here. Leases are
/// taken and kept by the services' own roles (each instance registers only
/// its role's services: `service.rs`); one is also let go by an operator,
/// straight or through the gateway's admin route, as Consul's `force-leave`
/// (with the registry token, as every write).
pub fn access() -> Access {
    let all = [
        role::REGISTRY,
        role::PAYMENT,
        role::BARISTA,
        role::STATION,
        role::GATEWAY,
        role::OPERATOR,
    ];
    let servers = [role::PAYMENT, role::BARISTA, role::STATION];
    let release = [
        role::PAYMENT,
        role::BARISTA,
        role::STATION,
        role::GATEWAY,
        role::OPERATOR,
    ];
    Access::new()
        .allow(SERVICE_NAME, &all)
        .allow(&format!("{SERVICE_NAME}/Register"), &servers)
        .allow(&format!("{SERVICE_NAME}/KeepAlive"), &servers)
        .allow(&format!("{SERVICE_NAME}/Deregister"), &release)
}

/// Serves the registry on `listener` until `shutdown`, then drains.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<Drained, ServeError> {
    let registry = Arc::new(registry::Registry::default());
    let counted = Arc::downgrade(&registry);
    brewmesh_runtime::metrics::register_gauges(
        "brewmesh_registry_instances",
        "Registered instances, by service and health",
        move || {
            counted
                .upgrade()
                .map(|registry| registry.counts())
                .unwrap_or_default()
                .into_iter()
                .map(|(service, health, n)| {
                    let health = health
                        .as_str_name()
                        .trim_start_matches("HEALTH_STATUS_")
                        .to_owned();
                    (
                        vec![
                            ("grpc_service".to_owned(), service),
                            ("health".to_owned(), health),
                        ],
                        n as f64,
                    )
                })
                .collect()
        },
    );
    let ttl = Ttl {
        default: config.default_ttl,
        min: Duration::from_secs(1),
        max: config.max_ttl.max(Duration::from_secs(1)),
    };
    let service = RegistryService::new(
        Arc::clone(&registry),
        config.token,
        ttl,
        config.health_retry,
        shutdown.clone(),
    );

    // Leases are checked four times a second: an expired instance leaves
    // within 250 ms of its deadline.
    let sweeper = {
        let (registry, shutdown) = (Arc::clone(&registry), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = tick.tick() => { registry.expire(Instant::now()); }
                    () = shutdown.cancelled() => return,
                }
            }
        })
    };
    let served = brewmesh_runtime::server::serve(
        listener,
        Routes::new(RegistryServer::new(service)),
        &[SERVICE_NAME],
        access(),
        &config.serve,
        shutdown,
    )
    .await;
    sweeper.abort();
    served
}
