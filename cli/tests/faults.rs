//! Faults injected at run time into real processes: switched on and off at
//! `/admin/faults` with the registry token, routed around by the barista,
//! and visible in the traces of the calls they hit.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use std::time::{Duration, Instant};

use brewmesh::pb::barista::v1::barista_client::BaristaClient;
use brewmesh::pb::barista::v1::{OrderState, PlaceOrderRequest};
use brewmesh_testing::Collector;
use support::{PATIENCE, Process, curl, sample};

const TOKEN: &str = "faults-test-token";

async fn payment(dir: &std::path::Path) -> Process {
    Process::start_role(
        "payment",
        dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--processing-delay",
            "0s",
            "--registry-token",
            TOKEN,
        ],
    )
    .await
}

/// `curl -X method` on `url` with the bearer `token` (if any) and `body`:
/// the HTTP status and the body.
fn admin(method: &str, url: &str, token: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let mut args = vec!["-X", method, url, "-d", body, "-w", "\n%{http_code}"];
    if let Some(auth) = &auth {
        args.extend(["-H", auth.as_str()]);
    }
    let out = curl(&args);
    let (json, status) = out.rsplit_once('\n').unwrap();
    (status.parse().unwrap(), serde_json::from_str(json).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_failing_every_authorize_is_routed_around() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = payment(dir.path()).await;
    let healthy = payment(dir.path()).await;
    let url = format!("{}/admin/faults", faulty.url());

    // Guarded: no token, no switch.
    let spec = r#"["brewmesh.payment.v1.Payments/Authorize=abort:UNAVAILABLE"]"#;
    let (status, body) = admin("PUT", &url, None, spec);
    assert_eq!(status, 401, "{body}");
    let (status, body) = admin("PUT", &url, Some("wrong"), spec);
    assert_eq!(status, 401, "{body}");
    let (status, body) = admin("PUT", &url, Some(TOKEN), r#"["Authorize=explode"]"#);
    assert_eq!((status, body["code"].as_i64()), (400, Some(3)), "{body}");
    let (status, body) = admin("PUT", &url, Some(TOKEN), spec);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["faults"],
        serde_json::json!(["brewmesh.payment.v1.Payments/Authorize=abort:UNAVAILABLE"])
    );

    let payments = format!("{},{}", faulty.addr, healthy.addr);
    let barista = Process::start_role(
        "barista",
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--payment-addr",
            &payments,
            "--espresso-time",
            "1ms",
            "--milk-time",
            "1ms",
        ],
    )
    .await;
    let mut client = BaristaClient::new(brewmesh_runtime::client::channel(&barista.url()).unwrap());
    let mut ids = Vec::new();
    for n in 0..20 {
        let placed = client
            .place_order(PlaceOrderRequest {
                idempotency_key: format!("faulty-{n}"),
                item_id: "espresso".into(),
                customer_name: "Ada".into(),
                card_token: "tok_visa".into(),
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(placed.order_id);
    }
    for id in &ids {
        support::wait_for_state(&mut client, id, OrderState::Ready).await;
    }
    // The faulty replica was hit, and counted it.
    let metrics = curl(&[&format!("{}/metrics", faulty.url())]);
    let hits = sample(
        &metrics,
        "rpc_server_injected_faults_total",
        &[("method", "Authorize"), ("kind", "abort")],
    );
    assert!(hits >= 1.0, "{metrics}");

    // Switched off again.
    let (status, body) = admin("DELETE", &url, Some(TOKEN), "");
    assert_eq!(
        (status, body["faults"].clone()),
        (200, serde_json::json!([]))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delay_shows_in_the_trace_of_the_call_it_hit() {
    let (collector, endpoint) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let args = Process::up_args(
        dir.path(),
        &["--barista-arg=--fault=brewmesh.barista.v1.Barista/GetMenu=delay:50ms"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let up = Process::start_with_env(
        &args,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            // `up` hands this token to its roles instead of a fresh one.
            ("BREWMESH_REGISTRY_TOKEN", TOKEN),
        ],
    );
    let barista_faults = format!("http://{}/admin/faults", up.instance("barista-1"));
    let (status, body) = admin("GET", &barista_faults, Some(TOKEN), "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["faults"],
        serde_json::json!(["brewmesh.barista.v1.Barista/GetMenu=delay:50ms"])
    );
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4737";
    let traceparent = format!("traceparent: 00-{trace_id}-00f067aa0ba902b8-01");
    let gateway = format!("http://{}", up.instance("gateway"));
    curl(&["-H", &traceparent, &format!("{gateway}/v1/menu")]);

    let name = "brewmesh.barista.v1.Barista/GetMenu";
    let deadline = Instant::now() + PATIENCE;
    let span = loop {
        let found = collector
            .spans()
            .into_iter()
            .find(|s| s.trace_id() == trace_id && s.service == "barista" && s.span.name == name);
        if let Some(span) = found {
            break span;
        }
        assert!(Instant::now() < deadline, "no barista {name} span");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        span.attribute("brewmesh.fault").as_deref(),
        Some("brewmesh.barista.v1.Barista/GetMenu=delay:50ms")
    );
    assert!(
        span.span.events.iter().any(|e| e.name == "fault injected"),
        "{:?}",
        span.span.events
    );
    let took = span.span.end_time_unix_nano - span.span.start_time_unix_nano;
    assert!(took >= 50_000_000, "the span holds the delay: {took} ns");
}
