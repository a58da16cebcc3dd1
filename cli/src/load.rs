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

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::StreamExt as _;
use tonic::Code;

use brewmesh::pb::barista::v1::barista_client::BaristaClient;
use brewmesh::pb::barista::v1::{OrderEventType, PlaceOrderRequest, WatchOrderRequest};
use brewmesh_runtime::server::parse_duration;

/// `brewmesh load` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The gateway to drive over REST (HTTP/2 without TLS).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    gateway: String,

    /// Drive the barista straight over gRPC at this address instead.
    #[arg(long)]
    grpc: Option<String>,

    /// How many customers to serve.
    #[arg(long, default_value_t = 1000)]
    customers: u64,

    /// Serve customers for this long instead of a number of them.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,

    /// Closed loop: this many customers at a time.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,

    /// Open loop: this many new customers a second, whatever the mesh does
    /// (latency counts from when each was due).
    #[arg(long)]
    rate: Option<f64>,

    /// In the open loop, at most this many customers waiting at once.
    #[arg(long, default_value_t = 100_000)]
    max_in_flight: usize,

    /// The drinks ordered, with weights: `latte=3,espresso=1`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "espresso,americano,macchiato,cappuccino,flat_white,latte",
        value_parser = parse_mix
    )]
    mix: Vec<(String, u32)>,

    /// Every Nth customer's card is declined (0: none).
    #[arg(long, default_value_t = 0)]
    declined_every: u64,

    /// When a customer counts as served: the drink is `ready`, or the order
    /// is `accepted`.
    #[arg(long, value_enum, default_value = "ready")]
    until: Until,

    /// How long one customer may take before counting as DEADLINE_EXCEEDED.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    timeout: Duration,

    /// Customers in flight per HTTP/2 connection: more at once open more
    /// connections (one connection with tens of thousands of streams ends
    /// in an h2 GOAWAY).
    #[arg(long, default_value_t = 2000)]
    streams_per_connection: usize,

    /// Write a JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,

    /// Write an SVG chart of latency over time here.
    #[arg(long)]
    chart: Option<PathBuf>,

    /// No progress bar (it is off anyway when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
}

/// When a customer counts as served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Until {
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

/// How one customer ended.
#[derive(Debug)]
enum Outcome {
    /// Served, after this long.
    Served(Duration),
    /// The order ended FAILED or CANCELLED, for this reason.
    Failed(String),
    /// A call failed with this gRPC code, and message.
    Error(Code, String),
}

/// Places orders and follows them, over REST or gRPC, spread over a few
/// connections.
#[derive(Clone)]
enum Driver {
    Rest {
        clients: Arc<Vec<Client<HttpConnector, Full<Bytes>>>>,
        base: Arc<str>,
    },
    Grpc(Arc<Vec<BaristaClient<tonic::transport::Channel>>>),
}

/// The gRPC code and message in a google.rpc.Status JSON body.
fn code_of(body: &[u8]) -> Outcome {
    let status = serde_json::from_slice::<Value>(body).unwrap_or_default();
    let code = status["code"]
        .as_i64()
        .map_or(Code::Unknown, |c| Code::from_i32(c as i32));
    let message = status["message"].as_str().unwrap_or_default();
    Outcome::Error(code, message.to_owned())
}

impl Driver {
    /// Customer `n`: `order`, on connection `n` modulo their number.
    async fn customer(
        &self,
        n: u64,
        order: PlaceOrderRequest,
        until: Until,
    ) -> Result<(), Outcome> {
        match self {
            Driver::Rest { clients, base } => {
                let client = &clients[n as usize % clients.len()];
                rest_customer(client, base, order, until).await
            }
            Driver::Grpc(clients) => {
                let client = clients[n as usize % clients.len()].clone();
                grpc_customer(client, order, until).await
            }
        }
    }
}

async fn rest_customer(
    client: &Client<HttpConnector, Full<Bytes>>,
    base: &str,
    order: PlaceOrderRequest,
    until: Until,
) -> Result<(), Outcome> {
    let body = json!({
        "idempotencyKey": order.idempotency_key,
        "itemId": order.item_id,
        "customerName": order.customer_name,
        "cardToken": order.card_token,
    })
    .to_string();
    let body = Bytes::from(body);
    let body = with_retries(|| async {
        let request = http::Request::post(format!("{base}/v1/orders"))
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))
            .map_err(|_| {
                Outcome::Error(Code::InvalidArgument, "building the request".to_owned())
            })?;
        let response = client
            .request(request)
            .await
            .map_err(|e| Outcome::Error(Code::Unavailable, e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Outcome::Error(Code::Unavailable, e.to_string()))?
            .to_bytes();
        if status.is_success() {
            Ok(body)
        } else {
            Err(code_of(&body))
        }
    })
    .await?;
    if until == Until::Accepted {
        return Ok(());
    }
    let placed: Value =
        serde_json::from_slice(&body).map_err(|e| Outcome::Error(Code::Internal, e.to_string()))?;
    let order_id = placed["orderId"].as_str().unwrap_or_default().to_owned();
    // A watch that ends early (a barista draining) is resumed after the last
    // event seen.
    let mut after = 0i64;
    let mut backoff = Duration::from_millis(100);
    // Until the drink is done or the customer's --timeout passes: a watch
    // that ends early is resumed after a growing wait.
    loop {
        let request = http::Request::get(format!(
            "{base}/v1/orders/{order_id}:watch?afterSequence={after}"
        ))
        .body(Full::new(Bytes::new()))
        .map_err(|_| Outcome::Error(Code::InvalidArgument, "building the request".to_owned()))?;
        let Ok(response) = client.request(request).await else {
            rewatch_wait(&mut backoff).await;
            continue;
        };
        if !response.status().is_success() {
            let body = response
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            match code_of(&body) {
                Outcome::Error(Code::Unavailable, _) => {
                    rewatch_wait(&mut backoff).await;
                    continue;
                }
                other => return Err(other),
            }
        }
        let mut body = response.into_body();
        let mut pending = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let Ok(value) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                if let Some(error) = value.get("error") {
                    let code = error["code"]
                        .as_i64()
                        .map_or(Code::Unknown, |c| Code::from_i32(c as i32));
                    if code != Code::Unavailable {
                        let message = error["message"].as_str().unwrap_or_default();
                        return Err(Outcome::Error(code, message.to_owned()));
                    }
                    continue;
                }
                let event = &value["result"];
                if let Some(sequence) = event["sequence"].as_str().and_then(|s| s.parse().ok()) {
                    after = sequence;
                }
                match event["type"].as_str() {
                    Some("ORDER_EVENT_TYPE_READY") => return Ok(()),
                    Some("ORDER_EVENT_TYPE_FAILED" | "ORDER_EVENT_TYPE_CANCELLED") => {
                        return Err(Outcome::Failed(
                            event["detail"].as_str().unwrap_or_default().to_owned(),
                        ));
                    }
                    _ => {}
                }
            }
        }
        rewatch_wait(&mut backoff).await;
    }
}

async fn grpc_customer(
    mut client: BaristaClient<tonic::transport::Channel>,
    order: PlaceOrderRequest,
    until: Until,
) -> Result<(), Outcome> {
    let error = |status: tonic::Status| Outcome::Error(status.code(), status.message().to_owned());
    let placed = with_retries(|| {
        let (mut client, order) = (client.clone(), order.clone());
        async move { client.place_order(order).await.map_err(error) }
    })
    .await?
    .into_inner();
    if until == Until::Accepted {
        return Ok(());
    }
    let mut after = 0i64;
    let mut backoff = Duration::from_millis(100);
    // Until the drink is done or the customer's --timeout passes: a watch
    // that ends early is resumed after a growing wait.
    loop {
        let watch = WatchOrderRequest {
            order_id: placed.order_id.clone(),
            after_sequence: after,
        };
        let mut events = match client.watch_order(watch).await {
            Ok(events) => events.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                rewatch_wait(&mut backoff).await;
                continue;
            }
            Err(status) => return Err(error(status)),
        };
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(status) if status.code() == tonic::Code::Unavailable => break,
                Err(status) => return Err(error(status)),
            };
            after = event.sequence;
            match event.r#type() {
                OrderEventType::Ready => return Ok(()),
                OrderEventType::Failed | OrderEventType::Cancelled => {
                    return Err(Outcome::Failed(event.detail));
                }
                _ => {}
            }
        }
        rewatch_wait(&mut backoff).await;
    }
}

/// Waits before watching an order again: 100 ms, doubling to 2 s, jittered.
async fn rewatch_wait(backoff: &mut Duration) {
    let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
    tokio::time::sleep(*backoff + jitter).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
}

/// PlaceOrders repeated after UNAVAILABLE, in this run.
static RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Repeats `attempt` while it fails UNAVAILABLE (a database that could not
/// keep up, a replica going away), up to 6 times with growing, jittered
/// waits, as the service's message asks: PlaceOrder carries an idempotency
/// key, so a repeat can never make a second order.
async fn with_retries<T, F, Fut>(mut attempt: F) -> Result<T, Outcome>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Outcome>>,
{
    let mut backoff = Duration::from_millis(100);
    let mut left = 6;
    loop {
        match attempt().await {
            Err(Outcome::Error(Code::Unavailable, _)) if left > 0 => {
                left -= 1;
                RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64));
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// Latencies in microseconds, up to an hour, with `digits` significant
/// digits.
fn histogram(digits: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, digits).expect("valid histogram bounds")
}

/// What one second of the run looked like, for the chart and the report.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Second {
    served: u64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Seconds still taking outcomes: a customer's finishing time is taken
/// before its outcome is queued, so one may arrive a little after a later
/// one. Older seconds are summed up into a [`Second`] and their histogram
/// reused, so a long run keeps a few bytes per second, not a histogram.
const OPEN_SECONDS: usize = 3;

/// Everything counted so far.
struct Tally {
    served: u64,
    failed: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    /// The first message seen for each error code.
    examples: BTreeMap<String, String>,
    latency: Histogram<u64>,
    /// The seconds summed up, from the start.
    timeline: Vec<Second>,
    /// The seconds after those, still open: served count and latencies.
    open: std::collections::VecDeque<(u64, Histogram<u64>)>,
    /// A closed second's histogram, for the next one.
    spare: Option<Histogram<u64>>,
}

impl Tally {
    fn new() -> Self {
        Self {
            served: 0,
            failed: BTreeMap::new(),
            errors: BTreeMap::new(),
            examples: BTreeMap::new(),
            latency: histogram(3),
            timeline: Vec::new(),
            open: std::collections::VecDeque::new(),
            spare: None,
        }
    }

    fn add(&mut self, outcome: Outcome, at: Duration) {
        match outcome {
            Outcome::Served(latency) => {
                self.served += 1;
                let micros = (latency.as_micros() as u64).clamp(1, 3_600_000_000);
                let _ = self.latency.record(micros);
                let second = at.as_secs() as usize;
                while self.timeline.len() + self.open.len() <= second {
                    if self.open.len() == OPEN_SECONDS {
                        self.close_oldest();
                    }
                    // Two digits suffice for a chart.
                    let latencies = self.spare.take().unwrap_or_else(|| histogram(2));
                    self.open.push_back((0, latencies));
                }
                // Later than the open seconds can be late: it counts in the
                // oldest open one.
                let index = second.saturating_sub(self.timeline.len());
                let (served, latencies) = &mut self.open[index];
                *served += 1;
                let _ = latencies.record(micros);
            }
            Outcome::Failed(reason) => {
                // "payment declined: …" → "payment declined".
                let kind = reason.split(':').next().unwrap_or("").trim().to_owned();
                *self.failed.entry(kind).or_default() += 1;
            }
            Outcome::Error(code, message) => {
                let code = brewmesh_runtime::metrics::code_name(code).to_owned();
                self.examples.entry(code.clone()).or_insert(message);
                *self.errors.entry(code).or_default() += 1;
            }
        }
    }

    /// Sums up the oldest open second.
    fn close_oldest(&mut self) {
        if let Some((served, mut latencies)) = self.open.pop_front() {
            self.timeline.push(Second {
                served,
                p50_ms: ms(latencies.value_at_quantile(0.50)),
                p99_ms: ms(latencies.value_at_quantile(0.99)),
            });
            latencies.reset();
            self.spare = Some(latencies);
        }
    }

    /// Sums up every second, at the end of the run.
    fn close(&mut self) {
        while !self.open.is_empty() {
            self.close_oldest();
        }
    }
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
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
    let driver = match &args.grpc {
        Some(address) => {
            let mut clients = Vec::with_capacity(connections);
            for _ in 0..connections {
                // Each channel is a connection of its own.
                clients.push(BaristaClient::new(
                    brewmesh_runtime::client::channel(address).context("the --grpc address")?,
                ));
            }
            Driver::Grpc(Arc::new(clients))
        }
        None => Driver::Rest {
            clients: Arc::new(
                (0..connections)
                    .map(|_| {
                        // Nagle and delayed ACKs would add ~40 ms to each
                        // small request of a lone customer.
                        let mut connector = HttpConnector::new();
                        connector.set_nodelay(true);
                        Client::builder(TokioExecutor::new())
                            .http2_only(true)
                            .build(connector)
                    })
                    .collect(),
            ),
            base: args.gateway.trim_end_matches('/').into(),
        },
    };
    let target = match &args.grpc {
        Some(address) => format!("grpc://{address} (barista)"),
        None => format!("{} (gateway, REST)", args.gateway),
    };
    // Keys unique to this run: a rerun must not replay the last one's orders.
    let run_id = brewmesh_runtime::ids::new("load");

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

    let (results_tx, mut results) = mpsc::unbounded_channel::<(Outcome, Instant)>();
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + d);
    let limit = in_flight;
    let slots = Arc::new(Semaphore::new(limit));
    let mix: Arc<Vec<(String, u32)>> = Arc::new(args.mix.clone());
    let (until, timeout, declined_every, rate) =
        (args.until, args.timeout, args.declined_every, args.rate);

    let spawner = tokio::spawn({
        let slots = Arc::clone(&slots);
        let driver = driver.clone();
        let run_id = run_id.clone();
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
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    break;
                };
                let due = if rate.is_some() { due } else { Instant::now() };
                let item = {
                    let mut pick = (n % u64::from(weights)) as u32;
                    mix.iter()
                        .find(|(_, w)| {
                            if pick < *w {
                                true
                            } else {
                                pick -= w;
                                false
                            }
                        })
                        .map(|(item, _)| item.clone())
                        .unwrap_or_default()
                };
                let card = if declined_every > 0 && (n + 1).is_multiple_of(declined_every) {
                    brewmesh_payment::service::DECLINED_CARD_TOKEN
                } else {
                    "tok_visa"
                };
                let order = PlaceOrderRequest {
                    idempotency_key: format!("{run_id}-{n}"),
                    item_id: item,
                    customer_name: format!("customer {n}"),
                    card_token: card.to_owned(),
                };
                let driver = driver.clone();
                let results = results_tx.clone();
                tokio::spawn(async move {
                    let outcome =
                        match tokio::time::timeout(timeout, driver.customer(n, order, until)).await
                        {
                            Ok(Ok(())) => Outcome::Served(due.elapsed()),
                            Ok(Err(outcome)) => outcome,
                            Err(_) => Outcome::Error(
                                Code::DeadlineExceeded,
                                "the customer's --timeout passed".to_owned(),
                            ),
                        };
                    let _ = results.send((outcome, Instant::now()));
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
    while let Some((outcome, at)) = results.recv().await {
        tally.add(outcome, at.duration_since(started));
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

    print_summary(&tally, took, &target, spawned);
    if let Some(path) = &args.json {
        let report = report(&tally, took, &target, spawned, &args);
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.chart {
        std::fs::write(path, chart(&tally))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_summary(tally: &Tally, took: Duration, target: &str, customers: u64) {
    let word = if tally.served == 1 {
        "customer"
    } else {
        "customers"
    };
    println!(
        "Took {:.2}s to serve coffee to {} {word}",
        took.as_secs_f64(),
        tally.served
    );
    println!("  target      {target}");
    println!(
        "  customers   {customers}: served {}, failed {}, errors {}",
        tally.served,
        tally.failed.values().sum::<u64>(),
        tally.errors.values().sum::<u64>()
    );
    for (reason, n) in &tally.failed {
        println!("    failed    {n} × {reason}");
    }
    for (code, n) in &tally.errors {
        let example = tally.examples.get(code).map_or("", String::as_str);
        println!("    error     {n} × {code} (e.g. {example:?})");
    }
    let retries = RETRIES.load(std::sync::atomic::Ordering::Relaxed);
    if retries > 0 {
        println!("    retried   {retries} × PlaceOrder after UNAVAILABLE (same idempotency key)");
    }
    println!(
        "  throughput  {:.1} served/s",
        tally.served as f64 / took.as_secs_f64()
    );
    if tally.served > 0 {
        let h = &tally.latency;
        println!(
            "  latency     p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
            ms(h.value_at_quantile(0.50)),
            ms(h.value_at_quantile(0.90)),
            ms(h.value_at_quantile(0.99)),
            ms(h.value_at_quantile(0.999)),
            ms(h.max())
        );
    }
}

fn report(tally: &Tally, took: Duration, target: &str, customers: u64, args: &Args) -> Value {
    let h = &tally.latency;
    json!({
        "target": target,
        "loop": if args.rate.is_some() { "open" } else { "closed" },
        "concurrency": if args.rate.is_some() { Value::Null } else { json!(args.concurrency) },
        "rate": args.rate,
        "until": format!("{:?}", args.until).to_lowercase(),
        "customers": customers,
        "served": tally.served,
        "failed": tally.failed.values().sum::<u64>(),
        "failed_by_reason": tally.failed,
        "errors": tally.errors.values().sum::<u64>(),
        "errors_by_code": tally.errors,
        "error_examples": tally.examples,
        "place_order_retries": RETRIES.load(std::sync::atomic::Ordering::Relaxed),
        "seconds": took.as_secs_f64(),
        "served_per_second": tally.served as f64 / took.as_secs_f64(),
        "latency_ms": {
            "p50": ms(h.value_at_quantile(0.50)),
            "p90": ms(h.value_at_quantile(0.90)),
            "p99": ms(h.value_at_quantile(0.99)),
            "p999": ms(h.value_at_quantile(0.999)),
            "max": ms(h.max()),
            "mean": h.mean() / 1000.0,
        },
        "timeline": tally.timeline.iter().enumerate().map(|(second, s)| json!({
            "second": second,
            "served": s.served,
            "p50_ms": s.p50_ms,
            "p99_ms": s.p99_ms,
        })).collect::<Vec<_>>(),
    })
}

/// Latency over time (p50 and p99 of each second's served customers) and
/// the served rate, as an SVG line chart.
fn chart(tally: &Tally) -> String {
    let (width, height, pad) = (900.0, 400.0, 50.0);
    let points: Vec<(usize, f64, f64, u64)> = tally
        .timeline
        .iter()
        .enumerate()
        .filter(|(_, s)| s.served > 0)
        .map(|(t, s)| (t, s.p50_ms, s.p99_ms, s.served))
        .collect();
    let seconds = tally.timeline.len().max(1) as f64;
    let top = points.iter().map(|p| p.2).fold(1.0, f64::max) * 1.1;
    let x = |t: usize| pad + (t as f64 + 0.5) / seconds * (width - 2.0 * pad);
    let y = |v: f64| height - pad - v / top * (height - 2.0 * pad);
    let line = |pick: fn(&(usize, f64, f64, u64)) -> f64| {
        points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.0), y(pick(p))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{pad}" y="20">Latency to served, by second of the run (p50 blue, p99 red); {served} served</text>
<line x1="{pad}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{bottom}" stroke="black"/>
<text x="{pad}" y="{below}">0 s</text><text x="{right}" y="{below}" text-anchor="end">{seconds} s</text>
<text x="5" y="{pad}">{top:.0} ms</text><text x="5" y="{bottom}">0</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{p50}"/>
<polyline fill="none" stroke="#d62728" stroke-width="1.5" points="{p99}"/>
</svg>
"##,
        served = tally.served,
        bottom = height - pad,
        right = width - pad,
        below = height - pad + 15.0,
        p50 = line(|p| p.1),
        p99 = line(|p| p.2),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(tally: &mut Tally, second: u64, latency_ms: u64) {
        tally.add(
            Outcome::Served(Duration::from_millis(latency_ms)),
            Duration::from_millis(second * 1000 + 500),
        );
    }

    /// Seconds are summed up as the run moves on; an outcome that arrives
    /// late counts in an open second, and nothing is lost.
    #[test]
    fn the_timeline_sums_up_each_second_and_takes_late_outcomes() {
        let mut tally = Tally::new();
        served(&mut tally, 0, 10);
        served(&mut tally, 0, 20);
        served(&mut tally, 1, 30);
        served(&mut tally, 5, 40);
        served(&mut tally, 4, 50); // still open
        served(&mut tally, 2, 60); // closed already: counts in second 3
        tally.add(
            Outcome::Failed("payment declined: no".into()),
            Duration::ZERO,
        );
        tally.close();
        let served: Vec<u64> = tally.timeline.iter().map(|s| s.served).collect();
        assert_eq!(served, [2, 1, 0, 1, 1, 1]);
        assert_eq!(tally.served, 6);
        assert_eq!(tally.failed["payment declined"], 1);
        let close = |a: f64, b: f64| (a - b).abs() <= b * 0.01;
        assert!(
            close(tally.timeline[0].p99_ms, 20.0),
            "{:?}",
            tally.timeline[0]
        );
        assert!(
            close(tally.timeline[3].p50_ms, 60.0),
            "{:?}",
            tally.timeline[3]
        );
        assert!(
            close(tally.timeline[5].p50_ms, 40.0),
            "{:?}",
            tally.timeline[5]
        );
        assert_eq!(tally.timeline[2], Second::default());
        assert!(tally.open.is_empty());
    }
}
