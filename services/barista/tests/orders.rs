//! The barista and payment services over real gRPC, on port 0, with real
//! SQLite databases: the order saga end to end.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use brewmesh::pb::barista::v1::barista_client::BaristaClient;
use brewmesh::pb::barista::v1::{
    BatchPlaceOrdersRequest, CancelOrderRequest, GetMenuRequest, GetOrderRequest,
    ListOrdersRequest, Order, OrderEvent, OrderEventType as E, OrderState, PlaceOrderRequest,
    WatchOrderRequest, WatchOrdersRequest,
};
use brewmesh::pb::payment::v1::payments_client::PaymentsClient;
use brewmesh::pb::payment::v1::{ListPaymentsRequest, Payment, PaymentState};
use brewmesh_runtime::db::DatabaseArgs;
use brewmesh_runtime::server::ServeArgs;
use brewmesh_testing::{Running, spawn};

type PaymentRun = Result<brewmesh_runtime::server::Drained, brewmesh_payment::RunError>;
type BaristaRun = Result<brewmesh_runtime::server::Drained, brewmesh_barista::RunError>;

struct Mesh {
    barista: BaristaClient<Channel>,
    payments: PaymentsClient<Channel>,
    _servers: (Running<PaymentRun>, Running<BaristaRun>),
    _dir: tempfile::TempDir,
}

fn serve_args() -> ServeArgs {
    ServeArgs {
        listen: None,
        drain_timeout: Duration::from_secs(5),
        inject_latency: None,
        faults: Vec::new(),
    }
}

/// Settings for a quick shop: 200 ms steps, 2 machines of each kind.
fn barista_config(database: DatabaseArgs, payment_addr: String) -> brewmesh_barista::Config {
    brewmesh_barista::Config {
        serve: serve_args(),
        database,
        registry: Default::default(),
        payment_addrs: vec![payment_addr],
        payment_dns: None,
        payment_timeout: Duration::from_secs(5),
        espresso_machines: 2,
        steam_wands: 2,
        queue_depth: 4,
        espresso_time: Duration::from_millis(200),
        milk_time: Duration::from_millis(200),
        brew_failure_rate: 0.0,
        remote: Default::default(),
        max_orders: brewmesh_barista::MaxOrders::Auto,
        order_lease: Duration::from_secs(2),
        watch_poll: Duration::from_millis(200),
    }
}

/// Logs, a data directory and a payment service answering after `delay`.
async fn payment(delay: Duration) -> (tempfile::TempDir, Running<PaymentRun>) {
    let _ = brewmesh_runtime::telemetry::init(
        brewmesh_runtime::telemetry::LogFormat::Text,
        brewmesh_runtime::telemetry::Identity::of("test"),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = brewmesh_payment::Config {
        serve: serve_args(),
        database: brewmesh_testing::database(dir.path(), "payment").await,
        processing_delay: delay,
        registry: Default::default(),
    };
    let payment = spawn(|l, s| brewmesh_payment::run(l, config, s)).await;
    (dir, payment)
}

async fn mesh(payment_delay: Duration, tweak: impl FnOnce(&mut brewmesh_barista::Config)) -> Mesh {
    let (dir, payment) = payment(payment_delay).await;
    let barista_db = brewmesh_testing::database(dir.path(), "barista").await;
    let mut config = barista_config(barista_db, payment.addr.to_string());
    tweak(&mut config);
    let barista = spawn(|l, s| brewmesh_barista::run(l, config, s)).await;
    let channel = |url: String| brewmesh_runtime::client::channel(&url).unwrap();
    Mesh {
        barista: BaristaClient::new(channel(barista.url())),
        payments: PaymentsClient::new(channel(payment.url())),
        _servers: (payment, barista),
        _dir: dir,
    }
}

fn order(key: &str, item_id: &str, card_token: &str) -> PlaceOrderRequest {
    PlaceOrderRequest {
        idempotency_key: key.into(),
        item_id: item_id.into(),
        customer_name: "Ada".into(),
        card_token: card_token.into(),
    }
}

impl Mesh {
    async fn place(&mut self, request: PlaceOrderRequest) -> Order {
        self.barista
            .place_order(request)
            .await
            .expect("place order")
            .into_inner()
    }

    /// Every event of the order until its final one.
    async fn watch(&mut self, order_id: &str) -> Vec<OrderEvent> {
        self.watch_after(order_id, 0).await
    }

    /// The order's events after `after`, to the end of the stream.
    async fn watch_after(&mut self, order_id: &str, after: i64) -> Vec<OrderEvent> {
        let stream = self
            .barista
            .watch_order(WatchOrderRequest {
                order_id: order_id.into(),
                after_sequence: after,
            })
            .await
            .expect("watch")
            .into_inner();
        let events: Vec<OrderEvent> =
            tokio::time::timeout(Duration::from_secs(30), stream.collect::<Result<_, _>>())
                .await
                .expect("the order ends within 30s")
                .expect("the stream ends cleanly");
        events
    }

    /// Waits (bounded) until the order has an event of type `wanted`; that
    /// event.
    async fn wait_for(&mut self, order_id: &str, wanted: E) -> OrderEvent {
        let mut stream = self
            .barista
            .watch_order(WatchOrderRequest {
                order_id: order_id.into(),
                after_sequence: 0,
            })
            .await
            .expect("watch")
            .into_inner();
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(event) = stream.next().await {
                let event = event.expect("event");
                if event.r#type() == wanted {
                    return Some(event);
                }
            }
            None
        });
        found
            .await
            .expect("bounded wait")
            .unwrap_or_else(|| panic!("no {wanted:?} event"))
    }

    async fn payments_of(&mut self, order_id: &str) -> Vec<Payment> {
        self.payments
            .list_payments(ListPaymentsRequest {
                order_id: order_id.into(),
                ..Default::default()
            })
            .await
            .expect("list payments")
            .into_inner()
            .payments
    }

    async fn get(&mut self, order_id: &str) -> Order {
        self.barista
            .get_order(GetOrderRequest {
                order_id: order_id.into(),
            })
            .await
            .expect("get order")
            .into_inner()
    }
}

fn types(events: &[OrderEvent]) -> Vec<E> {
    events.iter().map(|e| e.r#type()).collect()
}

fn position(events: &[OrderEvent], wanted: E) -> usize {
    events
        .iter()
        .position(|e| e.r#type() == wanted)
        .unwrap_or_else(|| panic!("no {wanted:?} in {:?}", types(events)))
}

fn captured(payments: &[Payment]) -> usize {
    payments
        .iter()
        .filter(|p| p.state() == PaymentState::Captured)
        .count()
}

#[tokio::test]
async fn an_order_is_made_and_its_payment_captured() {
    let mut mesh = mesh(Duration::from_millis(50), |_| {}).await;
    let placed = mesh.place(order("k1", "latte", "tok_visa")).await;
    assert_eq!(placed.state(), OrderState::Accepted);
    assert_eq!(placed.price.as_ref().map(|p| p.amount_minor), Some(475));

    let events = mesh.watch(&placed.order_id).await;
    let kinds = types(&events);
    assert_eq!(kinds.first(), Some(&E::Accepted));
    // The drink is handed over, then the capture settles; the stream ends
    // with it.
    assert_eq!(kinds[kinds.len() - 2..], [E::Ready, E::PaymentCaptured]);
    for wanted in [
        E::BrewingStarted,
        E::PaymentAuthorized,
        E::EspressoDone,
        E::MilkDone,
    ] {
        assert!(kinds.contains(&wanted), "{wanted:?} missing from {kinds:?}");
    }
    let sequences: Vec<i64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(
        sequences,
        (1..=events.len() as i64).collect::<Vec<_>>(),
        "no gaps"
    );

    let done = mesh.get(&placed.order_id).await;
    assert_eq!(done.state(), OrderState::Ready);
    let payments = mesh.payments_of(&placed.order_id).await;
    assert_eq!(payments.len(), 1);
    assert_eq!(payments[0].payment_id, done.payment_id);
    assert_eq!(payments[0].state(), PaymentState::Captured);
    assert_eq!(payments[0].amount, placed.price);
}

/// The seed's timing: the drink is handed over (READY) once it is made and
/// authorized, and the capture settles after it. A watch begun at READY,
/// with the capture still under way, ends with the capture.
#[tokio::test]
async fn the_drink_is_ready_before_its_capture_and_the_watch_ends_with_it() {
    let mut mesh = mesh(Duration::from_millis(500), |c| {
        c.espresso_time = Duration::from_millis(10);
        c.milk_time = Duration::from_millis(10);
    })
    .await;
    let placed = mesh.place(order("k1", "latte", "tok_visa")).await;
    // Most often the capture (500 ms) is still under way once READY is
    // seen; either way a watch begun after READY ends with it.
    let after_ready = mesh.wait_for(&placed.order_id, E::Ready).await.sequence;
    let rest = mesh.watch_after(&placed.order_id, after_ready).await;
    assert_eq!(types(&rest), [E::PaymentCaptured]);

    let all = mesh.watch(&placed.order_id).await;
    let ready_at = all.iter().position(|e| e.r#type() == E::Ready).unwrap();
    assert_eq!(types(&all[ready_at..]), [E::Ready, E::PaymentCaptured]);
    let payments = mesh.payments_of(&placed.order_id).await;
    assert_eq!(payments.len(), 1);
    assert_eq!(payments[0].state(), PaymentState::Captured);
}

#[tokio::test]
async fn espresso_and_milk_are_made_at_the_same_time() {
    let mut mesh = mesh(Duration::ZERO, |c| {
        c.espresso_time = Duration::from_millis(500);
        c.milk_time = Duration::from_millis(500);
    })
    .await;
    let placed = mesh.place(order("k1", "cappuccino", "tok_visa")).await;
    let events = mesh.watch(&placed.order_id).await;

    // Both stations start before either finishes: the steps overlap.
    let last_start = position(&events, E::EspressoStarted).max(position(&events, E::MilkStarted));
    let first_done = position(&events, E::EspressoDone).min(position(&events, E::MilkDone));
    assert!(
        last_start < first_done,
        "steps ran one after the other: {:?}",
        types(&events)
    );
}

#[tokio::test]
async fn a_drink_without_milk_never_uses_a_steam_wand() {
    let mut mesh = mesh(Duration::ZERO, |_| {}).await;
    let placed = mesh.place(order("k1", "americano", "tok_visa")).await;
    let kinds = types(&mesh.watch(&placed.order_id).await);
    assert_eq!(kinds[kinds.len() - 2..], [E::Ready, E::PaymentCaptured]);
    assert!(!kinds.contains(&E::MilkStarted), "{kinds:?}");
}

#[tokio::test]
async fn a_declined_payment_fails_the_order_with_nothing_captured() {
    let mut mesh = mesh(Duration::from_millis(50), |_| {}).await;
    let placed = mesh
        .place(order("k1", "latte", brewmesh_payment::DECLINED_CARD_TOKEN))
        .await;
    let events = mesh.watch(&placed.order_id).await;
    assert_eq!(events.last().map(|e| e.r#type()), Some(E::Failed));
    assert!(types(&events).contains(&E::PaymentDeclined));

    let done = mesh.get(&placed.order_id).await;
    assert_eq!(done.state(), OrderState::Failed);
    assert!(
        done.failure_reason.contains("declined"),
        "{}",
        done.failure_reason
    );
    let payments = mesh.payments_of(&placed.order_id).await;
    assert_eq!(captured(&payments), 0);
    assert!(payments.iter().all(|p| p.state() == PaymentState::Declined));
}

#[tokio::test]
async fn a_failed_station_voids_the_authorization() {
    let mut mesh = mesh(Duration::ZERO, |c| c.brew_failure_rate = 1.0).await;
    let placed = mesh.place(order("k1", "latte", "tok_visa")).await;
    let events = mesh.watch(&placed.order_id).await;
    let kinds = types(&events);
    assert_eq!(kinds.last(), Some(&E::Failed));
    assert!(
        position(&events, E::BrewingFailed) < position(&events, E::PaymentVoided),
        "{kinds:?}"
    );

    let payments = mesh.payments_of(&placed.order_id).await;
    assert_eq!(payments.len(), 1);
    assert_eq!(payments[0].state(), PaymentState::Voided);
    assert_eq!(mesh.get(&placed.order_id).await.state(), OrderState::Failed);
}

#[tokio::test]
async fn cancelling_voids_the_authorization() {
    let mut mesh = mesh(Duration::from_millis(20), |c| {
        c.espresso_time = Duration::from_secs(5)
    })
    .await;
    let placed = mesh.place(order("k1", "americano", "tok_visa")).await;
    mesh.wait_for(&placed.order_id, E::PaymentAuthorized).await;

    let cancelling = mesh
        .barista
        .cancel_order(CancelOrderRequest {
            order_id: placed.order_id.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelling.state(), OrderState::Cancelling);

    let events = mesh.watch(&placed.order_id).await;
    let kinds = types(&events);
    assert_eq!(kinds.last(), Some(&E::Cancelled));
    assert!(kinds.contains(&E::PaymentVoided), "{kinds:?}");
    assert!(
        !kinds.contains(&E::EspressoDone),
        "brewing stopped: {kinds:?}"
    );
    let payments = mesh.payments_of(&placed.order_id).await;
    assert_eq!(payments.len(), 1);
    assert_eq!(payments[0].state(), PaymentState::Voided);

    // Cancelling again changes nothing.
    let again = mesh
        .barista
        .cancel_order(CancelOrderRequest {
            order_id: placed.order_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.state(), OrderState::Cancelled);
}

#[tokio::test]
async fn a_ready_order_cannot_be_cancelled() {
    let mut mesh = mesh(Duration::ZERO, |_| {}).await;
    let placed = mesh.place(order("k1", "espresso", "tok_visa")).await;
    mesh.watch(&placed.order_id).await;
    let status = mesh
        .barista
        .cancel_order(CancelOrderRequest {
            order_id: placed.order_id.clone(),
            reason: String::new(),
        })
        .await
        .expect_err("a READY order cannot be cancelled");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(captured(&mesh.payments_of(&placed.order_id).await), 1);
}

#[tokio::test]
async fn a_full_shop_answers_resource_exhausted_and_stores_nothing() {
    let mut mesh = mesh(Duration::ZERO, |c| {
        c.espresso_machines = 1;
        c.queue_depth = 1;
        c.espresso_time = Duration::from_secs(5);
    })
    .await;
    mesh.place(order("k1", "espresso", "tok_visa")).await; // brewing
    mesh.place(order("k2", "espresso", "tok_visa")).await; // queued
    let status = mesh
        .barista
        .place_order(order("k3", "espresso", "tok_visa"))
        .await
        .expect_err("machine and queue are full");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.get_details_retry_info().is_some());

    let listed = mesh
        .barista
        .list_orders(ListOrdersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.orders.len(), 2);
    // A retry of an accepted order is still answered while the shop is full.
    let retry = mesh
        .barista
        .place_order(order("k1", "espresso", "tok_visa"))
        .await;
    assert!(retry.is_ok(), "{retry:?}");
}

#[tokio::test]
async fn past_max_orders_a_new_order_is_refused_until_a_saga_ends() {
    // Stations wide enough for everything: only the bound refuses.
    let mut mesh = mesh(Duration::ZERO, |c| {
        c.espresso_machines = 8;
        c.steam_wands = 8;
        c.espresso_time = Duration::from_secs(1);
        c.max_orders = brewmesh_barista::MaxOrders::At(2);
    })
    .await;
    let first = mesh.place(order("k1", "espresso", "tok_visa")).await;
    mesh.place(order("k2", "espresso", "tok_visa")).await;

    let status = mesh
        .barista
        .place_order(order("k3", "espresso", "tok_visa"))
        .await
        .expect_err("two orders in flight is the bound");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("drives 2 orders"), "{status:?}");
    assert!(status.get_details_retry_info().is_some());
    assert!(status.metadata().get("grpc-retry-pushback-ms").is_some());
    // A batch larger than the bound can never be taken: split it.
    let status = mesh
        .refused_batch(vec![
            order("b1", "espresso", "tok_visa"),
            order("b2", "espresso", "tok_visa"),
            order("b3", "espresso", "tok_visa"),
        ])
        .await;
    let quota = never_fits(&status);
    assert_eq!(quota.violations[0].subject, "barista/orders_in_flight");
    assert_eq!(mesh.order_count().await, 2, "nothing refused is stored");
    // A retry of an accepted order is answered at the bound too.
    let retry = mesh
        .barista
        .place_order(order("k1", "espresso", "tok_visa"))
        .await;
    assert!(retry.is_ok(), "{retry:?}");

    // Once a saga ends, its room is free again.
    mesh.watch(&first.order_id).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match mesh
            .barista
            .place_order(order("k3", "espresso", "tok_visa"))
            .await
        {
            Ok(_) => break,
            Err(status) if status.code() == Code::ResourceExhausted => {
                // The saga's last write (the capture) may still be under way.
                assert!(tokio::time::Instant::now() < deadline, "{status:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
}

#[tokio::test]
async fn a_repeated_order_with_one_key_is_made_and_charged_once() {
    let mut mesh = mesh(Duration::from_millis(50), |_| {}).await;
    let first = mesh.place(order("same-key", "latte", "tok_visa")).await;
    let second = mesh.place(order("same-key", "latte", "tok_visa")).await;
    assert_eq!(first.order_id, second.order_id);
    mesh.watch(&first.order_id).await;
    let third = mesh.place(order("same-key", "latte", "tok_visa")).await;
    assert_eq!(third.order_id, first.order_id);
    assert_eq!(third.state(), OrderState::Ready);

    let payments = mesh.payments_of(&first.order_id).await;
    assert_eq!(payments.len(), 1);
    assert_eq!(captured(&payments), 1);
    let listed = mesh
        .barista
        .list_orders(ListOrdersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.orders.len(), 1);

    let status = mesh
        .barista
        .place_order(order("same-key", "espresso", "tok_visa"))
        .await
        .expect_err("same key, different drink");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.reason, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(info.metadata["field"], "idempotency_key");
}

#[tokio::test]
async fn bad_requests_are_invalid_argument_naming_the_field() {
    let mut mesh = mesh(Duration::ZERO, |_| {}).await;
    let fields = |status: tonic::Status| -> Vec<String> {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        status
            .get_details_bad_request()
            .unwrap()
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect()
    };

    let status = mesh
        .barista
        .place_order(PlaceOrderRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        fields(status),
        ["idempotency_key", "item_id", "customer_name", "card_token"]
    );
    // A well-formed id that names no drink: NOT_FOUND, naming the item.
    let status = mesh
        .barista
        .place_order(order("k1", "tea", "tok_visa"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let resource = status.get_details_resource_info().unwrap();
    assert_eq!(resource.resource_type, "brewmesh.barista.v1.MenuItem");
    assert_eq!(resource.resource_name, "tea");
    let status = mesh
        .barista
        .get_order(GetOrderRequest {
            order_id: "42".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(fields(status), ["order_id"]);
    let status = mesh
        .barista
        .list_orders(ListOrdersRequest {
            page_size: -1,
            state: 99,
            page_token: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(fields(status), ["page_size", "page_token", "state"]);
    let status = mesh
        .barista
        .watch_order(WatchOrderRequest {
            order_id: String::new(),
            after_sequence: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(fields(status), ["order_id"]);

    let unknown = brewmesh_runtime::ids::new("ord");
    let status = mesh
        .barista
        .get_order(GetOrderRequest {
            order_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = mesh
        .barista
        .watch_order(WatchOrderRequest {
            order_id: unknown,
            after_sequence: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn a_watch_resumes_after_a_sequence_and_lists_show_orders_newest_first() {
    let mut mesh = mesh(Duration::ZERO, |_| {}).await;
    let menu = mesh
        .barista
        .get_menu(GetMenuRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(menu.items.iter().any(|i| i.item_id == "latte"));

    let first = mesh.place(order("k1", "espresso", "tok_visa")).await;
    let second = mesh.place(order("k2", "espresso", "tok_visa")).await;
    let all = mesh.watch(&first.order_id).await;
    let rest = mesh.watch_after(&first.order_id, 2).await;
    assert_eq!(rest, all[2..]);
    // Past the end of a finished order, the stream ends at once, empty.
    let past_end = mesh
        .barista
        .watch_order(WatchOrderRequest {
            order_id: first.order_id.clone(),
            after_sequence: all.len() as i64,
        })
        .await
        .unwrap()
        .into_inner();
    let nothing: Vec<OrderEvent> =
        tokio::time::timeout(Duration::from_secs(10), past_end.collect::<Result<_, _>>())
            .await
            .expect("the stream ends")
            .unwrap();
    assert!(nothing.is_empty());

    let page = mesh
        .barista
        .list_orders(ListOrdersRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page.orders.iter().map(|o| &o.order_id).collect::<Vec<_>>(),
        [&second.order_id]
    );
    let next = mesh
        .barista
        .list_orders(ListOrdersRequest {
            page_size: 1,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        next.orders.iter().map(|o| &o.order_id).collect::<Vec<_>>(),
        [&first.order_id]
    );
    assert!(next.next_page_token.is_empty());
}

/// Two baristas on `database`, each run with `config(database)`: the
/// servers (stopped when dropped) and a client of each.
async fn two_replicas(
    database: DatabaseArgs,
    config: impl Fn(DatabaseArgs) -> brewmesh_barista::Config,
) -> (
    [Running<BaristaRun>; 2],
    BaristaClient<Channel>,
    BaristaClient<Channel>,
) {
    let first_config = config(database.clone());
    let first = spawn(|l, s| brewmesh_barista::run(l, first_config, s)).await;
    let second_config = config(database);
    let second = spawn(|l, s| brewmesh_barista::run(l, second_config, s)).await;
    let channel = |url: String| brewmesh_runtime::client::channel(&url).unwrap();
    let (a, b) = (
        BaristaClient::new(channel(first.url())),
        BaristaClient::new(channel(second.url())),
    );
    ([first, second], a, b)
}

/// Every event of `order_id`, watched through `client` to the order's end
/// (within 30 s).
async fn watched_to_end(mut client: BaristaClient<Channel>, order_id: String) -> Vec<OrderEvent> {
    let stream = client
        .watch_order(WatchOrderRequest {
            order_id,
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(
        Duration::from_secs(30),
        stream.collect::<Result<Vec<OrderEvent>, _>>(),
    )
    .await
    .expect("the order ends within 30s")
    .unwrap()
}

/// Two baristas on one database: a watch on the replica that does not drive
/// the order gets every event the other one writes (found by the shop's
/// poll of the watched orders), and a watch on the driving replica gets the
/// cancel the other one records.
#[tokio::test]
async fn a_watch_on_either_replica_sees_what_the_other_one_writes() {
    let (dir, payment) = payment(Duration::ZERO).await;
    let database = brewmesh_testing::database(dir.path(), "barista").await;
    // Steps long enough for the cancel to come while the drink is brewing.
    let config = |database| brewmesh_barista::Config {
        espresso_time: Duration::from_secs(1),
        milk_time: Duration::from_secs(1),
        ..barista_config(database, payment.addr.to_string())
    };
    let (_servers, mut driving_client, mut other_client) = two_replicas(database, config).await;

    let made = driving_client
        .place_order(order("made", "latte", "tok_visa"))
        .await
        .unwrap()
        .into_inner();
    let seen_elsewhere = watched_to_end(other_client.clone(), made.order_id.clone()).await;
    let seen_here = watched_to_end(driving_client.clone(), made.order_id.clone()).await;
    assert_eq!(seen_elsewhere, seen_here);
    assert_eq!(seen_elsewhere.last().unwrap().r#type(), E::PaymentCaptured);
    let sequences: Vec<i64> = seen_elsewhere.iter().map(|e| e.sequence).collect();
    assert_eq!(
        sequences,
        (1..=seen_elsewhere.len() as i64).collect::<Vec<_>>()
    );

    let cancelled = driving_client
        .place_order(order("cancelled", "latte", "tok_visa"))
        .await
        .unwrap()
        .into_inner();
    let watch_here = tokio::spawn(watched_to_end(
        driving_client.clone(),
        cancelled.order_id.clone(),
    ));
    other_client
        .cancel_order(CancelOrderRequest {
            order_id: cancelled.order_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    let seen_here = watch_here.await.unwrap();
    let types: Vec<E> = seen_here.iter().map(|e| e.r#type()).collect();
    assert!(types.contains(&E::CancelRequested), "{types:?}");
    assert_eq!(types.last(), Some(&E::Cancelled), "{types:?}");
}

/// On PostgreSQL, a replica hears the other's writes at once (LISTEN/NOTIFY)
/// rather than at its next poll: with the poll an hour apart, a watch on
/// the replica that does not drive the order still follows it to its end.
/// (SQLite has no notifications: the poll is all there is, tested above.)
#[tokio::test]
async fn on_postgres_a_watch_hears_the_other_replicas_writes_without_polling() {
    let (dir, payment) = payment(Duration::ZERO).await;
    let database = brewmesh_testing::database(dir.path(), "barista").await;
    if database.is_sqlite() {
        return;
    }
    let config = |database| brewmesh_barista::Config {
        watch_poll: Duration::from_secs(3600),
        ..barista_config(database, payment.addr.to_string())
    };
    let (_servers, mut driving_client, other_client) = two_replicas(database, config).await;
    // Batches too: one statement's events come in one notification.
    let placed = driving_client
        .batch_place_orders(BatchPlaceOrdersRequest {
            requests: (0..3)
                .map(|n| order(&format!("heard-{n}"), "latte", "tok_visa"))
                .collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .orders;
    for made in placed {
        // Within 30 s, though the poll is an hour apart.
        let events = watched_to_end(other_client.clone(), made.order_id).await;
        assert_eq!(events.last().unwrap().r#type(), E::PaymentCaptured);
    }
}

/// Rows this binary cannot read (an unknown saga step on an unfinished
/// order, an unknown state on a READY one) are skipped and reported: the
/// barista still starts, still finishes the other orphaned orders, and
/// still lists the page; the unfinished one is quarantined, out of every
/// barista's way.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_row_stops_neither_the_barista_nor_a_page() {
    use sqlx::Connection as _;
    let (dir, payment) = payment(Duration::from_millis(10)).await;
    let database = brewmesh_testing::database(dir.path(), "barista").await;
    let config = barista_config(database.clone(), payment.addr.to_string());
    let barista = spawn(|l, s| brewmesh_barista::run(l, config.clone(), s)).await;
    let mut client = BaristaClient::new(brewmesh_runtime::client::channel(&barista.url()).unwrap());
    let mut ids = Vec::new();
    for key in ["bad-step", "bad-state", "orphan", "fine"] {
        let placed = client.place_order(order(key, "espresso", "tok_visa")).await;
        ids.push(placed.unwrap().into_inner().order_id);
    }
    for id in &ids {
        let mut stream = client
            .watch_order(WatchOrderRequest {
                order_id: id.clone(),
                after_sequence: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut last = E::Unspecified;
        while let Some(event) = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("the order ends within 30s")
        {
            last = event.unwrap().r#type();
        }
        assert_eq!(last, E::PaymentCaptured);
    }
    let _ = barista.stop().await;

    // Plant: an unfinished order with a step nobody knows, a READY order
    // with a state nobody knows, and an orphan left at step Complete.
    sqlx::any::install_default_drivers();
    let url = database.url("barista.db").unwrap();
    let mut db = sqlx::AnyConnection::connect(&url).await.unwrap();
    let plant = [
        (
            "UPDATE orders SET saga_step = 'bogus', lease_until = 0 WHERE order_id = $1",
            &ids[0],
        ),
        ("UPDATE orders SET state = 99 WHERE order_id = $1", &ids[1]),
        (
            "UPDATE orders SET saga_step = 'complete', state = 2, owner = 'gone', lease_until = 0 WHERE order_id = $1",
            &ids[2],
        ),
    ];
    for (sql, id) in plant {
        sqlx::query(sql).bind(id).execute(&mut db).await.unwrap();
    }

    let barista = spawn(|l, s| brewmesh_barista::run(l, config, s)).await;
    let mut client = BaristaClient::new(brewmesh_runtime::client::channel(&barista.url()).unwrap());
    // The orphan is taken over and finished again: READY.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = client
            .get_order(GetOrderRequest {
                order_id: ids[2].clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if got.state() == OrderState::Ready {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the orphan is finished: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The page lists every readable order.
    let page = client
        .list_orders(ListOrdersRequest {
            page_size: 10,
            ..Default::default()
        })
        .await
        .expect("one bad row does not fail the page")
        .into_inner();
    let listed: Vec<&str> = page.orders.iter().map(|o| o.order_id.as_str()).collect();
    assert!(
        listed.contains(&ids[3].as_str()) && listed.contains(&ids[2].as_str()),
        "{listed:?}"
    );
    assert!(!listed.contains(&ids[1].as_str()), "{listed:?}");
    // The unreadable order answers DATA_LOSS, and is quarantined.
    let status = client
        .get_order(GetOrderRequest {
            order_id: ids[1].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    let owner: String = sqlx::query_scalar("SELECT owner FROM orders WHERE order_id = $1")
        .bind(&ids[0])
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(owner, brewmesh_barista::store::QUARANTINED);
}

fn batch(entries: Vec<PlaceOrderRequest>) -> BatchPlaceOrdersRequest {
    BatchPlaceOrdersRequest { requests: entries }
}

/// The QuotaFailure of a refusal no retry can help: RESOURCE_EXHAUSTED
/// with a negative pushback (gRFC A6).
fn never_fits(status: &tonic::Status) -> tonic_types::QuotaFailure {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "-1"
    );
    status.get_details_quota_failure().unwrap()
}

impl Mesh {
    /// How a batch of `entries` is refused.
    async fn refused_batch(&mut self, entries: Vec<PlaceOrderRequest>) -> tonic::Status {
        self.barista
            .batch_place_orders(batch(entries))
            .await
            .expect_err("the batch is refused")
    }

    async fn place_all(&mut self, entries: Vec<PlaceOrderRequest>) -> Vec<Order> {
        self.barista
            .batch_place_orders(batch(entries))
            .await
            .expect("batch place orders")
            .into_inner()
            .orders
    }

    /// Every event of `orders` on one WatchOrders stream, to its end, by
    /// order in the order given.
    async fn watch_all(&mut self, orders: &[Order]) -> Vec<Vec<OrderEvent>> {
        let stream = self
            .barista
            .watch_orders(WatchOrdersRequest {
                order_ids: orders.iter().map(|o| o.order_id.clone()).collect(),
            })
            .await
            .expect("watch orders")
            .into_inner();
        let events: Vec<OrderEvent> =
            tokio::time::timeout(Duration::from_secs(30), stream.collect::<Result<_, _>>())
                .await
                .expect("every order ends within 30s")
                .expect("the stream ends cleanly");
        let by_order: Vec<Vec<OrderEvent>> = orders
            .iter()
            .map(|o| {
                events
                    .iter()
                    .filter(|e| e.order_id == o.order_id)
                    .cloned()
                    .collect()
            })
            .collect();
        for events in &by_order {
            let sequences: Vec<i64> = events.iter().map(|e| e.sequence).collect();
            let expected: Vec<i64> = (1..=events.len() as i64).collect();
            assert_eq!(
                sequences, expected,
                "each order's events whole and in order"
            );
        }
        by_order
    }

    async fn order_count(&mut self) -> usize {
        self.barista
            .list_orders(ListOrdersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .orders
            .len()
    }
}

#[tokio::test]
async fn a_bad_entry_refuses_the_whole_batch_naming_it() {
    let mut mesh = mesh(Duration::ZERO, |_| {}).await;
    let fields = |status: tonic::Status| -> Vec<String> {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        status
            .get_details_bad_request()
            .unwrap()
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect()
    };
    let mut nameless = order("b3", "latte", "tok_visa");
    nameless.customer_name = " ".into();
    let mut keyless = order("", "latte", "tok_visa");
    keyless.card_token = String::new();
    let status = mesh
        .barista
        .batch_place_orders(batch(vec![
            order("b1", "latte", "tok_visa"),
            nameless,
            keyless,
        ]))
        .await
        .unwrap_err();
    assert_eq!(
        fields(status),
        [
            "requests[1].customer_name",
            "requests[2].idempotency_key",
            "requests[2].card_token"
        ]
    );
    // A drink not on the menu: NOT_FOUND as for one order, each entry
    // named.
    let status = mesh
        .barista
        .batch_place_orders(batch(vec![
            order("b1", "latte", "tok_visa"),
            order("b2", "tea", "tok_visa"),
            order("b3", "cocoa", "tok_visa"),
        ]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(
        status.get_details_resource_info().unwrap().resource_name,
        "tea"
    );
    let named: Vec<String> = status
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(named, ["requests[1].item_id", "requests[2].item_id"]);
    let status = mesh
        .barista
        .batch_place_orders(batch(Vec::new()))
        .await
        .unwrap_err();
    assert_eq!(fields(status), ["requests"]);
    let too_many = (0..1001)
        .map(|i| order(&format!("many-{i}"), "espresso", "tok_visa"))
        .collect();
    let status = mesh
        .barista
        .batch_place_orders(batch(too_many))
        .await
        .unwrap_err();
    assert_eq!(fields(status), ["requests"]);
    // More new orders than the shop has places (2 machines, 4 waiting).
    let too_big = (0..7)
        .map(|i| order(&format!("big-{i}"), "espresso", "tok_visa"))
        .collect();
    // More than it holds: no retry can help, and the answer says so.
    never_fits(&mesh.refused_batch(too_big).await);
    assert_eq!(
        mesh.order_count().await,
        0,
        "nothing of a refused batch is stored"
    );

    // A key used before for another drink: the whole batch is refused.
    let earlier = mesh.place(order("kept", "latte", "tok_visa")).await;
    let status = mesh
        .barista
        .batch_place_orders(batch(vec![
            order("fresh", "latte", "tok_visa"),
            order("kept", "espresso", "tok_visa"),
        ]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.reason, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(info.metadata["field"], "requests[1].idempotency_key");
    // One key for two different entries of one batch: the same.
    let status = mesh
        .barista
        .batch_place_orders(batch(vec![
            order("twice", "latte", "tok_visa"),
            order("twice", "espresso", "tok_visa"),
        ]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.metadata["field"], "requests[1].idempotency_key");
    assert_eq!(mesh.order_count().await, 1);
    // The same entry twice is one order, answered twice.
    let same = mesh
        .place_all(vec![
            order("twice", "latte", "tok_visa"),
            order("twice", "latte", "tok_visa"),
        ])
        .await;
    assert_eq!(same[0].order_id, same[1].order_id);
    assert_eq!(mesh.order_count().await, 2);
    mesh.watch(&earlier.order_id).await;
    mesh.watch(&same[0].order_id).await;
}

#[tokio::test]
async fn a_replayed_batch_returns_the_same_orders_and_charges_each_once() {
    let mut mesh = mesh(Duration::from_millis(20), |_| {}).await;
    let entries = vec![
        order("r1", "latte", "tok_visa"),
        order("r2", "espresso", "tok_visa"),
        order("r3", "cappuccino", "tok_visa"),
    ];
    let first = mesh.place_all(entries.clone()).await;
    assert_eq!(first.len(), 3);
    assert!(first.iter().all(|o| o.state() == OrderState::Accepted));
    let items: Vec<&str> = first.iter().map(|o| o.item_id.as_str()).collect();
    assert_eq!(
        items,
        ["latte", "espresso", "cappuccino"],
        "in the batch's order"
    );
    let again = mesh.place_all(entries.clone()).await;
    let ids =
        |orders: &[Order]| -> Vec<String> { orders.iter().map(|o| o.order_id.clone()).collect() };
    assert_eq!(ids(&again), ids(&first));
    // An entry replayed alone is the same order too.
    let alone = mesh.place(entries[1].clone()).await;
    assert_eq!(alone.order_id, first[1].order_id);

    for events in mesh.watch_all(&first).await {
        let types = types(&events);
        assert!(types.contains(&E::Ready), "{types:?}");
        assert!(types.contains(&E::PaymentCaptured), "{types:?}");
    }
    // Replayed once more after the fact: the orders as they stand.
    let after = mesh.place_all(entries).await;
    assert_eq!(ids(&after), ids(&first));
    assert!(after.iter().all(|o| o.state() == OrderState::Ready));
    for order in &first {
        let payments = mesh.payments_of(&order.order_id).await;
        assert_eq!(payments.len(), 1, "one payment per order");
        assert_eq!(captured(&payments), 1);
    }
    assert_eq!(mesh.order_count().await, 3);
}

#[tokio::test]
async fn a_declined_card_in_a_batch_fails_only_its_order() {
    let mut mesh = mesh(Duration::ZERO, |_| {}).await;
    let orders = mesh
        .place_all(vec![
            order("d1", "latte", "tok_visa"),
            order("d2", "latte", "tok_declined"),
            order("d3", "espresso", "tok_visa"),
        ])
        .await;
    let events = mesh.watch_all(&orders).await;
    let last: Vec<E> = events
        .iter()
        .map(|e| {
            e.iter()
                .rev()
                .find(|e| matches!(e.r#type(), E::Ready | E::Failed))
                .unwrap()
                .r#type()
        })
        .collect();
    assert_eq!(last, [E::Ready, E::Failed, E::Ready]);
    let states: Vec<OrderState> = {
        let mut states = Vec::new();
        for order in &orders {
            states.push(mesh.get(&order.order_id).await.state());
        }
        states
    };
    assert_eq!(
        states,
        [OrderState::Ready, OrderState::Failed, OrderState::Ready]
    );
    for (order, charged) in orders.iter().zip([1, 0, 1]) {
        let payments = mesh.payments_of(&order.order_id).await;
        assert_eq!(captured(&payments), charged, "{}", order.order_id);
    }

    // WatchOrders of an order that does not exist: NOT_FOUND, no events.
    let status = mesh
        .barista
        .watch_orders(WatchOrdersRequest {
            order_ids: vec![
                orders[0].order_id.clone(),
                brewmesh_runtime::ids::new("ord"),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = mesh
        .barista
        .watch_orders(WatchOrdersRequest {
            order_ids: vec![orders[0].order_id.clone(), "ord_x".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let violation = &status.get_details_bad_request().unwrap().field_violations[0];
    assert_eq!(violation.field, "order_ids[1]");
}
