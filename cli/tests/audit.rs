//! `brewmesh audit` against real processes: clean on a consistent shop,
//! and each kind of mismatch found once planted in the databases.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use std::path::Path;
use std::process::Command;

use nix::sys::signal::Signal;
use sqlx::Connection as _;

use brewmesh::pb::barista::v1::barista_client::BaristaClient;
use brewmesh::pb::barista::v1::{OrderState, PlaceOrderRequest};
use support::Process;

async fn payment(dir: &Path) -> Process {
    Process::start_role(
        "payment",
        dir,
        &["--listen", "127.0.0.1:0", "--processing-delay", "0s"],
    )
    .await
}

async fn barista(dir: &Path, payment: &Process) -> Process {
    let payment_addr = payment.addr.to_string();
    Process::start_role(
        "barista",
        dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--payment-addr",
            &payment_addr,
            "--espresso-time",
            "1ms",
            "--milk-time",
            "1ms",
        ],
    )
    .await
}

/// `brewmesh audit` against the two; its exit status and JSON report.
fn audit(barista: &Process, payment: &Process, dir: &Path) -> (bool, serde_json::Value) {
    let report = dir.join("audit.json");
    let output = Command::new(env!("CARGO_BIN_EXE_brewmesh"))
        .args(["audit", "--grace", "1s", "--barista"])
        .arg(barista.addr.to_string())
        .arg("--payment")
        .arg(payment.addr.to_string())
        .arg("--json")
        .arg(&report)
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&output.stdout));
    let report = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (output.status.success(), report)
}

async fn sql(dir: &Path, service: &str, file: &str, statements: &[(&str, &str)]) {
    let url = brewmesh_testing::database(dir, service)
        .await
        .url(file)
        .unwrap();
    sqlx::any::install_default_drivers();
    let mut db = sqlx::AnyConnection::connect(&url).await.unwrap();
    for (statement, order_id) in statements {
        let done = sqlx::query(statement)
            .bind(*order_id)
            .execute(&mut db)
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 1, "{statement}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_is_clean_on_a_consistent_shop_and_finds_each_planted_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let mut pay = payment(dir.path()).await;
    let mut bar = barista(dir.path(), &pay).await;
    let mut client = BaristaClient::new(brewmesh_runtime::client::channel(&bar.url()).unwrap());
    let mut ids = Vec::new();
    for n in 0..6 {
        let card = if n == 5 {
            brewmesh_payment::service::DECLINED_CARD_TOKEN
        } else {
            "tok_visa"
        };
        let placed = client
            .place_order(PlaceOrderRequest {
                idempotency_key: format!("audit-{n}"),
                item_id: "espresso".into(),
                customer_name: "Ada".into(),
                card_token: card.into(),
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(placed.order_id);
    }
    for (n, id) in ids.iter().enumerate() {
        let want = if n == 5 {
            OrderState::Failed
        } else {
            OrderState::Ready
        };
        support::wait_for_state(&mut client, id, want).await;
    }
    let (clean, report) = audit(&bar, &pay, dir.path());
    assert!(clean, "{report}");
    assert_eq!(report["orders"], 6);
    assert_eq!(report["findings"], serde_json::json!([]));

    // Stopped, planted, started again on the same data.
    for process in [&mut bar, &mut pay] {
        process.signal(Signal::SIGTERM);
        process.wait();
    }
    sql(
        dir.path(),
        "payment",
        "payment.db",
        &[
            // A READY order whose payment was voided.
            ("UPDATE payments SET state = 3 WHERE order_id = $1", &ids[0]),
            // An authorization left open for long.
            (
                "UPDATE payments SET state = 1, update_time = 0 WHERE order_id = $1",
                &ids[2],
            ),
            // A payment whose order does not exist.
            (
                "UPDATE payments SET order_id = 'ord_00000000000000000000000000000000' WHERE order_id = $1",
                &ids[3],
            ),
        ],
    )
    .await;
    sql(
        dir.path(),
        "barista",
        "barista.db",
        &[
            // A failed order with a capture.
            ("UPDATE orders SET state = 5 WHERE order_id = $1", &ids[1]),
            // An order left brewing, untouched for long.
            (
                "UPDATE orders SET state = 2, update_time = 0 WHERE order_id = $1",
                &ids[4],
            ),
        ],
    )
    .await;
    let pay = payment(dir.path()).await;
    let bar = barista(dir.path(), &pay).await;
    let (clean, report) = audit(&bar, &pay, dir.path());
    assert!(!clean, "{report}");
    let found: Vec<(String, String)> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_owned(),
                f["order_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (kind, order_id) in [
        ("ready_not_captured_once", &ids[0]),
        ("charged_without_drink", &ids[1]),
        ("authorization_left_open", &ids[2]),
        (
            "payment_without_order",
            &"ord_00000000000000000000000000000000".to_owned(),
        ),
        ("order_stuck", &ids[4]),
    ] {
        assert!(
            found.contains(&(kind.to_owned(), order_id.clone())),
            "{kind} for {order_id} in {found:?}"
        );
    }
}
