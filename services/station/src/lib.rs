//! brewmesh's brewing stations: espresso machines and steam wands, each a
//! fixed number of machines with a bounded queue in front.
//!
//! The barista uses [`machines`] in its own process by default; `brewmesh
//! station --kind espresso|milk` serves one kind as a service of its own
//! (`brewmesh.station.v1.Espresso` or `.Milk`), registered and found like
//! the others, so that a shop adds espresso capacity without adding
//! anything else — the seed talk's last slide.
//!
//! # Layout
//!
//! - [`run`] serves one station on a listener until shutdown; start here.
//! - [`machines`]: a station's machines and queue (two semaphores).
//! - [`service`]: the gRPC face, one part of a drink per call.
//! - [`observe`]: the stations' gauges.

pub mod machines;
pub mod observe;
pub mod service;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use brewmesh::pb::station::v1::{espresso_server, milk_server};
use brewmesh_runtime::discovery::RegistryArgs;
use brewmesh_runtime::mtls::{Access, role};
use brewmesh_runtime::server::{Drained, ServeArgs, ServeError, parse_duration};

pub use machines::Station;
pub use service::StationService;

/// The espresso station's gRPC service name.
pub const ESPRESSO: &str = espresso_server::SERVICE_NAME;
/// The milk station's gRPC service name.
pub const MILK: &str = milk_server::SERVICE_NAME;

/// Which station a replica is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Espresso machines: every drink needs one.
    Espresso,
    /// Steam wands: drinks with milk need one.
    Milk,
}

impl Kind {
    /// The station's name in messages and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Espresso => "espresso",
            Kind::Milk => "milk",
        }
    }

    /// The gRPC service this kind serves.
    pub fn service(self) -> &'static str {
        match self {
            Kind::Espresso => ESPRESSO,
            Kind::Milk => MILK,
        }
    }
}

/// A station replica's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub serve: ServeArgs,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub registry: RegistryArgs,

    /// Which station this replica is.
    #[arg(long, env = "BREWMESH_STATION_KIND")]
    pub kind: Kind,

    /// Machines of this replica: parts brewed at the same time.
    #[arg(long, env = "BREWMESH_STATION_MACHINES", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub machines: u16,

    /// Parts that may wait for a machine; past it, RESOURCE_EXHAUSTED.
    #[arg(long, env = "BREWMESH_QUEUE_DEPTH", default_value_t = 16)]
    pub queue_depth: u16,

    /// How long one part takes (pulling the shots, steaming the milk).
    #[arg(long, env = "BREWMESH_BREW_TIME", default_value = "2s", value_parser = parse_duration)]
    pub brew_time: Duration,

    /// Fraction of parts that fail (0 to 1), for fault injection.
    #[arg(long, env = "BREWMESH_BREW_FAILURE_RATE", default_value_t = 0.0)]
    pub brew_failure_rate: f64,
}

/// Who may call a station: the barista's sagas, and operators.
pub fn access() -> Access {
    Access::new()
        .allow(ESPRESSO, &[role::BARISTA, role::OPERATOR])
        .allow(MILK, &[role::BARISTA, role::OPERATOR])
}

/// Serves the station `config.kind` on `listener` until `shutdown`, then
/// drains: parts under way get the drain timeout to finish.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<Drained, ServeError> {
    let kind = config.kind;
    let station = Arc::new(Station::new(
        kind.name(),
        config.machines.into(),
        config.queue_depth.into(),
        config.brew_time,
        config.brew_failure_rate.clamp(0.0, 1.0),
    ));
    observe::register(vec![station.load()]);
    let instance = match &config.registry.advertise_addr {
        Some(address) => address.clone(),
        None => listener.local_addr()?.to_string(),
    };
    let service = StationService::new(station, instance);
    let routes = match kind {
        Kind::Espresso => Routes::new(espresso_server::EspressoServer::new(service)),
        Kind::Milk => Routes::new(milk_server::MilkServer::new(service)),
    };
    brewmesh_runtime::server::serve_registered(
        listener,
        routes,
        &[kind.service()],
        access(),
        &config.serve,
        &config.registry,
        shutdown,
    )
    .await
}
