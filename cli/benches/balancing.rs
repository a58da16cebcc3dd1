//! P2C over peak-EWMA against round robin, with one slow replica.
//!
//! A registry, a payment service and three barista replicas run as real
//! processes on 127.0.0.1; the third barista delays every call by 50 ms
//! (`--inject-latency`). A client resolving the baristas through the
//! registry places orders with each balancing policy, in alternating rounds
//! of the same run, and reports PlaceOrder latency percentiles and the p99
//! ratio. Each barista has its own database, so the figures measure
//! balancing, not SQLite's write lock.
//!
//! `cargo bench -p brewmesh-cli --bench balancing` (ORDERS and CONCURRENCY
//! in the environment change the load).

#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use brewmesh::pb::barista::v1::PlaceOrderRequest;
use brewmesh::pb::barista::v1::barista_client::BaristaClient;
use brewmesh::pb::registry::v1::ResolveRequest;
use brewmesh::pb::registry::v1::registry_client::RegistryClient;
use brewmesh_runtime::discovery::{Balancing, Source, balanced_with};
use support::Process;

const TOKEN: &str = "bench-token";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let orders = env("ORDERS", 3000);
    let concurrency = env("CONCURRENCY", 8);
    let dir = tempfile::tempdir().unwrap();
    let registry = Process::start(&[
        "registry",
        "--listen",
        "127.0.0.1:0",
        "--registry-token",
        TOKEN,
    ]);
    let registries = registry.addr.to_string();
    let payment_data = dir.path().join("payment");
    let _payment = Process::start(&[
        "payment",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        payment_data.to_str().unwrap(),
        "--registry",
        &registries,
        "--registry-token",
        TOKEN,
        "--processing-delay",
        "0s",
    ]);
    let mut baristas = Vec::new();
    for n in 0..3 {
        let data = dir.path().join(format!("barista-{n}"));
        let mut args = vec![
            "barista",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--registry",
            &registries,
            "--registry-token",
            TOKEN,
            "--espresso-time",
            "0s",
            "--milk-time",
            "0s",
            "--espresso-machines",
            "256",
            "--steam-wands",
            "256",
            "--queue-depth",
            "4096",
        ];
        if n == 2 {
            args.extend(["--inject-latency", "50ms"]);
        }
        baristas.push(Process::start(&args));
    }
    let mut resolver =
        RegistryClient::new(brewmesh_runtime::client::channel(&registry.url()).unwrap());
    let started = Instant::now();
    while resolver
        .resolve(ResolveRequest {
            service: "brewmesh.barista.v1.Barista".into(),
        })
        .await
        .map(|r| r.into_inner().instances.len())
        .unwrap_or(0)
        < 3
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the baristas did not all register"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    println!(
        "# PlaceOrder through 3 barista replicas, one +50 ms; {orders} orders x {concurrency} concurrent per round\n"
    );
    println!("| round | balancing | orders/s | p50 ms | p90 ms | p99 ms | to slow replica |");
    println!("|---|---|---|---|---|---|---|");
    let mut p99 = [Vec::new(), Vec::new()];
    for round in 1..=4 {
        let (policy, slot) = if round % 2 == 1 {
            (Balancing::P2c, 0)
        } else {
            (Balancing::RoundRobin, 1)
        };
        let source = Source::Registry {
            registries: vec![registries.clone()],
            service: "brewmesh.barista.v1.Barista".into(),
        };
        let client = BaristaClient::new(balanced_with(source, policy).unwrap());
        // Warm up: connections, and for P2C the latency estimates.
        run(&client, 300, concurrency, &format!("warm-{round}")).await;
        let slow_warm = baristas[2].lines_with("\"order accepted\"").len();
        let t0 = Instant::now();
        let mut latencies = run(&client, orders, concurrency, &format!("r{round}")).await;
        let elapsed = t0.elapsed();
        let to_slow = baristas[2].lines_with("\"order accepted\"").len() - slow_warm;
        latencies.sort();
        let pct = |q: f64| {
            latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)]
                .as_secs_f64()
                * 1e3
        };
        p99[slot].push(pct(0.99));
        println!(
            "| {round} | {policy:?} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1}% |",
            orders as f64 / elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.90),
            pct(0.99),
            100.0 * to_slow as f64 / orders as f64
        );
    }
    let mean = |v: &Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "\np99, P2C over peak-EWMA / round robin (mean of 2 rounds each): {:.3}",
        mean(&p99[0]) / mean(&p99[1])
    );
}

/// Places `count` orders, `concurrency` at a time; returns each latency.
async fn run(
    client: &BaristaClient<brewmesh_runtime::discovery::Balanced>,
    count: usize,
    concurrency: usize,
    tag: &str,
) -> Vec<Duration> {
    let per_worker = count / concurrency;
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let mut client = client.clone();
            let tag = tag.to_owned();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_worker);
                for i in 0..per_worker {
                    let request = PlaceOrderRequest {
                        idempotency_key: format!("{tag}-{w}-{i}"),
                        item_id: "espresso".into(),
                        customer_name: "Bench".into(),
                        card_token: "tok_visa".into(),
                    };
                    let t0 = Instant::now();
                    client.place_order(request).await.unwrap();
                    latencies.push(t0.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::with_capacity(count);
    for worker in workers {
        all.extend(worker.await.unwrap());
    }
    all
}
