//! Micro-benchmarks of the gateway's request path, each beside a baseline
//! measured in the same run: JSON → protobuf for PlaceOrder (against
//! parsing the same JSON into a `serde_json::Value`), protobuf → JSON for an
//! Order and for the menu, by reflection and by their JSON plans (against
//! writing the same `Value` back), and finding a route among all of
//! brewmesh's.
//!
//! `cargo bench -p brewmesh-gateway --bench transcode`

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage};

use brewmesh_gateway::jsonplan::Plans;
use brewmesh_gateway::routes::{self, MethodSettings};
use brewmesh_gateway::transcode;

const PLACE_ORDER: &[u8] =
    br#"{"idempotencyKey":"order-1","itemId":"latte","customerName":"Ada","cardToken":"tok_visa"}"#;
const ORDER: &str = r#"{"orderId":"ord_01a22bb674aa701eb3ce08f13d68088a","itemId":"latte","customerName":"Ada","price":{"currencyCode":"USD","amountMinor":"475"},"state":"ORDER_STATE_READY","paymentId":"pay_01a22bb67f5373deb36b848eaa0f869f","failureReason":"","createTime":"2026-11-30T09:08:27.434064Z","updateTime":"2026-11-30T09:08:27.434064Z"}"#;

const MENU: &str = r#"{"items":[{"itemId":"espresso","displayName":"Espresso","description":"A single shot, pulled short.","price":{"currencyCode":"USD","amountMinor":"300"},"espressoShots":1,"steamedMilk":false},{"itemId":"americano","displayName":"Americano","description":"Espresso and hot water.","price":{"currencyCode":"USD","amountMinor":"350"},"espressoShots":1,"steamedMilk":false},{"itemId":"cappuccino","displayName":"Cappuccino","description":"Espresso, steamed milk, a deep layer of foam.","price":{"currencyCode":"USD","amountMinor":"425"},"espressoShots":1,"steamedMilk":true},{"itemId":"latte","displayName":"Caffè Latte","description":"Espresso and plenty of steamed milk.","price":{"currencyCode":"USD","amountMinor":"475"},"espressoShots":1,"steamedMilk":true},{"itemId":"flat_white","displayName":"Flat White","description":"A double shot under a thin layer of milk.","price":{"currencyCode":"USD","amountMinor":"450"},"espressoShots":2,"steamedMilk":true}]}"#;

fn benches(c: &mut Criterion) {
    let pool = DescriptorPool::decode(brewmesh::FILE_DESCRIPTOR_SET).unwrap();
    let services: Vec<String> = pool
        .services()
        .filter(|s| s.full_name().starts_with("brewmesh."))
        .map(|s| s.full_name().to_owned())
        .collect();
    let table = routes::build(&pool, &services, &MethodSettings::default()).unwrap();
    let place = table
        .iter()
        .find(|r| r.rpc.method.name() == "PlaceOrder")
        .unwrap();

    let mut group = c.benchmark_group("request");
    group.bench_function("baseline: JSON into serde_json::Value", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(PLACE_ORDER)).unwrap())
    });
    group.bench_function("PlaceOrder: JSON to protobuf bytes", |b| {
        b.iter(|| {
            transcode::request::<&str>(place, &[], None, black_box(PLACE_ORDER))
                .unwrap()
                .encode_to_vec()
        })
    });
    group.finish();

    let order_descriptor = pool
        .get_message_by_name("brewmesh.barista.v1.Order")
        .unwrap();
    let order = transcode::from_json(order_descriptor.clone(), ORDER.as_bytes()).unwrap();
    let bytes = order.encode_to_vec();
    let value: serde_json::Value = serde_json::from_str(ORDER).unwrap();
    let mut group = c.benchmark_group("response");
    group.bench_function("baseline: serde_json::Value to JSON", |b| {
        b.iter(|| serde_json::to_vec(black_box(&value)).unwrap())
    });
    group.bench_function("Order: protobuf bytes to JSON", |b| {
        b.iter(|| {
            let message =
                DynamicMessage::decode(order_descriptor.clone(), black_box(&bytes[..])).unwrap();
            transcode::to_json(&message)
        })
    });
    let plans = Plans::build(
        &pool,
        ["brewmesh.barista.v1.Order", "brewmesh.barista.v1.Menu"],
    );
    group.bench_function("Order: protobuf bytes to JSON by its plan", |b| {
        b.iter(|| {
            plans
                .to_json(&order_descriptor, black_box(&bytes[..]))
                .unwrap()
        })
    });
    let menu_descriptor = pool
        .get_message_by_name("brewmesh.barista.v1.Menu")
        .unwrap();
    let menu = transcode::from_json(menu_descriptor.clone(), MENU.as_bytes()).unwrap();
    let menu_bytes = menu.encode_to_vec();
    let menu_value: serde_json::Value = serde_json::from_str(MENU).unwrap();
    group.bench_function("baseline: the menu's serde_json::Value to JSON", |b| {
        b.iter(|| serde_json::to_vec(black_box(&menu_value)).unwrap())
    });
    group.bench_function("Menu: protobuf bytes to JSON", |b| {
        b.iter(|| {
            let message =
                DynamicMessage::decode(menu_descriptor.clone(), black_box(&menu_bytes[..]))
                    .unwrap();
            transcode::to_json(&message)
        })
    });
    group.bench_function("Menu: protobuf bytes to JSON by its plan", |b| {
        b.iter(|| {
            plans
                .to_json(&menu_descriptor, black_box(&menu_bytes[..]))
                .unwrap()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("routing");
    group.bench_function("match POST /v1/orders/{order_id}:cancel", |b| {
        b.iter(|| {
            table
                .iter()
                .filter(|r| r.method == http::Method::POST)
                .find_map(|r| {
                    r.template.matches(black_box(
                        "/v1/orders/ord_01a22bb674aa701eb3ce08f13d68088a:cancel",
                    ))
                })
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(transcode_benches, benches);
criterion_main!(transcode_benches);
