//! The chaos suite: `brewmesh up` with two replicas of payment and barista,
//! REST customers through the gateway all along (`brewmesh load`, open
//! loop), and in each scenario one fault in the middle — a replica killed,
//! hung past its lease, or drained. Afterwards the data must add up:
//! `brewmesh audit` is clean, every order is final, and the customers saw
//! only the errors the scenario allows. Each scenario prints its figures.
//!
//! Bounded: a few seconds of load per scenario, all on 127.0.0.1.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use brewmesh::pb::barista::v1::ListOrdersRequest;
use brewmesh::pb::barista::v1::barista_client::BaristaClient;
use support::Process;

/// How long the customers keep coming, and when the fault strikes.
const LOAD: Duration = Duration::from_secs(8);
const FAULT_AT: Duration = Duration::from_secs(2);

/// What a scenario does to the mesh.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL (`up` restarts it).
    Kill(&'static str),
    /// SIGSTOP for this long, then SIGCONT.
    Hang(&'static str, Duration),
    /// SIGTERM: a drain (`up` restarts it).
    Drain(&'static str),
}

/// `up` on port 0: two payments, two baristas, quick steps and a 1 s order
/// lease; on the suite's PostgreSQL when it runs against one.
async fn mesh(dir: &Path) -> Process {
    let mut extra: Vec<String> = [
        "--payment-replicas=2",
        "--barista-replicas=2",
        "--payment-arg=--processing-delay=10ms",
        "--barista-arg=--espresso-time=200ms",
        "--barista-arg=--milk-time=200ms",
        "--barista-arg=--order-lease=1s",
        "--barista-arg=--payment-timeout=2s",
        "--barista-arg=--espresso-machines=64",
        "--barista-arg=--steam-wands=64",
        "--barista-arg=--queue-depth=256",
        "--drain-timeout=5s",
    ]
    .map(String::from)
    .to_vec();
    for service in ["payment", "barista"] {
        let database = brewmesh_testing::database(dir, service).await;
        if let Some(url) = database.database_url {
            extra.push(format!("--{service}-arg=--database-url={url}"));
        }
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let args = Process::up_args(dir, &extra);
    Process::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn pid_of(dir: &Path, label: &str) -> i32 {
    let ready = std::fs::read(dir.join("ready").join(format!("{label}.json"))).unwrap();
    let ready: serde_json::Value = serde_json::from_slice(&ready).unwrap();
    i32::try_from(ready["pid"].as_i64().unwrap()).unwrap()
}

fn strike(dir: &Path, fault: Fault) {
    let signal = |label, signal| kill(Pid::from_raw(pid_of(dir, label)), signal).unwrap();
    match fault {
        Fault::Kill(label) => signal(label, Signal::SIGKILL),
        Fault::Drain(label) => signal(label, Signal::SIGTERM),
        Fault::Hang(label, by) => {
            let pid = Pid::from_raw(pid_of(dir, label));
            kill(pid, Signal::SIGSTOP).unwrap();
            std::thread::sleep(by);
            kill(pid, Signal::SIGCONT).unwrap();
        }
    }
}

/// From the fault on, one probe customer after another (each given 2 s)
/// through the gateway until one is served: how long after `struck`.
fn first_served(gateway: &str, struck: Instant) -> Duration {
    for n in 0.. {
        let body = format!(
            r#"{{"idempotencyKey":"probe-{n}","itemId":"espresso","customerName":"Probe","cardToken":"tok_visa"}}"#
        );
        let placed = Command::new("curl")
            .args(["-s", "--max-time", "2", "-XPOST", "--json", &body])
            .arg(format!("{gateway}/v1/orders"))
            .output()
            .unwrap();
        let placed: serde_json::Value = serde_json::from_slice(&placed.stdout).unwrap_or_default();
        if let Some(id) = placed["orderId"].as_str() {
            let watched = Command::new("curl")
                .args(["-sN", "--max-time", "2"])
                .arg(format!("{gateway}/v1/orders/{id}:watch"))
                .output()
                .unwrap();
            if String::from_utf8_lossy(&watched.stdout).contains("ORDER_EVENT_TYPE_READY") {
                return struck.elapsed();
            }
        }
        assert!(
            struck.elapsed() < Duration::from_secs(30),
            "no probe served after the fault"
        );
    }
    unreachable!("the loop returns or fails")
}

/// `brewmesh audit`, again until it is clean or 20 s have passed (a hung
/// replica's last writes land when it wakes): its last report.
fn audit(up: &Process, dir: &Path) -> (bool, serde_json::Value) {
    let report = dir.join("audit.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = Command::new(env!("CARGO_BIN_EXE_brewmesh"))
            .args(["audit", "--grace", "2s", "--barista"])
            .arg(up.instance("barista-1").to_string())
            .arg("--payment")
            .arg(up.instance("payment-1").to_string())
            .arg("--json")
            .arg(&report)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        let found = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        if status.success() || Instant::now() > deadline {
            return (status.success(), found);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Every order, counted by state.
async fn orders_by_state(up: &Process) -> BTreeMap<String, u64> {
    let url = format!("http://{}", up.instance("barista-2"));
    let mut client = BaristaClient::new(brewmesh_runtime::client::channel(&url).unwrap());
    let (mut counts, mut token) = (BTreeMap::new(), String::new());
    loop {
        let page = client
            .list_orders(ListOrdersRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for order in &page.orders {
            *counts
                .entry(
                    order
                        .state()
                        .as_str_name()
                        .trim_start_matches("ORDER_STATE_")
                        .to_owned(),
                )
                .or_insert(0) += 1;
        }
        if page.next_page_token.is_empty() {
            return counts;
        }
        token = page.next_page_token;
    }
}

/// One scenario: load, the fault at [`FAULT_AT`], then the checks.
/// `allowed`: the gRPC codes customers may see during it.
async fn scenario(name: &str, fault: Fault, allowed: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let up = mesh(dir.path()).await;
    let gateway = format!("http://{}", up.instance("gateway"));
    let report = dir.path().join("load.json");
    let load = Command::new(env!("CARGO_BIN_EXE_brewmesh"))
        .args(["load", "--no-progress", "--rate", "25", "--timeout", "30s"])
        .args(["--declined-every", "10", "--gateway", &gateway])
        .arg("--duration")
        .arg(format!("{}s", LOAD.as_secs()))
        .arg("--json")
        .arg(&report)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(FAULT_AT).await;
    let struck = Instant::now();
    let dir_path = dir.path().to_owned();
    let striking = tokio::task::spawn_blocking(move || strike(&dir_path, fault));
    let probe_gateway = gateway.clone();
    let first_success = tokio::task::spawn_blocking(move || first_served(&probe_gateway, struck));
    striking.await.unwrap();
    let fault_took = struck.elapsed();
    let first_success = first_success.await.unwrap();
    let output = tokio::task::spawn_blocking(move || load.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "load: {output:?}");
    let load: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();

    let (clean, audit) = audit(&up, dir.path());
    let states = orders_by_state(&up).await;
    // The seconds the fault lasted, and the two after it.
    let first = FAULT_AT.as_secs() as usize;
    let last = first + fault_took.as_secs() as usize + 2;
    let during: Vec<&serde_json::Value> = load["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| (first..=last).contains(&(s["second"].as_u64().unwrap() as usize)))
        .collect();
    let p99_during = during
        .iter()
        .map(|s| s["p99_ms"].as_f64().unwrap())
        .fold(0.0, f64::max);
    let served_during: u64 = during.iter().map(|s| s["served"].as_u64().unwrap()).sum();
    let errors: BTreeMap<String, u64> =
        serde_json::from_value(load["errors_by_code"].clone()).unwrap();
    println!(
        "chaos | {name} | attempted {} | served {} | failed {} | errors {errors:?} | final {states:?} | \
         served in seconds {first}-{last}: {served_during} | first served after the fault {:.2} s | \
         p99 then {p99_during:.0} ms | p99 overall {:.0} ms | audit {}",
        load["customers"],
        load["served"],
        load["failed"],
        first_success.as_secs_f64(),
        load["latency_ms"]["p99"].as_f64().unwrap(),
        if clean { "clean" } else { "FINDINGS" },
    );

    assert!(clean, "{name}: audit findings {audit}");
    for state in states.keys() {
        assert!(
            matches!(state.as_str(), "READY" | "FAILED" | "CANCELLED"),
            "{name}: an order not final: {states:?}"
        );
    }
    for code in errors.keys() {
        assert!(
            allowed.contains(&code.as_str()),
            "{name}: customers saw {code}: {errors:?} (allowed: {allowed:?}); examples {}",
            load["error_examples"]
        );
    }
    // Every customer served or told why: declines are the only failures.
    let failed: BTreeMap<String, u64> =
        serde_json::from_value(load["failed_by_reason"].clone()).unwrap();
    for reason in failed.keys() {
        assert_eq!(reason, "payment declined", "{name}: failures {failed:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_a_barista_killed() {
    scenario("barista-1 SIGKILL", Fault::Kill("barista-1"), &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_a_payment_killed() {
    scenario("payment-1 SIGKILL", Fault::Kill("payment-1"), &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_a_barista_hung_past_its_lease() {
    let hang = Duration::from_secs(3);
    scenario("barista-1 SIGSTOP 3 s", Fault::Hang("barista-1", hang), &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_a_payment_hung_past_the_deadline() {
    let hang = Duration::from_secs(3);
    scenario("payment-1 SIGSTOP 3 s", Fault::Hang("payment-1", hang), &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_a_payment_drained() {
    scenario("payment-1 SIGTERM", Fault::Drain("payment-1"), &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_a_barista_drained() {
    scenario("barista-1 SIGTERM", Fault::Drain("barista-1"), &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_the_registry_killed() {
    scenario("registry-1 SIGKILL", Fault::Kill("registry-1"), &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_the_registry_hung() {
    let hang = Duration::from_secs(3);
    scenario(
        "registry-1 SIGSTOP 3 s",
        Fault::Hang("registry-1", hang),
        &[],
    )
    .await;
}

/// The one gateway gone: customers' calls fail UNAVAILABLE until `up`
/// has it back (PlaceOrder is retried under its key, watches resumed).
#[tokio::test(flavor = "multi_thread")]
async fn chaos_the_gateway_killed() {
    scenario("gateway SIGKILL", Fault::Kill("gateway"), &["UNAVAILABLE"]).await;
}
