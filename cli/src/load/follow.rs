//! One customer's visit, the same over either entrance: place the order
//! (repeated after UNAVAILABLE under its idempotency key, and by a patient
//! customer after a full shop), then follow it
//! until the drink is done, watching again after a watch that ends early.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tonic::Code;

use brewmesh::pb::barista::v1::{OrderEventType, PlaceOrderRequest};

use super::args::{Manner, Until};

/// How one customer's visit ended.
#[derive(Debug, Clone)]
pub(super) enum Ending {
    /// Served, after this long.
    Served(Duration),
    /// The order ended FAILED or CANCELLED, for this reason.
    Failed(String),
    /// A call failed with this gRPC code, and message.
    Error(Code, String),
    /// The shop was full (RESOURCE_EXHAUSTED): come back after this long,
    /// it said. Counted as a RESOURCE_EXHAUSTED error if it ends a customer.
    Full(Duration, String),
}

/// One event of an order, as either entrance tells it.
pub(super) struct Event {
    pub(super) order_id: String,
    pub(super) sequence: i64,
    pub(super) kind: OrderEventType,
    pub(super) detail: String,
}

/// A way into the shop: REST through the gateway, or gRPC to the barista.
pub(super) trait Entrance {
    /// An open watch of one order.
    type Events: Events;

    /// Places `order`; answers its id.
    async fn place(&self, order: &PlaceOrderRequest) -> Result<String, Ending>;

    /// Watches order `order_id` from after event `after`.
    async fn watch(&self, order_id: &str, after: i64) -> Result<Self::Events, Ending>;

    /// Places `orders` in one batch; answers their ids, in order.
    async fn place_all(&self, orders: &[PlaceOrderRequest]) -> Result<Vec<String>, Ending>;

    /// Watches every order of `order_ids` on one stream, each from its
    /// first event.
    async fn watch_all(&self, order_ids: &[String]) -> Result<Self::Events, Ending>;
}

/// The events of an open watch; an `Ending::Error` ends the watch.
pub(super) trait Events {
    async fn next(&mut self) -> Option<Result<Event, Ending>>;
}

/// PlaceOrders repeated after UNAVAILABLE, in this run.
pub(super) static RETRIES: AtomicU64 = AtomicU64::new(0);

/// Customers (or groups) that came back after a full shop, in this run.
pub(super) static COMEBACKS: AtomicU64 = AtomicU64::new(0);

/// Serves one customer `order` through `entrance`: `Ok` once it counts as
/// served (`until`), or how it ended otherwise.
pub(super) async fn visit(
    entrance: &impl Entrance,
    order: PlaceOrderRequest,
    Manner { until, patient }: Manner,
) -> Result<(), Ending> {
    let order_id = repeated(|| entrance.place(&order), patient).await?;
    if until == Until::Accepted {
        return Ok(());
    }
    let mut after = 0i64;
    let mut backoff = Duration::from_millis(100);
    // Until the drink is done or the customer's --timeout passes (the
    // caller's): a watch that ends early (a barista draining, a connection
    // lost) is resumed after the last event seen, after a growing wait.
    loop {
        match entrance.watch(&order_id, after).await {
            Ok(mut events) => {
                while let Some(event) = events.next().await {
                    let event = match event {
                        Ok(event) => event,
                        Err(Ending::Error(Code::Unavailable, _)) => break,
                        Err(ending) => return Err(ending),
                    };
                    after = event.sequence;
                    match event.kind {
                        OrderEventType::Ready => return Ok(()),
                        OrderEventType::Failed | OrderEventType::Cancelled => {
                            return Err(Ending::Failed(event.detail));
                        }
                        _ => {}
                    }
                }
            }
            Err(Ending::Error(Code::Unavailable, _)) => {}
            Err(ending) => return Err(ending),
        }
        rewatch_wait(&mut backoff).await;
    }
}

/// Serves a group of customers, `orders`, through `entrance` with one
/// batch and one watch: tells `ended` each customer's end (its index in
/// `orders`) as it comes, as [`visit`] would answer it.
pub(super) async fn visit_all(
    entrance: &impl Entrance,
    orders: &[PlaceOrderRequest],
    Manner { until, patient }: Manner,
    mut ended: impl FnMut(usize, Result<(), Ending>),
) {
    let order_ids = match repeated(|| entrance.place_all(orders), patient).await {
        Ok(order_ids) => order_ids,
        Err(ending) => {
            (0..orders.len()).for_each(|i| ended(i, Err(ending.clone())));
            return;
        }
    };
    if until == Until::Accepted {
        (0..orders.len()).for_each(|i| ended(i, Ok(())));
        return;
    }
    let mut open: std::collections::HashMap<String, usize> = order_ids
        .into_iter()
        .enumerate()
        .map(|(i, order_id)| (order_id, i))
        .collect();
    let mut backoff = Duration::from_millis(100);
    // As in `visit`: a watch that ends early is opened again, for the
    // orders still open (each from its first event).
    while !open.is_empty() {
        let watching: Vec<String> = open.keys().cloned().collect();
        let failure = match entrance.watch_all(&watching).await {
            Ok(mut events) => loop {
                match events.next().await {
                    None | Some(Err(Ending::Error(Code::Unavailable, _))) => break None,
                    Some(Err(ending)) => break Some(ending),
                    Some(Ok(event)) => {
                        let end = match event.kind {
                            OrderEventType::Ready => Ok(()),
                            OrderEventType::Failed | OrderEventType::Cancelled => {
                                Err(Ending::Failed(event.detail))
                            }
                            _ => continue,
                        };
                        if let Some(i) = open.remove(&event.order_id) {
                            ended(i, end);
                        }
                        if open.is_empty() {
                            return;
                        }
                    }
                }
            },
            Err(Ending::Error(Code::Unavailable, _)) => None,
            Err(ending) => Some(ending),
        };
        if let Some(ending) = failure {
            open.into_values()
                .for_each(|i| ended(i, Err(ending.clone())));
            return;
        }
        rewatch_wait(&mut backoff).await;
    }
}

/// Places with `call`, repeating it while it fails UNAVAILABLE (a database
/// that could not keep up, a replica going away), up to 6 times with
/// growing, jittered waits, as the service's message asks; and, `patient`,
/// after a full shop as often as it takes, each time no sooner than the
/// shop said, and later the more often it was full (up to 10 s, jittered).
/// Every order carries an idempotency key, so a repeat can never make a
/// second one. The customer's --timeout (the caller's) bounds the whole.
async fn repeated<T, F: Future<Output = Result<T, Ending>>>(
    call: impl Fn() -> F,
    patient: bool,
) -> Result<T, Ending> {
    let mut backoff = Duration::from_millis(100);
    let mut left = 6;
    let mut later = Duration::from_millis(250);
    loop {
        match call().await {
            Err(Ending::Full(after, _)) if patient => {
                COMEBACKS.fetch_add(1, Ordering::Relaxed);
                let wait = after.max(later);
                let jitter = Duration::from_millis(fastrand::u64(0..=wait.as_millis() as u64));
                tokio::time::sleep(wait + jitter).await;
                later = (later * 2).min(Duration::from_secs(10));
            }
            Err(Ending::Error(Code::Unavailable, _)) if left > 0 => {
                left -= 1;
                RETRIES.fetch_add(1, Ordering::Relaxed);
                let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64));
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// Waits before watching an order again: 100 ms, doubling to 2 s, jittered.
async fn rewatch_wait(backoff: &mut Duration) {
    let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
    tokio::time::sleep(*backoff + jitter).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
}
