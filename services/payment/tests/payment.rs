//! The payment service over real gRPC, on port 0, with a real SQLite ledger.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::path::Path;
use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use brewmesh::pb::payment::v1::payments_client::PaymentsClient;
use brewmesh::pb::payment::v1::{
    AuthorizeRequest, CaptureRequest, GetPaymentRequest, ListPaymentsRequest, Money, PaymentState,
    RefundRequest, VoidRequest,
};
use brewmesh_payment::{Config, RunError};
use brewmesh_runtime::server::{Drained, ServeArgs};
use brewmesh_testing::{Running, spawn};

type Server = Running<Result<Drained, RunError>>;

async fn config(data_dir: &Path, processing_delay: Duration) -> Config {
    Config {
        serve: ServeArgs {
            listen: None,
            drain_timeout: Duration::from_secs(5),
            inject_latency: None,
            faults: Vec::new(),
        },
        database: brewmesh_testing::database(data_dir, "payment").await,
        processing_delay,
        registry: Default::default(),
    }
}

async fn start(data_dir: &Path, delay: Duration) -> (Server, PaymentsClient<Channel>) {
    let config = config(data_dir, delay).await;
    let server =
        spawn(|listener, shutdown| brewmesh_payment::run(listener, config, shutdown)).await;
    let client =
        PaymentsClient::new(brewmesh_runtime::client::channel(&server.url()).expect("valid url"));
    (server, client)
}

fn authorize(key: &str, order_id: &str, amount_minor: i64, card_token: &str) -> AuthorizeRequest {
    AuthorizeRequest {
        idempotency_key: key.into(),
        order_id: order_id.into(),
        amount: Some(Money {
            currency_code: "USD".into(),
            amount_minor,
        }),
        card_token: card_token.into(),
    }
}

fn violated_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

async fn payments_of(
    client: &mut PaymentsClient<Channel>,
    order_id: &str,
) -> Vec<brewmesh::pb::payment::v1::Payment> {
    client
        .list_payments(ListPaymentsRequest {
            order_id: order_id.into(),
            ..Default::default()
        })
        .await
        .expect("list payments")
        .into_inner()
        .payments
}

#[tokio::test]
async fn concurrent_authorizations_with_one_key_charge_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, client) = start(dir.path(), Duration::from_millis(50)).await;
    let request = authorize("key-1", "ord-1", 450, "tok_visa");

    let calls = (0..8).map(|_| {
        let mut client = client.clone();
        let request = request.clone();
        tokio::spawn(async move { client.authorize(request).await.map(|r| r.into_inner()) })
    });
    let mut ids = Vec::new();
    for call in calls {
        let payment = call.await.unwrap().expect("authorize");
        assert_eq!(payment.state(), PaymentState::Authorized);
        ids.push(payment.payment_id);
    }
    ids.dedup();
    assert_eq!(
        ids.len(),
        1,
        "every retry returns the same payment: {ids:?}"
    );
    assert_eq!(payments_of(&mut client.clone(), "ord-1").await.len(), 1);
}

#[tokio::test]
async fn reusing_a_key_for_a_different_request_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, mut client) = start(dir.path(), Duration::ZERO).await;
    client
        .authorize(authorize("key-1", "ord-1", 450, "tok_visa"))
        .await
        .unwrap();

    let status = client
        .authorize(authorize("key-1", "ord-1", 999, "tok_visa"))
        .await
        .expect_err("same key, different amount");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.metadata["field"], "idempotency_key");
    assert_eq!(payments_of(&mut client, "ord-1").await.len(), 1);
}

#[tokio::test]
async fn a_declined_card_is_recorded_and_cannot_be_captured() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, mut client) = start(dir.path(), Duration::ZERO).await;
    let payment = client
        .authorize(authorize(
            "key-1",
            "ord-1",
            450,
            brewmesh_payment::DECLINED_CARD_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(payment.state(), PaymentState::Declined);
    assert!(
        payment.decline_reason.contains("declined"),
        "{}",
        payment.decline_reason
    );

    let status = client
        .capture(CaptureRequest {
            payment_id: payment.payment_id.clone(),
            idempotency_key: "cap-1".into(),
        })
        .await
        .expect_err("a declined payment cannot be captured");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let got = client
        .get_payment(GetPaymentRequest {
            payment_id: payment.payment_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state(), PaymentState::Declined);
}

#[tokio::test]
async fn illegal_transitions_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, mut client) = start(dir.path(), Duration::ZERO).await;
    let id = client
        .authorize(authorize("key-1", "ord-1", 450, "tok_visa"))
        .await
        .unwrap()
        .into_inner()
        .payment_id;
    let voided = client
        .void(VoidRequest {
            payment_id: id.clone(),
            idempotency_key: "void-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(voided.state(), PaymentState::Voided);

    let capture = client
        .capture(CaptureRequest {
            payment_id: id.clone(),
            idempotency_key: "cap-1".into(),
        })
        .await
        .expect_err("a voided payment cannot be captured");
    assert_eq!(capture.code(), Code::FailedPrecondition);
    assert!(capture.get_details_precondition_failure().is_some());
    let refund = client
        .refund(RefundRequest {
            payment_id: id.clone(),
            idempotency_key: "ref-1".into(),
            reason: String::new(),
        })
        .await
        .expect_err("a voided payment cannot be refunded");
    assert_eq!(refund.code(), Code::FailedPrecondition);

    let got = client
        .get_payment(GetPaymentRequest { payment_id: id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state(), PaymentState::Voided);
}

#[tokio::test]
async fn capture_then_refund_and_retries_replay_the_first_response() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, mut client) = start(dir.path(), Duration::ZERO).await;
    let id = client
        .authorize(authorize("key-1", "ord-1", 450, "tok_visa"))
        .await
        .unwrap()
        .into_inner()
        .payment_id;
    let capture = CaptureRequest {
        payment_id: id.clone(),
        idempotency_key: "cap-1".into(),
    };
    let captured = client.capture(capture.clone()).await.unwrap().into_inner();
    assert_eq!(captured.state(), PaymentState::Captured);

    let refunded = client
        .refund(RefundRequest {
            payment_id: id.clone(),
            idempotency_key: "ref-1".into(),
            reason: "cold".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refunded.state(), PaymentState::Refunded);
    assert_eq!(refunded.refund_reason, "cold");

    // A late retry of the capture gets the capture's own answer back, not an
    // error and not a second capture.
    let replayed = client.capture(capture).await.unwrap().into_inner();
    assert_eq!(replayed, captured);
    let again = client
        .capture(CaptureRequest {
            payment_id: id,
            idempotency_key: "cap-2".into(),
        })
        .await
        .expect_err("a new capture of a refunded payment is illegal");
    assert_eq!(again.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn a_bad_authorize_names_every_offending_field() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, mut client) = start(dir.path(), Duration::ZERO).await;

    let status = client
        .authorize(AuthorizeRequest::default())
        .await
        .expect_err("empty request");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        violated_fields(&status),
        ["idempotency_key", "order_id", "amount", "card_token"]
    );

    let mut request = authorize("key-1", "ord-1", -5, "tok_visa");
    request.amount.as_mut().unwrap().currency_code = "usd".into();
    let status = client.authorize(request).await.expect_err("bad money");
    assert_eq!(
        violated_fields(&status),
        ["amount.currency_code", "amount.amount_minor"]
    );

    let status = client
        .get_payment(GetPaymentRequest {
            payment_id: "nope".into(),
        })
        .await
        .expect_err("malformed id");
    assert_eq!(violated_fields(&status), ["payment_id"]);
    let status = client
        .list_payments(ListPaymentsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad page token");
    assert_eq!(violated_fields(&status), ["page_token"]);
}

#[tokio::test]
async fn an_unknown_payment_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, mut client) = start(dir.path(), Duration::ZERO).await;
    let missing = brewmesh_runtime::ids::new("pay");
    let status = client
        .get_payment(GetPaymentRequest {
            payment_id: missing.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .capture(CaptureRequest {
            payment_id: missing,
            idempotency_key: "cap-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn payments_list_newest_first_a_page_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, mut client) = start(dir.path(), Duration::ZERO).await;
    let mut created = Vec::new();
    for i in 0..5 {
        let p = client
            .authorize(authorize(&format!("key-{i}"), "ord-x", 100 + i, "tok_visa"))
            .await
            .unwrap()
            .into_inner();
        created.push(p.payment_id);
    }
    client
        .authorize(authorize("other", "ord-y", 100, "tok_visa"))
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_payments(ListPaymentsRequest {
                page_size: 2,
                page_token: token,
                order_id: "ord-x".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.payments.len() <= 2);
        seen.extend(page.payments.into_iter().map(|p| p.payment_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    created.reverse();
    assert_eq!(seen, created);
}

#[tokio::test]
async fn committed_payments_survive_a_restart_on_the_same_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client) = start(dir.path(), Duration::ZERO).await;
    let id = client
        .authorize(authorize("key-1", "ord-1", 450, "tok_visa"))
        .await
        .unwrap()
        .into_inner()
        .payment_id;
    assert_eq!(server.stop().await.unwrap(), Drained::Gracefully);

    let (_server, mut client) = start(dir.path(), Duration::ZERO).await;
    let got = client
        .get_payment(GetPaymentRequest {
            payment_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state(), PaymentState::Authorized);
    // The key is remembered too: the retry returns the same payment.
    let again = client
        .authorize(authorize("key-1", "ord-1", 450, "tok_visa"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.payment_id, id);
}

#[tokio::test]
async fn draining_turns_health_not_serving_at_once_and_lets_calls_finish() {
    use tokio_stream::StreamExt;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let dir = tempfile::tempdir().unwrap();
    let (server, client) = start(dir.path(), Duration::from_millis(800)).await;
    let channel = brewmesh_runtime::client::channel(&server.url()).unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", brewmesh_payment::SERVICE_NAME] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.status(), ServingStatus::Serving, "{service:?}");
    }
    let mut updates = health
        .watch(HealthCheckRequest {
            service: brewmesh_payment::SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        updates.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let mut slow = client.clone();
    let in_flight =
        tokio::spawn(async move { slow.authorize(authorize("k", "o", 100, "tok_visa")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.shutdown.cancel();

    // The watcher hears NOT_SERVING while the slow call is still running.
    let next = tokio::time::timeout(Duration::from_secs(5), updates.next())
        .await
        .expect("a health update");
    assert_eq!(next.unwrap().unwrap().status(), ServingStatus::NotServing);
    assert!(
        !in_flight.is_finished(),
        "the call should still be in flight"
    );
    let payment = in_flight
        .await
        .unwrap()
        .expect("the call in flight finishes");
    assert_eq!(payment.into_inner().state(), PaymentState::Authorized);
    assert_eq!(server.stop().await.unwrap(), Drained::Gracefully);
}

/// Each entry's payment, or its error's code.
fn outcomes(
    outcomes: Vec<brewmesh::pb::payment::v1::PaymentOutcome>,
) -> Vec<Result<brewmesh::pb::payment::v1::Payment, Code>> {
    use brewmesh::pb::payment::v1::payment_outcome::Outcome;
    outcomes
        .into_iter()
        .map(|o| match o.outcome.expect("an outcome") {
            Outcome::Payment(payment) => Ok(payment),
            Outcome::Error(status) => Err(Code::from(status.code)),
        })
        .collect()
}

#[tokio::test]
async fn a_batch_answers_each_entry_as_the_call_alone_would() {
    use brewmesh::pb::payment::v1::{BatchAuthorizeRequest, BatchCaptureRequest, BatchVoidRequest};
    let dir = tempfile::tempdir().unwrap();
    let (_server, mut client) = start(dir.path(), Duration::ZERO).await;
    let batch = BatchAuthorizeRequest {
        requests: vec![
            authorize("a1", "o1", 300, "tok_visa"),
            authorize("a2", "o2", 300, "tok_visa"),
            authorize("a3", "o3", 300, "tok_declined"),
            authorize("a1", "o1", 300, "tok_visa"),
            authorize("a4", "o4", 475, "tok_visa"),
        ],
    };
    // A malformed entry refuses the batch, naming it.
    let mut malformed = batch.clone();
    malformed.requests[1].order_id = String::new();
    let status = client.batch_authorize(malformed).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["requests[1].order_id"]);
    assert!(payments_of(&mut client, "o1").await.is_empty());
    let first = outcomes(
        client
            .batch_authorize(batch.clone())
            .await
            .unwrap()
            .into_inner()
            .outcomes,
    );
    let state = |o: &Result<brewmesh::pb::payment::v1::Payment, Code>| {
        o.as_ref().map(|p| p.state()).map_err(|c| *c)
    };
    assert_eq!(
        first.iter().map(state).collect::<Vec<_>>(),
        [
            Ok(PaymentState::Authorized),
            Ok(PaymentState::Authorized),
            Ok(PaymentState::Declined),
            Ok(PaymentState::Authorized),
            Ok(PaymentState::Authorized),
        ]
    );
    let id = |o: &Result<brewmesh::pb::payment::v1::Payment, Code>| {
        o.as_ref().map(|p| p.payment_id.clone()).unwrap_or_default()
    };
    assert_eq!(
        id(&first[0]),
        id(&first[3]),
        "a repeated key is one payment"
    );
    // Replayed: the same payments, nothing new; and a key reused for
    // another request fails that entry only.
    let again = outcomes(
        client
            .batch_authorize(batch)
            .await
            .unwrap()
            .into_inner()
            .outcomes,
    );
    assert_eq!(
        again.iter().map(id).collect::<Vec<_>>(),
        first.iter().map(id).collect::<Vec<_>>()
    );
    assert_eq!(payments_of(&mut client, "o1").await.len(), 1);
    let reused = outcomes(
        client
            .batch_authorize(BatchAuthorizeRequest {
                requests: vec![
                    authorize("a1", "o1", 999, "tok_visa"),
                    authorize("a5", "o5", 300, "tok_visa"),
                ],
            })
            .await
            .unwrap()
            .into_inner()
            .outcomes,
    );
    assert_eq!(reused[0].as_ref().err(), Some(&Code::AlreadyExists));
    assert!(reused[1].is_ok());
    // The same single call answers as the batch did.
    let alone = client
        .authorize(authorize("a4", "o4", 475, "tok_visa"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alone.payment_id, id(&first[4]));

    // Captures: one moves, a second key for it, an unknown payment and a
    // declined one are refused, each as Capture alone refuses them.
    let capture = |key: &str, payment_id: String| CaptureRequest {
        payment_id,
        idempotency_key: key.into(),
    };
    let batch = BatchCaptureRequest {
        requests: vec![
            capture("c1", id(&first[0])),
            capture("c2", id(&first[0])),
            capture("c3", brewmesh_runtime::ids::new("pay")),
            capture("c4", id(&first[2])),
        ],
    };
    let captured = outcomes(
        client
            .batch_capture(batch.clone())
            .await
            .unwrap()
            .into_inner()
            .outcomes,
    );
    assert_eq!(
        captured.iter().map(state).collect::<Vec<_>>(),
        [
            Ok(PaymentState::Captured),
            Err(Code::FailedPrecondition),
            Err(Code::NotFound),
            Err(Code::FailedPrecondition),
        ]
    );
    let replayed = outcomes(
        client
            .batch_capture(batch)
            .await
            .unwrap()
            .into_inner()
            .outcomes,
    );
    assert_eq!(
        replayed[0].as_ref().map(|p| p.update_time),
        captured[0].as_ref().map(|p| p.update_time)
    );
    // A refused entry's key stays free: used again for a payment that
    // can move, it moves it.
    let voided = outcomes(
        client
            .batch_void(BatchVoidRequest {
                requests: vec![
                    VoidRequest {
                        payment_id: id(&first[4]),
                        idempotency_key: "c2".into(),
                    },
                    VoidRequest {
                        payment_id: id(&first[0]),
                        idempotency_key: "v1".into(),
                    },
                ],
            })
            .await
            .unwrap()
            .into_inner()
            .outcomes,
    );
    assert_eq!(
        voided.iter().map(state).collect::<Vec<_>>(),
        [Ok(PaymentState::Voided), Err(Code::FailedPrecondition)]
    );

    let status = client
        .batch_authorize(BatchAuthorizeRequest {
            requests: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["requests"]);
}
