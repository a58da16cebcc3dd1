//! What `brewmesh load` is asked to do: its flags.

use std::path::PathBuf;
use std::time::Duration;

use brewmesh_runtime::server::parse_duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The gateway to drive over REST (HTTP/2 without TLS): a URL, or
    /// host:port for `http://host:port`.
    #[arg(long, default_value = brewmesh_runtime::defaults::GATEWAY_ADDR)]
    pub(super) gateway: String,

    /// The bearer token to show the gateway [default: the customer's that
    /// `up` wrote, `$BREWMESH_DATA_DIR/auth/customer.jwt`, if there is
    /// one].
    #[arg(long, env = "BREWMESH_TOKEN", hide_env_values = true)]
    pub(super) token: Option<String>,

    /// Drive the barista straight over gRPC at this address instead.
    #[arg(long)]
    pub(super) grpc: Option<String>,

    /// How many customers to serve.
    #[arg(long, default_value_t = 1000)]
    pub(super) customers: u64,

    /// Serve customers for this long instead of a number of them.
    #[arg(long, value_parser = parse_duration)]
    pub(super) duration: Option<Duration>,

    /// Closed loop: this many customers at a time.
    #[arg(long, default_value_t = 64)]
    pub(super) concurrency: usize,

    /// Open loop: this many new customers a second, whatever the mesh does
    /// (latency counts from when each was due).
    #[arg(long)]
    pub(super) rate: Option<f64>,

    /// In the open loop, at most this many customers waiting at once.
    #[arg(long, default_value_t = 100_000)]
    pub(super) max_in_flight: usize,

    /// Customers arrive in groups of this many (the seed's
    /// `/serve-customer/N`): one BatchPlaceOrders for the group, one
    /// WatchOrders stream for its orders. 1: each alone, with PlaceOrder
    /// and WatchOrder.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub(super) batch: u16,

    /// The drinks ordered, with weights: `latte=3,espresso=1`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "espresso,americano,macchiato,cappuccino,flat_white,latte",
        value_parser = parse_mix
    )]
    pub(super) mix: Vec<(String, u32)>,

    /// Every Nth customer's card is declined (0: none).
    #[arg(long, default_value_t = 0)]
    pub(super) declined_every: u64,

    /// When a customer counts as served: the drink is `ready`, or the order
    /// is `accepted`.
    #[arg(long, value_enum, default_value = "ready")]
    pub(super) until: Until,

    /// A customer the shop turns away as full (RESOURCE_EXHAUSTED with a
    /// time to come back) comes back then, as often as it takes within
    /// --timeout, instead of leaving: the seed's customers, who all get
    /// their coffee however long the queue.
    #[arg(long)]
    pub(super) patient: bool,

    /// How long one customer may take before counting as DEADLINE_EXCEEDED.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub(super) timeout: Duration,

    /// Customers in flight per HTTP/2 connection: more at once open more
    /// connections (one connection with tens of thousands of streams ends
    /// in an h2 GOAWAY).
    #[arg(long, default_value_t = 2000)]
    pub(super) streams_per_connection: usize,

    /// Write a JSON report here.
    #[arg(long)]
    pub(super) json: Option<PathBuf>,

    /// Write an SVG chart of latency over time here.
    #[arg(long)]
    pub(super) chart: Option<PathBuf>,

    /// No progress bar (it is off anyway when stderr is not a terminal).
    #[arg(long)]
    pub(super) no_progress: bool,
}

impl Args {
    /// How each customer is served.
    pub(super) fn manner(&self) -> Manner {
        Manner {
            until: self.until,
            patient: self.patient,
        }
    }
}

/// How a customer is served: until when, and whether a full shop sends
/// them away (`patient: false`) or only out to come back later.
#[derive(Debug, Clone, Copy)]
pub(super) struct Manner {
    pub(super) until: Until,
    pub(super) patient: bool,
}

/// When a customer counts as served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum Until {
    /// The order was accepted.
    Accepted,
    /// The drink is ready.
    Ready,
}

fn parse_mix(value: &str) -> Result<(String, u32), String> {
    match value.split_once('=') {
        Some((item, weight)) => weight
            .parse()
            .map(|w| (item.to_owned(), w))
            .map_err(|_| format!("{value:?}: weight must be a whole number")),
        None => Ok((value.to_owned(), 1)),
    }
}

impl Args {
    /// The gateway's base URL, without a trailing slash.
    /// `Authorization: Bearer …`, from --token or `up`'s customer token.
    pub(super) fn authorization(&self) -> Option<http::HeaderValue> {
        let token = self.token.clone().or_else(|| {
            let dir = std::env::var_os("BREWMESH_DATA_DIR").unwrap_or(".brewmesh".into());
            let file = PathBuf::from(dir).join("auth").join("customer.jwt");
            std::fs::read_to_string(file).ok()
        })?;
        let mut value = http::HeaderValue::from_str(&format!("Bearer {}", token.trim())).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    pub(super) fn gateway_url(&self) -> String {
        let base = self.gateway.trim_end_matches('/');
        if base.contains("://") {
            base.to_owned()
        } else {
            format!("http://{base}")
        }
    }
}
