//! brewmesh's barista service: the menu, orders, the brewing stations and
//! the order saga, served as `brewmesh.barista.v1.Barista`.
//!
//! # Layout
//!
//! - [`run`] serves the service on a listener until shutdown; start here.
//! - [`service`]: the gRPC handlers: validation, then the shop.
//! - [`shop`]: placing orders, and the sagas this barista drives — leases,
//!   taking over the orders of baristas that are gone.
//! - [`saga`]: one order's saga — authorize while brewing, capture or void
//!   — fenced by its owner, and its recovery after a crash.
//! - [`payments`]: the saga's payment calls, retried under a budget.
//! - [`journal`]: the orders' history as this process writes and watches it.
//! - [`stations`]: espresso machines and steam wands with bounded queues.
//! - [`store`]: orders and their event history in SQL.
//! - [`menu`], [`error`], [`observe`].

pub mod error;
mod journal;
pub mod menu;
pub mod observe;
mod payments;
mod saga;
pub mod service;
mod shop;
pub mod stations;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use brewmesh::pb::barista::v1::barista_server::BaristaServer;
use brewmesh::pb::payment::v1::payments_client::PaymentsClient;
use brewmesh::pb::payment::v1::payments_server;
use brewmesh_runtime::db::DatabaseArgs;
use brewmesh_runtime::discovery::RegistryArgs;
use brewmesh_runtime::discovery::Source;
use brewmesh_runtime::mtls::{Access, role};
use brewmesh_runtime::server::{Drained, ServeArgs, ServeError, parse_duration};

pub use service::BaristaService;

/// The gRPC service name, as health checks and the registry know it.
pub const SERVICE_NAME: &str = brewmesh::pb::barista::v1::barista_server::SERVICE_NAME;

/// The barista service's settings.
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

    /// Payment address(es), `host:port`, balanced [default: found through
    /// the registry when --registry is set, else 127.0.0.1:50052].
    #[arg(
        long = "payment-addr",
        env = "BREWMESH_PAYMENT_ADDR",
        value_delimiter = ','
    )]
    pub payment_addrs: Vec<String>,

    /// Find payment by DNS instead (`host:port`, looked up every 5 s): on
    /// Kubernetes, a headless Service.
    #[arg(long, env = "BREWMESH_PAYMENT_DNS", conflicts_with = "payment_addrs")]
    pub payment_dns: Option<String>,

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

    /// How long an order stays with the barista driving it without a
    /// renewal; after that another replica (or a restart) takes it over.
    #[arg(long, env = "BREWMESH_ORDER_LEASE", default_value = "5s", value_parser = parse_duration)]
    pub order_lease: Duration,

    /// How often WatchOrder looks for events written by other processes.
    #[arg(long, env = "BREWMESH_WATCH_POLL", default_value = "500ms", value_parser = parse_duration)]
    pub watch_poll: Duration,
}

impl Config {
    /// Where the barista learns payment's addresses.
    pub fn payment_source(&self) -> Source {
        Source::pick(
            payments_server::SERVICE_NAME,
            &self.payment_addrs,
            self.payment_dns.as_deref(),
            &self.registry.registries,
        )
        // Never empty: payment has a default address.
        .unwrap_or(Source::Static(Vec::new()))
    }
}

/// Why the barista service stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The order store could not be opened.
    #[error("opening the order store")]
    Open(#[from] brewmesh_runtime::db::OpenError),
    /// The order store could not be read.
    #[error("reading the order store")]
    Store(#[from] sqlx::Error),
    /// A payment address is not valid.
    #[error(transparent)]
    PaymentAddress(#[from] brewmesh_runtime::client::InvalidAddress),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Who may call the barista: the gateway (the shop's customers, through
/// it) and operators.
pub fn access() -> Access {
    Access::new().allow(SERVICE_NAME, &[role::GATEWAY, role::OPERATOR])
}

/// Serves the barista service on `listener` until `shutdown`, then drains:
/// calls in flight and sagas under way get `drain_timeout` to finish; the
/// orders of sagas still running then are released at once to another
/// barista replica (or to the next start).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<Drained, RunError> {
    let store = store::OrderStore::open(&config.database).await?;
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
    observe::register(&stations);
    let payments = payments::PaymentService::new(
        PaymentsClient::new(brewmesh_runtime::discovery::balanced(
            config.payment_source(),
        )?),
        config.payment_timeout,
    );
    let shop = Arc::new(shop::Shop::new(
        store,
        stations,
        Box::new(payments),
        config.order_lease,
    ));
    let adopted = shop.adopt().await?;
    if adopted > 0 {
        tracing::info!(orders = adopted, "took over unfinished orders");
    }
    // Leases are renewed until the sagas are done draining, not just until
    // the drain starts; otherwise a replica would take over mid-drain.
    let sagas_drained = CancellationToken::new();
    let leases =
        tokio::spawn(Arc::clone(&shop).keep_leases(shutdown.clone(), sagas_drained.clone()));

    tokio::spawn(Arc::clone(shop.journal()).follow_others(config.watch_poll, shutdown.clone()));
    let service = BaristaService::new(Arc::clone(&shop), shutdown.clone());
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
        brewmesh_runtime::server::serve_registered(
            listener,
            routes,
            &[SERVICE_NAME],
            access(),
            &config.serve,
            &config.registry,
            shutdown.clone()
        ),
        sagas
    );
    sagas_drained.cancel();
    let _ = leases.await;
    if !sagas_done {
        tracing::warn!(
            "drain deadline passed with sagas under way; another barista (or the next start) takes them over"
        );
    }
    shop.release().await;
    Ok(served?)
}
