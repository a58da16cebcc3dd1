//! `brewmesh load`: the seed talk's "serve N customers" against a running
//! mesh, through the gateway (REST) or straight to the barista (gRPC).
//!
//! A customer places an order and, by default, follows it until the drink
//! is ready (WatchOrder): served, failed (declined, brewing failed), or an
//! error with its gRPC code (RESOURCE_EXHAUSTED from a full shop, …).
//! Closed loop (`--concurrency` customers at a time) or open loop
//! (`--rate` customers a second, latency counted from when each customer
//! was due, so a stalled mesh cannot hide its stall: coordinated omission
//! corrected). Latencies go into HDR histograms; at the end, a summary in
//! the seed's words, and on request a JSON report and an SVG chart of
//! latency over time.
//!
//! Memory stays bounded however many customers: at most `--concurrency`
//! (or `--max-in-flight`) of them exist at once, and the histograms are of
//! fixed size.

mod args;
mod follow;
mod grpc;
mod report;
mod rest;
mod tally;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{Semaphore, mpsc};
use tonic::Code;

use brewmesh::pb::barista::v1::PlaceOrderRequest;
use brewmesh::pb::barista::v1::barista_client::BaristaClient;

pub use args::Args;
use args::Manner;
use follow::Ending;
use grpc::Grpc;
use rest::{HttpClient, Rest};
use tally::Tally;

/// Serves customers over REST or gRPC, spread over a few connections.
#[derive(Clone)]
enum Driver {
    Rest {
        clients: Arc<Vec<HttpClient>>,
        base: Arc<str>,
        authorization: Option<http::HeaderValue>,
    },
    Grpc(Arc<Vec<BaristaClient<tonic::transport::Channel>>>),
}

impl Driver {
    /// `connections` connections to the target `args` names.
    fn connect(args: &Args, connections: usize) -> anyhow::Result<Self> {
        if let Some(address) = &args.grpc {
            let mut clients = Vec::with_capacity(connections);
            for _ in 0..connections {
                // Each channel is a connection of its own.
                clients.push(BaristaClient::new(
                    brewmesh_runtime::client::channel(address).context("the --grpc address")?,
                ));
            }
            return Ok(Driver::Grpc(Arc::new(clients)));
        }
        let clients = (0..connections)
            .map(|_| {
                // Nagle and delayed ACKs would add ~40 ms to each small
                // request of a lone customer.
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                Client::builder(TokioExecutor::new())
                    .http2_only(true)
                    .build(connector)
            })
            .collect();
        Ok(Driver::Rest {
            clients: Arc::new(clients),
            base: args.gateway_url().into(),
            authorization: args.authorization(),
        })
    }

    /// Customer `n`: `order`, on connection `n` modulo their number.
    async fn customer(
        &self,
        n: u64,
        order: PlaceOrderRequest,
        manner: Manner,
    ) -> Result<(), Ending> {
        match self {
            Driver::Rest {
                clients,
                base,
                authorization,
            } => {
                let client = &clients[n as usize % clients.len()];
                let rest = Rest {
                    client,
                    base,
                    authorization: authorization.as_ref(),
                };
                follow::visit(&rest, order, manner).await
            }
            Driver::Grpc(clients) => {
                let client = clients[n as usize % clients.len()].clone();
                follow::visit(&Grpc(client), order, manner).await
            }
        }
    }
}

impl Driver {
    /// The group of customers from `n` on: `orders`, in one batch, on
    /// connection `n` modulo their number; `ended` hears each one's end.
    async fn group(
        &self,
        n: u64,
        orders: &[PlaceOrderRequest],
        manner: Manner,
        ended: impl FnMut(usize, Result<(), Ending>),
    ) {
        match self {
            Driver::Rest {
                clients,
                base,
                authorization,
            } => {
                let client = &clients[n as usize % clients.len()];
                let rest = Rest {
                    client,
                    base,
                    authorization: authorization.as_ref(),
                };
                follow::visit_all(&rest, orders, manner, ended).await;
            }
            Driver::Grpc(clients) => {
                let client = clients[n as usize % clients.len()].clone();
                follow::visit_all(&Grpc(client), orders, manner, ended).await;
            }
        }
    }
}

/// Who the customers are and what they order.
struct Customers {
    /// Keys unique to this run: a rerun must not replay the last one's
    /// orders.
    run_id: String,
    mix: Vec<(String, u32)>,
    /// The sum of the mix's weights, above 0.
    weights: u32,
    declined_every: u64,
}

impl Customers {
    /// Customer `n`'s order: the mix's drinks in turn, by weight, and
    /// every `declined_every`th card declined.
    fn order(&self, n: u64) -> PlaceOrderRequest {
        let mut pick = (n % u64::from(self.weights)) as u32;
        let item = self
            .mix
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map(|(item, _)| item.clone())
            .unwrap_or_default();
        let declined = self.declined_every > 0 && (n + 1).is_multiple_of(self.declined_every);
        let card = if declined {
            brewmesh_payment::service::DECLINED_CARD_TOKEN
        } else {
            "tok_visa"
        };
        PlaceOrderRequest {
            idempotency_key: format!("{}-{n}", self.run_id),
            item_id: item,
            customer_name: format!("customer {n}"),
            card_token: card.to_owned(),
        }
    }
}

/// Runs the load; the summary goes to standard output.
pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    anyhow::ensure!(
        args.rate.is_none_or(|r| r > 0.0),
        "--rate must be more than 0"
    );
    let weights: u32 = args.mix.iter().map(|(_, w)| w).sum();
    anyhow::ensure!(weights > 0, "--mix needs a drink with a weight above 0");

    let in_flight = match args.rate {
        Some(_) => args.max_in_flight,
        None => args.concurrency,
    };
    let connections = in_flight
        .div_ceil(args.streams_per_connection.max(1))
        .clamp(1, 256);
    let driver = Driver::connect(&args, connections)?;
    let mut target = match &args.grpc {
        Some(address) => format!("grpc://{address} (barista"),
        None => format!("{} (gateway, REST", args.gateway_url()),
    };
    let batch = u64::from(args.batch);
    if batch > 1 {
        target.push_str(&format!(
            ", batches of {batch}: BatchPlaceOrders, WatchOrders)"
        ));
    } else {
        target.push_str(", one by one: PlaceOrder, WatchOrder)");
    }

    let total = match args.duration {
        Some(_) => None,
        None => Some(args.customers),
    };
    let progress = if args.no_progress {
        indicatif::ProgressBar::hidden()
    } else {
        match total {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::new_spinner(),
        }
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} customers {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );

    let (results_tx, mut results) = mpsc::unbounded_channel::<(Ending, Instant)>();
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + d);
    let limit = in_flight;
    let slots = Arc::new(Semaphore::new(limit));
    let customers = Customers {
        run_id: brewmesh_runtime::ids::new("load"),
        mix: args.mix.clone(),
        weights,
        declined_every: args.declined_every,
    };
    let (manner, timeout, rate) = (args.manner(), args.timeout, args.rate);

    let spawner = tokio::spawn({
        let slots = Arc::clone(&slots);
        let driver = driver.clone();
        async move {
            let mut n: u64 = 0;
            loop {
                if total.is_some_and(|t| n >= t) || deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                // When the customer is due: now (closed loop), or on the
                // rate's schedule (open loop), late or not.
                let due = match rate {
                    Some(rate) => {
                        let due = started + Duration::from_secs_f64(n as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    None => Instant::now(),
                };
                if batch > 1 {
                    // A group of up to `batch` (what is left of the run),
                    // holding a slot for each of its customers.
                    let size = total.map_or(batch, |t| batch.min(t - n));
                    let permits = size.min(limit as u64) as u32;
                    let Ok(slots) = Arc::clone(&slots).acquire_many_owned(permits).await else {
                        break;
                    };
                    let due = if rate.is_some() { due } else { Instant::now() };
                    let orders: Vec<PlaceOrderRequest> =
                        (n..n + size).map(|i| customers.order(i)).collect();
                    let driver = driver.clone();
                    let results = results_tx.clone();
                    tokio::spawn(async move {
                        let open = std::sync::Mutex::new(vec![true; orders.len()]);
                        let ended = |i: usize, end: Result<(), Ending>| {
                            open.lock().unwrap_or_else(|e| e.into_inner())[i] = false;
                            let ending = match end {
                                Ok(()) => Ending::Served(due.elapsed()),
                                Err(ending) => ending,
                            };
                            let _ = results.send((ending, Instant::now()));
                        };
                        let group = driver.group(n, &orders, manner, ended);
                        if tokio::time::timeout(timeout, group).await.is_err() {
                            let open = open.lock().unwrap_or_else(|e| e.into_inner());
                            for _ in open.iter().filter(|o| **o) {
                                let ending = Ending::Error(
                                    Code::DeadlineExceeded,
                                    "the customer's --timeout passed".to_owned(),
                                );
                                let _ = results.send((ending, Instant::now()));
                            }
                        }
                        drop(slots);
                    });
                    n += size;
                    continue;
                }
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    break;
                };
                let due = if rate.is_some() { due } else { Instant::now() };
                let order = customers.order(n);
                let driver = driver.clone();
                let results = results_tx.clone();
                tokio::spawn(async move {
                    let ending = match tokio::time::timeout(
                        timeout,
                        driver.customer(n, order, manner),
                    )
                    .await
                    {
                        Ok(Ok(())) => Ending::Served(due.elapsed()),
                        Ok(Err(ending)) => ending,
                        Err(_) => Ending::Error(
                            Code::DeadlineExceeded,
                            "the customer's --timeout passed".to_owned(),
                        ),
                    };
                    let _ = results.send((ending, Instant::now()));
                    drop(slot);
                });
                n += 1;
            }
            n
        }
    });

    // Ends when the spawner and every customer are done: they hold the
    // senders.
    let mut tally = Tally::new();
    let mut last_message = Instant::now();
    while let Some((ending, at)) = results.recv().await {
        tally.add(ending, at.duration_since(started));
        progress.inc(1);
        if last_message.elapsed() > Duration::from_millis(200) {
            last_message = Instant::now();
            let errors: u64 = tally.errors.values().sum();
            let failed: u64 = tally.failed.values().sum();
            progress.set_message(format!(
                "served {} failed {failed} errors {errors}",
                tally.served
            ));
        }
    }
    let spawned = spawner.await.unwrap_or_default();
    let took = started.elapsed();
    progress.finish_and_clear();
    tally.close();

    report::print_summary(&tally, took, &target, spawned);
    if let Some(path) = &args.json {
        let report = report::report(&tally, took, &target, spawned, &args);
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.chart {
        std::fs::write(path, report::chart(&tally))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
