//! Discovery and balancing with real processes on 127.0.0.1: replicas come,
//! die, leave rotation and return; registries die and return.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use brewmesh::pb::barista::v1::barista_client::BaristaClient;
use brewmesh::pb::barista::v1::{
    GetOrderRequest, OrderEventType as E, OrderState, PlaceOrderRequest, WatchOrderRequest,
};
use brewmesh::pb::registry::v1::ResolveRequest;
use brewmesh::pb::registry::v1::registry_client::RegistryClient;
use support::{PATIENCE, Process, charged_once};

const TOKEN: &str = "discovery-test-token";
const PAYMENTS: &str = "brewmesh.payment.v1.Payments";

fn registry(listen: &str) -> Process {
    Process::start(&[
        "registry",
        "--listen",
        listen,
        "--registry-token",
        TOKEN,
        "--health-retry",
        "200ms",
    ])
}

async fn payment(dir: &Path, registries: &str) -> Process {
    Process::start_role(
        "payment",
        dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--registry",
            registries,
            "--registry-token",
            TOKEN,
            "--processing-delay",
            "50ms",
            "--lease-ttl",
            "3s",
        ],
    )
    .await
}

/// A barista whose espresso and milk each take `step`.
async fn barista(dir: &Path, registries: &str, step: &str) -> Process {
    Process::start_role(
        "barista",
        dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--registry",
            registries,
            "--registry-token",
            TOKEN,
            "--espresso-time",
            step,
            "--milk-time",
            step,
            "--espresso-machines",
            "8",
            "--steam-wands",
            "8",
            "--order-lease",
            "1s",
        ],
    )
    .await
}

fn client<T>(url: String, new: fn(Channel) -> T) -> T {
    new(brewmesh_runtime::client::channel(&url).unwrap())
}

/// Waits (bounded) until the registry resolves `service` to exactly `want`.
async fn resolves_to(registry: &Process, service: &str, want: &[&Process]) -> Duration {
    let started = Instant::now();
    let mut client = client(registry.url(), RegistryClient::new);
    let mut want: Vec<String> = want.iter().map(|p| p.addr.to_string()).collect();
    want.sort();
    loop {
        let resolved = client
            .resolve(ResolveRequest {
                service: service.into(),
            })
            .await;
        let mut got: Vec<String> = resolved
            .map(|r| {
                r.into_inner()
                    .instances
                    .into_iter()
                    .map(|i| i.address)
                    .collect()
            })
            .unwrap_or_default();
        got.sort();
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < PATIENCE,
            "registry resolves {service} to {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) until `caller` logged an endpoint set for payment that
/// is exactly `want`.
async fn caller_uses(caller: &Process, want: &[&Process]) {
    let started = Instant::now();
    let mut want: Vec<String> = want.iter().map(|p| p.addr.to_string()).collect();
    want.sort();
    loop {
        let last = caller
            .lines_with("\"endpoints changed\"")
            .into_iter()
            .rev()
            .find(|l| l.contains(PAYMENTS));
        if let Some(line) = last {
            let value: serde_json::Value = serde_json::from_str(&line).unwrap();
            let addresses = value["addresses"].as_str().unwrap_or("");
            let mut got: Vec<String> = addresses
                .trim_matches(|c| c == '{' || c == '}')
                .split(", ")
                .filter(|s| !s.is_empty())
                .map(|s| s.trim_matches('"').to_owned())
                .collect();
            got.sort();
            if got == want {
                return;
            }
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the caller never used exactly {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many payment writes (calls alone, or batches) this payment
/// process made.
fn writes(payment: &Process) -> usize {
    payment.lines_with("\"payment updated\"").len()
        + payment.lines_with("\"batch of payments updated\"").len()
}

/// Places an order and follows it to its end; returns its id and final state.
async fn order(barista: &mut BaristaClient<Channel>, key: &str) -> (String, OrderState) {
    let placed = barista
        .place_order(PlaceOrderRequest {
            idempotency_key: key.into(),
            item_id: "latte".into(),
            customer_name: "Ada".into(),
            card_token: "tok_visa".into(),
        })
        .await
        .unwrap()
        .into_inner();
    finish(barista, &placed.order_id).await
}

async fn finish(barista: &mut BaristaClient<Channel>, order_id: &str) -> (String, OrderState) {
    let mut events = barista
        .watch_order(WatchOrderRequest {
            order_id: order_id.into(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let ended = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = events.next().await {
            if matches!(
                event.unwrap().r#type(),
                E::PaymentCaptured | E::PaymentCaptureRefused | E::Failed | E::Cancelled
            ) {
                return;
            }
        }
    });
    ended.await.expect("the order ends in time");
    let order = barista
        .get_order(GetOrderRequest {
            order_id: order_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    (order.order_id.clone(), order.state())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_payment_replica_gets_traffic_without_restarting_its_callers() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry("127.0.0.1:0");
    let first = payment(dir.path(), &registry.addr.to_string()).await;
    let barista = barista(dir.path(), &registry.addr.to_string(), "100ms").await;
    let mut client_b = client(barista.url(), BaristaClient::new);
    resolves_to(&registry, PAYMENTS, &[&first]).await;
    assert_eq!(order(&mut client_b, "before").await.1, OrderState::Ready);

    let second = payment(dir.path(), &registry.addr.to_string()).await;
    resolves_to(&registry, PAYMENTS, &[&first, &second]).await;
    caller_uses(&barista, &[&first, &second]).await;
    let orders: Vec<_> = (0..10)
        .map(|i| {
            let mut client_b = client_b.clone();
            tokio::spawn(async move { order(&mut client_b, &format!("after-{i}")).await })
        })
        .collect();
    for placed in orders {
        assert_eq!(placed.await.unwrap().1, OrderState::Ready);
    }
    assert!(writes(&second) > 0, "the new replica got no traffic");
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_one_of_two_payment_replicas_under_load_fails_no_order_and_charges_none_twice() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry("127.0.0.1:0");
    let registries = registry.addr.to_string();
    let survivor = payment(dir.path(), &registries).await;
    let mut victim = payment(dir.path(), &registries).await;
    let barista = barista(dir.path(), &registries, "100ms").await;
    resolves_to(&registry, PAYMENTS, &[&survivor, &victim]).await;
    caller_uses(&barista, &[&survivor, &victim]).await;

    let client_b = client(barista.url(), BaristaClient::new);
    let stream = tokio::spawn(async move {
        let mut orders = Vec::new();
        for i in 0..30 {
            let mut client_b = client_b.clone();
            orders.push(tokio::spawn(async move {
                order(&mut client_b, &format!("steady-{i}")).await
            }));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        orders
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(writes(&victim) > 0, "the victim was serving before it died");
    victim.kill9();

    let mut order_ids = Vec::new();
    for placed in stream.await.unwrap() {
        let (order_id, state) = placed.await.unwrap();
        assert_eq!(state, OrderState::Ready, "{order_id}");
        order_ids.push(order_id);
    }
    charged_once(&survivor.url(), &order_ids).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_in_maintenance_stops_getting_traffic_and_gets_it_back_after() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry("127.0.0.1:0");
    let registries = registry.addr.to_string();
    let stays = payment(dir.path(), &registries).await;
    let leaves = payment(dir.path(), &registries).await;
    let barista = barista(dir.path(), &registries, "100ms").await;
    resolves_to(&registry, PAYMENTS, &[&stays, &leaves]).await;
    caller_uses(&barista, &[&stays, &leaves]).await;

    leaves.signal(Signal::SIGUSR1); // NOT_SERVING, still serving
    let took = resolves_to(&registry, PAYMENTS, &[&stays]).await;
    println!("left the registry's rotation {took:?} after turning NOT_SERVING");
    caller_uses(&barista, &[&stays]).await;
    let before = writes(&leaves);
    let mut client_b = client(barista.url(), BaristaClient::new);
    for i in 0..8 {
        assert_eq!(
            order(&mut client_b, &format!("while-out-{i}")).await.1,
            OrderState::Ready
        );
    }
    assert_eq!(writes(&leaves), before, "a NOT_SERVING replica got traffic");

    leaves.signal(Signal::SIGUSR2); // SERVING again
    resolves_to(&registry, PAYMENTS, &[&stays, &leaves]).await;
    caller_uses(&barista, &[&stays, &leaves]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_every_registry_stopped_orders_flow_and_registration_resumes_when_one_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut registry_process = registry("127.0.0.1:0");
    let address = registry_process.addr.to_string();
    let payment = payment(dir.path(), &address).await;
    let barista = barista(dir.path(), &address, "100ms").await;
    resolves_to(&registry_process, PAYMENTS, &[&payment]).await;
    caller_uses(&barista, &[&payment]).await;

    registry_process.kill9();
    let mut client_b = client(barista.url(), BaristaClient::new);
    let mut order_ids = Vec::new();
    for i in 0..3 {
        let (order_id, state) = order(&mut client_b, &format!("no-registry-{i}")).await;
        assert_eq!(state, OrderState::Ready);
        order_ids.push(order_id);
    }
    charged_once(&payment.url(), &order_ids).await;

    // A new, empty registry on the same address is refilled by the instances.
    let returned = registry(&address);
    resolves_to(&returned, PAYMENTS, &[&payment]).await;
    resolves_to(&returned, "brewmesh.barista.v1.Barista", &[&barista]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_one_of_two_registries_killed_discovery_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut doomed = registry("127.0.0.1:0");
    let other = registry("127.0.0.1:0");
    let registries = format!("{},{}", doomed.addr, other.addr);
    let first = payment(dir.path(), &registries).await;
    let barista = barista(dir.path(), &registries, "100ms").await;
    resolves_to(&other, PAYMENTS, &[&first]).await;
    caller_uses(&barista, &[&first]).await;

    doomed.kill9();
    let second = payment(dir.path(), &registries).await;
    resolves_to(&other, PAYMENTS, &[&first, &second]).await;
    caller_uses(&barista, &[&first, &second]).await;
    let mut client_b = client(barista.url(), BaristaClient::new);
    for i in 0..10 {
        assert_eq!(
            order(&mut client_b, &format!("one-registry-{i}")).await.1,
            OrderState::Ready
        );
    }
    assert!(
        writes(&second) > 0,
        "the replica found through the surviving registry got no traffic"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn either_barista_replica_serves_any_order_and_one_takes_over_from_a_killed_one() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry("127.0.0.1:0");
    let registries = registry.addr.to_string();
    let payment = payment(dir.path(), &registries).await;
    let mut doomed = barista(dir.path(), &registries, "1500ms").await;
    let survivor = barista(dir.path(), &registries, "1500ms").await;
    let mut via_doomed = client(doomed.url(), BaristaClient::new);
    let mut via_survivor = client(survivor.url(), BaristaClient::new);

    let placed = via_doomed
        .place_order(PlaceOrderRequest {
            idempotency_key: "takeover".into(),
            item_id: "latte".into(),
            customer_name: "Ada".into(),
            card_token: "tok_visa".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // The other replica reads and watches it.
    let seen = via_survivor
        .get_order(GetOrderRequest {
            order_id: placed.order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.order_id, placed.order_id);
    let mut events = via_survivor
        .watch_order(WatchOrderRequest {
            order_id: placed.order_id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let brewing = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = events.next().await {
            if event.unwrap().r#type() == E::EspressoStarted {
                return;
            }
        }
    });
    brewing.await.expect("brewing starts");

    doomed.kill9();
    let (order_id, state) = finish(&mut via_survivor, &placed.order_id).await;
    assert_eq!(state, OrderState::Ready);
    assert!(
        !survivor
            .lines_with("taking over an unfinished order")
            .is_empty(),
        "the survivor took it over"
    );
    charged_once(&payment.url(), &[order_id]).await;
    drop(via_doomed);
}

/// A network namespace of the test's own, joined to the host by a veth
/// pair: `host` on this side, `inside` on the other. Removed when dropped.
struct Netns {
    name: String,
    veth: String,
    host: String,
    inside: String,
}

fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

impl Netns {
    /// `None` where namespaces cannot be made (not root); a failure to make
    /// one as root fails the test.
    fn create() -> Option<Netns> {
        let uid = std::process::Command::new("id").arg("-u").output().ok()?;
        if uid.stdout.trim_ascii() != b"0" {
            return None;
        }
        let id = std::process::id() % 200 + 20;
        let ns = Netns {
            name: format!("bmtest{id}"),
            veth: format!("bmv{id}"),
            host: format!("10.213.{id}.1"),
            inside: format!("10.213.{id}.2"),
        };
        // A namespace left by a killed run of this test, if any.
        ip(&["link", "del", &ns.veth]);
        ip(&["netns", "del", &ns.name]);
        let peer = format!("{}p", ns.veth);
        let (host_cidr, inside_cidr) = (format!("{}/30", ns.host), format!("{}/30", ns.inside));
        let made = ip(&["netns", "add", &ns.name])
            && ip(&[
                "link", "add", &ns.veth, "type", "veth", "peer", "name", &peer,
            ])
            && ip(&["link", "set", &peer, "netns", &ns.name])
            && ip(&["addr", "add", &host_cidr, "dev", &ns.veth])
            && ip(&["link", "set", &ns.veth, "up"])
            && ns.exec(&["ip", "addr", "add", &inside_cidr, "dev", &peer])
            && ns.exec(&["ip", "link", "set", &peer, "up"])
            && ns.exec(&["ip", "link", "set", "lo", "up"]);
        assert!(made, "making the network namespace {}", ns.name);
        Some(ns)
    }

    fn exec(&self, command: &[&str]) -> bool {
        let mut args = vec!["netns", "exec", self.name.as_str()];
        args.extend(command);
        ip(&args)
    }

    /// Drops every packet in and out of the namespace but its own loopback:
    /// a silent partition, as a failed switch makes one.
    fn cut(&self) {
        for chain in ["INPUT", "OUTPUT"] {
            let side = if chain == "INPUT" { "-i" } else { "-o" };
            assert!(self.exec(&["iptables", "-A", chain, "!", side, "lo", "-j", "DROP"]));
        }
    }

    fn heal(&self) {
        for chain in ["INPUT", "OUTPUT"] {
            let side = if chain == "INPUT" { "-i" } else { "-o" };
            assert!(self.exec(&["iptables", "-D", chain, "!", side, "lo", "-j", "DROP"]));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        ip(&["link", "del", &self.veth]);
        ip(&["netns", "del", &self.name]);
    }
}

/// A payment replica in a network namespace is cut off from everything: the
/// registry takes it out of rotation, orders keep being served by the other
/// replica and none gets stuck; when the partition heals it rejoins.
#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_payment_replica_leaves_rotation_and_rejoins() {
    let Some(ns) = Netns::create() else {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // On the veth's host address: reachable from inside the namespace.
    let registry = registry(&format!("{}:0", ns.host));
    let registries = registry.addr.to_string();
    // Both payments share a SQLite file (the namespace cannot reach the
    // suite's PostgreSQL on 127.0.0.1).
    let data = dir.path().join("payment").display().to_string();
    let payment_args = |listen: &str| -> Vec<String> {
        [
            "payment",
            "--listen",
            listen,
            "--registry",
            &registries,
            "--registry-token",
            TOKEN,
            "--processing-delay",
            "50ms",
            "--lease-ttl",
            "3s",
            "--data-dir",
            &data,
        ]
        .map(String::from)
        .to_vec()
    };
    let inside = payment_args(&format!("{}:0", ns.inside));
    let inside: Vec<&str> = inside.iter().map(String::as_str).collect();
    let cut_off = Process::start_wrapped(&["ip", "netns", "exec", &ns.name], &inside, &[]);
    let outside = payment_args("127.0.0.1:0");
    let outside: Vec<&str> = outside.iter().map(String::as_str).collect();
    let kept = Process::start(&outside);
    resolves_to(&registry, PAYMENTS, &[&cut_off, &kept]).await;
    let barista = barista(dir.path(), &registries, "100ms").await;
    caller_uses(&barista, &[&cut_off, &kept]).await;

    ns.cut();
    let out = resolves_to(&registry, PAYMENTS, &[&kept]).await;
    caller_uses(&barista, &[&kept]).await;
    println!("partition: out of the registry's rotation {out:?} after the cut");

    let mut client_b = client(barista.url(), BaristaClient::new);
    let mut ids = Vec::new();
    for n in 0..5 {
        let (id, state) = order(&mut client_b, &format!("partition-{n}")).await;
        assert_eq!(state, OrderState::Ready, "{id}");
        ids.push(id);
    }
    charged_once(&kept.url(), &ids).await;

    ns.heal();
    let back = resolves_to(&registry, PAYMENTS, &[&cut_off, &kept]).await;
    caller_uses(&barista, &[&cut_off, &kept]).await;
    println!("partition: back in rotation {back:?} after the heal");
}
