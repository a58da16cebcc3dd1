//! brewmesh's payment service: an idempotent ledger of authorizations,
//! captures, voids and refunds, served as `brewmesh.payment.v1.Payments`.
//!
//! # Layout
//!
//! - [`run`] serves the service on a listener until shutdown; start here.
//! - [`service`]: the gRPC handlers (validation, processing delay).
//! - [`ledger`]: the SQL ledger and its idempotency keys.
//! - [`error`]: failures, and how they become gRPC statuses.

pub mod error;
pub mod ledger;
pub mod service;

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use brewmesh::pb::payment::v1::payments_server::PaymentsServer;
use brewmesh_runtime::db::DatabaseArgs;
use brewmesh_runtime::discovery::RegistryArgs;
use brewmesh_runtime::mtls::{Access, role};
use brewmesh_runtime::server::{Drained, ServeArgs, ServeError, parse_duration};

pub use service::{DECLINED_CARD_TOKEN, PaymentService};

/// The gRPC service name, as health checks and the registry know it.
pub const SERVICE_NAME: &str = brewmesh::pb::payment::v1::payments_server::SERVICE_NAME;

/// The payment service's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub serve: ServeArgs,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub registry: RegistryArgs,

    /// How long each authorization, capture, void or refund takes, like a
    /// card network (the seed talk's steps take 2s).
    #[arg(long, env = "BREWMESH_PROCESSING_DELAY", default_value = "2s", value_parser = parse_duration)]
    pub processing_delay: Duration,
}

/// Why the payment service stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The ledger could not be opened.
    #[error("opening the ledger")]
    Ledger(#[from] brewmesh_runtime::db::OpenError),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Who may call the ledger: the barista's sagas, the gateway's payment
/// routes, operators.
pub fn access() -> Access {
    Access::new().allow(
        SERVICE_NAME,
        &[role::BARISTA, role::GATEWAY, role::OPERATOR],
    )
}

/// Serves the payment service on `listener` until `shutdown`, then drains.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<Drained, RunError> {
    let ledger = ledger::Ledger::open(&config.database).await?;
    let service = PaymentService::new(ledger, config.processing_delay);
    let routes = Routes::new(PaymentsServer::new(service));
    Ok(brewmesh_runtime::server::serve_registered(
        listener,
        routes,
        &[SERVICE_NAME],
        access(),
        &config.serve,
        &config.registry,
        shutdown,
    )
    .await?)
}
