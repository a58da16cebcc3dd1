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
//! - [`stations`]: espresso machines and steam wands with bounded queues,
//!   here or at station replicas ([`remote`]).
//! - [`store`]: orders and their event history in SQL.
//! - [`menu`], [`error`], [`observe`].

pub mod error;
mod journal;
pub mod menu;
pub mod observe;
mod payments;
pub mod remote;
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

    #[command(flatten)]
    #[allow(missing_docs)]
    pub remote: RemoteArgs,

    /// Fraction of station steps that fail (0 to 1), for fault injection.
    #[arg(long, env = "BREWMESH_BREW_FAILURE_RATE", default_value_t = 0.0)]
    pub brew_failure_rate: f64,

    /// Orders this barista drives at once, at most: past it, a new order
    /// gets RESOURCE_EXHAUSTED and when to come back. `auto`: half the
    /// memory limit of its pod (cgroup) at 32 KiB an order — over twice
    /// what one costs (BENCHMARKS.md, "Memory per order in flight") — or,
    /// without a limit, no bound but the stations' queues. `none`: no
    /// bound.
    #[arg(long, env = "BREWMESH_MAX_ORDERS", default_value = "auto", value_parser = parse_max_orders)]
    pub max_orders: MaxOrders,

    /// How long an order stays with the barista driving it without a
    /// renewal; after that another replica (or a restart) takes it over.
    #[arg(long, env = "BREWMESH_ORDER_LEASE", default_value = "5s", value_parser = parse_duration)]
    pub order_lease: Duration,

    /// How often WatchOrder looks for events written by other processes.
    #[arg(long, env = "BREWMESH_WATCH_POLL", default_value = "500ms", value_parser = parse_duration)]
    pub watch_poll: Duration,
}

/// How many orders a barista drives at once, at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxOrders {
    /// Sized from the pod's memory limit, if there is one.
    Auto,
    /// This many.
    At(usize),
    /// Only the stations' queues bound them.
    None,
}

/// The memory one order in flight is given under `--max-orders auto`.
const ORDER_MEMORY: u64 = 32 * 1024;

impl MaxOrders {
    /// The bound for a pod with `memory_limit` bytes, if any.
    pub fn bound(self, memory_limit: Option<u64>) -> Option<usize> {
        match self {
            MaxOrders::At(orders) => Some(orders),
            MaxOrders::None => None,
            MaxOrders::Auto => memory_limit.map(|limit| {
                usize::try_from(limit / 2 / ORDER_MEMORY)
                    .unwrap_or(usize::MAX)
                    .max(1)
            }),
        }
    }
}

fn parse_max_orders(text: &str) -> Result<MaxOrders, String> {
    match text {
        "auto" => Ok(MaxOrders::Auto),
        "none" => Ok(MaxOrders::None),
        number => match number.parse::<usize>() {
            Ok(0) | Err(_) => Err(format!(
                "{number:?}: `auto`, `none` or a number of orders above 0"
            )),
            Ok(orders) => Ok(MaxOrders::At(orders)),
        },
    }
}

impl Config {
    /// The stations the drinks are made at: this process's, or the
    /// balanced station replicas.
    fn stations(&self) -> Result<stations::Stations, RunError> {
        let rate = self.brew_failure_rate.clamp(0.0, 1.0);
        let queue = usize::from(self.queue_depth);
        let local = |name, machines: u16, time| {
            stations::Station::new(name, machines.into(), queue, time, rate)
        };
        let remote = &self.remote;
        if remote.stations == Placement::Local {
            return Ok(stations::Stations {
                espresso: local("espresso", self.espresso_machines, self.espresso_time),
                milk: local("milk", self.steam_wands, self.milk_time),
                remote: None,
            });
        }
        let source = |service: &'static str, addrs: &[String], dns: Option<&str>| {
            Source::pick(service, addrs, dns, &self.registry.registries)
                .ok_or(RunError::NoStations(service))
        };
        let espresso = source(
            brewmesh_station::ESPRESSO,
            &remote.espresso_addrs,
            remote.espresso_dns.as_deref(),
        )?;
        let milk = source(
            brewmesh_station::MILK,
            &remote.milk_addrs,
            remote.milk_dns.as_deref(),
        )?;
        // A part is in flight at its replica until its stream ends: P2C
        // weighs the parts each replica is still making.
        let streams = |source| {
            brewmesh_runtime::discovery::balanced_with(
                source,
                brewmesh_runtime::discovery::Balancing::P2cStreams,
                brewmesh_runtime::discovery::Policies::brewmesh(),
            )
        };
        let brewing =
            remote::Remote::new(streams(espresso)?, streams(milk)?, remote.station_timeout);
        // The failures are the replicas' own (`brewmesh station
        // --brew-failure-rate`); the times only say when a full shop
        // frees up.
        let calls = |name, time| {
            stations::Station::new(name, remote.station_calls.into(), queue, time, 0.0)
        };
        Ok(stations::Stations {
            espresso: calls("espresso", self.espresso_time),
            milk: calls("milk", self.milk_time),
            remote: Some(brewing),
        })
    }

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

/// Whether the drinks are made at station replicas of their own, and how
/// they are found and called.
#[derive(Debug, Clone, clap::Args)]
pub struct RemoteArgs {
    /// Where drinks are made: `local`, on this process's machines (the
    /// flags above), or `remote`, at station replicas (`brewmesh station`)
    /// found through the registry, or at --espresso-addr and --milk-addr.
    #[arg(long, env = "BREWMESH_STATIONS", default_value = "local")]
    pub stations: Placement,

    /// Espresso station address(es), `host:port`, balanced [default: found
    /// through the registry when --registry is set, else 127.0.0.1:50054]
    /// (with --stations remote).
    #[arg(
        long = "espresso-addr",
        env = "BREWMESH_ESPRESSO_ADDR",
        value_delimiter = ','
    )]
    pub espresso_addrs: Vec<String>,

    /// Find the espresso stations by DNS instead (`host:port`).
    #[arg(long, env = "BREWMESH_ESPRESSO_DNS", conflicts_with = "espresso_addrs")]
    pub espresso_dns: Option<String>,

    /// Milk station address(es), `host:port`, balanced [default: found
    /// through the registry when --registry is set, else 127.0.0.1:50055]
    /// (with --stations remote).
    #[arg(long = "milk-addr", env = "BREWMESH_MILK_ADDR", value_delimiter = ',')]
    pub milk_addrs: Vec<String>,

    /// Find the milk stations by DNS instead (`host:port`).
    #[arg(long, env = "BREWMESH_MILK_DNS", conflicts_with = "milk_addrs")]
    pub milk_dns: Option<String>,

    /// With remote stations: parts of drinks this barista has at each kind
    /// of station at once (waiting there or brewing); the queue depth
    /// still bounds the orders waiting here for one of them.
    #[arg(long, env = "BREWMESH_STATION_CALLS", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    pub station_calls: u16,

    /// Deadline of each call to a station: the wait for a machine and the
    /// brewing.
    #[arg(long, env = "BREWMESH_STATION_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub station_timeout: Duration,
}

impl Default for RemoteArgs {
    /// Drinks made in the barista's process.
    fn default() -> Self {
        Self {
            stations: Placement::Local,
            espresso_addrs: Vec::new(),
            espresso_dns: None,
            milk_addrs: Vec::new(),
            milk_dns: None,
            station_calls: 256,
            station_timeout: Duration::from_secs(60),
        }
    }
}

/// Where a barista's drinks are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Placement {
    /// On this process's machines.
    Local,
    /// At station replicas of their own.
    Remote,
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
    /// A payment or station address is not valid.
    #[error(transparent)]
    Address(#[from] brewmesh_runtime::client::InvalidAddress),
    /// `--stations remote` with no way to find the stations (every
    /// brewmesh station has a default address, so only a service this
    /// version does not know gets here).
    #[error("--stations remote: no way to find {0}; pass --registry, or the stations' addresses")]
    NoStations(&'static str),
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
    let stations = config.stations()?;
    observe::register(&stations);
    let payments = payments::PaymentService::new(
        PaymentsClient::new(brewmesh_runtime::discovery::balanced(
            config.payment_source(),
        )?),
        config.payment_timeout,
    );
    let limit = brewmesh_runtime::pod::memory_limit();
    let max_orders = config.max_orders.bound(limit);
    if let Some(orders) = max_orders {
        tracing::info!(
            orders,
            memory_limit_mib = limit.map(|l| l >> 20),
            "orders in flight bounded"
        );
    }
    let shop = Arc::new(shop::Shop::new(
        store,
        stations,
        Box::new(payments),
        config.order_lease,
        max_orders,
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
    if let Some(url) = config.database.database_url.clone()
        && !config.database.is_sqlite()
    {
        tokio::spawn(Arc::clone(shop.journal()).hear_others(url, shutdown.clone()));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_orders_auto_takes_half_the_pods_memory_and_nothing_without_a_limit() {
        assert_eq!(MaxOrders::Auto.bound(Some(3 << 30)), Some(49_152));
        assert_eq!(MaxOrders::Auto.bound(Some(10 << 20)), Some(160));
        assert_eq!(MaxOrders::Auto.bound(Some(1)), Some(1), "never 0");
        assert_eq!(MaxOrders::Auto.bound(None), None);
        assert_eq!(MaxOrders::At(7).bound(Some(1)), Some(7));
        assert_eq!(MaxOrders::None.bound(Some(1)), None);
        assert_eq!(parse_max_orders("auto"), Ok(MaxOrders::Auto));
        assert_eq!(parse_max_orders("none"), Ok(MaxOrders::None));
        assert_eq!(parse_max_orders("12"), Ok(MaxOrders::At(12)));
        assert!(parse_max_orders("0").is_err());
        assert!(parse_max_orders("lots").is_err());
    }
}
