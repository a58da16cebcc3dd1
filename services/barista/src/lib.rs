//! brewmesh's barista service: the menu, orders, the brewing stations and
//! the order saga, served as `brewmesh.barista.v1.Barista`.
//!
//! # Layout
//!
//! - [`run`] serves the service on a listener until shutdown; start here.
//! - [`service`]: the gRPC handlers (validation, admission, WatchOrder).
//! - [`shop`]: the saga — authorize while brewing, capture or void — and its
//!   recovery after a crash.
//! - [`stations`]: espresso machines and steam wands with bounded queues.
//! - [`store`]: orders and their event history in SQL.
//! - [`menu`], [`error`].

pub mod error;
pub mod menu;
pub mod service;
pub mod shop;
pub mod stations;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::Routes;

use brewmesh::db::DatabaseArgs;
use brewmesh::pb::barista::v1::barista_server::BaristaServer;
use brewmesh::pb::payment::v1::payments_client::PaymentsClient;
use brewmesh::server::{Drained, ServeArgs, ServeError, parse_duration};

pub use service::BaristaService;

/// The gRPC service name, as health checks and the registry know it.
pub const SERVICE_NAME: &str = <BaristaServer<BaristaService> as NamedService>::NAME;

/// The barista service's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub serve: ServeArgs,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub database: DatabaseArgs,

    /// Payment service address(es), `host:port`; several are balanced.
    #[arg(
        long = "payment-addr",
        env = "BREWMESH_PAYMENT_ADDR",
        value_delimiter = ',',
        default_value = "127.0.0.1:50052"
    )]
    pub payment_addrs: Vec<String>,

    /// Deadline of each call to the payment service.
    #[arg(long, env = "BREWMESH_PAYMENT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub payment_timeout: Duration,

    /// Espresso machines: drinks pulled at the same time.
    #[arg(long, env = "BREWMESH_ESPRESSO_MACHINES", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub espresso_machines: u16,

    /// Steam wands: milk steamed at the same time.
    #[arg(long, env = "BREWMESH_STEAM_WANDS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub steam_wands: u16,

    /// Orders that may wait at each station; past it, RESOURCE_EXHAUSTED.
    #[arg(long, env = "BREWMESH_QUEUE_DEPTH", default_value_t = 16)]
    pub queue_depth: u16,

    /// How long pulling the espresso takes.
    #[arg(long, env = "BREWMESH_ESPRESSO_TIME", default_value = "2s", value_parser = parse_duration)]
    pub espresso_time: Duration,

    /// How long steaming the milk takes.
    #[arg(long, env = "BREWMESH_MILK_TIME", default_value = "2s", value_parser = parse_duration)]
    pub milk_time: Duration,

    /// Fraction of station steps that fail (0 to 1), for fault injection.
    #[arg(long, env = "BREWMESH_BREW_FAILURE_RATE", default_value_t = 0.0)]
    pub brew_failure_rate: f64,

    /// How often WatchOrder looks for events written by other processes.
    #[arg(long, env = "BREWMESH_WATCH_POLL", default_value = "500ms", value_parser = parse_duration)]
    pub watch_poll: Duration,
}

/// Why the barista service stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The data directory could not be created.
    #[error("preparing the data directory")]
    DataDir(#[from] std::io::Error),
    /// The order store could not be opened or read.
    #[error("opening the order store")]
    Store(#[from] sqlx::Error),
    /// A payment address is not valid.
    #[error(transparent)]
    PaymentAddress(#[from] brewmesh::client::InvalidAddress),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Serves the barista service on `listener` until `shutdown`, then drains:
/// calls in flight and sagas under way get `drain_timeout` to finish; sagas
/// still running then are picked up again at the next start.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<Drained, RunError> {
    let store = store::OrderStore::open(&config.database.url("barista.db")?).await?;
    let rate = config.brew_failure_rate.clamp(0.0, 1.0);
    let queue = usize::from(config.queue_depth);
    let stations = stations::Stations {
        espresso: stations::Station::new(
            "espresso",
            config.espresso_machines.into(),
            queue,
            config.espresso_time,
            rate,
        ),
        milk: stations::Station::new(
            "milk",
            config.steam_wands.into(),
            queue,
            config.milk_time,
            rate,
        ),
    };
    let payments = PaymentsClient::new(brewmesh::client::channel(&config.payment_addrs)?);
    let shop = Arc::new(shop::Shop::new(
        store,
        stations,
        payments,
        config.payment_timeout,
    ));
    let resumed = shop.recover().await?;
    if resumed > 0 {
        tracing::info!(orders = resumed, "resumed unfinished orders");
    }

    let service = BaristaService::new(Arc::clone(&shop), shutdown.clone(), config.watch_poll);
    let routes = Routes::new(BaristaServer::new(service));
    let drain_timeout = config.serve.drain_timeout;
    let sagas = async {
        shutdown.cancelled().await;
        shop.sagas().close();
        tokio::time::timeout(drain_timeout, shop.sagas().wait())
            .await
            .is_ok()
    };
    let (served, sagas_done) = tokio::join!(
        brewmesh::server::serve(
            listener,
            routes,
            &[SERVICE_NAME],
            drain_timeout,
            shutdown.clone()
        ),
        sagas
    );
    if !sagas_done {
        tracing::warn!("drain deadline passed with sagas under way; they resume at the next start");
    }
    Ok(served?)
}
