//! Retries, hedging and deadlines through real processes: brewmesh's
//! service config (`proto/service_config.json`) as the balanced channel
//! every client uses applies it, against replicas with faults injected.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use std::time::Duration;

use brewmesh::pb::barista::v1::barista_client::BaristaClient;
use brewmesh::pb::barista::v1::{
    CancelOrderRequest, GetMenuRequest, GetOrderRequest, PlaceOrderRequest,
};
use brewmesh::pb::payment::v1::payments_client::PaymentsClient;
use brewmesh::pb::payment::v1::{AuthorizeRequest, ListPaymentsRequest, Money};
use brewmesh_runtime::discovery::policy::{self, Policies, methods_of};
use brewmesh_runtime::discovery::{Balanced, Balancing, Source, balanced, balanced_with};
use support::{Process, curl, sample};
use tonic::Code;

async fn payment(dir: &std::path::Path, faults: &[&str]) -> Process {
    let mut args = vec!["--listen", "127.0.0.1:0", "--processing-delay", "0s"];
    for fault in faults {
        args.extend(["--fault", fault]);
    }
    Process::start_role("payment", dir, &args).await
}

async fn barista(dir: &std::path::Path, payment: &Process, faults: &[&str]) -> Process {
    let payment = payment.addr.to_string();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--payment-addr",
        &payment,
        "--espresso-time",
        "1ms",
        "--milk-time",
        "1ms",
    ];
    for fault in faults {
        args.extend(["--fault", fault]);
    }
    Process::start_role("barista", dir, &args).await
}

fn over(processes: &[&Process]) -> Balanced {
    let addresses: Vec<String> = processes.iter().map(|p| p.addr.to_string()).collect();
    balanced(Source::Static(addresses)).unwrap()
}

/// Of `process`'s `/metrics`, the sum of `name` with `labels`.
fn metric(process: &Process, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(
        &curl(&[&format!("{}/metrics", process.url())]),
        name,
        labels,
    )
}

/// The faults `process` injected into `method`: the attempts that reached it.
fn injected(process: &Process, method: &str) -> f64 {
    metric(
        process,
        "rpc_server_injected_faults_total",
        &[("method", method)],
    )
}

fn order(key: &str) -> PlaceOrderRequest {
    PlaceOrderRequest {
        idempotency_key: key.into(),
        item_id: "espresso".into(),
        customer_name: "Ada".into(),
        card_token: "tok_visa".into(),
    }
}

fn authorize(n: usize) -> AuthorizeRequest {
    AuthorizeRequest {
        idempotency_key: format!("retried-{n}"),
        order_id: format!("ord_retried{n}"),
        amount: Some(Money {
            currency_code: "USD".into(),
            amount_minor: 300,
        }),
        card_token: "tok_visa".into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hedged_read_wins_from_a_stalled_replica() {
    let dir = tempfile::tempdir().unwrap();
    let payment = payment(dir.path(), &[]).await;
    // Two replicas on one database; one stalls every GetOrder for a minute.
    let stalled = barista(
        dir.path(),
        &payment,
        &["brewmesh.barista.v1.Barista/GetOrder=delay:60s"],
    )
    .await;
    let healthy = barista(dir.path(), &payment, &[]).await;
    let mut direct = BaristaClient::new(brewmesh_runtime::client::channel(&healthy.url()).unwrap());
    let placed = direct
        .place_order(order("hedged-1"))
        .await
        .unwrap()
        .into_inner();

    let mut client = BaristaClient::new(over(&[&stalled, &healthy]));
    let mut calls = 0;
    // Until some attempts have met the stall (P2C tries the replica it
    // has not measured yet), and a few more.
    while calls < 10 || injected(&stalled, "GetOrder") < 1.0 {
        assert!(calls < 100, "no attempt ever reached the stalled replica");
        let mut request = tonic::Request::new(GetOrderRequest {
            order_id: placed.order_id.clone(),
        });
        // Far less than the stall: only a hedge can answer in time.
        request.set_timeout(Duration::from_secs(10));
        let got = client.get_order(request).await;
        let got = got.unwrap_or_else(|status| panic!("call {calls}: {status:?}"));
        assert_eq!(got.into_inner().order_id, placed.order_id);
        calls += 1;
    }
    let hedges = sample(
        &brewmesh_runtime::metrics::render(),
        "rpc_client_extra_attempts_total",
        &[
            ("method", "brewmesh.barista.v1.Barista/GetOrder"),
            ("kind", "hedge"),
        ],
    );
    assert!(hedges >= 1.0, "the stalled calls were hedged");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_without_a_key_is_never_repeated_and_a_read_is_retried_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let payment = payment(dir.path(), &[]).await;
    let faults = [
        "brewmesh.barista.v1.Barista/CancelOrder=abort:UNAVAILABLE",
        "brewmesh.barista.v1.Barista/GetMenu=abort:UNAVAILABLE",
    ];
    let failing = barista(dir.path(), &payment, &faults).await;
    let cancels_fail_too = barista(dir.path(), &payment, &faults[..1]).await;
    // GetMenu fails on one replica only: every call succeeds. (First: the
    // CancelOrder failures below may eject either replica for a while.)
    let mut reads = BaristaClient::new(over(&[&failing, &cancels_fail_too]));
    for _ in 0..10 {
        reads.get_menu(GetMenuRequest {}).await.unwrap();
    }

    let mut client = BaristaClient::new(over(&[&failing, &cancels_fail_too]));
    for n in 0..10 {
        let status = client
            .cancel_order(CancelOrderRequest {
                order_id: format!("ord_nokey{n}"),
                reason: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let attempts = injected(&failing, "CancelOrder") + injected(&cancels_fail_too, "CancelOrder");
    assert_eq!(
        attempts, 10.0,
        "one attempt per CancelOrder, never a second"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keyed_write_is_retried_after_unavailable_and_charges_once() {
    let dir = tempfile::tempdir().unwrap();
    // Two payment replicas on one ledger; one refuses every Authorize.
    let failing = payment(
        dir.path(),
        &["brewmesh.payment.v1.Payments/Authorize=abort:UNAVAILABLE"],
    )
    .await;
    let healthy = payment(dir.path(), &[]).await;
    let mut client = PaymentsClient::new(over(&[&failing, &healthy]));
    let mut first = Vec::new();
    for n in 0..20 {
        let paid = client.authorize(authorize(n)).await.unwrap().into_inner();
        first.push(paid.payment_id);
    }
    assert!(
        injected(&failing, "Authorize") >= 1.0,
        "some first attempts met the failing replica"
    );
    // Replayed: the same payments back, and one payment per order.
    let mut ledger =
        PaymentsClient::new(brewmesh_runtime::client::channel(&healthy.url()).unwrap());
    for (n, payment_id) in first.iter().enumerate() {
        let again = client.authorize(authorize(n)).await.unwrap().into_inner();
        assert_eq!(&again.payment_id, payment_id);
        let found = ledger
            .list_payments(ListPaymentsRequest {
                order_id: format!("ord_retried{n}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .payments;
        assert_eq!(found.len(), 1, "{found:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_retry_budget_caps_the_extra_load_when_every_replica_fails() {
    let dir = tempfile::tempdir().unwrap();
    let fault = ["brewmesh.payment.v1.Payments/Authorize=abort:UNAVAILABLE"];
    let a = payment(dir.path(), &fault).await;
    let b = payment(dir.path(), &fault).await;
    // Retries may add 20% of the calls, and 1 a second over 10 s.
    let budget = policy::TpsBudget::new(Duration::from_secs(10), 1, 0.2);
    let methods = methods_of(brewmesh::FILE_DESCRIPTOR_SET).unwrap();
    let policies = Policies::new(policy::brewmesh_config(), &methods, budget);
    let source = Source::Static(vec![a.addr.to_string(), b.addr.to_string()]);
    let mut client = PaymentsClient::new(balanced_with(source, Balancing::P2c, policies).unwrap());
    let calls = 200;
    for n in 0..calls {
        let status = client.authorize(authorize(n)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    let attempts = injected(&a, "Authorize") + injected(&b, "Authorize");
    let ratio = attempts / calls as f64;
    // Without the budget each call would make 4 attempts (ratio 4).
    assert!(ratio > 1.0, "some calls were retried: {attempts} attempts");
    assert!(
        ratio <= 1.0 + 0.2 + 10.0 / calls as f64 + 0.02,
        "{attempts} attempts for {calls} calls"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_deadline_reaches_no_backend() {
    let dir = tempfile::tempdir().unwrap();
    let payment = payment(dir.path(), &[]).await;
    let barista = barista(dir.path(), &payment, &[]).await;
    let served = || {
        metric(
            &barista,
            "rpc_server_requests_total",
            &[("method", "GetMenu")],
        )
    };

    // Through a balanced channel.
    let mut balanced = BaristaClient::new(over(&[&barista]));
    let mut request = tonic::Request::new(GetMenuRequest {});
    request.set_timeout(Duration::ZERO);
    let status = balanced.get_menu(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // Straight to the server, with an HTTP/2 client that sends the expired
    // deadline and waits for the answer (a tonic client gives up itself).
    // The request ends with its headers: the server answers without reading
    // a body, and a body still being sent would be reset under curl, which
    // then fails the transfer instead of printing the answer.
    let answer = curl(&[
        "-i",
        "--http2-prior-knowledge",
        "-X",
        "POST",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-H",
        "grpc-timeout: 0m",
        &format!("{}/brewmesh.barista.v1.Barista/GetMenu", barista.url()),
    ]);
    assert!(answer.contains("grpc-status: 4"), "{answer}");

    // Through the gateway.
    let backends = format!("brewmesh.barista.v1.Barista={}", barista.addr);
    let gateway = Process::start(&["gateway", "--listen", "127.0.0.1:0", "--backend", &backends]);
    let answer = curl(&[
        "-H",
        "grpc-timeout: 0m",
        "-w",
        "\n%{http_code}",
        &format!("{}/v1/menu", gateway.url()),
    ]);
    assert!(answer.ends_with("\n504"), "{answer}");
    assert_eq!(served(), 0.0, "no GetMenu was handled");

    // A live deadline is served.
    // (Counted as its answer ends, which may be just after the client has
    // it; on a loaded machine a hedge may have been served too.)
    balanced.get_menu(GetMenuRequest {}).await.unwrap();
    let counted = std::time::Instant::now();
    while served() < 1.0 && counted.elapsed() < support::PATIENCE {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served() >= 1.0);
}
