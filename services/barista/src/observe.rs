//! The barista's own metrics: orders placed, sagas by outcome, and the
//! stations' utilization and queues (read from their semaphores at scrape
//! time; with remote stations, the parts this barista has at them).

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::stations::Stations;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    table: &'static str,
}

struct Orders {
    placed: Counter,
    finished: Family<OutcomeLabels, Counter>,
    unreadable: Family<TableLabels, Counter>,
}

fn orders() -> &'static Orders {
    static ORDERS: OnceLock<Orders> = OnceLock::new();
    ORDERS.get_or_init(|| {
        let orders = Orders {
            placed: Counter::default(),
            finished: Family::default(),
            unreadable: Family::default(),
        };
        brewmesh_runtime::metrics::register(
            "brewmesh_orders_placed",
            "Orders accepted (a repeated idempotency key is not a new order)",
            orders.placed.clone(),
        );
        brewmesh_runtime::metrics::register(
            "brewmesh_orders_finished",
            "Order sagas finished, by outcome (ready, failed, cancelled)",
            orders.finished.clone(),
        );
        brewmesh_runtime::metrics::register(
            "brewmesh_unreadable_rows",
            "Stored rows skipped because they could not be read (an unknown state, step or event type), by table",
            orders.unreadable.clone(),
        );
        orders
    })
}

/// A new order was accepted.
pub fn order_placed() {
    orders().placed.inc();
}

/// An order reached a final state.
pub fn order_finished(outcome: &'static str) {
    orders()
        .finished
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
}

/// A row of `table` could not be read and was skipped.
pub fn unreadable_row(table: &'static str) {
    orders()
        .unreadable
        .get_or_create(&TableLabels { table })
        .inc();
}

/// Registers the stations' gauges (and the order counters, so they read 0
/// before the first order).
pub fn register(stations: &Stations) {
    let _ = orders();
    brewmesh_station::observe::register(vec![stations.espresso.load(), stations.milk.load()]);
}
