//! What one exported span costs, in CPU, through brewmesh's own telemetry
//! stack: the runtime's gRPC server and client layers and a child span in
//! between (three spans per call, the shape of a payment's Authorize), run
//! in a child process with tracing off, then sampled at 100% and exported
//! over OTLP to a receiver in this process. The child's CPU time (user +
//! system, every thread: the batch processor's export included) per call
//! is compared, rounds alternating; the difference over three is the cost
//! of one span.
//!
//! `cargo bench -p brewmesh-cli --bench spans`  (ROUNDS=5 CALLS=100000)

#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use brewmesh_runtime::instrument::{ClientLayer, ServerLayer};
use tonic::body::Body;
use tower::{Layer as _, Service as _, ServiceExt as _};

const SPANS_PER_CALL: f64 = 3.0;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ok_response() -> http::Response<Body> {
    let mut response = http::Response::new(Body::empty());
    response
        .headers_mut()
        .insert("grpc-status", http::HeaderValue::from_static("0"));
    response
}

fn grpc_request(path: &str) -> http::Request<Body> {
    http::Request::builder()
        .uri(format!("http://payment{path}"))
        .header("content-type", "application/grpc")
        .body(Body::empty())
        .unwrap()
}

/// The measured child: `calls` calls through server layer → child span →
/// client layer, then the exporter flushed; prints CPU µs per call.
async fn child(calls: usize) {
    let telemetry = brewmesh_runtime::telemetry::init(
        brewmesh_runtime::telemetry::LogFormat::Json,
        brewmesh_runtime::telemetry::Identity::of("spans-bench"),
    )
    .unwrap();
    let upstream = ClientLayer.layer(tower::service_fn(|_: http::Request<Body>| async {
        Ok::<_, std::convert::Infallible>(ok_response())
    }));
    let mut server = ServerLayer.layer(tower::service_fn(move |_: http::Request<Body>| {
        let mut upstream = upstream.clone();
        async move {
            let span = tracing::info_span!(
                target: "brewmesh_payment",
                "ledger",
                otel.name = "ledger Authorize",
                order_id = "ord_0123456789"
            );
            let _ = brewmesh_runtime::telemetry::Traced::Span(span)
                .attach(async {
                    upstream
                        .ready()
                        .await
                        .unwrap()
                        .call(grpc_request("/brewmesh.payment.v1.Payment/Lookup"))
                        .await
                })
                .await;
            Ok::<_, std::convert::Infallible>(ok_response())
        }
    }));
    let mut serve = async |n: usize| {
        for _ in 0..n {
            let call = server
                .ready()
                .await
                .unwrap()
                .call(grpc_request("/brewmesh.payment.v1.Payment/Authorize"));
            drop(call.await.unwrap());
        }
    };
    // Warm-up: the channel to the receiver, the metric handles.
    serve(1000).await;
    let wall = Instant::now();
    let before = support::cpu_of(std::process::id());
    serve(calls).await;
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap();
    let cpu = support::cpu_of(std::process::id()) - before;
    #[allow(clippy::cast_precision_loss)]
    let per_call = cpu.as_secs_f64() * 1e6 / calls as f64;
    println!(
        "{per_call:.3} {:.3}",
        wall.elapsed().as_secs_f64() * 1e6 / calls as f64
    );
}

fn run_child(calls: usize, endpoint: Option<&str>) -> (f64, f64) {
    let mut command = std::process::Command::new(std::env::current_exe().unwrap());
    command
        .env("SPANS_CHILD", "1")
        .env("CALLS", calls.to_string())
        .env("RUST_LOG", "warn")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_TRACES_SAMPLER");
    if let Some(endpoint) = endpoint {
        command
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("OTEL_TRACES_SAMPLER", "always_on")
            // Room for every span: none dropped, all exported and counted.
            .env("OTEL_BSP_MAX_QUEUE_SIZE", (calls * 4).to_string());
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().last().unwrap_or_default();
    let mut numbers = line.split_whitespace().map(|n| n.parse::<f64>().unwrap());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let calls = env("CALLS", 100_000);
    if std::env::var_os("SPANS_CHILD").is_some() {
        child(calls).await;
        return;
    }
    let rounds = env("ROUNDS", 5);
    let (collector, endpoint) = brewmesh_testing::Collector::start().await;
    println!(
        "spans bench: {rounds} rounds, {calls} calls of {SPANS_PER_CALL} spans each, tracing off / 100% to a local receiver"
    );
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (off_cpu, off_wall) = tokio::task::spawn_blocking(move || run_child(calls, None))
            .await
            .unwrap();
        let endpoint = endpoint.clone();
        let (on_cpu, on_wall) =
            tokio::task::spawn_blocking(move || run_child(calls, Some(&endpoint)))
                .await
                .unwrap();
        println!(
            "round {round}: off {off_cpu:.2} µs/call ({off_wall:.2} wall), 100% {on_cpu:.2} µs/call ({on_wall:.2} wall), per span {:.2} µs",
            (on_cpu - off_cpu) / SPANS_PER_CALL
        );
        off.push(off_cpu);
        on.push(on_cpu);
    }
    let spans = collector.spans().len();
    let (off, on) = (median(off), median(on));
    println!(
        "\nmedian CPU per call: off {off:.2} µs, 100% {on:.2} µs; one exported span {:.2} µs; {spans} spans received",
        (on - off) / SPANS_PER_CALL
    );
}
