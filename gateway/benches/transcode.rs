//! Micro-benchmarks of the gateway's request path, each beside a baseline
//! measured in the same run: JSON → protobuf for PlaceOrder (against
//! parsing the same JSON into a `serde_json::Value`), protobuf → JSON for an
//! Order (against writing that `Value` back), and finding a route among all
//! of brewmesh's.
//!
//! `cargo bench -p brewmesh-gateway --bench transcode`

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage};

use brewmesh_gateway::routes::{self, MethodSettings};
use brewmesh_gateway::transcode;

const PLACE_ORDER: &[u8] =
    br#"{"idempotencyKey":"order-1","itemId":"latte","customerName":"Ada","cardToken":"tok_visa"}"#;
const ORDER: &str = r#"{"orderId":"ord_01a22bb674aa701eb3ce08f13d68088a","itemId":"latte","customerName":"Ada","price":{"currencyCode":"USD","amountMinor":"475"},"state":"ORDER_STATE_READY","paymentId":"pay_01a22bb67f5373deb36b848eaa0f869f","failureReason":"","createTime":"2026-11-30T09:08:27.434064Z","updateTime":"2026-11-30T09:08:27.434064Z"}"#;

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
