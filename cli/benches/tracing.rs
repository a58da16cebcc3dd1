//! What tracing costs: orders/s and PlaceOrder p99 through the gateway with
//! tracing off, on at 100% sampling to a local OTLP receiver, at 1%, and
//! with tracing off and the per-request metrics switched off too
//! (`--metrics off`).
//!
//! Payment, barista and the gateway run as real processes on 127.0.0.1
//! (release build), restarted for every round with the round's `OTEL_*`
//! variables; the stations are wide and quick (64 machines, 1 ms steps) so
//! that the request path, not brewing, is what is measured. A closed loop of
//! CONCURRENCY clients posts orders over HTTP/1.1 for SECONDS per round;
//! rounds alternate off, 100%, 1%, metrics-off (ROUNDS times) and compared
//! two ways: the ratio of the medians, and the median of each round's ratio
//! to the "off" run just before it (less moved by the machine's drift),
//! with the CPU time (user + system, from /proc) the three processes spent
//! per order. The receiver is `brewmesh_testing::Collector`,
//! in this process. Logs are at `warn` so that the figures are tracing's.
//!
//! `cargo bench -p brewmesh-cli --bench tracing`

#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{Process, cpu_of};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Off,
    All,
    OnePercent,
    MetricsOff,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::All => "100%",
            Mode::OnePercent => "1%",
            Mode::MetricsOff => "metrics-off",
        }
    }

    fn env(self, endpoint: &str) -> Vec<(&'static str, String)> {
        // Warnings only: the ready files tell the harness the addresses.
        let mut env = vec![("RUST_LOG", "warn".to_owned())];
        match self {
            Mode::Off => {}
            Mode::All => {
                env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()));
                env.push(("OTEL_TRACES_SAMPLER", "parentbased_always_on".to_owned()));
            }
            Mode::OnePercent => {
                env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()));
                env.push(("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".to_owned()));
                env.push(("OTEL_TRACES_SAMPLER_ARG", "0.01".to_owned()));
            }
            Mode::MetricsOff => env.push(("BREWMESH_METRICS", "off".to_owned())),
        }
        env
    }
}

struct Round {
    orders: usize,
    errors: usize,
    seconds: f64,
    p50: Duration,
    p99: Duration,
    spans: usize,
    /// CPU time of the three processes (user + system) while measured.
    cpu: Duration,
}

/// CPU time per order served, in microseconds.
fn cpu_per_order(round: &Round) -> f64 {
    round.cpu.as_secs_f64() * 1e6 / round.orders.max(1) as f64
}

#[tokio::main]
async fn main() {
    let rounds = env("ROUNDS", 5);
    let concurrency = env("CONCURRENCY", 16);
    let seconds = env("SECONDS", 8) as u64;
    let (collector, endpoint) = brewmesh_testing::Collector::start().await;
    // MODES=off,100%,1%,metrics-off (the default) picks and orders the modes.
    let wanted = std::env::var("MODES").unwrap_or_else(|_| "off,100%,1%,metrics-off".to_owned());
    let modes: Vec<Mode> = wanted
        .split(',')
        .filter_map(|m| {
            [Mode::Off, Mode::All, Mode::OnePercent, Mode::MetricsOff]
                .into_iter()
                .find(|mode| mode.name() == m.trim())
        })
        .collect();
    let mut results: Vec<(Mode, Round)> = Vec::new();
    println!(
        "tracing bench: {rounds} rounds x {} modes, {concurrency} clients, {seconds} s each",
        modes.len()
    );
    for round in 0..rounds {
        for &mode in &modes {
            let result = run(
                mode,
                round,
                &endpoint,
                &collector,
                concurrency,
                Duration::from_secs(seconds),
            )
            .await;
            println!(
                "round {} {:>5}: {:>7.1} orders/s  p50 {:>6.2} ms  p99 {:>6.2} ms  CPU {:>6.0} µs/order  errors {}  spans {}",
                round + 1,
                mode.name(),
                result.orders as f64 / result.seconds,
                result.p50.as_secs_f64() * 1e3,
                result.p99.as_secs_f64() * 1e3,
                cpu_per_order(&result),
                result.errors,
                result.spans,
            );
            results.push((mode, result));
        }
    }
    let median = |mode: &str, f: &dyn Fn(&Round) -> f64| {
        let mut v: Vec<f64> = results
            .iter()
            .filter(|(m, _)| m.name() == mode)
            .map(|(_, r)| f(r))
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let rate = |r: &Round| r.orders as f64 / r.seconds;
    let p99 = |r: &Round| r.p99.as_secs_f64() * 1e3;
    // Each round's figure over the "off" run of the same round.
    let per_round = |mode: &str, f: &dyn Fn(&Round) -> f64| {
        let mut ratios: Vec<f64> = results
            .chunks(modes.len())
            .filter_map(|round| {
                let off = round.iter().find(|(m, _)| m.name() == "off")?;
                let this = round.iter().find(|(m, _)| m.name() == mode)?;
                Some(f(&this.1) / f(&off.1))
            })
            .collect();
        ratios.sort_by(f64::total_cmp);
        ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN)
    };
    println!(
        "\n| mode | orders/s | p99 ms | CPU µs/order | orders/s vs off | p99 vs off | CPU/order vs off | per-round orders/s vs off | per-round p99 vs off |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    if !modes.iter().any(|m| m.name() == "off") {
        return;
    }
    let (off_rate, off_p99, off_cpu) = (
        median("off", &rate),
        median("off", &p99),
        median("off", &cpu_per_order),
    );
    for &mode in &modes {
        let (r, p, c) = (
            median(mode.name(), &rate),
            median(mode.name(), &p99),
            median(mode.name(), &cpu_per_order),
        );
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            mode.name(),
            r,
            p,
            c,
            r / off_rate,
            p / off_p99,
            c / off_cpu,
            per_round(mode.name(), &rate),
            per_round(mode.name(), &p99),
        );
    }
}

async fn run(
    mode: Mode,
    round: usize,
    endpoint: &str,
    collector: &brewmesh_testing::Collector,
    concurrency: usize,
    duration: Duration,
) -> Round {
    let dir = tempfile::tempdir().unwrap();
    let env_owned = mode.env(endpoint);
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let payment_data = dir.path().join("payment");
    let payment = Process::start_with_env(
        &[
            "payment",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            payment_data.to_str().unwrap(),
            "--processing-delay",
            "0s",
        ],
        &env,
    );
    let barista_data = dir.path().join("barista");
    let payment_addr = payment.addr.to_string();
    let barista = Process::start_with_env(
        &[
            "barista",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            barista_data.to_str().unwrap(),
            "--payment-addr",
            &payment_addr,
            "--espresso-machines",
            "64",
            "--steam-wands",
            "64",
            "--queue-depth",
            "4096",
            "--espresso-time",
            "1ms",
            "--milk-time",
            "1ms",
        ],
        &env,
    );
    let backends = format!(
        "brewmesh.barista.v1.Barista={};brewmesh.payment.v1.Payments={}",
        barista.addr, payment.addr
    );
    let gateway = Process::start_with_env(
        &["gateway", "--listen", "127.0.0.1:0", "--backend", &backends],
        &env,
    );
    let url = format!("http://{}/v1/orders", gateway.addr);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let spans_before = collector.count();

    // Warm-up: connections, caches, the first SQLite pages.
    drive(
        &client,
        &url,
        round,
        "warm",
        concurrency,
        Duration::from_secs(1),
    )
    .await;
    let pids = [payment.pid(), barista.pid(), gateway.pid()];
    let cpu = || pids.iter().map(|p| cpu_of(*p)).sum::<Duration>();
    let cpu_before = cpu();
    let started = Instant::now();
    let (mut latencies, errors) =
        drive(&client, &url, round, mode.name(), concurrency, duration).await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu().saturating_sub(cpu_before);
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let result = Round {
        orders: latencies.len(),
        errors,
        seconds,
        p50: at(0.50),
        p99: at(0.99),
        spans: 0,
        cpu,
    };
    // SIGTERM, callers first: each process flushes its batch of spans as
    // it exits.
    for mut process in [gateway, barista, payment] {
        process.signal(nix::sys::signal::Signal::SIGTERM);
        process.wait();
    }
    Round {
        spans: collector.count() - spans_before,
        ..result
    }
}

/// `concurrency` clients posting orders back to back for `duration`; the
/// latencies of the 201s and the number of other answers.
async fn drive(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    round: usize,
    tag: &str,
    concurrency: usize,
    duration: Duration,
) -> (Vec<Duration>, usize) {
    let deadline = Instant::now() + duration;
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let client = client.clone();
        let url = url.to_owned();
        let tag = tag.to_owned();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let mut n = 0;
            while Instant::now() < deadline {
                n += 1;
                let body = format!(
                    r#"{{"idempotencyKey":"{tag}-{round}-{worker}-{n}","itemId":"latte","customerName":"Ada","cardToken":"tok_visa"}}"#
                );
                let request = http::Request::post(&url)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let started = Instant::now();
                match client.request(request).await {
                    Ok(response) => {
                        let status = response.status();
                        let _ = response.into_body().collect().await;
                        if status == http::StatusCode::CREATED {
                            latencies.push(started.elapsed());
                        } else {
                            errors += 1;
                        }
                    }
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (latencies, e) = worker.await.unwrap();
        all.extend(latencies);
        errors += e;
    }
    (all, errors)
}
