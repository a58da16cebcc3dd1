//! Balancing with one slow replica: P2C over peak-EWMA with latency
//! ejection, against the same with every replica healthy and against round
//! robin; then a replica that turns slow mid-run and recovers.
//!
//! A registry, a payment service and three barista replicas run as real
//! processes on 127.0.0.1. The third barista is slowed by +50 ms on every
//! call by a fault switched at `/admin/faults` (`brewmesh.barista.v1.Barista/*
//! =delay:50ms`), so one run holds every round: healthy P2C, slow P2C and
//! slow round robin, alternating twice, each with a new client (its
//! latency and ejection state fresh) and 300 warm-up orders. A client
//! resolving the baristas through the registry places orders in a closed
//! loop and reports PlaceOrder latency percentiles and the p99 ratios. Each
//! barista has its own database, so the figures measure balancing, not
//! SQLite's write lock.
//!
//! The last scenario runs one client for 14 s: the third replica turns slow
//! at 3 s and recovers at 8 s; its standing in the client (the client's own
//! `rpc_client_endpoint_out` gauge, sampled every 5 ms) is printed, with
//! the time until it was ejected and until it was back for good.
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
use brewmesh_runtime::discovery::{Balanced, Balancing, Policies, Source, balanced_with};
use support::{Process, curl};

const TOKEN: &str = "bench-token";
const SLOW: &str = r#"["brewmesh.barista.v1.Barista/*=delay:50ms"]"#;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Switches the +50 ms on (`Some`) or off at `barista`.
fn slow(barista: &Process, on: bool) {
    let url = format!("{}/admin/faults", barista.url());
    let auth = format!("Authorization: Bearer {TOKEN}");
    let method = if on { "PUT" } else { "DELETE" };
    curl(&[
        "-X",
        method,
        &url,
        "-H",
        &auth,
        "-d",
        if on { SLOW } else { "" },
    ]);
}

/// Whether this process's balancer has `endpoint` out of rotation.
fn is_out(endpoint: &str) -> bool {
    let text = brewmesh_runtime::metrics::render();
    support::sample(&text, "rpc_client_endpoint_out", &[("endpoint", endpoint)]) > 0.0
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
        let args = vec![
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
    let client = |policy| {
        let source = Source::Registry {
            registries: vec![registries.clone()],
            service: "brewmesh.barista.v1.Barista".into(),
        };
        BaristaClient::new(balanced_with(source, policy, Policies::brewmesh()).unwrap())
    };

    println!(
        "# PlaceOrder through 3 barista replicas; {orders} orders x {concurrency} concurrent per round\n"
    );
    println!(
        "| round | replicas | balancing | orders/s | p50 ms | p90 ms | p99 ms | to slow replica |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    // Healthy P2C, slow P2C, slow round robin.
    let mut p99 = [Vec::new(), Vec::new(), Vec::new()];
    let shapes = [
        ("all healthy", Balancing::P2c, false),
        ("one +50 ms", Balancing::P2c, true),
        ("one +50 ms", Balancing::RoundRobin, true),
    ];
    for round in 0..6 {
        let slot = round % 3;
        let (replicas, policy, slowed) = shapes[slot];
        slow(&baristas[2], slowed);
        let client = client(policy);
        // Warm up: connections, latency estimates, ejection.
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
            "| {} | {replicas} | {policy:?} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2}% |",
            round + 1,
            orders as f64 / elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.90),
            pct(0.99),
            100.0 * to_slow as f64 / orders as f64
        );
    }
    let mean = |v: &Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "\np99 with one replica +50 ms / p99 all healthy (P2C, mean of 2 rounds each): {:.3}",
        mean(&p99[1]) / mean(&p99[0])
    );
    println!(
        "p99 P2C / round robin, one replica +50 ms: {:.3}",
        mean(&p99[1]) / mean(&p99[2])
    );

    // A replica turns slow mid-run, then recovers.
    slow(&baristas[2], false);
    let client = client(Balancing::P2c);
    run(&client, 300, concurrency, "warm-mid").await;
    let endpoint = baristas[2].addr.to_string();
    let load = {
        let client = client.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut n = 0;
            while t0.elapsed() < Duration::from_secs(14) {
                run(&client, concurrency * 10, concurrency, &format!("mid-{n}")).await;
                n += 1;
            }
        })
    };
    // The replica's standing in this client, sampled every 5 ms.
    let begun = Instant::now();
    let timeline = {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let mut changes = vec![(Duration::ZERO, is_out(&endpoint))];
            while begun.elapsed() < Duration::from_secs(14) {
                let out = is_out(&endpoint);
                if out != changes.last().unwrap().1 {
                    changes.push((begun.elapsed(), out));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            changes
        })
    };
    let at = |t: u64| tokio::time::sleep_until((begun + Duration::from_secs(t)).into());
    at(3).await;
    slow(&baristas[2], true);
    let turned = begun.elapsed();
    at(8).await;
    slow(&baristas[2], false);
    let recovered = begun.elapsed();
    let accepted = baristas[2].lines_with("\"order accepted\"").len();
    load.await.unwrap();
    let changes = timeline.await.unwrap();
    let served_after = baristas[2].lines_with("\"order accepted\"").len() - accepted;
    let show = |(t, out): &(Duration, bool)| {
        format!(
            "{:.2} s {}",
            t.as_secs_f64(),
            if *out { "out" } else { "in" }
        )
    };
    println!(
        "\nOne replica +50 ms from {:.2} s to {:.2} s of a 14 s run; its standing in the client: {}",
        turned.as_secs_f64(),
        recovered.as_secs_f64(),
        changes.iter().map(show).collect::<Vec<_>>().join(", ")
    );
    let ejected = changes.iter().find(|(t, out)| *out && *t >= turned);
    let back = changes
        .iter()
        .rfind(|(t, out)| !*out && *t >= recovered)
        .or_else(|| (!changes.last().unwrap().1).then(|| changes.last().unwrap()));
    println!(
        "time to eject: {}; time back in rotation after it recovered: {}; orders it accepted after recovering: {served_after}",
        ejected.map_or("(never)".into(), |(t, _)| format!(
            "{:.0} ms",
            (*t - turned).as_secs_f64() * 1e3
        )),
        back.map_or("(still out)".into(), |(t, _)| format!(
            "{:.2} s",
            t.saturating_sub(recovered).as_secs_f64()
        )),
    );
}

/// Places `count` orders, `concurrency` at a time; returns each latency.
async fn run(
    client: &BaristaClient<Balanced>,
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
