//! The stations as roles of their own (`brewmesh station`, `up --split`):
//! drinks made by station replicas the barista found through the registry,
//! and a station replica killed mid-brew.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use nix::sys::signal::Signal;

use brewmesh::pb::barista::v1::barista_client::BaristaClient;
use brewmesh::pb::barista::v1::{OrderEvent, OrderEventType as E, PlaceOrderRequest};
use support::{Process, charged_once, ends, events_until, grpcurl_tls, json, kinds_of, made};

/// The details of `events` of type `kind`.
fn details(events: &[OrderEvent], kind: E) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.r#type() == kind)
        .map(|e| e.detail.clone())
        .collect()
}

/// `up --split`, the seed talk's last slide, with mutual TLS as `up` runs
/// by default: payment ×2, milk ×2 and espresso ×4 as processes of their
/// own, each with the station's identity, and a latte made at one espresso
/// and one milk replica that the barista found through the registry.
#[tokio::test(flavor = "multi_thread")]
async fn up_split_makes_a_drink_at_station_replicas_found_through_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let args = Process::up_args_secure(
        dir.path(),
        &[
            "--split",
            "--payment-arg=--processing-delay=50ms",
            "--station-arg=--brew-time=100ms",
        ],
    );
    let up = Process::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let operator = dir.path().join("tls").join("operator");
    let grpcurl = |args: &[&str]| grpcurl_tls(&operator, args);
    let espresso: Vec<String> = (1..=4)
        .map(|n| up.instance(&format!("espresso-{n}")).to_string())
        .collect();
    let milk: Vec<String> = (1..=2)
        .map(|n| up.instance(&format!("milk-{n}")).to_string())
        .collect();
    up.instance("payment-2");

    // Each station serves its service, health and reflection.
    for (addr, service) in [
        (&espresso[0], "brewmesh.station.v1.Espresso"),
        (&milk[0], "brewmesh.station.v1.Milk"),
    ] {
        let listed = grpcurl(&[addr, "list"]);
        assert!(listed.lines().any(|l| l == service), "{listed}");
        let health = json(&grpcurl(&[
            "-d",
            &format!(r#"{{"service":"{service}"}}"#),
            addr,
            "grpc.health.v1.Health/Check",
        ]));
        assert_eq!(health["status"], "SERVING");
    }

    let barista = up.instance("barista-1").to_string();
    let (_, events, watched) = support::latte_watched(&grpcurl, &barista, "split-1");
    let at = |kind: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["type"] == kind)
            .map(|e| e["detail"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let pulled = at("ORDER_EVENT_TYPE_ESPRESSO_STARTED");
    assert_eq!(pulled.len(), 1, "{watched}");
    assert!(
        espresso
            .iter()
            .any(|a| pulled[0] == format!("2 shot(s) at {a}")),
        "pulled at an espresso replica: {pulled:?} {espresso:?}"
    );
    let steamed = at("ORDER_EVENT_TYPE_MILK_STARTED");
    assert_eq!(steamed.len(), 1, "{watched}");
    assert!(
        milk.iter().any(|a| steamed[0] == format!("at {a}")),
        "steamed at a milk replica: {steamed:?} {milk:?}"
    );
    assert_eq!(
        events.last().map(|e| e["type"].clone()),
        Some("ORDER_EVENT_TYPE_PAYMENT_CAPTURED".into()),
        "{watched}"
    );

    // A station answers only the barista and operators: the gateway's
    // identity is refused.
    let gateway_tls = dir.path().join("tls").join("gateway");
    let refused = std::process::Command::new("grpcurl")
        .args([
            "-cacert",
            &gateway_tls.join("ca.crt").display().to_string(),
            "-cert",
            &gateway_tls.join("tls.crt").display().to_string(),
            "-key",
            &gateway_tls.join("tls.key").display().to_string(),
            "-d",
            r#"{"order_id":"ord_x","espresso_shots":1}"#,
            &espresso[0],
            "brewmesh.station.v1.Espresso/Pull",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("PermissionDenied"), "{said}");
}

/// An espresso replica killed with SIGKILL while it pulls a drink's shots:
/// the barista sends the part again, to a replica that is alive, and the
/// order ends READY with one capture.
#[tokio::test(flavor = "multi_thread")]
async fn an_espresso_station_killed_mid_brew_leaves_the_order_ready_with_one_capture() {
    let dir = tempfile::tempdir().unwrap();
    let args = Process::up_args(
        dir.path(),
        &[
            "--espresso-replicas=2",
            "--milk-replicas=1",
            "--payment-arg=--processing-delay=0s",
            "--station-arg=--brew-time=1500ms",
        ],
    );
    let up = Process::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut barista = BaristaClient::new(
        brewmesh_runtime::client::channel(&format!("http://{}", up.instance("barista-1"))).unwrap(),
    );
    let order = barista
        .place_order(PlaceOrderRequest {
            idempotency_key: "station-crash-1".into(),
            item_id: "latte".into(),
            customer_name: "Ada".into(),
            card_token: "tok_visa".into(),
        })
        .await
        .unwrap()
        .into_inner();

    // Wait for the shots to start, and kill the replica pulling them.
    let until_pulled =
        events_until(&mut barista, &order.order_id, |e| e == E::EspressoStarted).await;
    let started = until_pulled.last().expect("the shots start").detail.clone();
    let label = (1..=2)
        .map(|n| format!("espresso-{n}"))
        .find(|label| started.ends_with(&format!(" at {}", up.instance(label))))
        .unwrap_or_else(|| panic!("pulled at a known replica: {started}"));
    let ready: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("ready").join(format!("{label}.json"))).unwrap(),
    )
    .unwrap();
    let pid = ready["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();

    let events = events_until(&mut barista, &order.order_id, ends).await;
    let kinds = kinds_of(&events);
    assert!(made(&kinds), "{kinds:?}");
    // Pulled twice: on the replica that died, then again.
    let pulled = details(&events, E::EspressoStarted);
    assert_eq!(pulled.len(), 2, "{pulled:?}");
    assert_eq!(details(&events, E::EspressoDone).len(), 1, "{kinds:?}");
    charged_once(
        &format!("http://{}", up.instance("payment-1")),
        std::slice::from_ref(&order.order_id),
    )
    .await;
}
